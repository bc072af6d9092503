#!/usr/bin/env bash
# The Hyper-V double's own checks: installs its venv (install.sh), then runs test_double.py
# with it: the VHDX/VHD library against qemu-img and rehost's reader (when REHOST_BIN or
# /tmp/rehost-bin exists), and the WS-Management answers with real clients (pypsrp, pywinrm)
# over NTLM with sealing, HTTPS with NTLM and Basic. Exits non-zero when anything fails.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
"$here/install.sh"
venv=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/hyperv-venv
"$venv/bin/python" -W ignore::ResourceWarning "$here/test_double.py"
