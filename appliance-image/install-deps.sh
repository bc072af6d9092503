#!/usr/bin/env bash
# Installs what build.sh and boot-test.sh need, from Debian's packages (as root; skips what
# is present).
#
#   sudo appliance-image/install-deps.sh
set -euo pipefail
[[ $(id -u) -eq 0 ]] || { echo "$0: run as root" >&2; exit 1; }
# package: a file it brings, to tell whether it is there
declare -A wanted=(
    [debootstrap]=/usr/sbin/debootstrap
    [syslinux]=/usr/bin/syslinux
    [syslinux-common]=/usr/lib/syslinux/mbr/gptmbr.bin
    [systemd-boot-efi]=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
    [mtools]=/usr/bin/mcopy
    [dosfstools]=/usr/sbin/mkfs.vfat
    [gdisk]=/usr/sbin/sgdisk
    [e2fsprogs]=/usr/sbin/mke2fs
    [binutils]=/usr/bin/strip
    [xorriso]=/usr/bin/xorriso
    [ovmf]=/usr/share/OVMF/OVMF_CODE_4M.fd
    [curl]=/usr/bin/curl
    [openssl]=/usr/bin/openssl
    [openssh-client]=/usr/bin/ssh
    [python3]=/usr/bin/python3
)
# qemu-system-x86 must match qemu-utils' release (Debian 12's would downgrade a backported
# qemu-utils): tests/emulators/install.sh installs the pair.
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null; then
    "$(dirname "$0")/../tests/emulators/install.sh"
fi
missing=()
for package in "${!wanted[@]}"; do
    [[ -e ${wanted[$package]} ]] || missing+=("$package")
done
((${#missing[@]})) || exit 0
echo "installing: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
