#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine, skipping what is already
# there: qemu-utils (qemu-img and qemu-io are the reference our disk formats are
# cross-checked against) and the strict AWS emulator (moto, in a venv: see moto/README.md).
# The vCenter and Azure emulators: see their folders; the Hyper-V one joins with its issue.
set -euo pipefail

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v qemu-io >/dev/null 2>&1 || need_apt+=(qemu-utils)
# scripts/make-boot-image.sh builds the GPT/ESP and MBR test disks without loop devices.
command -v sgdisk >/dev/null 2>&1 || need_apt+=(gdisk)
command -v sfdisk >/dev/null 2>&1 || need_apt+=(fdisk)
command -v mkfs.vfat >/dev/null 2>&1 || need_apt+=(dosfstools)
command -v mcopy >/dev/null 2>&1 || need_apt+=(mtools)
# A real EFI loader for the UEFI test disk (a stub PE is used without it).
[[ -f /usr/lib/systemd/boot/efi/systemd-bootx64.efi ]] || need_apt+=(systemd-boot-efi)
# scripts/make-linux-image.sh (a disk that really boots: busybox in its initramfs) and
# scripts/boot-check.sh (boots it, or its EBS snapshot read back, under qemu and OVMF).
[[ -x /bin/busybox ]] && /bin/busybox --list | grep -qx poweroff || need_apt+=(busybox-static)
[[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ]] || need_apt+=(ovmf)

if ((${#need_apt[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing: ${need_apt[*]} (run: sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# qemu-system-x86 must come from the same release as qemu-utils: on Debian 12, installing
# the distribution's 7.2 would replace a qemu-utils 10 with 7.2 (qemu before 10 sizes some
# VHDs by CHS geometry, and the format tests are checked against 10). So when qemu-img is 10
# or newer, both come from bookworm-backports, which has the same 10.x build.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  [[ $(id -u) -eq 0 ]] || { echo "missing: qemu-system-x86 (run as root)" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  qemu_major=$(qemu-img --version | sed -n 's/^qemu-img version \([0-9]*\).*/\1/p')
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  if ((qemu_major >= 10)) && [[ $codename == bookworm ]]; then
    list=/etc/apt/sources.list.d/rehost-backports.list
    [[ -f $list ]] || echo "deb http://deb.debian.org/debian bookworm-backports main" >"$list"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-utils qemu-system-x86 >/dev/null
  else
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
  fi
fi
qemu-img --version | head -n 1
"$(dirname "$0")/moto/install.sh"
"$(dirname "$0")/vcsim/build.sh"
"$(dirname "$0")/azure/install.sh"
"$(dirname "$0")/hyperv/install.sh"
"$(dirname "$0")/samba/install.sh"
