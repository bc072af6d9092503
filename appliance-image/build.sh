#!/usr/bin/env bash
# Builds the connector appliance from appliance.toml: a raw disk bootable by BIOS and by
# UEFI (a debootstrapped Debian with rehost, cloud-init and the hypervisors' guest tools),
# then `rehost appliance package` turns it into the OVA, the VHDX and the fixed VHD.
#
#   sudo appliance-image/build.sh [--out DIR]        # DIR default: appliance-image/out
#
# Output: DIR/<name>-<version>.{raw,ova,vhdx,vhd}. The disk is assembled in a plain file, without loop
# devices or mounts (GPT by sgdisk, FAT by mkfs.vfat + mtools, ext4 by mke2fs -d); only the
# chroot in which apt installs the packages mounts /proc and /sys.
#
# Environment:
#   REHOST_BIN   the rehost binary (default $CARGO_TARGET_DIR/release/rehost; built when
#                missing). Its debug information is stripped in the image.
#   REHOST_APPLIANCE_CACHE   downloaded packages (default /var/tmp/rehost-appliance-cache)
#   REHOST_APPLIANCE_WORK    the scratch folder (default /var/tmp/rehost-appliance-work)
# Needs: install-deps.sh's packages, python3 (tomllib).
# shellcheck disable=SC2154 # the m_* variables come from the manifest, through eval
set -euo pipefail
start=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
out=$here/out
while (($#)); do
    case $1 in
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    *) echo "usage: $0 [--out DIR]" >&2; exit 2 ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "$0: run as root (debootstrap and chroot)" >&2; exit 1; }
for tool in debootstrap sgdisk mkfs.vfat mcopy mmd syslinux mke2fs python3; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing: run $here/install-deps.sh" >&2; exit 1; }
done
step() { echo "== $* ($(($(date +%s) - start)) s)"; }

# The manifest, as shell variables (m_image_name, m_debian_packages, …).
eval "$(python3 - "$here/appliance.toml" <<'PY'
import shlex, sys, tomllib
m = tomllib.load(open(sys.argv[1], "rb"))
def put(name, value):
    if isinstance(value, list):
        value = " ".join(value)
    print(f"m_{name}={shlex.quote(str(value))}")
for section in ("image", "debian", "disk", "service"):
    for key, value in m[section].items():
        put(f"{section}_{key}", value)
PY
)"
name=$m_image_name-$m_image_version
cache=${REHOST_APPLIANCE_CACHE:-/var/tmp/rehost-appliance-cache}
work=${REHOST_APPLIANCE_WORK:-/var/tmp/rehost-appliance-work}
root=$work/rootfs
mkdir -p "$out" "$cache/debootstrap" "$cache/apt"

# The binary: the release build, stripped (its debug information is ~90% of its size).
target_dir=${CARGO_TARGET_DIR:-/var/tmp/rehost-ci-target}
bin=${REHOST_BIN:-$target_dir/release/rehost}
if [[ ! -x $bin ]]; then
    [[ -z ${REHOST_BIN:-} ]] || { echo "$0: REHOST_BIN=$bin is not an executable" >&2; exit 1; }
    step "building rehost (release)"
    (cd "$repo" && CARGO_TARGET_DIR=$target_dir cargo build --release --locked -p rehost)
fi

cleanup() {
    for m in "$root/sys" "$root/proc"; do
        if mountpoint -q "$m" 2>/dev/null; then umount -l "$m"; fi
    done
}
trap cleanup EXIT

step "debootstrap $m_debian_suite (minbase)"
rm -rf "$work"
mkdir -p "$work"
debootstrap --variant=minbase --cache-dir="$cache/debootstrap" "$m_debian_suite" "$root" "$m_debian_mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

step "packages"
# The overlay first: its dpkg, apt and initramfs settings apply to what is installed next.
cp -a --no-preserve=ownership "$here/rootfs/." "$root/"
chmod 0755 "$root/usr/local/sbin/rehost-firstboot"
chmod 0440 "$root/etc/sudoers.d/rehost-admin"
{
    echo "deb $m_debian_mirror $m_debian_suite main"
    echo "deb $m_debian_mirror $m_debian_suite-updates main"
    [[ -z $m_debian_security_mirror ]] || echo "deb $m_debian_security_mirror $m_debian_suite-security main"
} >"$root/etc/apt/sources.list"
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" # no daemon starts in the chroot
chmod 755 "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
cp -n "$cache/apt/"*.deb "$root/var/cache/apt/archives/" 2>/dev/null || true
in_root apt-get update -qq
# The upgrade first: systemd-resolved, once installed, points /etc/resolv.conf at its stub,
# which answers nothing in the chroot.
in_root apt-get dist-upgrade -y -qq -o Dpkg::Options::=--force-confold >"$work/apt.log" 2>&1 ||
    { tail -n 40 "$work/apt.log" >&2; exit 1; }
# shellcheck disable=SC2086 # the package list is words
in_root apt-get install -y -qq -o Dpkg::Options::=--force-confold $m_debian_packages >>"$work/apt.log" 2>&1 ||
    { tail -n 40 "$work/apt.log" >&2; exit 1; }
cp -n "$root/var/cache/apt/archives/"*.deb "$cache/apt/" 2>/dev/null || true
# Keep the cache to what the current lists name: an older version of a package goes.
(cd "$cache/apt" && ls -t ./*.deb 2>/dev/null | awk -F_ 'seen[$1]++' | xargs -r rm -f)

step "configuring"
install -m 0755 "$bin" "$root/usr/local/bin/rehost"
strip --strip-debug "$root/usr/local/bin/rehost"
in_root useradd --system --user-group --home-dir "$m_service_state_dir" --no-create-home \
    --shell /usr/sbin/nologin --comment 'rehost connector' "$m_service_user"
service_uid=$(chroot "$root" id -u "$m_service_user") service_gid=$(chroot "$root" id -g "$m_service_user")
# The config is the service's to read, not to write; /etc/rehost/tls is where an operator
# puts a certificate of their own.
install -d -m 0750 -o root -g "$service_gid" "$root$m_service_config_dir"
install -d -m 0700 "$root$m_service_config_dir/tls"
chgrp "$service_gid" "$root$m_service_config_dir/rehost.toml"
chmod 0640 "$root$m_service_config_dir/rehost.toml"
install -d -m 0750 -o "$service_uid" -g "$service_gid" "$root$m_service_state_dir"
in_root systemctl enable -q rehost.service rehost-firstboot.service rehost-network.service \
    systemd-networkd.service systemd-resolved.service
# Not on an appliance that is replaced, not updated in place: apt's daily download.
in_root systemctl disable -q apt-daily.timer apt-daily-upgrade.timer 2>/dev/null || true
# No password anywhere: root's is locked, admin gets only an SSH key at first boot.
in_root usermod --password '*' root
echo rehost >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\trehost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
echo 'LANG=C.UTF-8' >"$root/etc/default/locale"
printf 'rehost connector appliance \\n (\\l): first boot in progress\n\n' >"$root/etc/issue"
# Made at first boot, per VM: the machine id and the SSH host keys.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# The partitions' identities, fixed here so the kernel command line and fstab can name them.
root_partuuid=$(cat /proc/sys/kernel/random/uuid)
root_fsuuid=$(cat /proc/sys/kernel/random/uuid)
cat >"$root/etc/fstab" <<EOF
# <file system>	<mount point>	<type>	<options>	<dump>	<pass>
UUID=$root_fsuuid	/	ext4	errors=remount-ro	0	1
EOF
cmdline="root=PARTUUID=$root_partuuid ro console=ttyS0,115200 console=tty0"

step "trimming"
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
initrd=$root/boot/initrd.img-${kernel##*/vmlinuz-}
[[ -f $initrd ]] || { echo "$0: no initramfs for $kernel" >&2; exit 1; }
cp "$kernel" "$work/vmlinuz"
cp "$initrd" "$work/initrd.img"
in_root apt-get clean
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/debconf/*-old \
    "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/var/tmp/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian "$root"/usr/share/i18n/*
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
umount "$root/sys" "$root/proc"
rm -rf "${root:?}"/dev/* "${root:?}"/run/* # devtmpfs and tmpfs at boot
du -sh --apparent-size "$root" | awk '{print "root filesystem: " $1}'

step "disk"
image=$work/$name.raw
rm -f "$image"
truncate -s "${m_disk_size_mib}M" "$image"
# GPT: 1 = the ESP (also BIOS-bootable, attribute 2, for syslinux's gptmbr), 2 = the root
# (type 8304: x86-64 root, as the discoverable partitions spec names it).
first_sector=2048
sgdisk --clear \
    --new=1:$first_sector:+$((m_disk_esp_mib * 2048)) --typecode=1:EF00 --change-name=1:ESP --attributes=1:set:2 \
    --new=2:0:0 --typecode=2:8304 --change-name=2:root --partition-guid=2:"$root_partuuid" \
    "$image" >/dev/null
part() { sgdisk --info="$1" "$image" | awk -v f="$2" '$0 ~ "^" f " sector:" {print $3}'; }
esp_start=$(part 1 First) esp_end=$(part 1 Last) root_start=$(part 2 First) root_end=$(part 2 Last)
dd if=/usr/lib/syslinux/mbr/gptmbr.bin of="$image" bs=440 count=1 conv=notrunc status=none

# The ESP: the kernel and initramfs, systemd-boot for UEFI, syslinux for BIOS. FAT32 with
# 1 KiB clusters: 128 MiB of them is over the 65,525 clusters FAT32 needs.
mkfs.vfat -F 32 -s 2 -n ESP --offset="$esp_start" "$image" $(((esp_end - esp_start + 1) / 2)) >/dev/null 2>&1 ||
    { echo "$0: mkfs.vfat failed" >&2; exit 1; }
esp="$image@@$((esp_start * 512))"
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries ::/syslinux
mcopy -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$work/vmlinuz" ::/vmlinuz
mcopy -i "$esp" "$work/initrd.img" ::/initrd.img
printf 'default rehost.conf\ntimeout 0\neditor no\n' >"$work/loader.conf"
printf 'title rehost connector appliance %s\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s\n' \
    "$m_image_version" "$cmdline" >"$work/rehost.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$work/rehost.conf" ::/loader/entries/rehost.conf
printf 'SERIAL 0 115200\nDEFAULT rehost\nPROMPT 0\nTIMEOUT 1\nLABEL rehost\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND %s\n' \
    "$cmdline" >"$work/syslinux.cfg"
mcopy -i "$esp" "$work/syslinux.cfg" ::/syslinux/syslinux.cfg
syslinux --offset $((esp_start * 512)) --directory /syslinux --install "$image"

# The root: ext4 made from the folder, written at its partition's offset.
mke2fs -q -t ext4 -L root -U "$root_fsuuid" -d "$root" -E offset=$((root_start * 512)),nodiscard \
    "$image" $(((root_end - root_start + 1) / 2))k

mv "$image" "$out/$name.raw"
rm -rf "$work"
step "raw disk: $out/$name.raw ($(du -h --apparent-size "$out/$name.raw" | cut -f1), $(du -h "$out/$name.raw" | cut -f1) allocated)"

# The hypervisors' images, with rehost's own writers, each read back against the disk.
step "packing the OVA, VHDX and VHD"
"$bin" appliance package --manifest "$here/appliance.toml" --disk "$out/$name.raw" --out "$out"
echo "build time: $(($(date +%s) - start)) s"
