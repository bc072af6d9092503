#!/usr/bin/env bash
# Boots a raw disk image made by make-linux-image.sh (or an EBS snapshot of one, written
# back with `rehost snapshot download`) under qemu with UEFI firmware (OVMF), and succeeds
# only if the guest prints its banner on the serial console: proof that what rehost
# replicated still boots.
#
#   scripts/boot-check.sh DISK.raw [TIMEOUT_SECONDS]     (default 120)
#
# Needs qemu-system-x86 and ovmf (tests/emulators/install.sh installs them).
set -euo pipefail
disk=${1:?usage: $0 DISK.raw [TIMEOUT_SECONDS]}
timeout_secs=${2:-120}
code=/usr/share/OVMF/OVMF_CODE_4M.fd
vars_template=/usr/share/OVMF/OVMF_VARS_4M.fd
for need in qemu-system-x86_64 "$code" "$vars_template"; do
  [[ -e $need ]] || command -v "$need" >/dev/null || {
    echo "$0: $need is missing (apt-get install qemu-system-x86 ovmf)" >&2
    exit 1
  }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
boot() { # ACCEL: boots once; the guest powers itself off after the banner
  cp "$vars_template" "$tmp/vars.fd"
  : >"$tmp/console.log"
  # snapshot=on: the guest never writes to the image under test.
  timeout "$timeout_secs" qemu-system-x86_64 \
    -accel "$1" -machine q35 -m 512 -nographic -no-reboot \
    -drive if=pflash,format=raw,readonly=on,file="$code" \
    -drive if=pflash,format=raw,file="$tmp/vars.fd" \
    -drive if=virtio,format=raw,file="$disk",snapshot=on \
    -serial file:"$tmp/console.log" -monitor none </dev/null >/dev/null 2>&1 || true
  grep -a -m1 'REHOST-BOOTED' "$tmp/console.log"
}
# Software emulation, always: about 10 s for this image, and the same everywhere (a
# /dev/kvm exposed by nested virtualisation may be unable to run a guest and hang).
if banner=$(boot tcg); then
  echo "${banner//$'\r'/}"
  exit 0
fi
echo "$disk did not boot to the banner within ${timeout_secs}s; console:" >&2
tail -n 30 "$tmp/console.log" >&2 || true
exit 1
