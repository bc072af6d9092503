#!/usr/bin/env bash
# Builds a small (64 MiB) raw disk image shaped like a bootable system, for the importer's
# AMI tests: no root, no loop devices, only tools working on a plain file.
#
#   scripts/make-boot-image.sh OUT.raw [uefi|uefi-arm64|bios]
#
#   uefi        GPT: an EFI System Partition (FAT32, 40 MiB) holding EFI/BOOT/BOOTX64.EFI
#               (systemd-boot's real loader when the systemd-boot-efi package is installed,
#               else a stub with a valid x86_64 PE header) and a Linux root partition.
#   uefi-arm64  the same with EFI/BOOT/BOOTAA64.EFI, a stub PE header for arm64.
#   bios        MBR: one active Linux partition, no ESP.
#
# Needs: sgdisk (gdisk), sfdisk (fdisk), mkfs.vfat (dosfstools), mmd/mcopy (mtools).
set -euo pipefail

out=${1:?usage: $0 OUT.raw [uefi|uefi-arm64|bios]}
mode=${2:-uefi}

# 64 MiB: room for a FAT32 ESP (which needs >= 65525 clusters) and a root partition, yet
# small enough to upload in a test in well under a second.
size_mib=64
# 1 MiB alignment, as every current partitioning tool does.
first_sector=2048
# 40 MiB of 512-byte clusters is ~81,000 clusters: a valid FAT32, as the UEFI spec wants.
esp_sectors=$((40 * 2048))

for tool in sgdisk sfdisk mkfs.vfat mmd mcopy; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install gdisk fdisk dosfstools mtools)" >&2; exit 1; }
done

rm -f "$out"
truncate -s "${size_mib}M" "$out"

# A stub PE image: DOS header ("MZ", e_lfanew = 0x40) then "PE\0\0" and the machine field.
stub_pe() { # $1: machine as two little-endian bytes in printf escapes
    printf 'MZ'
    head -c 58 /dev/zero
    printf '\x40\x00\x00\x00PE\x00\x00'"$1"
    head -c 442 /dev/zero
}

case "$mode" in
uefi | uefi-arm64)
    sgdisk --clear \
        --new=1:${first_sector}:+${esp_sectors} --typecode=1:EF00 --change-name=1:ESP \
        --new=2:0:0 --typecode=2:8300 --change-name=2:root \
        "$out" >/dev/null
    esp_start=$(sgdisk --info=1 "$out" | awk '/^First sector:/ {print $3}')
    esp_end=$(sgdisk --info=1 "$out" | awk '/^Last sector:/ {print $3}')
    # mkfs.fat warns that the file holds more than the ESP (the root partition follows it):
    # expected, so its output is shown only when it fails.
    if ! log=$(mkfs.vfat -F 32 -s 1 -n ESP --offset="$esp_start" "$out" $(((esp_end - esp_start + 1) / 2)) 2>&1); then
        echo "$log" >&2
        exit 1
    fi
    img="$out@@$((esp_start * 512))"
    export MTOOLS_SKIP_CHECK=1
    mmd -i "$img" ::/EFI ::/EFI/BOOT
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if [ "$mode" = uefi ]; then
        loader=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
        if [ ! -f "$loader" ]; then
            loader=$tmp/BOOTX64.EFI
            stub_pe '\x64\x86' >"$loader"
        fi
        mcopy -i "$img" "$loader" ::/EFI/BOOT/BOOTX64.EFI
    else
        stub_pe '\x64\xaa' >"$tmp/BOOTAA64.EFI"
        mcopy -i "$img" "$tmp/BOOTAA64.EFI" ::/EFI/BOOT/BOOTAA64.EFI
    fi
    ;;
bios)
    printf 'label: dos\nstart=%s, type=83, bootable\n' "$first_sector" | sfdisk --quiet "$out"
    ;;
*)
    echo "$0: unknown mode $mode (uefi, uefi-arm64 or bios)" >&2
    exit 2
    ;;
esac
