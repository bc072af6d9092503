//! `rehost export` of a Hyper-V VM: a recovery checkpoint (recorded in the ledger first,
//! then named `rehost-export-…`), each disk's frozen file read over SMB — its allocated
//! blocks, or the ranges RCT reports changed since the base export — into a dynamic VHD
//! (a differencing VHD of the base's image for an incremental), then the checkpoint
//! converted to an RCT reference point whose ids the manifest keeps for the next run.
//!
//! On any failure or interruption the checkpoint is deleted (Hyper-V merges its `.avhdx`
//! back); on success it no longer exists either: converting it to a reference point
//! merges it. What stays on the host is the reference point, a few bytes of RCT state;
//! the base export's reference point is deleted once this one replaces it.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rehost_core::{SnapshotOptions, SnapshotRef, Source};
use rehost_hyperv::HypervSource;
use rehost_hyperv::host::HyperVm;
use rehost_importer::aws::Clients;

use super::disk::ImageFormat;
use super::manifest::{DiskEntry, Manifest, SourceEntry};
use super::target::Target;
use super::{
    Base, ExportRequest, Exported, ManifestHead, SNAPSHOT_MARKER, SNAPSHOT_PREFIX,
    export_vhd_disks, file_safe, new_export_id, release_failed, settle_removal, write_manifest,
};
use crate::store::SharedStore;

/// Exports one Hyper-V VM as `request` says.
pub async fn export(
    request: &ExportRequest<'_>,
    hyperv: &HypervSource,
    clients: Option<Clients>,
    ledger: &SharedStore,
    handle: tokio::runtime::Handle,
) -> Result<Exported> {
    let found = hyperv
        .find_vm(&request.vm)
        .await
        .with_context(|| format!("source {:?}", request.source.name))?;
    let vm = &found.info;
    let unsupported = vm.unsupported_reasons();
    if !unsupported.is_empty() {
        bail!("{} cannot be exported: {}", vm.name, unsupported.join("; "));
    }
    if found.disks.is_empty() {
        bail!("{} has no virtual hard disk to export", vm.name);
    }
    let base = Base::of_request(request, clients.as_ref(), vm).await?;
    if let Some(base) = &base {
        if !vm.change_tracking {
            bail!(
                "{} has configuration version {}, which has no Resilient Change Tracking (Windows Server 2016's 8.0 and later do): run a full export, or upgrade the VM's configuration version",
                vm.name,
                found.version
            );
        }
        base.require_format(ImageFormat::VhdDynamic, "a Hyper-V export's VHD")?;
    }
    let target = Target::parse(&request.to, clients.clone())?;
    target.prepare()?;
    let smb_before = hyperv.smb().bytes_read();

    let export_id = new_export_id();
    let snapshot_name = format!("{SNAPSHOT_PREFIX}{export_id}");
    let entry = ledger.with(|s| {
        s.snapshot_intended(
            &request.source.name,
            &vm.id.0,
            &found.guid,
            &snapshot_name,
            &request.purpose,
        )
    })?;
    let options = SnapshotOptions {
        name: snapshot_name.clone(),
        description: format!("{SNAPSHOT_MARKER} export {export_id}"),
        quiesce: request.quiesce,
    };
    if !request.quiet {
        eprintln!("Taking recovery checkpoint {snapshot_name} of {}…", vm.name);
    }
    let created = request
        .stop
        .guard(hyperv.snapshot(&vm.id, &options))
        .await
        .and_then(|r| {
            r.map_err(|e| anyhow::Error::new(e).context(format!("checkpointing {}", vm.name)))
        });
    let snapshot = match created {
        Ok(snapshot) => snapshot,
        Err(err) => {
            // The job may have made it before failing or being interrupted.
            remove_named(ledger, hyperv, entry, &found.guid, &snapshot_name).await;
            return Err(err);
        }
    };
    ledger.with(|s| s.snapshot_created(entry, &snapshot.snapshot_ref))?;
    let job = HypervExport {
        request,
        hyperv,
        found: &found,
        base: base.as_ref(),
        target: &target,
        export_id: &export_id,
        handle,
        read_so_far: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let written = request.stop.guard(job.run(&snapshot)).await.and_then(|r| r);
    let mut disks = match written {
        Ok(disks) => disks,
        Err(err) => {
            release_failed(ledger, hyperv, entry, &snapshot).await;
            return Err(err);
        }
    };
    // The checkpoint becomes the reference point the next export asks RCT from.
    let converted = hyperv
        .client()
        .convert_to_reference_point(&snapshot.snapshot_ref)
        .await
        .with_context(|| format!("converting checkpoint {snapshot_name} to a reference point"));
    let point = match converted {
        Ok(point) => point,
        Err(err) => {
            release_failed(ledger, hyperv, entry, &snapshot).await;
            return Err(err);
        }
    };
    ledger.with(|s| s.snapshot_removed(entry))?;
    for disk in &mut disks {
        let vm_disk = found.disks.iter().find(|d| d.id == disk.key);
        let rct = vm_disk.and_then(|d| {
            point
                .disks
                .iter()
                .find(|(id, _)| rehost_hyperv::host::slot_of(id) == d.slot)
                .map(|(_, rct)| rct.clone())
        });
        disk.change_id = rct;
        if disk.change_id.is_none() {
            tracing::warn!(disk = %disk.key, point = %point.instance_id, "the reference point has no RCT id for this disk: its next export will be full");
        }
    }
    let stem = job.stem();
    let (manifest_location, manifest) = write_manifest(
        &target,
        &stem,
        ManifestHead {
            export_id: &export_id,
            snapshot_name: &snapshot_name,
            source: SourceEntry {
                name: request.source.name.clone(),
                kind: request.source.kind.to_string(),
                url: request.source.endpoint(),
            },
            vm,
            base: base.as_ref(),
        },
        disks,
    )
    .await?;
    if request.retire_base {
        retire_base(hyperv, &found.guid, &manifest).await?;
    }
    let image_locations = manifest
        .disks
        .iter()
        .map(|d| target.location(&d.image))
        .collect();
    Ok(Exported {
        manifest_location,
        manifest,
        image_locations,
        source_bytes_read: Some(hyperv.smb().bytes_read() - smb_before),
    })
}

/// Deletes the reference points an incremental export asked changes from (its base's),
/// which this export's reference point replaces.
pub async fn retire_base(hyperv: &HypervSource, vm_guid: &str, manifest: &Manifest) -> Result<()> {
    let previous: Vec<&str> = manifest
        .disks
        .iter()
        .filter_map(|d| d.since_change_id.as_deref())
        .collect();
    if previous.is_empty() {
        return Ok(());
    }
    for point in hyperv.client().reference_points(vm_guid).await? {
        if point
            .disks
            .iter()
            .any(|(_, rct)| previous.contains(&rct.as_str()))
        {
            hyperv
                .client()
                .destroy_reference_point(&point.instance_id)
                .await
                .with_context(|| {
                    format!("deleting the base reference point {}", point.instance_id)
                })?;
            tracing::info!(point = %point.instance_id, "base reference point replaced by this export's; deleted");
        }
    }
    Ok(())
}

/// Deletes every checkpoint of the VM named `name` (one whose creation was interrupted),
/// closing the ledger entry when none is left.
pub async fn remove_named(
    ledger: &SharedStore,
    hyperv: &HypervSource,
    entry: i64,
    vm_guid: &str,
    name: &str,
) {
    let mut failures = Vec::new();
    match hyperv.client().checkpoints(vm_guid).await {
        Ok(checkpoints) => {
            for checkpoint in checkpoints.iter().filter(|c| c.name == name) {
                if let Err(err) = hyperv
                    .client()
                    .destroy_checkpoint(&checkpoint.instance_id)
                    .await
                {
                    failures.push(err.to_string());
                }
            }
        }
        Err(err) => failures.push(err.to_string()),
    }
    settle_removal(ledger, entry, &failures);
}

/// `rehost export --cleanup` on a Hyper-V host: every checkpoint named with rehost's
/// prefix (on all VMs, or `vm_filter`'s), and the ledger's open entries.
pub async fn cleanup(
    ledger: &SharedStore,
    hyperv: &HypervSource,
    source: &str,
    vm_filter: Option<&str>,
) -> Result<(Vec<String>, Vec<String>, usize)> {
    let vms: Vec<HyperVm> = match vm_filter {
        Some(name) => vec![hyperv.find_vm(name).await?],
        None => hyperv.client().vms(hyperv.host_label()).await?,
    };
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for vm in &vms {
        for checkpoint in vm
            .checkpoints
            .iter()
            .filter(|c| c.name.starts_with(SNAPSHOT_PREFIX))
        {
            let label = format!("checkpoint {} of {}", checkpoint.name, vm.info.name);
            match hyperv
                .client()
                .destroy_checkpoint(&checkpoint.instance_id)
                .await
            {
                Ok(()) => removed.push(label),
                Err(err) => failed.push(format!("{label}: {err}")),
            }
        }
    }
    // Open entries of VMs in scope: by recorded checkpoint, else by name (an interrupted
    // creation), then closed if nothing is left.
    for entry in ledger.with(|s| s.open_snapshots(source))? {
        let Some(vm) = vms.iter().find(|v| v.info.id.0 == entry.vm_id) else {
            continue;
        };
        if let Some(checkpoint) = &entry.snapshot_ref {
            if let Err(err) = hyperv.client().destroy_checkpoint(checkpoint).await {
                failed.push(format!(
                    "checkpoint {} of {}: {err}",
                    entry.name, vm.info.name
                ));
                continue;
            }
            ledger.with(|s| s.snapshot_removed(entry.id))?;
        } else {
            remove_named(ledger, hyperv, entry.id, &vm.guid, &entry.name).await;
        }
    }
    Ok((removed, failed, vms.len()))
}

struct HypervExport<'a> {
    request: &'a ExportRequest<'a>,
    hyperv: &'a HypervSource,
    found: &'a HyperVm,
    base: Option<&'a Base>,
    target: &'a Target,
    export_id: &'a str,
    handle: tokio::runtime::Handle,
    read_so_far: Arc<std::sync::atomic::AtomicU64>,
}

impl HypervExport<'_> {
    fn stem(&self) -> String {
        format!("{}-{}", file_safe(&self.found.info.name), self.export_id)
    }

    /// Writes every disk's image; their change ids are filled in once the checkpoint is
    /// a reference point.
    async fn run(&self, snapshot: &SnapshotRef) -> Result<Vec<DiskEntry>> {
        export_vhd_disks(
            self.hyperv,
            snapshot,
            self.request,
            &self.found.info,
            self.base,
            self.target,
            &self.stem(),
            &self.handle,
            &self.read_so_far,
        )
        .await
    }
}
