#!/usr/bin/env bash
# Installs the strict AWS emulator's Python side: a venv with a pinned moto server, boto3
# (the reference client the emulator's own tests use) and pytest.
# Idempotent and fast when already installed: a stamp file records the pinned set, and the
# venv is only (re)built when the stamp differs. Works on a fresh Debian 12 as root.
#   venv: ${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/moto-venv
set -euo pipefail

MOTO_VERSION=5.2.5
BOTO3_VERSION=1.44.8
PYTEST_VERSION=9.2.0
PINS="moto[server]==${MOTO_VERSION} boto3==${BOTO3_VERSION} pytest==${PYTEST_VERSION}"

home=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}
venv="$home/moto-venv"
stamp="$venv/.rehost-pins"

if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$PINS" ]]; then
  exit 0
fi

command -v python3 >/dev/null 2>&1 || missing_py=1
# Debian's python3 lacks ensurepip until python3-venv is installed.
if [[ -n "${missing_py:-}" ]] || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: python3-venv (run: sudo apt-get install python3-venv)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
fi

mkdir -p "$home"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086 # PINS is a list of requirement specifiers
"$venv/bin/python" -m pip install -q --disable-pip-version-check $PINS
echo "$PINS" >"$stamp"
