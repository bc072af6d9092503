#!/usr/bin/env bash
# Builds rehost-vcsim if needed and runs it in the foreground on free loopback ports; it
# prints one line, `READY https://127.0.0.1:P/sdk control=http://127.0.0.1:Q`, when serving.
#   start.sh [--dir DIR] [other rehost-vcsim flags]
# DIR (default: a new temp dir) receives ds/ (the datastore) and certs/ (ca.pem, thumbprint).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
"$here/build.sh"
dir=""
args=()
while (($#)); do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ -n $dir ]] || dir=$(mktemp -d /tmp/rehost-vcsim.XXXXXX)
exec "${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/vcsim/rehost-vcsim" \
  --datastore-dir "$dir/ds" --cert-dir "$dir/certs" "${args[@]}"
