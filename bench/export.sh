#!/usr/bin/env bash
# Benchmark: a full export of a 4 GiB VM disk, then an incremental one after 1% of it
# changed, through the vCenter emulator (tests/emulators/vcsim), with rehost's release build.
#
#   bench/export.sh [WORKDIR]      (default /var/tmp/rehost-bench; needs ~10 GiB free)
#
# The disk: bench/disk.sh's 2.25 GiB raw disk (~50% real file contents in 4 MiB runs),
# extended to 4 GiB. The change: 1% of the disk (41 MiB) written as 4 MiB runs at random
# 64 KiB-aligned offsets (a fixed seed), the way a guest rewrites files. Reported:
#   read/changed     bytes the incremental read from the datastore / bytes changed
#   written/changed  bytes of the delta image / bytes changed
#   time ratio       incremental wall time / full wall time
# Targets (issue 4): read and written <= 1.1x the changed bytes; incremental <= 5% of full.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/rehost-bench}
RUNS=${RUNS:-3}
mkdir -p "$WORK"
[[ -f $WORK/disk.raw ]] || bench/disk.sh "$WORK" >/dev/null
cargo build --release --locked -q -p rehost
REHOST=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/rehost
tests/emulators/vcsim/build.sh >/dev/null
VCSIM=/var/tmp/rehost-emulators/vcsim/rehost-vcsim

disk="$WORK/disk4g.raw"
if [[ ! -f $disk ]]; then
  cp --sparse=always "$WORK/disk.raw" "$disk"
  truncate -s 4G "$disk"
fi

run=$(mktemp -d "$WORK/export-bench.XXXX")
trap 'kill $vc_pid 2>/dev/null || true; rm -rf "$run"' EXIT
mkfifo "$run/ready"
"$VCSIM" --port 0 --datastore-dir "$run/ds" --cert-dir "$run/certs" >"$run/ready" 2>"$run/vcsim.log" &
vc_pid=$!
read -r line <"$run/ready"
exec 3<"$run/ready" # keep the pipe open so the emulator never blocks writing to it
url=$(awk '{print $2}' <<<"$line")
control=$(sed -n 's/.*control=\([^ ]*\).*/\1/p' <<<"$line")
cat >"$run/rehost.toml" <<TOML
[store]
path = "rehost.db"
[[sources]]
name = "vc1"
kind = "vsphere"
url = "$url"
username = "user"
password_env = "BENCH_VC_PASSWORD"
ca_file = "$run/certs/ca.pem"
TOML
export REHOST_CONFIG="$run/rehost.toml" BENCH_VC_PASSWORD=pass
VM=DC0_H0_VM0
curl -sf -X POST "$control/_rehost/disk/load?vm=$VM&key=2000&path=$disk" >/dev/null

export_once() { # OUT_DIR [--base MANIFEST] -> prints the JSON report; wall seconds in $run/secs
  local out=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$REHOST" export --source vc1 --vm "$VM" --to "$out" --output json "$@" >"$run/report.json"
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f\n", b-a}' >"$run/secs"
  cat "$run/report.json"
}

best_full="" best_inc="" changed=0
for ((r = 0; r < RUNS; r++)); do
  out="$run/out$r"
  export_once "$out" >/dev/null
  full_s=$(cat "$run/secs")
  manifest=$(python3 -c 'import json;print(json.load(open("'"$run/report.json"'"))["manifest"])')
  full_read=$(python3 -c 'import json;print(json.load(open("'"$run/report.json"'"))["disks"][0]["data_bytes"])')
  # 1% of the disk, 4 MiB at a time, at seeded random 64 KiB-aligned offsets.
  changed=$(PYTHONPATH=bench python3 - "$control" "$VM" "$r" <<'PY'
import sys, urllib.request
import changes
control, vm, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
writes = changes.writes(seed)
for offset, n in writes:
    req = urllib.request.Request(f"{control}/_rehost/disk/write?vm={vm}&key=2000&offset={offset}",
        data=changes.payload(seed, offset, n), method="POST")
    urllib.request.urlopen(req).read()
print(changes.changed_bytes(writes))
PY
)
  export_once "$out" --base "$manifest" >/dev/null
  inc_s=$(cat "$run/secs")
  inc_read=$(python3 -c 'import json;print(json.load(open("'"$run/report.json"'"))["disks"][0]["data_bytes"])')
  inc_written=$(python3 -c 'import json;print(json.load(open("'"$run/report.json"'"))["disks"][0]["image_bytes"])')
  echo "run $r: full ${full_s}s (read $full_read B), incremental ${inc_s}s (changed $changed B, read $inc_read B, delta image $inc_written B)" >&2
  inc_base=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["disks"][0]["base_bytes_read"])' "$run/report.json")
  echo "run $r: read from the full export's image (not the source) to digest partly changed blocks: $inc_base B" >&2
  line="$full_s $inc_s $changed $inc_read $inc_written $full_read $inc_base"
  if [[ -z $best_inc ]] || awk -v a="$inc_s" -v b="${best_inc%% *}" 'BEGIN{exit !(a<b)}'; then best_inc="$inc_s $line"; fi
  if [[ -z $best_full ]] || awk -v a="$full_s" -v b="$best_full" 'BEGIN{exit !(a<b)}'; then best_full=$full_s; fi
  rm -rf "$out"
done
set -- $best_inc
printf 'full export, best of %d:        %8.2f s (%d bytes read)\n' "$RUNS" "$best_full" "$7"
printf 'incremental (1%% changed), best: %8.2f s\n' "$1"
awk -v full="$best_full" -v inc="$1" -v changed="$4" -v read="$5" -v written="$6" -v base="$8" 'BEGIN{
  printf "read/changed     %.3f  (target <= 1.1)\n", read/changed
  printf "base/changed     %.3f  (read from the previous export, not the source)\n", base/changed
  printf "written/changed  %.3f  (target <= 1.1)\n", written/changed
  printf "time ratio       %.3f  (incremental / full; target <= 0.05)\n", inc/full }'
