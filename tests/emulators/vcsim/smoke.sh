#!/usr/bin/env bash
# Smoke test of rehost-vcsim with plain curl + SOAP envelopes: login, session-checked
# /folder, frozen base under a snapshot, CBT (QueryChangedDiskAreas with "*" and with a
# changeId, chunked), snapshot consolidation, ExportVm (refused while on; the served
# streamOptimized VMDK passes qemu-img check and compare), lease expiry, fault injection
# and privileges. Needs curl, python3 (JSON) and qemu-img. Exits non-zero on the first failure.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
"$here/build.sh"
# The emulator's unit tests (CBT bookkeeping, extents, sparse copies) first.
(cd "$here" && GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= go test -count=1 . >/dev/null) || {
  echo "FAIL: go test in $here" >&2
  exit 1
}
bin="${REHOST_EMULATOR_HOME:-/var/tmp/rehost-emulators}/vcsim/rehost-vcsim"

work=$(mktemp -d /tmp/rehost-vcsim-smoke.XXXXXX)
pid=""
cleanup() {
  if [[ -n $pid ]]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" --datastore-dir "$work/ds" --cert-dir "$work/certs" --verbose >"$work/out" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do
  grep -q '^READY ' "$work/out" 2>/dev/null && break
  sleep 0.1
done
grep -q '^READY ' "$work/out" || { echo "no READY line; log:" >&2; cat "$work/log" >&2; exit 1; }
read -r _ sdk ctl <"$work/out"
ctl=${ctl#control=}
base=${sdk%/sdk}
ds="$work/ds"
jar="$work/jar"
n=0

fail() { echo "FAIL: $*" >&2; echo "--- emulator log (tail)" >&2; tail -20 "$work/log" >&2; exit 1; }
ok() { n=$((n + 1)); echo "ok $n - $*"; }

# soap BODY -> prints the response (HTTP status on the last line)
soap() {
  curl -sS --cacert "$work/certs/ca.pem" -b "$jar" -c "$jar" -H 'Content-Type: text/xml; charset=utf-8' \
    -H 'SOAPAction: "urn:vim25/7.0"' -w '\n%{http_code}' \
    --data "<soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" xmlns:urn=\"urn:vim25\"><soapenv:Body>$1</soapenv:Body></soapenv:Envelope>" \
    "$sdk"
}
expect() { # expect WHAT HAYSTACK NEEDLE
  grep -qF -- "$3" <<<"$2" || fail "$1: expected '$3' in: $2"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
props() { # props TYPE MOREF PATH
  soap "<urn:RetrievePropertiesEx><urn:_this type=\"PropertyCollector\">propertyCollector</urn:_this><urn:specSet><urn:propSet><urn:type>$1</urn:type><urn:pathSet>$3</urn:pathSet></urn:propSet><urn:objectSet><urn:obj type=\"$1\">$2</urn:obj></urn:objectSet></urn:specSet><urn:options/></urn:RetrievePropertiesEx>"
}
task_result() { # task_result TASK-RESPONSE -> waits for the task, prints its info
  local t
  t=$(grep -o '<returnval type="Task">[^<]*' <<<"$1" | sed 's/.*>//')
  [[ -n $t ]] || fail "no task in: $1"
  for _ in $(seq 50); do
    info=$(props Task "$t" info)
    grep -q '<state>success</state>\|<state>error</state>' <<<"$info" && break
    sleep 0.1
  done
  echo "$info"
}
qcda() { # qcda SNAPSHOT CHANGEID START
  soap "<urn:QueryChangedDiskAreas><urn:_this type=\"VirtualMachine\">$vm</urn:_this><urn:snapshot type=\"VirtualMachineSnapshot\">$1</urn:snapshot><urn:deviceKey>2000</urn:deviceKey><urn:startOffset>$3</urn:startOffset><urn:changeId>$2</urn:changeId></urn:QueryChangedDiskAreas>"
}
folder_url() { echo "$base/folder/$1?dcPath=DC0&dsName=LocalDS_0"; }

VM=DC0_H0_VM0
vm=$(curl -sS "$ctl/_rehost/vms" | json "[v['moref'] for v in d if v['name']=='$VM'][0]")
MiB=$((1 << 20))

# --- login and session-checked file access
r=$(soap '<urn:Login><urn:_this type="SessionManager">SessionManager</urn:_this><urn:userName>user</urn:userName><urn:password>wrong</urn:password></urn:Login>')
expect "wrong password" "$r" 'InvalidLogin'
ok "wrong password answers InvalidLogin"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" "$(folder_url $VM/disk1-flat.vmdk)")
[[ $code == 401 ]] || fail "/folder without a session answered $code"
ok "/folder without a session cookie answers 401"
r=$(soap "<urn:RetrievePropertiesEx><urn:_this type=\"PropertyCollector\">propertyCollector</urn:_this><urn:specSet><urn:propSet><urn:type>VirtualMachine</urn:type><urn:pathSet>name</urn:pathSet></urn:propSet><urn:objectSet><urn:obj type=\"VirtualMachine\">$vm</urn:obj></urn:objectSet></urn:specSet><urn:options/></urn:RetrievePropertiesEx>")
expect "RetrievePropertiesEx without a session" "$r" 'NotAuthenticated'
ok "RetrievePropertiesEx without a session answers NotAuthenticated"
r=$(soap '<urn:Login><urn:_this type="SessionManager">SessionManager</urn:_this><urn:userName>user</urn:userName><urn:password>pass</urn:password></urn:Login>')
expect "login" "$r" '<userName>user</userName>'
ok "login sets a session"
r=$(curl -sS -D - -o "$work/range" --cacert "$work/certs/ca.pem" -b "$jar" -r 1024-2047 "$(folder_url $VM/disk1-flat.vmdk)")
expect "ranged GET" "$r" '206'
expect "ranged GET" "$r" 'Content-Range: bytes 1024-2047/67108864'
[[ $(stat -c %s "$work/range") == 1024 ]] || fail "ranged GET size"
ok "/folder ranged GET answers 206 with Content-Range on a 64 MiB default disk"

objsets=$(curl -sS "$ctl/_rehost/vms" | json "''.join('<urn:objectSet><urn:obj type=\"VirtualMachine\">%s</urn:obj></urn:objectSet>' % v['moref'] for v in d)")
r=$(soap "<urn:RetrievePropertiesEx><urn:_this type=\"PropertyCollector\">propertyCollector</urn:_this><urn:specSet><urn:propSet><urn:type>VirtualMachine</urn:type><urn:pathSet>name</urn:pathSet></urn:propSet>$objsets</urn:specSet><urn:options><urn:maxObjects>3</urn:maxObjects></urn:options></urn:RetrievePropertiesEx>")
[[ $(grep -o '<objects>' <<<"$r" | wc -l) == 3 ]] || fail "first page: $r"
token=$(grep -o '<token>[^<]*' <<<"$r" | sed 's/<token>//')
[[ -n $token ]] || fail "no token: $r"
r=$(soap "<urn:ContinueRetrievePropertiesEx><urn:_this type=\"PropertyCollector\">propertyCollector</urn:_this><urn:token>$token</urn:token></urn:ContinueRetrievePropertiesEx>")
[[ $(grep -o '<objects>' <<<"$r" | wc -l) == 1 ]] || fail "second page: $r"
grep -q '<token>' <<<"$r" && fail "token on the last page"
expect "used token" "$(soap "<urn:ContinueRetrievePropertiesEx><urn:_this type=\"PropertyCollector\">propertyCollector</urn:_this><urn:token>$token</urn:token></urn:ContinueRetrievePropertiesEx>")" 'InvalidArgument'
ok "RetrievePropertiesEx pages at maxObjects with a token for ContinueRetrievePropertiesEx"

r=$(soap "<urn:Fetch><urn:_this type=\"VirtualMachine\">$vm</urn:_this><urn:prop>snapshot</urn:prop></urn:Fetch>")
expect "Fetch of unset snapshot" "$r" $'</soapenv:Envelope>\n200'
ok "Fetch of an unset snapshot property answers (empty) instead of dropping the connection"
r=$(props VirtualMachine "$vm" snapshot)
expect "RetrievePropertiesEx snapshot" "$r" $'</RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>\n200'
ok "RetrievePropertiesEx of snapshot on a VM without snapshots answers"

# --- CBT on, then a guest write before the snapshot
r=$(soap "<urn:ReconfigVM_Task><urn:_this type=\"VirtualMachine\">$vm</urn:_this><urn:spec><urn:changeTrackingEnabled>true</urn:changeTrackingEnabled></urn:spec></urn:ReconfigVM_Task>")
task_result "$r" >/dev/null
printf 'AAAA' | curl -sS -o /dev/null --data-binary @- "$ctl/_rehost/disk/write?vm=$VM&key=2000&offset=0"
r=$(props VirtualMachine "$vm" config.hardware.device)
cid0=$(grep -o '<changeId>[^<]*' <<<"$r" | head -1 | sed 's/<changeId>//')
[[ $cid0 =~ ^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/[0-9]+$ ]] || fail "changeId format: '$cid0'"
ok "CBT on: disk backing has a vCenter-style changeId ($cid0)"

# --- snapshot 1: the base flat file freezes
r=$(soap "<urn:CreateSnapshot_Task><urn:_this type=\"VirtualMachine\">$vm</urn:_this><urn:name>s1</urn:name><urn:memory>false</urn:memory><urn:quiesce>false</urn:quiesce></urn:CreateSnapshot_Task>")
info=$(task_result "$r")
s1=$(grep -o 'type="VirtualMachineSnapshot">[^<]*' <<<"$info" | head -1 | sed 's/.*>//')
[[ -n $s1 ]] || fail "no snapshot in task info: $info"
printf 'BBBB' | curl -sS -o /dev/null --data-binary @- "$ctl/_rehost/disk/write?vm=$VM&key=2000&offset=0"
printf 'CCCC' | curl -sS -o /dev/null --data-binary @- "$ctl/_rehost/disk/write?vm=$VM&key=2000&offset=$((10 * MiB + 5))"
got=$(curl -sS --cacert "$work/certs/ca.pem" -b "$jar" -r 0-3 "$(folder_url $VM/disk1-flat.vmdk)")
[[ $got == AAAA ]] || fail "base flat file changed under a snapshot: '$got'"
got=$(curl -sS -r 0-3 "$ctl/_rehost/disk?vm=$VM&key=2000")
[[ $got == BBBB ]] || fail "guest view: '$got'"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" -b "$jar" -T "$work/range" "$(folder_url $VM/disk1-flat.vmdk)")
[[ $code == 409 ]] || fail "PUT to a frozen base answered $code"
ok "after CreateSnapshot, guest writes go to the delta, /folder serves the frozen base and refuses PUTs to it"
r=$(props VirtualMachine "$vm" config.hardware.device)
expect "VM backing" "$r" "<fileName>[LocalDS_0] $VM/disk1-000001.vmdk</fileName>"
r=$(props VirtualMachineSnapshot "$s1" config.hardware.device)
expect "snapshot backing" "$r" "<fileName>[LocalDS_0] $VM/disk1.vmdk</fileName>"
cid1=$(grep -o '<changeId>[^<]*' <<<"$r" | head -1 | sed 's/<changeId>//')
[[ $cid1 == "$cid0" ]] || fail "snapshot changeId '$cid1' is not the disk's at snapshot time ('$cid0')"
r=$(props VirtualMachine "$vm" config.hardware.device)
cidnow=$(grep -o '<changeId>[^<]*' <<<"$r" | head -1 | sed 's/<changeId>//')
[[ $cidnow != "$cid1" ]] || fail "the VM's changeId did not move after guest writes"
ok "VM backing is the delta, the snapshot's config keeps the base and its changeId"

# --- QueryChangedDiskAreas "*", chunked
curl -sS -o /dev/null -X POST "$ctl/_rehost/cbt/window?bytes=$((16 * MiB))"
start=0
areas=""
chunks=0
while ((start < 64 * MiB)); do
  r=$(qcda "$s1" '*' $start)
  expect "QueryChangedDiskAreas *" "$r" "<startOffset>$start</startOffset>"
  len=$(grep -o '<length>[^<]*' <<<"$r" | head -1 | sed 's/<length>//')
  [[ $len == $((16 * MiB)) ]] || fail "chunk length $len"
  areas+=$( (grep -o '<changedArea><start>[0-9]*</start><length>[0-9]*' <<<"$r" || true) | sed 's/<changedArea><start>//;s/<\/start><length>/+/')" "
  start=$((start + len))
  chunks=$((chunks + 1))
done
[[ $chunks == 4 ]] || fail "expected 4 chunks, got $chunks"
[[ $(echo $areas) == "0+65536" ]] || fail "'*' areas as of s1: '$areas'"
ok "QueryChangedDiskAreas '*' answers the snapshot's allocated areas in 4 chunks of 16 MiB"

# --- snapshot 2 and the areas changed between s1 and s2
r=$(soap "<urn:CreateSnapshot_Task><urn:_this type=\"VirtualMachine\">$vm</urn:_this><urn:name>s2</urn:name><urn:memory>false</urn:memory><urn:quiesce>false</urn:quiesce></urn:CreateSnapshot_Task>")
info=$(task_result "$r")
s2=$(grep -o 'type="VirtualMachineSnapshot">[^<]*' <<<"$info" | head -1 | sed 's/.*>//')
curl -sS -o /dev/null -X POST "$ctl/_rehost/cbt/window?bytes=$((256 * MiB))"
r=$(qcda "$s2" "$cid1" 0)
expect "changed since s1" "$r" "<length>$((64 * MiB))</length><changedArea><start>0</start><length>65536</length></changedArea><changedArea><start>$((10 * MiB))</start><length>65536</length></changedArea></returnval>"
ok "QueryChangedDiskAreas(s2, changeId of s1) answers exactly the two written 64 KiB blocks"
r=$(props VirtualMachine "$vm" config.hardware.device)
expect "VM backing after s2" "$r" "<fileName>[LocalDS_0] $VM/disk1-000002.vmdk</fileName>"
r=$(qcda "$s2" "52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/3" 0)
expect "foreign changeId" "$r" 'FileFaultFault'
expect "foreign changeId" "$r" 'Error caused by file'
r=$(qcda "snapshot-999999" '*' 0)
expect "missing snapshot" "$r" 'ManagedObjectNotFound'
ok "a foreign changeId answers FileFault, a missing snapshot ManagedObjectNotFound"

# --- removing snapshots consolidates
r=$(soap "<urn:RemoveSnapshot_Task><urn:_this type=\"VirtualMachineSnapshot\">$s1</urn:_this><urn:removeChildren>false</urn:removeChildren></urn:RemoveSnapshot_Task>")
info=$(task_result "$r")
expect "RemoveSnapshot task entity" "$info" "<entity type=\"VirtualMachine\">$vm</entity><entityName>$VM</entityName>"
r=$(qcda "$s2" "$cid1" 0)
expect "s2 survives removal of s1" "$r" "<changedArea><start>0</start><length>65536</length></changedArea>"
r=$(soap "<urn:RemoveSnapshot_Task><urn:_this type=\"VirtualMachineSnapshot\">$s2</urn:_this><urn:removeChildren>false</urn:removeChildren></urn:RemoveSnapshot_Task>")
task_result "$r" >/dev/null
got=$(curl -sS --cacert "$work/certs/ca.pem" -b "$jar" -r 0-3 "$(folder_url $VM/disk1-flat.vmdk)")
[[ $got == BBBB ]] || fail "base after consolidation: '$got'"
r=$(props VirtualMachine "$vm" config.hardware.device)
expect "VM backing after removal" "$r" "<fileName>[LocalDS_0] $VM/disk1.vmdk</fileName>"
[[ $(curl -sS "$ctl/_rehost/snapshots?vm=$VM") == "[]" ]] || fail "snapshots left"
[[ ! -e $ds/$VM/disk1-000001-delta.vmdk ]] || fail "delta file left"
ok "RemoveSnapshot consolidates the deltas into the base and restores the backing"

# --- CBT turned off, then on again: earlier changeIds stop being valid
VM2=DC0_H0_VM1
vm2=$(curl -sS "$ctl/_rehost/vms" | json "[v['moref'] for v in d if v['name']=='$VM2'][0]")
cbt() { task_result "$(soap "<urn:ReconfigVM_Task><urn:_this type=\"VirtualMachine\">$vm2</urn:_this><urn:spec><urn:changeTrackingEnabled>$1</urn:changeTrackingEnabled></urn:spec></urn:ReconfigVM_Task>")" >/dev/null; }
qcda2() { soap "<urn:QueryChangedDiskAreas><urn:_this type=\"VirtualMachine\">$vm2</urn:_this><urn:snapshot type=\"VirtualMachineSnapshot\">$1</urn:snapshot><urn:deviceKey>2000</urn:deviceKey><urn:startOffset>0</urn:startOffset><urn:changeId>$2</urn:changeId></urn:QueryChangedDiskAreas>"; }
cbt true
printf 'DDDD' | curl -sS -o /dev/null --data-binary @- "$ctl/_rehost/disk/write?vm=$VM2&key=2000&offset=$((5 * MiB))"
info=$(task_result "$(soap "<urn:CreateSnapshot_Task><urn:_this type=\"VirtualMachine\">$vm2</urn:_this><urn:name>a</urn:name><urn:memory>false</urn:memory><urn:quiesce>false</urn:quiesce></urn:CreateSnapshot_Task>")")
sa=$(grep -o 'type="VirtualMachineSnapshot">[^<]*' <<<"$info" | head -1 | sed 's/.*>//')
cida=$(grep -o '<changeId>[^<]*' <<<"$(props VirtualMachineSnapshot "$sa" config.hardware.device)" | head -1 | sed 's/<changeId>//')
r=$(qcda2 "$sa" "${cida%/*}/0")
expect "changes since CBT on" "$r" "<changedArea><start>$((5 * MiB))</start><length>65536</length></changedArea>"
cbt false
r=$(props VirtualMachine "$vm2" config.hardware.device)
grep -q '<changeId>' <<<"$r" && fail "changeId still set with CBT off"
expect "CBT off" "$(qcda2 "$sa" '*')" 'FileFaultFault'
cbt true
expect "changeId from before re-enabling" "$(qcda2 "$sa" "$cida")" 'FileFaultFault'
ok "CBT off answers FileFault; after re-enabling, earlier changeIds answer FileFault"
task_result "$(soap "<urn:CreateSnapshot_Task><urn:_this type=\"VirtualMachine\">$vm2</urn:_this><urn:name>b</urn:name><urn:memory>false</urn:memory><urn:quiesce>false</urn:quiesce></urn:CreateSnapshot_Task>")" >/dev/null
printf 'EEEE' | curl -sS -o /dev/null --data-binary @- "$ctl/_rehost/disk/write?vm=$VM2&key=2000&offset=$((5 * MiB))"
[[ $(curl -sS "$ctl/_rehost/snapshots?vm=$VM2") == '["a","b"]' ]] || fail "snapshots of $VM2: $(curl -sS "$ctl/_rehost/snapshots?vm=$VM2")"
task_result "$(soap "<urn:RemoveAllSnapshots_Task><urn:_this type=\"VirtualMachine\">$vm2</urn:_this></urn:RemoveAllSnapshots_Task>")" >/dev/null
[[ $(curl -sS "$ctl/_rehost/snapshots?vm=$VM2") == "[]" ]] || fail "snapshots left after RemoveAllSnapshots"
got=$(curl -sS --cacert "$work/certs/ca.pem" -b "$jar" -r $((5 * MiB))-$((5 * MiB + 3)) "$(folder_url $VM2/disk1-flat.vmdk)")
[[ $got == EEEE ]] || fail "base after RemoveAllSnapshots: '$got'"
expect "backing after RemoveAllSnapshots" "$(props VirtualMachine "$vm2" config.hardware.device)" "<fileName>[LocalDS_0] $VM2/disk1.vmdk</fileName>"
ls "$ds/$VM2" | grep -q -- '-delta.vmdk' && fail "delta files left: $(ls "$ds/$VM2")"
ok "RemoveAllSnapshots consolidates a chain of two into the base"

# --- a PUT through /folder changes the disk's size and capacity
head -c $((2 * MiB)) /dev/urandom >"$work/put"
code=$(curl -sS -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" -b "$jar" -T "$work/put" "$(folder_url $VM2/disk1-flat.vmdk)")
[[ $code == 200 ]] || fail "PUT answered $code"
expect "capacity after PUT" "$(props VirtualMachine "$vm2" config.hardware.device)" "<capacityInBytes>$((2 * MiB))</capacityInBytes>"
cmp -s "$work/put" <(curl -sS "$ctl/_rehost/disk?vm=$VM2") || fail "guest view after PUT"
ok "PUT /folder of the flat file sets the disk's content and capacityInBytes"

# --- ExportVm
r=$(soap "<urn:ExportVm><urn:_this type=\"VirtualMachine\">$vm</urn:_this></urn:ExportVm>")
expect "ExportVm while on" "$r" 'InvalidPowerState'
ok "ExportVm of a powered-on VM answers InvalidPowerState"
r=$(soap "<urn:PowerOffVM_Task><urn:_this type=\"VirtualMachine\">$vm</urn:_this></urn:PowerOffVM_Task>")
task_result "$r" >/dev/null
head -c $((3 * MiB)) /dev/urandom >"$work/rand"
curl -sS -o /dev/null --data-binary @"$work/rand" "$ctl/_rehost/disk/write?vm=$VM&key=2000&offset=$((20 * MiB))"
export_lease() {
  r=$(soap "<urn:ExportVm><urn:_this type=\"VirtualMachine\">$vm</urn:_this></urn:ExportVm>")
  lease=$(grep -o '<returnval type="HttpNfcLease">[^<]*' <<<"$r" | sed 's/.*>//')
  [[ -n $lease ]] || fail "ExportVm: $r"
  for _ in $(seq 100); do
    st=$(props HttpNfcLease "$lease" state)
    grep -q '>ready<' <<<"$st" && break
    sleep 0.1
  done
  expect "lease ready" "$st" '>ready<'
}
for layout in qemu esxi; do
curl -sS -o /dev/null -X POST "$ctl/_rehost/export/layout?layout=$layout"
export_lease
r=$(props HttpNfcLease "$lease" info)
url=$(grep -o '<url>[^<]*' <<<"$r" | sed 's/<url>//')
expect "deviceUrl key" "$r" "<key>/$vm/"
expect "deviceUrl disk" "$r" '<disk>true</disk>'
expect "deviceUrl sslThumbprint" "$r" "<sslThumbprint>$(cat "$work/certs/thumbprint")</sslThumbprint>"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" "$url")
[[ $code == 401 ]] || fail "NFC download without a session answered $code"
curl -sS -f -o "$work/export.vmdk" --cacert "$work/certs/ca.pem" -b "$jar" "$url"
size=$(grep -o '<fileSize>[^<]*' <<<"$r" | sed 's/<fileSize>//')
[[ $(stat -c %s "$work/export.vmdk") == "$size" ]] || fail "fileSize $size vs download"
qemu-img check -q -f vmdk "$work/export.vmdk" || fail "qemu-img check"
qemu-img info "$work/export.vmdk" | grep -q 'create type: streamOptimized' || fail "not streamOptimized"
gd=$(od -An -t u8 -j 56 -N 8 "$work/export.vmdk" | tr -d ' ')
if [[ $layout == esxi ]]; then
  [[ $gd == 18446744073709551615 ]] || fail "ESXi layout: gdOffset $gd is not GD_AT_END"
  [[ $(od -An -t u4 -j $(($(stat -c %s "$work/export.vmdk") - 512 + 12)) -N 4 "$work/export.vmdk" | tr -d ' ') == 0 ]] || fail "no EOS marker"
else
  [[ $gd != 18446744073709551615 ]] || fail "qemu layout: gdOffset is GD_AT_END"
fi
curl -sS -o "$work/disk.raw" "$ctl/_rehost/disk?vm=$VM&key=2000"
qemu-img compare -q -f vmdk -F raw "$work/export.vmdk" "$work/disk.raw" || fail "qemu-img compare"
r=$(soap "<urn:HttpNfcLeaseProgress><urn:_this type=\"HttpNfcLease\">$lease</urn:_this><urn:percent>50</urn:percent></urn:HttpNfcLeaseProgress>")
expect "progress" "$r" 'HttpNfcLeaseProgressResponse'
r=$(soap "<urn:HttpNfcLeaseComplete><urn:_this type=\"HttpNfcLease\">$lease</urn:_this></urn:HttpNfcLeaseComplete>")
expect "complete" "$r" 'HttpNfcLeaseCompleteResponse'
expect "state done" "$(props HttpNfcLease "$lease" state)" '>done<'
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" -b "$jar" "$url")
[[ $code == 404 ]] || fail "download after Complete answered $code"
ok "ExportVm ($layout layout) of a powered-off VM serves a streamOptimized VMDK equal to the disk (qemu-img check + compare)"
done

curl -sS -o /dev/null -X POST "$ctl/_rehost/lease/timeout?seconds=2"
export_lease
sleep 1.2
soap "<urn:HttpNfcLeaseProgress><urn:_this type=\"HttpNfcLease\">$lease</urn:_this><urn:percent>10</urn:percent></urn:HttpNfcLeaseProgress>" >/dev/null
sleep 1.2 # past the first deadline: only the progress call keeps the lease
expect "kept alive" "$(props HttpNfcLease "$lease" state)" '>ready<'
sleep 3
expect "expired" "$(props HttpNfcLease "$lease" state)" '>error<'
url=$(grep -o '<url>[^<]*' <<<"$(props HttpNfcLease "$lease" info)" | sed 's/<url>//')
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" -b "$jar" "${url:-$base/nfc/$lease/disk-0.vmdk}")
[[ $code == 404 ]] || fail "download from an expired lease answered $code"
ok "a lease without progress calls expires (state error, downloads refused); progress keeps it alive"

# --- fault injection
curl -sS -o /dev/null -X POST "$ctl/_rehost/fault/folder?path=$VM/disk1-flat.vmdk&after=100000"
set +e
curl -sS -o "$work/partial" --cacert "$work/certs/ca.pem" -b "$jar" "$(folder_url $VM/disk1-flat.vmdk)" 2>/dev/null
rc=$?
set -e
[[ $rc != 0 ]] || fail "injected abort: curl succeeded"
got=$(stat -c %s "$work/partial")
((got <= 100000)) || fail "served $got bytes before the abort"
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" -b "$jar" -r 0-9 "$(folder_url $VM/disk1-flat.vmdk)")
[[ $code == 206 ]] || fail "fault did not clear after one use: $code"
curl -sS -o /dev/null -X POST "$ctl/_rehost/fault/folder?path=$VM/disk1-flat.vmdk&status=500&count=2"
for _ in 1 2; do
  code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" -b "$jar" -r 0-9 "$(folder_url $VM/disk1-flat.vmdk)")
  [[ $code == 500 ]] || fail "injected status answered $code"
done
code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$work/certs/ca.pem" -b "$jar" -r 0-9 "$(folder_url $VM/disk1-flat.vmdk)")
[[ $code == 206 ]] || fail "status fault did not clear after two uses: $code"
curl -sS -o /dev/null -X POST "$ctl/_rehost/fault/soap?method=RemoveSnapshot_Task&fault=SystemError"
r=$(soap "<urn:RemoveSnapshot_Task><urn:_this type=\"VirtualMachineSnapshot\">snapshot-1</urn:_this><urn:removeChildren>false</urn:removeChildren></urn:RemoveSnapshot_Task>")
expect "injected SOAP fault" "$r" 'SystemErrorFault'
ok "fault injection: /folder aborts after N bytes once, answers 500 twice; a SOAP method fails once"

# --- privileges
curl -sS -o /dev/null -X POST "$ctl/_rehost/privileges?deny=VirtualMachine.State.CreateSnapshot"
r=$(soap "<urn:HasPrivilegeOnEntities><urn:_this type=\"AuthorizationManager\">AuthorizationManager</urn:_this><urn:entity type=\"VirtualMachine\">$vm</urn:entity><urn:sessionId>x</urn:sessionId><urn:privId>VirtualMachine.State.CreateSnapshot</urn:privId><urn:privId>VirtualMachine.State.RemoveSnapshot</urn:privId></urn:HasPrivilegeOnEntities>")
expect "HasPrivilegeOnEntities" "$r" '<privId>VirtualMachine.State.CreateSnapshot</privId><isGranted>false</isGranted>'
expect "HasPrivilegeOnEntities" "$r" '<privId>VirtualMachine.State.RemoveSnapshot</privId><isGranted>true</isGranted>'
r=$(soap "<urn:CreateSnapshot_Task><urn:_this type=\"VirtualMachine\">$vm</urn:_this><urn:name>s3</urn:name><urn:memory>false</urn:memory><urn:quiesce>false</urn:quiesce></urn:CreateSnapshot_Task>")
expect "denied CreateSnapshot" "$r" 'NoPermission'
ok "a denied privilege shows in HasPrivilegeOnEntities and makes CreateSnapshot fail with NoPermission"

echo "all $n checks passed"
