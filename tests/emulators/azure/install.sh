#!/usr/bin/env bash
# Installs Azurite, the reference the Azure double's blob reads are cross-checked against
# (check_against_azurite.py), into node_modules/ beside this script. The double itself needs
# only python3. Skips when Azurite is already there; installs node and npm with apt (as
# root) when they are missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

[[ -x "$here/node_modules/.bin/azurite-blob" ]] && exit 0

if ! command -v npm >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: npm (run: sudo apt-get install nodejs npm)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
cd "$here"
# --no-save: no package.json or lock file is written here; node_modules/ is git-ignored.
npm install --no-audit --no-fund --no-save --loglevel=error azurite@3
