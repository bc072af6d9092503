#!/usr/bin/env python3
"""A strict, fault-injecting moto server for rehost's importer tests.

moto's server (one endpoint for S3, EC2, EBS direct and KMS) is lax where real AWS is strict.
This script patches moto's models and response handlers in-process, wraps moto's WSGI app in
a middleware, and serves it on 127.0.0.1 only:

    strict_moto.py [--port PORT]     # PORT 0 (default): pick a free port

Once listening it prints ``READY <port>`` on stdout (one line, flushed), so a harness can read it.

Environment:
    REHOST_FAULT_RATE        fraction (0.0-1.0, default 0) of matching requests that fail
    REHOST_FAULT_SEED        seed of the fault RNG (default 0): same seed + same request
                             order = same fault pattern
    REHOST_FAULT_SERVICES    comma list from s3,ebs,ec2,kms (default: all four)
    REHOST_EBS_NEW_SNAPSHOT_INVISIBLE_MS
                             PutSnapshotBlock to a snapshot younger than this answers
                             ResourceNotFoundException (default 0)
    REHOST_EBS_PUT_BLOCKS_PER_SECOND
                             PutSnapshotBlock requests per second per snapshot before
                             RequestThrottledException (default 1000, as AWS; 0: no limit)
    REHOST_EBS_COMPLETE_DELAY_MS
                             CompleteSnapshot answers "pending" and the snapshot turns
                             "completed" this long after (default 0: at once)

GET /_rehost/stats answers JSON: requests per "service:Operation" (faulted ones included),
faults injected per operation, and the fault log (request number, operation, error code).
POST /_rehost/stats/reset zeroes them.
GET /_rehost/config shows the settings above (lower-case names: fault_rate, fault_seed,
fault_services, ebs_new_snapshot_invisible_ms, ebs_put_blocks_per_second,
ebs_complete_delay_ms); POST /_rehost/config with a JSON object changes some of them at run
time, restarts the fault RNG from the seed and zeroes the stats.

References (AWS API reference, EBS direct APIs 2019-11-02):
  StartSnapshot, PutSnapshotBlock, CompleteSnapshot, ListSnapshotBlocks, ListChangedBlocks,
  GetSnapshotBlock: https://docs.aws.amazon.com/ebs/latest/APIReference/
  Checksums: https://docs.aws.amazon.com/ebs/latest/userguide/ebsapis-using-checksums.html
  EC2 RegisterImage / DeleteSnapshot: https://docs.aws.amazon.com/AWSEC2/latest/APIReference/
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import re
import threading
import time
from typing import Any
from urllib.parse import parse_qs

# moto's EC2 would preload hundreds of public AMIs: irrelevant here, slow, and they would show
# in DescribeImages next to the images a test registers.
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

from moto.core.exceptions import ServiceException  # noqa: E402 (after the setting above)
from moto.core.responses import ActionResult
from moto.ebs import models as ebs_models
from moto.ebs.responses import EBSResponse
from moto.ec2.exceptions import EC2ClientError, InvalidSnapshotIdError, InvalidSnapshotInUse
from moto.ec2.models import EC2Backend
from moto.ec2.models.amis import Ami
from moto.ec2.responses.amis import AmisResponse
from moto.ec2.utils import random_ami_id
from moto.kms.models import kms_backends
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

# EBS direct APIs: "All blocks in a snapshot are of a fixed size": 512 KiB (BlockSize in the
# StartSnapshot response; PutSnapshotBlock's DataLength must be 524288).
BLOCK_SIZE = 524288
BLOCKS_PER_GIB = (1 << 30) // BLOCK_SIZE  # 2048
# ListSnapshotBlocks / ListChangedBlocks MaxResults: valid range 100-10000 (API reference);
# the service's default page is the maximum.
MIN_RESULTS = 100
MAX_RESULTS = 10000


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    return float(value) if value.strip() else default


ALL_SERVICES = ("s3", "ebs", "ec2", "kms")


def settings_from_env() -> dict[str, Any]:
    services = os.environ.get("REHOST_FAULT_SERVICES", "")
    return {
        "fault_rate": _env_float("REHOST_FAULT_RATE", 0.0),
        "fault_seed": os.environ.get("REHOST_FAULT_SEED", "0"),
        "fault_services": [x.strip() for x in services.split(",") if x.strip()]
        or list(ALL_SERVICES),
        "ebs_new_snapshot_invisible_ms": _env_float("REHOST_EBS_NEW_SNAPSHOT_INVISIBLE_MS", 0),
        "ebs_put_blocks_per_second": _env_float("REHOST_EBS_PUT_BLOCKS_PER_SECOND", 1000),
        "ebs_complete_delay_ms": _env_float("REHOST_EBS_COMPLETE_DELAY_MS", 0),
    }


def check_settings(settings: dict[str, Any]) -> None:
    if not 0.0 <= float(settings["fault_rate"]) <= 1.0:
        raise ValueError("fault_rate (REHOST_FAULT_RATE) must be within 0.0-1.0")
    unknown = set(settings["fault_services"]) - set(ALL_SERVICES)
    if unknown:
        raise ValueError(f"fault_services (REHOST_FAULT_SERVICES): unknown {sorted(unknown)}")


# The settings in force: from the environment at start, changed by POST /_rehost/config.
SETTINGS: dict[str, Any] = settings_from_env()


def _sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


# --------------------------------------------------------------------------------------------
# Errors, shaped as each service answers them. ServiceException is serialized by moto with the
# HTTP status the service model gives the code (EBS: ValidationException 400,
# ResourceNotFoundException 404, ConflictException 503 ...); EC2 errors are 400 XML.
# --------------------------------------------------------------------------------------------


class EbsError(ServiceException):
    def __init__(self, code: str, message: str, reason: str | None = None):
        super().__init__(code, message)
        if reason is not None:
            self.reason = reason  # ValidationException/ResourceNotFoundException "Reason"
            self.Reason = reason


def ebs_validation(message: str, reason: str) -> EbsError:
    return EbsError("ValidationException", message, reason)


def ebs_not_found(message: str, reason: str = "SNAPSHOT_NOT_FOUND") -> EbsError:
    return EbsError("ResourceNotFoundException", message, reason)


# --------------------------------------------------------------------------------------------
# EBS direct APIs: a strict model replacing moto's EBSBackend logic.
# --------------------------------------------------------------------------------------------


class StrictBlock:
    """One written 512 KiB block. The token identifies this write: a child snapshot inherits
    the parent's block objects, so an unchanged block keeps its token (as block tokens in
    ListChangedBlocks identify block content in a lineage)."""

    def __init__(self, data: bytes, checksum: str):
        self.data = data
        self.checksum = checksum
        self.token = base64.b64encode(os.urandom(18)).decode()


class StrictSnapshot:
    def __init__(self, snapshot_id: str, account_id: str, ec2_snapshot: Any, volume_size: int,
                 tags: list[dict[str, str]], description: str | None, encrypted: bool,
                 kms_key_arn: str | None, parent: "StrictSnapshot | None"):
        self.snapshot_id = snapshot_id
        self.account_id = account_id
        self.ec2_snapshot = ec2_snapshot
        self.volume_size = volume_size
        self.tags = tags
        self.description = description
        self.encrypted = encrypted
        self.kms_key_arn = kms_key_arn
        self.parent_id = parent.snapshot_id if parent else None
        # The first snapshot of the chain of parents: ListChangedBlocks compares only snapshots
        # "of the same volume/snapshot lineage".
        self.lineage: str = parent.lineage if parent else snapshot_id
        self.status = "pending"
        self.start_time = ec2_snapshot.start_time
        self.created_monotonic = time.monotonic()
        # index -> block; a child starts with its parent's blocks.
        self.blocks: dict[int, StrictBlock] = dict(parent.blocks) if parent else {}
        # indexes written by PutSnapshotBlock into this snapshot (ChangedBlocksCount).
        self.written: set[int] = set()
        # monotonic times of the PutSnapshotBlock requests of the last second.
        self.recent_puts: list[float] = []

    @property
    def block_count(self) -> int:
        return self.volume_size * BLOCKS_PER_GIB


def _strict_snapshots(backend: Any) -> dict[str, StrictSnapshot]:
    if not hasattr(backend, "strict_snapshots"):
        backend.strict_snapshots = {}
    return backend.strict_snapshots


def _get_snapshot(backend: Any, snapshot_id: str | None) -> StrictSnapshot:
    snap = _strict_snapshots(backend).get(snapshot_id or "")
    if snap is None or snap.snapshot_id not in backend.ec2_backend.snapshots:
        raise ebs_not_found(f"The snapshot '{snapshot_id}' does not exist.")
    return snap


def _int_param(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ebs_validation(f"{name} must be an integer", "INVALID_PARAMETER_VALUE")


def _page(indexes: list[int], max_results: Any, next_token: Any, starting: Any) -> tuple[list[int], str | None]:
    """MaxResults (100-10000, default 10000) / NextToken paging over sorted block indexes.
    NextToken wins over StartingBlockIndex, as the API reference says."""
    limit = _int_param(max_results, "MaxResults")
    if limit is None:
        limit = MAX_RESULTS
    if not MIN_RESULTS <= limit <= MAX_RESULTS:
        raise ebs_validation(
            f"MaxResults must be between {MIN_RESULTS} and {MAX_RESULTS}", "INVALID_PARAMETER_VALUE")
    start = 0
    if next_token:
        try:
            decoded = base64.urlsafe_b64decode(next_token + "=" * (-len(next_token) % 4))
            m = re.fullmatch(rb"rehost-next-(\d+)", decoded)
        except ValueError:
            m = None
        if not m:
            raise ebs_validation("The pagination token is invalid.", "INVALID_PAGE_TOKEN")
        start = int(m.group(1))
    elif starting is not None:
        start = _int_param(starting, "StartingBlockIndex") or 0
    selected = [i for i in indexes if i >= start]
    page, rest = selected[:limit], selected[limit:]
    token = None
    if rest:
        token = base64.urlsafe_b64encode(f"rehost-next-{rest[0]}".encode()).decode().rstrip("=")
    return page, token


def _expiry() -> float:
    return time.time() + 3600


def _start_result(snap: StrictSnapshot) -> dict[str, Any]:
    result = {
        "SnapshotId": snap.snapshot_id, "OwnerId": snap.account_id, "Status": snap.status,
        "StartTime": snap.start_time, "VolumeSize": snap.volume_size, "BlockSize": BLOCK_SIZE,
        "Tags": snap.tags, "Description": snap.description, "ParentSnapshotId": snap.parent_id,
        "KmsKeyArn": snap.kms_key_arn, "SseType": "sse-ebs" if snap.encrypted else "none",
    }
    return {k: v for k, v in result.items() if v is not None}


class StrictEBSResponse(EBSResponse):
    """EBSResponse with each EBS direct API reimplemented strictly."""

    def _kms_key_arn(self, key: str) -> str:
        backend = kms_backends[self.current_account][self.region]
        try:
            return backend.describe_key(key).arn
        except Exception:
            raise ebs_validation(f"The KMS key '{key}' does not exist.", "INVALID_CUSTOMER_KEY")

    def start_snapshot(self) -> ActionResult:
        backend = self.ebs_backend
        ec2 = backend.ec2_backend
        volume_size = _int_param(self._get_param("VolumeSize"), "VolumeSize")
        if volume_size is None or volume_size < 1:
            raise ebs_validation("VolumeSize must be at least 1 GiB", "INVALID_VOLUME_SIZE")
        parent_id = self._get_param("ParentSnapshotId")
        encrypted = bool(self._get_param("Encrypted"))
        kms_key = self._get_param("KmsKeyArn")
        tags = self._get_param("Tags") or []
        description = self._get_param("Description")

        # StartSnapshot ClientToken (idempotency; botocore fills one in and keeps it across
        # retries): the same token answers the snapshot it already started.
        client_token = self._get_param("ClientToken")
        tokens = backend.__dict__.setdefault("strict_client_tokens", {})
        if client_token and client_token in tokens:
            snap = _strict_snapshots(backend).get(tokens[client_token])
            if snap is not None:
                return ActionResult(_start_result(snap))

        parent = None
        if parent_id:
            # StartSnapshot: "If you specify a ParentSnapshotId, omit [Encrypted]; the new
            # snapshot inherits the encryption status of the parent."
            if encrypted:
                raise ebs_validation(
                    "Encrypted cannot be specified together with ParentSnapshotId; the snapshot "
                    "inherits the parent's encryption.", "INVALID_PARAMETER_VALUE")
            if kms_key:
                raise ebs_validation(
                    "KmsKeyArn cannot be specified together with ParentSnapshotId.",
                    "INVALID_PARAMETER_VALUE")
            parent = _strict_snapshots(backend).get(parent_id)
            if parent is None or parent_id not in ec2.snapshots:
                raise ebs_not_found(f"The parent snapshot '{parent_id}' does not exist.",
                                    "SNAPSHOT_NOT_FOUND")
            if parent.status != "completed":
                raise ebs_validation(f"The parent snapshot '{parent_id}' is not completed.",
                                     "INVALID_SNAPSHOT_ID")
            if volume_size < parent.volume_size:
                raise ebs_validation("VolumeSize cannot be smaller than the parent's.",
                                     "INVALID_VOLUME_SIZE")
            encrypted, kms_arn = parent.encrypted, parent.kms_key_arn
        else:
            if kms_key and not encrypted:
                # StartSnapshot: KmsKeyArn "If you specify this parameter, you must specify
                # Encrypted=true".
                raise ebs_validation("KmsKeyArn requires Encrypted=true.", "INVALID_PARAMETER_VALUE")
            kms_arn = None
            if encrypted:
                kms_arn = self._kms_key_arn(kms_key) if kms_key else (
                    f"arn:aws:kms:{self.region}:{self.current_account}:alias/aws/ebs")

        vol = ec2.create_volume(size=volume_size, zone_name=f"{self.region}a",
                                encrypted=encrypted, kms_key_id=kms_arn)
        ec2_snap = ec2.create_snapshot(volume_id=vol.id, description=description or "")
        # EBS direct snapshots have no source volume: EC2 reports VolumeId vol-ffffffff.
        ec2.delete_volume(vol.id)
        vol.id = "vol-ffffffff"
        ec2_snap.status = "pending"
        ec2_snap.encrypted = encrypted
        ec2_snap.kms_key_id = kms_arn
        if tags:
            ec2_snap.add_tags({t["Key"]: t["Value"] for t in tags})
        snap = StrictSnapshot(ec2_snap.id, self.current_account, ec2_snap, volume_size, tags,
                              description, encrypted, kms_arn, parent)
        _strict_snapshots(backend)[snap.snapshot_id] = snap
        if client_token:
            tokens[client_token] = snap.snapshot_id
        return ActionResult(_start_result(snap))

    def put_snapshot_block(self) -> ActionResult:
        snap = _get_snapshot(self.ebs_backend, self._get_param("SnapshotId"))
        # Right after StartSnapshot, real EBS may still answer that the snapshot does not
        # exist; clients must retry.
        invisible_ms = float(SETTINGS["ebs_new_snapshot_invisible_ms"])
        if (time.monotonic() - snap.created_monotonic) * 1000 < invisible_ms:
            raise ebs_not_found(f"The snapshot '{snap.snapshot_id}' does not exist.")
        # EBS direct APIs quota: 1,000 PutSnapshotBlock requests per second per snapshot;
        # beyond it, RequestThrottledException (Reason RESOURCE_LEVEL_THROTTLE).
        limit = float(SETTINGS["ebs_put_blocks_per_second"])
        now = time.monotonic()
        snap.recent_puts = [t for t in snap.recent_puts if now - t < 1.0]
        if limit > 0 and len(snap.recent_puts) >= limit:
            raise EbsError("RequestThrottledException",
                           f"PutSnapshotBlock rate for '{snap.snapshot_id}' exceeded "
                           f"({limit:g}/s).", "RESOURCE_LEVEL_THROTTLE")
        snap.recent_puts.append(now)
        if snap.status != "pending":
            raise ebs_validation(f"The snapshot '{snap.snapshot_id}' is not pending; blocks "
                                 "can only be written to a pending snapshot.",
                                 "INVALID_SNAPSHOT_ID")
        index = _int_param(self._get_param("BlockIndex"), "BlockIndex")
        if index is None or not 0 <= index < snap.block_count:
            raise ebs_validation(
                f"BlockIndex {index} is outside the volume ({snap.block_count} blocks).",
                "INVALID_BLOCK")
        data = self._get_param("BlockData")
        if data is None:
            data = b""
        if isinstance(data, str):
            data = data.encode("latin-1")
        length = _int_param(self._get_param("DataLength"), "DataLength")
        # PutSnapshotBlock: DataLength "must be exactly 524288 bytes".
        if length != BLOCK_SIZE:
            raise ebs_validation(f"DataLength must be {BLOCK_SIZE}, got {length}.",
                                 "INVALID_BLOCK")
        if len(data) != length:
            raise ebs_validation(
                f"The body holds {len(data)} bytes, DataLength says {length}.", "INVALID_BLOCK")
        checksum = self._get_param("Checksum")
        algorithm = self._get_param("ChecksumAlgorithm")
        # PutSnapshotBlock: Checksum and ChecksumAlgorithm (SHA256) are required, and EBS
        # validates the checksum against the data it received.
        if not checksum or algorithm != "SHA256":
            raise ebs_validation("A Base64 SHA256 x-amz-Checksum with x-amz-Checksum-Algorithm "
                                 "SHA256 is required.", "INVALID_PARAMETER_VALUE")
        if checksum != _sha256_b64(data):
            raise ebs_validation("The checksum does not match the block data.", "INVALID_PARAMETER_VALUE")
        snap.blocks[index] = StrictBlock(bytes(data), checksum)
        snap.written.add(index)
        return ActionResult({"Checksum": checksum, "ChecksumAlgorithm": "SHA256"})

    def complete_snapshot(self) -> ActionResult:
        snap = _get_snapshot(self.ebs_backend, self._get_param("SnapshotId"))
        if snap.status != "pending":
            raise ebs_validation(f"The snapshot '{snap.snapshot_id}' is already {snap.status}.",
                                 "INVALID_PARAMETER_VALUE")
        count = _int_param(self._get_param("ChangedBlocksCount"), "ChangedBlocksCount")
        # CompleteSnapshot: ChangedBlocksCount, "the number of blocks that were written to the
        # snapshot" (required). Counted here as distinct block indexes put.
        if count is None or count != len(snap.written):
            raise ebs_validation(
                f"ChangedBlocksCount {count} does not match the {len(snap.written)} blocks "
                "written.", "INVALID_PARAMETER_VALUE")
        checksum = self._get_param("Checksum")
        if checksum:
            algorithm = self._get_param("ChecksumAlgorithm")
            method = self._get_param("ChecksumAggregationMethod")
            if algorithm != "SHA256" or method != "LINEAR":
                raise ebs_validation("An aggregated checksum needs algorithm SHA256 and "
                                     "aggregation method LINEAR.", "INVALID_PARAMETER_VALUE")
            # Linear aggregation (CompleteSnapshot, Checksum): the per-block checksums of the
            # written blocks in ascending block index order, concatenated, then SHA256 over
            # that. "Concatenate them to form a single string" means the raw 32-byte digests,
            # not their base64 text: that is what AWS's own uploader, awslabs/coldsnap
            # (src/upload.rs), sends and real EBS accepts.
            digest = hashlib.sha256()
            for index in sorted(snap.written):
                digest.update(base64.b64decode(snap.blocks[index].checksum))
            if checksum != base64.b64encode(digest.digest()).decode():
                raise ebs_validation("The aggregated checksum does not match the blocks written.",
                                     "INVALID_PARAMETER_VALUE")
        delay_ms = float(SETTINGS["ebs_complete_delay_ms"])

        def seal() -> None:
            snap.status = "completed"
            snap.ec2_snapshot.status = "completed"

        if delay_ms > 0:
            snap.status = "completing"  # not writable, not yet usable as a parent or by an AMI
            snap.ec2_snapshot.status = "pending"
            timer = threading.Timer(delay_ms / 1000, seal)
            timer.daemon = True
            timer.start()
            return ActionResult({"Status": "pending"})
        seal()
        return ActionResult({"Status": "completed"})

    def get_snapshot_block(self) -> ActionResult:
        snap = _get_snapshot(self.ebs_backend, self._get_param("SnapshotId"))
        index = _int_param(self._get_param("BlockIndex"), "BlockIndex")
        token = self._get_param("BlockToken")
        if index is None or not 0 <= index < snap.block_count:
            raise ebs_validation(f"BlockIndex {index} is outside the volume.", "INVALID_BLOCK")
        block = snap.blocks.get(index)
        if block is None:
            if snap.encrypted:
                # Real EBS: an unwritten block of an encrypted snapshot does not read back as
                # zeros but as undecryptable noise; a client that skips writing zero blocks of
                # an encrypted disk gets garbage back.
                data = os.urandom(BLOCK_SIZE)
                return ActionResult({"DataLength": BLOCK_SIZE, "BlockData": data,
                                     "Checksum": _sha256_b64(data), "ChecksumAlgorithm": "SHA256"})
            raise ebs_validation(f"Block {index} of '{snap.snapshot_id}' was never written; the "
                                 "block token is not valid.", "INVALID_BLOCK_TOKEN")
        if token != block.token:
            raise ebs_validation("The block token is not valid for this block.",
                                 "INVALID_BLOCK_TOKEN")
        return ActionResult({"DataLength": BLOCK_SIZE, "BlockData": block.data,
                             "Checksum": block.checksum, "ChecksumAlgorithm": "SHA256"})

    def list_snapshot_blocks(self) -> ActionResult:
        snap = _get_snapshot(self.ebs_backend, self._get_param("SnapshotId"))
        page, token = _page(sorted(snap.blocks), self._get_param("MaxResults"),
                            self._get_param("NextToken"), self._get_param("StartingBlockIndex"))
        result: dict[str, Any] = {
            "Blocks": [{"BlockIndex": i, "BlockToken": snap.blocks[i].token} for i in page],
            "ExpiryTime": _expiry(), "VolumeSize": snap.volume_size, "BlockSize": BLOCK_SIZE,
        }
        if token:
            result["NextToken"] = token
        return ActionResult(result)

    def list_changed_blocks(self) -> ActionResult:
        backend = self.ebs_backend
        second = _get_snapshot(backend, self._get_param("SecondSnapshotId"))
        first_id = self._get_param("FirstSnapshotId")
        first = _get_snapshot(backend, first_id) if first_id else None
        if first is not None and first.lineage != second.lineage:
            raise ebs_validation("The snapshots are not of the same lineage.",
                                 "UNRELATED_SNAPSHOTS")
        first_blocks = first.blocks if first else {}
        # A block is changed when it is in only one of the two snapshots or its content
        # (token) differs; with no first snapshot every block of the second is listed.
        changed = sorted(
            i for i in set(first_blocks) | set(second.blocks)
            if first_blocks.get(i) is not second.blocks.get(i))
        page, token = _page(changed, self._get_param("MaxResults"),
                            self._get_param("NextToken"), self._get_param("StartingBlockIndex"))
        blocks = []
        for i in page:
            entry: dict[str, Any] = {"BlockIndex": i}
            if i in first_blocks:
                entry["FirstBlockToken"] = first_blocks[i].token
            if i in second.blocks:
                entry["SecondBlockToken"] = second.blocks[i].token
            blocks.append(entry)
        result: dict[str, Any] = {"ChangedBlocks": blocks, "ExpiryTime": _expiry(),
                                  "VolumeSize": second.volume_size, "BlockSize": BLOCK_SIZE}
        if token:
            result["NextToken"] = token
        return ActionResult(result)


# --------------------------------------------------------------------------------------------
# EC2: RegisterImage keeps what AWS keeps; DeleteSnapshot refuses a snapshot an AMI uses.
# --------------------------------------------------------------------------------------------


class StrictAmi(Ami):
    """An AMI registered from snapshots. moto's Ami reports a fixed 15 GiB mapping to an
    auto-created snapshot; this one reports the mappings it was registered with."""

    # moto's model metaclass derives the service name from the module path.
    __module__ = "moto.ec2.models.amis"

    block_device_mappings: list[dict[str, Any]] = []  # type: ignore[assignment]


def _ec2_error(code: str, message: str) -> EC2ClientError:
    return EC2ClientError(code, message)


def strict_register_image(self: AmisResponse) -> ActionResult:
    """RegisterImage (EC2 API reference): the image's block device mappings name snapshots that
    must exist and be completed, the RootDeviceName must be one of the mappings, and the
    image keeps BlockDeviceMappings, RootDeviceName, BootMode, EnaSupport, Architecture,
    VirtualizationType and the TagSpecifications for "image"."""
    self.error_on_dryrun()
    ec2 = self.ec2_backend
    name = self._get_param("Name")
    if not name:
        raise _ec2_error("MissingParameter", "The request must contain the parameter name")
    if any(a.name == name and a.owner_id == ec2.account_id for a in ec2.amis.values()):
        raise _ec2_error("InvalidAMIName.Duplicate", f"AMI name {name} is already in use")
    mappings_in = self._get_param("BlockDeviceMappings", []) or []
    root = self._get_param("RootDeviceName")
    mappings: list[dict[str, Any]] = []
    for m in mappings_in:
        device = m.get("DeviceName")
        ebs = m.get("Ebs") or {}
        out: dict[str, Any] = {"DeviceName": device}
        if ebs:
            snap_id = ebs.get("SnapshotId")
            size = ebs.get("VolumeSize")
            if snap_id:
                snap = ec2.snapshots.get(snap_id)
                if snap is None:
                    raise _ec2_error("InvalidSnapshot.NotFound",
                                     f"The snapshot '{snap_id}' does not exist.")
                if snap.status != "completed":
                    raise _ec2_error("IncorrectState",
                                     f"Snapshot '{snap_id}' is not 'completed' ({snap.status}).")
                if size is None:
                    size = snap.volume_size
                elif int(size) < snap.volume_size:
                    raise _ec2_error("InvalidBlockDeviceMapping",
                                     f"Volume of size {size} GiB is smaller than snapshot "
                                     f"'{snap_id}' ({snap.volume_size} GiB).")
            elif size is None:
                raise _ec2_error("InvalidBlockDeviceMapping",
                                 f"{device}: an EBS mapping needs a SnapshotId or a VolumeSize.")
            dot = ebs.get("DeleteOnTermination")
            out["Ebs"] = {
                "SnapshotId": snap_id,
                "VolumeSize": int(size),
                "VolumeType": ebs.get("VolumeType") or "gp2",
                "DeleteOnTermination": True if dot is None else bool(dot),
                "Encrypted": bool(ec2.snapshots[snap_id].encrypted) if snap_id else bool(
                    ebs.get("Encrypted")),
            }
            out["Ebs"] = {k: v for k, v in out["Ebs"].items() if v is not None}
        elif m.get("VirtualName"):
            out["VirtualName"] = m["VirtualName"]
        mappings.append(out)
    if mappings or root:
        if not root:
            raise _ec2_error("InvalidParameterValue", "RootDeviceName is required with "
                             "block device mappings.")
        root_map = next((m for m in mappings if m["DeviceName"] == root), None)
        if root_map is None or "SnapshotId" not in root_map.get("Ebs", {}):
            raise _ec2_error("InvalidBlockDeviceMapping",
                             f"The root device name {root} is not a mapping with a snapshot.")
    boot_mode = self._get_param("BootMode")
    if boot_mode and boot_mode not in ("legacy-bios", "uefi", "uefi-preferred"):
        raise _ec2_error("InvalidParameterValue", f"Invalid BootMode {boot_mode}")
    architecture = self._get_param("Architecture") or "x86_64"
    tags: dict[str, str] = {}
    for spec in self._get_param("TagSpecifications", []) or []:
        if spec.get("ResourceType") != "image":
            raise _ec2_error("InvalidParameterValue",
                             f"'{spec.get('ResourceType')}' is not a valid taggable resource "
                             "type for RegisterImage")
        tags.update({t["Key"]: t["Value"] for t in spec.get("Tags", [])})

    ami_id = random_ami_id()
    ami = StrictAmi(ec2, ami_id, name=name, description=self._get_param("Description"),
                    architecture=architecture,
                    virtualization_type=self._get_param("VirtualizationType") or "hvm",
                    root_device_type="ebs" if mappings else "instance-store",
                    root_device_name=root or "/dev/sda1", boot_mode=boot_mode,
                    tags=tags or None)
    # moto's Ami auto-creates a 15 GiB snapshot; a registered AMI owns no such snapshot.
    ec2.snapshots.pop(ami.ebs_snapshot.id, None)
    ami.block_device_mappings = mappings
    ami.ena_support = bool(self._get_param("EnaSupport"))
    ami.sriov_net_support = self._get_param("SriovNetSupport")
    ami.tpm_support = self._get_param("TpmSupport")
    ami.imds_support = self._get_param("ImdsSupport")
    ec2.amis[ami_id] = ami
    return ActionResult({"ImageId": ami_id})


_orig_delete_snapshot = EC2Backend.delete_snapshot


def strict_delete_snapshot(self: EC2Backend, snapshot_id: str) -> Any:
    """DeleteSnapshot: "You cannot delete a snapshot of the root device of an EBS volume used by
    a registered AMI. You must first deregister the AMI" -> InvalidSnapshot.InUse."""
    if snapshot_id not in self.snapshots:
        raise InvalidSnapshotIdError()
    for ami in self.amis.values():
        mappings = ami.block_device_mappings if isinstance(ami, StrictAmi) else []
        if any(m.get("Ebs", {}).get("SnapshotId") == snapshot_id for m in mappings):
            raise InvalidSnapshotInUse(snapshot_id, ami.id)
    result = _orig_delete_snapshot(self, snapshot_id)
    for backends in ebs_models.ebs_backends.values():
        for backend in backends.values():
            _strict_snapshots(backend).pop(snapshot_id, None)
    return result


def install_patches() -> None:
    for name in ("start_snapshot", "put_snapshot_block", "complete_snapshot",
                 "get_snapshot_block", "list_snapshot_blocks", "list_changed_blocks"):
        setattr(EBSResponse, name, getattr(StrictEBSResponse, name))
    EBSResponse._kms_key_arn = StrictEBSResponse._kms_key_arn  # type: ignore[attr-defined]
    AmisResponse.register_image = strict_register_image  # type: ignore[method-assign]
    EC2Backend.delete_snapshot = strict_delete_snapshot  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# WSGI middleware: operation naming, stats, seeded fault injection.
# --------------------------------------------------------------------------------------------

_CRED_RE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request")


def _service(environ: dict[str, Any]) -> str:
    m = _CRED_RE.search(environ.get("HTTP_AUTHORIZATION", ""))
    if m:
        return m.group(2)
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    cred = (qs.get("X-Amz-Credential") or [""])[0].split("/")
    return cred[3] if len(cred) > 3 else "s3"


def _ebs_operation(method: str, path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if method == "POST" and parts == ["snapshots"]:
        return "StartSnapshot"
    if method == "POST" and parts[:2] == ["snapshots", "completion"]:
        return "CompleteSnapshot"
    if len(parts) == 4 and parts[2] == "blocks":
        return "PutSnapshotBlock" if method == "PUT" else "GetSnapshotBlock"
    if len(parts) == 3 and parts[2] == "blocks":
        return "ListSnapshotBlocks"
    if len(parts) == 3 and parts[2] == "changedblocks":
        return "ListChangedBlocks"
    return f"{method} {path}"


def _s3_operation(method: str, path: str, query: dict[str, list[str]]) -> str:
    has_key = len([p for p in path.split("/") if p]) >= 2
    if "uploadId" in query:
        return {"PUT": "UploadPart", "POST": "CompleteMultipartUpload",
                "DELETE": "AbortMultipartUpload", "GET": "ListParts"}.get(method, method)
    if "uploads" in query:
        return "CreateMultipartUpload" if method == "POST" else "ListMultipartUploads"
    if has_key:
        return {"PUT": "PutObject", "GET": "GetObject", "HEAD": "HeadObject",
                "DELETE": "DeleteObject"}.get(method, method + "Object")
    return {"PUT": "CreateBucket", "GET": "ListObjects", "HEAD": "HeadBucket",
            "DELETE": "DeleteBucket"}.get(method, method + "Bucket")


# Headers the EBS API model marks required. moto cannot route a request without them (it
# answers an empty 404); AWS answers ValidationException.
_EBS_REQUIRED_HEADERS = {
    "ebs:PutSnapshotBlock": ("x-amz-Data-Length", "x-amz-Checksum", "x-amz-Checksum-Algorithm"),
    "ebs:CompleteSnapshot": ("x-amz-ChangedBlocksCount",),
}


def _ebs_missing_headers(service: str, op: str, environ: dict[str, Any]) -> list[str]:
    if service != "ebs":
        return []
    return [h for h in _EBS_REQUIRED_HEADERS.get(op, ())
            if not environ.get("HTTP_" + h.upper().replace("-", "_"))]


def _ebs_validation_response(start_response: Any, environ: dict[str, Any],
                             missing: list[str]) -> list[bytes]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    body = json.dumps({"message": f"Missing required header(s): {', '.join(missing)}",
                       "Reason": "INVALID_PARAMETER_VALUE"}).encode()
    start_response("400 Bad Request", [("Content-Type", "application/json"),
                                       ("x-amzn-ErrorType", "ValidationException"),
                                       ("Content-Length", str(len(body)))])
    return [body]


class RehostMiddleware:
    def __init__(self, app: Any):
        self.app = app
        # moto's models are not thread-safe; requests are served one at a time.
        self.lock = threading.Lock()
        self.configure({})
        self.reset()

    def configure(self, changes: dict[str, Any]) -> None:
        """Apply settings; the fault RNG restarts from the seed, so the same settings and the
        same request order give the same faults."""
        merged = {**SETTINGS, **changes}
        check_settings(merged)
        SETTINGS.update(merged)
        self.rate = float(SETTINGS["fault_rate"])
        self.rng = random.Random(str(SETTINGS["fault_seed"]))
        self.services = set(SETTINGS["fault_services"])

    def reset(self) -> None:
        self.requests: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.fault_log: list[list[Any]] = []
        self.seq = 0

    def _operation(self, environ: dict[str, Any], service: str) -> str:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if service == "ebs":
            return _ebs_operation(method, path)
        if service == "kms":
            return environ.get("HTTP_X_AMZ_TARGET", "").split(".")[-1] or method
        if service == "s3":
            return _s3_operation(method, path, query)
        if "Action" in query:
            return query["Action"][0]
        # Query protocol (EC2): Action is in the form body; read it and put it back.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        form = parse_qs(body.decode("utf-8", "replace"))
        return (form.get("Action") or [method])[0]

    def _fault(self, service: str, environ: dict[str, Any], start_response: Any) -> tuple[str, list[bytes]]:
        """Pick and answer a fault, before moto sees the request (so it has no effect)."""
        throttle = self.rng.random() < 0.5
        # Drain the unread body so a kept-alive connection stays in sync.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length and not isinstance(environ["wsgi.input"], io.BytesIO):
            environ["wsgi.input"].read(length)
        if service == "ebs":
            if throttle:
                code, status = self.rng.choice([("ThrottlingException", "429 Too Many Requests"),
                                                ("RequestThrottledException", "400 Bad Request")])
            else:
                code, status = "InternalServerException", "500 Internal Server Error"
            body = json.dumps({"message": f"rehost injected {code}", "Reason": "ACCOUNT_THROTTLED"
                               if code == "RequestThrottledException" else None}).encode()
            headers = [("Content-Type", "application/json"), ("x-amzn-ErrorType", code)]
        elif service == "kms":
            code, status = (("ThrottlingException", "400 Bad Request") if throttle
                            else ("KMSInternalException", "500 Internal Server Error"))
            body = json.dumps({"__type": code, "message": f"rehost injected {code}"}).encode()
            headers = [("Content-Type", "application/x-amz-json-1.1")]
        elif service == "s3":
            code, status = (("SlowDown", "503 Slow Down") if throttle
                            else ("InternalError", "500 Internal Server Error"))
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>rehost injected {code}</Message><RequestId>rehost</RequestId>"
                    "</Error>").encode()
            headers = [("Content-Type", "application/xml")]
        else:
            code, status = (("RequestLimitExceeded", "503 Service Unavailable") if throttle
                            else ("InternalError", "500 Internal Server Error"))
            body = (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}'
                    f"</Code><Message>rehost injected {code}</Message></Error></Errors>"
                    "<RequestID>rehost</RequestID></Response>").encode()
            headers = [("Content-Type", "text/xml")]
        start_response(status, headers + [("Content-Length", str(len(body)))])
        return code, [body]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_rehost/"):
            return self._control(environ, start_response)
        with self.lock:
            service = _service(environ)
            op = f"{service}:{self._operation(environ, service)}"
            self.seq += 1
            self.requests[op] = self.requests.get(op, 0) + 1
            if self.rate > 0 and service in self.services and self.rng.random() < self.rate:
                code, body = self._fault(service, environ, start_response)
                self.faults[op] = self.faults.get(op, 0) + 1
                self.fault_log.append([self.seq, op, code])
                return body
            missing = _ebs_missing_headers(service, op, environ)
            if missing:
                return _ebs_validation_response(start_response, environ, missing)
            # Run moto and materialize its answer while holding the lock.
            return list(self.app(environ, start_response))

    def _control(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        with self.lock:
            if path == "/_rehost/stats" and environ["REQUEST_METHOD"] == "GET":
                body = json.dumps({
                    "requests": self.requests,
                    "faults": self.faults,
                    "faults_total": sum(self.faults.values()),
                    "fault_log": self.fault_log,
                    "fault_rate": self.rate,
                }, sort_keys=True).encode()
                status = "200 OK"
            elif path == "/_rehost/stats/reset" and environ["REQUEST_METHOD"] == "POST":
                self.reset()
                body, status = b"{}", "200 OK"
            elif path == "/_rehost/config" and environ["REQUEST_METHOD"] in ("GET", "POST"):
                status = "200 OK"
                if environ["REQUEST_METHOD"] == "POST":
                    length = int(environ.get("CONTENT_LENGTH") or 0)
                    try:
                        changes = json.loads(environ["wsgi.input"].read(length) or b"{}")
                        unknown = set(changes) - set(SETTINGS)
                        if unknown:
                            raise ValueError(f"unknown settings {sorted(unknown)}")
                        self.configure(changes)
                        self.reset()
                    except (ValueError, TypeError) as e:
                        status = "400 Bad Request"
                        body = json.dumps({"error": str(e)}).encode()
                if status == "200 OK":
                    body = json.dumps(SETTINGS, sort_keys=True).encode()
            else:
                body, status = b'{"error": "not found"}', "404 Not Found"
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))])
        return [body]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: pick one)")
    args = parser.parse_args(argv)

    try:
        check_settings(SETTINGS)
    except ValueError as e:
        parser.error(str(e))

    install_patches()
    from werkzeug.serving import make_server

    from moto.moto_server.werkzeug_app import MotoRequestHandler

    app = RehostMiddleware(DomainDispatcherApplication(create_backend_app))
    # Loopback only: this server accepts any credentials.
    server = make_server("127.0.0.1", args.port, app, threaded=True,
                         request_handler=MotoRequestHandler)
    print(f"READY {server.port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
