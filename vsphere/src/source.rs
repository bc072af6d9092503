//! [`rehost_core::Source`] for vSphere: the inventory, a snapshot per run, the disk as
//! the snapshot froze it read through CBT's changed areas, and the snapshot's removal.

use bytes::Bytes;
use futures::{StreamExt, stream};
use rehost_core::plan::{Area, AreaKind, Piece, plan_pieces};
use rehost_core::{
    ChangeToken, DiskId, DiskRead, Extent, READ_ALIGNMENT, SnapshotOptions, SnapshotRef, Source,
    VmId, VmInfo,
};
use tracing::info;

use crate::cbt::{ALL_AREAS, widen_and_merge};
use crate::client::Client;
use crate::datastore::{DatastoreFile, flat_extent_path, parse_datastore_path};
use crate::error::{Error, Result};
use crate::soap::MoRef;

/// Bytes per ranged GET: large enough that HTTP overhead is small, small enough that a
/// retried read repeats little and [`READS_IN_FLIGHT`] of them stay in tens of MiB.
pub const READ_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

/// Ranged GETs in flight per disk: hides one request's latency behind the others';
/// vCenter's datastore interface proxies through the host, so more does not go faster.
pub const READS_IN_FLIGHT: usize = 4;

/// The vSphere [`Source`].
#[derive(Debug, Clone)]
pub struct VsphereSource {
    client: Client,
}

impl VsphereSource {
    /// A source over a logged-in client.
    pub fn new(client: Client) -> Self {
        VsphereSource { client }
    }

    /// The client, for the vSphere-specific calls.
    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn read(
        &self,
        snapshot: &SnapshotRef,
        disk: &DiskId,
        since: Option<&ChangeToken>,
    ) -> Result<DiskRead<Error>> {
        let vm = MoRef::new("VirtualMachine", snapshot.vm_ref.as_str());
        let snap = MoRef::new("VirtualMachineSnapshot", snapshot.snapshot_ref.as_str());
        let disks = self.client.snapshot_disks(&snap).await?;
        let frozen = disks
            .into_iter()
            .find(|d| d.key.to_string() == disk.0)
            .ok_or_else(|| Error::DiskNotFound {
                what: format!("snapshot {} of {}", snap.value, vm.value),
                key: disk.0.clone(),
            })?;
        if let Some(why) = frozen.unsupported_reason() {
            return Err(Error::Unsupported(format!("disk {}: {why}", disk.0)));
        }
        let token = frozen
            .change_id
            .clone()
            .ok_or_else(|| Error::ChangeTrackingOff {
                vm: vm.value.clone(),
                disk: disk.0.clone(),
            })?;
        let (datastore, path) =
            parse_datastore_path(&frozen.file_name).ok_or_else(|| Error::Protocol {
                method: "RetrievePropertiesEx".into(),
                detail: format!(
                    "disk file name {:?} is not `[datastore] path`",
                    frozen.file_name
                ),
            })?;
        if is_delta(path) {
            return Err(Error::Unsupported(format!(
                "disk {} of {} was already a snapshot delta ({}) when rehost's snapshot was \
                 taken: remove or consolidate the VM's other snapshots first",
                disk.0, vm.value, frozen.file_name
            )));
        }
        let capacity = frozen.capacity_bytes;
        let change_id = since.map(|t| t.0.as_str()).unwrap_or(ALL_AREAS);
        let areas = self
            .client
            .changed_areas(&vm, &snap, frozen.key, change_id, capacity)
            .await?;
        let areas = widen_and_merge(&areas, READ_ALIGNMENT, capacity);
        let data_bytes = areas.iter().map(|(_, len)| len).sum();
        let datacenter = self.client.datacenter_of(&vm).await?;
        let file = DatastoreFile::new(
            &self.client,
            &datacenter,
            datastore,
            &flat_extent_path(path),
        )?;
        info!(
            vm = %vm.value, disk = %disk.0, capacity, data_bytes, since = change_id,
            "reading disk from snapshot {}", snap.value
        );
        let read_areas: Vec<Area> = areas
            .iter()
            .map(|&(offset, len)| Area {
                offset,
                len,
                kind: AreaKind::Read,
            })
            .collect();
        let pieces = plan_pieces(&read_areas, capacity, READ_CHUNK_BYTES);
        let extents = stream::iter(pieces)
            .map(move |piece| {
                let file = file.clone();
                async move {
                    match piece {
                        Piece::Unchanged { offset, len } => Ok(Extent::Unchanged { offset, len }),
                        Piece::Zero { offset, len } => Ok(Extent::Zero { offset, len }),
                        Piece::Read { offset, len } => {
                            let data: Bytes = file.read_range(offset, len).await?;
                            Ok(Extent::Data { offset, data })
                        }
                    }
                }
            })
            .buffered(READS_IN_FLIGHT);
        Ok(DiskRead {
            capacity_bytes: capacity,
            token: ChangeToken(token),
            data_bytes,
            planned: Some(areas.clone()),
            extents: Box::pin(extents),
        })
    }
}

/// A delta disk vSphere names `disk-000001.vmdk`.
fn is_delta(path: &str) -> bool {
    path.strip_suffix(".vmdk")
        .and_then(|stem| stem.rsplit_once('-'))
        .is_some_and(|(_, n)| n.len() == 6 && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Source for VsphereSource {
    type Error = Error;

    async fn inventory(&self) -> Result<Vec<VmInfo>> {
        self.client.list_vms().await
    }

    async fn snapshot(&self, vm: &VmId, options: &SnapshotOptions) -> Result<SnapshotRef> {
        let found = self.client.find_vm_by_instance_uuid(&vm.0).await?;
        let snapshot = self
            .client
            .create_snapshot(
                &found,
                &options.name,
                &options.description,
                false,
                options.quiesce,
            )
            .await?;
        Ok(SnapshotRef {
            vm: vm.clone(),
            vm_ref: found.value,
            snapshot_ref: snapshot.value,
            name: options.name.clone(),
        })
    }

    async fn read_disk(
        &self,
        snapshot: &SnapshotRef,
        disk: &DiskId,
        since: Option<&ChangeToken>,
    ) -> Result<DiskRead<Error>> {
        self.read(snapshot, disk, since).await
    }

    async fn release(&self, snapshot: &SnapshotRef) -> Result<()> {
        self.client
            .remove_snapshot(&MoRef::new(
                "VirtualMachineSnapshot",
                snapshot.snapshot_ref.as_str(),
            ))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_are_recognised() {
        assert!(is_delta("vm/disk1-000001.vmdk"));
        assert!(!is_delta("vm/disk1.vmdk"));
        assert!(!is_delta("vm/disk1-flat.vmdk"));
    }
}
