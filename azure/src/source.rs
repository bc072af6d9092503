//! [`rehost_core::Source`] for Azure: an incremental snapshot of each managed disk of a VM,
//! read through a short-lived SAS — every allocated page for a first copy, the page-range
//! diff against the previous run's snapshot afterwards — and access always revoked.
//!
//! Unlike a vSphere snapshot, the snapshot of a successful run is not removed: it is the
//! base the next run's diff is asked against (the change token is its resource id). What
//! the caller does once the export is safe: [`AzureSource::keep`] this run's snapshots and
//! [`AzureSource::delete_snapshot`] the previous run's. A failed export releases them
//! ([`Source::release`]: access revoked, snapshots deleted).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, stream};
use rehost_core::{
    ChangeToken, DiskId, DiskRead, Extent, READ_ALIGNMENT, SnapshotOptions, SnapshotRef, Source,
    VmId, VmInfo,
};
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::client::{Client, api};
use crate::error::{Error, Result};
use crate::pages::{PageRange, parse_page_list, plan_areas};
use rehost_core::plan::{AreaKind, Piece, plan_pieces};

/// Bytes per ranged GET: Azure serves up to 4 MiB per page-blob read at full speed.
pub const READ_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// Ranged GETs in flight per disk: a blob's throughput comes from parallel reads.
pub const READS_IN_FLIGHT: usize = 8;
/// The shortest read access we ask for; revoked as soon as the read ends anyway. The
/// duration bounds the exposure if the connector dies before it can revoke.
pub const MIN_ACCESS_SECONDS: u64 = 600;
/// The slowest read we plan for when sizing the access: 50 MiB/s.
const PLANNED_READ_BYTES_PER_SECOND: u64 = 50 << 20;

/// Read access long enough to read `bytes` at a slow pace, and no longer: ten minutes plus
/// the read's time at 50 MiB/s, at most a day.
pub fn access_seconds(bytes: u64) -> u64 {
    (MIN_ACCESS_SECONDS + bytes / PLANNED_READ_BYTES_PER_SECOND).min(24 * 3600)
}
/// The tag every snapshot rehost makes carries (its value: the snapshot set's name).
pub const SNAPSHOT_TAG: &str = "rehost-snapshot";

/// The Azure [`Source`].
#[derive(Debug, Clone)]
pub struct AzureSource {
    client: Client,
    /// Snapshots we hold a SAS on: revoked by [`AzureSource::end_access`] whatever happens.
    granted: Arc<Mutex<BTreeSet<String>>>,
}

/// One disk's snapshot in a [`SnapshotRef`]'s `snapshot_ref` (a JSON list of these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    /// The disk's key in the VM (`os`, `lun0`).
    pub disk: String,
    /// The snapshot's resource id.
    pub snapshot: String,
}

/// The disk snapshots a [`SnapshotRef`] stands for.
pub fn disk_snapshots(snapshot: &SnapshotRef) -> Result<Vec<DiskSnapshot>> {
    serde_json::from_str(&snapshot.snapshot_ref).map_err(|e| {
        Error::Config(format!(
            "snapshot reference {:?} is not an Azure snapshot list: {e}",
            snapshot.snapshot_ref
        ))
    })
}

impl AzureSource {
    /// A source over a client.
    pub fn new(client: Client) -> Self {
        AzureSource {
            client,
            granted: Arc::new(Mutex::new(BTreeSet::new())),
        }
    }

    /// The client, for Azure-specific calls.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates one incremental snapshot per managed disk of `vm`, named
    /// `{options.name}-{disk}` in the disk's resource group. On failure the ones made so
    /// far (and the one that failed, which may exist) are deleted.
    async fn snapshot_vm(&self, vm: &VmId, options: &SnapshotOptions) -> Result<SnapshotRef> {
        let found = self.client.find_vm(&vm.0).await?;
        let mut made: Vec<DiskSnapshot> = Vec::new();
        for disk in &found.disks {
            let group = resource_group_of(&disk.resource_id)?;
            let name = format!("{}-{}", options.name, disk.key);
            let id = format!(
                "{}/resourceGroups/{group}/providers/Microsoft.Compute/snapshots/{name}",
                self.client.subscription_path()
            );
            made.push(DiskSnapshot {
                disk: disk.key.0.clone(),
                snapshot: id.clone(),
            });
            let body = json!({
                "location": found.location,
                "tags": {
                    SNAPSHOT_TAG: options.name,
                    "rehost-vm": found.info.id.0,
                    "rehost-disk": disk.key.0,
                    // Tag values hold at most 256 characters.
                    "rehost-note": options.description.chars().take(256).collect::<String>(),
                },
                "properties": {
                    "creationData": {"createOption": "Copy", "sourceResourceId": disk.resource_id},
                    "incremental": true
                }
            });
            let url = self.client.arm_url(&id, api::COMPUTE_DISKS);
            let created = self
                .client
                .long_running(
                    Method::PUT,
                    &url,
                    Some(&body),
                    &format!("creating snapshot {name} of disk {}", disk.name),
                    false,
                )
                .await;
            if let Err(err) = created {
                for undo in &made {
                    if let Err(e) = self.delete_snapshot(&undo.snapshot).await {
                        warn!(snapshot = %undo.snapshot, error = %e, "could not delete a snapshot after a failed snapshot set");
                    }
                }
                return Err(err);
            }
            info!(vm = %found.info.name, disk = %disk.key, snapshot = %name, "incremental snapshot created");
        }
        Ok(SnapshotRef {
            vm: vm.clone(),
            vm_ref: found.resource_id.clone(),
            snapshot_ref: serde_json::to_string(&made).unwrap_or_default(),
            name: options.name.clone(),
        })
    }

    /// Grants read access to a snapshot of `bytes` for as long as reading it may take
    /// ([`access_seconds`]): its SAS URL. Recorded so it is always revoked.
    pub async fn grant_access(&self, snapshot_id: &str, bytes: u64) -> Result<String> {
        if let Ok(mut granted) = self.granted.lock() {
            granted.insert(snapshot_id.to_owned());
        }
        let url = self
            .client
            .arm_url(&format!("{snapshot_id}/beginGetAccess"), api::COMPUTE_DISKS);
        let body = json!({"access": "Read", "durationInSeconds": access_seconds(bytes)});
        let done = self
            .client
            .long_running(
                Method::POST,
                &url,
                Some(&body),
                &format!("granting read access to {}", short(snapshot_id)),
                true,
            )
            .await?;
        done.result
            .as_ref()
            .and_then(|r| r.get("accessSAS"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::Protocol {
                operation: format!("granting read access to {}", short(snapshot_id)),
                detail: "the operation succeeded without an accessSAS".into(),
            })
    }

    /// Revokes read access to a snapshot (a snapshot that is gone has none).
    pub async fn revoke_access(&self, snapshot_id: &str) -> Result<()> {
        let url = self
            .client
            .arm_url(&format!("{snapshot_id}/endGetAccess"), api::COMPUTE_DISKS);
        match self
            .client
            .long_running(
                Method::POST,
                &url,
                None,
                &format!("revoking read access to {}", short(snapshot_id)),
                false,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e),
        }
        if let Ok(mut granted) = self.granted.lock() {
            granted.remove(snapshot_id);
        }
        Ok(())
    }

    /// Revokes every access this source granted; returns the first failure after trying all.
    pub async fn end_access(&self) -> Result<()> {
        let granted: Vec<String> = match self.granted.lock() {
            Ok(g) => g.iter().cloned().collect(),
            Err(_) => Vec::new(),
        };
        let mut first_error = None;
        for id in granted {
            if let Err(e) = self.revoke_access(&id).await {
                warn!(snapshot = %id, error = %e, "could not revoke read access");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Deletes a snapshot; one that is gone already is success. A snapshot with an active
    /// SAS (ours, or one a crashed connector left) cannot be deleted: its access is revoked
    /// and the delete tried again.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        if self.has_granted(snapshot_id) {
            self.revoke_access(snapshot_id).await?;
        }
        match self.delete_once(snapshot_id).await {
            Err(e) if e.status() == Some(409) => {
                self.revoke_access(snapshot_id).await?;
                self.delete_once(snapshot_id).await
            }
            other => other,
        }
    }

    fn has_granted(&self, snapshot_id: &str) -> bool {
        self.granted
            .lock()
            .map_or(true, |g| g.contains(snapshot_id))
    }

    async fn delete_once(&self, snapshot_id: &str) -> Result<()> {
        let url = self.client.arm_url(snapshot_id, api::COMPUTE_DISKS);
        match self
            .client
            .long_running(
                Method::DELETE,
                &url,
                None,
                &format!("deleting snapshot {}", short(snapshot_id)),
                false,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Keeps a run's snapshots as the next run's base: only their access is revoked.
    pub async fn keep(&self, snapshot: &SnapshotRef) -> Result<()> {
        for disk in disk_snapshots(snapshot)? {
            self.revoke_access(&disk.snapshot).await?;
        }
        Ok(())
    }

    /// Every snapshot rehost made in the subscription (tagged [`SNAPSHOT_TAG`]), as
    /// (resource id, tag value).
    pub async fn tagged_snapshots(&self) -> Result<Vec<(String, String)>> {
        let path = format!(
            "{}/providers/Microsoft.Compute/snapshots",
            self.client.subscription_path()
        );
        let all = self
            .client
            .list(&path, api::COMPUTE_DISKS, "listing snapshots")
            .await?;
        Ok(all
            .iter()
            .filter_map(|s| {
                let tag = s.pointer(&format!("/tags/{SNAPSHOT_TAG}"))?.as_str()?;
                Some((s.get("id")?.as_str()?.to_owned(), tag.to_owned()))
            })
            .collect())
    }

    async fn page_ranges(
        &self,
        sas: &str,
        previous_sas: Option<&str>,
        operation: &str,
    ) -> Result<Vec<PageRange>> {
        let mut ranges: Vec<PageRange> = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut url = format!("{sas}&comp=pagelist");
            if let Some(m) = &marker {
                url.push_str(&format!("&marker={}", crate::client::encode(m)));
            }
            let mut headers = Vec::new();
            if let Some(previous) = previous_sas {
                headers.push(("x-ms-previous-snapshot-url", previous.to_owned()));
            }
            let answer = self.client.blob_get(&url, &headers, operation).await?;
            let list = parse_page_list(&answer.body)?;
            if let (Some(last), Some(first)) = (ranges.last(), list.ranges.first())
                && first.start < last.end
            {
                return Err(Error::Protocol {
                    operation: operation.to_owned(),
                    detail: "a page of the list goes back over the previous one".into(),
                });
            }
            ranges.extend(list.ranges);
            match list.next_marker {
                Some(next) if Some(&next) != marker.as_ref() => marker = Some(next),
                Some(_) => {
                    return Err(Error::Protocol {
                        operation: operation.to_owned(),
                        detail: "the same NextMarker twice".into(),
                    });
                }
                None => return Ok(ranges),
            }
        }
    }

    async fn read(
        &self,
        snapshot: &SnapshotRef,
        disk: &DiskId,
        since: Option<&ChangeToken>,
    ) -> Result<DiskRead<Error>> {
        let snapshots = disk_snapshots(snapshot)?;
        let this = snapshots.iter().find(|d| d.disk == disk.0).ok_or_else(|| {
            Error::NotFound(format!("no snapshot of disk {disk} in {}", snapshot.name))
        })?;
        let described = self
            .client
            .get_json(&this.snapshot, api::COMPUTE_DISKS, "reading the snapshot")
            .await?;
        let capacity = described
            .pointer("/properties/diskSizeBytes")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::Protocol {
                operation: format!("reading snapshot {}", short(&this.snapshot)),
                detail: "no diskSizeBytes".into(),
            })?;
        let source_disk = described
            .pointer("/properties/creationData/sourceResourceId")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let sas = self.grant_access(&this.snapshot, capacity).await?;
        check_footer(&self.client, &sas, capacity).await?;
        let previous_sas = match since {
            Some(token) => {
                let previous = self
                    .client
                    .get_json(
                        &token.0,
                        api::COMPUTE_DISKS,
                        "reading the previous snapshot",
                    )
                    .await
                    .map_err(|e| match e.status() {
                        Some(404) => Error::NotFound(format!(
                            "the previous run's snapshot {} is gone: run a full copy",
                            token.0
                        )),
                        _ => e,
                    })?;
                let previous_disk = previous
                    .pointer("/properties/creationData/sourceResourceId")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !previous_disk.eq_ignore_ascii_case(&source_disk) {
                    return Err(Error::Unsupported(format!(
                        "disk {disk} is now {source_disk}, the previous snapshot is of {previous_disk}: the disk was replaced; run a full copy"
                    )));
                }
                Some(self.grant_access(&token.0, capacity).await?)
            }
            None => None,
        };
        let operation = format!("listing the pages of disk {disk}");
        let ranges = self
            .page_ranges(&sas, previous_sas.as_deref(), &operation)
            .await?;
        let areas = plan_areas(&ranges, capacity, READ_ALIGNMENT);
        let data_bytes: u64 = areas
            .iter()
            .filter(|a| a.kind == AreaKind::Read)
            .map(|a| a.len)
            .sum();
        info!(
            disk = %disk, capacity, data_bytes, incremental = since.is_some(),
            "reading disk from snapshot {}", short(&this.snapshot)
        );
        let planned = areas.iter().map(|a| (a.offset, a.len)).collect();
        let pieces = plan_pieces(&areas, capacity, READ_CHUNK_BYTES);
        let client = self.client.clone();
        let extents = stream::iter(pieces)
            .map(move |piece| {
                let client = client.clone();
                let sas = sas.clone();
                async move {
                    match piece {
                        Piece::Unchanged { offset, len } => Ok(Extent::Unchanged { offset, len }),
                        Piece::Zero { offset, len } => Ok(Extent::Zero { offset, len }),
                        Piece::Read { offset, len } => {
                            let data = read_range(&client, &sas, offset, len).await?;
                            Ok(Extent::Data { offset, data })
                        }
                    }
                }
            })
            .buffered(READS_IN_FLIGHT);
        Ok(DiskRead {
            capacity_bytes: capacity,
            token: ChangeToken(this.snapshot.clone()),
            data_bytes,
            planned: Some(planned),
            extents: Box::pin(extents),
        })
    }
}

/// The resource group a resource id names.
fn resource_group_of(id: &str) -> Result<&str> {
    let mut parts = id.split('/');
    while let Some(part) = parts.next() {
        if part.eq_ignore_ascii_case("resourceGroups") {
            if let Some(group) = parts.next().filter(|g| !g.is_empty()) {
                return Ok(group);
            }
        }
    }
    Err(Error::Protocol {
        operation: "reading a resource id".into(),
        detail: format!("{id:?} names no resource group"),
    })
}

/// The last segment of a resource id, for messages.
fn short(id: &str) -> &str {
    id.rsplit('/').next().unwrap_or(id)
}

/// Checks the blob ends with a fixed-VHD footer for a disk of `capacity` bytes: the blob
/// is the disk plus that footer, and reading a blob of another shape would copy a wrong disk.
async fn check_footer(client: &Client, sas: &str, capacity: u64) -> Result<()> {
    let footer = read_range(client, sas, capacity, 512).await?;
    let operation = "checking the snapshot's VHD footer";
    if &footer[..8] != b"conectix" {
        return Err(Error::Protocol {
            operation: operation.into(),
            detail: format!("no VHD footer after the disk's {capacity} bytes"),
        });
    }
    let size = u64::from_be_bytes(footer[48..56].try_into().unwrap_or_default());
    if size != capacity {
        return Err(Error::Protocol {
            operation: operation.into(),
            detail: format!("the footer says {size} bytes, the snapshot {capacity}"),
        });
    }
    Ok(())
}

/// One ranged GET of exactly `[offset, offset + len)`.
async fn read_range(client: &Client, sas: &str, offset: u64, len: u64) -> Result<Bytes> {
    let last = offset + len - 1;
    let operation = format!("reading bytes {offset}-{last}");
    let answer = client
        .blob_get(
            sas,
            &[("x-ms-range", format!("bytes={offset}-{last}"))],
            &operation,
        )
        .await?;
    let range = answer
        .headers
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let expected = format!("bytes {offset}-{last}/");
    if answer.status.as_u16() != 206 || !range.starts_with(&expected) {
        return Err(Error::Protocol {
            operation,
            detail: format!("HTTP {} with Content-Range {range:?}", answer.status),
        });
    }
    if answer.body.len() as u64 != len {
        return Err(Error::Protocol {
            operation,
            detail: format!("{} bytes instead of {len}", answer.body.len()),
        });
    }
    Ok(answer.body)
}

impl Source for AzureSource {
    type Error = Error;

    async fn inventory(&self) -> Result<Vec<VmInfo>> {
        Ok(self
            .client
            .list_vms()
            .await?
            .into_iter()
            .map(|vm| vm.info)
            .collect())
    }

    async fn snapshot(&self, vm: &VmId, options: &SnapshotOptions) -> Result<SnapshotRef> {
        self.snapshot_vm(vm, options).await
    }

    async fn read_disk(
        &self,
        snapshot: &SnapshotRef,
        disk: &DiskId,
        since: Option<&ChangeToken>,
    ) -> Result<DiskRead<Error>> {
        self.read(snapshot, disk, since).await
    }

    /// Revokes access and deletes the snapshots (a failed or abandoned export's).
    async fn release(&self, snapshot: &SnapshotRef) -> Result<()> {
        let mut first_error = self.end_access().await.err();
        for disk in disk_snapshots(snapshot)? {
            if let Err(e) = self.delete_snapshot(&disk.snapshot).await {
                warn!(snapshot = %disk.snapshot, error = %e, "could not delete a snapshot");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_lasts_as_long_as_the_read_may() {
        assert_eq!(access_seconds(0), 600);
        assert_eq!(access_seconds(4 << 30), 600 + 81);
        assert_eq!(access_seconds(u64::MAX), 24 * 3600);
    }

    #[test]
    fn resource_groups_are_found_in_ids() {
        assert_eq!(
            resource_group_of(
                "/subscriptions/s/resourceGroups/prod-rg/providers/Microsoft.Compute/disks/d"
            )
            .expect("group"),
            "prod-rg"
        );
        assert_eq!(
            resource_group_of("/subscriptions/s/resourcegroups/RG2/providers/x").expect("group"),
            "RG2"
        );
        assert!(resource_group_of("/subscriptions/s").is_err());
    }

    #[test]
    fn snapshot_refs_round_trip() {
        let list = vec![DiskSnapshot {
            disk: "os".into(),
            snapshot:
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/snapshots/x-os"
                    .into(),
        }];
        let snapshot = SnapshotRef {
            vm: VmId("v".into()),
            vm_ref: "/vm".into(),
            snapshot_ref: serde_json::to_string(&list).expect("json"),
            name: "x".into(),
        };
        assert_eq!(disk_snapshots(&snapshot).expect("list"), list);
        let bad = SnapshotRef {
            snapshot_ref: "snapshot-17".into(),
            ..snapshot
        };
        assert!(disk_snapshots(&bad).is_err());
    }
}
