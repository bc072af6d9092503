#!/usr/bin/env bash
# Installs the strict moto emulator (install.sh) and runs its tests quietly with a real client
# (boto3). Exits non-zero when a test fails. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/install.sh"
venv="${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/moto-venv"
cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider test_strict_moto.py "$@"
