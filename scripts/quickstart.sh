#!/usr/bin/env bash
# The quick start: one full replication, vCenter (or Azure, or Hyper-V) → S3 → EBS → AMI, against the
# local emulators (tests/emulators/), on the embedded SQLite store. Run after
# `cargo build --release`:
#
#   scripts/quickstart.sh            # from the vCenter emulator
#   scripts/quickstart.sh azure      # from the Azure double (a generation 2 VM)
#   scripts/quickstart.sh hyperv     # from the Hyper-V double and Samba (a generation 2 VM; root)
#
# It starts the source's emulator (vcsim, extended; or a double) and the strict AWS
# emulator (moto), gives a VM a small disk that boots Linux under UEFI
# (scripts/make-linux-image.sh), writes a config, imports the catalog, creates a run-once
# replication job, runs it, and prints the AMI id and the `rehost snapshot verify` result,
# then boots the AMI's snapshot read back from EBS. Everything stays on 127.0.0.1; the
# emulators are stopped on exit. REHOST_BIN picks another binary; QUICKSTART_DIR keeps the
# work folder (config, store, logs) somewhere you choose.
set -euo pipefail
kind=${1:-vsphere}
case $kind in
  vsphere | azure | hyperv) ;;
  *) echo "usage: $0 [vsphere|azure|hyperv]" >&2; exit 2 ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
rehost=${REHOST_BIN:-$root/target/release/rehost}
if [[ ! -x $rehost ]]; then
  echo "$rehost is missing: run 'cargo build --release' first (or set REHOST_BIN)" >&2
  exit 1
fi
emulators=${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}
case $kind in
  vsphere) vm=DC0_H0_VM0 source=vc1 ;;
  azure) vm=web01 source=az1 ;;
  hyperv) vm=web01 source=hv1 ;;
esac

echo "== installing the emulators (first time only)"
"$root/tests/emulators/install.sh" >/dev/null

work=${QUICKSTART_DIR:-$(mktemp -d /tmp/rehost-quickstart.XXXXXX)}
mkdir -p "$work"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [[ $kind != hyperv ]] || "$root/tests/emulators/samba/start.sh" stop "$work/samba" >/dev/null 2>&1 || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

# Waits for a line starting with READY in $1 (a background process's stdout).
wait_ready() {
  for _ in $(seq 1 300); do
    if grep -q '^READY' "$1" 2>/dev/null; then
      grep -m1 '^READY' "$1"
      return 0
    fi
    sleep 0.1
  done
  echo "an emulator did not start; see ${1%.out}.log" >&2
  return 1
}

echo "== starting the $kind emulator and the AWS emulator"
if [[ $kind == vsphere ]]; then
  "$root/tests/emulators/vcsim/start.sh" --dir "$work/vcsim" >"$work/vcsim.out" 2>"$work/vcsim.log" &
elif [[ $kind == azure ]]; then
  python3 "$root/tests/emulators/azure/double.py" --state-dir "$work/azure" --port 0 --quiet \
    >"$work/azure.out" 2>"$work/azure.log" &
else
  # Samba serves the double's C: drive as C$ to user hvadmin, whom the double knows too.
  mkdir -p "$work/hyperv/C"
  smb_port=$("$root/tests/emulators/samba/start.sh" "$work/samba" "$work/hyperv/C" | awk '/READY/{print $2}')
  echo '{"users": [{"name": "hvadmin", "password": "Hv-Passw0rd!", "admin": true}]}' >"$work/hv-users.json"
  "$emulators/hyperv-venv/bin/python" "$root/tests/emulators/hyperv/double.py" --state-dir "$work/hyperv" \
    --port 0 --users "$work/hv-users.json" --quiet >"$work/hyperv.out" 2>"$work/hyperv.log" &
fi
pids+=($!)
"$emulators/moto-venv/bin/python" "$root/tests/emulators/moto/strict_moto.py" --port 0 \
  >"$work/moto.out" 2>"$work/moto.log" &
pids+=($!)
if [[ $kind == vsphere ]]; then
  read -r _ sdk_url control <<<"$(wait_ready "$work/vcsim.out")"
  control=${control#control=}
elif [[ $kind == azure ]]; then
  read -r _ azure_url <<<"$(wait_ready "$work/azure.out")"
else
  read -r _ hyperv_url <<<"$(wait_ready "$work/hyperv.out")"
fi
read -r _ moto_port <<<"$(wait_ready "$work/moto.out")"
endpoint="http://127.0.0.1:$moto_port"

echo "== giving $vm a disk that boots Linux (UEFI)"
"$root/scripts/make-linux-image.sh" "$work/disk.raw"
if [[ $kind == vsphere ]]; then
  curl -fsS -X POST "$control/_rehost/disk/load?vm=$vm&key=2000&path=$work/disk.raw" >/dev/null
elif [[ $kind == hyperv ]]; then
  # A generation 2 VM whose VHDX holds the image (its size rounded up to whole MiB).
  python3 - "${hyperv_url%/wsman}" "$vm" "$work/disk.raw" <<'PY'
import json, os, sys, urllib.request
url, vm, disk = sys.argv[1:]
size = -(-os.path.getsize(disk) // (1 << 20)) * (1 << 20)
spec = {"name": vm, "generation": 2, "version": "9.0", "state": "running", "cpus": 2,
        "memory_mib": 2048, "disks": [{"size_bytes": size, "format": "vhdx", "seed_file": disk}]}
request = urllib.request.Request(url + "/_double/vms", data=json.dumps(spec).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
urllib.request.urlopen(request).read()
PY
else
  # A generation 2 VM in the double's default subscription, its OS disk seeded with the image.
  python3 - "$azure_url" "$vm" "$work/disk.raw" <<'PY'
import json, os, sys, urllib.request
url, vm, disk = sys.argv[1:]
spec = {"subscription": "22222222-2222-2222-2222-222222222222", "resource_group": "quickstart-rg",
        "name": vm, "location": "westeurope", "vm_size": "Standard_D2s_v3", "os_type": "Linux",
        "hyper_v_generation": "V2", "power_state": "running",
        "disks": [{"name": vm + "-os", "lun": None, "size_bytes": os.path.getsize(disk),
                   "sku": "Premium_LRS", "seed_file": disk}]}
request = urllib.request.Request(url + "/_double/vms", data=json.dumps(spec).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
urllib.request.urlopen(request).read()
PY
fi

export AWS_ACCESS_KEY_ID=quickstart AWS_SECRET_ACCESS_KEY=quickstart AWS_REGION=us-east-1
export AWS_EC2_METADATA_DISABLED=true
"$emulators/moto-venv/bin/python" - "$endpoint" <<'PY'
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").create_bucket(Bucket="rehost-staging")
PY

if [[ $kind == vsphere ]]; then
  cat >"$work/rehost.toml" <<TOML
[store]
path = "rehost.db"

[[sources]]
name = "vc1"
kind = "vsphere"
url = "$sdk_url"
username = "user"
password_env = "QUICKSTART_VC1_PASSWORD"
ca_file = "$work/vcsim/certs/ca.pem"
TOML
  export QUICKSTART_VC1_PASSWORD=pass
elif [[ $kind == hyperv ]]; then
  cat >"$work/rehost.toml" <<TOML
[store]
path = "rehost.db"

[[sources]]
name = "hv1"
kind = "hyperv"
url = "$hyperv_url"
username = "hvadmin"
password_env = "QUICKSTART_HV1_PASSWORD"
smb_address = "127.0.0.1:$smb_port"
TOML
  export QUICKSTART_HV1_PASSWORD='Hv-Passw0rd!'
else
  # The double's default identity (tests/emulators/azure/README.md).
  cat >"$work/rehost.toml" <<TOML
[store]
path = "rehost.db"

[[sources]]
name = "az1"
kind = "azure"
tenant_id = "00000000-0000-0000-0000-0000000000aa"
client_id = "11111111-1111-1111-1111-111111111111"
client_secret_env = "QUICKSTART_AZ1_SECRET"
subscription_id = "22222222-2222-2222-2222-222222222222"
authority_url = "$azure_url"
resource_manager_url = "$azure_url"
TOML
  export QUICKSTART_AZ1_SECRET=double-secret
fi
cat >>"$work/rehost.toml" <<TOML

[aws]
region = "us-east-1"
endpoint_url = "$endpoint"
staging_bucket = "rehost-staging"
TOML
export REHOST_CONFIG=$work/rehost.toml
echo "   config: $REHOST_CONFIG"

echo "== rehost config check"
"$rehost" config check
echo "== rehost servers import-catalog --source $source"
"$rehost" servers import-catalog --source "$source"
echo "== rehost jobs create --server $vm --run-once"
job=$("$rehost" jobs create --server "$vm" --run-once --seed-time now --output json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["replicationJobId"])')
echo "   job $job"
echo "== rehost jobs start $job --wait"
ami=$("$rehost" jobs start "$job" --wait --output json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["amiId"])')
echo "   AMI: $ami"
echo "== rehost snapshot verify $ami --against disk.raw"
"$rehost" snapshot verify "$ami" --against "$work/disk.raw" --endpoint-url "$endpoint"
echo "== the AMI's root snapshot, read back from EBS, boots"
"$rehost" snapshot download "$ami" "$work/from-ebs.raw" --endpoint-url "$endpoint" >/dev/null
"$root/scripts/boot-check.sh" "$work/from-ebs.raw"
