#!/usr/bin/env bash
# The Azure double's own checks: its unit tests (test_double.py), then a cross-check of its
# blob reads against Azurite (check_against_azurite.py), which this script starts on a free
# loopback port and stops. Exits non-zero when anything fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/install.sh"

python3 "$here/test_double.py"

azurite="$here/node_modules/.bin/azurite-blob"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
args=(--blobHost 127.0.0.1 --blobPort "$port" --skipApiVersionCheck --silent --disableTelemetry)
workdir=$(mktemp -d)
if "$azurite" --help 2>/dev/null | grep -q -- --inMemoryPersistence; then
  args+=(--inMemoryPersistence)
else
  args+=(--location "$workdir")
fi
"$azurite" "${args[@]}" >"$workdir/azurite.log" 2>&1 &
azurite_pid=$!
trap 'kill "$azurite_pid" 2>/dev/null || true; wait "$azurite_pid" 2>/dev/null || true; rm -rf "$workdir"' EXIT

for _ in $(seq 1 150); do
  if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' "$port" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$azurite_pid" 2>/dev/null; then
    cat "$workdir/azurite.log" >&2
    echo "azurite exited before listening" >&2
    exit 1
  fi
  sleep 0.2
done
python3 "$here/check_against_azurite.py" --azurite "http://127.0.0.1:$port"
