"""Proves strict_moto.py's strict rules with a real client (boto3) against a started server.

Run through run_tests.sh (which installs the venv first), or with the venv's pytest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
BLOCK = 524288


class Server:
    def __init__(self, env: dict[str, str] | None = None):
        self.log = tempfile.TemporaryFile()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("REHOST_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "strict_moto.py"), "--port", "0"],
            stdout=subprocess.PIPE, stderr=self.log, env=full_env, text=True)
        self.port = 0
        self.url = ""

    def wait_ready(self) -> "Server":
        if self.port:
            return self
        line = self.proc.stdout.readline()  # blocks until READY or exit
        if not line.startswith("READY "):
            self.stop()
            self.log.seek(0)
            raise RuntimeError(f"strict_moto did not start: {line!r} {self.log.read()[-2000:]!r}")
        self.port = int(line.split()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def client(self, service: str, attempts: int = 1, mode: str = "standard",
               validate: bool = True):
        return boto3.client(
            service, endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"total_max_attempts": attempts, "mode": mode},
                          parameter_validation=validate,
                          s3={"addressing_style": "path"}))

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/_rehost/stats", timeout=5) as r:
            return json.load(r)

    def reset_stats(self) -> None:
        req = urllib.request.Request(self.url + "/_rehost/stats/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=5).read()

    def configure(self, settings: dict) -> dict:
        req = urllib.request.Request(self.url + "/_rehost/config", method="POST",
                                     data=json.dumps(settings).encode())
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


FAULTS = {"REHOST_FAULT_RATE": "0.3", "REHOST_FAULT_SEED": "1234"}
DEFAULTS = {"fault_rate": 0.0, "fault_seed": "0", "fault_services": ["s3", "ebs", "ec2", "kms"],
            "ebs_new_snapshot_invisible_ms": 0, "ebs_put_blocks_per_second": 1000,
            "ebs_complete_delay_ms": 0}


@pytest.fixture(scope="module")
def pool() -> Iterator[dict[str, Server]]:
    # Startup (mostly importing moto's EC2) is the slow part: two servers, started together.
    # "strict" is configured at run time by the tests; "faults-env" by the environment.
    servers = {"strict": Server(), "faults-env": Server(FAULTS)}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def server(pool: dict[str, Server]) -> Server:
    return pool["strict"].wait_ready()


@pytest.fixture
def configure(server: Server) -> Iterator:
    """POST /_rehost/config for one test, then back to the defaults."""
    yield server.configure
    server.configure(DEFAULTS)


@pytest.fixture(scope="module")
def ebs(server: Server):
    return server.client("ebs")


@pytest.fixture(scope="module")
def ec2(server: Server):
    return server.client("ec2")


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def block(fill: int) -> bytes:
    return bytes([fill]) * BLOCK


def put(ebs, sid: str, index: int, data: bytes) -> dict:
    return ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=index, BlockData=data,
                                  DataLength=len(data), Checksum=b64sha(data),
                                  ChecksumAlgorithm="SHA256")


def error(exc: pytest.ExceptionInfo) -> tuple[str, int]:
    resp = exc.value.response
    return resp["Error"]["Code"], resp["ResponseMetadata"]["HTTPStatusCode"]


def snapshot(ebs, blocks: dict[int, bytes] | None = None, size: int = 1, complete: bool = True,
             **kw) -> str:
    sid = ebs.start_snapshot(VolumeSize=size, **kw)["SnapshotId"]
    for index, data in (blocks or {}).items():
        put(ebs, sid, index, data)
    if complete:
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=len(blocks or {}))
    return sid


def all_pages(call, key: str, **kw) -> tuple[list[dict], int]:
    items, pages, token = [], 0, None
    while True:
        resp = call(**kw, **({"NextToken": token} if token else {}))
        items += resp[key]
        pages += 1
        token = resp.get("NextToken")
        if not token:
            return items, pages


# ------------------------------------------------------------------ EBS: PutSnapshotBlock


def test_start_snapshot_reports_512k_blocks(ebs):
    resp = ebs.start_snapshot(VolumeSize=2, Description="d")
    assert resp["BlockSize"] == BLOCK
    assert resp["Status"] == "pending"
    assert resp["VolumeSize"] == 2


def test_start_snapshot_is_idempotent_on_client_token(ebs):
    token = str(uuid.uuid4())
    first = ebs.start_snapshot(VolumeSize=1, ClientToken=token)["SnapshotId"]
    assert ebs.start_snapshot(VolumeSize=1, ClientToken=token)["SnapshotId"] == first
    assert ebs.start_snapshot(VolumeSize=1)["SnapshotId"] != first


def test_put_rejects_a_block_not_512k(ebs):
    sid = snapshot(ebs, complete=False)
    for data in (b"\1" * 4096, b"\1" * (BLOCK + 512)):
        with pytest.raises(ClientError) as exc:
            put(ebs, sid, 0, data)
        assert error(exc) == ("ValidationException", 400)
    assert ebs.list_snapshot_blocks(SnapshotId=sid)["Blocks"] == []


def test_put_rejects_a_body_shorter_than_data_length(ebs):
    sid = snapshot(ebs, complete=False)
    data = b"\1" * 1000
    with pytest.raises(ClientError) as exc:
        ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockData=data, DataLength=BLOCK,
                               Checksum=b64sha(data), ChecksumAlgorithm="SHA256")
    assert error(exc) == ("ValidationException", 400)


def test_put_rejects_a_wrong_checksum(ebs):
    sid = snapshot(ebs, complete=False)
    with pytest.raises(ClientError) as exc:
        ebs.put_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockData=block(1), DataLength=BLOCK,
                               Checksum=b64sha(block(2)), ChecksumAlgorithm="SHA256")
    assert error(exc) == ("ValidationException", 400)
    assert ebs.list_snapshot_blocks(SnapshotId=sid)["Blocks"] == []


def test_put_rejects_a_missing_checksum(server):
    # botocore refuses to send it without; turn its validation off to reach the server.
    lax = server.client("ebs", validate=False)
    sid = snapshot(lax, complete=False)
    with pytest.raises(ClientError) as exc:
        lax.put_snapshot_block(SnapshotId=sid, BlockIndex=0, BlockData=block(1), DataLength=BLOCK)
    assert error(exc) == ("ValidationException", 400)


def test_put_rejects_an_index_outside_the_volume(ebs):
    sid = snapshot(ebs, size=1, complete=False)
    put(ebs, sid, 2047, block(1))  # last block of 1 GiB
    with pytest.raises(ClientError) as exc:
        put(ebs, sid, 2048, block(1))
    assert error(exc) == ("ValidationException", 400)


def test_put_to_a_completed_snapshot_is_rejected(ebs):
    sid = snapshot(ebs, {0: block(1)})
    with pytest.raises(ClientError) as exc:
        put(ebs, sid, 1, block(1))
    assert error(exc)[1] == 400


def test_put_to_an_unknown_snapshot_is_not_found(ebs):
    with pytest.raises(ClientError) as exc:
        put(ebs, "snap-0123456789abcdef0", 0, block(1))
    assert error(exc) == ("ResourceNotFoundException", 404)


# ------------------------------------------------------------------ EBS: parents, encryption


def test_child_holds_the_parents_blocks(ebs):
    parent = snapshot(ebs, {0: block(1), 1: block(2)})
    child = snapshot(ebs, {1: block(3), 5: block(4)}, ParentSnapshotId=parent)
    blocks = {b["BlockIndex"]: b["BlockToken"]
              for b in ebs.list_snapshot_blocks(SnapshotId=child)["Blocks"]}
    assert sorted(blocks) == [0, 1, 5]
    got = ebs.get_snapshot_block(SnapshotId=child, BlockIndex=0, BlockToken=blocks[0])
    assert got["BlockData"].read() == block(1)
    got = ebs.get_snapshot_block(SnapshotId=child, BlockIndex=1, BlockToken=blocks[1])
    assert got["BlockData"].read() == block(3)
    assert got["Checksum"] == b64sha(block(3))


def test_parent_must_exist_and_be_completed(ebs):
    pending = snapshot(ebs, {0: block(1)}, complete=False)
    with pytest.raises(ClientError) as exc:
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=pending)
    assert error(exc) == ("ValidationException", 400)
    with pytest.raises(ClientError) as exc:
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId="snap-0123456789abcdef0")
    assert error(exc) == ("ResourceNotFoundException", 404)


def test_parent_with_encrypted_is_refused_and_child_inherits_the_key(server, ebs, ec2):
    key_arn = server.client("kms").create_key()["KeyMetadata"]["Arn"]
    parent = snapshot(ebs, {0: block(1)}, Encrypted=True, KmsKeyArn=key_arn)
    with pytest.raises(ClientError) as exc:
        ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent, Encrypted=True)
    assert error(exc) == ("ValidationException", 400)
    child = ebs.start_snapshot(VolumeSize=1, ParentSnapshotId=parent)
    assert child["KmsKeyArn"] == key_arn
    desc = ec2.describe_snapshots(SnapshotIds=[child["SnapshotId"]])["Snapshots"][0]
    assert desc["Encrypted"] is True
    assert desc["KmsKeyId"] == key_arn


def test_encrypted_needs_an_existing_kms_key(ebs):
    with pytest.raises(ClientError) as exc:
        ebs.start_snapshot(VolumeSize=1, Encrypted=True,
                           KmsKeyArn="arn:aws:kms:us-east-1:123456789012:key/" + str(uuid.uuid4()))
    assert error(exc) == ("ValidationException", 400)


def test_unwritten_block_is_a_4xx_or_noise_when_encrypted(server, ebs):
    plain = snapshot(ebs, {0: block(1)})
    token = ebs.list_snapshot_blocks(SnapshotId=plain)["Blocks"][0]["BlockToken"]
    with pytest.raises(ClientError) as exc:
        ebs.get_snapshot_block(SnapshotId=plain, BlockIndex=1, BlockToken=token)
    code, status = error(exc)
    assert 400 <= status < 500 and code == "ValidationException"

    encrypted = snapshot(ebs, {0: block(1)}, Encrypted=True)
    token = ebs.list_snapshot_blocks(SnapshotId=encrypted)["Blocks"][0]["BlockToken"]
    got = ebs.get_snapshot_block(SnapshotId=encrypted, BlockIndex=1, BlockToken=token)
    data = got["BlockData"].read()
    assert len(data) == BLOCK and data != bytes(BLOCK)  # not zeros: a skipped block shows
    assert got["Checksum"] == b64sha(data)


# ------------------------------------------------------------------ EBS: list calls


def test_list_changed_blocks_covers_both_sides_and_paginates(ebs):
    first = snapshot(ebs, {0: block(1), 1: block(1), 2000: block(1)})
    many = {i: block(7) for i in range(3, 153)}  # 150 blocks only in the second snapshot
    many[1] = block(2)  # changed
    second = snapshot(ebs, many, ParentSnapshotId=first)

    changed, pages = all_pages(ebs.list_changed_blocks, "ChangedBlocks", FirstSnapshotId=first,
                               SecondSnapshotId=second, MaxResults=100)
    assert pages == 2
    by_index = {c["BlockIndex"]: c for c in changed}
    assert sorted(by_index) == [1, *range(3, 153)]  # 0 and 2000 are unchanged
    assert "FirstBlockToken" in by_index[1] and "SecondBlockToken" in by_index[1]
    assert "FirstBlockToken" not in by_index[100] and "SecondBlockToken" in by_index[100]

    # Without a first snapshot: every block of the second, with its token.
    alone, _ = all_pages(ebs.list_changed_blocks, "ChangedBlocks", SecondSnapshotId=second)
    assert len(alone) == 153

    # A block only in the first snapshot is listed with its first token only.
    gone, _ = all_pages(ebs.list_changed_blocks, "ChangedBlocks", FirstSnapshotId=second,
                        SecondSnapshotId=first)
    assert {c["BlockIndex"] for c in gone if "SecondBlockToken" not in c} == set(range(3, 153))

    blocks, pages = all_pages(ebs.list_snapshot_blocks, "Blocks", SnapshotId=second,
                              MaxResults=100)
    assert pages == 2 and len(blocks) == 153
    assert [b["BlockIndex"] for b in blocks] == sorted(b["BlockIndex"] for b in blocks)


def test_list_changed_blocks_refuses_unrelated_snapshots(ebs):
    a, b = snapshot(ebs, {0: block(1)}), snapshot(ebs, {0: block(2)})
    with pytest.raises(ClientError) as exc:
        ebs.list_changed_blocks(FirstSnapshotId=a, SecondSnapshotId=b)
    assert error(exc) == ("ValidationException", 400)


def test_list_rejects_a_bad_page_token(ebs):
    sid = snapshot(ebs, {0: block(1)})
    with pytest.raises(ClientError) as exc:
        ebs.list_snapshot_blocks(SnapshotId=sid, NextToken="garbage!")
    assert error(exc) == ("ValidationException", 400)


# ------------------------------------------------------------------ EBS: CompleteSnapshot


def linear_checksum(blocks: dict[int, bytes]) -> str:
    digest = hashlib.sha256()
    for index in sorted(blocks):
        digest.update(hashlib.sha256(blocks[index]).digest())
    return base64.b64encode(digest.digest()).decode()


def test_complete_checks_the_count(ebs):
    sid = snapshot(ebs, {0: block(1), 3: block(2)}, complete=False)
    with pytest.raises(ClientError) as exc:
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3)
    assert error(exc) == ("ValidationException", 400)
    assert ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=2)["Status"] == "completed"


def test_complete_checks_the_linear_checksum(ebs):
    blocks = {5: block(1), 0: block(2), 9: block(3)}
    sid = snapshot(ebs, blocks, complete=False)
    wrong = dict(blocks)
    wrong[9] = block(4)
    with pytest.raises(ClientError) as exc:
        ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3,
                              Checksum=linear_checksum(wrong), ChecksumAlgorithm="SHA256",
                              ChecksumAggregationMethod="LINEAR")
    assert error(exc) == ("ValidationException", 400)
    resp = ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=3,
                                 Checksum=linear_checksum(blocks), ChecksumAlgorithm="SHA256",
                                 ChecksumAggregationMethod="LINEAR")
    assert resp["Status"] == "completed"


def test_snapshot_goes_pending_then_completed_in_ec2(ebs, ec2):
    sid = ebs.start_snapshot(VolumeSize=3, Tags=[{"Key": "rehost", "Value": "yes"}])["SnapshotId"]
    desc = ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]
    assert desc["State"] == "pending"
    assert desc["VolumeSize"] == 3 and desc["Encrypted"] is False
    assert desc["VolumeId"] == "vol-ffffffff"
    assert {"Key": "rehost", "Value": "yes"} in desc["Tags"]
    ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=0)
    assert ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"] == "completed"


# ------------------------------------------------------------------ EC2: images


def register(ec2, sid: str, **kw) -> str:
    args = dict(
        Name=f"rehost-{uuid.uuid4()}", RootDeviceName="/dev/xvda", BootMode="uefi",
        EnaSupport=True, Architecture="arm64", VirtualizationType="hvm",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {
            "SnapshotId": sid, "VolumeSize": 8, "VolumeType": "gp3",
            "DeleteOnTermination": True}}],
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "k", "Value": "v"}]}])
    args.update(kw)
    return ec2.register_image(**args)["ImageId"]


def test_register_image_round_trips(ebs, ec2):
    sid = snapshot(ebs, {0: block(1)}, size=2)
    image = ec2.describe_images(ImageIds=[register(ec2, sid)])["Images"][0]
    assert image["BlockDeviceMappings"] == [{"DeviceName": "/dev/xvda", "Ebs": {
        "SnapshotId": sid, "VolumeSize": 8, "VolumeType": "gp3", "DeleteOnTermination": True,
        "Encrypted": False}}]
    assert image["RootDeviceName"] == "/dev/xvda"
    assert image["RootDeviceType"] == "ebs"
    assert image["BootMode"] == "uefi"
    assert image["EnaSupport"] is True
    assert image["Architecture"] == "arm64"
    assert image["VirtualizationType"] == "hvm"
    assert image["Tags"] == [{"Key": "k", "Value": "v"}]


@pytest.mark.parametrize("case", ["unknown", "pending", "root-not-mapped", "too-small"])
def test_register_image_refuses(ebs, ec2, case):
    sid = snapshot(ebs, {0: block(1)}, size=2, complete=case != "pending")
    kw = {}
    if case == "unknown":
        sid = "snap-0123456789abcdef0"
    if case == "root-not-mapped":
        kw["RootDeviceName"] = "/dev/sda1"
    if case == "too-small":
        kw["BlockDeviceMappings"] = [{"DeviceName": "/dev/xvda",
                                      "Ebs": {"SnapshotId": sid, "VolumeSize": 1}}]
    with pytest.raises(ClientError) as exc:
        register(ec2, sid, **kw)
    assert error(exc)[1] == 400
    if case == "unknown":
        assert error(exc)[0] == "InvalidSnapshot.NotFound"


def test_snapshot_in_use_cannot_be_deleted_until_deregistered(ebs, ec2):
    sid = snapshot(ebs, {0: block(1)})
    image_id = register(ec2, sid, BlockDeviceMappings=[
        {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": sid}}])
    with pytest.raises(ClientError) as exc:
        ec2.delete_snapshot(SnapshotId=sid)
    assert error(exc)[0] == "InvalidSnapshot.InUse"
    ec2.deregister_image(ImageId=image_id)
    ec2.delete_snapshot(SnapshotId=sid)
    with pytest.raises(ClientError) as exc:
        ec2.describe_snapshots(SnapshotIds=[sid])
    assert error(exc)[0] == "InvalidSnapshot.NotFound"
    with pytest.raises(ClientError) as exc:
        ebs.list_snapshot_blocks(SnapshotId=sid)
    assert error(exc)[0] == "ResourceNotFoundException"


# ------------------------------------------------------------------ stats


def test_stats_count_requests_per_operation(server, ebs):
    sid = snapshot(ebs, complete=False)
    server.reset_stats()
    for i in range(3):
        put(ebs, sid, i, block(i))
    ebs.list_snapshot_blocks(SnapshotId=sid)
    stats = server.stats()
    assert stats["requests"] == {"ebs:PutSnapshotBlock": 3, "ebs:ListSnapshotBlocks": 1}
    assert stats["faults_total"] == 0


# ------------------------------------------------------------------ timing quirks


def test_new_snapshot_invisible_then_pending_completion(server, configure):
    # Windows wide enough for a loaded 2-core machine to make the first put inside them.
    configure({"ebs_new_snapshot_invisible_ms": 800, "ebs_complete_delay_ms": 300})
    ebs, ec2 = server.client("ebs"), server.client("ec2")
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    with pytest.raises(ClientError) as exc:
        put(ebs, sid, 0, block(1))
    assert error(exc) == ("ResourceNotFoundException", 404)
    time.sleep(0.85)
    put(ebs, sid, 0, block(1))
    assert ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=1)["Status"] == "pending"
    assert ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"] == "pending"
    deadline = time.monotonic() + 5
    while ec2.describe_snapshots(SnapshotIds=[sid])["Snapshots"][0]["State"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_put_rate_per_snapshot_is_throttled(server, configure):
    configure({"ebs_put_blocks_per_second": 5})
    ebs = server.client("ebs")
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    codes = []
    for i in range(20):  # stops at the first throttle: well within a second on any machine
        try:
            put(ebs, sid, i, block(1))
            codes.append("ok")
        except ClientError as e:
            codes.append(e.response["Error"]["Code"])
            break
    assert codes[:5] == ["ok"] * 5
    assert codes[-1] == "RequestThrottledException"
    patient = server.client("ebs", attempts=10)
    for i in range(8):
        put(patient, sid, i, block(1))
    assert patient.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=8)["Status"] == "completed"


def test_config_rejects_unknown_or_bad_settings(server):
    for bad in ({"fault_rate": 2}, {"fault_services": ["sqs"]}, {"nope": 1}):
        with pytest.raises(urllib.error.HTTPError) as exc:
            server.configure(bad)
        assert exc.value.code == 400
    assert server.configure({}) == DEFAULTS


# ------------------------------------------------------------------ fault injection

def fault_pattern(s: Server) -> list[str]:
    """A fixed request sequence with retries off: which requests failed, and how."""
    ebs, ec2 = s.client("ebs"), s.client("ec2")
    outcome = []
    for i in range(30):
        try:
            if i % 3 == 0:
                ec2.describe_snapshots(OwnerIds=["self"])
            else:
                ebs.start_snapshot(VolumeSize=1)
            outcome.append("ok")
        except ClientError as e:
            outcome.append(e.response["Error"]["Code"])
    return outcome


def test_fault_pattern_is_reproducible_for_a_seed(pool, server, configure):
    # The same seed, from the environment at start or set at run time, gives the same faults.
    env_server = pool["faults-env"].wait_ready()
    runs = [(fault_pattern(env_server), env_server.stats())]
    for _ in range(2):
        configure({"fault_rate": 0.3, "fault_seed": "1234"})
        runs.append((fault_pattern(server), server.stats()))
    assert runs[1] == runs[2]
    (pattern, stats), (pattern2, stats2) = runs[:2]
    assert pattern == pattern2
    assert stats["fault_log"] == stats2["fault_log"]
    failed = [p for p in pattern if p != "ok"]
    assert 3 <= len(failed) <= 18  # about 30 %
    assert set(failed) <= {"ThrottlingException", "RequestThrottledException",
                           "InternalServerException", "RequestLimitExceeded", "InternalError"}
    assert stats["faults_total"] == len(failed)


def test_retries_get_through_faults_without_double_effects(server, configure):
    s = server
    configure({"fault_rate": 0.3, "fault_seed": "99", "fault_services": ["ebs", "ec2", "s3", "kms"]})
    ebs, ec2, s3, kms = (s.client(n, attempts=10) for n in ("ebs", "ec2", "s3", "kms"))
    kms.create_key()
    blocks = {i: block(i + 1) for i in range(12)}
    sid = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    for index, data in blocks.items():
        put(ebs, sid, index, data)
    # A fault never has an effect: the count and checksum match exactly the blocks put.
    ebs.complete_snapshot(SnapshotId=sid, ChangedBlocksCount=len(blocks),
                          Checksum=linear_checksum(blocks), ChecksumAlgorithm="SHA256",
                          ChecksumAggregationMethod="LINEAR")
    image_id = register(ec2, sid)
    assert ec2.describe_images(ImageIds=[image_id])["Images"][0]["State"] == "available"

    s3.create_bucket(Bucket="rehost-stage-retried")
    up = s3.create_multipart_upload(Bucket="rehost-stage-retried", Key="disk.raw")
    parts = []
    for n, data in ((1, b"a" * (5 << 20)), (2, b"b" * 1000)):
        etag = s3.upload_part(Bucket="rehost-stage-retried", Key="disk.raw", PartNumber=n,
                              UploadId=up["UploadId"], Body=data)["ETag"]
        parts.append({"PartNumber": n, "ETag": etag})
    s3.complete_multipart_upload(Bucket="rehost-stage-retried", Key="disk.raw",
                                 UploadId=up["UploadId"], MultipartUpload={"Parts": parts})
    assert s3.head_object(Bucket="rehost-stage-retried", Key="disk.raw")["ContentLength"] == \
        (5 << 20) + 1000

    stats = s.stats()
    assert stats["faults_total"] > 0
    assert stats["requests"]["ebs:PutSnapshotBlock"] == \
        len(blocks) + stats["faults"].get("ebs:PutSnapshotBlock", 0)


def test_fault_services_limit_injection(server, configure):
    s = server
    configure({"fault_rate": 1.0, "fault_services": ["ec2"]})
    ebs, ec2 = s.client("ebs"), s.client("ec2")
    ebs.start_snapshot(VolumeSize=1)  # never faulted
    with pytest.raises(ClientError) as exc:
        ec2.describe_snapshots(OwnerIds=["self"])
    assert error(exc)[0] in ("RequestLimitExceeded", "InternalError")
    assert s.stats()["faults"] == {"ec2:DescribeSnapshots": 1}
