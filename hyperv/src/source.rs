//! [`HypervSource`]: the [`Source`] trait over a Hyper-V host — recovery checkpoints,
//! RCT (or the VHDX's own allocation map for a full copy), and the frozen disk files read
//! over SMB with the disk-image library's readers.

use std::sync::Arc;

use futures::{StreamExt, stream};
use rehost_core::plan::{Area, AreaKind, Piece, plan_pieces};
use rehost_core::{
    ChangeToken, DiskId, DiskRead, Extent, ExtentKind, READ_ALIGNMENT, SnapshotOptions,
    SnapshotRef, Source, VmId, VmInfo,
};
use rehost_diskimage::Disk;
use tracing::{info, warn};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::files::HostFiles;
use crate::smb::SmbOpener;

/// Bytes per read: large enough to amortise an SMB round trip, small enough to bound memory.
const READ_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// Reads in flight per disk (memory: this many chunks).
const READS_IN_FLIGHT: usize = 4;
/// The token a read hands out until the export converts the checkpoint to a reference
/// point, which is when Hyper-V issues the RCT ids the next run asks changes from.
pub const PENDING_TOKEN: &str = "rct-pending";

/// A Hyper-V host as a source of VMs.
#[derive(Debug, Clone)]
pub struct HypervSource {
    client: Arc<Client>,
    smb: Arc<SmbOpener>,
    files: HostFiles,
    host_label: String,
}

impl HypervSource {
    /// A source over a WS-Management client and the host's files (SMB).
    pub fn new(client: Arc<Client>, smb: Arc<SmbOpener>, host_label: impl Into<String>) -> Self {
        HypervSource {
            client,
            files: HostFiles::new(smb.clone()),
            smb,
            host_label: host_label.into(),
        }
    }

    /// The SMB session to the host's shares.
    pub fn smb(&self) -> &SmbOpener {
        &self.smb
    }

    /// The WS-Management client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The name the host goes by in VM paths.
    pub fn host_label(&self) -> &str {
        &self.host_label
    }

    /// One VM by name or id.
    pub async fn find_vm(&self, name_or_id: &str) -> Result<crate::host::HyperVm> {
        self.client.find_vm(name_or_id, &self.host_label).await
    }

    /// Opens a disk file and its parents over SMB (blocking I/O off the async threads).
    async fn open_disk(&self, path: &str) -> Result<Arc<Disk>> {
        let files = self.files.clone();
        let path = path.to_owned();
        let disk = blocking("opening a disk", move || Disk::open_with(&files, &path)).await?;
        Ok(Arc::new(disk))
    }

    async fn map(disk: &Arc<Disk>) -> Result<Vec<rehost_core::MapExtent>> {
        let disk = disk.clone();
        blocking("mapping a disk", move || {
            disk.map_range(0, disk.virtual_size())
        })
        .await
    }

    async fn read(
        &self,
        snapshot: &SnapshotRef,
        disk_id: &DiskId,
        since: Option<&ChangeToken>,
    ) -> Result<DiskRead<Error>> {
        let disks = self.client.disks_of(&snapshot.snapshot_ref).await?;
        let frozen = disks.iter().find(|d| d.id == disk_id.0).ok_or_else(|| {
            Error::NotFound(format!(
                "checkpoint {} holds no disk {disk_id} (it holds {})",
                snapshot.name,
                disks
                    .iter()
                    .map(|d| d.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        let disk = self.open_disk(&frozen.path).await?;
        let capacity = disk.virtual_size();
        let areas = match since {
            None => allocated_areas(&Self::map(&disk).await?, false),
            Some(token) => match self
                .client
                .changed_ranges(&frozen.path, &token.0, capacity)
                .await
            {
                Ok(ranges) => widen(&ranges, capacity, READ_ALIGNMENT),
                Err(Error::RctInvalid { detail, .. }) => {
                    // Every allocated block is read, and every other one written as zero:
                    // a delta that no longer relies on knowing what changed.
                    warn!(
                        disk = %disk_id, rct_id = %token.0, %detail,
                        "the host no longer knows the previous run's RCT id: copying the whole disk (a full copy written as a delta)"
                    );
                    allocated_areas(&Self::map(&disk).await?, true)
                }
                Err(e) => return Err(e),
            },
        };
        let data_bytes: u64 = areas
            .iter()
            .filter(|a| a.kind == AreaKind::Read)
            .map(|a| a.len)
            .sum();
        info!(
            disk = %disk_id, path = %frozen.path, capacity, data_bytes, incremental = since.is_some(),
            "reading disk from checkpoint {}", snapshot.name
        );
        let planned = areas.iter().map(|a| (a.offset, a.len)).collect();
        let pieces = plan_pieces(&areas, capacity, READ_CHUNK_BYTES);
        let extents = stream::iter(pieces)
            .map(move |piece| {
                let disk = disk.clone();
                async move {
                    match piece {
                        Piece::Unchanged { offset, len } => Ok(Extent::Unchanged { offset, len }),
                        Piece::Zero { offset, len } => Ok(Extent::Zero { offset, len }),
                        Piece::Read { offset, len } => read_piece(disk, offset, len).await,
                    }
                }
            })
            .buffered(READS_IN_FLIGHT);
        Ok(DiskRead {
            capacity_bytes: capacity,
            token: ChangeToken(PENDING_TOKEN.to_owned()),
            data_bytes,
            planned: Some(planned),
            extents: Box::pin(extents),
        })
    }
}

async fn read_piece(disk: Arc<Disk>, offset: u64, len: u64) -> Result<Extent> {
    let size =
        usize::try_from(len).map_err(|_| Error::Unsupported(format!("a read of {len} bytes")))?;
    blocking(format!("reading {len} bytes at {offset}"), move || {
        let mut buf = vec![0u8; size];
        disk.read_at(&mut buf, offset)?;
        Ok(Extent::Data {
            offset,
            data: bytes::Bytes::from(buf),
        })
    })
    .await
}

/// Runs the synchronous disk-image code (SMB reads underneath) on a blocking thread; a
/// thread that died is a transient failure of `operation`.
async fn blocking<T: Send + 'static>(
    operation: impl Into<String>,
    work: impl FnOnce() -> rehost_diskimage::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Smb {
            operation: operation.into(),
            detail: e.to_string(),
            kind: rehost_core::ErrorKind::Transient,
        })?
        .map_err(Error::Image)
}

/// The areas of a full copy: the map's data, widened to whole EBS blocks. With
/// `zero_the_rest`, every other block is a `Zero` area (a delta that covers the whole disk).
fn allocated_areas(map: &[rehost_core::MapExtent], zero_the_rest: bool) -> Vec<Area> {
    let capacity = map.last().map_or(0, |e| e.end());
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.len))
        .collect();
    let reads = widen(&data, capacity, READ_ALIGNMENT);
    if !zero_the_rest {
        return reads;
    }
    let mut areas = Vec::new();
    let mut at = 0;
    for read in reads {
        if read.offset > at {
            areas.push(Area {
                offset: at,
                len: read.offset - at,
                kind: AreaKind::Zero,
            });
        }
        at = read.offset + read.len;
        areas.push(read);
    }
    if at < capacity {
        areas.push(Area {
            offset: at,
            len: capacity - at,
            kind: AreaKind::Zero,
        });
    }
    areas
}

/// Sorted byte ranges widened to whole `block`s (the last one clipped to `capacity`) and
/// merged: what the aligned extents of the trait must cover.
pub fn widen(ranges: &[(u64, u64)], capacity: u64, block: u64) -> Vec<Area> {
    let mut areas: Vec<Area> = Vec::new();
    for &(offset, len) in ranges {
        if len == 0 || offset >= capacity {
            continue;
        }
        let start = offset / block * block;
        let end = offset
            .saturating_add(len)
            .div_ceil(block)
            .saturating_mul(block)
            .min(capacity);
        match areas.last_mut() {
            Some(last) if start <= last.offset + last.len => {
                last.len = last.len.max(end - last.offset);
            }
            _ => areas.push(Area {
                offset: start,
                len: end - start,
                kind: AreaKind::Read,
            }),
        }
    }
    areas
}

impl Source for HypervSource {
    type Error = Error;

    async fn inventory(&self) -> Result<Vec<VmInfo>> {
        Ok(self
            .client
            .vms(&self.host_label)
            .await?
            .into_iter()
            .map(|vm| vm.info)
            .collect())
    }

    /// A recovery checkpoint, named `options.name` (rehost's prefix).
    /// `vm` is the VM id (its `Msvm_ComputerSystem.Name`).
    async fn snapshot(&self, vm: &VmId, options: &SnapshotOptions) -> Result<SnapshotRef> {
        let checkpoint = self
            .client
            .create_checkpoint(&vm.0, &options.name, options.quiesce)
            .await?;
        Ok(SnapshotRef {
            vm: vm.clone(),
            vm_ref: vm.0.clone(),
            snapshot_ref: checkpoint,
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

    /// Deletes the checkpoint (Hyper-V merges its `.avhdx`); one already gone is success.
    async fn release(&self, snapshot: &SnapshotRef) -> Result<()> {
        self.client.destroy_checkpoint(&snapshot.snapshot_ref).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: u64 = rehost_core::EBS_BLOCK_SIZE;

    #[test]
    fn ranges_widen_to_blocks_and_merge() {
        let areas = widen(&[(10, 5), (B - 1, 2), (5 * B, 1)], 5 * B + 100, B);
        assert_eq!(
            areas.iter().map(|a| (a.offset, a.len)).collect::<Vec<_>>(),
            vec![(0, 2 * B), (5 * B, 100)]
        );
        assert!(widen(&[(10 * B, 1)], B, B).is_empty());
    }

    #[test]
    fn a_full_copy_as_a_delta_zeroes_what_is_not_allocated() {
        let map = [
            rehost_core::MapExtent {
                offset: 0,
                len: B,
                kind: ExtentKind::Unallocated,
            },
            rehost_core::MapExtent {
                offset: B,
                len: 10,
                kind: ExtentKind::Data,
            },
            rehost_core::MapExtent {
                offset: B + 10,
                len: 3 * B - 10,
                kind: ExtentKind::Zero,
            },
        ];
        // Reads are widened to whole grains, not whole EBS blocks.
        const G: u64 = READ_ALIGNMENT;
        let full = allocated_areas(&map, false);
        assert_eq!(
            full,
            vec![Area {
                offset: B,
                len: G,
                kind: AreaKind::Read
            }]
        );
        let delta = allocated_areas(&map, true);
        assert_eq!(
            delta
                .iter()
                .map(|a| (a.offset, a.len, a.kind))
                .collect::<Vec<_>>(),
            vec![
                (0, B, AreaKind::Zero),
                (B, G, AreaKind::Read),
                (B + G, 3 * B - G, AreaKind::Zero)
            ]
        );
    }

    proptest! {
        #[test]
        fn widened_areas_cover_every_range_aligned_and_disjoint(
            mut ranges in proptest::collection::vec((0u64..64 * B, 1u64..3 * B), 0..20),
            capacity in 1u64..70 * B,
        ) {
            ranges.sort();
            let areas = widen(&ranges, capacity, B);
            for w in areas.windows(2) {
                prop_assert!(w[0].offset + w[0].len < w[1].offset);
            }
            for a in &areas {
                prop_assert_eq!(a.offset % B, 0);
                prop_assert!(a.offset + a.len <= capacity);
                prop_assert!((a.offset + a.len) % B == 0 || a.offset + a.len == capacity);
            }
            for &(o, l) in &ranges {
                for point in [o, (o + l - 1)] {
                    if point < capacity {
                        prop_assert!(areas.iter().any(|a| a.offset <= point && point < a.offset + a.len));
                    }
                }
            }
        }
    }
}
