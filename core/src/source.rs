//! What every source of VMs (vSphere, Hyper-V, Azure) offers the connector: an inventory,
//! a point-in-time snapshot, the disks' changed areas as an ordered extent stream, and
//! the release of that snapshot.
//!
//! The trait is deliberately small: everything source-specific (SOAP, WS-Management,
//! ARM) stays in the source's crate, and the connector's run pipeline is written once.

use std::future::Future;
use std::pin::Pin;

use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::{DiskId, ErrorKind, Extent, VmId};

/// An error a source reports, classified so the scheduler can retry by kind.
pub trait SourceError: std::error::Error + Send + Sync + 'static {
    /// How the failure should be handled.
    fn kind(&self) -> ErrorKind;
}

/// Power state of a VM as the source reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    PoweredOn,
    PoweredOff,
    Suspended,
    Unknown,
}

/// Boot firmware of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Firmware {
    Bios,
    Efi,
    Unknown,
}

/// One VM of a source's inventory: what the server catalog stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Stable id across renames and moves (vSphere: the instance UUID).
    pub id: VmId,
    /// Display name.
    pub name: String,
    /// Where the VM sits in the source's inventory (vSphere: `/DC0/vm/folder/name`).
    pub path: String,
    /// The source's own handle for the VM in the current session (vSphere: the
    /// managed object id, `vm-42`); not stable across re-registration.
    pub source_ref: String,
    pub power_state: PowerState,
    /// Guest OS as the hypervisor knows it (vSphere: `guestFullName`, else `guestId`).
    pub guest_os: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub firmware: Firmware,
    /// Whether changed-block tracking is on (vSphere CBT, Hyper-V RCT).
    pub change_tracking: bool,
    pub disks: Vec<DiskInfo>,
}

impl VmInfo {
    /// The reasons the VM cannot be replicated as it is: one line per unsupported disk.
    pub fn unsupported_reasons(&self) -> Vec<String> {
        self.disks
            .iter()
            .filter_map(|d| {
                d.unsupported
                    .as_ref()
                    .map(|why| format!("disk {} ({}): {why}", d.id, d.label))
            })
            .collect()
    }
}

/// One virtual disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Stable id within the VM (vSphere: the device key, `2000`).
    pub id: DiskId,
    /// Human label (vSphere: `Hard disk 1`).
    pub label: String,
    pub capacity_bytes: u64,
    /// Where the disk lives (vSphere: `[datastore] folder/disk.vmdk`).
    pub location: String,
    /// The source's change token for the disk as last reported (vSphere: `backing.changeId`).
    pub change_id: Option<String>,
    /// Why the disk cannot be replicated (an RDM, an independent disk), if it cannot.
    pub unsupported: Option<String>,
}

/// Options for taking a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// Snapshot name; sources that can recognise their own leftovers put a fixed prefix
    /// in it.
    pub name: String,
    pub description: String,
    /// Ask the guest tools to quiesce file systems first.
    pub quiesce: bool,
}

/// A snapshot a source took for us: enough to read from it and to remove it, even from
/// a new process after a crash (it is persisted before anything else is done with it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub vm: VmId,
    /// The VM's handle at the source when the snapshot was taken.
    pub vm_ref: String,
    /// The snapshot's handle at the source (vSphere: `snapshot-17`).
    pub snapshot_ref: String,
    pub name: String,
}

/// A source's marker of a disk's state, from which the next run asks for changes
/// (vSphere: a CBT changeId; Hyper-V: an RCT id; Azure: the previous snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChangeToken(pub String);

/// An ordered stream of extents covering a whole disk, `[0, capacity)`.
pub type ExtentStream<E> = Pin<Box<dyn Stream<Item = Result<Extent, E>> + Send>>;

/// What a disk read returns: the extents, the size of the disk, and the token of the
/// state read (to pass as `since` next time).
pub struct DiskRead<E> {
    pub capacity_bytes: u64,
    pub token: ChangeToken,
    /// Bytes of data the stream will carry (the changed or allocated areas), for progress.
    pub data_bytes: u64,
    /// The areas `(offset, len)` the stream will carry as `Data` or `Zero`, in order, when
    /// the source knows them before reading: writers that lay out their blocks before the
    /// data (a dynamic VHD written forward-only) need them.
    pub planned: Option<Vec<(u64, u64)>>,
    pub extents: ExtentStream<E>,
}

impl<E> std::fmt::Debug for DiskRead<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskRead")
            .field("capacity_bytes", &self.capacity_bytes)
            .field("token", &self.token)
            .field("data_bytes", &self.data_bytes)
            .finish_non_exhaustive()
    }
}

/// A source of VMs.
pub trait Source: Send + Sync {
    type Error: SourceError;

    /// Every VM the source can see.
    fn inventory(&self) -> impl Future<Output = Result<Vec<VmInfo>, Self::Error>> + Send;

    /// Takes a crash-consistent (or quiesced) snapshot of `vm`.
    fn snapshot(
        &self,
        vm: &VmId,
        options: &SnapshotOptions,
    ) -> impl Future<Output = Result<SnapshotRef, Self::Error>> + Send;

    /// Reads `disk` as it is in `snapshot`: with `since`, only what changed after that
    /// token (the rest is `Extent::Unchanged`); without, every allocated area (the rest
    /// `Unchanged`, i.e. unallocated). Extents are aligned to [`crate::READ_ALIGNMENT`]
    /// (64 KiB), not to the EBS block: an export digests a block changed only in part over
    /// the previous export's bytes.
    fn read_disk(
        &self,
        snapshot: &SnapshotRef,
        disk: &DiskId,
        since: Option<&ChangeToken>,
    ) -> impl Future<Output = Result<DiskRead<Self::Error>, Self::Error>> + Send;

    /// Removes `snapshot`. Idempotent: a snapshot already gone is success, so it can be
    /// called again after a crash with a reference read back from the store.
    fn release(
        &self,
        snapshot: &SnapshotRef,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}
