#!/usr/bin/env python3
"""Cross-checks the double's blob reads against Azurite, on what Azurite gets right.

    python3 check_against_azurite.py --azurite http://127.0.0.1:PORT

The same page-blob content is built in both: in Azurite with Put Page (Shared Key auth with
the emulator's well-known devstoreaccount1 key, signed here by hand), in the double through
its control API and an incremental snapshot's SAS. Then ranged GETs, HEAD, full Get Page
Ranges and the past-the-end error are compared. Diffs are not compared: Azurite ignores
x-ms-previous-snapshot-url (see shared/TESTING.md). Standard library only.
"""

import argparse
import base64
import email.utils
import hashlib
import hmac
import os
import random
import sys
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_double import AzureClient, DoubleProcess, http, merged  # noqa: E402

ACCOUNT = "devstoreaccount1"
# Azurite's published development key (node_modules/azurite/dist/src/blob/utils/constants.js).
KEY = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
VERSION = "2021-08-06"
MIB = 1 << 20
DISK = 4 * MIB
TOTAL = DISK + 512


class Azurite:
    def __init__(self, base):
        self.base = base.rstrip("/")

    def request(self, method, path, query=None, headers=None, body=b""):
        """A Shared Key signed request; path is /container[/blob]."""
        query = query or {}
        headers = {k.lower(): v for k, v in (headers or {}).items()}
        headers["x-ms-date"] = email.utils.formatdate(usegmt=True)
        headers["x-ms-version"] = VERSION
        if method == "PUT":
            headers.setdefault("content-type", "application/octet-stream")  # urllib would add one
        string_to_sign = "\n".join(
            [
                method,
                headers.get("content-encoding", ""),
                headers.get("content-language", ""),
                str(len(body)) if body else "",  # empty for 0 since 2015-02-21
                headers.get("content-md5", ""),
                headers.get("content-type", ""),
                "",  # Date: x-ms-date is used
                headers.get("if-modified-since", ""),
                headers.get("if-match", ""),
                headers.get("if-none-match", ""),
                headers.get("if-unmodified-since", ""),
                headers.get("range", ""),
            ]
        ) + "\n"
        string_to_sign += "".join(f"{k}:{v.strip()}\n" for k, v in sorted(headers.items()) if k.startswith("x-ms-"))
        # Path-style emulator URLs: the account appears twice in the canonical resource.
        string_to_sign += f"/{ACCOUNT}/{ACCOUNT}{path}"
        string_to_sign += "".join(f"\n{k.lower()}:{v}" for k, v in sorted(query.items()))
        sig = base64.b64encode(hmac.new(KEY, string_to_sign.encode(), hashlib.sha256).digest()).decode()
        headers["authorization"] = f"SharedKey {ACCOUNT}:{sig}"
        url = f"{self.base}/{ACCOUNT}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
        return http(method, url, body if method == "PUT" else None, headers)

    def ok(self, method, path, query=None, headers=None, body=b""):
        r = self.request(method, path, query, headers, body)
        if r.status >= 300:
            raise SystemExit(f"azurite {method} {path} {query}: {r.status} {r.body[:500]!r}")
        return r

    def put_page(self, offset, data):
        self.ok(
            "PUT",
            "/cmp/blob",
            {"comp": "page"},
            {"x-ms-page-write": "update", "x-ms-range": f"bytes={offset}-{offset + len(data) - 1}"},
            data,
        )

    def clear_page(self, offset, length):
        self.ok("PUT", "/cmp/blob", {"comp": "page"}, {"x-ms-page-write": "clear", "x-ms-range": f"bytes={offset}-{offset + length - 1}"})


class Check:
    def __init__(self):
        self.passed = self.failed = 0

    def equal(self, what, ours, theirs):
        if ours == theirs:
            self.passed += 1
        else:
            self.failed += 1
            show = lambda v: (v[:64] + b"...") if isinstance(v, bytes) and len(v) > 64 else v  # noqa: E731
            print(f"MISMATCH {what}: double {show(ours)!r} azurite {show(theirs)!r}")


def page_ranges(resp):
    from xml.etree import ElementTree as ET

    root = ET.fromstring(resp.body)
    return merged([(el.tag, int(el.find("Start").text), int(el.find("End").text)) for el in root if el.tag == "PageRange"])


def compare(check, label, az_sas, azurite):
    ours = http("HEAD", az_sas, headers={"x-ms-version": VERSION})
    theirs = azurite.request("HEAD", "/cmp/blob")
    check.equal(f"{label} HEAD status", ours.status, theirs.status)
    for h in ("Content-Length", "x-ms-blob-type"):
        check.equal(f"{label} HEAD {h}", ours.headers.get(h), theirs.headers.get(h))

    ranges = [
        (0, 511), (100, 5000), (65000, 67000), (65536 - 4096, 65536 + 4095), (MIB - 1, MIB + 1),
        (DISK - 100, DISK + 100), (DISK, TOTAL - 1), (TOTAL - 1, TOTAL - 1), (DISK - 512, TOTAL + 1000),
        (3 * MIB, None), (0, TOTAL - 1),
    ]
    for start, end in ranges:
        for header in ("x-ms-range", "Range"):
            value = f"bytes={start}-{'' if end is None else end}"
            ours = http("GET", az_sas, headers={header: value, "x-ms-version": VERSION})
            theirs = azurite.request("GET", "/cmp/blob", headers={header: value})
            what = f"{label} GET {header}: {value}"
            check.equal(f"{what} status", ours.status, theirs.status)
            check.equal(f"{what} body", ours.body, theirs.body)
            for h in ("Content-Range", "Content-Length", "x-ms-blob-type"):
                check.equal(f"{what} {h}", ours.headers.get(h), theirs.headers.get(h))

    ours = http("GET", az_sas, headers={"x-ms-version": VERSION})
    theirs = azurite.request("GET", "/cmp/blob")
    check.equal(f"{label} whole GET status", ours.status, theirs.status)
    check.equal(f"{label} whole GET body", ours.body, theirs.body)
    check.equal(f"{label} whole GET Content-Length", ours.headers.get("Content-Length"), theirs.headers.get("Content-Length"))

    # Azurite answers an empty 206 for a start exactly at the end (it tests start > length);
    # Azure, like RFC 9110, answers 416 there too, as the double does (test_double.py).
    for header in ("x-ms-range", "Range"):
        value = f"bytes={TOTAL + 512}-{TOTAL + 1023}"
        ours = http("GET", az_sas, headers={header: value, "x-ms-version": VERSION})
        theirs = azurite.request("GET", "/cmp/blob", headers={header: value})
        for what, pick in (("status", lambda r: r.status), ("error", lambda r: r.headers.get("x-ms-error-code")), ("Content-Range", lambda r: r.headers.get("Content-Range"))):
            check.equal(f"{label} past end {header} {what}", pick(ours), pick(theirs))

    for rng in (None, f"bytes=0-{MIB - 1}", f"bytes={MIB}-{3 * MIB - 1}"):
        headers = {"x-ms-version": VERSION, **({"x-ms-range": rng} if rng else {})}
        ours = http("GET", az_sas + "&comp=pagelist", headers=headers)
        theirs = azurite.request("GET", "/cmp/blob", {"comp": "pagelist"}, {"x-ms-range": rng} if rng else None)
        check.equal(f"{label} page list {rng} status", ours.status, theirs.status)
        if ours.status == theirs.status == 200:
            check.equal(f"{label} page list {rng}", page_ranges(ours), page_ranges(theirs))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--azurite", required=True, help="Azurite blob endpoint, http://127.0.0.1:PORT")
    args = parser.parse_args()
    azurite = Azurite(args.azurite)
    rng = random.Random(20240501)
    check = Check()
    double = DoubleProcess("--retry-after", "0")
    try:
        az = AzureClient(double.base)
        vm = az.create_vm("rg-azurite", "vm", [{"name": "os", "lun": None, "size_bytes": DISK}])
        disk = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
        footer_sas = None

        azurite.ok("PUT", "/cmp", {"restype": "container"})
        azurite.ok("PUT", "/cmp/blob", headers={"x-ms-blob-type": "PageBlob", "x-ms-blob-content-length": str(TOTAL)})

        def write(offset, data):
            az.write(disk, offset, data)
            azurite.put_page(offset, data)

        def clear(offset, length):
            az.clear(disk, offset, length)
            azurite.clear_page(offset, length)

        rounds = [
            [
                ("w", 0, 4096), ("w", 65536 - 4096, 8192), ("w", MIB, 128 * 1024), ("c", MIB + 4096, 4096),
                ("c", 0, 512), ("z", 2 * MIB, 512), ("w", DISK - 1024, 1024), ("c", 3 * MIB, 65536),
            ],
            [("w", 1024, 2048), ("c", MIB, 8192), ("w", 3 * MIB + 512, 512), ("c", DISK - 512, 512), ("z", 2 * MIB + 512, 1024)],
        ]
        for n, ops in enumerate(rounds):
            for op, offset, length in ops:
                if op == "c":
                    clear(offset, length)
                else:  # "z" writes zeros: still valid pages
                    write(offset, bytes(length) if op == "z" else rng.randbytes(length))
            az.snapshot("rg-azurite", f"s{n}", disk)
            sas = az.grant("rg-azurite", f"s{n}")
            if footer_sas is None:  # the footer is the disk's, constant: copy it in once
                footer_sas = sas
                footer = http("GET", sas, headers={"x-ms-range": f"bytes={DISK}-{TOTAL - 1}"}).body
                azurite.put_page(DISK, footer)
            compare(check, f"round {n}", sas, azurite)
    finally:
        double.stop()
    print(f"azurite cross-check: {check.passed} passed, {check.failed} failed")
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
