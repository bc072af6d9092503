#!/usr/bin/env python3
"""Checks of the Hyper-V double: its VHDX/VHD library against qemu-img and rehost, and its
WS-Management answers with REAL clients (pypsrp's WSMan, pywinrm's Protocol) over NTLM with
message sealing (HTTP) and over HTTPS. Run with the venv's python (install.sh):
    $REHOST_EMULATOR_HOME/hyperv-venv/bin/python test_double.py"""

import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest
import urllib.request
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import double  # noqa: E402
import vhdimage  # noqa: E402

MIB = 1 << 20
USER, PASSWORD = "Administrator", "Hv-Passw0rd!"
V2 = double.V2
NSS = {"s": double.NS["s"], "n": double.NS["n"], "w": double.NS["w"], "a": double.NS["a"]}


class DoubleProcess:
    def __init__(self, *extra, tls=False):
        self.dir = tempfile.mkdtemp(prefix="hyperv-double-")
        args = [sys.executable, os.path.join(HERE, "double.py"), "--state-dir", os.path.join(self.dir, "state"),
                "--port", "0", "--quiet", *extra]
        if tls:
            cert, key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                            "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                           check=True, capture_output=True)
            args += ["--tls-cert", cert, "--tls-key", key]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line.startswith("READY "), line
        self.url = line.split()[1]
        self.base = self.url.rsplit("/", 1)[0]
        self.port = int(self.base.rsplit(":", 1)[1])

    def ctl(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + "/_double/" + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        import ssl
        ctx = ssl._create_unverified_context()
        try:
            with urllib.request.urlopen(req, context=ctx) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def wsman_client(d, password=PASSWORD, ssl=False, auth="negotiate", encryption="auto"):
    from pypsrp.wsman import WSMan
    return WSMan("127.0.0.1", port=d.port, ssl=ssl, username=USER, password=password, auth=auth,
                 cert_validation=False, encryption=encryption)


def wql_filter(query):
    from pypsrp.wsman import NAMESPACES
    en = ET.Element("{%s}Enumerate" % NAMESPACES["wsen"])
    ET.SubElement(en, "{%s}OptimizeEnumeration" % NAMESPACES["wsman"])
    ET.SubElement(en, "{%s}MaxElements" % NAMESPACES["wsman"]).text = "32000"
    f = ET.SubElement(en, "{%s}Filter" % NAMESPACES["wsman"], Dialect=double.WQL)
    f.text = query
    return en


def enumerate_all(ws, uri, resource):
    """Enumerate then Pull until the end, as a real client does; returns the item elements."""
    from pypsrp.wsman import NAMESPACES
    body = ws.enumerate(uri, resource)
    items = list(body.find("n:EnumerateResponse/w:Items", NSS) or [])
    end = body.find("n:EnumerateResponse/w:EndOfSequence", NSS) is not None
    ctx = body.findtext("n:EnumerateResponse/n:EnumerationContext", namespaces=NSS)
    while not end:
        pull = ET.Element("{%s}Pull" % NAMESPACES["wsen"])
        ET.SubElement(pull, "{%s}EnumerationContext" % NAMESPACES["wsen"]).text = ctx
        ET.SubElement(pull, "{%s}MaxElements" % NAMESPACES["wsen"]).text = "32000"
        body = ws.pull(uri, pull)
        items += list(body.find("n:PullResponse/n:Items", NSS) or [])
        end = body.find("n:PullResponse/n:EndOfSequence", NSS) is not None
        ctx = body.findtext("n:PullResponse/n:EnumerationContext", namespaces=NSS)
    return items


def prop(el, name):
    for c in el:
        if c.tag.endswith("}" + name):
            return c.text
    return None


def epr(cls, **sel):
    from pypsrp.wsman import NAMESPACES
    a, w = NAMESPACES["wsa"], NAMESPACES["wsman"]
    def build(parent_tag):
        e = ET.Element(parent_tag)
        ET.SubElement(e, "{%s}Address" % a).text = double.ANON
        rp = ET.SubElement(e, "{%s}ReferenceParameters" % a)
        ET.SubElement(rp, "{%s}ResourceURI" % w).text = V2 + cls
        ss = ET.SubElement(rp, "{%s}SelectorSet" % w)
        for k, v in sel.items():
            ET.SubElement(ss, "{%s}Selector" % w, Name=k).text = v
        return e
    return build


def snapshot_service_selectors():
    from pypsrp.wsman import SelectorSet
    s = SelectorSet()
    s.add_option("CreationClassName", "Msvm_VirtualSystemSnapshotService")
    s.add_option("Name", "vssnapsvc")
    s.add_option("SystemCreationClassName", "Msvm_ComputerSystem")
    s.add_option("SystemName", "HV01")
    return s


def invoke(ws, cls, method, selectors, params):
    """params: [(name, text | callable building an EPR element)]"""
    uri = V2 + cls
    inp = ET.Element("{%s}%s_INPUT" % (uri, method))
    for name, v in params:
        if callable(v):
            inp.append(v("{%s}%s" % (uri, name)))
        else:
            ET.SubElement(inp, "{%s}%s" % (uri, name)).text = v
    body = ws.invoke(uri + "/" + method, uri, inp, selector_set=selectors)
    return body.find("s:Body/{%s}%s_OUTPUT" % (uri, method), NSS)


def wait_job(ws, out):
    from pypsrp.wsman import SelectorSet
    rv = prop(out, "ReturnValue")
    if rv != "4096":
        return rv, None
    job = [c for c in out if c.tag.endswith("}Job")][0]
    jid = job.find(".//w:Selector", NSS).text
    s = SelectorSet()
    s.add_option("InstanceID", jid)
    states = []
    while True:
        j = ws.get(V2 + "Msvm_ConcreteJob", selector_set=s)[0]
        states.append(prop(j, "JobState"))
        if prop(j, "JobState") not in ("3", "4"):
            return states, jid


class VhdLibrary(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_4gib_disk_with_2gib_is_quick(self):
        import time
        t = time.time()
        img = vhdimage.Vhdx.create(os.path.join(self.dir, "big.vhdx"), 4096 * MIB)
        chunk = b"\x5a" * (32 * MIB)
        for i in range(64):
            img.write(i * 64 * MIB, chunk)
        img.close()
        self.assertLess(time.time() - t, 30)

    def test_crc32c(self):
        self.assertEqual(vhdimage.crc32c(b"123456789"), 0xE3069283)

    def test_dynamic_vhdx_against_qemu(self):
        if not shutil.which("qemu-img"):
            self.skipTest("qemu-img missing")
        p = os.path.join(self.dir, "a.vhdx")
        img = vhdimage.Vhdx.create(p, 96 * MIB)
        ref = bytearray(96 * MIB)
        r = random.Random(3)
        for off, n in ((0, MIB), (33 * MIB + 512, 4096), (95 * MIB, MIB)):
            data = r.randbytes(n)
            img.write(off, data)
            ref[off:off + n] = data
        img.close()
        raw = os.path.join(self.dir, "a.raw")
        with open(raw, "wb") as f:
            f.write(ref)
        subprocess.run(["qemu-img", "check", p], check=True, capture_output=True)
        subprocess.run(["qemu-img", "compare", "-f", "vhdx", "-F", "raw", p, raw], check=True, capture_output=True)

    def test_differencing_vhdx_against_rehost(self):
        rehost = os.environ.get("REHOST_BIN", "/tmp/rehost-bin")
        base = vhdimage.Vhdx.create(os.path.join(self.dir, "b.vhdx"), 64 * MIB)
        ref = bytearray(64 * MIB)
        base.write(0, b"\x01" * (3 * MIB))
        ref[0:3 * MIB] = b"\x01" * (3 * MIB)
        child = vhdimage.Vhdx.create(os.path.join(self.dir, "b_X.avhdx"), 64 * MIB, block_size=2 * MIB, parent=base,
                                     parent_paths={"relative_path": ".\\b.vhdx", "absolute_win32_path": "C:\\x\\b.vhdx"})
        child.write(MIB + 512, b"\x02" * 1024)
        ref[MIB + 512:MIB + 1536] = b"\x02" * 1024
        self.assertEqual(child.read(0, 64 * MIB), bytes(ref))
        self.assertEqual(child.own_ranges(), [(MIB + 512, 1024)])
        if os.path.exists(rehost):
            out = subprocess.run([rehost, "disk", "checksum", child.path], check=True, capture_output=True, text=True).stdout
            self.assertIn(hashlib.sha256(ref).hexdigest(), out)
        child.close()
        base.close()


class Wql(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(double.parse_wql('SELECT * FROM Msvm_X WHERE A = "v" AND b LIKE \'p%\''),
                         ("Msvm_X", [("A", "=", "v"), ("b", "LIKE", "p%")]))
        for bad in ("SELECT Name FROM X", "SELECT * FROM X WHERE A > 1", "SELECT * FROM X WHERE A = 1 OR B = 2", "DELETE"):
            with self.assertRaises(double.WsFault):
                double.parse_wql(bad)


class Protocol(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = DoubleProcess()
        st, cls.vm = cls.d.ctl("POST", "vms", {"name": "web01", "generation": 2, "cpus": 2, "memory_mib": 1024,
                                                "disks": [{"size_bytes": 256 * MIB}, {"size_bytes": 64 * MIB}]})
        assert st == 201, cls.vm
        cls.d.ctl("POST", f"vms/{cls.vm['id']}/write", {"disk": 0, "offset": 0, "len": 5 * MIB, "seed": 7})

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def test_enumerate_get_snapshot_cycle_ntlm_sealed(self):
        from pypsrp.wsman import SelectorSet
        ws = wsman_client(self.d)
        items = enumerate_all(ws, V2 + "*", wql_filter('SELECT * FROM Msvm_ComputerSystem WHERE Caption = "Virtual Machine"'))
        self.assertEqual([prop(i, "Name") for i in items], [self.vm["id"]])
        s = SelectorSet()
        s.add_option("CreationClassName", "Msvm_ComputerSystem")
        s.add_option("Name", self.vm["id"])
        got = ws.get(V2 + "Msvm_ComputerSystem", selector_set=s)[0]
        self.assertEqual(prop(got, "ElementName"), "web01")
        # paging: 1 settings + processor + memory + controller + 2x(drive + disk) = 8 items, 2 per answer
        comps = enumerate_all(ws, "http://schemas.dmtf.org/wbem/wscim/1/*", self.assoc(self.vm["id"]))
        self.assertEqual(len(comps), 7)
        before = self.d.ctl("GET", f"vms/{self.vm['id']}/disks/0/sha256")[1]["sha256"]
        self.d.ctl("POST", f"vms/{self.vm['id']}/write_on_checkpoint", {"disk": 0, "offset": 4096, "len": 8192, "fill": 9})
        out = invoke(ws, "Msvm_VirtualSystemSnapshotService", "CreateSnapshot", snapshot_service_selectors(), [
            ("AffectedSystem", epr("Msvm_ComputerSystem", CreationClassName="Msvm_ComputerSystem", Name=self.vm["id"])),
            ("SnapshotSettings", '<INSTANCE CLASSNAME="Msvm_VirtualSystemSnapshotSettingData"><PROPERTY NAME="ConsistencyLevel" TYPE="uint8"><VALUE>2</VALUE></PROPERTY></INSTANCE>'),
            ("SnapshotType", "32768")])
        states, jid = wait_job(ws, out)
        self.assertEqual(states, ["4", "7"])
        snaps = enumerate_all(ws, "http://schemas.dmtf.org/wbem/wscim/1/*", self.job_assoc(jid, "Msvm_VirtualSystemSettingData"))
        self.assertEqual(len(snaps), 1)
        self.assertEqual(prop(snaps[0], "VirtualSystemType"), "Microsoft:Hyper-V:Snapshot:Recovery")
        snap_iid = prop(snaps[0], "InstanceID")
        info = self.d.ctl("GET", f"vms/{self.vm['id']}")[1]
        self.assertTrue(info["disks"][0]["path"].endswith(".avhdx"))
        frozen = info["checkpoints"][0]["files"][0]
        self.assertTrue(frozen.endswith("web01.vhdx"))
        after = self.d.ctl("GET", f"vms/{self.vm['id']}/disks/0/sha256")[1]["sha256"]
        self.assertNotEqual(before, after)
        # the frozen file still holds the checkpoint's contents
        local = info["checkpoints"] and self.local(frozen)
        img = vhdimage.Vhdx(local)
        self.assertEqual(hashlib.sha256(img.read(0, 256 * MIB)).hexdigest(), before)
        img.close()
        out = invoke(ws, "Msvm_VirtualSystemSnapshotService", "DestroySnapshot", snapshot_service_selectors(), [
            ("AffectedSnapshot", epr("Msvm_VirtualSystemSettingData", InstanceID=snap_iid))])
        states, _ = wait_job(ws, out)
        self.assertEqual(states[-1], "7")
        info = self.d.ctl("GET", f"vms/{self.vm['id']}")[1]
        self.assertEqual(info["checkpoints"], [])
        self.assertFalse(any(f["path"].endswith(".avhdx") for f in info["files"]))
        self.assertEqual(self.d.ctl("GET", f"vms/{self.vm['id']}/disks/0/sha256")[1]["sha256"], after)
        with open(self.local(info["disks"][0]["path"]), "rb"):
            pass
        if shutil.which("qemu-img"):
            subprocess.run(["qemu-img", "check", self.local(info["disks"][0]["path"])], check=True, capture_output=True)

    def local(self, win):
        return os.path.join(self.d.dir, "state", "C", *win[3:].split("\\"))

    def assoc(self, vm_id):
        from pypsrp.wsman import NAMESPACES
        return self._assoc(epr("Msvm_VirtualSystemSettingData", InstanceID=f"Microsoft:{vm_id}"),
                           "Msvm_VirtualSystemSettingDataComponent", "")

    def job_assoc(self, jid, result):
        b = double.NS["b"]
        del b
        return self._assoc(epr("Msvm_ConcreteJob", InstanceID=jid), "Msvm_AffectedJobElement", result)

    def _assoc(self, obj, assoc, result):
        from pypsrp.wsman import NAMESPACES
        b = double.NS["b"]
        en = ET.Element("{%s}Enumerate" % NAMESPACES["wsen"])
        ET.SubElement(en, "{%s}OptimizeEnumeration" % NAMESPACES["wsman"])
        ET.SubElement(en, "{%s}MaxElements" % NAMESPACES["wsman"]).text = "32000"
        f = ET.SubElement(en, "{%s}Filter" % NAMESPACES["wsman"], Dialect=double.ASSOC_DIALECT)
        ai = ET.SubElement(f, "{%s}AssociatedInstances" % b)
        ai.append(obj("{%s}Object" % b))
        ET.SubElement(ai, "{%s}AssociationClassName" % b).text = assoc
        if result:
            ET.SubElement(ai, "{%s}ResultClassName" % b).text = result
        return en

    def test_wrong_password_is_401(self):
        from pypsrp.exceptions import AuthenticationError
        ws = wsman_client(self.d, password="nope")
        with self.assertRaises(AuthenticationError):
            ws.enumerate(V2 + "Msvm_ComputerSystem")

    def test_bad_wql_is_a_fault(self):
        from pypsrp.exceptions import WSManFaultError
        ws = wsman_client(self.d)
        with self.assertRaises(WSManFaultError) as cm:
            ws.enumerate(V2 + "*", wql_filter("SELECT Name FROM Msvm_ComputerSystem"))
        self.assertEqual(cm.exception.code, 2150858778)

    def test_pywinrm_raw_enumerate(self):
        import winrm
        p = winrm.Protocol(self.d.url, transport="ntlm", username=USER, password=PASSWORD, message_encryption="always")
        msg = (f'<s:Envelope xmlns:s="{double.NS["s"]}" xmlns:a="{double.NS["a"]}" xmlns:w="{double.NS["w"]}" xmlns:n="{double.NS["n"]}">'
               f'<s:Header><a:To>{self.d.url}</a:To><w:ResourceURI>{V2}*</w:ResourceURI>'
               f'<a:ReplyTo><a:Address>{double.ANON}</a:Address></a:ReplyTo>'
               f'<a:Action>{double.A_ENUM}</a:Action><a:MessageID>uuid:11111111-2222-3333-4444-555555555555</a:MessageID></s:Header>'
               f'<s:Body><n:Enumerate><w:OptimizeEnumeration/><w:MaxElements>10</w:MaxElements>'
               f'<w:Filter Dialect="{double.WQL}">SELECT * FROM Msvm_VirtualSystemSettingData WHERE VirtualSystemIdentifier = "{self.vm["id"]}"</w:Filter>'
               f'</n:Enumerate></s:Body></s:Envelope>')
        resp = p.transport.send_message(msg)
        root = ET.fromstring(resp)
        items = root.find("s:Body/n:EnumerateResponse/w:Items", NSS)
        self.assertEqual(len(items), 1)
        bad = winrm.Protocol(self.d.url, transport="ntlm", username=USER, password="wrong", message_encryption="always")
        with self.assertRaises(winrm.exceptions.InvalidCredentialsError):
            bad.transport.send_message(msg)

    def test_unsealed_body_after_ntlm_is_400(self):
        import requests
        from requests_ntlm import HttpNtlmAuth
        s = requests.Session()
        s.auth = HttpNtlmAuth(USER, PASSWORD)
        r = s.post(self.d.url, data=b"", headers={"Content-Type": "application/soap+xml;charset=UTF-8"})
        self.assertEqual(r.status_code, 200)
        s.auth = None
        r = s.post(self.d.url, data=b"<s:Envelope/>", headers={"Content-Type": "application/soap+xml;charset=UTF-8"})
        self.assertEqual(r.status_code, 400)
        self.assertEqual(r.content, b"")

    def test_identify_needs_no_auth(self):
        body = f'<s:Envelope xmlns:s="{double.NS["s"]}" xmlns:wsmid="{double.NS["wsmid"]}"><s:Header/><s:Body><wsmid:Identify/></s:Body></s:Envelope>'
        req = urllib.request.Request(self.d.url, data=body.encode(), headers={"Content-Type": "application/soap+xml;charset=UTF-8"})
        with urllib.request.urlopen(req) as r:
            self.assertIn(b"OS: 10.0.17763 SP: 0.0 Stack: 3.0", r.read())


class RctAndReferencePoints(unittest.TestCase):
    """Full backup then incremental, as Microsoft's backup sample does, through pypsrp."""

    @classmethod
    def setUpClass(cls):
        cls.d = DoubleProcess("--job-polls", "0", "--changes-max", "2")

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def snapshot(self, ws, vm_id):
        out = invoke(ws, "Msvm_VirtualSystemSnapshotService", "CreateSnapshot", snapshot_service_selectors(), [
            ("AffectedSystem", epr("Msvm_ComputerSystem", CreationClassName="Msvm_ComputerSystem", Name=vm_id)),
            ("SnapshotType", "32768")])
        states, jid = wait_job(ws, out)
        self.assertEqual(states, ["7"])
        snaps = enumerate_all(ws, "http://schemas.dmtf.org/wbem/wscim/1/*",
                              Protocol._assoc(None, epr("Msvm_ConcreteJob", InstanceID=jid), "Msvm_AffectedJobElement", "Msvm_VirtualSystemSettingData"))
        return prop(snaps[0], "InstanceID")

    def convert(self, ws, snap_iid):
        out = invoke(ws, "Msvm_VirtualSystemSnapshotService", "ConvertToReferencePoint", snapshot_service_selectors(), [
            ("AffectedSnapshot", epr("Msvm_VirtualSystemSettingData", InstanceID=snap_iid))])
        rv = prop(out, "ReturnValue")
        if rv != "4096":
            return rv
        _, jid = wait_job(ws, out)
        rps = enumerate_all(ws, "http://schemas.dmtf.org/wbem/wscim/1/*",
                            Protocol._assoc(None, epr("Msvm_ConcreteJob", InstanceID=jid), "Msvm_AffectedJobElement", "Msvm_VirtualSystemReferencePoint"))
        return [c.text for c in rps[0] if c.tag.endswith("}ResilientChangeTrackingIdentifiers")]

    def changes(self, ws, path, limit, offset, length):
        from pypsrp.wsman import SelectorSet
        s = SelectorSet()
        s.add_option("CreationClassName", "Msvm_ImageManagementService")
        s.add_option("Name", "vhdsvc")
        s.add_option("SystemCreationClassName", "Msvm_ComputerSystem")
        s.add_option("SystemName", "HV01")
        out = invoke(ws, "Msvm_ImageManagementService", "GetVirtualDiskChanges", s, [
            ("Path", path), ("LimitId", limit), ("TargetSnapshotId", ""), ("ByteOffset", str(offset)), ("ByteLength", str(length))])
        rv = prop(out, "ReturnValue")
        offs = [int(c.text) for c in out if c.tag.endswith("}ChangedByteOffsets") and c.text]
        lens = [int(c.text) for c in out if c.tag.endswith("}ChangedByteLengths") and c.text]
        return rv, list(zip(offs, lens)), prop(out, "ProcessedByteLength")

    def test_full_then_incremental(self):
        st, vm = self.d.ctl("POST", "vms", {"name": "db01", "disks": [{"size_bytes": 128 * MIB}]})
        ws = wsman_client(self.d)
        self.d.ctl("POST", f"vms/{vm['id']}/write", {"disk": 0, "offset": 0, "len": 2 * MIB, "seed": 1})
        snap = self.snapshot(ws, vm["id"])
        rct = self.convert(ws, snap)
        self.assertEqual(len(rct), 1)
        self.assertRegex(rct[0], r"^rctX:[0-9a-f]{8}:[0-9a-f]{4}:[0-9a-f]{4}:[0-9a-f]{4}:[0-9a-f]{12}:[0-9a-f]{8}$")
        for off in (10 * MIB + 100, 20 * MIB, 30 * MIB, 40 * MIB, 100 * MIB):
            self.d.ctl("POST", f"vms/{vm['id']}/write", {"disk": 0, "offset": off, "len": 1000, "fill": 5})
        snap2 = self.snapshot(ws, vm["id"])
        path = self.d.ctl("GET", f"vms/{vm['id']}")[1]["checkpoints"][0]["files"][0]
        ranges, at = [], 0
        while at < 128 * MIB:
            rv, got, processed = self.changes(ws, path, rct[0], at, 128 * MIB - at)
            self.assertEqual(rv, "0")
            ranges += got
            at += int(processed)
        g = 64 * 1024
        self.assertEqual(ranges, [(10 * MIB, g), (20 * MIB, g), (30 * MIB, g), (40 * MIB, g), (100 * MIB, g)])
        self.assertEqual(self.changes(ws, path, rct[0], 0, 129 * MIB)[0], "32773")
        self.assertEqual(self.changes(ws, path, "rctX:00000000:0000:0000:0000:000000000000:00000001", 0, MIB)[0], "32773")
        self.d.ctl("POST", f"vms/{vm['id']}/invalidate_rct")
        self.assertEqual(self.changes(ws, path, rct[0], 0, MIB)[0], "32773")
        rct2 = self.convert(ws, snap2)
        self.assertEqual(len(rct2), 1)

    def test_old_version_has_no_rct(self):
        st, vm = self.d.ctl("POST", "vms", {"name": "old01", "version": "5.0", "disks": [{"size_bytes": 16 * MIB}]})
        ws = wsman_client(self.d)
        snap = self.snapshot(ws, vm["id"])
        self.assertEqual(self.convert(ws, snap), "32770")

    def test_faults_and_access(self):
        st, vm = self.d.ctl("POST", "vms", {"name": "flt01", "disks": [{"size_bytes": 16 * MIB}]})
        ws = wsman_client(self.d)
        self.d.ctl("POST", "faults", [{"method": "CreateSnapshot", "return_value": 32775, "times": 1}])
        out = invoke(ws, "Msvm_VirtualSystemSnapshotService", "CreateSnapshot", snapshot_service_selectors(), [
            ("AffectedSystem", epr("Msvm_ComputerSystem", CreationClassName="Msvm_ComputerSystem", Name=vm["id"])),
            ("SnapshotType", "2")])
        self.assertEqual(prop(out, "ReturnValue"), "32775")
        self.d.ctl("POST", "faults", {"method": "CreateSnapshot", "job_error": "disk busy"})
        out = invoke(ws, "Msvm_VirtualSystemSnapshotService", "CreateSnapshot", snapshot_service_selectors(), [
            ("AffectedSystem", epr("Msvm_ComputerSystem", CreationClassName="Msvm_ComputerSystem", Name=vm["id"])),
            ("SnapshotType", "2")])
        states, _ = wait_job(ws, out)
        self.assertEqual(states, ["10"])
        reqs = self.d.ctl("GET", "requests")[1]["requests"]
        self.assertTrue(any(r["method"] == "CreateSnapshot" for r in reqs))


class Https(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        users = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump({"users": [{"name": "viewer", "password": "View-Passw0rd!", "admin": False}]}, users)
        users.close()
        cls.users = users.name
        cls.d = DoubleProcess("--users", users.name, tls=True)

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        os.remove(cls.users)

    def test_ntlm_and_basic_over_https(self):
        for auth in ("negotiate", "basic"):
            ws = wsman_client(self.d, ssl=True, auth=auth)
            items = enumerate_all(ws, V2 + "Msvm_ComputerSystem", None)
            self.assertEqual(len(items), 1)  # the host
        from pypsrp.exceptions import AuthenticationError
        with self.assertRaises(AuthenticationError):
            enumerate_all(wsman_client(self.d, ssl=True, auth="basic", password="bad"), V2 + "Msvm_ComputerSystem", None)

    def test_non_admin_is_access_denied(self):
        from pypsrp.wsman import WSMan
        from pypsrp.exceptions import WSManFaultError
        ws = WSMan("127.0.0.1", port=self.d.port, ssl=True, username="viewer", password="View-Passw0rd!",
                   auth="negotiate", cert_validation=False)
        with self.assertRaises(WSManFaultError) as cm:
            ws.enumerate(V2 + "Msvm_ComputerSystem")
        self.assertEqual(cm.exception.code, 5)


if __name__ == "__main__":
    unittest.main(verbosity=2)
