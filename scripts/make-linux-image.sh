#!/usr/bin/env bash
# Builds a small (64 MiB) disk image that really boots Linux under UEFI, for the quick start
# and the connector's end-to-end tests: the same GPT/ESP layout as make-boot-image.sh's
# `uefi` mode, with systemd-boot starting Debian's cloud kernel and a busybox initramfs
# whose /init prints a banner on the serial console and powers off.
#
#   scripts/make-linux-image.sh OUT.raw
#
# The kernel comes from Debian's linux-image-*-cloud-amd64 package (downloaded once with
# apt-get download into ${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/linux, or taken
# from REHOST_KERNEL), busybox from busybox-static, the loader from systemd-boot-efi.
# tests/emulators/install.sh installs what this needs. scripts/boot-check.sh boots the
# result (or an EBS snapshot of it, downloaded) under qemu and OVMF.
set -euo pipefail
out=${1:?usage: $0 OUT.raw}
here=$(cd "$(dirname "$0")" && pwd)
cache=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/linux
busybox=/bin/busybox
[[ -x $busybox ]] && "$busybox" --list | grep -qx sh || {
  echo "$0: a static busybox is missing (apt-get install busybox-static)" >&2
  exit 1
}

kernel=${REHOST_KERNEL:-}
if [[ -z $kernel ]]; then
  kernel=$cache/vmlinuz
  if [[ ! -f $kernel ]]; then
    mkdir -p "$cache"
    package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    if [[ -z $package && $(id -u) -eq 0 ]]; then
      apt-get update -qq
      package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
    fi
    [[ -n $package ]] || { echo "$0: no linux-image-cloud-amd64 in apt's lists (run apt-get update)" >&2; exit 1; }
    # As root, apt's download sandbox user may not write here: a warning, not an error.
    (cd "$cache" && apt-get download -q "$package" >/dev/null 2>&1)
    rm -rf "$cache/deb"
    dpkg-deb -x "$cache/$package"_*.deb "$cache/deb"
    cp "$cache"/deb/boot/vmlinuz-* "$kernel"
    rm -rf "$cache/deb" "$cache/$package"_*.deb
  fi
fi

"$here/make-boot-image.sh" "$out" uefi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The initramfs: busybox and an /init that says who booted, then powers off.
root=$tmp/initramfs
mkdir -p "$root"/{bin,dev,proc,sys}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cat >"$root/init" <<'INIT'
#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
echo "REHOST-BOOTED: Linux $(/bin/busybox uname -r) on $(/bin/busybox uname -m), started by rehost's quick-start image"
/bin/busybox poweroff -f
INIT
chmod 755 "$root/init"
# newc cpio written by Python (no cpio tool needed), gzip-compressed.
python3 - "$root" "$tmp/initrd.img" <<'PY'
import gzip, os, stat, sys
root, out = sys.argv[1], sys.argv[2]
def entry(f, name, mode, data=b"", ino=[0]):
    ino[0] += 1
    name_b = name.encode() + b"\0"
    head = b"070701" + b"".join(b"%08X" % v for v in (ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0))
    f.write(head + name_b + b"\0" * (-(110 + len(name_b)) % 4) + data + b"\0" * (-len(data) % 4))
with gzip.open(out, "wb") as f:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                entry(f, rel, st.st_mode, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                entry(f, rel, st.st_mode)
            else:
                entry(f, rel, st.st_mode, open(path, "rb").read())
    entry(f, "TRAILER!!!", 0)
PY

# systemd-boot: one entry, no menu.
esp_start=$(sgdisk --info=1 "$out" | awk '/^First sector:/ {print $3}')
img="$out@@$((esp_start * 512))"
export MTOOLS_SKIP_CHECK=1
mmd -i "$img" ::/loader ::/loader/entries
printf 'default rehost.conf\ntimeout 0\n' >"$tmp/loader.conf"
printf 'title rehost quick-start Linux\nlinux /vmlinuz\ninitrd /initrd.img\noptions console=tty0 console=ttyS0,115200 panic=-1 quiet\n' >"$tmp/rehost.conf"
mcopy -i "$img" "$tmp/loader.conf" ::/loader/loader.conf
mcopy -i "$img" "$tmp/rehost.conf" ::/loader/entries/rehost.conf
mcopy -i "$img" "$kernel" ::/vmlinuz
mcopy -i "$img" "$tmp/initrd.img" ::/initrd.img
