#!/usr/bin/env python3
"""A fake Hyper-V host speaking WS-Management (WinRM's WMI plugin), for rehost's tests.

Written from Microsoft's hyperv_v2 class reference, [MS-WSMV] and DMTF DSP0226/DSP0227; see
README.md for what it emulates and PROTOCOL.md for the contract. One process: prints
`READY http://127.0.0.1:PORT/wsman` and serves WS-Man on /wsman and a JSON control API on
/_double/. Needs pyspnego (the NTLM acceptor and message sealing)."""

import argparse
import socket
import base64
import hashlib
import json
import os
import random
import re
import signal
import ssl
import sys
import tempfile
import threading
import time
import traceback
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape, quoteattr

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vhdimage  # noqa: E402

MIB = 1 << 20
RCT_GRANULARITY = 64 * 1024

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "n": "http://schemas.xmlsoap.org/ws/2004/09/enumeration",
    "p": "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd",
    "b": "http://schemas.dmtf.org/wbem/wsman/1/cimbinding.xsd",
    "x": "http://schemas.xmlsoap.org/ws/2004/09/transfer",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
    "f": "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault",
    "cim": "http://schemas.dmtf.org/wbem/wscim/1/common",
    "wsmid": "http://schemas.dmtf.org/wbem/wsman/identity/1/wsmanidentity.xsd",
}
V2 = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/"
CIMV2 = "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/cimv2/"
ASSOC_URI = "http://schemas.dmtf.org/wbem/wscim/1/*"
WQL = "http://schemas.microsoft.com/wbem/wsman/1/WQL"
ASSOC_DIALECT = "http://schemas.dmtf.org/wbem/wsman/1/cimbinding/associationFilter"
ANON = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous"
A_GET = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get"
A_ENUM = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate"
A_PULL = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull"
A_RELEASE = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Release"
PRODUCT_VERSION = "OS: 10.0.17763 SP: 0.0 Stack: 3.0"

SERVICE_KEYS = ["CreationClassName", "Name", "SystemCreationClassName", "SystemName"]
KEYS = {
    "Msvm_ComputerSystem": ["CreationClassName", "Name"],
    "Msvm_VirtualSystemSnapshotService": SERVICE_KEYS,
    "Msvm_VirtualSystemReferencePointService": SERVICE_KEYS,
    "Msvm_ImageManagementService": SERVICE_KEYS,
    "Msvm_VirtualSystemManagementService": SERVICE_KEYS,
    "Win32_OperatingSystem": ["Name"],
}
SERVICE_NAMES = {
    "Msvm_VirtualSystemSnapshotService": ("vssnapsvc", "Microsoft Hyper-V Virtual System Snapshot Service"),
    "Msvm_VirtualSystemReferencePointService": ("vsrefptsvc", "Microsoft Hyper-V Virtual System Reference Point Service"),
    "Msvm_ImageManagementService": ("vhdsvc", "Microsoft Hyper-V Image Management Service"),
    "Msvm_VirtualSystemManagementService": ("vmms", "Microsoft Hyper-V Virtual System Management Service"),
}
# Base classes a query or ResultClassName may name (WMI returns subclasses for a base class).
PARENTS = {
    "Msvm_ProcessorSettingData": ["CIM_ProcessorAllocationSettingData", "CIM_ResourceAllocationSettingData", "CIM_SettingData"],
    "Msvm_MemorySettingData": ["CIM_ResourceAllocationSettingData", "CIM_SettingData"],
    "Msvm_ResourceAllocationSettingData": ["CIM_ResourceAllocationSettingData", "CIM_SettingData"],
    "Msvm_StorageAllocationSettingData": ["CIM_StorageAllocationSettingData", "CIM_ResourceAllocationSettingData", "CIM_SettingData"],
    "Msvm_VirtualSystemSettingData": ["CIM_VirtualSystemSettingData", "CIM_SettingData"],
    "Msvm_ComputerSystem": ["CIM_ComputerSystem", "CIM_System"],
    "Msvm_ConcreteJob": ["CIM_ConcreteJob", "CIM_Job"],
    "Msvm_VirtualSystemReferencePoint": [],
}
ASSOCIATIONS = ["Msvm_VirtualSystemSettingDataComponent", "Msvm_SettingsDefineState", "Msvm_SnapshotOfVirtualSystem",
                "Msvm_ElementSettingData", "Msvm_AffectedJobElement", "Msvm_ReferencePointOfVirtualSystem",
                "Msvm_MostCurrentSnapshotInBranch"]
IDE_GUID = "83F8638B-8DCA-4152-9EDA-2CA8B33039B4"
PROC_GUID = "b637f346-6a0e-4dec-af52-bd70cb80a21d"
MEM_GUID = "4764334d-e001-4176-82ee-5594ec9b530e"

RET_OK, RET_JOB, RET_FAILED, RET_ACCESS, RET_NOT_SUPPORTED = 0, 4096, 32768, 32769, 32770
RET_INVALID_PARAM, RET_INVALID_STATE, RET_FILE_NOT_FOUND = 32773, 32775, 32779


def log(msg):
    print(f"[hyperv-double {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Dt(str):
    """A CIM datetime value (rendered as cim:Datetime, or DMTF text in CIM-XML)."""

    @staticmethod
    def now():
        return Dt(datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))

    def dmtf(self):
        d = datetime.strptime(self, "%Y-%m-%dT%H:%M:%S.%fZ")
        return d.strftime("%Y%m%d%H%M%S.%f") + "+000"


class Ref:
    """A reference to an instance (an EPR in WS-Man, a WMI path in string properties)."""

    def __init__(self, cls, keys):
        self.cls, self.keys = cls, keys


def class_uri(cls):
    return (CIMV2 if cls.startswith("Win32_") else V2) + cls


def keys_of(cls):
    return KEYS.get(cls, ["InstanceID"])


def wmi_path(host, cls, props):
    parts = []
    for k in keys_of(cls):
        v = str(props[k]).replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'{k}="{v}"')
    return f"\\\\{host}\\root\\virtualization\\v2:{cls}." + ",".join(parts)


class WsFault(Exception):
    def __init__(self, subcode, reason, code=2150858817, sender=True, action=None, http=500):
        super().__init__(reason)
        self.subcode, self.reason, self.code, self.sender = subcode, reason, code, sender
        self.action = action or "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault"
        self.http = http


def invalid_selectors(what="The WS-Management service cannot process the request because the request contained invalid selectors for the resource."):
    return WsFault("w:InvalidSelectors", what, 2150858813)


def access_denied():
    return WsFault("w:AccessDenied", "Access is denied.", 5)


def cannot_process_filter(why):
    return WsFault("w:CannotProcessFilter", f"The data source could not process the filter. {why}", 2150858778)


# ---------------------------------------------------------------- WQL

_TOKEN = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')|(?P<num>-?\d+)|(?P<op><>|!=|=|\*)|(?P<word>[A-Za-z_][A-Za-z0-9_]*))')


def parse_wql(text):
    """SELECT * FROM cls [WHERE p (=|LIKE) v [AND ...]] → (cls, [(prop, op, value)])."""
    tokens = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise cannot_process_filter(f"Unexpected text at {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        v = m.group(kind)
        if kind == "str":
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        elif kind == "num":
            v = int(v)
        tokens.append((kind, v))
    def expect_word(i, w):
        if i >= len(tokens) or tokens[i][0] != "word" or tokens[i][1].upper() != w:
            raise cannot_process_filter(f"Expected {w}.")
    expect_word(0, "SELECT")
    if len(tokens) < 2 or tokens[1] != ("op", "*"):
        raise cannot_process_filter("Only SELECT * is supported.")
    expect_word(2, "FROM")
    if len(tokens) < 4 or tokens[3][0] != "word":
        raise cannot_process_filter("Expected a class name.")
    cls = tokens[3][1]
    conds = []
    i = 4
    if i < len(tokens):
        expect_word(i, "WHERE")
        i += 1
        while True:
            if i + 2 >= len(tokens) + 0 and i + 2 > len(tokens) - 1 + 1:
                raise cannot_process_filter("Incomplete condition.")
            prop = tokens[i]
            op = tokens[i + 1] if i + 1 < len(tokens) else None
            val = tokens[i + 2] if i + 2 < len(tokens) else None
            if prop[0] != "word" or op is None or val is None:
                raise cannot_process_filter("Incomplete condition.")
            if op == ("op", "="):
                o = "="
            elif op[0] == "word" and op[1].upper() == "LIKE":
                o = "LIKE"
            else:
                raise cannot_process_filter("Only = and LIKE are supported.")
            if val[0] == "word" and val[1].upper() in ("TRUE", "FALSE"):
                value = val[1].upper() == "TRUE"
            elif val[0] in ("str", "num"):
                value = val[1]
            else:
                raise cannot_process_filter("Expected a literal value.")
            if o == "LIKE" and not isinstance(value, str):
                raise cannot_process_filter("LIKE needs a string.")
            conds.append((prop[1], o, value))
            i += 3
            if i == len(tokens):
                break
            expect_word(i, "AND")
            i += 1
    return cls, conds


def like_regex(pattern):
    out = ""
    for ch in pattern:
        out += ".*" if ch == "%" else "." if ch == "_" else re.escape(ch)
    return re.compile(out + r"\Z", re.IGNORECASE | re.DOTALL)


def value_matches(actual, op, want):
    if actual is None:
        return False
    if isinstance(actual, list):
        return any(value_matches(a, op, want) for a in actual)
    if op == "LIKE":
        return bool(like_regex(want).match(str(actual)))
    if isinstance(want, bool):
        return actual is want
    if isinstance(actual, bool):
        return False
    if isinstance(actual, int):
        try:
            return actual == int(want)
        except ValueError:
            return False
    return str(actual).lower() == str(want).lower()


# ---------------------------------------------------------------- model

class Disk:
    """A VM disk slot: its chain of image files (base first, current last) and its RCT log."""

    def __init__(self, vm, index, controller, port, lun, size, fmt, block_size, state):
        self.vm, self.index, self.controller, self.port, self.lun = vm, index, controller, port, lun
        self.size, self.fmt = size, fmt
        self.state = state
        name = vm.name if index == 0 else f"{vm.name}_{index}"
        self.win_base = f"{vm.folder}\\Virtual Hard Disks\\{name}.{fmt}"
        local = state.local(self.win_base)
        os.makedirs(os.path.dirname(local), exist_ok=True)
        if fmt == "vhdx":
            img = vhdimage.Vhdx.create(local, size, block_size=block_size or 32 * MIB)
        else:
            img = vhdimage.Vhd.create(local, size, block_size=block_size or 2 * MIB)
        self.chain = [(self.win_base, img)]
        self.rct_guid = str(uuid.uuid4())
        self.seq = 0
        self.writes = []  # (seq, offset, length)

    @property
    def current_path(self):
        return self.chain[-1][0]

    @property
    def current(self):
        return self.chain[-1][1]

    def slot(self):
        return f"{self.ctrl_guid}\\{self.port}\\{self.lun}"

    @property
    def ctrl_guid(self):
        return IDE_GUID if self.controller == "ide" else self.vm.scsi_guid

    def read(self, offset, length):
        return self.current.read(offset, length)

    def write(self, offset, data):
        if offset < 0 or offset + len(data) > self.size:
            raise ValueError("write past the end of the disk")
        if not data:
            return
        ls = self.current.logical_sector
        start = offset // ls * ls
        end = -(-(offset + len(data)) // ls) * ls
        if start != offset or end != offset + len(data):
            buf = bytearray(self.read(start, end - start))
            buf[offset - start:offset - start + len(data)] = data
            data = bytes(buf)
        self.current.write(start, data)
        self.seq += 1
        self.writes.append((self.seq, offset, end - start if False else len(data)))
        self.writes[-1] = (self.seq, start, len(data))

    def rct_id(self, seq):
        g = self.rct_guid.split("-")
        return f"rctX:{g[0]}:{g[1]}:{g[2]}:{g[3]}:{g[4]}:{seq:08x}"

    def parse_rct(self, rct):
        m = re.fullmatch(r"rctX:([0-9a-f]{8}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{12}):([0-9a-f]{8})", rct or "", re.I)
        if not m or "-".join(m.groups()[:5]).lower() != self.rct_guid:
            return None
        seq = int(m.group(6), 16)
        return seq if seq <= self.seq else None

    def add_child(self, snap_guid):
        """Freezes the current file and puts a new differencing file on top of it."""
        parent_win, parent = self.chain[-1]
        folder, base = parent_win.rsplit("\\", 1)
        stem = re.sub(r"_[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$", "", base.rsplit(".", 1)[0])
        ext = "avhdx" if self.fmt == "vhdx" else "avhd"
        win = f"{folder}\\{stem}_{snap_guid}.{ext}"
        paths = {"relative_path": ".\\" + base, "absolute_win32_path": parent_win}
        cls = vhdimage.Vhdx if self.fmt == "vhdx" else vhdimage.Vhd
        img = cls.create(self.state.local(win), self.size, block_size=2 * MIB if self.fmt == "vhdx" else parent.block_size,
                         parent=parent, parent_paths=paths)
        self.chain.append((win, img))
        return parent_win

    def merge_child_of(self, frozen_win):
        """Merges the file above `frozen_win` into it; returns the merged (deleted) file's path."""
        i = [w.lower() for w, _ in self.chain].index(frozen_win.lower())
        child_win, child = self.chain[i + 1]
        _, parent = self.chain[i]
        for off, n in child.own_ranges():
            pos = 0
            while pos < n:
                k = min(n - pos, 32 * MIB)
                parent.write(off + pos, child.read(off + pos, k))
                pos += k
        parent.new_data_write_guid()
        child.close()
        os.remove(self.state.local(child_win))
        del self.chain[i + 1]
        if i + 1 < len(self.chain):
            grand_win, grand = self.chain[i + 1]
            grand.set_parent(parent, {"relative_path": ".\\" + frozen_win.rsplit("\\", 1)[1], "absolute_win32_path": frozen_win})
        return child_win


class Checkpoint:
    def __init__(self, vm, snap_type, name, consistency):
        self.guid = str(uuid.uuid4()).upper()
        self.vm = vm
        self.type = snap_type
        self.name = name
        self.consistency = consistency
        self.created = Dt.now()
        self.parent = vm.checkpoints[-1] if vm.checkpoints else None
        self.files = {}  # disk index -> frozen Windows path
        self.seqs = {}  # disk index -> RCT sequence at creation
        self.cpus, self.memory_mib = vm.cpus, vm.memory_mib


class ReferencePoint:
    def __init__(self, vm, cp):
        self.guid = str(uuid.uuid4()).upper()
        self.vm = vm
        self.consistency = cp.consistency
        self.created = cp.created
        self.rct = {d.index: d.rct_id(cp.seqs[d.index]) for d in vm.disks}


class Vm:
    def __init__(self, state, body):
        self.guid = str(uuid.uuid4()).upper()
        self.name = body["name"]
        self.generation = body.get("generation", 2)
        self.version = str(body.get("version", "9.0"))
        self.running = body.get("state", "running") == "running"
        self.cpus = body.get("cpus", 2)
        self.memory_mib = body.get("memory_mib", 2048)
        self.scsi_guid = str(uuid.uuid4()).upper()
        self.folder = f"C:\\Hyper-V\\{self.name}"
        self.created = Dt.now()
        self.started = time.time()
        self.checkpoints = []
        self.refpoints = []
        self.pending_writes = []
        self.disks = []
        counters = {"ide": 0, "scsi": 0}
        for i, d in enumerate(body.get("disks", [])):
            ctrl = d.get("controller", "scsi" if self.generation == 2 else "ide")
            n = counters[ctrl]
            counters[ctrl] += 1
            port, lun = (n // 2, n % 2) if ctrl == "ide" else (0, n)
            self.disks.append(Disk(self, i, ctrl, port, lun, d["size_bytes"], d.get("format", "vhdx"),
                                   d.get("block_size"), state))
            if d.get("seed_file"):
                seed_disk(self.disks[-1], d["seed_file"])
        self.has_scsi = counters["scsi"] > 0


def seed_disk(disk, path, chunk=4 << 20):
    """Copies a raw file's non-zero 4 MiB chunks into a new disk (benchmarks seed
    gigabytes this way instead of through the write API)."""
    zero = bytes(chunk)
    with open(path, "rb") as f:
        offset = 0
        while offset < disk.size:
            data = f.read(min(chunk, disk.size - offset))
            if not data:
                break
            if data != zero[: len(data)]:
                disk.write(offset, data)
            offset += len(data)


class Job:
    def __init__(self, state, method, vm, polls, effect, caption, fault_error=None):
        self.guid = str(uuid.uuid4()).upper()
        self.method, self.vm = method, vm
        self.polls_left = polls
        self.effect = effect
        self.caption = caption
        self.fault_error = fault_error
        self.state = 4
        self.error_code = 0
        self.error = ""
        self.affected = [Ref("Msvm_ComputerSystem", {"CreationClassName": "Msvm_ComputerSystem", "Name": vm.guid})] if vm else []
        self.submitted = Dt.now()
        self.done = False
        if polls <= 0:
            self.finish()

    def finish(self):
        if self.done:
            return
        self.done = True
        if self.fault_error is not None:
            self.state, self.error_code, self.error = 10, RET_FAILED, self.fault_error
            return
        try:
            refs = self.effect() or []
            self.affected += refs
            self.state = 7
        except Exception as e:  # the job reports what went wrong, as Hyper-V's jobs do
            traceback.print_exc()
            self.state, self.error_code, self.error = 10, RET_FAILED, str(e)

    def poll(self):
        if not self.done:
            if self.polls_left > 0:
                self.polls_left -= 1
            else:
                self.finish()


class State:
    def __init__(self, args):
        self.args = args
        self.root = os.path.abspath(args.state_dir)
        self.host = args.host_name
        self.lock = threading.RLock()
        self.vms = {}
        self.jobs = {}
        self.faults = []
        self.requests = []
        self.enums = {}
        self.users = {"administrator": {"name": "Administrator", "password": "Hv-Passw0rd!", "admin": True}}
        if args.users:
            with open(args.users) as f:
                doc = json.load(f)
            for u in doc.get("users", doc) if isinstance(doc, dict) else doc:
                self.users[u["name"].lower()] = {"name": u["name"], "password": u["password"], "admin": u.get("admin", True)}
        fd, self.ntlm_file = tempfile.mkstemp(prefix="ntlm-users-", dir=self.root)
        with os.fdopen(fd, "w") as f:
            for u in self.users.values():
                for dom in ("", self.host, ".", self.host.lower()):
                    f.write(f"{dom}:{u['name']}:{u['password']}\n")
        os.environ["NTLM_USER_FILE"] = self.ntlm_file

    def local(self, win):
        if not re.match(r"^[A-Za-z]:\\", win):
            raise ValueError(f"not a Windows path: {win}")
        return os.path.join(self.root, win[0].upper(), *win[3:].split("\\"))

    def user(self, name):
        name = name.split("\\")[-1].split("@")[0].lower()
        return self.users.get(name)

    # ---- faults injected by tests

    def take_fault(self, method):
        for f in self.faults:
            if f["method"].lower() == method.lower() and f.get("times", 1) > 0:
                f["times"] = f.get("times", 1) - 1
                return f
        return None

    # ---- instances

    def vm_by_guid(self, guid):
        return self.vms.get(str(guid).upper())

    def host_cs(self):
        return ("Msvm_ComputerSystem", {
            "Caption": "Hosting Computer System", "CreationClassName": "Msvm_ComputerSystem",
            "Description": "Microsoft Hosting Computer System", "ElementName": self.host, "EnabledState": 2,
            "HealthState": 5, "Name": self.host, "NumberOfNumaNodes": 1, "PrimaryOwnerName": "Administrator",
            "RequestedState": 12,
        })

    def vm_cs(self, vm):
        return ("Msvm_ComputerSystem", {
            "Caption": "Virtual Machine", "CreationClassName": "Msvm_ComputerSystem",
            "Description": "Microsoft Virtual Machine", "ElementName": vm.name,
            "EnabledState": 2 if vm.running else 3, "HealthState": 5, "InstallDate": vm.created,
            "Name": vm.guid, "NumberOfNumaNodes": 1,
            "OnTimeInMilliseconds": int((time.time() - vm.started) * 1000) if vm.running else 0,
            "OperationalStatus": [2], "ProcessID": 4242 if vm.running else None,
            "RequestedState": 12, "ReplicationMode": 0, "Status": "OK",
            "TimeOfLastStateChange": vm.created,
        })

    def vssd(self, vm, cp=None):
        sid = cp.guid if cp else vm.guid
        props = {
            "Caption": "Virtual Machine Settings" if cp is None else "Snapshot Settings",
            "ConfigurationDataRoot": vm.folder, "ConfigurationFile": f"{vm.folder}\\Virtual Machines\\{sid}.vmcx",
            "ConfigurationID": sid, "CreationTime": cp.created if cp else vm.created,
            "Description": "Active settings for the virtual machine." if cp is None else "Settings of a snapshot.",
            "ElementName": cp.name if cp else vm.name, "InstanceID": f"Microsoft:{sid}",
            "IsSaved": False, "Parent": None, "SnapshotDataRoot": vm.folder,
            "VirtualSystemIdentifier": vm.guid, "VirtualSystemSubType": f"Microsoft:Hyper-V:SubType:{vm.generation}",
            "VirtualSystemType": "Microsoft:Hyper-V:System:Realized", "Version": vm.version,
        }
        if cp is not None:
            props["VirtualSystemType"] = "Microsoft:Hyper-V:Snapshot:Recovery" if cp.type == 32768 else "Microsoft:Hyper-V:Snapshot:Realized"
            if cp.parent is not None:
                props["Parent"] = wmi_path(self.host, "Msvm_VirtualSystemSettingData", {"InstanceID": f"Microsoft:{cp.parent.guid}"})
        elif vm.checkpoints:
            props["Parent"] = wmi_path(self.host, "Msvm_VirtualSystemSettingData", {"InstanceID": f"Microsoft:{vm.checkpoints[-1].guid}"})
        return ("Msvm_VirtualSystemSettingData", props)

    def components(self, vm, cp=None):
        sid = cp.guid if cp else vm.guid
        pre = f"Microsoft:{sid}\\"
        out = [
            ("Msvm_ProcessorSettingData", {"InstanceID": pre + PROC_GUID + "\\0", "ElementName": "Processor",
                                           "ResourceType": 3, "ResourceSubType": "Microsoft:Hyper-V:Processor",
                                           "VirtualQuantity": cp.cpus if cp else vm.cpus, "AllocationUnits": "percent / 1000"}),
            ("Msvm_MemorySettingData", {"InstanceID": pre + MEM_GUID, "ElementName": "Memory", "ResourceType": 4,
                                        "ResourceSubType": "Microsoft:Hyper-V:Memory",
                                        "VirtualQuantity": cp.memory_mib if cp else vm.memory_mib,
                                        "AllocationUnits": "byte * 2^20", "DynamicMemoryEnabled": False}),
        ]
        ctrls = {}
        if vm.generation == 1:
            for port in (0, 1):
                iid = f"{pre}{IDE_GUID}\\{port}"
                ctrls[("ide", port)] = iid
                out.append(("Msvm_ResourceAllocationSettingData", {
                    "InstanceID": iid, "ElementName": "IDE Controller", "ResourceType": 5,
                    "ResourceSubType": "Microsoft:Hyper-V:Emulated IDE Controller", "Address": str(port),
                    "Parent": None, "AddressOnParent": None, "HostResource": None}))
        if vm.has_scsi:
            iid = f"{pre}{vm.scsi_guid}\\0"
            ctrls[("scsi", 0)] = iid
            out.append(("Msvm_ResourceAllocationSettingData", {
                "InstanceID": iid, "ElementName": "SCSI Controller", "ResourceType": 6,
                "ResourceSubType": "Microsoft:Hyper-V:Synthetic SCSI Controller", "Address": None,
                "Parent": None, "AddressOnParent": None, "HostResource": None}))
        for d in vm.disks:
            slot = f"{pre}{d.ctrl_guid}\\{d.port}\\{d.lun}"
            drive = {"InstanceID": slot + "\\D", "ElementName": "Hard Drive", "ResourceType": 17,
                     "ResourceSubType": "Microsoft:Hyper-V:Synthetic Disk Drive",
                     "Parent": wmi_path(self.host, "Msvm_ResourceAllocationSettingData", {"InstanceID": ctrls[(d.controller, d.port)]}),
                     "AddressOnParent": str(d.lun), "Address": None, "HostResource": None}
            out.append(("Msvm_ResourceAllocationSettingData", drive))
            out.append(("Msvm_StorageAllocationSettingData", {
                "InstanceID": slot + "\\L", "ElementName": "Hard Disk Image", "ResourceType": 31,
                "ResourceSubType": "Microsoft:Hyper-V:Virtual Hard Disk",
                "HostResource": [cp.files[d.index] if cp else d.current_path],
                "Parent": wmi_path(self.host, "Msvm_ResourceAllocationSettingData", {"InstanceID": drive["InstanceID"]}),
                "AddressOnParent": None, "Address": None, "Caption": "Hard Disk Image",
            }))
        return out

    def refpoint(self, rp):
        return ("Msvm_VirtualSystemReferencePoint", {
            "InstanceID": f"Microsoft:{rp.guid}", "ElementName": f"{rp.vm.name} - reference point",
            "VirtualSystemIdentifier": rp.vm.guid, "ReferencePointType": 2, "ConsistencyLevel": rp.consistency,
            "CreationTime": rp.created,
            "VirtualDiskIdentifiers": [f"Microsoft:{rp.vm.guid}\\{d.ctrl_guid}\\{d.port}\\{d.lun}\\L" for d in rp.vm.disks],
            "ResilientChangeTrackingIdentifiers": [rp.rct[d.index] for d in rp.vm.disks],
        })

    def job_inst(self, job):
        return ("Msvm_ConcreteJob", {
            "InstanceID": job.guid, "Caption": job.caption, "Description": job.caption, "ElementName": job.caption,
            "JobState": job.state, "PercentComplete": 100 if job.state == 7 else (50 if job.state == 4 else 0),
            "ErrorCode": job.error_code, "ErrorDescription": job.error or None,
            "ErrorSummaryDescription": job.error or None, "JobStatus": {4: "Job is running", 7: "Job completed successfully"}.get(job.state, "Job failed"),
            "Status": "OK" if job.state != 10 else "Error", "TimeSubmitted": job.submitted, "StartTime": job.submitted,
            "Cancellable": True, "DeleteOnCompletion": False, "JobType": {"CreateSnapshot": 70, "DestroySnapshot": 71, "ConvertToReferencePoint": 110, "DestroyReferencePoint": 111}.get(job.method, 1),
        })

    def services(self):
        out = []
        for cls, (name, elem) in SERVICE_NAMES.items():
            out.append((cls, {"CreationClassName": cls, "Name": name, "SystemCreationClassName": "Msvm_ComputerSystem",
                              "SystemName": self.host, "ElementName": elem, "Caption": elem, "EnabledState": 2,
                              "HealthState": 5, "Started": True, "StartMode": "Automatic", "Status": "OK"}))
        return out

    def os_inst(self):
        return ("Win32_OperatingSystem", {
            "Caption": "Microsoft Windows Server 2019 Datacenter", "Version": "10.0.17763", "BuildNumber": "17763",
            "CSName": self.host, "Name": "Microsoft Windows Server 2019 Datacenter|C:\\Windows|\\Device\\Harddisk0\\Partition2",
            "OSArchitecture": "64-bit", "ProductType": 3, "SystemDrive": "C:",
        })

    def all_instances(self):
        out = [self.host_cs(), self.os_inst()] + self.services()
        for vm in self.vms.values():
            out.append(self.vm_cs(vm))
            out.append(self.vssd(vm))
            out += self.components(vm)
            for cp in vm.checkpoints:
                out.append(self.vssd(vm, cp))
                out += self.components(vm, cp)
            out += [self.refpoint(rp) for rp in vm.refpoints]
        out += [self.job_inst(j) for j in self.jobs.values()]
        return out

    def instances_of(self, cls):
        return [i for i in self.all_instances() if class_matches(i[0], cls)]

    def find(self, cls, selectors):
        if cls not in KEYS and cls not in PARENTS and cls != "Msvm_VirtualSystemReferencePoint":
            pass
        want = {k.lower(): v for k, v in selectors.items()}
        keys = [k.lower() for k in keys_of(cls)]
        if set(want) != set(keys):
            raise invalid_selectors()
        for icls, props in self.all_instances():
            if icls != cls:
                continue
            if all(str(props[k]).lower() == str(want[k.lower()]).lower() for k in keys_of(cls)):
                if cls == "Msvm_ConcreteJob":
                    self.jobs[props["InstanceID"]].poll()
                    return self.job_inst(self.jobs[props["InstanceID"]])
                return icls, props
        raise invalid_selectors()

    def associations(self):
        """(association class, instance A, instance B) for every association the double knows."""
        out = []
        host = self.host_cs()
        for vm in self.vms.values():
            cs = self.vm_cs(vm)
            cur = self.vssd(vm)
            out.append(("Msvm_SettingsDefineState", cs, cur))
            out.append(("Msvm_ElementSettingData", cs, cur))
            for c in self.components(vm):
                out.append(("Msvm_VirtualSystemSettingDataComponent", cur, c))
            for cp in vm.checkpoints:
                s = self.vssd(vm, cp)
                out.append(("Msvm_SnapshotOfVirtualSystem", cs, s))
                out.append(("Msvm_ElementSettingData", cs, s))
                for c in self.components(vm, cp):
                    out.append(("Msvm_VirtualSystemSettingDataComponent", s, c))
            if vm.checkpoints:
                out.append(("Msvm_MostCurrentSnapshotInBranch", cs, self.vssd(vm, vm.checkpoints[-1])))
            for rp in vm.refpoints:
                out.append(("Msvm_ReferencePointOfVirtualSystem", cs, self.refpoint(rp)))
        for job in self.jobs.values():
            ji = self.job_inst(job)
            for ref in job.affected:
                inst = self.resolve_ref(ref)
                if inst is not None:
                    out.append(("Msvm_AffectedJobElement", ji, inst))
        del host
        return out

    def resolve_ref(self, ref):
        for icls, props in self.all_instances():
            if icls == ref.cls and all(str(props[k]).lower() == str(v).lower() for k, v in ref.keys.items()):
                return icls, props
        return None


def class_matches(actual, wanted):
    return actual.lower() == wanted.lower() or wanted.lower() in [p.lower() for p in PARENTS.get(actual, [])]


def known_class(cls):
    c = cls.lower()
    names = set(KEYS) | set(PARENTS) | set(ASSOCIATIONS)
    for v in PARENTS.values():
        names |= set(v)
    return any(n.lower() == c for n in names)


def same_instance(a, b):
    if a[0] != b[0]:
        return False
    return all(str(a[1][k]).lower() == str(b[1][k]).lower() for k in keys_of(a[0]))


# ---------------------------------------------------------------- XML rendering

def render_value(tag, v):
    if v is None:
        return f'<{tag} xsi:nil="true"/>'
    if isinstance(v, list):
        return "".join(render_value(tag, x) for x in v) if v else f'<{tag} xsi:nil="true"/>'
    if isinstance(v, Dt):
        return f"<{tag}><cim:Datetime>{v}</cim:Datetime></{tag}>"
    if isinstance(v, bool):
        return f"<{tag}>{'true' if v else 'false'}</{tag}>"
    return f"<{tag}>{escape(str(v))}</{tag}>"


def render_instance(inst):
    cls, props = inst
    body = "".join(render_value(f"p:{k}", props[k]) for k in sorted(props))
    return (f'<p:{cls} xmlns:p="{class_uri(cls)}" xmlns:cim="{NS["cim"]}" xmlns:xsi="{NS["xsi"]}" '
            f'xsi:type="p:{cls}_Type">{body}</p:{cls}>')


def render_epr(tag, ref):
    sels = "".join(f'<w:Selector Name={quoteattr(k)}>{escape(str(v))}</w:Selector>' for k, v in ref.keys.items())
    return (f'<{tag} xsi:type="a:EndpointReferenceType"><a:Address>{ANON}</a:Address><a:ReferenceParameters>'
            f'<w:ResourceURI>{class_uri(ref.cls)}</w:ResourceURI><w:SelectorSet>{sels}</w:SelectorSet>'
            f'</a:ReferenceParameters></{tag}>')


def cim_xml_instance(cls, props, types):
    out = f'<INSTANCE CLASSNAME="{cls}">'
    for k in sorted(props):
        v = props[k]
        t = types.get(k, "string")
        if isinstance(v, list):
            vals = "".join(f"<VALUE>{escape(str(x))}</VALUE>" for x in v)
            out += f'<PROPERTY.ARRAY NAME="{k}" TYPE="{t}"><VALUE.ARRAY>{vals}</VALUE.ARRAY></PROPERTY.ARRAY>'
        elif v is None:
            out += f'<PROPERTY NAME="{k}" TYPE="{t}"></PROPERTY>'
        else:
            if isinstance(v, bool):
                v = "TRUE" if v else "FALSE"
            out += f'<PROPERTY NAME="{k}" TYPE="{t}"><VALUE>{escape(str(v))}</VALUE></PROPERTY>'
    return out + "</INSTANCE>"


def parse_cim_xml(text):
    root = ET.fromstring(text)
    if root.tag != "INSTANCE":
        raise ValueError("not an INSTANCE")
    props = {}
    for p in root:
        name = p.get("NAME")
        if p.tag == "PROPERTY":
            v = p.find("VALUE")
            props[name] = None if v is None else (v.text or "")
        elif p.tag == "PROPERTY.ARRAY":
            props[name] = [v.text or "" for v in p.iter("VALUE")]
    return root.get("CLASSNAME"), props


def envelope(action, relates_to, body):
    return (f'<s:Envelope xmlns:s="{NS["s"]}" xmlns:a="{NS["a"]}" xmlns:w="{NS["w"]}" xmlns:n="{NS["n"]}" '
            f'xmlns:x="{NS["x"]}" xmlns:p="{NS["p"]}" xmlns:b="{NS["b"]}" xmlns:xsi="{NS["xsi"]}" xml:lang="en-US">'
            f'<s:Header><a:Action>{action}</a:Action><a:MessageID>uuid:{str(uuid.uuid4()).upper()}</a:MessageID>'
            f'<a:To>{ANON}</a:To>' + (f'<a:RelatesTo>{escape(relates_to)}</a:RelatesTo>' if relates_to else "") +
            f'</s:Header><s:Body>{body}</s:Body></s:Envelope>').encode()


def fault_envelope(f, relates_to):
    code = "s:Sender" if f.sender else "s:Receiver"
    body = (f'<s:Fault><s:Code><s:Value>{code}</s:Value><s:Subcode><s:Value>{f.subcode}</s:Value></s:Subcode></s:Code>'
            f'<s:Reason><s:Text xml:lang="en-US">{escape(f.reason)}</s:Text></s:Reason>'
            f'<s:Detail><f:WSManFault xmlns:f="{NS["f"]}" Code="{f.code}" Machine="127.0.0.1">'
            f'<f:Message>{escape(f.reason)}</f:Message></f:WSManFault></s:Detail></s:Fault>')
    return envelope(f.action, relates_to, body)


# ---------------------------------------------------------------- WS-Man request handling

def q(prefix, local):
    return f"{{{NS[prefix]}}}{local}"


def parse_selectors(parent):
    out = {}
    if parent is None:
        return out
    ss = parent.find(q("w", "SelectorSet"))
    if ss is None:
        return out
    for s in ss.findall(q("w", "Selector")):
        epr = s.find(q("a", "EndpointReference"))
        out[s.get("Name")] = (s.text or "").strip() if epr is None else epr
    return out


def parse_epr(el):
    """An EPR element (a:Address + a:ReferenceParameters) → (class, selectors)."""
    rp = el.find(q("a", "ReferenceParameters"))
    if rp is None:
        raise WsFault("w:SchemaValidationError", "The SOAP XML in the message does not match the corresponding XML schema definition.", 2150858817)
    uri = (rp.findtext(q("w", "ResourceURI")) or "").strip()
    return uri.rsplit("/", 1)[-1], parse_selectors(rp)


class WsMan:
    def __init__(self, state):
        self.state = state

    def handle(self, raw, user):
        try:
            root = ET.fromstring(raw)
        except ET.ParseError:
            raise WsFault("w:SchemaValidationError", "The SOAP XML in the message does not match the corresponding XML schema definition.", 2150858817)
        header = root.find(q("s", "Header"))
        body = root.find(q("s", "Body"))
        if body is None:
            raise WsFault("w:SchemaValidationError", "The SOAP XML in the message does not match the corresponding XML schema definition.", 2150858817)
        if header is None or header.find(q("a", "Action")) is None:
            if body.find(q("wsmid", "Identify")) is not None:
                return None, self.identify()
            raise WsFault("w:SchemaValidationError", "The SOAP XML in the message does not match the corresponding XML schema definition.", 2150858817)
        action = header.findtext(q("a", "Action")).strip()
        msg_id = (header.findtext(q("a", "MessageID")) or "").strip()
        uri = (header.findtext(q("w", "ResourceURI")) or "").strip()
        selectors = parse_selectors(header)
        return msg_id, self.dispatch(action, uri, selectors, body, user, msg_id)

    def identify(self):
        return (f'<s:Envelope xmlns:s="{NS["s"]}"><s:Header/><s:Body><wsmid:IdentifyResponse xmlns:wsmid="{NS["wsmid"]}">'
                f'<wsmid:ProtocolVersion>http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd</wsmid:ProtocolVersion>'
                f'<wsmid:ProductVendor>Microsoft Corporation</wsmid:ProductVendor>'
                f'<wsmid:ProductVersion>{PRODUCT_VERSION}</wsmid:ProductVersion>'
                f'<wsmid:SecurityProfiles><wsmid:SecurityProfileName>http://schemas.dmtf.org/wbem/wsman/1/wsman/secprofile/http/spnego-kerberos</wsmid:SecurityProfileName></wsmid:SecurityProfiles>'
                f'</wsmid:IdentifyResponse></s:Body></s:Envelope>').encode()

    def check_access(self, uri, user):
        if uri.startswith(V2) and not user["admin"]:
            raise access_denied()

    def log(self, action, uri, method=None, cls=None, extra=None):
        entry = {"action": action.rsplit("/", 1)[-1] if not method else "Invoke", "resource_uri": uri,
                 "class": cls or uri.rsplit("/", 1)[-1], "method": method, "time": time.time()}
        if extra:
            entry.update(extra)
        self.state.requests.append(entry)

    def dispatch(self, action, uri, selectors, body, user, msg_id):
        st = self.state
        env = lambda a, b: envelope(a, msg_id, b)  # noqa: E731
        if action == A_GET:
            self.log(action, uri)
            self.check_access(uri, user)
            cls = self.class_from_uri(uri)
            inst = st.find(cls, selectors)
            return env("http://schemas.xmlsoap.org/ws/2004/09/transfer/GetResponse", render_instance(inst))
        if action == A_ENUM:
            en = body.find(q("n", "Enumerate"))
            filt = en.find(q("w", "Filter")) if en is not None else None
            self.log(action, uri, extra={"filter": (filt.text or "").strip() if filt is not None and filt.text else None})
            self.check_access(uri if uri != ASSOC_URI else V2, user)
            items = self.enumerate(uri, en)
            max_el = int(en.findtext(q("w", "MaxElements")) or 1) if en is not None else 1
            optimize = en is not None and en.find(q("w", "OptimizeEnumeration")) is not None
            ctx = str(uuid.uuid4()).upper()
            if not optimize:
                st.enums[ctx] = items
                return env("http://schemas.xmlsoap.org/ws/2004/09/enumeration/EnumerateResponse",
                           f"<n:EnumerateResponse><n:EnumerationContext>uuid:{ctx}</n:EnumerationContext></n:EnumerateResponse>")
            n = min(max_el, st.args.page_size)
            page, rest = items[:n], items[n:]
            xml = "".join(render_instance(i) for i in page)
            if rest:
                st.enums[ctx] = rest
                tail = f"<n:EnumerationContext>uuid:{ctx}</n:EnumerationContext><w:Items>{xml}</w:Items>"
            else:
                tail = f"<n:EnumerationContext/><w:Items>{xml}</w:Items><w:EndOfSequence/>"
            return env("http://schemas.xmlsoap.org/ws/2004/09/enumeration/EnumerateResponse",
                       f"<n:EnumerateResponse>{tail}</n:EnumerateResponse>")
        if action == A_PULL:
            self.log(action, uri)
            pull = body.find(q("n", "Pull"))
            ctx = (pull.findtext(q("n", "EnumerationContext")) or "").strip().replace("uuid:", "") if pull is not None else ""
            if ctx not in st.enums:
                raise WsFault("n:InvalidEnumerationContext", "The WS-Enumeration context in the enumeration is not valid. Enumeration may have been completed or canceled.",
                              2150858779, sender=False, action="http://schemas.xmlsoap.org/ws/2004/09/enumeration/fault")
            items = st.enums.pop(ctx)
            max_el = int(pull.findtext(q("n", "MaxElements")) or 1)
            n = min(max_el, st.args.page_size)
            page, rest = items[:n], items[n:]
            xml = "".join(render_instance(i) for i in page)
            if rest:
                new = str(uuid.uuid4()).upper()
                st.enums[new] = rest
                tail = f"<n:EnumerationContext>uuid:{new}</n:EnumerationContext><n:Items>{xml}</n:Items>"
            else:
                tail = f"<n:Items>{xml}</n:Items><n:EndOfSequence/>"
            return env("http://schemas.xmlsoap.org/ws/2004/09/enumeration/PullResponse", f"<n:PullResponse>{tail}</n:PullResponse>")
        if action == A_RELEASE:
            self.log(action, uri)
            rel = body.find(q("n", "Release"))
            ctx = (rel.findtext(q("n", "EnumerationContext")) or "").strip().replace("uuid:", "") if rel is not None else ""
            if st.enums.pop(ctx, None) is None:
                raise WsFault("n:InvalidEnumerationContext", "The WS-Enumeration context in the enumeration is not valid.",
                              2150858779, sender=False, action="http://schemas.xmlsoap.org/ws/2004/09/enumeration/fault")
            return env("http://schemas.xmlsoap.org/ws/2004/09/enumeration/ReleaseResponse", "")
        if "/" in action and action.rsplit("/", 1)[0] == uri and (uri.startswith(V2) or uri.startswith(CIMV2)):
            method = action.rsplit("/", 1)[1]
            cls = self.class_from_uri(uri)
            self.log(action, uri, method=method, cls=cls)
            self.check_access(uri, user)
            return env(f"{uri}/{method}Response", self.invoke(cls, method, selectors, body))
        self.log(action, uri)
        raise WsFault("a:ActionNotSupported", f"The action is not supported by the service: {action}", 2150858771,
                      action="http://schemas.xmlsoap.org/ws/2004/08/addressing/fault")

    def class_from_uri(self, uri):
        if not (uri.startswith(V2) or uri.startswith(CIMV2)) or uri.endswith("*"):
            raise WsFault("w:DestinationUnreachable", "The WS-Management service cannot process the request because the resource URI is not valid.", 2150858770)
        cls = uri.rsplit("/", 1)[1]
        if not known_class(cls) and cls != "Win32_OperatingSystem":
            raise WsFault("w:DestinationUnreachable", f"The WS-Management service cannot process the request. The WMI class {cls} does not exist.", 2150858770)
        return cls

    def enumerate(self, uri, en):
        st = self.state
        filt = en.find(q("w", "Filter")) if en is not None else None
        if filt is None:
            if uri.endswith("*"):
                raise cannot_process_filter("A filter is required for this resource URI.")
            return st.instances_of(self.class_from_uri(uri))
        dialect = filt.get("Dialect") or WQL
        if dialect == WQL:
            if uri == ASSOC_URI or not (uri.startswith(V2) or uri.startswith(CIMV2)):
                raise cannot_process_filter("The WQL dialect needs a WMI resource URI.")
            cls, conds = parse_wql(filt.text or "")
            if not known_class(cls) and cls != "Win32_OperatingSystem":
                raise cannot_process_filter(f"Invalid class {cls}.")
            if not uri.endswith("*") and not class_matches(cls, uri.rsplit("/", 1)[1]) and not class_matches(uri.rsplit("/", 1)[1], cls):
                raise cannot_process_filter("The class in the query does not match the resource URI.")
            out = []
            for inst in st.instances_of(cls):
                lowered = {k.lower(): v for k, v in inst[1].items()}
                for prop, _, _ in conds:
                    if prop.lower() not in lowered:
                        raise cannot_process_filter(f"Invalid property {prop}.")
                if all(value_matches(lowered[p.lower()], o, v) for p, o, v in conds):
                    out.append(inst)
            return out
        if dialect == ASSOC_DIALECT:
            if uri != ASSOC_URI:
                raise cannot_process_filter("Association filters use the resource URI http://schemas.dmtf.org/wbem/wscim/1/*.")
            ai = filt.find(q("b", "AssociatedInstances"))
            if ai is None:
                raise cannot_process_filter("Only b:AssociatedInstances is supported.")
            obj = ai.find(q("b", "Object"))
            if obj is None:
                raise cannot_process_filter("b:Object is missing.")
            ocls, osel = parse_epr(obj)
            if not ocls.startswith("Win32_"):
                pass
            target = st.find(ocls, osel) if ocls != "Msvm_ConcreteJob" else self._job(osel)
            assoc = (ai.findtext(q("b", "AssociationClassName")) or "").strip()
            result = (ai.findtext(q("b", "ResultClassName")) or "").strip()
            if assoc and not any(a.lower() == assoc.lower() for a in ASSOCIATIONS):
                raise cannot_process_filter(f"Invalid association class {assoc}.")
            out = []
            for acls, a, b in st.associations():
                if assoc and acls.lower() != assoc.lower():
                    continue
                for mine, other in ((a, b), (b, a)):
                    if same_instance(mine, target) and (not result or class_matches(other[0], result)):
                        if not any(same_instance(other, o) for o in out):
                            out.append(other)
            return out
        raise WsFault("w:FilterDialectRequestedUnavailable", "The requested filter dialect is not supported.", 2150858796)

    def _job(self, sel):
        want = {k.lower(): v for k, v in sel.items()}
        if set(want) != {"instanceid"} or want["instanceid"].upper() not in self.state.jobs:
            raise invalid_selectors()
        return self.state.job_inst(self.state.jobs[want["instanceid"].upper()])

    # ---- methods

    def invoke(self, cls, method, selectors, body):
        st = self.state
        inp = body.find(f"{{{class_uri(cls)}}}{method}_INPUT")
        if inp is None:
            raise WsFault("w:SchemaValidationError", "The SOAP XML in the message does not match the corresponding XML schema definition.", 2150858817)
        svc = st.find(cls, selectors)
        del svc
        params = {}
        for el in inp:
            name = el.tag.split("}", 1)[1]
            if el.get(q("xsi", "nil")) == "true":
                params[name] = None
            elif el.find(q("a", "ReferenceParameters")) is not None:
                params[name] = parse_epr(el)
            else:
                params.setdefault(name, [])
                params[name].append(el.text or "")
        handlers = {
            ("Msvm_VirtualSystemSnapshotService", "CreateSnapshot"): self.m_create_snapshot,
            ("Msvm_VirtualSystemSnapshotService", "DestroySnapshot"): self.m_destroy_snapshot,
            ("Msvm_VirtualSystemSnapshotService", "ConvertToReferencePoint"): self.m_convert,
            ("Msvm_VirtualSystemReferencePointService", "DestroyReferencePoint"): self.m_destroy_refpoint,
            ("Msvm_ImageManagementService", "GetVirtualHardDiskSettingData"): self.m_vhd_settings,
            ("Msvm_ImageManagementService", "GetVirtualDiskChanges"): self.m_changes,
            ("Msvm_VirtualSystemManagementService", "ModifySystemSettings"): self.m_modify_settings,
        }
        h = handlers.get((cls, method))
        if h is None:
            raise WsFault("a:ActionNotSupported", f"The method {method} of class {cls} is not supported by this double.", 2150858771,
                          action="http://schemas.xmlsoap.org/ws/2004/08/addressing/fault")
        out_params = h(method, params)
        xml = ""
        for name, v in out_params:
            if isinstance(v, Ref):
                xml += render_epr(f"p:{name}", v)
            else:
                xml += render_value(f"p:{name}", v)
        return f'<p:{method}_OUTPUT xmlns:p="{class_uri(cls)}" xmlns:cim="{NS["cim"]}">{xml}</p:{method}_OUTPUT>'

    def _scalar(self, params, name):
        v = params.get(name)
        if isinstance(v, list):
            return v[0] if len(v) == 1 else v
        return v

    def _start_job(self, method, vm, effect, caption):
        st = self.state
        f = st.take_fault(method)
        if f and "return_value" in f:
            return [("Job", None), ("ReturnValue", int(f["return_value"]))], None
        polls = int(f["polls"]) if f and "polls" in f else st.args.job_polls
        job = Job(st, method, vm, polls, effect, caption, fault_error=f.get("job_error") if f else None)
        st.jobs[job.guid] = job
        return [("Job", Ref("Msvm_ConcreteJob", {"InstanceID": job.guid})), ("ReturnValue", RET_JOB)], job

    def _vm_from(self, ep):
        if not isinstance(ep, tuple) or ep[0] != "Msvm_ComputerSystem":
            return None
        want = {k.lower(): v for k, v in ep[1].items()}
        if want.get("creationclassname", "").lower() != "msvm_computersystem":
            return None
        return self.state.vm_by_guid(want.get("name", ""))

    def _snapshot_from(self, ep):
        if not isinstance(ep, tuple) or ep[0] != "Msvm_VirtualSystemSettingData":
            return None
        iid = {k.lower(): v for k, v in ep[1].items()}.get("instanceid", "")
        for vm in self.state.vms.values():
            for cp in vm.checkpoints:
                if iid.lower() == f"microsoft:{cp.guid}".lower():
                    return cp
        return None

    def m_create_snapshot(self, method, params):
        vm = self._vm_from(params.get("AffectedSystem"))
        if vm is None:
            return [("Job", None), ("ResultingSnapshot", None), ("ReturnValue", RET_INVALID_PARAM)]
        stype = int(self._scalar(params, "SnapshotType") or 2)
        if stype not in (2, 32768):
            return [("Job", None), ("ResultingSnapshot", None), ("ReturnValue", RET_INVALID_PARAM)]
        consistency = 1
        raw = self._scalar(params, "SnapshotSettings")
        if raw:
            try:
                scls, sprops = parse_cim_xml(raw)
            except (ET.ParseError, ValueError):
                return [("Job", None), ("ResultingSnapshot", None), ("ReturnValue", RET_INVALID_PARAM)]
            if scls != "Msvm_VirtualSystemSnapshotSettingData":
                return [("Job", None), ("ResultingSnapshot", None), ("ReturnValue", RET_INVALID_PARAM)]
            if sprops.get("ConsistencyLevel") not in (None, "", "1", "2"):
                return [("Job", None), ("ResultingSnapshot", None), ("ReturnValue", RET_INVALID_PARAM)]
            consistency = int(sprops.get("ConsistencyLevel") or 1)
        st = self.state

        def effect():
            cp = Checkpoint(vm, stype, f"{vm.name} - ({time.strftime('%m/%d/%Y - %I:%M:%S %p')})", consistency)
            for d in vm.disks:
                cp.seqs[d.index] = d.seq
                cp.files[d.index] = d.add_child(cp.guid)
            vm.checkpoints.append(cp)
            pending, vm.pending_writes = vm.pending_writes, []
            for w in pending:
                apply_write(vm, w)
            return [Ref("Msvm_VirtualSystemSettingData", {"InstanceID": f"Microsoft:{cp.guid}"})]

        out, _ = self._start_job(method, vm, effect, "Creating checkpoint")
        del st
        return [out[0], ("ResultingSnapshot", None), out[1]]

    def _merge_checkpoint(self, cp):
        vm = cp.vm
        for d in vm.disks:
            frozen = cp.files[d.index]
            merged = d.merge_child_of(frozen)
            for other in vm.checkpoints:
                if other is not cp and other.files.get(d.index, "").lower() == merged.lower():
                    other.files[d.index] = frozen
        i = vm.checkpoints.index(cp)
        for other in vm.checkpoints[i + 1:]:
            if other.parent is cp:
                other.parent = cp.parent
        vm.checkpoints.remove(cp)

    def m_modify_settings(self, method, params):
        """ModifySystemSettings: only ElementName of a checkpoint's (or VM's) settings is
        applied, which is what rehost changes; other properties are accepted unchanged."""
        raw = self._scalar(params, "SystemSettings")
        try:
            scls, sprops = parse_cim_xml(raw or "")
        except (ET.ParseError, ValueError):
            return [("Job", None), ("ReturnValue", RET_INVALID_PARAM)]
        if scls != "Msvm_VirtualSystemSettingData" or not sprops.get("InstanceID"):
            return [("Job", None), ("ReturnValue", RET_INVALID_PARAM)]
        iid = sprops["InstanceID"].lower()
        target = None
        for vm in self.state.vms.values():
            if iid == f"microsoft:{vm.guid}".lower():
                target = vm
            for cp in vm.checkpoints:
                if iid == f"microsoft:{cp.guid}".lower():
                    target = cp
        if target is None:
            return [("Job", None), ("ReturnValue", RET_INVALID_PARAM)]
        name = sprops.get("ElementName")

        def effect():
            if name:
                target.name = name
            return []

        vm = target if not isinstance(target, Checkpoint) else target.vm
        out, _ = self._start_job(method, vm, effect, "Modifying settings")
        return out

    def m_destroy_snapshot(self, method, params):
        cp = self._snapshot_from(params.get("AffectedSnapshot"))
        if cp is None:
            return [("Job", None), ("ReturnValue", RET_INVALID_PARAM)]

        def effect():
            if cp not in cp.vm.checkpoints:
                raise RuntimeError("The checkpoint no longer exists.")
            self._merge_checkpoint(cp)
            return []

        out, _ = self._start_job(method, cp.vm, effect, "Deleting checkpoint")
        return out

    def m_convert(self, method, params):
        cp = self._snapshot_from(params.get("AffectedSnapshot"))
        if cp is None:
            return [("Job", None), ("ResultingReferencePoint", None), ("ReturnValue", RET_INVALID_PARAM)]
        vm = cp.vm
        try:
            ver = tuple(int(x) for x in vm.version.split(".")[:2])
        except ValueError:
            ver = (0, 0)
        if ver < (6, 2) or any(d.fmt != "vhdx" for d in vm.disks):
            return [("Job", None), ("ResultingReferencePoint", None), ("ReturnValue", RET_NOT_SUPPORTED)]

        def effect():
            if cp not in vm.checkpoints:
                raise RuntimeError("The checkpoint no longer exists.")
            rp = ReferencePoint(vm, cp)
            self._merge_checkpoint(cp)
            vm.refpoints.append(rp)
            return [Ref("Msvm_VirtualSystemReferencePoint", {"InstanceID": f"Microsoft:{rp.guid}"})]

        out, _ = self._start_job(method, vm, effect, "Converting checkpoint to reference point")
        return [out[0], ("ResultingReferencePoint", None), out[1]]

    def m_destroy_refpoint(self, method, params):
        ep = params.get("AffectedReferencePoint")
        rp = None
        if isinstance(ep, tuple) and ep[0] == "Msvm_VirtualSystemReferencePoint":
            iid = {k.lower(): v for k, v in ep[1].items()}.get("instanceid", "")
            for vm in self.state.vms.values():
                for r in vm.refpoints:
                    if iid.lower() == f"microsoft:{r.guid}".lower():
                        rp = r
        if rp is None:
            return [("Job", None), ("ReturnValue", RET_INVALID_PARAM)]

        def effect():
            if rp in rp.vm.refpoints:
                rp.vm.refpoints.remove(rp)
            return []

        out, _ = self._start_job(method, rp.vm, effect, "Deleting reference point")
        return out

    def _file(self, path):
        """The (disk, image, is_frozen_by_checkpoint) a Windows path names, or None."""
        for vm in self.state.vms.values():
            for d in vm.disks:
                for win, img in d.chain:
                    if win.lower() == path.lower():
                        return vm, d, img
        return None

    def m_vhd_settings(self, method, params):
        path = self._scalar(params, "Path")
        f = self.state.take_fault(method)
        if f and "return_value" in f:
            return [("Job", None), ("SettingData", None), ("ReturnValue", int(f["return_value"])), ("State", None)]
        if not path or not isinstance(path, str):
            return [("Job", None), ("SettingData", None), ("ReturnValue", RET_INVALID_PARAM), ("State", None)]
        found = self._file(path)
        if found is None:
            return [("Job", None), ("SettingData", None), ("ReturnValue", RET_FILE_NOT_FOUND), ("State", None)]
        _, d, img = found
        parent = None
        i = [w for w, _ in d.chain].index(next(w for w, im in d.chain if im is img))
        if i > 0:
            parent = d.chain[i - 1][0]
        props = {"Path": path, "Format": 3 if img.format == "vhdx" else 2, "Type": 4 if img.has_parent else 3,
                 "MaxInternalSize": d.size, "BlockSize": img.block_size, "LogicalSectorSize": img.logical_sector,
                 "PhysicalSectorSize": img.physical_sector, "ParentPath": parent, "InstanceID": f"Microsoft:{uuid.uuid4()}",
                 "ElementName": None, "Caption": "Virtual Hard Disk Setting Data", "IsPmemCompatible": False}
        types = {"Format": "uint16", "Type": "uint16", "MaxInternalSize": "uint64", "BlockSize": "uint32",
                 "LogicalSectorSize": "uint32", "PhysicalSectorSize": "uint32", "IsPmemCompatible": "boolean"}
        xml = cim_xml_instance("Msvm_VirtualHardDiskSettingData", props, types)
        return [("Job", None), ("ReturnValue", RET_OK), ("SettingData", xml)]

    def m_changes(self, method, params):
        st = self.state
        f = st.take_fault(method)
        fail = lambda code: [("ChangedByteLengths", None), ("ChangedByteOffsets", None), ("Job", None),  # noqa: E731
                             ("ProcessedByteLength", None), ("ReturnValue", code)]
        if f and "return_value" in f:
            return fail(int(f["return_value"]))
        path = self._scalar(params, "Path")
        limit = self._scalar(params, "LimitId")
        try:
            offset = int(self._scalar(params, "ByteOffset") or 0)
            length = int(self._scalar(params, "ByteLength") or 0)
        except (TypeError, ValueError):
            return fail(RET_INVALID_PARAM)
        if not isinstance(path, str) or not path:
            return fail(RET_INVALID_PARAM)
        found = self._file(path)
        if found is None:
            return fail(RET_FILE_NOT_FOUND)
        vm, d, img = found
        cp = next((c for c in vm.checkpoints if c.files.get(d.index, "").lower() == path.lower()), None)
        if cp is None:
            return fail(RET_INVALID_STATE)
        limit_seq = d.parse_rct(limit) if isinstance(limit, str) else None
        if limit_seq is None or limit_seq > cp.seqs[d.index]:
            return fail(RET_INVALID_PARAM)
        if offset < 0 or length <= 0 or offset + length > d.size:
            return fail(RET_INVALID_PARAM)
        ranges = changed_ranges(d, limit_seq, cp.seqs[d.index])
        window_end = offset + length
        clipped = [(max(s, offset), min(e, window_end)) for s, e in ranges if e > offset and s < window_end]
        maxn = st.args.changes_max
        if len(clipped) > maxn:
            clipped = clipped[:maxn]
            processed = clipped[-1][1] - offset
        else:
            processed = length
        return [("ChangedByteLengths", [e - s for s, e in clipped]), ("ChangedByteOffsets", [s for s, _ in clipped]),
                ("Job", None), ("ProcessedByteLength", processed), ("ReturnValue", RET_OK)]


def changed_ranges(disk, after_seq, upto_seq):
    g = RCT_GRANULARITY
    rs = sorted((off // g * g, min(disk.size, -(-(off + n) // g) * g)) for seq, off, n in disk.writes if after_seq < seq <= upto_seq)
    merged = []
    for s, e in rs:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def write_bytes(body):
    """The bytes a control-API write body names (data_b64, fill or seed)."""
    if "data_b64" in body:
        return base64.b64decode(body["data_b64"])
    n = int(body["len"])
    if "fill" in body:
        return bytes([int(body["fill"]) & 0xFF]) * n
    if "seed" in body:
        return seeded_bytes(int(body["seed"]), n)
    raise ValueError("a write needs data_b64, or len with fill or seed")


def seeded_bytes(seed, n, first_mib=0):
    """Deterministic bytes: MiB i of the write is random.Random(seed * 1000003 + i).randbytes(...)."""
    out = bytearray()
    i = first_mib
    while len(out) < n:
        out += random.Random(seed * 1000003 + i).randbytes(min(MIB, n - len(out)))
        i += 1
    return bytes(out)


def apply_write(vm, body):
    idx = int(body.get("disk", 0))
    if not 0 <= idx < len(vm.disks):
        raise ValueError("no such disk")
    d = vm.disks[idx]
    offset = int(body["offset"])
    if "data_b64" in body:
        d.write(offset, write_bytes(body))
        return
    n = int(body["len"])
    pos = 0
    step = 32 * MIB
    while pos < n:
        k = min(step, n - pos)
        part = dict(body)
        part["len"] = k
        if "seed" in body:
            data = seeded_bytes(int(body["seed"]), k, pos // MIB)
        else:
            data = write_bytes(part)
        d.write(offset + pos, data)
        pos += k


# ---------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "Microsoft-HTTPAPI/2.0"
    sys_version = ""
    state = None
    quiet = False

    def setup(self):
        super().setup()
        self.ntlm = None  # the connection's pyspnego acceptor while authenticating or once authenticated
        self.user = None  # the connection's authenticated user (NTLM is connection-based)

    def log_message(self, fmt, *args):
        if not self.quiet:
            log(f"{self.address_string()} {fmt % args}")

    def send(self, status, body=b"", ctype="application/soap+xml;charset=UTF-8", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if body or status != 401:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def unauthorized(self, extra=()):
        hdrs = [("WWW-Authenticate", "Negotiate")]
        if self.server.tls:
            hdrs.append(("WWW-Authenticate", 'Basic realm="WSMAN"'))
        self.send(401, b"", headers=list(extra) + hdrs)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")

    def route(self, method):
        path = urlsplit(self.path).path
        if path.startswith("/_double/"):
            body = self.read_body()
            try:
                with self.state.lock:
                    status, doc = control(self.state, method, self.path, body)
            except (ValueError, KeyError, TypeError) as e:
                status, doc = 400, {"error": str(e)}
            raw = json.dumps(doc).encode()
            self.send(status, raw, "application/json")
            return
        if path.lower() != "/wsman" or method != "POST":
            self.read_body()
            self.send(404 if method == "GET" else 405, b"", "text/html")
            return
        self.wsman()

    def wsman(self):
        import spnego
        body = self.read_body()
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        out_token_header = []
        if scheme.lower() == "negotiate" and token:
            try:
                in_tok = base64.b64decode(token)
            except ValueError:
                return self.unauthorized()
            if self.ntlm is None or self.ntlm.complete or in_tok.startswith(b"NTLMSSP\0\x01") or in_tok[:1] == b"\x60":
                self.ntlm = spnego.server(protocol="negotiate", options=spnego.NegotiateOptions.wrapping_winrm if False else 0)
                self.user = None
            try:
                out = self.ntlm.step(in_tok)
            except Exception as e:
                log(f"authentication failed: {type(e).__name__}: {e}")
                self.ntlm = None
                self.user = None
                return self.unauthorized()
            if not self.ntlm.complete:
                return self.send(401, b"", headers=[("WWW-Authenticate", "Negotiate " + base64.b64encode(out or b"").decode())])
            user = self.state.user(str(self.ntlm.client_principal or ""))
            if user is None:
                self.ntlm = None
                return self.unauthorized()
            self.user = user
            if out:
                out_token_header = [("WWW-Authenticate", "Negotiate " + base64.b64encode(out).decode())]
        elif scheme.lower() == "basic":
            if not self.server.tls:
                return self.unauthorized()
            try:
                name, _, pw = base64.b64decode(token).decode("utf-8").partition(":")
            except ValueError:
                return self.unauthorized()
            user = self.state.user(name)
            if user is None or user["password"] != pw:
                return self.unauthorized()
            self.user = user
            self.ntlm = None
        elif scheme:
            return self.unauthorized()
        ctype = self.headers.get("Content-Type", "")
        encrypted = ctype.lower().startswith("multipart/encrypted")
        if self.user is None:
            # Identify answers without authentication; everything else needs it.
            if body and not encrypted and b"Identify" in body:
                try:
                    with self.state.lock:
                        _, resp = WsMan(self.state).handle(body, None)
                    if resp is not None and b"IdentifyResponse" in resp:
                        return self.send(200, resp)
                except WsFault:
                    pass
            return self.unauthorized()
        if not body:
            return self.send(200, b"", headers=out_token_header)
        sealed = self.ntlm is not None and self.ntlm.complete and auth_scheme_is_ntlm(self)
        if encrypted:
            if not sealed:
                return self.send(400, b"", headers=out_token_header)
            try:
                body = self.unseal(body, ctype)
            except Exception as e:
                log(f"cannot unseal: {type(e).__name__}: {e}")
                return self.send(400, b"", headers=out_token_header)
        elif sealed and not self.server.tls:
            return self.send(400, b"", headers=out_token_header)
        status, resp = self.process(body)
        if encrypted:
            payload, ct = self.seal(resp)
            return self.send(status, payload, ct, headers=out_token_header)
        return self.send(status, resp, headers=out_token_header)

    def process(self, body):
        ws = WsMan(self.state)
        msg_id = None
        try:
            m = re.search(rb"MessageID[^>]*>([^<]+)<", body)
            msg_id = m.group(1).decode().strip() if m else None
            with self.state.lock:
                _, resp = ws.handle(body, self.user)
            return 200, resp
        except WsFault as f:
            return f.http, fault_envelope(f, msg_id)
        except Exception as e:
            traceback.print_exc()
            return 500, fault_envelope(WsFault("w:InternalError", f"Internal error: {e}", 2150858782, sender=False), msg_id)

    BOUNDARY = b"--Encrypted Boundary"

    def unseal(self, body, ctype):
        if 'protocol="application/HTTP-SPNEGO-session-encrypted"' not in ctype:
            raise ValueError("unsupported encryption protocol")
        parts = [p for p in re.split(rb"--Encrypted Boundary\r\n", body) if p]
        out = b""
        for i in range(0, len(parts), 2):
            header = parts[i]
            m = re.search(rb"Length=(\d+)", header)
            if not m or i + 1 >= len(parts):
                raise ValueError("bad MIME parts")
            payload = parts[i + 1]
            if payload.endswith(b"--Encrypted Boundary--\r\n"):
                payload = payload[:-len(b"--Encrypted Boundary--\r\n")]
            prefix = b"\tContent-Type: application/octet-stream\r\n"
            if not payload.startswith(prefix):
                raise ValueError("bad MIME part header")
            data = payload[len(prefix):]
            slen = int.from_bytes(data[:4], "little")
            sig, enc = data[4:4 + slen], data[4 + slen:]
            plain = self.ntlm.unwrap_winrm(sig, enc)
            if len(plain) != int(m.group(1)):
                raise ValueError("length mismatch")
            out += plain
        return out

    def seal(self, message):
        w = self.ntlm.wrap_winrm(message)
        data = len(w.header).to_bytes(4, "little") + w.header + w.data
        payload = (b"--Encrypted Boundary\r\n\tContent-Type: application/HTTP-SPNEGO-session-encrypted\r\n"
                   b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length=" + str(len(message)).encode() +
                   b"\r\n--Encrypted Boundary\r\n\tContent-Type: application/octet-stream\r\n" + data +
                   b"--Encrypted Boundary--\r\n")
        return payload, 'multipart/encrypted;protocol="application/HTTP-SPNEGO-session-encrypted";boundary="Encrypted Boundary"'


def auth_scheme_is_ntlm(handler):
    return handler.ntlm is not None


# ---------------------------------------------------------------- control API

def vm_doc(state, vm):
    folder = state.local(vm.folder)
    files = []
    for dirpath, _, names in os.walk(folder):
        for n in names:
            local = os.path.join(dirpath, n)
            rel = os.path.relpath(local, folder).replace(os.sep, "\\")
            files.append({"path": f"{vm.folder}\\{rel}", "file": local, "size": os.path.getsize(local)})
    return {
        "id": vm.guid, "name": vm.name, "generation": vm.generation, "version": vm.version,
        "state": "running" if vm.running else "off", "cpus": vm.cpus, "memory_mib": vm.memory_mib,
        "disks": [{"index": d.index, "instance_id": f"Microsoft:{vm.guid}\\{d.ctrl_guid}\\{d.port}\\{d.lun}\\L",
                   "path": d.current_path, "file": state.local(d.current_path), "size_bytes": d.size, "format": d.fmt,
                   "controller": d.controller, "chain": [w for w, _ in d.chain], "rct_sequence": d.seq,
                   "rct_id_now": d.rct_id(d.seq)} for d in vm.disks],
        "checkpoints": [{"id": cp.guid, "instance_id": f"Microsoft:{cp.guid}", "type": cp.type,
                         "files": [cp.files[d.index] for d in vm.disks], "parent": cp.parent.guid if cp.parent else None}
                        for cp in vm.checkpoints],
        "reference_points": [{"id": rp.guid, "instance_id": f"Microsoft:{rp.guid}", "rct_ids": [rp.rct[d.index] for d in vm.disks]}
                             for rp in vm.refpoints],
        "files": sorted(files, key=lambda f: f["path"]),
    }


def control(state, method, raw_path, body):
    url = urlsplit(raw_path)
    parts = [p for p in url.path.split("/") if p][1:]
    qs = {k: v[-1] for k, v in parse_qs(url.query).items()}
    doc = json.loads(body) if body else None
    if method == "POST" and parts == ["vms"]:
        if not isinstance(doc, dict) or not doc.get("name"):
            raise ValueError("a VM needs a name")
        if doc.get("generation", 2) not in (1, 2):
            raise ValueError("generation is 1 or 2")
        if doc.get("state", "running") not in ("running", "off"):
            raise ValueError("state is running or off")
        for d in doc.get("disks", []):
            if d.get("format", "vhdx") not in ("vhdx", "vhd") or d.get("controller", "scsi") not in ("scsi", "ide"):
                raise ValueError("format is vhdx or vhd, controller scsi or ide")
            if d.get("controller") == "ide" and doc.get("generation", 2) == 2:
                raise ValueError("generation 2 VMs have no IDE controller")
            if int(d["size_bytes"]) % 512 or int(d["size_bytes"]) <= 0:
                raise ValueError("size_bytes must be a positive multiple of 512")
        if sum(1 for d in doc.get("disks", []) if d.get("controller") == "ide") > 4:
            raise ValueError("at most 4 IDE disks")
        if any(v.name.lower() == doc["name"].lower() for v in state.vms.values()):
            raise ValueError("a VM with that name exists")
        vm = Vm(state, doc)
        state.vms[vm.guid] = vm
        d = vm_doc(state, vm)
        return 201, {"id": vm.guid, "name": vm.name, "disks": [{"instance_id": x["instance_id"], "path": x["path"], "file": x["file"]} for x in d["disks"]]}
    if parts[:1] == ["vms"] and len(parts) >= 2:
        vm = state.vm_by_guid(parts[1])
        if vm is None:
            return 404, {"error": "no such VM"}
        rest = parts[2:]
        if method == "GET" and not rest:
            return 200, vm_doc(state, vm)
        if method == "POST" and rest == ["write"]:
            apply_write(vm, doc)
            return 200, {"ok": True, "rct_sequence": vm.disks[int(doc.get("disk", 0))].seq}
        if method == "POST" and rest == ["write_on_checkpoint"]:
            write_bytes(dict(doc, len=0) if "len" in doc else doc)
            vm.pending_writes.append(doc)
            return 200, {"ok": True, "pending": len(vm.pending_writes)}
        if method == "POST" and rest == ["invalidate_rct"]:
            for d in vm.disks:
                d.rct_guid = str(uuid.uuid4())
            return 200, {"ok": True}
        if method == "POST" and rest == ["state"]:
            vm.running = doc["state"] == "running"
            return 200, {"ok": True}
        if len(rest) == 3 and rest[0] == "disks" and method == "GET":
            d = vm.disks[int(rest[1])]
            if rest[2] == "sha256":
                h = hashlib.sha256()
                pos = 0
                while pos < d.size:
                    k = min(32 * MIB, d.size - pos)
                    h.update(d.read(pos, k))
                    pos += k
                return 200, {"sha256": h.hexdigest(), "size_bytes": d.size}
            if rest[2] == "read":
                off, n = int(qs.get("offset", 0)), int(qs["len"])
                if off < 0 or n < 0 or off + n > d.size:
                    raise ValueError("read past the end of the disk")
                return 200, {"data_b64": base64.b64encode(d.read(off, n)).decode()}
    if parts == ["faults"]:
        if method == "POST":
            items = doc if isinstance(doc, list) else [doc]
            for f in items:
                if not isinstance(f, dict) or "method" not in f or not ({"return_value", "job_error", "polls"} & set(f)):
                    raise ValueError("a fault is {method, return_value | job_error | polls, times}")
                f.setdefault("times", 1)
                state.faults.append(f)
            return 200, {"faults": state.faults}
        if method == "DELETE":
            state.faults.clear()
            return 200, {"faults": []}
    if parts == ["requests"]:
        if method == "GET":
            return 200, {"requests": state.requests}
        if method == "DELETE":
            state.requests.clear()
            return 200, {"requests": []}
    if parts == ["state"] and method == "GET":
        return 200, {"vms": [vm_doc(state, v) for v in state.vms.values()],
                     "jobs": [state.job_inst(j)[1] for j in state.jobs.values()]}
    return 404, {"error": f"no control route {method} {url.path}"}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls = False

    def get_request(self):
        sock, addr = super().get_request()
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds
        # the body until the client's delayed ACK (~40 ms a request), which Windows does not.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr


class TlsHandler(Handler):
    def setup(self):
        # The handshake happens in the request's own thread, not in accept().
        self.request.do_handshake()
        super().setup()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host-name", default="HV01")
    parser.add_argument("--users")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--job-polls", type=int, default=1)
    parser.add_argument("--changes-max", type=int, default=4)
    parser.add_argument("--page-size", type=int, default=2)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.page_size < 1 or args.changes_max < 1 or args.job_polls < 0:
        parser.error("--page-size and --changes-max must be >= 1, --job-polls >= 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    os.makedirs(args.state_dir, exist_ok=True)
    state = State(args)
    base = TlsHandler if args.tls_cert else Handler
    handler = type("BoundHandler", (base,), {"state": state, "quiet": args.quiet})
    server = Server(("127.0.0.1", args.port), handler)
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        server.tls = True

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scheme = "https" if server.tls else "http"
    print(f"READY {scheme}://127.0.0.1:{server.server_address[1]}/wsman", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        try:
            os.remove(state.ntlm_file)
        except OSError:
            pass


if __name__ == "__main__":
    main()
