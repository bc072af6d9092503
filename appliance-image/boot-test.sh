#!/usr/bin/env bash
# Boots the appliance's raw disk in qemu and waits for its API to answer, proving the first
# boot end to end: firmware, loader, kernel, cloud-init, rehost-firstboot, rehost serve.
#
#   appliance-image/boot-test.sh IMAGE.raw --firmware bios|uefi [--seed nocloud|ovf|none]
#                                [--timeout SECONDS] [--accel tcg|kvm]
#
#   --seed nocloud  (default) a NoCloud seed (FAT, label CIDATA) whose user-data writes
#                   /etc/rehost/appliance.env: hostname, API token, admin SSH key; DHCP.
#   --seed ovf      an OVF environment ISO (the ISO transport, as vSphere attaches it) with
#                   the same properties plus a static address (10.0.2.15/24 via 10.0.2.2,
#                   which is what qemu's user network routes).
#   --seed none     no data at all: DHCP, and the token generated and shown on the console.
#   --timeout       default 900 s: software emulation (TCG) on 2 cores takes minutes.
#   --accel kvm     when /dev/kvm is usable; the default is TCG, as CI may have no KVM.
#
# The image is never written: the VM runs on a qcow2 overlay. Checks, once GET /healthz
# answers 200: the console banner's SHA-256 thumbprint is the served certificate's; the
# seeded token is accepted by POST /v1/GetReplicationJobs and a wrong one refused (401);
# over SSH with the seeded key: admin may sudo, the hostname is the seeded one, the token
# file is the service user's (0600), no password is set for root or admin, and (ovf) the
# static netplan is in place. Then the VM is powered off (ACPI). Prints
# `HEALTHY after N s (FIRMWARE)`; on failure, the console's tail and exit 1.
set -euo pipefail
usage() { echo "usage: $0 IMAGE.raw --firmware bios|uefi [--seed nocloud|ovf|none] [--timeout SECONDS] [--accel tcg|kvm]" >&2; exit 2; }
image=
firmware=
seed=nocloud
timeout_secs=900
accel=tcg
while (($#)); do
    case $1 in
    --firmware) firmware=${2:-}; shift 2 ;;
    --seed) seed=${2:-}; shift 2 ;;
    --timeout) timeout_secs=${2:-}; shift 2 ;;
    --accel) accel=${2:-}; shift 2 ;;
    -*) usage ;;
    *) [[ -z $image ]] || usage; image=$1; shift ;;
    esac
done
[[ -f $image && $firmware =~ ^(bios|uefi)$ && $seed =~ ^(nocloud|ovf|none)$ && $accel =~ ^(tcg|kvm)$ && $timeout_secs =~ ^[0-9]+$ ]] || usage
image=$(realpath "$image")
for tool in qemu-system-x86_64 qemu-img mkfs.vfat mcopy curl openssl ssh ssh-keygen python3; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing: run $(dirname "$0")/install-deps.sh" >&2; exit 1; }
done
[[ $seed != ovf ]] || command -v xorriso >/dev/null || { echo "$0: xorriso is missing" >&2; exit 1; }
ovmf_code=/usr/share/OVMF/OVMF_CODE_4M.fd
ovmf_vars=/usr/share/OVMF/OVMF_VARS_4M.fd
[[ $firmware == bios || -f $ovmf_code ]] || { echo "$0: $ovmf_code is missing (apt-get install ovmf)" >&2; exit 1; }

tmp=$(mktemp -d /var/tmp/rehost-boot-test.XXXXXX)
qemu_pid=
cleanup() {
    [[ -n $qemu_pid ]] && kill "$qemu_pid" 2>/dev/null && wait "$qemu_pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
console=$tmp/console.log
fail() {
    echo "FAILED ($firmware, $seed): $*" >&2
    echo "--- console (last 60 lines) ---" >&2
    tail -n 60 "$console" 2>/dev/null | tr -d '\r' | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' >&2
    exit 1
}

# What the seed gives the appliance, checked afterwards.
hostname=rehost-$seed-test
token=boot-test-$(openssl rand -hex 16)
ssh-keygen -q -t ed25519 -N '' -C boot-test -f "$tmp/id_ed25519"
ssh_key=$(cat "$tmp/id_ed25519.pub")

seed_args=()
case $seed in
nocloud)
    printf 'instance-id: boot-test-%s\nlocal-hostname: %s\n' "$(openssl rand -hex 4)" "$hostname" >"$tmp/meta-data"
    cat >"$tmp/user-data" <<EOF
#cloud-config
write_files:
  - path: /etc/rehost/appliance.env
    permissions: "0600"
    content: |
      hostname=$hostname
      api_token=$token
      ssh_authorized_key=$ssh_key
EOF
    truncate -s 2M "$tmp/seed.img"
    mkfs.vfat -n CIDATA "$tmp/seed.img" >/dev/null
    MTOOLS_SKIP_CHECK=1 mcopy -i "$tmp/seed.img" "$tmp/meta-data" "$tmp/user-data" ::/
    # shellcheck disable=SC2054 # qemu options hold commas
    seed_args=(-drive "if=none,id=seed,file=$tmp/seed.img,format=raw,readonly=on" -device virtio-blk-pci,drive=seed)
    ;;
ovf)
    mkdir "$tmp/iso"
    prop() { printf '      <Property oe:key="%s" oe:value="%s"/>\n' "$1" "$2"; }
    {
        echo '<?xml version="1.0" encoding="UTF-8"?>'
        echo '<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" xmlns:oe="http://schemas.dmtf.org/ovf/environment/1" oe:id="">'
        echo '   <PropertySection>'
        prop hostname "$hostname"
        prop ip0 10.0.2.15
        prop netmask0 255.255.255.0
        prop gateway 10.0.2.2
        prop dns 10.0.2.3
        prop api_token "$token"
        prop ssh_authorized_key "$ssh_key"
        echo '   </PropertySection>'
        echo '</Environment>'
    } >"$tmp/iso/ovf-env.xml"
    xorriso -as mkisofs -V 'OVF ENV' -J -R -o "$tmp/ovf-env.iso" "$tmp/iso" >"$tmp/xorriso.log" 2>&1 ||
        { cat "$tmp/xorriso.log" >&2; exit 1; }
    # On a SCSI CD: Debian's cloud kernel has no AHCI driver (q35's default CD controller).
    # shellcheck disable=SC2054 # qemu options hold commas
    seed_args=(-device virtio-scsi-pci,id=scsi -drive "if=none,id=cd,file=$tmp/ovf-env.iso,media=cdrom,readonly=on"
        -device scsi-cd,drive=cd,bus=scsi.0)
    ;;
none)
    hostname=rehost # the image's default
    ;;
esac

qemu-img create -q -f qcow2 -F raw -b "$image" "$tmp/disk.qcow2"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
api_port=$(free_port)
ssh_port=$(free_port)
firmware_args=()
if [[ $firmware == uefi ]]; then
    cp "$ovmf_vars" "$tmp/vars.fd"
    firmware_args=(-drive "if=pflash,format=raw,unit=0,readonly=on,file=$ovmf_code" -drive "if=pflash,format=raw,unit=1,file=$tmp/vars.fd")
fi
cpu=max
[[ $accel == kvm ]] && cpu=${REHOST_BOOT_TEST_CPU:-host}

start=$(date +%s)
qemu-system-x86_64 -machine "q35,accel=$accel" -cpu "$cpu" -smp 2 -m 1024 -nographic \
    "${firmware_args[@]}" \
    -drive "if=none,id=disk,file=$tmp/disk.qcow2,format=qcow2" -device virtio-blk-pci,drive=disk,bootindex=1 \
    "${seed_args[@]}" \
    -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$api_port-:8443,hostfwd=tcp:127.0.0.1:$ssh_port-:22" \
    -device virtio-net-pci,netdev=net0 -device virtio-rng-pci \
    -serial "file:$console" -monitor "unix:$tmp/monitor.sock,server=on,wait=off" \
    </dev/null >"$tmp/qemu.log" 2>&1 &
qemu_pid=$!
echo "booting $image ($firmware, $seed seed, $accel): API on 127.0.0.1:$api_port, SSH on 127.0.0.1:$ssh_port"

# The banner's fields, from the console (carriage returns and escapes removed).
banner_field() { [[ -f $console ]] || return 0; tr -d '\r' <"$console" | sed -n "s/^  $1: *//p" | tail -n1; }
scheme=
while :; do
    elapsed=$(($(date +%s) - start))
    ((elapsed < timeout_secs)) || fail "no healthy API after $timeout_secs s"
    kill -0 "$qemu_pid" 2>/dev/null || fail "qemu exited: $(cat "$tmp/qemu.log")"
    if [[ -z $scheme ]]; then
        url=$(banner_field 'API (name)')
        [[ -n $url ]] && scheme=${url%%://*}
    fi
    if [[ -n $scheme ]]; then
        code=$(curl -sk -o /dev/null -w '%{http_code}' --max-time 10 "$scheme://127.0.0.1:$api_port/healthz" || true)
        [[ $code == 200 ]] && break
    fi
    sleep 3
done
healthy_secs=$(($(date +%s) - start))
echo "GET /healthz: 200 after $healthy_secs s ($scheme)"

# The certificate the console shows is the one served.
if [[ $scheme == https ]]; then
    shown=$(banner_field Certificate | awk '{print $2}')
    served=$(openssl s_client -connect "127.0.0.1:$api_port" </dev/null 2>/dev/null |
        openssl x509 -noout -fingerprint -sha256 | cut -d= -f2)
    [[ -n $shown && $shown == "$served" ]] || fail "the console shows thumbprint '$shown', the API serves '$served'"
    echo "thumbprint: $served (as on the console)"
else
    fail "the API is plain HTTP: the appliance must serve HTTPS"
fi

if [[ $seed == none ]]; then
    token=$(banner_field 'API token' | awk '{print $1}')
    [[ -n $token ]] || fail "no generated API token on the console"
    echo "generated token shown on the console: ${token:0:8}…"
fi
api() { # TOKEN OPERATION: prints the status code
    curl -sk -o "$tmp/answer.json" -w '%{http_code}' --max-time 30 -H "Authorization: Bearer $1" \
        -H 'Content-Type: application/json' -X POST "$scheme://127.0.0.1:$api_port/v1/$2" -d '{}'
}
code=$(api "$token" GetReplicationJobs)
[[ $code == 200 ]] || fail "GetReplicationJobs with the seeded token answered $code: $(cat "$tmp/answer.json")"
code=$(api "wrong-$token" GetReplicationJobs)
[[ $code == 401 ]] || fail "GetReplicationJobs with a wrong token answered $code, not 401"
echo "API: the token is accepted, a wrong one refused"

# Inside, over SSH as admin with the seeded key; without a seed, SSH offers keys only.
if [[ $seed == none ]]; then
    got=$(ssh -i "$tmp/id_ed25519" -p "$ssh_port" -o BatchMode=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o ConnectTimeout=30 admin@127.0.0.1 true 2>&1) &&
        fail "ssh admin@ succeeded without a key given"
    [[ $got == *"Permission denied (publickey)"* ]] || fail "ssh admin@: expected 'Permission denied (publickey)', got: $got"
    echo "SSH: keys only, none accepted (no seed)"
else
    expect="$hostname|rehost:600|root:*|admin:!|$([[ $seed == ovf ]] && echo static || echo dhcp)"
    got=$(ssh -q -i "$tmp/id_ed25519" -p "$ssh_port" -o BatchMode=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o ConnectTimeout=30 admin@127.0.0.1 \
        'sudo -n sh -c '\''printf "%s|%s|root:%s|admin:%.1s|%s" "$(hostname)" "$(stat -c %U:%a /var/lib/rehost/api-token)" \
            "$(getent shadow root | cut -d: -f2)" "$(getent shadow admin | cut -d: -f2)" \
            "$(grep -q "ip0 = " /etc/netplan/90-rehost.yaml 2>/dev/null && echo static || echo dhcp)"'\''' 2>&1) ||
        fail "ssh admin@ failed: $got"
    [[ $got == "$expect" ]] || fail "inside the VM: expected '$expect', got '$got'"
    echo "inside (over SSH as admin, sudo): $got"
fi

# Power off by ACPI, as a hypervisor would; then make sure.
python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"system_powerdown\n")' "$tmp/monitor.sock"
for _ in $(seq 60); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 2; done
if kill -0 "$qemu_pid" 2>/dev/null; then
    echo "WARNING: no power-off 120 s after the ACPI request; stopping qemu"
    kill "$qemu_pid"
    wait "$qemu_pid" 2>/dev/null || true
else
    wait "$qemu_pid" 2>/dev/null || true
    echo "powered off after $(($(date +%s) - start - healthy_secs)) s"
fi
qemu_pid=
echo "HEALTHY after $healthy_secs s ($firmware)"
