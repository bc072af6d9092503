#!/usr/bin/env bash
# The appliance end to end, the one command for it: installs what the build needs, builds
# the raw disk and packs the OVA, VHDX and VHD (build.sh), boots the disk under qemu with
# software emulation twice — UEFI with a NoCloud seed, BIOS with an OVF-environment ISO —
# waiting each time for the HTTPS API's /healthz (boot-test.sh), and reads the VHDX and the
# VHD back with `rehost disk inspect` (and the VHDX with `qemu-img check`). Prints sizes
# and times.
#
#   sudo appliance-image/test.sh [OUT_DIR]          # default appliance-image/out
#
# REHOST_BIN picks the rehost binary put in the image (default: the release build);
# .ci/run passes the debug build it has just tested, to spare CI a release build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
target_dir=${CARGO_TARGET_DIR:-/var/tmp/rehost-ci-target}
export REHOST_BIN=${REHOST_BIN:-$target_dir/release/rehost}
start=$(date +%s)

"$here/install-deps.sh"
"$here/build.sh" --out "$out"
built=$(($(date +%s) - start))
name=$(python3 -c 'import sys, tomllib; m = tomllib.load(open(sys.argv[1], "rb"))["image"]; print(m["name"] + "-" + m["version"])' "$here/appliance.toml")

"$here/boot-test.sh" "$out/$name.raw" --firmware uefi --seed nocloud
"$here/boot-test.sh" "$out/$name.raw" --firmware bios --seed ovf

qemu-img check -q -f vhdx "$out/$name.vhdx"
for image in "$out/$name.vhdx" "$out/$name.vhd"; do
    "$REHOST_BIN" disk inspect "$image"
done
echo "== appliance: built and packed in $built s; both boots healthy; total $(($(date +%s) - start)) s"
ls -l "$out/$name".{ova,vhdx,vhd}
