#!/usr/bin/env python3
"""Checks of the Azure double's semantics, with nothing but urllib (python3 test_double.py).

The double runs as a subprocess on port 0. The helpers at the top (DoubleProcess,
AzureClient) are reused by check_against_azurite.py."""

import base64
import json
import os
import random
import re
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import unittest
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from types import SimpleNamespace
from http.client import IncompleteRead

HERE = os.path.dirname(os.path.abspath(__file__))
DOUBLE = os.path.join(HERE, "double.py")
sys.path.insert(0, HERE)
import double  # noqa: E402  (pure functions: CHS geometry, intervals)

TENANT = "00000000-0000-0000-0000-0000000000aa"
CLIENT = "11111111-1111-1111-1111-111111111111"
SECRET = "double-secret"
SUB = "22222222-2222-2222-2222-222222222222"
DISK_API = "2024-03-02"
VM_API = "2024-07-01"
MIB = 1 << 20


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def xml(self):
        return ET.fromstring(self.body)

    def __repr__(self):
        return f"<Resp {self.status} {self.body[:300]!r}>"


def http(method, url, body=None, headers=None, context=None):
    """One request; every status comes back as a Resp (urllib raises for >= 400)."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, context=context) as r:
            return Resp(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Resp(e.code, e.headers, e.read())


class DoubleProcess:
    """The double as a subprocess; .base is its URL."""

    def __init__(self, *args, config=None):
        self.dir = tempfile.mkdtemp(prefix="azure-double-")
        cmd = [sys.executable, DOUBLE, "--state-dir", os.path.join(self.dir, "state"), *args]
        if config is not None:
            path = os.path.join(self.dir, "config.json")
            with open(path, "w") as f:
                json.dump(config, f)
            cmd += ["--config", path]
        self.log = open(os.path.join(self.dir, "stderr.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"double did not start: {line!r}")
        self.base = line.split()[1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class AzureClient:
    """Just enough of an Azure client to drive the double."""

    def __init__(self, base, tenant=TENANT, client=CLIENT, secret=SECRET, sub=SUB):
        self.base, self.tenant, self.client, self.secret, self.sub = base, tenant, client, secret, sub

    # control API
    def ctl(self, method, path, body=None):
        r = http(method, self.base + "/_double/" + path, body)
        if r.status != 200:
            raise AssertionError(f"control {method} {path}: {r}")
        return r.json() if r.headers.get("Content-Type", "").startswith("application/json") else r.body

    def create_vm(self, rg, name, disks, **extra):
        doc = {"subscription": self.sub, "resource_group": rg, "name": name, "disks": disks, **extra}
        return self.ctl("POST", "vms", doc)

    def write(self, disk_id, offset, data):
        self.ctl("POST", "disks/write", {"disk_id": disk_id, "offset": offset, "data_b64": base64.b64encode(data).decode()})

    def clear(self, disk_id, offset, length):
        self.ctl("POST", "disks/clear", {"disk_id": disk_id, "offset": offset, "length": length})

    def read_live(self, disk_id, offset, length):
        q = urllib.parse.urlencode({"disk_id": disk_id, "offset": offset, "length": length})
        return self.ctl("GET", "disks/read?" + q)

    # Entra / ARM
    def token_request(self, form, tenant=None, content_type="application/x-www-form-urlencoded"):
        body = urllib.parse.urlencode(form).encode() if isinstance(form, dict) else form
        return http(
            "POST",
            f"{self.base}/{tenant or self.tenant}/oauth2/v2.0/token",
            body,
            {"Content-Type": content_type},
        )

    def token(self):
        r = self.token_request(
            {
                "grant_type": "client_credentials",
                "client_id": self.client,
                "client_secret": self.secret,
                "scope": "https://management.azure.com/.default",
            }
        )
        assert r.status == 200, r
        return r.json()["access_token"]

    def arm(self, method, path, body=None, api=DISK_API, token=None, headers=None):
        url = path if path.startswith("http") else self.base + path
        if api is not None:
            url += ("&" if "?" in url else "?") + "api-version=" + api
        h = {"Authorization": "Bearer " + (token or self.token()), **(headers or {})}
        return http(method, url, body, h)

    def rg_path(self, rg, rtype, name=""):
        return f"/subscriptions/{self.sub}/resourceGroups/{rg}/providers/Microsoft.Compute/{rtype}" + (
            f"/{name}" if name else ""
        )

    def put_snapshot(self, rg, name, disk_id, location="westeurope", incremental=True, **extra):
        body = {
            "location": location,
            "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk_id}, "incremental": incremental},
            **extra,
        }
        return self.arm("PUT", self.rg_path(rg, "snapshots", name), body)

    def wait(self, resp, via="Azure-AsyncOperation", limit=20):
        """Poll an LRO to its end; the last poll's Resp."""
        url = resp.headers[via]
        for _ in range(limit):
            r = self.arm("GET", url, api=None)
            if via == "Location" and r.status != 202:
                return r
            if via != "Location" and r.json()["status"] != "InProgress":
                return r
        raise AssertionError("operation never finished")

    def snapshot(self, rg, name, disk_id, **kw):
        r = self.put_snapshot(rg, name, disk_id, **kw)
        assert r.status in (200, 202), r
        done = self.wait(r)
        assert done.json()["status"] == "Succeeded", done
        return r.json()["id"]

    def grant(self, rg, name, seconds=3600):
        r = self.arm("POST", self.rg_path(rg, "snapshots", name) + "/beginGetAccess", {"access": "Read", "durationInSeconds": seconds})
        assert r.status == 202, r
        done = self.wait(r, "Location")
        assert done.status == 200, done
        return done.json()["accessSAS"]

    def revoke(self, rg, name):
        r = self.arm("POST", self.rg_path(rg, "snapshots", name) + "/endGetAccess")
        assert r.status == 202, r
        return self.wait(r, "Location")


def page_list(sas, version=None, prev=None, marker=None, maxresults=None, range_=None):
    """(entries, next_marker or None, Resp): entries are (tag, start, end inclusive)."""
    url = sas + "&comp=pagelist"
    if marker:
        url += "&marker=" + urllib.parse.quote(marker, safe="")
    if maxresults is not None:
        url += f"&maxresults={maxresults}"
    headers = {}
    if version:
        headers["x-ms-version"] = version
    if prev:
        headers["x-ms-previous-snapshot-url"] = prev
    if range_:
        headers["x-ms-range"] = range_
    r = http("GET", url, headers=headers)
    if r.status != 200:
        return None, None, r
    root = r.xml()
    entries = [(el.tag, int(el.find("Start").text), int(el.find("End").text)) for el in root if el.tag in ("PageRange", "ClearRange")]
    nm = root.find("NextMarker")
    return entries, (nm.text if nm is not None and nm.text else None), r


def all_pages(sas, **kw):
    out, marker = [], None
    while True:
        entries, marker, r = page_list(sas, marker=marker, **kw)
        assert entries is not None, r
        out += entries
        if not marker:
            return out


def merged(entries, tag="PageRange"):
    """Ranges of one tag as merged half-open pairs."""
    out = []
    for t, s, e in entries:
        if t != tag:
            continue
        if out and out[-1][1] == s:
            out[-1][1] = e + 1
        else:
            out.append([s, e + 1])
    return out


def ranges_of(pages):
    """Merged half-open byte ranges of a set of page indices."""
    out = []
    for p in sorted(pages):
        if out and out[-1][1] == p * 512:
            out[-1][1] += 512
        else:
            out.append([p * 512, p * 512 + 512])
    return out


def blob_get(sas, start=None, end=None, header="x-ms-range", extra=None):
    headers = dict(extra or {})
    if start is not None:
        headers[header] = f"bytes={start}-{'' if end is None else end}"
    return http("GET", sas, headers=headers)


def error_code_xml(r):
    return r.xml().find("Code").text


class DoubleTest(unittest.TestCase):
    """One double shared by the tests; each uses its own resource group."""

    @classmethod
    def setUpClass(cls):
        cls.d = DoubleProcess("--retry-after", "0")
        cls.az = AzureClient(cls.d.base)

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()

    def setUp(self):
        http("DELETE", self.d.base + "/_double/faults")
        self.az.ctl("POST", "settings", {"lro_polls": 1, "page_size": 2, "pagelist_max": 50, "token_lifetime": 3599})

    def vm(self, rg, name="vm", sizes=(4 * MIB,), **extra):
        disks = [{"name": f"{name}-disk{i}", "lun": None if i == 0 else i - 1, "size_bytes": s} for i, s in enumerate(sizes)]
        vm = self.az.create_vm(rg, name, disks, **extra)
        profile = vm["properties"]["storageProfile"]
        return vm, [profile["osDisk"]["managedDisk"]["id"]] + [d["managedDisk"]["id"] for d in profile["dataDisks"]]

    def arm_error(self, r, status, code):
        self.assertEqual(r.status, status, r)
        self.assertEqual(r.json()["error"]["code"], code, r)
        self.assertTrue(r.headers.get("x-ms-request-id"))
        return r.json()["error"]["message"]


class TokenTests(DoubleTest):
    FORM = {
        "grant_type": "client_credentials",
        "client_id": CLIENT,
        "client_secret": SECRET,
        "scope": "https://management.azure.com/.default",
    }

    def entra_error(self, r, status, error, code):
        self.assertEqual(r.status, status, r)
        doc = r.json()
        self.assertEqual(doc["error"], error)
        self.assertEqual(doc["error_codes"], [code])
        self.assertTrue(doc["error_description"].startswith(f"AADSTS{code}: "))
        self.assertIn("\r\nTrace ID: ", doc["error_description"])
        self.assertIn("Correlation ID: ", doc["error_description"])
        for key in ("timestamp", "trace_id", "correlation_id"):
            self.assertTrue(doc[key])
        self.assertEqual(doc["error_uri"], f"https://login.microsoftonline.com/error?code={code}")
        return doc

    def test_success(self):
        r = self.az.token_request(self.FORM)
        self.assertEqual(r.status, 200)
        doc = r.json()
        self.assertEqual(doc["token_type"], "Bearer")
        self.assertEqual(doc["expires_in"], 3599)
        self.assertEqual(doc["ext_expires_in"], 3599)
        self.assertGreater(len(doc["access_token"]), 20)

    def test_errors(self):
        doc = self.entra_error(self.az.token_request({**self.FORM, "client_secret": "nope"}), 401, "invalid_client", 7000215)
        self.assertIn(f"for a secret added to app '{CLIENT}'", doc["error_description"])
        self.entra_error(self.az.token_request({**self.FORM, "client_id": "99999999-9999-9999-9999-999999999999"}), 400, "unauthorized_client", 700016)
        self.entra_error(self.az.token_request(self.FORM, tenant="no-such-tenant"), 400, "invalid_request", 90002)
        self.entra_error(self.az.token_request({k: v for k, v in self.FORM.items() if k != "scope"}), 400, "invalid_scope", 70011)
        self.entra_error(self.az.token_request({**self.FORM, "scope": "https://storage.azure.com/.default"}), 400, "invalid_scope", 70011)
        self.entra_error(self.az.token_request({**self.FORM, "grant_type": "password"}), 400, "unsupported_grant_type", 70003)
        self.entra_error(self.az.token_request({k: v for k, v in self.FORM.items() if k != "client_secret"}), 401, "invalid_client", 7000218)
        self.entra_error(self.az.token_request(json.dumps(self.FORM).encode(), content_type="application/json"), 400, "invalid_request", 900144)
        self.assertEqual(http("GET", f"{self.d.base}/{TENANT}/oauth2/v2.0/token").status, 400)

    def test_lifetime_setting_and_expiry(self):
        self.az.ctl("POST", "settings", {"token_lifetime": 100})
        r = self.az.token_request(self.FORM)
        self.assertEqual(r.json()["expires_in"], 100)
        token = r.json()["access_token"]
        self.assertEqual(self.az.arm("GET", f"/subscriptions/{SUB}", api="2022-12-01", token=token).status, 200)
        self.az.ctl("POST", "clock", {"advance_seconds": 101})
        r = self.az.arm("GET", f"/subscriptions/{SUB}", api="2022-12-01", token=token)
        msg = self.arm_error(r, 401, "ExpiredAuthenticationToken")
        self.assertIn("is earlier than current UTC time", msg)
        self.assertIn('error="invalid_token"', r.headers["WWW-Authenticate"])


class ImdsTests(DoubleTest):
    URL = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/"

    def test_token(self):
        r = http("GET", self.d.base + self.URL, headers={"Metadata": "true"})
        self.assertEqual(r.status, 200, r)
        doc = r.json()
        for key in ("expires_in", "expires_on", "ext_expires_in", "not_before"):
            self.assertIsInstance(doc[key], str)
            int(doc[key])
        self.assertEqual(doc["expires_in"], "86399")
        self.assertAlmostEqual(int(doc["expires_on"]), int(doc["not_before"]) + 86399, delta=2)
        self.assertEqual(doc["resource"], "https://management.azure.com/")
        self.assertEqual(doc["token_type"], "Bearer")
        self.assertTrue(doc["client_id"])
        r = self.az.arm("GET", f"/subscriptions/{SUB}", api="2022-12-01", token=doc["access_token"])
        self.assertEqual(r.status, 200, r)

    def test_errors(self):
        r = http("GET", self.d.base + self.URL)
        self.assertEqual((r.status, r.json()), (400, {"error": "invalid_request", "error_description": "Required metadata header not specified"}))
        r = http("GET", self.d.base + "/metadata/identity/oauth2/token?resource=https://management.azure.com/", headers={"Metadata": "true"})
        self.assertEqual(r.status, 400)
        config = json.loads(json.dumps(double.DEFAULT_IDENTITIES))
        del config["managed_identity"]
        self.az.ctl("POST", "identities", config)
        try:
            r = http("GET", self.d.base + self.URL, headers={"Metadata": "true"})
            self.assertEqual((r.status, r.json()["error_description"]), (400, "Identity not found"))
        finally:
            self.az.ctl("POST", "identities", double.DEFAULT_IDENTITIES)


class ArmTests(DoubleTest):
    def test_authentication(self):
        url = f"{self.d.base}/subscriptions/{SUB}?api-version=2022-12-01"
        r = http("GET", url)
        self.arm_error(r, 401, "AuthenticationFailed")
        self.assertTrue(r.headers["WWW-Authenticate"].startswith("Bearer authorization_uri="))
        self.arm_error(http("GET", url, headers={"Authorization": "Basic abc"}), 401, "AuthenticationFailed")
        self.arm_error(http("GET", url, headers={"Authorization": "Bearer made-up"}), 401, "InvalidAuthenticationToken")

    def test_api_versions(self):
        self.arm_error(self.az.arm("GET", f"/subscriptions/{SUB}", api=None), 400, "MissingApiVersionParameter")
        self.arm_error(self.az.arm("GET", f"/subscriptions/{SUB}", api="2020-01-01"), 400, "InvalidApiVersionParameter")
        self.vm("rg-versions")
        vms = self.az.rg_path("rg-versions", "virtualMachines")
        self.arm_error(self.az.arm("GET", vms, api=DISK_API), 400, "InvalidApiVersionParameter")
        self.assertEqual(self.az.arm("GET", vms, api=VM_API).status, 200)
        disks = self.az.rg_path("rg-versions", "disks")
        self.arm_error(self.az.arm("GET", disks, api=VM_API), 400, "InvalidApiVersionParameter")
        self.assertEqual(self.az.arm("GET", disks, api="2023-04-02").status, 200)

    def test_subscription_and_not_found(self):
        r = self.az.arm("GET", f"/subscriptions/{SUB}", api="2022-12-01")
        self.assertEqual(r.json(), {"id": f"/subscriptions/{SUB}", "subscriptionId": SUB, "tenantId": TENANT, "displayName": "rehost test subscription", "state": "Enabled"})
        other = "33333333-3333-3333-3333-333333333333"
        self.arm_error(self.az.arm("GET", f"/subscriptions/{other}", api="2022-12-01"), 404, "SubscriptionNotFound")
        self.arm_error(self.az.arm("GET", self.az.rg_path("no-such-rg", "snapshots", "x")), 404, "ResourceGroupNotFound")
        self.vm("rg-nf")
        msg = self.arm_error(self.az.arm("GET", self.az.rg_path("rg-nf", "snapshots", "x")), 404, "ResourceNotFound")
        self.assertTrue(msg.startswith("The Resource 'Microsoft.Compute/snapshots/x' under resource group 'rg-nf' was not found"))

    def test_vms_paging_case_and_instance_view(self):
        ids = [self.vm("rg-paging", n, power_state=p)[0]["id"] for n, p in (("vm-a", "running"), ("vm-b", "deallocated"), ("vm-c", "stopped"))]
        first = self.az.arm("GET", self.az.rg_path("rg-paging", "virtualMachines"), api=VM_API).json()
        self.assertEqual([v["id"] for v in first["value"]], ids[:2])
        self.assertIn("$skiptoken=", first["nextLink"])
        second = self.az.arm("GET", first["nextLink"], api=None).json()
        self.assertEqual([v["id"] for v in second["value"]], ids[2:])
        self.assertNotIn("nextLink", second)
        seen, url = [], f"/subscriptions/{SUB}/providers/Microsoft.Compute/virtualMachines"
        page = self.az.arm("GET", url, api=VM_API).json()
        while True:
            seen += [v["id"] for v in page["value"]]
            if "nextLink" not in page:
                break
            page = self.az.arm("GET", page["nextLink"], api=None).json()
        self.assertEqual(len(seen), len(set(seen)))
        self.assertTrue(set(ids) <= set(seen))
        # Resource ids are case-insensitive.
        odd = f"/SUBSCRIPTIONS/{SUB}/resourcegroups/RG-PAGING/providers/microsoft.compute/VIRTUALMACHINES/VM-B"
        vm = self.az.arm("GET", odd, api=VM_API).json()
        self.assertEqual(vm["id"], ids[1])
        self.assertEqual(vm["properties"]["hardwareProfile"], {"vmSize": "Standard_D2s_v3"})
        view = self.az.arm("GET", odd + "/instanceView", api=VM_API).json()
        self.assertEqual(view["statuses"][1], {"code": "PowerState/deallocated", "level": "Info", "displayStatus": "VM deallocated"})
        self.assertEqual(view["hyperVGeneration"], "V2")
        disk_id = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
        disk = self.az.arm("GET", disk_id, api=DISK_API).json()
        self.assertEqual(disk["properties"]["diskState"], "Reserved")  # the VM is deallocated
        self.assertEqual(disk["managedBy"], ids[1])

    def test_disk_and_vm_json(self):
        vm, (os_id, data_id) = self.vm("rg-json", "vmj", sizes=(2 * 1024 * MIB + MIB, 3 * MIB))
        props = vm["properties"]["storageProfile"]
        self.assertEqual(props["osDisk"]["diskSizeGB"], 3)  # ceil(2 GiB + 1 MiB)
        self.assertEqual(props["dataDisks"][0]["lun"], 0)
        disk = self.az.arm("GET", os_id).json()
        self.assertEqual(disk["type"], "Microsoft.Compute/disks")
        self.assertEqual(disk["sku"], {"name": "Premium_LRS", "tier": "Premium"})
        self.assertEqual(disk["properties"]["diskSizeBytes"], 2 * 1024 * MIB + MIB)
        self.assertEqual(disk["properties"]["osType"], "Linux")
        self.assertEqual(disk["properties"]["diskState"], "Attached")
        self.assertNotIn("osType", self.az.arm("GET", data_id).json()["properties"])
        sizes = self.az.arm("GET", f"/subscriptions/{SUB}/providers/Microsoft.Compute/locations/westeurope/vmSizes", api=VM_API).json()
        d2 = next(s for s in sizes["value"] if s["name"] == "Standard_D2s_v3")
        self.assertEqual((d2["numberOfCores"], d2["memoryInMB"], d2["maxDataDiskCount"]), (2, 8192, 4))
        bad = self.az.arm("GET", f"/subscriptions/{SUB}/providers/Microsoft.Compute/locations/atlantis/vmSizes", api=VM_API)
        self.arm_error(bad, 400, "LocationNotAvailableForResourceType")
        r = http("POST", self.d.base + "/_double/vms", {"subscription": SUB, "resource_group": "rg-json", "name": "odd", "disks": [{"name": "odd", "lun": None, "size_bytes": MIB + 512}]})
        self.assertEqual(r.status, 400)  # disk sizes are whole MiB

    def test_permissions(self):
        config = json.loads(json.dumps(double.DEFAULT_IDENTITIES))
        clients = config["tenants"][TENANT]["clients"]
        clients["aaaaaaaa-0000-0000-0000-000000000001"] = {"secret": "a", "actions": ["Microsoft.Compute/*"], "not_actions": ["Microsoft.Compute/snapshots/delete"]}
        clients["aaaaaaaa-0000-0000-0000-000000000002"] = {"secret": "b", "actions": ["Microsoft.Compute/snapshots/*", "Microsoft.Compute/disks/read"]}
        config["tenants"]["bbbbbbbb-0000-0000-0000-000000000000"] = {"clients": {"aaaaaaaa-0000-0000-0000-000000000003": {"secret": "c", "actions": ["*"]}}}
        _, (disk_id,) = self.vm("rg-perm")
        self.az.ctl("POST", "identities", config)
        try:
            a = AzureClient(self.d.base, client="aaaaaaaa-0000-0000-0000-000000000001", secret="a")
            b = AzureClient(self.d.base, client="aaaaaaaa-0000-0000-0000-000000000002", secret="b")
            c = AzureClient(self.d.base, tenant="bbbbbbbb-0000-0000-0000-000000000000", client="aaaaaaaa-0000-0000-0000-000000000003", secret="c")
            msg = self.arm_error(a.arm("GET", f"/subscriptions/{SUB}", api="2022-12-01"), 403, "AuthorizationFailed")
            self.assertIn("does not have authorization to perform action 'Microsoft.Resources/subscriptions/read' over scope", msg)
            a.snapshot("rg-perm", "s1", disk_id)
            msg = self.arm_error(a.arm("DELETE", a.rg_path("rg-perm", "snapshots", "s1")), 403, "AuthorizationFailed")
            self.assertRegex(
                msg,
                r"^The client 'aaaaaaaa-0000-0000-0000-000000000001' with object id '[0-9a-f-]{36}' does not have "
                r"authorization to perform action 'Microsoft.Compute/snapshots/delete' over scope "
                rf"'/subscriptions/{SUB}/resourceGroups/rg-perm/providers/Microsoft.Compute/snapshots/s1' or the "
                r"scope is invalid. If access was recently granted, please refresh your credentials.$",
            )
            perms = a.arm("GET", f"/subscriptions/{SUB}/providers/Microsoft.Authorization/permissions", api="2022-04-01").json()
            self.assertEqual(perms["value"][0]["actions"], ["Microsoft.Compute/*"])
            self.assertEqual(perms["value"][0]["notActions"], ["Microsoft.Compute/snapshots/delete"])
            # Copying a disk is a linked action on the disk.
            msg = self.arm_error(b.put_snapshot("rg-perm", "s2", disk_id), 403, "LinkedAuthorizationFailed")
            self.assertIn("'Microsoft.Compute/disks/beginGetAccess/action' on the linked scope(s)", msg)
            self.assertEqual(b.arm("GET", b.rg_path("rg-perm", "snapshots", "s1")).status, 200)
            self.arm_error(c.arm("GET", f"/subscriptions/{SUB}", api="2022-12-01"), 401, "InvalidAuthenticationTokenTenant")
        finally:
            self.az.ctl("POST", "identities", double.DEFAULT_IDENTITIES)

    def test_unimplemented_and_unknown(self):
        self.vm("rg-misc")
        self.arm_error(self.az.arm("PATCH", self.az.rg_path("rg-misc", "snapshots", "x"), {}), 501, "NotImplementedInDouble")
        self.arm_error(self.az.arm("GET", self.az.rg_path("rg-misc", "galleries")), 404, "InvalidResourceType")


class SnapshotTests(DoubleTest):
    def test_validation(self):
        _, (disk_id,) = self.vm("rg-val")
        az = self.az
        self.arm_error(az.arm("PUT", az.rg_path("rg-val", "snapshots", "s"), {"properties": {}}), 400, "LocationRequired")
        self.arm_error(az.put_snapshot("rg-val", "s", disk_id, location="eastus"), 400, "InvalidParameter")
        body = {"location": "westeurope", "properties": {"creationData": {"createOption": "Empty"}, "incremental": True}}
        self.arm_error(az.arm("PUT", az.rg_path("rg-val", "snapshots", "s"), body), 400, "InvalidParameter")
        for bad in ("-dash", "a" * 81, "ends-", "sp%20ace"):
            self.arm_error(az.put_snapshot("rg-val", bad, disk_id), 400, "InvalidResourceName")
        self.assertEqual(az.put_snapshot("rg-val", "ok.name_1-x", disk_id, location="West Europe").status, 202)
        missing = disk_id.rsplit("/", 1)[0] + "/nope"
        self.arm_error(az.put_snapshot("rg-val", "s", missing), 404, "NotFound")
        self.arm_error(az.arm("PUT", az.rg_path("rg-val", "snapshots", "s"), b"{not json", headers={"Content-Type": "application/json"}), 400, "InvalidRequestContent")
        r = az.arm("POST", az.rg_path("rg-val", "snapshots", "ok.name_1-x") + "/beginGetAccess", {"access": "Write", "durationInSeconds": 60})
        self.arm_error(r, 400, "InvalidParameter")
        for seconds in (0, 5_184_001, None, "60"):
            r = az.arm("POST", az.rg_path("rg-val", "snapshots", "ok.name_1-x") + "/beginGetAccess", {"access": "Read", "durationInSeconds": seconds})
            self.arm_error(r, 400, "InvalidParameter")

    def test_lro_flow(self):
        az = self.az
        _, (disk_id,) = self.vm("rg-lro")
        r = az.put_snapshot("rg-lro", "snap", disk_id, tags={"owner": "rehost"})
        self.assertEqual(r.status, 202)
        self.assertEqual(r.json()["properties"]["provisioningState"], "Creating")
        self.assertEqual(r.headers["Retry-After"], "0")
        self.assertRegex(r.headers["Azure-AsyncOperation"], rf"/subscriptions/{SUB}/providers/Microsoft.Compute/locations/westeurope/operations/[0-9a-f-]+\?p=[0-9a-f-]+&api-version={DISK_API}$")
        self.assertEqual(r.headers["Location"], r.headers["Azure-AsyncOperation"].replace("&api-version", "&monitor=true&api-version"))
        poll = az.arm("GET", r.headers["Azure-AsyncOperation"], api=None)
        self.assertEqual(poll.json()["status"], "InProgress")
        self.assertIn("Retry-After", poll.headers)
        poll = az.arm("GET", r.headers["Azure-AsyncOperation"], api=None).json()
        self.assertEqual(poll["status"], "Succeeded")
        self.assertIn("endTime", poll)
        snap = az.arm("GET", az.rg_path("rg-lro", "snapshots", "snap")).json()
        props = snap["properties"]
        self.assertEqual((props["provisioningState"], props["diskState"], props["incremental"]), ("Succeeded", "Unattached", True))
        self.assertEqual(props["creationData"]["sourceResourceId"], disk_id)
        self.assertEqual(snap["sku"]["name"], "Standard_ZRS")
        self.assertEqual(snap["tags"], {"owner": "rehost"})
        # Same name, same source: an update (200) of the tags.
        r = az.put_snapshot("rg-lro", "snap", disk_id, tags={"owner": "other"})
        self.assertEqual(r.status, 200)
        self.assertIn("Azure-AsyncOperation", r.headers)
        self.assertEqual(az.wait(r, "Location").json()["tags"], {"owner": "other"})
        self.assertEqual(az.arm("GET", az.rg_path("rg-lro", "snapshots", "snap")).json()["tags"], {"owner": "other"})
        _, (other_disk,) = self.vm("rg-lro", "vm2")
        self.arm_error(az.put_snapshot("rg-lro", "snap", other_disk), 409, "PropertyChangeNotAllowed")

        # beginGetAccess: Location says 202 until done, then the SAS.
        r = az.arm("POST", az.rg_path("rg-lro", "snapshots", "snap") + "/beginGetAccess", {"access": "Read", "durationInSeconds": 600})
        self.assertEqual(r.status, 202)
        first = az.arm("GET", r.headers["Location"], api=None)
        self.assertEqual((first.status, first.body), (202, b""))
        self.assertIn("Retry-After", first.headers)
        done = az.arm("GET", r.headers["Location"], api=None)
        self.assertEqual(done.status, 200)
        sas = done.json()["accessSAS"]
        self.assertRegex(sas, r"/_blob/md-[0-9a-f]+/abcd\?sv=2018-03-28&sr=b&si=[0-9a-f-]+&sig=[^&]+$")
        status = az.arm("GET", r.headers["Azure-AsyncOperation"], api=None).json()
        self.assertEqual(status["properties"]["output"]["accessSAS"], sas)
        self.assertEqual(az.arm("GET", az.rg_path("rg-lro", "snapshots", "snap")).json()["properties"]["diskState"], "ActiveSAS")
        self.assertEqual(http("HEAD", sas).status, 200)
        msg = self.arm_error(az.arm("DELETE", az.rg_path("rg-lro", "snapshots", "snap")), 409, "OperationNotAllowed")
        self.assertIn("revoke access first", msg)

        # endGetAccess revokes at once; calling it again is fine.
        r = az.arm("POST", az.rg_path("rg-lro", "snapshots", "snap") + "/endGetAccess")
        self.assertEqual(r.status, 202)
        gone = http("HEAD", sas)
        self.assertEqual((gone.status, gone.headers["x-ms-error-code"]), (403, "AuthenticationFailed"))
        self.assertEqual(az.arm("GET", r.headers["Location"], api=None).status, 202)
        last = az.arm("GET", r.headers["Location"], api=None)
        self.assertEqual((last.status, last.body), (200, b""))
        az.revoke("rg-lro", "snap")
        state = az.ctl("GET", "state")
        entry = next(s for s in state["snapshots"] if s["name"] == "snap")
        self.assertEqual((entry["active_sas"], entry["access_revoked_count"]), (False, 1))

        r = az.arm("DELETE", az.rg_path("rg-lro", "snapshots", "snap"))
        self.assertEqual(r.status, 202)
        self.assertIn("Azure-AsyncOperation", r.headers)
        self.assertEqual(az.wait(r).json()["status"], "Succeeded")
        self.arm_error(az.arm("GET", az.rg_path("rg-lro", "snapshots", "snap")), 404, "ResourceNotFound")
        self.assertEqual(az.arm("DELETE", az.rg_path("rg-lro", "snapshots", "snap")).status, 204)

    def test_lists(self):
        _, (disk_id,) = self.vm("rg-list")
        for i in range(3):
            self.az.snapshot("rg-list", f"s{i}", disk_id)
        page = self.az.arm("GET", self.az.rg_path("rg-list", "snapshots")).json()
        names = [s["name"] for s in page["value"]]
        page = self.az.arm("GET", page["nextLink"], api=None).json()
        names += [s["name"] for s in page["value"]]
        self.assertEqual(names, ["s0", "s1", "s2"])
        self.assertNotIn("nextLink", page)
        bad = self.az.arm("GET", self.az.rg_path("rg-list", "snapshots") + "?$skiptoken=%%%")
        self.arm_error(bad, 400, "InvalidParameter")

    def test_sas_expiry(self):
        _, (disk_id,) = self.vm("rg-exp")
        self.az.snapshot("rg-exp", "s", disk_id)
        sas = self.az.grant("rg-exp", "s", seconds=60)
        self.assertEqual(http("HEAD", sas).status, 200)
        self.az.ctl("POST", "clock", {"advance_seconds": 61})
        r = http("GET", sas, headers={"x-ms-range": "bytes=0-511"})
        self.assertEqual((r.status, error_code_xml(r)), (403, "AuthenticationFailed"))
        props = self.az.arm("GET", self.az.rg_path("rg-exp", "snapshots", "s")).json()["properties"]
        self.assertEqual(props["diskState"], "Unattached")
        self.assertEqual(self.az.arm("DELETE", self.az.rg_path("rg-exp", "snapshots", "s")).status, 202)

    def test_lro_polls_setting(self):
        _, (disk_id,) = self.vm("rg-polls")
        self.az.ctl("POST", "settings", {"lro_polls": 3})
        r = self.az.put_snapshot("rg-polls", "s", disk_id)
        statuses = [self.az.arm("GET", r.headers["Azure-AsyncOperation"], api=None).json()["status"] for _ in range(4)]
        self.assertEqual(statuses, ["InProgress"] * 3 + ["Succeeded"])


class BlobTests(DoubleTest):
    def setUp(self):
        super().setUp()
        rg = self.id().split(".")[-1].replace("_", "-")
        _, (self.disk,) = self.vm(rg, sizes=(4 * MIB,))
        self.rg = rg
        self.data = os.urandom(8192)
        self.az.write(self.disk, 65536 - 4096, self.data)  # crosses a 64 KiB chunk boundary
        self.az.snapshot(rg, "s", self.disk)
        self.sas = self.az.grant(rg, "s")
        self.total = 4 * MIB + 512

    def test_head_and_ranges(self):
        r = http("HEAD", self.sas)
        self.assertEqual(r.status, 200)
        self.assertEqual(int(r.headers["Content-Length"]), self.total)
        self.assertEqual(r.headers["x-ms-blob-type"], "PageBlob")
        self.assertEqual(r.headers["x-ms-version"], "2018-03-28")
        for h in ("ETag", "Last-Modified", "Date", "x-ms-request-id"):
            self.assertTrue(r.headers[h], h)
        self.assertEqual(http("HEAD", self.sas, headers={"x-ms-version": "2021-08-06"}).headers["x-ms-version"], "2021-08-06")
        r = blob_get(self.sas, 65536 - 4100, 65536 + 10)
        self.assertEqual(r.status, 206)
        self.assertEqual(r.headers["Content-Range"], f"bytes {65536 - 4100}-{65536 + 10}/{self.total}")
        self.assertEqual(r.body, bytes(4) + self.data[:4096 + 11])
        # x-ms-range wins over Range.
        r = http("GET", self.sas, headers={"Range": "bytes=0-9", "x-ms-range": f"bytes={65536 - 4096}-{65536 - 4096 + 9}"})
        self.assertEqual(r.body, self.data[:10])
        r = blob_get(self.sas, self.total - 10, self.total + 100, header="Range")
        self.assertEqual((r.status, len(r.body)), (206, 10))
        r = blob_get(self.sas, self.total)
        self.assertEqual((r.status, error_code_xml(r), r.headers["x-ms-error-code"]), (416, "InvalidRange", "InvalidRange"))
        full = http("GET", self.sas)
        self.assertEqual((full.status, len(full.body)), (200, self.total))
        self.assertEqual(full.body[: 4 * MIB], self.az.read_live(self.disk, 0, 4 * MIB))

    def test_footer(self):
        footer = blob_get(self.sas, 4 * MIB, self.total - 1).body
        self.assertEqual(len(footer), 512)
        (cookie, features, version, offset, _ts, app, _cv, _os, orig, cur, cyl, heads, spt, dtype, checksum, uid, _saved) = struct.unpack(">8sIIQI4sI4sQQHBBII16sB", footer[:85])
        self.assertEqual((cookie, features, version, offset, app), (b"conectix", 2, 0x00010000, 0xFFFFFFFFFFFFFFFF, b"rhdb"))
        self.assertEqual((orig, cur, dtype), (4 * MIB, 4 * MIB, 2))
        self.assertEqual((cyl, heads, spt), double.chs_geometry(4 * MIB))
        zeroed = footer[:64] + bytes(4) + footer[68:]
        self.assertEqual(checksum, ~sum(zeroed) & 0xFFFFFFFF)
        self.assertNotEqual(uid, bytes(16))

    @unittest.skipUnless(shutil.which("qemu-img"), "qemu-img not installed")
    def test_chs_matches_qemu(self):
        with tempfile.TemporaryDirectory() as tmp:
            # qemu rounds its geometry up to cover the size where the spec rounds down, so
            # compare on sizes the spec's geometry covers exactly (one per sectors-per-track).
            for size in (17 * MIB, 155 * MIB, 252 * MIB, 32385 * MIB):
                path = os.path.join(tmp, "d.vhd")
                subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", path, str(size)], check=True)
                with open(path, "rb") as f:
                    f.seek(-512, os.SEEK_END)
                    cyl, heads, spt = struct.unpack(">HBB", f.read(512)[56:60])
                self.assertEqual((cyl, heads, spt), double.chs_geometry(size), size)

    def test_sas_checks(self):
        bad = re.sub(r"sig=[^&]+", "sig=AAAA", self.sas)
        r = http("GET", bad)
        self.assertEqual((r.status, r.headers["x-ms-error-code"]), (403, "AuthenticationFailed"))
        root = r.xml()
        self.assertTrue(root.find("Message").text.startswith("Server failed to authenticate the request."))
        self.assertIsNotNone(root.find("AuthenticationErrorDetail"))
        self.assertEqual(http("GET", self.sas.replace("/abcd?", "/other?")).status, 403)
        self.assertEqual(http("GET", self.sas.replace("sv=2018-03-28&", "")).status, 403)
        r = http("PUT", self.sas + "&comp=page", b"x" * 512, {"x-ms-page-write": "update", "x-ms-range": "bytes=0-511"})
        self.assertEqual((r.status, r.headers["x-ms-error-code"]), (403, "AuthorizationPermissionMismatch"))
        r = http("GET", self.sas + "&comp=pagelist&prevsnapshot=2024-01-01T00:00:00Z")
        self.assertEqual(r.status, 400)
        r = http("GET", self.sas, headers={"x-ms-version": "2019-07-08"})
        self.assertEqual((r.status, r.headers["x-ms-error-code"]), (400, "InvalidHeaderValue"))

    def test_full_page_list(self):
        entries, marker, r = page_list(self.sas)
        self.assertEqual(merged(entries), [[65536 - 4096, 65536 + 4096], [4 * MIB, self.total]])
        self.assertIsNone(marker)
        self.assertIsNone(r.xml().find("NextMarker"))  # no markers before 2020-10-02
        self.assertEqual(r.headers["x-ms-blob-content-length"], str(self.total))
        entries, _, _ = page_list(self.sas, range_="bytes=65536-131071")
        self.assertEqual(merged(entries), [[65536, 65536 + 4096]])

    def test_abort_and_throttle_faults(self):
        self.az.ctl("POST", "faults", [{"match": {"method": "GET", "path_regex": "^/_blob/"}, "abort_after_bytes": 1000, "times": 1}])
        with self.assertRaises(IncompleteRead):
            with urllib.request.urlopen(urllib.request.Request(self.sas)) as resp:
                resp.read()
        self.assertEqual(len(http("GET", self.sas).body), self.total)  # only once
        self.az.ctl("POST", "faults", [{"match": {"path_regex": "^/_blob/", "query_contains": "comp=pagelist"}, "status": 503, "times": 2, "retry_after": 2}])
        for _ in range(2):
            r = http("GET", self.sas + "&comp=pagelist")
            self.assertEqual((r.status, r.headers["x-ms-error-code"], r.headers["Retry-After"]), (503, "ServerBusy", "2"))
        self.assertEqual(http("GET", self.sas + "&comp=pagelist").status, 200)
        log = self.az.ctl("GET", "requests")
        kinds = [e["kind"] for e in log[-4:]]
        self.assertEqual(kinds, ["blob", "pagelist", "pagelist", "pagelist"])
        self.assertEqual(log[-4]["bytes_sent"], self.total)


class DiffTests(DoubleTest):
    def test_written_rewritten_cleared(self):
        az = self.az
        _, (disk,) = self.vm("rg-diff", sizes=(4 * MIB,))
        same = os.urandom(1024)
        az.write(disk, 0, same)
        az.write(disk, 8192, os.urandom(4096))
        az.write(disk, 1 * MIB, os.urandom(512))
        az.snapshot("rg-diff", "a", disk)
        az.write(disk, 0, same)  # rewritten with identical bytes: still reported
        az.clear(disk, 8192 + 1024, 1024)  # partly cleared
        az.write(disk, 2 * MIB, os.urandom(1024))  # new
        az.clear(disk, 3 * MIB, 512)  # cleared, never written
        az.snapshot("rg-diff", "b", disk)
        sas_a, sas_b = az.grant("rg-diff", "a"), az.grant("rg-diff", "b")
        entries, _, _ = page_list(sas_b, version="2019-07-07", prev=sas_a)
        self.assertEqual(
            entries,
            [
                ("PageRange", 0, 1023),
                ("ClearRange", 9216, 10239),
                ("PageRange", 2 * MIB, 2 * MIB + 1023),
                ("ClearRange", 3 * MIB, 3 * MIB + 511),
            ],
        )
        # The diff is ignored below 2019-07-07: the SAS says 2018-03-28, and 2019-02-02 is too old.
        full, _, _ = page_list(sas_b)
        self.assertEqual(page_list(sas_b, prev=sas_a)[0], full)
        self.assertEqual(page_list(sas_b, version="2019-02-02", prev=sas_a)[0], full)
        self.assertEqual(
            merged(full),
            [[0, 1024], [8192, 9216], [10240, 12288], [MIB, MIB + 512], [2 * MIB, 2 * MIB + 1024], [4 * MIB, 4 * MIB + 512]],
        )
        self.assertEqual(page_list(sas_a, version="2021-08-06", prev=sas_a)[0], [])

        _, _, r = page_list(sas_a, version="2019-07-07", prev=sas_b)
        self.assertEqual((r.status, error_code_xml(r)), (400, "PreviousSnapshotCannotBeNewer"))
        _, (other,) = self.vm("rg-diff", "other")
        az.snapshot("rg-diff", "o", other)
        _, _, r = page_list(sas_b, version="2019-07-07", prev=az.grant("rg-diff", "o"))
        self.assertEqual((r.status, error_code_xml(r)), (409, "PreviousSnapshotNotFound"))
        _, _, r = page_list(sas_b, version="2019-07-07", prev="not a url")
        self.assertEqual((r.status, error_code_xml(r)), (400, "InvalidHeaderValue"))
        az.revoke("rg-diff", "a")
        _, _, r = page_list(sas_b, version="2019-07-07", prev=sas_a)
        self.assertEqual((r.status, error_code_xml(r)), (403, "AuthenticationFailed"))
        log = az.ctl("GET", "requests")[-1]
        self.assertEqual((log["kind"], log["x_ms_version"], log["prev_snapshot_url"]), ("pagelist", "2019-07-07", sas_a))

    def test_full_snapshots_have_no_diff(self):
        _, (disk,) = self.vm("rg-full")
        self.az.snapshot("rg-full", "a", disk, incremental=False)
        self.az.snapshot("rg-full", "b", disk, incremental=False)
        self.assertEqual(self.az.arm("GET", self.az.rg_path("rg-full", "snapshots", "a")).json()["sku"]["name"], "Standard_LRS")
        _, _, r = page_list(self.az.grant("rg-full", "b"), version="2020-10-02", prev=self.az.grant("rg-full", "a"))
        self.assertEqual((r.status, error_code_xml(r)), (409, "PreviousSnapshotOperationNotSupported"))

    def test_next_marker_paging(self):
        az = self.az
        _, (disk,) = self.vm("rg-marker", sizes=(4 * MIB,))
        for i in range(120):
            az.write(disk, i * 2048, os.urandom(512))
        az.snapshot("rg-marker", "s", disk)
        sas = az.grant("rg-marker", "s")
        expected = [["PageRange", i * 2048, i * 2048 + 511] for i in range(120)] + [["PageRange", 4 * MIB, 4 * MIB + 511]]
        entries, marker, _ = page_list(sas, version="2020-10-02")
        self.assertEqual(len(entries), 50)
        self.assertTrue(marker)
        got = [list(e) for e in all_pages(sas, version="2020-10-02")]
        self.assertEqual(got, expected)
        entries, _, r = page_list(sas, version="2020-10-02", maxresults=7)
        self.assertEqual(len(entries), 7)
        self.assertEqual([list(e) for e in all_pages(sas, version="2021-08-06", maxresults=7)], expected)
        # Before 2020-10-02 there is no paging: one answer, no NextMarker element.
        entries, marker, r = page_list(sas, version="2019-07-07")
        self.assertEqual((len(entries), marker, r.xml().find("NextMarker")), (121, None, None))
        _, _, r = page_list(sas, version="2020-10-02", maxresults=0)
        self.assertEqual((r.status, error_code_xml(r)), (400, "OutOfRangeQueryParameterValue"))
        _, _, r = page_list(sas, version="2020-10-02", marker="garbage")
        self.assertEqual((r.status, error_code_xml(r)), (400, "InvalidQueryParameterValue"))
        az.ctl("POST", "settings", {"pagelist_max": 1000})
        self.assertEqual(len(page_list(sas, version="2020-10-02")[0]), 121)


class CowTests(DoubleTest):
    def test_snapshots_frozen_through_writes_and_deletions(self):
        az = self.az
        size = 8 * MIB
        pages = size // 512
        _, (disk,) = self.vm("rg-cow", sizes=(size,))
        rng = random.Random(1234)
        valid = set()  # the model: valid pages of the live disk
        touched = set()  # pages written or cleared since the last snapshot
        snaps = []  # (name, content, valid pages, touched since the previous snapshot)

        def mutate(n):
            for _ in range(n):
                start = rng.randrange(pages)
                count = min(rng.randint(1, 300), pages - start)
                span = set(range(start, start + count))
                if rng.random() < 0.7:
                    az.write(disk, start * 512, rng.randbytes(count * 512))
                    valid.update(span)
                else:
                    az.clear(disk, start * 512, count * 512)
                    valid.difference_update(span)
                touched.update(span)

        for i in range(5):
            mutate(12)
            name = f"s{i}"
            az.snapshot("rg-cow", name, disk)
            snaps.append((name, az.read_live(disk, 0, size), set(valid), set(touched)))
            touched.clear()
        mutate(12)
        self.assertEqual(az.read_live(disk, 0, size).count(0) < size, True)

        # Delete two middle snapshots: the others keep their content, diffs span the gap.
        for name in ("s1", "s3"):
            r = az.arm("DELETE", az.rg_path("rg-cow", "snapshots", name))
            self.assertEqual(r.status, 202, r)
        kept = [s for s in snaps if s[0] not in ("s1", "s3")]
        sas = {name: az.grant("rg-cow", name) for name, *_ in kept}
        state = az.ctl("GET", "state")
        disk_state = next(d for d in state["disks"] if d["id"] == disk)
        self.assertEqual(disk_state["valid"], ranges_of(valid))
        for name, content, valid_then, _ in kept:
            full = http("GET", sas[name])
            self.assertEqual(full.body[:size], content, name)
            self.assertEqual(merged(all_pages(sas[name], version="2021-08-06"))[:-1] if valid_then else [], ranges_of(valid_then), name)
        for (prev, _, _, _), (cur, _, cur_valid, _) in zip(kept, kept[1:]):
            i, j = [s[0] for s in snaps].index(prev), [s[0] for s in snaps].index(cur)
            changed = set().union(*[s[3] for s in snaps[i + 1 : j + 1]])
            entries = all_pages(sas[cur], version="2021-08-06", prev=sas[prev])
            self.assertEqual(merged(entries, "PageRange"), ranges_of(changed & cur_valid), (prev, cur))
            self.assertEqual(merged(entries, "ClearRange"), ranges_of(changed - cur_valid), (prev, cur))
            # Applying the diff to the older content gives the newer one.
            rebuilt = bytearray(snaps[i][1])
            new = snaps[j][1]
            for tag, s, e in entries:
                rebuilt[s : e + 1] = new[s : e + 1] if tag == "PageRange" else bytes(e + 1 - s)
            self.assertEqual(bytes(rebuilt), new, (prev, cur))

    def test_concurrent_reads_while_writing(self):
        az = self.az
        size = 4 * MIB
        _, (disk,) = self.vm("rg-conc", sizes=(size,))
        az.write(disk, 0, os.urandom(size))
        az.snapshot("rg-conc", "s", disk)
        frozen = az.read_live(disk, 0, size)
        sas = az.grant("rg-conc", "s")
        errors = []
        stop = threading.Event()

        def reader(seed):
            rng = random.Random(seed)
            while not stop.is_set():
                a = rng.randrange(size)
                b = min(size - 1, a + rng.randrange(300_000))
                r = blob_get(sas, a, b)
                if r.body != frozen[a : b + 1]:
                    errors.append((a, b))

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        rng = random.Random(99)
        try:
            for _ in range(60):
                off = rng.randrange(size // 512) * 512
                n = min(rng.randint(1, 256) * 512, size - off)
                az.write(disk, off, os.urandom(n))
        finally:
            stop.set()
            for t in threads:
                t.join()
        self.assertEqual(errors, [])
        self.assertEqual(http("GET", sas).body[:size], frozen)


class FaultAndControlTests(DoubleTest):
    def test_arm_throttling(self):
        self.vm("rg-throttle")
        path = self.az.rg_path("rg-throttle", "virtualMachines")
        self.az.ctl("POST", "faults", {"match": {"method": "GET", "path_regex": "virtualMachines$"}, "status": 429, "times": 2, "retry_after": 3})
        for _ in range(2):
            r = self.az.arm("GET", path, api=VM_API)
            self.arm_error(r, 429, "TooManyRequests")
            self.assertEqual(r.headers["Retry-After"], "3")
        self.assertEqual(self.az.arm("GET", path, api=VM_API).status, 200)
        self.az.ctl("POST", "faults", {"match": {"path_regex": "oauth2"}, "status": 500, "body": {"error": "server_error"}})
        self.assertEqual(self.az.token_request(TokenTests.FORM).json(), {"error": "server_error"})

    def test_lro_failures(self):
        az = self.az
        _, (disk,) = self.vm("rg-lrofail")
        az.ctl("POST", "faults", {"match": {"method": "PUT", "path_regex": "/snapshots/s$"}, "lro_fail": {"code": "InternalExecutionError", "message": "boom"}})
        r = az.put_snapshot("rg-lrofail", "s", disk)
        self.assertEqual(r.status, 202)
        done = az.wait(r)
        self.assertEqual(done.json()["status"], "Failed")
        self.assertEqual(done.json()["error"], {"code": "InternalExecutionError", "message": "boom"})
        self.assertEqual(az.arm("GET", r.headers["Location"], api=None).status, 500)
        self.assertEqual(az.arm("GET", az.rg_path("rg-lrofail", "snapshots", "s")).json()["properties"]["provisioningState"], "Failed")
        az.snapshot("rg-lrofail", "t", disk)
        az.ctl("POST", "faults", {"match": {"path_regex": "beginGetAccess"}, "lro_fail": {"code": "Conflict", "message": "busy", "status": 409}})
        r = az.arm("POST", az.rg_path("rg-lrofail", "snapshots", "t") + "/beginGetAccess", {"access": "Read", "durationInSeconds": 60})
        self.assertEqual(az.wait(r, "Location").status, 409)
        self.assertEqual(az.arm("GET", az.rg_path("rg-lrofail", "snapshots", "t")).json()["properties"]["diskState"], "Unattached")

    def test_seed_file_and_control_errors(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "seed.raw")
            data = os.urandom(5000)
            with open(path, "wb") as f:
                f.truncate(8 * MIB)
                f.seek(MIB + 100)
                f.write(data)
                f.seek(3 * MIB)
                f.write(bytes(65536))  # allocated, but zero: not a valid page
                f.seek(8 * MIB - 512)
                f.write(b"\xff" * 512)
            _, (disk,) = self.vm("rg-seed", sizes=(8 * MIB,))
            vm = self.az.create_vm("rg-seed", "seeded", [{"name": "seeded-os", "lun": None, "size_bytes": 8 * MIB, "seed_file": path}])
            disk = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
            state = next(d for d in self.az.ctl("GET", "state")["disks"] if d["id"] == disk)
            self.assertEqual(state["valid"], [[MIB, MIB + 65536], [8 * MIB - 65536, 8 * MIB]])
            self.assertEqual(self.az.read_live(disk, MIB + 100, 5000), data)
            self.assertEqual(self.az.read_live(disk, 8 * MIB - 512, 512), b"\xff" * 512)
        for body in ({"disk_id": disk, "offset": 100, "data_b64": "AAAA"}, {"disk_id": disk, "offset": 8 * MIB, "data_b64": base64.b64encode(bytes(512)).decode()}, {"disk_id": "/nope", "offset": 0, "data_b64": ""}):
            self.assertIn(http("POST", self.d.base + "/_double/disks/write", body).status, (400, 404))
        self.assertEqual(http("POST", self.d.base + "/_double/settings", {"nope": 1}).status, 400)
        for fault in ({"match": {"method": 5}}, {"status": "429"}, {"lro_fail": {"code": "x"}}, {"match": {"path_regex": "("}}):
            self.assertEqual(http("POST", self.d.base + "/_double/faults", fault).status, 400, fault)
        self.assertEqual(http("GET", self.d.base + "/_double/nothing").status, 404)


class ProcessTests(unittest.TestCase):
    def test_sigterm_and_config(self):
        config = {
            "tenants": {"t1": {"clients": {"c1": {"secret": "s1", "actions": ["*"]}}}},
            "subscriptions": {"s-1": {"display_name": "one", "tenant": "t1"}},
        }
        d = DoubleProcess("--token-lifetime", "60", config=config)
        try:
            az = AzureClient(d.base, tenant="t1", client="c1", secret="s1", sub="s-1")
            self.assertEqual(az.arm("GET", "/subscriptions/s-1", api="2022-12-01").json()["displayName"], "one")
            r = http("GET", d.base + ImdsTests.URL, headers={"Metadata": "true"})
            self.assertEqual(r.json()["error_description"], "Identity not found")
            d.proc.send_signal(signal.SIGTERM)
            self.assertEqual(d.proc.wait(10), 0)
        finally:
            d.stop()

    def test_unexpected_exception_is_a_500(self):
        class Broken(double.Handler):
            def handle_unknown(self):
                raise RuntimeError("boom")

        with tempfile.TemporaryDirectory() as tmp:
            args = SimpleNamespace(state_dir=tmp, retry_after=0, lro_polls=1, page_size=2, pagelist_max=50, token_lifetime=60)
            Broken.state = double.State(args, double.Identities(double.DEFAULT_IDENTITIES))
            Broken.quiet = True
            server = double.Server(("127.0.0.1", 0), Broken)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            logged, real_log = [], double.log
            double.log = logged.append
            try:
                r = http("GET", f"http://127.0.0.1:{server.server_address[1]}/nowhere")
                self.assertEqual((r.status, r.json()["error"]["code"]), (500, "InternalServerError"))
                self.assertTrue(any("RuntimeError: boom" in line for line in logged), logged)
            finally:
                double.log = real_log
                server.shutdown()
                server.server_close()

    @unittest.skipUnless(shutil.which("openssl"), "openssl not installed")
    def test_tls(self):
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                check=True,
                capture_output=True,
            )
            d = DoubleProcess("--tls-cert", cert, "--tls-key", key)
            try:
                self.assertTrue(d.base.startswith("https://127.0.0.1:"))
                ctx = ssl.create_default_context(cafile=cert)
                form = urllib.parse.urlencode(TokenTests.FORM).encode()
                r = http("POST", f"{d.base}/{TENANT}/oauth2/v2.0/token", form, {"Content-Type": "application/x-www-form-urlencoded"}, context=ctx)
                self.assertEqual(r.status, 200)
            finally:
                d.stop()


class IntervalTests(unittest.TestCase):
    def test_against_a_page_set(self):
        rng = random.Random(7)
        iv, model = double.Intervals(), set()
        for _ in range(2000):
            s = rng.randrange(200)
            e = s + rng.randint(1, 20)
            if rng.random() < 0.6:
                iv.add(s, e)
                model.update(range(s, e))
            else:
                iv.remove(s, e)
                model.difference_update(range(s, e))
            self.assertEqual(iv.to_list(), [[a // 512, b // 512] for a, b in ranges_of(model)])
        other = double.Intervals([(10, 50), (60, 61), (150, 300)])
        other_set = set(range(10, 50)) | {60} | set(range(150, 300))
        for op, expected in (("union", model | other_set), ("intersection", model & other_set), ("difference", model - other_set)):
            got = getattr(iv, op)(other).to_list()
            self.assertEqual(got, [[a // 512, b // 512] for a, b in ranges_of(expected)], op)


if __name__ == "__main__":
    unittest.main(verbosity=1)
