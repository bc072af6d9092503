#!/usr/bin/env bash
# Benchmark: rehost's disk checksum and convert-to-raw against qemu-img on the same images.
#
#   bench/disk.sh [WORKDIR]        (default WORKDIR: /var/tmp/rehost-bench, ~8 GiB free needed)
#
# Builds two >= 2 GiB images from a raw disk that is ~50% data (real file contents from
# /usr, so they compress like a real disk does, laid out in 4 MiB runs with holes between):
# a streamOptimized VMDK and a dynamic VHDX, both made by qemu-img. Then, each run warm
# (page cache), best of RUNS:
#   checksum: rehost disk checksum IMG   vs  qemu-img convert -O raw IMG out && sha256sum out
#   convert:  rehost disk convert IMG out --to raw  vs  qemu-img convert -O raw IMG out
# and prints wall time, the ratio ours/qemu (lower is better) and peak RSS (GNU time).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/rehost-bench}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-2304}
mkdir -p "$WORK"
cargo build --release --locked -q -p rehost
REHOST=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/rehost

raw="$WORK/disk.raw"
SIZE_MIB=$SIZE_MIB bench/make-disk.sh "$WORK"
[[ -f $WORK/disk.vmdk ]] || qemu-img convert -O vmdk -o subformat=streamOptimized "$raw" "$WORK/disk.vmdk"
[[ -f $WORK/disk.vhdx ]] || qemu-img convert -O vhdx -o subformat=dynamic "$raw" "$WORK/disk.vhdx"
expected=$(sha256sum "$raw" | cut -d' ' -f1)

# best_of CMD...: runs CMD $RUNS times, prints "seconds peak_kib cpu_seconds" of the fastest run.
best_of() {
  local best="" line
  for ((r = 0; r < RUNS; r++)); do
    rm -f "$WORK/out.raw"
    line=$( { /usr/bin/time -f '%e %M %U %S' bash -c "$*" >/dev/null; } 2>&1 | tail -n 1)
    if [[ -z $best ]] || awk -v a="${line%% *}" -v b="${best%% *}" 'BEGIN{exit !(a<b)}'; then best=$line; fi
  done
  echo "$best"
}

# Wall time is what a user waits; CPU time (user+sys) is shown too, as it is steadier on a
# loaded machine. Peak memory is the maximum resident set of the whole command.
printf '%-9s %-9s %9s %9s %7s %9s %9s %11s %9s\n' image op rehost_s qemu_s ratio rehost_cpu qemu_cpu rehost_MiB qemu_MiB
report() {
  awk -v i="$1" -v op="$2" -v o="$3" -v t="$4" 'BEGIN{split(o,a," ");split(t,b," ");
    printf "%-9s %-9s %9.2f %9.2f %7.2f %9.2f %9.2f %11.1f %9.1f\n", i, op, a[1], b[1], a[1]/b[1], a[3]+a[4], b[3]+b[4], a[2]/1024, b[2]/1024}'
}
for img in disk.vmdk disk.vhdx; do
  path="$WORK/$img"
  got=$("$REHOST" disk checksum "$path")
  [[ $got == "$expected" ]] || { echo "checksum mismatch for $img: $got != $expected" >&2; exit 1; }
  ours=$(best_of "'$REHOST' disk checksum '$path'")
  theirs=$(best_of "qemu-img convert -O raw '$path' '$WORK/out.raw' && sha256sum '$WORK/out.raw'")
  report "$img" checksum "$ours" "$theirs"
  ours=$(best_of "'$REHOST' disk convert '$path' '$WORK/out.raw' --to raw")
  theirs=$(best_of "qemu-img convert -O raw '$path' '$WORK/out.raw'")
  report "$img" to-raw "$ours" "$theirs"
done
rm -f "$WORK/out.raw"
