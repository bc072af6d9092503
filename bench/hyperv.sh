#!/usr/bin/env bash
# Benchmark: a full export of a 4 GiB Hyper-V disk, then an incremental one after 1% of it
# changed, through the project's Hyper-V double (tests/emulators/hyperv) with its files on
# Samba (tests/emulators/samba), with rehost's release build. The same disk and change
# pattern as bench/export.sh (vSphere) and bench/azure.sh (Azure).
#
#   bench/hyperv.sh [WORKDIR]      (default /var/tmp/rehost-bench; needs ~10 GiB free; root)
#
# The disk: bench/disk.sh's 2.25 GiB raw disk (~50% real file contents in 4 MiB runs) in a
# 4 GiB dynamic VHDX. The change: 1% of the disk (41 MiB) written as 4 MiB runs at random
# 64 KiB-aligned offsets (fixed seed). The double completes WMI jobs at the first poll
# (--job-polls 0): Hyper-V's own checkpoint latency is not modelled, so the time ratio
# measures rehost's work and the SMB reads. Reported:
#   read/changed     bytes the incremental read over SMB (VHDX metadata included) / changed
#   written/changed  bytes of the differencing VHD / bytes changed
#   time ratio       incremental wall time / full wall time
# Targets (issue 7): read <= 1.1x the changed bytes; incremental <= 5% of full.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/rehost-bench}
RUNS=${RUNS:-3}
mkdir -p "$WORK"
[[ -f $WORK/disk.raw ]] || bench/disk.sh "$WORK" >/dev/null
tests/emulators/hyperv/install.sh
tests/emulators/samba/install.sh >/dev/null
cargo build --release --locked -q -p rehost
REHOST=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/rehost
PY=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/hyperv-venv/bin/python

run=$(mktemp -d "$WORK/hyperv-bench.XXXX")
cleanup() {
  kill "${hv_pid:-}" 2>/dev/null || true
  tests/emulators/samba/start.sh stop "$run/samba" >/dev/null 2>&1 || true
  rm -rf "$run"
}
trap cleanup EXIT
mkdir -p "$run/state/C"
smb_port=$(tests/emulators/samba/start.sh "$run/samba" "$run/state/C" | awk '/READY/{print $2}')
cat >"$run/users.json" <<'JSON'
{"users": [{"name": "hvadmin", "password": "Hv-Passw0rd!", "admin": true}]}
JSON
mkfifo "$run/ready"
"$PY" tests/emulators/hyperv/double.py --state-dir "$run/state" --port 0 --job-polls 0 \
  --users "$run/users.json" --quiet >"$run/ready" 2>"$run/double.log" &
hv_pid=$!
read -r line <"$run/ready"
exec 3<"$run/ready"
url=$(awk '{print $2}' <<<"$line")
base=${url%/wsman}
cat >"$run/rehost.toml" <<TOML
[store]
path = "rehost.db"
[[sources]]
name = "hv1"
kind = "hyperv"
url = "$url"
username = "hvadmin"
password_env = "BENCH_HV_PASSWORD"
smb_address = "127.0.0.1:$smb_port"
TOML
export REHOST_CONFIG="$run/rehost.toml" BENCH_HV_PASSWORD='Hv-Passw0rd!'
vm_id=$(python3 - "$base" "$WORK/disk.raw" <<'PY'
import json, sys, urllib.request
base, seed = sys.argv[1], sys.argv[2]
spec = {"name": "bench-vm", "generation": 2, "version": "9.0", "state": "running", "cpus": 2,
        "memory_mib": 4096, "disks": [{"size_bytes": 4 << 30, "format": "vhdx", "seed_file": seed}]}
req = urllib.request.Request(f"{base}/_double/vms", data=json.dumps(spec).encode(), method="POST",
                             headers={"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=600))["id"])
PY
)

export_once() { # OUT_DIR [--base MANIFEST] -> the JSON report in $run/report.json; wall seconds in $run/secs
  local out=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  "$REHOST" export --source hv1 --vm bench-vm --to "$out" --output json "$@" >"$run/report.json"
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.3f\n", b-a}' >"$run/secs"
}
field() { python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$run/report.json" "$1"; }

best_full="" best_inc=""
for ((r = 0; r < RUNS; r++)); do
  out="$run/out$r"
  export_once "$out"
  full_s=$(cat "$run/secs")
  manifest=$(field 'r["manifest"]')
  full_read=$(field 'r["source_bytes_read"]')
  changed=$(PYTHONPATH=bench python3 - "$base" "$vm_id" "$r" <<'PY'
import json, sys, urllib.request
import changes
base, vm, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
writes = changes.writes(seed)
for offset, n in writes:
    # The double makes the (random) bytes from the seed: nothing large crosses the API.
    req = urllib.request.Request(f"{base}/_double/vms/{vm}/write", method="POST",
        data=json.dumps({"disk": 0, "offset": offset, "len": n, "seed": seed * 1_000_003 + offset}).encode(),
        headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
print(changes.changed_bytes(writes))
PY
)
  export_once "$out" --base "$manifest"
  inc_s=$(cat "$run/secs")
  inc_read=$(field 'r["source_bytes_read"]')
  inc_written=$(field 'r["disks"][0]["image_bytes"]')
  echo "run $r: full ${full_s}s (read $full_read B over SMB), incremental ${inc_s}s (changed $changed B, read $inc_read B, delta image $inc_written B)" >&2
  inc_base=$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["disks"][0]["base_bytes_read"])' "$run/report.json")
  echo "run $r: read from the full export's image (not the source) to digest partly changed blocks: $inc_base B" >&2
  line="$full_s $inc_s $changed $inc_read $inc_written $full_read $inc_base"
  if [[ -z $best_inc ]] || awk -v a="$inc_s" -v b="${best_inc%% *}" 'BEGIN{exit !(a<b)}'; then best_inc="$inc_s $line"; fi
  if [[ -z $best_full ]] || awk -v a="$full_s" -v b="$best_full" 'BEGIN{exit !(a<b)}'; then best_full=$full_s; fi
  rm -rf "$out"
done
set -- $best_inc
printf 'full export, best of %d:        %8.2f s (%d bytes read over SMB)\n' "$RUNS" "$best_full" "$7"
printf 'incremental (1%% changed), best: %8.2f s\n' "$1"
awk -v full="$best_full" -v inc="$1" -v changed="$4" -v read="$5" -v written="$6" -v base="$8" 'BEGIN{
  printf "read/changed     %.3f  (target <= 1.1)\n", read/changed
  printf "base/changed     %.3f  (read from the previous export, not the source)\n", base/changed
  printf "written/changed  %.3f\n", written/changed
  printf "time ratio       %.3f  (incremental / full; target <= 0.05)\n", inc/full }'
