#!/usr/bin/env bash
# Installs Samba's smbd (Debian's `samba` package) for the Hyper-V source's SMB tests, skipping
# when it is already there. Nothing is configured or started here: start.sh runs a private
# smbd per test folder (see README.md).
set -euo pipefail

need_apt=()
command -v smbd >/dev/null 2>&1 || [[ -x /usr/sbin/smbd ]] || need_apt+=(samba)
command -v smbpasswd >/dev/null 2>&1 || [[ -x /usr/bin/smbpasswd ]] || need_apt+=(samba-common-bin)

if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need_apt[*]} (run: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
/usr/sbin/smbd --version
