#!/usr/bin/env bash
# Benchmark: `rehost import` against `coldsnap upload`, the import pipeline against qemu-img,
# and the importer's peak memory.
#
#   bench/import.sh [WORKDIR]        (default WORKDIR: /var/tmp/rehost-bench)
#
# Images: the same 2.25 GiB raw disk, ~50% data in 4 MiB runs, and its streamOptimized VMDK
# that bench/disk.sh builds (same recipe and names, so either script reuses the other's).
# The upload comparison uses its first UPLOAD_MIB (default 512) MiB, same layout, as
# upload.raw and upload.vmdk: the emulator stores blocks in Python at a few hundred puts/s
# at best, so whole-disk uploads would take minutes per run (UPLOAD_MIB=2304 for the lot).
#
# 1. Upload: each run gets a fresh strict moto (tests/emulators/moto/strict_moto.py, loopback
#    only) with its per-snapshot PutSnapshotBlock limit (REHOST_EBS_PUT_BLOCKS_PER_SECOND,
#    default here 1000 as in AWS; PUTS_PER_SECOND=N to change it). Timed, best of RUNS:
#      rehost import upload.raw                   coldsnap upload --omit-zero-blocks upload.raw
#      rehost import upload.vmdk                  coldsnap upload upload.raw (its default: every block)
#    Each snapshot must end `completed` with the expected block count on the emulator, which
#    checks every block's SHA-256 and the linear checksum: a run that loses a block fails.
#    coldsnap is pointed at the emulator with --endpoint; credentials and region come from
#    the environment, the AWS config files are hidden and IMDS is off, so nothing can reach
#    AWS; the emulator's PutSnapshotBlock count proves the blocks went there.
# 2. Pipeline into a null sink: `rehost import --dry-run IMG` (read, decode, re-cut into
#    512 KiB blocks, SHA-256 each, linear checksum) against `qemu-img convert -O raw IMG out`
#    + `sha256sum out` (qemu-img cannot write raw to a pipe), MB/s of virtual disk.
# 3. Peak memory (max RSS, GNU time) of `rehost import` of the whole 2.25 GiB disk.raw and
#    disk.vmdk at the default concurrency (one run each).
#
# Needs: qemu-img, coldsnap (`cargo install coldsnap --locked`), curl, GNU time.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/rehost-bench}
RUNS=${RUNS:-3}
SIZE_MIB=${SIZE_MIB:-2304}
UPLOAD_MIB=${UPLOAD_MIB:-512}
# Which parts to run (comma list).
PARTS=${PARTS:-upload,pipeline,memory}
PUTS_PER_SECOND=${PUTS_PER_SECOND:-1000}
COLDSNAP=${COLDSNAP:-$(command -v coldsnap || echo "$HOME/.cargo/bin/coldsnap")}
EMULATORS=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}
[[ -x $COLDSNAP ]] || { echo "coldsnap not found: cargo install coldsnap --locked" >&2; exit 1; }
mkdir -p "$WORK"
tests/emulators/moto/install.sh >/dev/null
# REHOST=path/to/rehost to time a binary built elsewhere (else the release build here).
if [[ -z ${REHOST:-} ]]; then
  cargo build --release --locked -q -p rehost
  REHOST=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/rehost
fi
# A copy: a shared target directory may get another branch's build while this runs.
cp "$REHOST" "$WORK/rehost.bin"
REHOST=$WORK/rehost.bin
PYTHON=$EMULATORS/moto-venv/bin/python

raw="$WORK/disk.raw"
if [[ ! -f $raw ]]; then
  echo "building a ${SIZE_MIB} MiB raw disk, ~50% data..." >&2
  truncate -s "${SIZE_MIB}M" "$raw"
  tar cf - /usr/lib /usr/share /usr/bin 2>/dev/null | head -c $((SIZE_MIB / 2 * 1024 * 1024)) > "$WORK/payload"
  for ((i = 0; i < SIZE_MIB / 8; i++)); do
    dd if="$WORK/payload" of="$raw" bs=4M skip="$i" seek=$((i * 2)) count=1 conv=notrunc status=none
  done
  rm -f "$WORK/payload"
fi
[[ -f $WORK/disk.vmdk ]] || qemu-img convert -O vmdk -o subformat=streamOptimized "$raw" "$WORK/disk.vmdk"
up_raw="$WORK/upload-${UPLOAD_MIB}.raw"
if [[ ! -f $up_raw ]]; then
  dd if="$raw" of="$up_raw.tmp" bs=4M count=$((UPLOAD_MIB / 4)) conv=sparse status=none
  mv "$up_raw.tmp" "$up_raw"
fi
up_vmdk="$WORK/upload-${UPLOAD_MIB}.vmdk"
[[ -f $up_vmdk ]] || qemu-img convert -O vmdk -o subformat=streamOptimized "$up_raw" "$up_vmdk"
virtual_bytes=$(stat -c %s "$raw")
upload_bytes=$(stat -c %s "$up_raw")
# Blocks holding data: what both tools must write (coldsnap by default writes them all).
blocks_of() { "$REHOST" import --dry-run "$1" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["blocks_written"])'; }
data_blocks=$(blocks_of "$up_raw")
all_blocks=$(( (upload_bytes + 524287) / 524288 ))

# Nothing here may reach AWS: fixed fake credentials, no config files, no instance metadata.
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
export AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL AWS_ENDPOINT_URL_EBS

MOTO_PID=
ENDPOINT=
start_moto() {
  REHOST_EBS_PUT_BLOCKS_PER_SECOND=$PUTS_PER_SECOND "$PYTHON" tests/emulators/moto/strict_moto.py --port 0 \
    > "$WORK/moto.out" 2>/dev/null &
  MOTO_PID=$!
  local port=""
  for ((t = 0; t < 300; t++)); do
    port=$(sed -n 's/^READY //p' "$WORK/moto.out")
    [[ -n $port ]] && break
    sleep 0.1
  done
  [[ -n $port ]] || { echo "strict_moto.py did not start" >&2; exit 1; }
  ENDPOINT=http://127.0.0.1:$port
}
stop_moto() {
  if [[ -n $MOTO_PID ]]; then kill "$MOTO_PID" 2>/dev/null || true; wait "$MOTO_PID" 2>/dev/null || true; fi
  MOTO_PID=
}
trap stop_moto EXIT

# check_snapshot ID BLOCKS: the emulator holds snapshot ID, completed, with BLOCKS written,
# and counted at least that many PutSnapshotBlock calls (more when some were throttled).
check_snapshot() {
  "$PYTHON" - "$ENDPOINT" "$1" "$2" <<'EOF'
import json, sys, time, urllib.request
import boto3
endpoint, snap, blocks = sys.argv[1], sys.argv[2], int(sys.argv[3])
ec2 = boto3.client("ec2", endpoint_url=endpoint)
ebs = boto3.client("ebs", endpoint_url=endpoint)
for _ in range(100):
    state = ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["State"]
    if state == "completed":
        break
    time.sleep(0.1)
else:
    sys.exit(f"{snap} is {state}, not completed")
listed, token = 0, None
while True:
    page = ebs.list_snapshot_blocks(SnapshotId=snap, **({"NextToken": token} if token else {}))
    listed += len(page["Blocks"])
    token = page.get("NextToken")
    if not token:
        break
puts = json.load(urllib.request.urlopen(endpoint + "/_rehost/stats"))["requests"].get("ebs:PutSnapshotBlock", 0)
if listed != blocks or puts < blocks:
    sys.exit(f"{snap}: {listed} blocks listed, {puts} puts counted, {blocks} expected")
EOF
}

# upload_run KIND IMG BLOCKS: one timed upload on a fresh emulator; prints "seconds peak_kib".
upload_run() {
  local kind=$1 img=$2 blocks=$3 out timing snap cmd
  # This runs in a subshell: stop its emulator on every way out.
  trap stop_moto EXIT
  start_moto
  out="$WORK/upload.out"
  case $kind in
    rehost) cmd=("$REHOST" import "$img" --endpoint-url "$ENDPOINT" --no-wait --output json --journal "$WORK/journal.jsonl") ;;
    coldsnap-omit) cmd=("$COLDSNAP" --endpoint "$ENDPOINT" upload --omit-zero-blocks --no-progress "$img") ;;
    coldsnap) cmd=("$COLDSNAP" --endpoint "$ENDPOINT" upload --no-progress "$img") ;;
  esac
  rm -f "$WORK/journal.jsonl"
  # GNU time writes its line last on the command's stderr.
  if ! /usr/bin/time -f '%e %M' "${cmd[@]}" > "$out" 2> "$WORK/upload.err"; then
    cat "$WORK/upload.err" >&2; echo "$kind upload of $img failed" >&2; exit 1
  fi
  timing=$(tail -n 1 "$WORK/upload.err")
  if [[ $kind == rehost ]]; then
    snap=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["snapshot_id"])' "$out")
  else
    snap=$(grep -o 'snap-[0-9a-f]*' "$out" | tail -n 1)
  fi
  check_snapshot "$snap" "$blocks" >&2 || { echo "$kind: bad snapshot" >&2; exit 1; }
  stop_moto
  echo "$timing"
}

# best_upload KIND IMG BLOCKS: best time of RUNS, and the highest peak memory seen.
best_upload() {
  local best="" peak=0 line
  for ((r = 0; r < RUNS; r++)); do
    line=$(upload_run "$@")
    if [[ -z $best ]] || awk -v a="${line% *}" -v b="$best" 'BEGIN{exit !(a<b)}'; then best=${line% *}; fi
    (( ${line#* } > peak )) && peak=${line#* }
  done
  echo "$best $peak"
}

mib() { awk -v b="$1" -v s="$2" 'BEGIN{printf "%.1f", b/1048576/s}'; }

part() { [[ ,$PARTS, == *",$1,"* ]]; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2f", a/b}'; }
if part upload; then
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg); emulator limit ${PUTS_PER_SECOND} PutSnapshotBlock/s; ${data_blocks} data blocks of ${all_blocks}; best of ${RUNS}"
printf '%-34s %8s %10s %9s %9s\n' upload seconds image_MB/s peak_MiB load1
declare -A secs
for spec in "rehost $up_raw $data_blocks" "rehost $up_vmdk $data_blocks" \
            "coldsnap-omit $up_raw $data_blocks" "coldsnap $up_raw $all_blocks"; do
  read -r kind img blocks <<< "$spec"
  result=$(best_upload "$kind" "$img" "$blocks")
  read -r s peak <<< "$result"
  label="$kind ${img##*.}"
  secs[$label]=$s
  printf '%-34s %8.2f %10s %9.1f %9s\n' "$label" "$s" "$(mib "$upload_bytes" "$s")" "$(awk -v k="$peak" 'BEGIN{print k/1024}')" "$(cut -d' ' -f1 /proc/loadavg)"
done
echo "throughput ratio rehost/coldsnap (raw, both omitting zero blocks): $(ratio "${secs[coldsnap-omit raw]}" "${secs[rehost raw]}")x"
echo "throughput ratio rehost/coldsnap (raw, coldsnap's default of every block): $(ratio "${secs[coldsnap raw]}" "${secs[rehost raw]}")x"
echo "capability: rehost reads the VMDK directly; coldsnap needs it converted to raw first"
fi

# 2. The pipeline into a null sink, warm page cache, best of RUNS.
best_of() {
  local best="" line
  for ((r = 0; r < RUNS; r++)); do
    rm -f "$WORK/out.raw"
    line=$( { /usr/bin/time -f '%e' bash -c "$*" >/dev/null; } 2>&1 | tail -n 1)
    if [[ -z $best ]] || awk -v a="$line" -v b="$best" 'BEGIN{exit !(a<b)}'; then best=$line; fi
  done
  rm -f "$WORK/out.raw"
  echo "$best"
}
if part pipeline; then
echo
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %11s %9s %11s %9s %7s\n' image rehost_s rehost_MB/s qemu_s qemu_MB/s ratio
for img in disk.raw disk.vmdk; do
  path="$WORK/$img"
  ours=$(best_of "'$REHOST' import --dry-run '$path' --output json")
  theirs=$(best_of "qemu-img convert -O raw '$path' '$WORK/out.raw' && sha256sum '$WORK/out.raw'")
  printf '%-10s %11.2f %9s %11.2f %9s %7s\n' "$img" "$ours" "$(mib "$virtual_bytes" "$ours")" "$theirs" "$(mib "$virtual_bytes" "$theirs")" "$(ratio "$theirs" "$ours")x"
done
fi

# 3. Peak memory of whole-disk imports at the default concurrency.
if part memory; then
echo
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-10s %8s %10s %9s\n' import seconds image_MB/s peak_MiB
for img in disk.raw disk.vmdk; do
  RUNS=1
  result=$(best_upload rehost "$WORK/$img" "$(blocks_of "$WORK/$img")")
  read -r s peak <<< "$result"
  printf '%-10s %8.2f %10s %9.1f\n' "$img" "$s" "$(mib "$virtual_bytes" "$s")" "$(awk -v k="$peak" 'BEGIN{print k/1024}')"
done
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
fi
