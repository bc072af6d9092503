#!/usr/bin/env bash
# Installs the Hyper-V double's Python side: a venv with a pinned pyspnego (the double's NTLM
# acceptor and message sealing) and the two real WinRM clients its tests check it with
# (pypsrp's WSMan, pywinrm's Protocol).
# Idempotent and fast when already installed: a stamp file records the pinned set, and the
# venv is only (re)built when the stamp differs. Works on a fresh Debian 12 as root.
#   venv: ${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/hyperv-venv
set -euo pipefail

PINS="pyspnego==0.12.4 pypsrp==0.9.1 pywinrm==0.5.0"

home=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}
venv="$home/hyperv-venv"
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
