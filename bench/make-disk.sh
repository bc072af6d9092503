#!/usr/bin/env bash
# The benchmarks' raw disk: SIZE_MIB (default 2304) of which ~50% is data, real file
# contents from /usr (so it compresses like a real disk) in 4 MiB runs with holes between.
#
#   bench/make-disk.sh WORKDIR      -> WORKDIR/disk.raw (kept if it exists)
set -euo pipefail
WORK=${1:?usage: $0 WORKDIR}
SIZE_MIB=${SIZE_MIB:-2304}
raw="$WORK/disk.raw"
[[ -f $raw ]] && exit 0
mkdir -p "$WORK"
echo "building a ${SIZE_MIB} MiB raw disk, ~50% data..." >&2
truncate -s "${SIZE_MIB}M" "$raw.partial"
# head closes the pipe once it has enough: tar's SIGPIPE is expected, not a failure.
{ tar cf - /usr/lib /usr/share /usr/bin 2>/dev/null || true; } | head -c $((SIZE_MIB / 2 * 1024 * 1024)) >"$WORK/payload"
chunks=$((SIZE_MIB / 8))
for ((i = 0; i < chunks; i++)); do
  # 4 MiB of data at the start of every 8 MiB.
  dd if="$WORK/payload" of="$raw.partial" bs=4M skip="$i" seek=$((i * 2)) count=1 conv=notrunc status=none
done
rm -f "$WORK/payload"
mv "$raw.partial" "$raw"
