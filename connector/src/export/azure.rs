//! `rehost export` of an Azure VM: an incremental snapshot of each managed disk (recorded
//! in the ledger first), each disk read through a SAS — every allocated page, or the diff
//! against the base export's snapshot — into a dynamic VHD (a differencing VHD of the
//! base's image for an incremental), and access revoked on every path.
//!
//! On success this export's snapshots stay (the next incremental diffs against them) and,
//! when asked, the base's are deleted; on any failure or interruption, this export's are
//! deleted. Either way nothing else is left in the subscription.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rehost_azure::AzureSource;
use rehost_azure::inventory::AzureVm;
use rehost_core::{SnapshotOptions, SnapshotRef, Source};
use rehost_importer::aws::Clients;

use super::disk::ImageFormat;
use super::manifest::{Manifest, SourceEntry};
use super::target::Target;
use super::{
    Base, ExportRequest, Exported, ManifestHead, SNAPSHOT_MARKER, SNAPSHOT_PREFIX,
    export_vhd_disks, file_safe, new_export_id, release_failed, settle_removal, write_manifest,
};
use crate::store::SharedStore;

/// Exports one Azure VM as `request` says.
pub async fn export(
    request: &ExportRequest<'_>,
    azure: &AzureSource,
    clients: Option<Clients>,
    ledger: &SharedStore,
    handle: tokio::runtime::Handle,
) -> Result<Exported> {
    let found = azure
        .client()
        .find_vm(&request.vm)
        .await
        .with_context(|| format!("source {:?}", request.source.name))?;
    let vm = &found.info;
    let unsupported = vm.unsupported_reasons();
    if !unsupported.is_empty() {
        bail!("{} cannot be exported: {}", vm.name, unsupported.join("; "));
    }
    if found.disks.is_empty() {
        bail!("{} has no managed disk to export", vm.name);
    }
    let base = Base::of_request(request, clients.as_ref(), vm).await?;
    if let Some(base) = &base {
        base.require_format(ImageFormat::VhdDynamic, "an Azure export's VHD")?;
    }
    let target = Target::parse(&request.to, clients.clone())?;
    target.prepare()?;

    let export_id = new_export_id();
    let snapshot_name = format!("{SNAPSHOT_PREFIX}{export_id}");
    let entry = ledger.with(|s| {
        s.snapshot_intended(
            &request.source.name,
            &vm.id.0,
            &found.resource_id,
            &snapshot_name,
            &request.purpose,
        )
    })?;
    let options = SnapshotOptions {
        name: snapshot_name.clone(),
        description: format!(
            "{SNAPSHOT_MARKER} export {export_id}; kept as the base of the next incremental export of this VM"
        ),
        quiesce: false,
    };
    if !request.quiet {
        eprintln!(
            "Taking incremental snapshots {snapshot_name}-* of {}…",
            vm.name
        );
    }
    let created = request
        .stop
        .guard(azure.snapshot(&vm.id, &options))
        .await
        .and_then(|r| {
            r.map_err(|e| anyhow::Error::new(e).context(format!("snapshotting {}", vm.name)))
        });
    let snapshot = match created {
        Ok(snapshot) => snapshot,
        Err(err) => {
            // Interrupted mid-set: the snapshots made so far carry the set's tag.
            remove_tagged(ledger, azure, entry, &snapshot_name).await;
            return Err(err);
        }
    };
    ledger.with(|s| s.snapshot_created(entry, &snapshot.snapshot_ref))?;
    let job = AzureExport {
        request,
        azure,
        found: &found,
        base: base.as_ref(),
        target: &target,
        export_id: &export_id,
        snapshot_name: &snapshot_name,
        handle,
        read_so_far: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let outcome = request.stop.guard(job.run(&snapshot)).await.and_then(|r| r);
    // Every SAS we were given goes, whatever happened.
    let revoked = azure.end_access().await;
    let (manifest_location, manifest) = match outcome {
        Ok(done) => done,
        Err(err) => {
            release_failed(ledger, azure, entry, &snapshot).await;
            return Err(err);
        }
    };
    revoked.context("revoking read access to the snapshots")?;
    // This export's snapshots are now the base of the next: no longer a leftover.
    ledger.with(|s| s.snapshot_removed(entry))?;
    if request.retire_base {
        retire_base(azure, &manifest).await?;
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
        source_bytes_read: None,
    })
}

/// Deletes the snapshots an incremental export diffed against (its base's), which the new
/// export's snapshots replace as the next base.
pub async fn retire_base(azure: &AzureSource, manifest: &Manifest) -> Result<()> {
    for disk in &manifest.disks {
        if let Some(previous) = &disk.since_change_id {
            azure
                .delete_snapshot(previous)
                .await
                .with_context(|| format!("deleting the base snapshot {previous}"))?;
            tracing::info!(snapshot = %previous, "base snapshot replaced by this export's; deleted");
        }
    }
    Ok(())
}

/// Deletes every snapshot tagged as part of the set `name` (a set whose creation was
/// interrupted), closing the ledger entry when all are gone.
pub async fn remove_tagged(ledger: &SharedStore, azure: &AzureSource, entry: i64, name: &str) {
    let _ = azure.end_access().await;
    let mut failures = Vec::new();
    match azure.tagged_snapshots().await {
        Ok(tagged) => {
            for (id, _) in tagged.iter().filter(|(_, tag)| tag == name) {
                if let Err(err) = azure.delete_snapshot(id).await {
                    failures.push(err.to_string());
                }
            }
        }
        Err(err) => failures.push(err.to_string()),
    }
    settle_removal(ledger, entry, &failures);
}

struct AzureExport<'a> {
    request: &'a ExportRequest<'a>,
    azure: &'a AzureSource,
    found: &'a AzureVm,
    base: Option<&'a Base>,
    target: &'a Target,
    export_id: &'a str,
    snapshot_name: &'a str,
    handle: tokio::runtime::Handle,
    read_so_far: Arc<std::sync::atomic::AtomicU64>,
}

impl AzureExport<'_> {
    fn stem(&self) -> String {
        format!("{}-{}", file_safe(&self.found.info.name), self.export_id)
    }

    async fn run(&self, snapshot: &SnapshotRef) -> Result<(String, Manifest)> {
        let vm = &self.found.info;
        let stem = self.stem();
        let disks = export_vhd_disks(
            self.azure,
            snapshot,
            self.request,
            vm,
            self.base,
            self.target,
            &stem,
            &self.handle,
            &self.read_so_far,
        )
        .await?;
        write_manifest(
            self.target,
            &stem,
            ManifestHead {
                export_id: self.export_id,
                snapshot_name: self.snapshot_name,
                source: SourceEntry {
                    name: self.request.source.name.clone(),
                    kind: self.request.source.kind.to_string(),
                    url: self.request.source.endpoint(),
                },
                vm,
                base: self.base,
            },
            disks,
        )
        .await
    }
}
