#!/usr/bin/env bash
# Benchmark of the connector (issue 5), with rehost's release build against the local
# emulators (tests/emulators/):
#   1. one `rehost serve` replicating N small VMs at once (default 50 jobs, each VM with a
#      16 MiB disk holding 8 MiB of data): all must complete; reports wall time, runs per
#      minute and the connector's peak memory (VmHWM);
#   2. one VM with a 4 GiB disk: a full run, then 1% of the disk rewritten (4 MiB runs at
#      64 KiB-aligned offsets, fixed seed) and an incremental run; reports both times and
#      their ratio (target: incremental <= 5% of full).
#
#   bench/connector.sh [WORKDIR]     (default /var/tmp/rehost-bench; PARTS=fleet,incremental)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/rehost-bench}
PARTS=${PARTS:-fleet,incremental}
JOBS=${JOBS:-50}
mkdir -p "$WORK"
cargo build --release --locked -q -p rehost
REHOST=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/rehost
tests/emulators/install.sh >/dev/null
EMU=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}
PY=$EMU/moto-venv/bin/python
TOKEN=bench-token-0123456789abcdef

# start_world VMS: emulators, bucket, config, catalog, connector; sets url control endpoint api serve_pid
start_world() {
  local vms_per_pool=$1
  run=$(mktemp -d "$WORK/connector-bench.XXXX")
  "$EMU/vcsim/rehost-vcsim" --vms "$vms_per_pool" --datastore-dir "$run/ds" --cert-dir "$run/certs" \
    >"$run/vcsim.out" 2>"$run/vcsim.log" &
  pids+=($!)
  "$PY" tests/emulators/moto/strict_moto.py --port 0 >"$run/moto.out" 2>"$run/moto.log" &
  pids+=($!)
  for _ in $(seq 300); do
    grep -q READY "$run/vcsim.out" 2>/dev/null && grep -q READY "$run/moto.out" 2>/dev/null && break
    sleep 0.1
  done
  url=$(awk '/READY/ {print $2}' "$run/vcsim.out")
  control=$(sed -n 's/.*control=\([^ ]*\).*/\1/p' "$run/vcsim.out")
  endpoint="http://127.0.0.1:$(awk '/READY/ {print $2}' "$run/moto.out")"
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  "$PY" -c "import boto3,sys; boto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1').create_bucket(Bucket='staging')" "$endpoint"
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
[aws]
region = "us-east-1"
endpoint_url = "$endpoint"
staging_bucket = "staging"
[api]
listen = "127.0.0.1:0"
token_env = "REHOST_API_TOKEN"
[scheduler]
max_concurrent_runs = 50
TOML
  export REHOST_CONFIG="$run/rehost.toml" BENCH_VC_PASSWORD=pass REHOST_API_TOKEN=$TOKEN
  export XDG_STATE_HOME="$run/xdg"
}

start_connector() {
  "$REHOST" serve >"$run/serve.out" 2>"$run/serve.log" &
  serve_pid=$!
  pids+=($serve_pid)
  for _ in $(seq 300); do
    api=$(grep -aoh 'http://[0-9.:]*' "$run/serve.out" "$run/serve.log" 2>/dev/null | head -n1 || true)
    [[ -n $api ]] && break
    sleep 0.1
  done
  [[ -n $api ]] || { echo "rehost serve did not start: $(cat "$run/serve.log")" >&2; exit 1; }
}

# wait_done JOB...: until every job's newest run is COMPLETED (fails on FAILED)
wait_done() {
  local job state
  for job in "$@"; do
    while :; do
      state=$("$REHOST" runs list --job "$job" --output json | python3 -c '
import json,sys
v=json.load(sys.stdin); runs=v.get("replicationRunList", v.get("runs", v)) if isinstance(v, dict) else v
print(runs[0]["state"] if runs else "NONE")')
      case $state in
        COMPLETED) break ;;
        FAILED|MISSED) echo "job $job: run $state" >&2; "$REHOST" runs list --job "$job" >&2; exit 1 ;;
      esac
      sleep 0.5
    done
  done
}

job_of() { python3 -c 'import json,sys; v=json.load(sys.stdin); print(v.get("replicationJobId", v.get("id")))'; }

pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

if [[ $PARTS == *fleet* ]]; then
  echo "== fleet: $JOBS concurrent replication jobs of small VMs"
  start_world $(((JOBS + 1) / 2)) # the emulator's model: 2 resource pools x N VMs
  small="$run/small.raw"
  "$PY" - "$small" <<'PY'
import sys, random
random.seed(7)
with open(sys.argv[1], "wb") as f:
    f.truncate(16 << 20)
    for start in range(0, 16 << 20, 2 << 20):
        f.seek(start); f.write(random.randbytes(1 << 20))
PY
  mapfile -t vms < <(curl -sf "$control/_rehost/vms" | python3 -c 'import json,sys; [print(v["name"]) for v in json.load(sys.stdin)]' | head -n "$JOBS")
  for vm in "${vms[@]}"; do
    curl -sf -X POST "$control/_rehost/disk/load?vm=$vm&key=2000&path=$small" >/dev/null
  done
  "$REHOST" servers import-catalog --source vc1 >/dev/null
  jobs=()
  for vm in "${vms[@]}"; do
    jobs+=("$("$REHOST" jobs create --server "$vm" --frequency-hours 24 --seed-time 2099-01-01T00:00:00Z --output json | job_of)")
  done
  start_connector
  t0=$(date +%s.%N)
  for job in "${jobs[@]}"; do "$REHOST" jobs start "$job" --api "$api" --output json >/dev/null; done
  wait_done "${jobs[@]}"
  t1=$(date +%s.%N)
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$serve_pid/status")
  python3 - "$t0" "$t1" "${#jobs[@]}" "$hwm" <<'PY'
import sys
t0, t1, n, hwm = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"{n} runs completed in {t1 - t0:.1f} s: {n / (t1 - t0) * 60:.1f} runs/min; connector peak memory {hwm / 1024:.0f} MiB")
PY
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=()
fi

if [[ $PARTS == *incremental* ]]; then
  echo "== one VM, 4 GiB disk: full run, then incremental after 1% changed"
  bench/make-disk.sh "$WORK"
  disk="$WORK/disk4g.raw"
  if [[ ! -f $disk ]]; then cp --sparse=always "$WORK/disk.raw" "$disk"; truncate -s 4G "$disk"; fi
  start_world 2
  vm=DC0_H0_VM0
  curl -sf -X POST "$control/_rehost/disk/load?vm=$vm&key=2000&path=$disk" >/dev/null
  "$REHOST" servers import-catalog --source vc1 >/dev/null
  job=$("$REHOST" jobs create --server "$vm" --frequency-hours 24 --seed-time 2099-01-01T00:00:00Z --output json | job_of)
  start_connector
  timed_run() {
    local t0 t1
    t0=$(date +%s.%N)
    "$REHOST" jobs start "$job" --wait --api "$api" --output json >/dev/null
    t1=$(date +%s.%N)
    python3 -c "print(f'{$t1 - $t0:.2f}')"
  }
  full=$(timed_run)
  # 1% of 4 GiB as 4 MiB runs at 64 KiB-aligned offsets, fixed seed.
  "$PY" - "$control" "$vm" <<'PY'
import random, sys, urllib.request
control, vm = sys.argv[1], sys.argv[2]
random.seed(42)
size, run = 4 << 30, 4 << 20
for _ in range((size // 100) // run + 1):
    offset = random.randrange(0, size - run) // 65536 * 65536
    req = urllib.request.Request(f"{control}/_rehost/disk/write?vm={vm}&key=2000&offset={offset}", data=random.randbytes(run), method="POST")
    urllib.request.urlopen(req).read()
PY
  incremental=$(timed_run)
  python3 -c "print(f'full run {$full} s, incremental run {$incremental} s: ratio {$incremental / $full:.3f} (target <= 0.05)')"
fi
