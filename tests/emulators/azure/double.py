#!/usr/bin/env python3
"""A strict test double of the parts of Microsoft Azure that rehost's Azure source uses.

One process, one port: Entra ID client-credentials tokens, the IMDS managed-identity token
endpoint, Azure Resource Manager (subscriptions, permissions, VMs, VM sizes, managed disks,
incremental snapshots and their long-running operations, beginGetAccess/endGetAccess) and
the managed-disk SAS blob endpoint (HEAD, ranged GET, Get Page Ranges with the
x-ms-previous-snapshot-url diff). A control API under /_double/ lets tests create VMs,
write disk content, inject faults and read the request log. See README.md.

Standard library only (Python 3.11), so it starts instantly on a fresh machine.
"""

import argparse
import base64
import bisect
import datetime
import email.utils
import json
import math
import os
import re
import secrets
import signal
import ssl
import struct
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit

PAGE = 512
COW_CHUNK = 64 * 1024  # copy-on-write granularity
IO_CHUNK = 4 * 1024 * 1024  # largest single read from disk files
MIB = 1 << 20
GIB = 1 << 30
MAX_BODY = 256 * MIB
MAX_SAS_SECONDS = 5_184_000  # Azure caps disk/snapshot SAS at 60 days
PAGELIST_HARD_MAX = 10_000  # Get Page Ranges never answers more per call

# api-version values accepted per resource family (a realistic subset of what Azure takes).
DISK_VERSIONS = ("2023-04-02", "2023-10-02", "2024-03-02")
VM_VERSIONS = ("2023-09-01", "2024-03-01", "2024-07-01")
SUBSCRIPTION_VERSIONS = ("2022-12-01",)
AUTHORIZATION_VERSIONS = ("2022-04-01",)
OPERATION_VERSIONS = DISK_VERSIONS + VM_VERSIONS
IMDS_VERSIONS = ("2018-02-01", "2019-08-01")

# Blob service versions that exist (x-ms-version must be one of them).
STORAGE_VERSIONS = (
    "2009-09-19 2011-08-18 2012-02-12 2013-08-15 2014-02-14 2015-02-21 2015-04-05 2015-07-08 "
    "2015-12-11 2016-05-31 2017-04-17 2017-07-29 2017-11-09 2018-03-28 2018-11-09 2019-02-02 "
    "2019-07-07 2019-10-10 2019-12-12 2020-02-10 2020-04-08 2020-06-12 2020-08-04 2020-10-02 "
    "2020-12-06 2021-02-12 2021-04-10 2021-06-08 2021-08-06 2021-10-04 2021-12-02 2022-11-02 "
    "2023-01-03 2023-05-03 2023-08-03 2023-11-03 2024-02-04 2024-05-04 2024-08-04 2024-11-04 "
    "2025-01-05 2025-05-05 2025-07-05 2025-11-05 2026-02-06 2026-04-06 2026-06-06 2026-10-06"
).split()
SAS_VERSION = "2018-03-28"  # what real managed-disk SAS URLs carry
DIFF_MIN_VERSION = "2019-07-07"  # x-ms-previous-snapshot-url is ignored below this
MARKER_MIN_VERSION = "2020-10-02"  # marker/maxresults on Get Page Ranges

ARM_SCOPE = "https://management.azure.com/.default"
# az cli and some SDKs build the scope from the resource with its trailing slash.
ARM_SCOPES = (ARM_SCOPE, "https://management.azure.com//.default")
ARM_RESOURCES = ("https://management.azure.com/", "https://management.azure.com")

LOCATIONS = (
    "eastus eastus2 westus westus2 westus3 centralus northcentralus southcentralus "
    "westcentralus canadacentral canadaeast brazilsouth northeurope westeurope uksouth ukwest "
    "francecentral germanywestcentral swedencentral switzerlandnorth norwayeast polandcentral "
    "italynorth eastasia southeastasia japaneast japanwest australiaeast centralindia "
    "koreacentral southafricanorth uaenorth"
).split()

VM_SIZES = [
    # name, cores, memoryInMB, maxDataDiskCount, resourceDiskSizeInMB
    ("Standard_B2s", 2, 4096, 4, 8192),
    ("Standard_D2s_v3", 2, 8192, 4, 16384),
    ("Standard_D4s_v3", 4, 16384, 8, 32768),
    ("Standard_D8s_v3", 8, 32768, 16, 65536),
    ("Standard_E2s_v3", 2, 16384, 4, 32768),
    ("Standard_F2s_v2", 2, 4096, 4, 16384),
    ("Standard_D2s_v5", 2, 8192, 4, 0),
]
DISK_SKUS = {
    "Standard_LRS": "Standard",
    "StandardSSD_LRS": "StandardSSD",
    "StandardSSD_ZRS": "StandardSSD",
    "Premium_LRS": "Premium",
    "Premium_ZRS": "Premium",
    "PremiumV2_LRS": "PremiumV2",
    "UltraSSD_LRS": "Ultra",
}
SNAPSHOT_SKUS = ("Standard_LRS", "Standard_ZRS", "Premium_LRS")
POWER_STATES = {"running": "VM running", "deallocated": "VM deallocated", "stopped": "VM stopped"}

DEFAULT_IDENTITIES = {
    "tenants": {
        "00000000-0000-0000-0000-0000000000aa": {
            "clients": {
                "11111111-1111-1111-1111-111111111111": {
                    "secret": "double-secret",
                    "actions": ["*"],
                    "not_actions": [],
                }
            }
        }
    },
    "subscriptions": {
        "22222222-2222-2222-2222-222222222222": {
            "display_name": "rehost test subscription",
            "tenant": "00000000-0000-0000-0000-0000000000aa",
        }
    },
    "managed_identity": {"tenant": "00000000-0000-0000-0000-0000000000aa", "actions": ["*"]},
}

SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,78}[A-Za-z0-9_])?$")


def log(msg):
    sys.stderr.write(f"[azure-double {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class ApiError(Exception):
    """An error answer; each endpoint family renders it in its own shape."""

    def __init__(self, status, code, message, headers=(), extra=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = list(headers)
        self.extra = extra or {}  # Entra: extra JSON fields; blob: extra XML elements


class AbortConnection(Exception):
    """Raised to drop the socket mid-body (fault injection)."""


# ---------------------------------------------------------------------------------------
# Byte-range sets


class Intervals:
    """A sorted set of merged half-open byte ranges [start, end)."""

    def __init__(self, pairs=()):
        self.starts, self.ends = [], []
        for s, e in pairs:
            self.add(s, e)

    @classmethod
    def _from_sorted(cls, starts, ends):
        new = cls()
        new.starts, new.ends = starts, ends
        return new

    def copy(self):
        return Intervals._from_sorted(list(self.starts), list(self.ends))

    def __iter__(self):
        return zip(self.starts, self.ends)

    def to_list(self):
        return [[s, e] for s, e in self]

    def add(self, s, e):
        if s >= e:
            return
        i = bisect.bisect_left(self.ends, s)  # first range ending at or after s (touching merges)
        j = bisect.bisect_right(self.starts, e)  # ranges starting at or before e
        if i < j:
            s, e = min(s, self.starts[i]), max(e, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [s], [e]

    def remove(self, s, e):
        if s >= e:
            return
        i = bisect.bisect_right(self.ends, s)  # first range ending after s
        j = bisect.bisect_left(self.starts, e)  # ranges starting before e
        if i >= j:
            return
        keep_s, keep_e = [], []
        if self.starts[i] < s:
            keep_s.append(self.starts[i])
            keep_e.append(s)
        if self.ends[j - 1] > e:
            keep_s.append(e)
            keep_e.append(self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = keep_s, keep_e

    def union(self, other):
        merged = sorted(list(self) + list(other))
        starts, ends = [], []
        for s, e in merged:
            if ends and s <= ends[-1]:
                ends[-1] = max(ends[-1], e)
            else:
                starts.append(s)
                ends.append(e)
        return Intervals._from_sorted(starts, ends)

    def intersection(self, other):
        a, b = list(self), list(other)
        i = j = 0
        starts, ends = [], []
        while i < len(a) and j < len(b):
            s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if s < e:
                starts.append(s)
                ends.append(e)
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return Intervals._from_sorted(starts, ends)

    def difference(self, other):
        result = self.copy()
        for s, e in other:
            result.remove(s, e)
        return result

    def clip(self, s, e):
        return self.intersection(Intervals([(s, e)]))


# ---------------------------------------------------------------------------------------
# Fixed VHD footer


def chs_geometry(size):
    """CHS geometry exactly as the VHD specification's algorithm computes it."""
    total = size // PAGE
    total = min(total, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def vhd_footer(size, created, unique_id):
    cylinders, heads, spt = chs_geometry(size)
    vhd_epoch = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc).timestamp()
    footer = bytearray(
        struct.pack(
            ">8sIIQI4sI4sQQHBBII16sB",
            b"conectix",
            2,  # features: reserved bit always set
            0x00010000,  # format version 1.0
            0xFFFFFFFFFFFFFFFF,  # data offset: none, a fixed disk
            int(created - vhd_epoch) & 0xFFFFFFFF,
            b"rhdb",
            0x00010000,
            b"Wi2k",
            size,  # original size
            size,  # current size
            cylinders,
            heads,
            spt,
            2,  # disk type: fixed
            0,  # checksum, filled below
            unique_id.bytes,
            0,
        )
    )
    footer += bytes(PAGE - len(footer))
    struct.pack_into(">I", footer, 64, ~sum(footer) & 0xFFFFFFFF)
    return bytes(footer)


# ---------------------------------------------------------------------------------------
# Time helpers


class Clock:
    """Wall clock plus an offset the control API can advance (token and SAS expiry)."""

    def __init__(self):
        self.offset = 0.0

    def now(self):
        return time.time() + self.offset


def iso(ts):
    """ARM's timestamp style: 2024-05-01T12:00:00.1234567+00:00."""
    dt = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond:06d}0+00:00"


def http_date(ts):
    return email.utils.formatdate(ts, usegmt=True)


def ms_etag():
    return '"0x8D' + secrets.token_hex(6).upper() + '"'


def id_uuid(*parts):
    """A stable UUID for a principal (object ids, managed identity client id)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "azure-double:" + ":".join(parts)))


# ---------------------------------------------------------------------------------------
# Identities and authorization


def action_matches(pattern, action):
    regex = "^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$"
    return re.match(regex, action, re.IGNORECASE) is not None


def action_allowed(actions, not_actions, action):
    return any(action_matches(p, action) for p in actions) and not any(
        action_matches(p, action) for p in not_actions
    )


class Identities:
    """Tenants, their app registrations, subscriptions and the VM's managed identity."""

    def __init__(self, doc):
        if not isinstance(doc, dict):
            raise ValueError("identities must be a JSON object")
        self.tenants = {}  # tenant (lower) -> {client id (lower) -> client}
        for tenant, tdoc in (doc.get("tenants") or {}).items():
            clients = {}
            for client_id, cdoc in ((tdoc or {}).get("clients") or {}).items():
                if not isinstance(cdoc.get("secret"), str):
                    raise ValueError(f"client {client_id}: secret must be a string")
                clients[client_id.lower()] = {
                    "client_id": client_id,
                    "secret": cdoc["secret"],
                    "object_id": cdoc.get("object_id") or id_uuid("sp", tenant, client_id),
                    "actions": list(cdoc.get("actions") or []),
                    "not_actions": list(cdoc.get("not_actions") or []),
                }
            self.tenants[tenant.lower()] = clients
        self.subscriptions = {}  # subscription (lower) -> record
        for sub, sdoc in (doc.get("subscriptions") or {}).items():
            tenant = (sdoc or {}).get("tenant", "")
            if tenant.lower() not in self.tenants:
                raise ValueError(f"subscription {sub}: unknown tenant {tenant!r}")
            self.subscriptions[sub.lower()] = {
                "id": sub,
                "display_name": sdoc.get("display_name") or sub,
                "tenant": tenant,
            }
        mi = doc.get("managed_identity")
        self.managed_identity = None
        if mi:
            tenant = mi.get("tenant", "")
            if tenant.lower() not in self.tenants:
                raise ValueError(f"managed_identity: unknown tenant {tenant!r}")
            self.managed_identity = {
                "tenant": tenant,
                "client_id": mi.get("client_id") or id_uuid("mi-client", tenant),
                "object_id": mi.get("object_id") or id_uuid("mi-object", tenant),
                "actions": list(mi.get("actions") or []),
                "not_actions": list(mi.get("not_actions") or []),
            }

    def principal_roles(self, token):
        """(actions, not_actions) now in force for a token's principal."""
        if token["kind"] == "mi":
            mi = self.managed_identity
            if mi and mi["client_id"] == token["client_id"]:
                return mi["actions"], mi["not_actions"]
            return [], []
        client = self.tenants.get(token["tenant"].lower(), {}).get(token["client_id"].lower())
        return (client["actions"], client["not_actions"]) if client else ([], [])


# ---------------------------------------------------------------------------------------
# Storage: live disks, copy-on-write snapshots


class CowStore:
    """Chunks of a disk as they were when one snapshot was taken, saved before overwrite."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.slots = {}  # chunk index -> offset in this file

    def put(self, chunk, data):
        offset = len(self.slots) * COW_CHUNK
        os.pwrite(self.fd, data, offset)
        self.slots[chunk] = offset

    def read(self, chunk, start, length):
        return os.pread(self.fd, length, self.slots[chunk] + start)

    def close(self):
        os.close(self.fd)
        os.unlink(self.path)


class Disk:
    """A managed disk: a sparse live file, its valid pages and its snapshot chain."""

    def __init__(self, state_dir, sub, rg, name, location, size, sku, os_type, hyper_v, lun, now):
        self.sub, self.rg, self.name = sub, rg, name
        self.id = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/disks/{name}"
        self.location, self.size, self.sku = location, size, sku
        self.os_type, self.hyper_v, self.lun = os_type, hyper_v, lun
        self.unique_id = str(uuid.uuid4())
        self.family_id = str(uuid.uuid4())  # incrementalSnapshotFamilyId of its snapshots
        self.created = now
        self.vm = None
        self.footer = vhd_footer(size, now, uuid.uuid4())
        self.path = os.path.join(state_dir, "disks", self.unique_id + ".raw")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, size)
        self.valid = Intervals()
        self.changed = Intervals()  # written or cleared since the newest snapshot
        self.snapshots = []  # live snapshots of this disk, oldest first

    def check_range(self, offset, length):
        if not isinstance(offset, int) or not isinstance(length, int) or isinstance(offset, bool):
            raise ApiError(400, "InvalidRange", "offset and length must be integers")
        if offset % PAGE or length % PAGE or length <= 0:
            raise ApiError(400, "InvalidRange", "offset and length must be positive multiples of 512")
        if offset < 0 or offset + length > self.size:
            raise ApiError(400, "InvalidRange", f"range past the disk's end ({self.size} bytes)")

    def _preserve(self, start, end):
        """Copy each chunk about to change into the newest snapshot's store, once."""
        if not self.snapshots:
            return
        newest = self.snapshots[-1].cow
        for chunk in range(start // COW_CHUNK, (end - 1) // COW_CHUNK + 1):
            if chunk not in newest.slots:
                newest.put(chunk, os.pread(self.fd, COW_CHUNK, chunk * COW_CHUNK))

    def write(self, offset, data):
        self._preserve(offset, offset + len(data))
        os.pwrite(self.fd, data, offset)
        self.valid.add(offset, offset + len(data))
        self.changed.add(offset, offset + len(data))

    def clear(self, offset, length):
        self._preserve(offset, offset + length)
        zeros = bytes(min(length, IO_CHUNK))
        pos = offset
        while pos < offset + length:
            n = min(IO_CHUNK, offset + length - pos)
            os.pwrite(self.fd, zeros[:n], pos)
            pos += n
        self.valid.remove(offset, offset + length)
        self.changed.add(offset, offset + length)

    def seed(self, path):
        """Copy a raw image's allocated, non-zero 64 KiB chunks in; they become valid pages."""
        src = os.open(path, os.O_RDONLY)
        try:
            end = min(os.fstat(src).st_size, self.size)
            pos = 0
            while pos < end:
                try:
                    data_start = os.lseek(src, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after pos
                    break
                hole = min(os.lseek(src, data_start, os.SEEK_HOLE), end)
                chunk = data_start - data_start % COW_CHUNK
                while chunk < hole:
                    n = min(COW_CHUNK, end - chunk)
                    data = os.pread(src, n, chunk)
                    if data.count(0) != len(data):
                        if len(data) % PAGE:  # a final partial page reads as zero-padded
                            data += bytes(PAGE - len(data) % PAGE)
                        self.write(chunk, data)
                    chunk += COW_CHUNK
                pos = max(hole, chunk)
        finally:
            os.close(src)

    def read_live(self, offset, length):
        return os.pread(self.fd, length, offset)

    def read_snapshot(self, snap, offset, length):
        """Snapshot content at [offset, offset+length), below the footer; caller holds the lock.

        A chunk comes from the first store holding it among this snapshot's and the newer
        ones' (each saved it before its first overwrite after that snapshot), else from the
        live file, which has not changed there since."""
        k = self.snapshots.index(snap)
        stores = [s.cow for s in self.snapshots[k:] if s.cow.slots]
        parts = []
        pos, end = offset, offset + length
        live_from = None  # start of a pending run read from the live file
        while pos < end:
            chunk = pos // COW_CHUNK
            piece_end = min(end, (chunk + 1) * COW_CHUNK)
            store = next((s for s in stores if chunk in s.slots), None)
            if store is None:
                if live_from is None:
                    live_from = pos
            else:
                if live_from is not None:
                    parts.append(os.pread(self.fd, pos - live_from, live_from))
                    live_from = None
                parts.append(store.read(chunk, pos - chunk * COW_CHUNK, piece_end - pos))
            pos = piece_end
        if live_from is not None:
            parts.append(os.pread(self.fd, end - live_from, live_from))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take_snapshot(self, snap, state_dir):
        snap.valid = self.valid.copy()
        snap.changed = self.changed
        snap.cow = CowStore(os.path.join(state_dir, "cow", snap.unique_id + ".cow"))
        self.changed = Intervals()
        self.snapshots.append(snap)

    def drop_snapshot(self, snap):
        """Delete from the chain: the older neighbour inherits the saved chunks it lacks
        (it needs them to read its own content), the newer one the changed ranges."""
        k = self.snapshots.index(snap)
        if k > 0:
            older = self.snapshots[k - 1].cow
            for chunk in snap.cow.slots:
                if chunk not in older.slots:
                    older.put(chunk, snap.cow.read(chunk, 0, COW_CHUNK))
        if k + 1 < len(self.snapshots):
            newer = self.snapshots[k + 1]
            newer.changed = snap.changed.union(newer.changed)
        else:
            self.changed = snap.changed.union(self.changed)
        snap.cow.close()
        del self.snapshots[k]


# ---------------------------------------------------------------------------------------
# ARM resources


def norm_location(loc):
    return loc.replace(" ", "").lower() if isinstance(loc, str) else loc


class VM:
    def __init__(self, sub, rg, name, location, vm_size, os_type, hyper_v, power_state, disks):
        self.sub, self.rg, self.name = sub, rg, name
        self.id = (
            f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"
        )
        self.location, self.vm_size, self.os_type = location, vm_size, os_type
        self.hyper_v, self.power_state = hyper_v, power_state
        self.vm_id = str(uuid.uuid4())
        self.disks = disks  # os disk first
        self.computer_name = name
        self.os_name = "ubuntu" if os_type == "Linux" else "Windows Server 2022 Datacenter"

    def json(self, expand_instance_view=False):
        def managed(d):
            return {"id": d.id, "storageAccountType": d.sku}

        os_disk = self.disks[0]
        props = {
            "vmId": self.vm_id,
            "hardwareProfile": {"vmSize": self.vm_size},
            "storageProfile": {
                "osDisk": {
                    "osType": self.os_type,
                    "name": os_disk.name,
                    "createOption": "FromImage",
                    "caching": "ReadWrite",
                    "managedDisk": managed(os_disk),
                    "diskSizeGB": disk_gb(os_disk.size),
                },
                "dataDisks": [
                    {
                        "lun": d.lun,
                        "name": d.name,
                        "createOption": "Empty",
                        "caching": "None",
                        "managedDisk": managed(d),
                        "diskSizeGB": disk_gb(d.size),
                    }
                    for d in self.disks[1:]
                ],
            },
            "provisioningState": "Succeeded",
        }
        if expand_instance_view:
            props["instanceView"] = self.instance_view()
        return {
            "id": self.id,
            "name": self.name,
            "type": "Microsoft.Compute/virtualMachines",
            "location": self.location,
            "tags": {},
            "properties": props,
        }

    def instance_view(self):
        return {
            "computerName": self.computer_name,
            "osName": self.os_name,
            "hyperVGeneration": self.hyper_v,
            "statuses": [
                {
                    "code": "ProvisioningState/succeeded",
                    "level": "Info",
                    "displayStatus": "Provisioning succeeded",
                },
                {
                    "code": f"PowerState/{self.power_state}",
                    "level": "Info",
                    "displayStatus": POWER_STATES[self.power_state],
                },
            ],
        }


def disk_gb(size):
    return math.ceil(size / GIB)


def disk_json(d):
    state = "Unattached"
    if d.vm:
        state = "Reserved" if d.vm.power_state == "deallocated" else "Attached"
    props = {
        "hyperVGeneration": d.hyper_v,
        "creationData": {"createOption": "Empty"},
        "diskSizeGB": disk_gb(d.size),
        "diskSizeBytes": d.size,
        "uniqueId": d.unique_id,
        "encryption": {"type": "EncryptionAtRestWithPlatformKey"},
        "networkAccessPolicy": "AllowAll",
        "publicNetworkAccess": "Enabled",
        "timeCreated": iso(d.created),
        "provisioningState": "Succeeded",
        "diskState": state,
    }
    if d.os_type:
        props = {"osType": d.os_type, **props}
    out = {
        "id": d.id,
        "name": d.name,
        "type": "Microsoft.Compute/disks",
        "location": d.location,
        "tags": {},
        "sku": {"name": d.sku, "tier": DISK_SKUS[d.sku]},
        "properties": props,
    }
    if d.vm:
        out["managedBy"] = d.vm.id
    return out


class Snapshot:
    def __init__(self, sub, rg, name, location, tags, disk, incremental, sku, now):
        self.sub, self.rg, self.name = sub, rg, name
        self.id = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/snapshots/{name}"
        self.location, self.tags, self.disk = location, tags, disk
        self.incremental, self.sku = incremental, sku
        self.unique_id = str(uuid.uuid4())
        self.created = now
        self.etag = ms_etag()
        self.provisioning = "Creating"
        self.create_op = None  # the PUT's operation while it runs
        self.grant = None  # the current SasGrant, if any
        self.revoked_count = 0
        # storage side, set by Disk.take_snapshot
        self.valid = self.changed = self.cow = None

    def active_grant(self, now):
        g = self.grant
        return g if g and not g.revoked and now < g.expires else None

    def json(self, now):
        d = self.disk
        props = {}
        if d.os_type:
            props["osType"] = d.os_type
        props.update(
            {
                "hyperVGeneration": d.hyper_v,
                "creationData": {
                    "createOption": "Copy",
                    "sourceResourceId": d.id,
                    "sourceUniqueId": d.unique_id,
                },
                "diskSizeGB": disk_gb(d.size),
                "diskSizeBytes": d.size,
                "incremental": self.incremental,
                "uniqueId": self.unique_id,
                "encryption": {"type": "EncryptionAtRestWithPlatformKey"},
                "networkAccessPolicy": "AllowAll",
                "publicNetworkAccess": "Enabled",
                "timeCreated": iso(self.created),
                "provisioningState": self.provisioning,
                "diskState": "ActiveSAS" if self.active_grant(now) else "Unattached",
            }
        )
        if self.incremental:
            props["incrementalSnapshotFamilyId"] = d.family_id
        return {
            "id": self.id,
            "name": self.name,
            "type": "Microsoft.Compute/snapshots",
            "location": self.location,
            "tags": self.tags,
            "sku": {"name": self.sku, "tier": "Premium" if self.sku.startswith("Premium") else "Standard"},
            "properties": props,
        }


class SasGrant:
    """One beginGetAccess: the blob path and the query that must come with it."""

    def __init__(self, snapshot, expires):
        self.snapshot = snapshot
        self.container = "md-" + secrets.token_hex(6)
        self.si = str(uuid.uuid4())
        self.sig = base64.b64encode(secrets.token_bytes(32)).decode()
        self.expires = expires
        self.revoked = False

    def url(self, base):
        query = f"sv={SAS_VERSION}&sr=b&si={self.si}&sig={quote(self.sig, safe='')}"
        return f"{base}/_blob/{self.container}/abcd?{query}"


class Operation:
    """A long-running ARM operation, polled through Azure-AsyncOperation or Location."""

    def __init__(self, kind, sub, location, polls, fail, now, snapshot=None):
        self.id = str(uuid.uuid4())
        self.p = str(uuid.uuid4())
        self.kind, self.sub, self.location = kind, sub, location
        self.polls_left = polls
        self.fail = fail  # {"code","message"[,"status"]} when a fault makes it fail
        self.start, self.end = now, None
        self.snapshot = snapshot
        self.sas_url = None  # beginGetAccess's answer

    @property
    def done(self):
        return self.end is not None

    def poll(self, now):
        """Advance by one poll; completes once the configured number of polls has passed."""
        if self.done:
            return
        if self.polls_left > 0:
            self.polls_left -= 1
            return
        self.end = now
        if self.kind == "create" and self.snapshot is not None:
            self.snapshot.provisioning = "Failed" if self.fail else "Succeeded"
            self.snapshot.create_op = None

    def status_json(self):
        out = {"startTime": iso(self.start)}
        if not self.done:
            out.update(status="InProgress", name=self.id)
            return out
        out["endTime"] = iso(self.end)
        if self.fail:
            out["status"] = "Failed"
            out["error"] = {"code": self.fail["code"], "message": self.fail["message"]}
        else:
            out["status"] = "Succeeded"
            if self.kind == "begin_access":
                out["properties"] = {"output": {"accessSAS": self.sas_url}}
        out["name"] = self.id
        return out


# ---------------------------------------------------------------------------------------
# The whole state


class State:
    def __init__(self, args, identities):
        self.lock = threading.RLock()
        self.clock = Clock()
        self.state_dir = args.state_dir
        for sub in ("disks", "cow"):
            os.makedirs(os.path.join(self.state_dir, sub), exist_ok=True)
        self.settings = {
            "retry_after": args.retry_after,
            "lro_polls": args.lro_polls,
            "page_size": args.page_size,
            "pagelist_max": args.pagelist_max,
            "token_lifetime": args.token_lifetime,
            "imds_token_lifetime": 86399,
        }
        self.identities = identities
        self.tokens = {}  # access token -> {"kind","tenant","client_id","object_id","expires"}
        self.resource_groups = {}  # (sub, rg) lower -> display name
        self.vms = {}  # (sub, rg, name) lower -> VM, in creation order
        self.disks = {}  # same keys -> Disk
        self.snapshots = {}  # same keys -> Snapshot
        self.grants = {}  # container -> SasGrant (revoked ones stay, to explain the 403)
        self.operations = {}  # id -> Operation
        self.faults = []
        self.requests = []
        self.seq = 0

    def now(self):
        return self.clock.now()

    def disk_by_id(self, disk_id):
        m = re.match(
            r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute/disks/([^/]+)/?$",
            disk_id or "",
            re.IGNORECASE,
        )
        if not m:
            return None
        return self.disks.get(tuple(unquote(x).lower() for x in m.groups()))

    def take_fault(self, method, path, query):
        with self.lock:
            for fault in self.faults:
                match = fault.get("match") or {}
                if match.get("method") and match["method"].upper() != method:
                    continue
                if match.get("path_regex") and not re.search(match["path_regex"], path):
                    continue
                if match.get("query_contains") and match["query_contains"] not in query:
                    continue
                times = fault.get("times", 1)
                if times is not None:
                    if times <= 0:
                        continue
                    fault["times"] = times - 1
                return fault
        return None

    def record(self, entry):
        with self.lock:
            self.seq += 1
            entry["seq"] = self.seq
            self.requests.append(entry)


# ---------------------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "azure-double/1.0"
    # Headers and body go out in separate writes: with Nagle's algorithm on, a keep-alive
    # client's next small request waits for a delayed ACK (~40 ms a request), a stall real
    # Azure front ends do not have.
    disable_nagle_algorithm = True
    state: State = None  # set on the subclass built in main()
    quiet = False

    # -- plumbing --------------------------------------------------------------------

    def log_message(self, fmt, *args):
        pass  # one line per request is written by dispatch()

    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            raise ApiError(413, "RequestBodyTooLarge", "The request body is too large.")
        return self.rfile.read(length) if length else b""

    def base_url(self):
        scheme = "https" if self.server.tls else "http"
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        return f"{scheme}://{host}"

    def start_response(self, status, headers):
        self.send_response_only(status)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.resp_status = status
        self.headers_sent = True

    def write_body(self, data):
        if self.command == "HEAD" or not data:
            return
        if self.abort_after is not None:
            room = self.abort_after - self.bytes_sent
            if len(data) > room:
                self.wfile.write(data[: max(room, 0)])
                self.bytes_sent += max(room, 0)
                self.wfile.flush()
                raise AbortConnection()
        self.wfile.write(data)
        self.bytes_sent += len(data)

    def respond(self, status, body=b"", headers=(), content_type=None):
        headers = list(headers)
        if content_type:
            headers.append(("Content-Type", content_type))
        headers.append(("Content-Length", str(len(body))))
        self.start_response(status, headers)
        self.write_body(body)

    def respond_json(self, status, doc, headers=()):
        body = json.dumps(doc).encode() if doc is not None else b""
        self.respond(status, body, headers, "application/json; charset=utf-8" if body else None)

    def dispatch(self):
        st = self.state
        self.request_id = str(uuid.uuid4())
        self.bytes_sent = 0
        self.resp_status = None
        self.headers_sent = False
        self.abort_after = None
        self.lro_fail = None
        self.log_extra = {}
        url = urlsplit(self.path)
        self.url_path = url.path
        self.raw_query = url.query
        self.query = dict(parse_qsl(url.query, keep_blank_values=True))
        kind = classify(self.command, self.url_path, self.query)
        started = time.monotonic()
        try:
            self.body = self.read_body()
            if kind == "control":
                self.handle_control()
                return
            fault = st.take_fault(self.command, self.url_path, self.raw_query)
            if fault and self.apply_fault(fault, kind):
                return
            {
                "token": self.handle_token,
                "imds": self.handle_imds,
                "arm": self.handle_arm,
                "blob": self.handle_blob,
                "pagelist": self.handle_blob,
                "other": self.handle_unknown,
            }[kind]()
        except AbortConnection:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except ApiError as e:  # raised before any family-specific rendering (body too large)
            if not self.headers_sent:
                self.respond_json(e.status, {"error": {"code": e.code, "message": e.message}})
        except Exception:
            log(f"500 on {self.command} {self.path}:\n{traceback.format_exc()}")
            if self.headers_sent:
                self.close_connection = True
            else:
                self.respond_json(
                    500,
                    {"error": {"code": "InternalServerError", "message": "azure-double crashed; see its stderr"}},
                    [("x-ms-request-id", self.request_id)],
                )
        finally:
            if kind != "control":
                st.record(
                    {
                        "method": self.command,
                        "path": self.url_path,
                        "query": self.raw_query,
                        "status": self.resp_status,
                        "range": self.headers.get("x-ms-range") or self.headers.get("Range"),
                        "x_ms_version": self.headers.get("x-ms-version"),
                        "prev_snapshot_url": self.headers.get("x-ms-previous-snapshot-url"),
                        "bytes_sent": self.bytes_sent,
                        "kind": kind,
                    }
                )
            if not self.quiet or (self.resp_status or 500) >= 500:
                log(
                    f"{self.command} {self.url_path} -> {self.resp_status} "
                    f"{self.bytes_sent}B {1000 * (time.monotonic() - started):.1f}ms"
                )

    def apply_fault(self, fault, kind):
        """Answer with the fault, or arm it for the real handler. True when answered."""
        if fault.get("abort_after_bytes") is not None:
            self.abort_after = int(fault["abort_after_bytes"])
            return False
        if fault.get("lro_fail"):
            self.lro_fail = fault["lro_fail"]
            return False
        status = int(fault.get("status") or 500)
        headers = [("x-ms-request-id", self.request_id)]
        if fault.get("retry_after") is not None:
            headers.append(("Retry-After", str(fault["retry_after"])))
        body = fault.get("body")
        if body is not None:
            if isinstance(body, str):
                ctype = "application/xml" if body.lstrip().startswith("<") else "text/plain"
                self.respond(status, body.encode(), headers, ctype)
            else:
                self.respond_json(status, body, headers)
            return True
        message = "Injected fault."
        if kind in ("blob", "pagelist"):
            code = {500: "InternalError", 503: "ServerBusy"}.get(status, "ServerBusy")
            self.blob_error(ApiError(status, code, "The server is busy." if code == "ServerBusy" else message, headers))
        elif kind == "arm":
            code = {429: "TooManyRequests", 500: "InternalServerError", 503: "ServiceUnavailable"}.get(
                status, "InjectedFault"
            )
            self.respond_json(status, {"error": {"code": code, "message": message}}, headers)
        else:
            self.respond_json(status, {"error": "temporarily_unavailable", "error_description": message}, headers)
        return True

    def handle_unknown(self):
        self.respond_json(
            404,
            {"error": {"code": "NotFound", "message": f"azure-double serves no {self.command} {self.url_path}"}},
            [("x-ms-request-id", self.request_id)],
        )

    # -- Entra ID -----------------------------------------------------------------------

    def entra_error(self, status, error, code, description):
        now = datetime.datetime.now(datetime.timezone.utc)
        trace, corr = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        self.respond_json(
            status,
            {
                "error": error,
                "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\n"
                f"Correlation ID: {corr}\r\nTimestamp: {stamp}",
                "error_codes": [code],
                "timestamp": stamp,
                "trace_id": trace,
                "correlation_id": corr,
                "error_uri": f"https://login.microsoftonline.com/error?code={code}",
            },
            [("Cache-Control", "no-store, no-cache"), ("x-ms-request-id", trace)],
        )

    def handle_token(self):
        st = self.state
        tenant = unquote(self.url_path.split("/")[1])
        if self.command != "POST":
            return self.entra_error(
                400, "invalid_request", 900561, "The endpoint only accepts POST requests. Received a GET request."
            )
        with st.lock:
            identities = st.identities
        clients = identities.tenants.get(tenant.lower())
        if clients is None:
            return self.entra_error(
                400,
                "invalid_request",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                "signing into the correct cloud. Check with your subscription administrator, this may "
                "happen if there are no active subscriptions for the tenant.",
            )
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        form = {}
        if ctype == "application/x-www-form-urlencoded":
            try:
                form = dict(parse_qsl(self.body.decode("utf-8"), keep_blank_values=True, strict_parsing=False))
            except UnicodeDecodeError:
                form = {}
        grant = form.get("grant_type")
        if not grant:
            return self.entra_error(
                400, "invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'."
            )
        if grant != "client_credentials":
            return self.entra_error(
                400, "unsupported_grant_type", 70003, f"The app requested an unsupported grant type '{grant}'."
            )
        client_id = form.get("client_id")
        if not client_id:
            return self.entra_error(
                400, "invalid_request", 900144, "The request body must contain the following parameter: 'client_id'."
            )
        client = clients.get(client_id.lower())
        if client is None:
            return self.entra_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. "
                "This can happen if the application has not been installed by the administrator of the "
                "tenant or consented to by any user in the tenant. You may have sent your authentication "
                "request to the wrong tenant.",
            )
        if "client_secret" not in form:
            return self.entra_error(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            )
        if not secrets.compare_digest(form["client_secret"].encode(), client["secret"].encode()):
            return self.entra_error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the client "
                f"secret value, not the client secret ID, for a secret added to app '{client['client_id']}'.",
            )
        scope = form.get("scope")
        if not scope:
            return self.entra_error(
                400, "invalid_scope", 70011, "The provided request must include a 'scope' input parameter."
            )
        if scope not in ARM_SCOPES:
            return self.entra_error(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope {scope} is not "
                "valid. The double only issues tokens for https://management.azure.com/.default.",
            )
        with st.lock:
            lifetime = int(st.settings["token_lifetime"])
            token = secrets.token_urlsafe(48)
            st.tokens[token] = {
                "kind": "sp",
                "tenant": tenant,
                "client_id": client["client_id"],
                "object_id": client["object_id"],
                "expires": st.now() + lifetime,
            }
        self.respond_json(
            200,
            {"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token},
            [("Cache-Control", "no-store, no-cache")],
        )

    # -- IMDS ---------------------------------------------------------------------------

    def handle_imds(self):
        st = self.state

        def bad(description, error="invalid_request"):
            self.respond_json(400, {"error": error, "error_description": description})

        if self.command != "GET":
            return self.respond(405, b"", [("Allow", "GET")])
        if (self.headers.get("Metadata") or "").lower() != "true":
            return bad("Required metadata header not specified")
        version = self.query.get("api-version")
        if not version:
            return bad("Required query variable 'api-version' is missing")
        if version not in IMDS_VERSIONS:
            return bad(f"Invalid API version '{version}'. Supported versions: {', '.join(IMDS_VERSIONS)}")
        resource = self.query.get("resource")
        if not resource:
            return bad("Required query variable 'resource' is missing")
        mi = st.identities.managed_identity
        if mi is None:
            return bad("Identity not found")
        wanted = self.query.get("client_id") or self.query.get("object_id")
        if wanted and wanted.lower() not in (mi["client_id"].lower(), mi["object_id"].lower()):
            return bad("Identity not found")
        if resource not in ARM_RESOURCES:
            return bad(
                f"AADSTS500011: The resource principal named {resource} was not found in the tenant "
                f"named {mi['tenant']}.",
                "invalid_resource",
            )
        with st.lock:
            lifetime = int(st.settings["imds_token_lifetime"])
            now = st.now()
            token = secrets.token_urlsafe(48)
            st.tokens[token] = {
                "kind": "mi",
                "tenant": mi["tenant"],
                "client_id": mi["client_id"],
                "object_id": mi["object_id"],
                "expires": now + lifetime,
            }
        self.respond_json(
            200,
            {
                "access_token": token,
                "client_id": mi["client_id"],
                "expires_in": str(lifetime),
                "expires_on": str(int(now + lifetime)),
                "ext_expires_in": str(lifetime),
                "not_before": str(int(now)),
                "resource": resource,
                "token_type": "Bearer",
            },
        )

    # -- ARM ----------------------------------------------------------------------------

    def arm_headers(self):
        return [
            ("x-ms-request-id", self.request_id),
            ("x-ms-correlation-request-id", self.request_id),
            ("Cache-Control", "no-cache"),
        ]

    def handle_arm(self):
        try:
            self.arm_route()
        except ApiError as e:
            self.respond_json(
                e.status, {"error": {"code": e.code, "message": e.message}}, self.arm_headers() + e.headers
            )

    def arm_authenticate(self):
        """The caller's token record; 401 in ARM's words when there is none valid."""
        st = self.state
        default_tenant = next(iter(st.identities.tenants), "common")

        def fail(code, message, description):
            challenge = (
                f'Bearer authorization_uri="{self.base_url()}/{default_tenant}", '
                f'error="invalid_token", error_description="{description}"'
            )
            raise ApiError(401, code, message, [("WWW-Authenticate", challenge)])

        header = self.headers.get("Authorization")
        if not header:
            fail(
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
                "The authentication failed because of missing 'Authorization' header.",
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            fail(
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is provided in an invalid format.",
                "The authentication failed because of an invalid 'Authorization' header.",
            )
        with st.lock:
            record = st.tokens.get(token.strip())
            now = st.now()
        if record is None:
            fail("InvalidAuthenticationToken", "The access token is invalid.", "The access token is invalid.")
        if now >= record["expires"]:
            fmt = "%m/%d/%Y %I:%M:%S %p"
            exp = datetime.datetime.fromtimestamp(record["expires"], datetime.timezone.utc).strftime(fmt)
            cur = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime(fmt)
            fail(
                "ExpiredAuthenticationToken",
                f"The access token expiry UTC time '{exp}' is earlier than current UTC time '{cur}'.",
                "The access token has expired.",
            )
        return record

    def arm_route(self):
        st = self.state
        token = self.arm_authenticate()
        path = self.url_path.rstrip("/") or "/"
        segs = [unquote(s) for s in path.split("/")[1:]]
        low = [s.lower() for s in segs]
        method = self.command

        if low == ["subscriptions"]:
            self.api_version(SUBSCRIPTION_VERSIONS)
            return self.respond_json(200, self.subscription_list(token), self.arm_headers())
        sub_id = segs[1]
        rest = low[2:]
        version = self.api_version(api_family(rest))
        sub = self.subscription(sub_id, token)
        scope_sub = f"/subscriptions/{sub['id']}"

        # /subscriptions/{sub}
        if not rest:
            self.only(method, "GET")
            self.authorize(token, "Microsoft.Resources/subscriptions/read", scope_sub)
            return self.respond_json(200, self.subscription_json(sub), self.arm_headers())

        if rest[0] == "providers":
            provider = rest[1] if len(rest) > 1 else ""
            tail = rest[2:]
            if provider == "microsoft.authorization" and tail == ["permissions"]:
                self.only(method, "GET")
                actions, not_actions = st.identities.principal_roles(token)
                return self.respond_json(
                    200,
                    {"value": [{"actions": actions, "notActions": not_actions, "dataActions": [], "notDataActions": []}]},
                    self.arm_headers(),
                )
            if provider == "microsoft.compute":
                if tail == ["virtualmachines"]:
                    self.only(method, "GET")
                    self.authorize(token, "Microsoft.Compute/virtualMachines/read", scope_sub)
                    return self.list_page(st.vms, sub, None, lambda vm: vm.json(), version)
                if tail == ["disks"]:
                    self.only(method, "GET")
                    self.authorize(token, "Microsoft.Compute/disks/read", scope_sub)
                    return self.list_page(st.disks, sub, None, disk_json, version)
                if tail == ["snapshots"]:
                    self.only(method, "GET")
                    self.authorize(token, "Microsoft.Compute/snapshots/read", scope_sub)
                    return self.list_page(st.snapshots, sub, None, lambda s: s.json(st.now()), version)
                if len(tail) == 3 and tail[0] == "locations" and tail[2] == "vmsizes":
                    self.only(method, "GET")
                    self.authorize(token, "Microsoft.Compute/locations/vmSizes/read", scope_sub)
                    self.check_location(segs[5], "Microsoft.Compute/locations/vmSizes")
                    return self.respond_json(200, {"value": vm_sizes_json()}, self.arm_headers())
                if len(tail) == 4 and tail[0] == "locations" and tail[2] == "operations":
                    self.only(method, "GET")
                    return self.operation_poll(sub, segs[7])
            raise self.resource_type_error(segs)

        if rest[0] != "resourcegroups" or len(rest) < 2:
            raise self.resource_type_error(segs)
        rg_name = segs[3]
        rtail = low[4:]
        if len(rtail) < 3 or rtail[0] != "providers" or rtail[1] != "microsoft.compute":
            raise self.resource_type_error(segs)
        rtype = rtail[2]
        name = segs[7] if len(segs) > 7 else None
        action_tail = rtail[4:]
        scope_rg = f"{scope_sub}/resourceGroups/{rg_name}"
        type_name = {"virtualmachines": "virtualMachines", "disks": "disks", "snapshots": "snapshots"}.get(rtype)
        if type_name is None or len(action_tail) > 1:
            raise self.resource_type_error(segs)
        # A list is authorized at the resource group, one resource at its own id.
        scope = f"{scope_rg}/providers/Microsoft.Compute/{type_name}/{name}" if name else scope_rg

        if rtype == "virtualmachines":
            self.only(method, "GET")
            self.authorize(token, "Microsoft.Compute/virtualMachines/read", scope)
            rg = self.resource_group(sub, rg_name)
            if name is None:
                return self.list_page(st.vms, sub, rg, lambda vm: vm.json(), version)
            vm = self.find(st.vms, sub, rg, name, "Microsoft.Compute/virtualMachines")
            if action_tail == ["instanceview"]:
                return self.respond_json(200, vm.instance_view(), self.arm_headers())
            if action_tail:
                raise self.resource_type_error(segs)
            expand = self.query.get("$expand")
            if expand not in (None, "instanceView"):
                raise ApiError(400, "InvalidParameter", f"The value '{expand}' of parameter '$expand' is not valid.")
            return self.respond_json(200, vm.json(expand == "instanceView"), self.arm_headers())

        if rtype == "disks":
            self.only(method, "GET")
            if action_tail:
                raise self.not_implemented()
            self.authorize(token, "Microsoft.Compute/disks/read", scope)
            rg = self.resource_group(sub, rg_name)
            if name is None:
                return self.list_page(st.disks, sub, rg, disk_json, version)
            disk = self.find(st.disks, sub, rg, name, "Microsoft.Compute/disks")
            return self.respond_json(200, disk_json(disk), self.arm_headers())

        # snapshots
        if name is None:
            self.only(method, "GET")
            self.authorize(token, "Microsoft.Compute/snapshots/read", scope)
            rg = self.resource_group(sub, rg_name)
            return self.list_page(st.snapshots, sub, rg, lambda s: s.json(st.now()), version)
        if action_tail:
            act = action_tail[0]
            if act not in ("begingetaccess", "endgetaccess"):
                raise self.resource_type_error(segs)
            self.only(method, "POST")
            if act == "begingetaccess":
                self.authorize(token, "Microsoft.Compute/snapshots/beginGetAccess/action", scope)
                return self.begin_get_access(sub, rg_name, name, version)
            self.authorize(token, "Microsoft.Compute/snapshots/endGetAccess/action", scope)
            return self.end_get_access(sub, rg_name, name, version)
        if method == "GET":
            self.authorize(token, "Microsoft.Compute/snapshots/read", scope)
            rg = self.resource_group(sub, rg_name)
            with st.lock:
                snap = self.find(st.snapshots, sub, rg, name, "Microsoft.Compute/snapshots")
                if snap.create_op:  # a GET of a resource being created also watches its creation
                    snap.create_op.poll(st.now())
                doc = snap.json(st.now())
            return self.respond_json(200, doc, self.arm_headers())
        if method == "PUT":
            self.authorize(token, "Microsoft.Compute/snapshots/write", scope)
            return self.put_snapshot(token, sub, rg_name, name, scope, version)
        if method == "DELETE":
            self.authorize(token, "Microsoft.Compute/snapshots/delete", scope)
            return self.delete_snapshot(sub, rg_name, name, version)
        raise self.not_implemented()

    # ARM helpers

    def api_version(self, accepted):
        version = self.query.get("api-version")
        if not version:
            raise ApiError(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if version not in accepted:
            raise ApiError(
                400,
                "InvalidApiVersionParameter",
                f"The api-version '{version}' is invalid. The supported versions are '{','.join(accepted)}'.",
            )
        return version

    def only(self, method, allowed):
        if method != allowed:
            raise self.not_implemented()

    def not_implemented(self):
        return ApiError(
            501,
            "NotImplementedInDouble",
            f"The Azure double does not implement {self.command} {self.url_path}.",
        )

    def resource_type_error(self, segs):
        return ApiError(
            404,
            "InvalidResourceType",
            f"The resource type '{'/'.join(segs[2:])}' could not be found (the Azure double serves only "
            "what rehost uses).",
        )

    def subscription(self, sub_id, token):
        sub = self.state.identities.subscriptions.get(sub_id.lower())
        if sub is None:
            raise ApiError(404, "SubscriptionNotFound", f"The subscription '{sub_id}' could not be found.")
        if sub["tenant"].lower() != token["tenant"].lower():
            raise ApiError(
                401,
                "InvalidAuthenticationTokenTenant",
                f"The access token is from the wrong issuer 'https://sts.windows.net/{token['tenant']}/'. "
                f"It must match the tenant 'https://sts.windows.net/{sub['tenant']}/' associated with this "
                f"subscription. Please use the authority (URL) 'https://login.windows.net/{sub['tenant']}' to "
                "get the token. Note, if the subscription is transferred to another tenant there is no impact "
                "to the services, but information about new tenant could take time to propagate (up to an hour). "
                "If you just transferred your subscription and see this error message, please try back later.",
            )
        return sub

    def subscription_json(self, sub):
        return {
            "id": f"/subscriptions/{sub['id']}",
            "subscriptionId": sub["id"],
            "tenantId": sub["tenant"],
            "displayName": sub["display_name"],
            "state": "Enabled",
        }

    def subscription_list(self, token):
        ids = self.state.identities
        actions, not_actions = ids.principal_roles(token)
        value = [
            self.subscription_json(s)
            for s in ids.subscriptions.values()
            if s["tenant"].lower() == token["tenant"].lower()
            and action_allowed(actions, not_actions, "Microsoft.Resources/subscriptions/read")
        ]
        return {"value": value, "count": {"type": "Total", "value": len(value)}}

    def authorize(self, token, action, scope):
        actions, not_actions = self.state.identities.principal_roles(token)
        if not action_allowed(actions, not_actions, action):
            raise ApiError(
                403,
                "AuthorizationFailed",
                f"The client '{token['client_id']}' with object id '{token['object_id']}' does not have "
                f"authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. "
                "If access was recently granted, please refresh your credentials.",
            )

    def resource_group(self, sub, rg_name):
        key = (sub["id"].lower(), rg_name.lower())
        if key not in self.state.resource_groups:
            raise ApiError(404, "ResourceGroupNotFound", f"Resource group '{rg_name}' could not be found.")
        return self.state.resource_groups[key]

    def find(self, table, sub, rg, name, rtype):
        obj = table.get((sub["id"].lower(), rg.lower(), name.lower()))
        if obj is None:
            raise ApiError(
                404,
                "ResourceNotFound",
                f"The Resource '{rtype}/{name}' under resource group '{rg}' was not found. For more details "
                "please go to https://aka.ms/ARMResourceNotFoundFix",
            )
        return obj

    def check_location(self, location, rtype):
        if norm_location(location) not in LOCATIONS:
            raise ApiError(
                400,
                "LocationNotAvailableForResourceType",
                f"The provided location '{location}' is not available for resource type '{rtype}'. List of "
                f"available regions for the resource type is '{','.join(LOCATIONS)}'.",
            )

    def list_page(self, table, sub, rg, render, version):
        st = self.state
        with st.lock:
            items = [
                obj
                for key, obj in table.items()
                if key[0] == sub["id"].lower() and (rg is None or key[1] == rg.lower())
            ]
            page_size = int(st.settings["page_size"])
            token = self.query.get("$skiptoken")
            start = 0
            if token is not None:
                try:
                    start = int(base64.urlsafe_b64decode(token.encode()).decode().removeprefix("skip:"))
                    if start < 0:
                        raise ValueError
                except ValueError:
                    raise ApiError(400, "InvalidParameter", "The value of parameter '$skiptoken' is invalid.")
            page = [render(obj) for obj in items[start : start + page_size]]
        doc = {"value": page}
        if start + page_size < len(items):
            skip = base64.urlsafe_b64encode(f"skip:{start + page_size}".encode()).decode()
            doc["nextLink"] = (
                f"{self.base_url()}{self.url_path}?api-version={version}&$skiptoken={quote(skip, safe='')}"
            )
        self.respond_json(200, doc, self.arm_headers())

    def parse_json_body(self):
        try:
            doc = json.loads(self.body.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(
                400,
                "InvalidRequestContent",
                f"The request content was invalid and could not be deserialized: '{e}'.",
            )
        if not isinstance(doc, dict):
            raise ApiError(400, "InvalidRequestContent", "The request content must be a JSON object.")
        return doc

    def lro_headers(self, op, version):
        st = self.state
        status_url = (
            f"{self.base_url()}/subscriptions/{op.sub}/providers/Microsoft.Compute/locations/"
            f"{op.location}/operations/{op.id}?p={op.p}&api-version={version}"
        )
        monitor_url = (
            f"{self.base_url()}/subscriptions/{op.sub}/providers/Microsoft.Compute/locations/"
            f"{op.location}/operations/{op.id}?p={op.p}&monitor=true&api-version={version}"
        )
        return self.arm_headers() + [
            ("Azure-AsyncOperation", status_url),
            ("Location", monitor_url),
            ("Retry-After", str(st.settings["retry_after"])),
        ]

    def new_operation(self, kind, sub, location, snapshot=None):
        st = self.state
        op = Operation(
            kind, sub["id"], norm_location(location), int(st.settings["lro_polls"]), self.lro_fail, st.now(), snapshot
        )
        st.operations[op.id] = op
        return op

    # snapshots

    def put_snapshot(self, token, sub, rg_name, name, scope, version):
        st = self.state
        doc = self.parse_json_body()
        location = doc.get("location")
        if not location:
            raise ApiError(400, "LocationRequired", "The location property is required for this definition.")
        props = doc.get("properties")
        creation = props.get("creationData") if isinstance(props, dict) else None
        if not isinstance(creation, dict):
            raise ApiError(400, "InvalidParameter", "Required parameter 'creationData' is missing (null).")
        source_id = creation.get("sourceResourceId")
        option = creation.get("createOption")
        if not isinstance(option, str) or option.lower() != "copy":
            raise ApiError(
                400,
                "InvalidParameter",
                f"The value '{option}' of parameter 'creationData.createOption' is not supported by the double: "
                "snapshots of managed disks are created with 'Copy'.",
            )
        if not source_id:
            raise ApiError(400, "InvalidParameter", "Required parameter 'creationData.sourceResourceId' is missing (null).")
        # ARM's linked access check: copying a disk means reading it.
        linked = "Microsoft.Compute/disks/beginGetAccess/action"
        actions, not_actions = st.identities.principal_roles(token)
        if not action_allowed(actions, not_actions, linked):
            raise ApiError(
                403,
                "LinkedAuthorizationFailed",
                f"The client '{token['client_id']}' with object id '{token['object_id']}' has permission to "
                f"perform action 'Microsoft.Compute/snapshots/write' on scope '{scope}'; however, it does not "
                f"have permission to perform action '{linked}' on the linked scope(s) '{source_id}' or the "
                "linked scope(s) are invalid.",
            )
        tags = doc.get("tags") or {}
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise ApiError(400, "InvalidParameter", "The value of parameter 'tags' is invalid.")
        incremental = props.get("incremental", False)
        if not isinstance(incremental, bool):
            raise ApiError(400, "InvalidParameter", "The value of parameter 'incremental' is invalid.")
        sku_doc = doc.get("sku") or {}
        sku = sku_doc.get("name") if isinstance(sku_doc, dict) else None
        if sku is not None and sku not in SNAPSHOT_SKUS:
            raise ApiError(400, "InvalidParameter", f"The value '{sku}' of parameter 'sku.name' is invalid.")
        if incremental and sku == "Premium_LRS":
            raise ApiError(400, "InvalidParameter", "Incremental snapshots cannot be stored on Premium_LRS.")
        sku = sku or ("Standard_ZRS" if incremental else "Standard_LRS")

        with st.lock:
            rg = self.resource_group(sub, rg_name)
            if not SNAPSHOT_NAME.match(name):
                raise ApiError(
                    400,
                    "InvalidResourceName",
                    f"The resource name '{name}' is invalid. The name can be up to 80 characters long. It must "
                    "begin with a word character, and it must end with a word character or with '_'. The name "
                    "may contain word characters or '.', '-', '_'.",
                )
            self.check_location(location, "Microsoft.Compute/snapshots")
            disk = st.disk_by_id(source_id)
            if disk is None:
                raise ApiError(404, "NotFound", f"Resource '{source_id}' was not found (creationData.sourceResourceId).")
            if norm_location(location) != norm_location(disk.location):
                raise ApiError(
                    400,
                    "InvalidParameter",
                    f"Source disk '{disk.id}' is in location '{disk.location}', but the snapshot's location is "
                    f"'{location}'. A snapshot copy must be created in the source's location.",
                )
            key = (sub["id"].lower(), rg.lower(), name.lower())
            existing = st.snapshots.get(key)
            if existing is not None:
                if existing.disk is not disk:
                    raise ApiError(
                        409, "PropertyChangeNotAllowed", "Changing property 'sourceResourceId' is not allowed."
                    )
                if existing.incremental != incremental:
                    raise ApiError(409, "PropertyChangeNotAllowed", "Changing property 'incremental' is not allowed.")
                existing.tags = tags
                status, snap = 200, existing
                op = self.new_operation("update", sub, disk.location, existing)
            else:
                status = 202
                snap = Snapshot(sub["id"], rg, name, disk.location, tags, disk, incremental, sku, st.now())
                disk.take_snapshot(snap, st.state_dir)  # the content is frozen here
                st.snapshots[key] = snap
                op = self.new_operation("create", sub, disk.location, snap)
                snap.create_op = op
            body = snap.json(st.now())
        self.respond_json(status, body, self.lro_headers(op, version))

    def delete_snapshot(self, sub, rg_name, name, version):
        st = self.state
        with st.lock:
            rg = self.resource_group(sub, rg_name)
            key = (sub["id"].lower(), rg.lower(), name.lower())
            snap = st.snapshots.get(key)
            if snap is not None and snap.active_grant(st.now()):
                raise ApiError(
                    409,
                    "OperationNotAllowed",
                    f"Operation 'Delete' is not allowed on Snapshot '{snap.name}' since it is in state "
                    "'ActiveSAS'. The snapshot is currently being exported (has an active SAS); revoke access "
                    "first (endGetAccess).",
                )
            if snap is not None:
                op = self.new_operation("delete", sub, snap.location)
                if not op.fail:
                    del st.snapshots[key]
                    snap.disk.drop_snapshot(snap)
        if snap is None:  # deleting what is not there succeeds at once
            return self.respond(204, b"", self.arm_headers())
        self.respond(202, b"", self.lro_headers(op, version))

    def snapshot_for_action(self, sub, rg_name, name):
        rg = self.resource_group(sub, rg_name)
        return self.find(self.state.snapshots, sub, rg, name, "Microsoft.Compute/snapshots")

    def begin_get_access(self, sub, rg_name, name, version):
        st = self.state
        doc = self.parse_json_body()
        access = doc.get("access")
        if access != "Read":
            raise ApiError(
                400,
                "InvalidParameter",
                f"The value '{access}' of parameter 'access' is not valid for a snapshot export; use 'Read'.",
            )
        duration = doc.get("durationInSeconds")
        if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= MAX_SAS_SECONDS:
            raise ApiError(
                400,
                "InvalidParameter",
                f"The value '{duration}' of parameter 'durationInSeconds' is out of range. The value must be "
                f"between 1 and {MAX_SAS_SECONDS} seconds.",
            )
        fmt = doc.get("fileFormat", "VHD")
        if fmt != "VHD":
            raise ApiError(400, "InvalidParameter", f"The value '{fmt}' of parameter 'fileFormat' is not supported.")
        with st.lock:
            snap = self.snapshot_for_action(sub, rg_name, name)
            op = self.new_operation("begin_access", sub, snap.location, snap)
            if not op.fail:
                now = st.now()
                grant = snap.active_grant(now)
                if grant:  # a second grant while one is active extends it, same URL
                    grant.expires = now + duration
                else:
                    grant = SasGrant(snap, now + duration)
                    snap.grant = grant
                    st.grants[grant.container] = grant
                op.sas_url = grant.url(self.base_url())
        self.respond(202, b"", self.lro_headers(op, version))

    def end_get_access(self, sub, rg_name, name, version):
        st = self.state
        with st.lock:
            snap = self.snapshot_for_action(sub, rg_name, name)
            op = self.new_operation("end_access", sub, snap.location, snap)
            if not op.fail and snap.active_grant(st.now()):
                snap.grant.revoked = True
                snap.revoked_count += 1
        self.respond(202, b"", self.lro_headers(op, version))

    def operation_poll(self, sub, op_id):
        st = self.state
        with st.lock:
            op = st.operations.get(op_id)
            if op is None or op.sub.lower() != sub["id"].lower():
                raise ApiError(404, "NotFound", f"The operation '{op_id}' was not found.")
            op.poll(st.now())
            retry = [("Retry-After", str(st.settings["retry_after"]))]
            if self.query.get("monitor") != "true":
                status, doc, headers = 200, op.status_json(), [] if op.done else retry
            elif not op.done:
                status, doc, headers = 202, None, retry + [("Location", self.base_url() + self.path)]
            elif op.fail:
                error = {"code": op.fail["code"], "message": op.fail["message"]}
                status, doc, headers = int(op.fail.get("status") or 500), {"error": error}, []
            elif op.kind == "begin_access":
                status, doc, headers = 200, {"accessSAS": op.sas_url}, []
            elif op.kind in ("create", "update"):
                status, doc, headers = 200, op.snapshot.json(st.now()), []
            else:
                status, doc, headers = 200, None, []
        self.respond_json(status, doc, self.arm_headers() + headers)

    # -- Blob (managed-disk SAS) --------------------------------------------------------

    def blob_headers(self, version):
        return [
            ("x-ms-request-id", self.request_id),
            ("x-ms-version", version),
            ("Date", http_date(time.time())),
            ("Server", "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0"),
        ]

    def blob_error(self, e, version=SAS_VERSION):
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
        extra = "".join(f"<{k}>{xml_escape(str(v))}</{k}>" for k, v in e.extra.items())
        body = (
            f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{e.code}</Code><Message>'
            f"{xml_escape(e.message)}\nRequestId:{self.request_id}\nTime:{when}</Message>{extra}</Error>"
        ).encode()
        headers = self.blob_headers(version) + [("x-ms-error-code", e.code)] + e.headers
        self.respond(e.status, body, headers, "application/xml")

    def handle_blob(self):
        version = SAS_VERSION
        try:
            requested = self.headers.get("x-ms-version")
            if requested is not None:
                if requested not in STORAGE_VERSIONS:
                    raise ApiError(
                        400,
                        "InvalidHeaderValue",
                        "The value for one of the HTTP headers is not in the correct format.",
                        extra={"HeaderName": "x-ms-version", "HeaderValue": requested},
                    )
                version = requested
            grant = self.verify_sas(self.url_path, self.query, "")
            if self.command not in ("GET", "HEAD"):
                raise ApiError(
                    403,
                    "AuthorizationPermissionMismatch",
                    "This request is not authorized to perform this operation using this permission.",
                )
            if "prevsnapshot" in self.query or "snapshot" in self.query:
                raise ApiError(
                    400,
                    "InvalidQueryParameterValue",
                    "Value for one of the query parameters specified in the request URI is invalid.",
                    extra={"QueryParameterName": "prevsnapshot" if "prevsnapshot" in self.query else "snapshot"},
                )
            comp = self.query.get("comp")
            if comp == "pagelist" and self.command == "GET":
                self.page_list(grant.snapshot, version)
            elif comp is None:
                self.blob_read(grant.snapshot, version)
            else:
                raise ApiError(
                    400,
                    "InvalidQueryParameterValue",
                    "Value for one of the query parameters specified in the request URI is invalid.",
                    extra={"QueryParameterName": "comp", "QueryParameterValue": comp},
                )
        except ApiError as e:
            if self.headers_sent:
                raise
            self.blob_error(e, version)

    def verify_sas(self, path, query, what):
        """The live grant a blob URL's SAS names; 403 AuthenticationFailed otherwise."""
        st = self.state

        def fail(detail):
            raise ApiError(
                403,
                "AuthenticationFailed",
                "Server failed to authenticate the request. Make sure the value of Authorization header is "
                "formed correctly including the signature.",
                extra={"AuthenticationErrorDetail": what + detail},
            )

        parts = path.split("/")
        if len(parts) != 4 or parts[1] != "_blob":
            fail("The blob URL is not a managed-disk SAS URL.")
        with st.lock:
            grant = st.grants.get(parts[2])
            now = st.now()
        if grant is None or parts[3] != "abcd":
            fail("Signature did not match: no access was granted to this resource.")
        for key, expected in (("sv", SAS_VERSION), ("sr", "b"), ("si", grant.si), ("sig", grant.sig)):
            if query.get(key) != expected:
                fail(f"Signature did not match: wrong or missing '{key}'.")
        if grant.revoked:
            fail(f"Signed identifier '{grant.si}' was revoked (endGetAccess).")
        if now >= grant.expires:
            fail("Signature not valid in the specified time frame: the access granted by beginGetAccess expired.")
        return grant

    def blob_common(self, snap):
        return [
            ("ETag", snap.etag),
            ("Last-Modified", http_date(snap.created)),
            ("x-ms-blob-type", "PageBlob"),
            ("x-ms-blob-sequence-number", "0"),
            ("x-ms-lease-status", "unlocked"),
            ("x-ms-lease-state", "available"),
            ("x-ms-server-encrypted", "true"),
            ("Accept-Ranges", "bytes"),
        ]

    def parse_range(self, total, allow_open=True):
        """(start, end inclusive, explicit) of the request's range; x-ms-range wins."""
        header = self.headers.get("x-ms-range")
        name = "x-ms-range"
        if header is None:
            header, name = self.headers.get("Range"), "Range"
        if header is None:
            return 0, total - 1, False
        m = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", header)
        if not m or (not m.group(2) and not allow_open):
            if name == "Range":
                return 0, total - 1, False  # a malformed Range is ignored, as HTTP says
            raise ApiError(
                400,
                "InvalidHeaderValue",
                "The value for one of the HTTP headers is not in the correct format.",
                extra={"HeaderName": name, "HeaderValue": header},
            )
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else total - 1
        if start >= total or end < start:
            raise ApiError(
                416,
                "InvalidRange",
                "The range specified is invalid for the current size of the resource.",
                [("Content-Range", f"bytes */{total}")],
            )
        return start, min(end, total - 1), True

    def blob_read(self, snap, version):
        st = self.state
        disk = snap.disk
        total = disk.size + PAGE
        start, end, ranged = self.parse_range(total)
        length = end - start + 1
        headers = self.blob_headers(version) + self.blob_common(snap) + [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(length if self.command == "GET" else total)),
        ]
        if self.command == "HEAD":
            return self.start_response(200, headers)
        if ranged:
            headers.append(("Content-Range", f"bytes {start}-{end}/{total}"))
        self.start_response(206 if ranged else 200, headers)
        pos, stop = start, end + 1
        while pos < stop:
            if pos >= disk.size:
                self.write_body(disk.footer[pos - disk.size : stop - disk.size])
                break
            n = min(stop, disk.size, pos + IO_CHUNK) - pos
            with st.lock:
                if snap not in disk.snapshots:  # deleted while being read: drop the connection
                    raise AbortConnection()
                data = disk.read_snapshot(snap, pos, n)
            self.write_body(data)
            pos += n

    def page_list(self, snap, version):
        st = self.state
        disk = snap.disk
        total = disk.size + PAGE
        start, end, _ = self.parse_range(total)
        # Ranges are reported in whole pages: widen the requested range to page boundaries.
        lo, hi = start - start % PAGE, min(total, (end // PAGE + 1) * PAGE)
        prev_url = self.headers.get("x-ms-previous-snapshot-url")
        diff_from = None
        if prev_url is not None and version >= DIFF_MIN_VERSION:
            diff_from = self.previous_snapshot(snap, prev_url)
        paged = version >= MARKER_MIN_VERSION
        max_results = PAGELIST_HARD_MAX
        if paged and "maxresults" in self.query:
            try:
                max_results = int(self.query["maxresults"])
            except ValueError:
                max_results = 0
            if max_results <= 0:
                raise ApiError(
                    400,
                    "OutOfRangeQueryParameterValue",
                    "One of the query parameters specified in the request URI is outside the permissible range.",
                    extra={"QueryParameterName": "maxresults", "QueryParameterValue": self.query["maxresults"]},
                )
        max_results = min(max_results, PAGELIST_HARD_MAX, int(st.settings["pagelist_max"]))
        resume = lo
        if paged and self.query.get("marker"):
            resume = self.decode_marker(self.query["marker"], snap)
        with st.lock:
            if snap not in disk.snapshots:
                raise ApiError(404, "BlobNotFound", "The specified blob does not exist.")
            entries = page_entries(snap, diff_from, lo, hi)
        entries = [e for e in entries if e[1] >= resume]
        next_marker = None
        if paged and len(entries) > max_results:
            next_marker = self.encode_marker(entries[max_results][1], snap)
            entries = entries[:max_results]
        parts = ['<?xml version="1.0" encoding="utf-8"?><PageList>']
        for tag, s, e in entries:
            parts.append(f"<{tag}><Start>{s}</Start><End>{e - 1}</End></{tag}>")
        if paged:
            parts.append(f"<NextMarker>{next_marker}</NextMarker>" if next_marker else "<NextMarker />")
        parts.append("</PageList>")
        body = "".join(parts).encode()
        headers = self.blob_headers(version) + [
            ("ETag", snap.etag),
            ("Last-Modified", http_date(snap.created)),
            ("x-ms-blob-content-length", str(total)),
        ]
        self.respond(200, body, headers, "application/xml")

    def encode_marker(self, offset, snap):
        raw = f"{snap.unique_id}:{offset}".encode()
        return "2!" + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode_marker(self, marker, snap):
        try:
            if not marker.startswith("2!"):
                raise ValueError
            body = marker[2:]
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode()
            owner, offset = raw.rsplit(":", 1)
            if owner != snap.unique_id:
                raise ValueError
            return int(offset)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(
                400,
                "InvalidQueryParameterValue",
                "Value for one of the query parameters specified in the request URI is invalid.",
                extra={"QueryParameterName": "marker", "QueryParameterValue": marker},
            )

    def previous_snapshot(self, snap, prev_url):
        parts = urlsplit(prev_url)
        if not parts.path.startswith("/_blob/"):
            raise ApiError(
                400,
                "InvalidHeaderValue",
                "The value for one of the HTTP headers is not in the correct format.",
                extra={"HeaderName": "x-ms-previous-snapshot-url", "HeaderValue": prev_url},
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        prev = self.verify_sas(parts.path, query, "x-ms-previous-snapshot-url: ").snapshot
        with self.state.lock:
            chain = snap.disk.snapshots
            if prev.disk is not snap.disk or prev not in chain:
                raise ApiError(409, "PreviousSnapshotNotFound", "The previous snapshot is not found.")
            if not (prev.incremental and snap.incremental):
                raise ApiError(
                    409,
                    "PreviousSnapshotOperationNotSupported",
                    "Differential Get Page Ranges is not supported on the previous snapshot.",
                )
            if chain.index(prev) > chain.index(snap):
                raise ApiError(
                    400,
                    "PreviousSnapshotCannotBeNewer",
                    "The prevsnapshot query parameter value cannot be newer than snapshot query parameter value.",
                )
        return prev

    # -- Control API --------------------------------------------------------------------

    def handle_control(self):
        try:
            route = (self.command, self.url_path.rstrip("/"))
            handler = CONTROL_ROUTES.get(route)
            if handler is None:
                raise ApiError(404, "NotFound", f"no control route {route[0]} {route[1]}")
            handler(self)
        except ApiError as e:
            self.respond_json(e.status, {"error": {"code": e.code, "message": e.message}})

    def control_json(self):
        try:
            return json.loads(self.body.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, "BadJson", f"control body is not JSON: {e}")

    def ctl_create_vm(self):
        st = self.state
        doc = self.control_json()
        if not isinstance(doc, dict):
            raise ApiError(400, "BadRequest", "expected a JSON object")
        try:
            sub_id, rg_name, name = doc["subscription"], doc["resource_group"], doc["name"]
            disks_doc = doc["disks"]
        except KeyError as e:
            raise ApiError(400, "BadRequest", f"missing field {e}")
        if not isinstance(disks_doc, list) or not all(isinstance(d, dict) for d in disks_doc):
            raise ApiError(400, "BadRequest", "disks must be a list of objects")
        location = norm_location(doc.get("location", "westeurope"))
        vm_size = doc.get("vm_size", "Standard_D2s_v3")
        os_type = doc.get("os_type", "Linux")
        hyper_v = doc.get("hyper_v_generation", "V2")
        power = doc.get("power_state", "running")
        if location not in LOCATIONS:
            raise ApiError(400, "BadRequest", f"unknown location {location!r}")
        if vm_size not in [s[0] for s in VM_SIZES]:
            raise ApiError(400, "BadRequest", f"unknown vm_size {vm_size!r}")
        if os_type not in ("Linux", "Windows") or hyper_v not in ("V1", "V2") or power not in POWER_STATES:
            raise ApiError(400, "BadRequest", "bad os_type, hyper_v_generation or power_state")
        os_disks = [d for d in disks_doc if d.get("lun") is None]
        if len(os_disks) != 1:
            raise ApiError(400, "BadRequest", "exactly one disk must have lun null (the OS disk)")
        luns = [d["lun"] for d in disks_doc if d.get("lun") is not None]
        if len(set(luns)) != len(luns) or not all(isinstance(x, int) and 0 <= x < 64 for x in luns):
            raise ApiError(400, "BadRequest", "data disk luns must be distinct integers 0..63")
        with st.lock:
            sub = st.identities.subscriptions.get(sub_id.lower())
            if sub is None:
                raise ApiError(400, "BadRequest", f"subscription {sub_id} is not in the identities config")
            sub_id = sub["id"]
            rg_key = (sub_id.lower(), rg_name.lower())
            rg_name = st.resource_groups.setdefault(rg_key, rg_name)
            if (sub_id.lower(), rg_name.lower(), name.lower()) in st.vms:
                raise ApiError(409, "Conflict", f"VM {name} exists")
            disks = []
            for d in sorted(disks_doc, key=lambda d: -1 if d.get("lun") is None else d["lun"]):
                size, dname = d.get("size_bytes"), d.get("name")
                if not isinstance(size, int) or size <= 0 or size % MIB:
                    raise ApiError(400, "BadRequest", f"disk {dname}: size_bytes must be a positive multiple of 1 MiB")
                sku = d.get("sku", "Premium_LRS")
                if sku not in DISK_SKUS:
                    raise ApiError(400, "BadRequest", f"disk {dname}: unknown sku {sku!r}")
                if not dname or (sub_id.lower(), rg_name.lower(), dname.lower()) in st.disks:
                    raise ApiError(409, "Conflict", f"disk name {dname!r} missing or taken")
                if any(x.name.lower() == dname.lower() for x in disks):
                    raise ApiError(409, "Conflict", f"disk name {dname!r} used twice")
                disk = Disk(
                    st.state_dir, sub_id, rg_name, dname, location, size, sku,
                    os_type if d.get("lun") is None else None, hyper_v, d.get("lun"), st.now(),
                )
                if d.get("seed_file"):
                    try:
                        disk.seed(d["seed_file"])
                    except OSError as e:
                        os.close(disk.fd)
                        os.unlink(disk.path)
                        raise ApiError(400, "BadRequest", f"disk {dname}: cannot read seed_file: {e}")
                    disk.changed = Intervals()  # the seed is the disk's starting content
                disks.append(disk)
            vm = VM(sub_id, rg_name, name, location, vm_size, os_type, hyper_v, power, disks)
            for disk in disks:
                disk.vm = vm
                st.disks[(sub_id.lower(), rg_name.lower(), disk.name.lower())] = disk
            st.vms[(sub_id.lower(), rg_name.lower(), name.lower())] = vm
            doc = vm.json()
        self.respond_json(200, doc)

    def control_disk(self, doc):
        if not isinstance(doc, dict):
            raise ApiError(400, "BadRequest", "expected a JSON object")
        disk = self.state.disk_by_id(doc.get("disk_id"))
        if disk is None:
            raise ApiError(404, "NotFound", f"no disk {doc.get('disk_id')!r}")
        return disk

    def ctl_write(self):
        st = self.state
        doc = self.control_json()
        data = None
        if isinstance(doc, dict) and "data_b64" in doc:
            try:
                data = base64.b64decode(doc["data_b64"], validate=True)
            except (ValueError, TypeError):
                raise ApiError(400, "BadRequest", "data_b64 is not base64")
        with st.lock:
            disk = self.control_disk(doc)
            offset = doc.get("offset")
            if data is not None:
                disk.check_range(offset, len(data))
                disk.write(offset, data)
            else:
                self.write_from_file(disk, offset, doc.get("from_file"), doc.get("file_offset", 0), doc.get("length"))
        self.respond_json(200, {"ok": True})

    @staticmethod
    def write_from_file(disk, offset, path, file_offset, length):
        disk.check_range(offset, length)
        if not isinstance(file_offset, int) or file_offset < 0:
            raise ApiError(400, "BadRequest", "file_offset must be a non-negative integer")
        try:
            f = open(path, "rb")
        except (OSError, TypeError) as e:
            raise ApiError(400, "BadRequest", f"cannot read from_file: {e}")
        with f:
            done = 0
            while done < length:
                f.seek(file_offset + done)
                piece = f.read(min(IO_CHUNK, length - done))
                if not piece:
                    raise ApiError(400, "BadRequest", "from_file is shorter than file_offset + length")
                if len(piece) % PAGE:  # a short last read: the file ends mid-page
                    piece += bytes(PAGE - len(piece) % PAGE)
                disk.write(offset + done, piece)
                done += len(piece)

    def ctl_clear(self):
        st = self.state
        doc = self.control_json()
        with st.lock:
            disk = self.control_disk(doc)
            disk.check_range(doc.get("offset"), doc.get("length"))
            disk.clear(doc["offset"], doc["length"])
        self.respond_json(200, {"ok": True})

    def ctl_read(self):
        st = self.state
        q = self.query
        with st.lock:
            disk = self.control_disk(q)
            try:
                offset, length = int(q.get("offset", 0)), int(q.get("length", disk.size))
            except ValueError:
                raise ApiError(400, "BadRequest", "offset and length must be integers")
            if offset < 0 or length < 0 or offset + length > disk.size:
                raise ApiError(400, "BadRequest", "range past the disk's end")
            data = disk.read_live(offset, length)
        self.respond(200, data, [], "application/octet-stream")

    def ctl_add_faults(self):
        doc = self.control_json()
        faults = doc if isinstance(doc, list) else [doc]
        for f in faults:
            problem = fault_problem(f)
            if problem:
                raise ApiError(400, "BadRequest", f"bad fault {f!r}: {problem}")
        with self.state.lock:
            self.state.faults.extend(faults)
            count = len(self.state.faults)
        self.respond_json(200, {"faults": count})

    def ctl_clear_faults(self):
        with self.state.lock:
            self.state.faults.clear()
        self.respond_json(200, {"faults": 0})

    def ctl_identities(self):
        try:
            identities = Identities(self.control_json())
        except (ValueError, AttributeError, TypeError) as e:
            raise ApiError(400, "BadRequest", f"bad identities: {e}")
        with self.state.lock:
            self.state.identities = identities
        self.respond_json(200, {"ok": True})

    def ctl_settings(self):
        doc = self.control_json()
        st = self.state
        if not isinstance(doc, dict):
            raise ApiError(400, "BadRequest", "expected a JSON object")
        with st.lock:
            for key, value in doc.items():
                if key not in st.settings:
                    raise ApiError(400, "BadRequest", f"unknown setting {key!r}")
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ApiError(400, "BadRequest", f"setting {key} must be a non-negative integer")
                if key in ("page_size", "pagelist_max") and value < 1:
                    raise ApiError(400, "BadRequest", f"setting {key} must be at least 1")
            st.settings.update(doc)
            settings = dict(st.settings)
        self.respond_json(200, settings)

    def ctl_get_settings(self):
        with self.state.lock:
            settings = dict(self.state.settings)
        self.respond_json(200, settings)

    def ctl_clock(self):
        doc = self.control_json()
        advance = doc.get("advance_seconds") if isinstance(doc, dict) else None
        if isinstance(advance, bool) or not isinstance(advance, (int, float)) or advance < 0:
            raise ApiError(400, "BadRequest", "advance_seconds must be a non-negative number")
        with self.state.lock:
            self.state.clock.offset += advance
            offset = self.state.clock.offset
        self.respond_json(200, {"offset_seconds": offset})

    def ctl_requests(self):
        with self.state.lock:
            log = list(self.state.requests)
        self.respond_json(200, log)

    def ctl_clear_requests(self):
        with self.state.lock:
            self.state.requests.clear()
        self.respond_json(200, {"ok": True})

    def ctl_state(self):
        st = self.state
        with st.lock:
            now = st.now()
            doc = {
                "disks": [
                    {"id": d.id, "size_bytes": d.size, "valid": d.valid.to_list(), "snapshots": [s.id for s in d.snapshots]}
                    for d in st.disks.values()
                ],
                "snapshots": [
                    {
                        "id": s.id,
                        "name": s.name,
                        "source": s.disk.id,
                        "active_sas": s.active_grant(now) is not None,
                        "access_revoked_count": s.revoked_count,
                        "tags": s.tags,
                        "provisioning_state": s.provisioning,
                        "cow_chunks": len(s.cow.slots),
                    }
                    for s in st.snapshots.values()
                ],
            }
        self.respond_json(200, doc)


CONTROL_ROUTES = {
    ("POST", "/_double/vms"): Handler.ctl_create_vm,
    ("POST", "/_double/disks/write"): Handler.ctl_write,
    ("POST", "/_double/disks/clear"): Handler.ctl_clear,
    ("GET", "/_double/disks/read"): Handler.ctl_read,
    ("POST", "/_double/faults"): Handler.ctl_add_faults,
    ("DELETE", "/_double/faults"): Handler.ctl_clear_faults,
    ("POST", "/_double/identities"): Handler.ctl_identities,
    ("POST", "/_double/settings"): Handler.ctl_settings,
    ("GET", "/_double/settings"): Handler.ctl_get_settings,
    ("POST", "/_double/clock"): Handler.ctl_clock,
    ("GET", "/_double/requests"): Handler.ctl_requests,
    ("DELETE", "/_double/requests"): Handler.ctl_clear_requests,
    ("GET", "/_double/state"): Handler.ctl_state,
}


def fault_problem(f):
    """Why a fault object is unusable, or None."""
    if not isinstance(f, dict):
        return "a fault is a JSON object"
    match = f.get("match") or {}
    if not isinstance(match, dict) or any(v is not None and not isinstance(v, str) for v in match.values()):
        return "match is an object of strings"
    if match.get("path_regex"):
        try:
            re.compile(match["path_regex"])
        except re.error as e:
            return f"path_regex: {e}"
    for key in ("status", "times", "retry_after", "abort_after_bytes"):
        value = f.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{key} must be a non-negative integer or null"
    lro_fail = f.get("lro_fail")
    if lro_fail is not None and not (isinstance(lro_fail, dict) and {"code", "message"} <= set(lro_fail)):
        return "lro_fail needs code and message"
    return None


def classify(method, path, query):
    if path.startswith("/_double/") or path == "/_double":
        return "control"
    if path.startswith("/_blob/"):
        return "pagelist" if query.get("comp") == "pagelist" else "blob"
    if path.startswith("/metadata/identity/oauth2/token"):
        return "imds"
    if re.fullmatch(r"/[^/]+/oauth2/v2\.0/token", path):
        return "token"
    if re.match(r"^/subscriptions(/|$)", path, re.IGNORECASE):
        return "arm"
    return "other"


def page_entries(snap, diff_from, lo, hi):
    """(tag, start, end) ranges within [lo, hi), in offset order, same-tag neighbours merged.

    Full list: the snapshot's valid pages plus the VHD footer's page. Diff from an older
    snapshot: every page written or cleared since it (the union of the changed sets of the
    snapshots after it, up to this one), as PageRange where now valid, else ClearRange."""
    disk = snap.disk
    if diff_from is None:
        valid = snap.valid.union(Intervals([(disk.size, disk.size + PAGE)]))
        return [("PageRange", s, e) for s, e in valid.clip(lo, hi)]
    chain = disk.snapshots
    changed = Intervals()
    for later in chain[chain.index(diff_from) + 1 : chain.index(snap) + 1]:
        changed = changed.union(later.changed)
    changed = changed.clip(lo, min(hi, disk.size))
    written = changed.intersection(snap.valid)
    cleared = changed.difference(snap.valid)
    entries = [("PageRange", s, e) for s, e in written] + [("ClearRange", s, e) for s, e in cleared]
    return sorted(entries, key=lambda t: t[1])


def api_family(rest):
    """The api-versions accepted for an ARM path (segments after /subscriptions/{id}, lower)."""
    if not rest:
        return SUBSCRIPTION_VERSIONS
    if rest[0] == "providers":
        provider, tail = rest[1:2], rest[2:]
    elif rest[0] == "resourcegroups":
        provider, tail = rest[3:4], rest[4:]
    else:
        return DISK_VERSIONS
    if provider == ["microsoft.authorization"]:
        return AUTHORIZATION_VERSIONS
    rtype = tail[0] if tail else ""
    if rtype == "locations":
        rtype = tail[2] if len(tail) > 2 else ""
        if rtype == "operations":
            return OPERATION_VERSIONS
    return VM_VERSIONS if rtype in ("virtualmachines", "vmsizes") else DISK_VERSIONS


def vm_sizes_json():
    return [
        {
            "name": name,
            "numberOfCores": cores,
            "osDiskSizeInMB": 1047552,
            "resourceDiskSizeInMB": resource,
            "memoryInMB": memory,
            "maxDataDiskCount": max_disks,
        }
        for name, cores, memory, max_disks, resource in VM_SIZES
    ]


def xml_escape(text):
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls = False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--retry-after", type=int, default=1)
    parser.add_argument("--lro-polls", type=int, default=1)
    parser.add_argument("--page-size", type=int, default=2)
    parser.add_argument("--pagelist-max", type=int, default=50)
    parser.add_argument("--token-lifetime", type=int, default=3599)
    parser.add_argument("--config")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--quiet", action="store_true", help="log only errors, not every request")
    args = parser.parse_args()
    if args.page_size < 1 or args.pagelist_max < 1 or args.lro_polls < 0:
        parser.error("--page-size and --pagelist-max must be >= 1, --lro-polls >= 0")
    try:
        doc = DEFAULT_IDENTITIES
        if args.config:
            with open(args.config) as f:
                doc = json.load(f)
        identities = Identities(doc)
    except (OSError, ValueError, AttributeError, TypeError) as e:
        parser.error(f"--config: {e}")

    os.makedirs(args.state_dir, exist_ok=True)
    state = State(args, identities)
    Handler.quiet = args.quiet
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = Server(("127.0.0.1", args.port), handler)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        # The handshake happens in the request's own thread, not in accept().
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        server.tls = True

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scheme = "https" if server.tls else "http"
    print(f"READY {scheme}://127.0.0.1:{server.server_address[1]}", flush=True)
    log(f"serving on {scheme}://127.0.0.1:{server.server_address[1]}, state in {args.state_dir}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        log("stopped")


if __name__ == "__main__":
    main()
