//! One replication run, end to end:
//!
//! ```text
//! export (snapshot recorded in the ledger → CBT areas → staged in S3 → snapshot removed)
//!   → import each disk into EBS (a child of the disk's previous snapshot)
//!   → register the AMI → retention (keep N) → delete the staged images → COMPLETED
//! ```
//!
//! Every step is idempotent and its result saved in the run's [`Checkpoint`] before the
//! next starts, so a connector restarted after a crash resumes the run: an export that was
//! cut short is cleaned up (its snapshot removed, its uploads aborted) and taken again; an
//! import continues into its pending snapshot from its journal; an AMI is registered under
//! a name unique to the run, so a second attempt finds the first.

pub mod checkpoint;
pub mod staging;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use rehost_core::ErrorKind;
use rehost_diskimage::Disk;
use rehost_importer::ami::{self, AmiSpec, BootRequest, SnapshotVolume, TagFilter};
use rehost_importer::aws::Clients;
use rehost_importer::ebs::journal::{JournalLocation, SourceIdentity};
use rehost_importer::import::{ImportOptions, ImportStatus, ProgressCallback};
use rehost_importer::s3::{S3Fs, S3Url};
use tokio::sync::watch;

use crate::config::{Config, SourceKind};
use crate::export::{self, ExportProgress, ExportRequest, Stop, Via};
use crate::jobs::model::{DiskLineage, Job, Run, RunStage, Timestamp};
use crate::sources::Connected;
use crate::store::SharedStore;
use checkpoint::{Checkpoint, ImportedDisk, StagedExport};

/// The tag every AMI and snapshot of a job carries: retention selects by it.
pub const JOB_TAG: &str = "rehost:replication-job-id";
/// The tag naming the run that made an AMI or snapshot.
pub const RUN_TAG: &str = "rehost:replication-run-id";

/// What a run needs from the connector running it.
#[derive(Clone)]
pub struct RunContext {
    pub config: Arc<Config>,
    pub store: SharedStore,
    /// AWS clients for `[aws]` (shared by every run).
    pub clients: Clients,
    /// Turns true when the run must stop (shutdown, or its job being deleted).
    pub stop: watch::Receiver<bool>,
    pub handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for RunContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext").finish_non_exhaustive()
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The AMI exists and every step is done.
    Completed { ami_id: String },
    /// An error of `kind`; the scheduler decides whether the job retries.
    Failed { kind: ErrorKind, message: String },
    /// Asked to stop before the end: the run stays ACTIVE and is resumed from its
    /// checkpoint by the next connector that starts (or cancelled, if its job is deleted).
    Stopped,
}

/// Runs `run` (already claimed, ACTIVE) to its end, recording progress as it goes. The
/// caller records the end (`complete_run`/`fail_run`).
pub async fn execute(ctx: &RunContext, run: &Run) -> RunEnd {
    match execute_steps(ctx, run).await {
        Ok(Some(ami_id)) => RunEnd::Completed { ami_id },
        Ok(None) => RunEnd::Stopped,
        Err(err) if *ctx.stop.borrow() => {
            tracing::info!(run = %run.id, error = %format!("{err:#}"), "run stopped");
            RunEnd::Stopped
        }
        Err(err) => {
            discard_staged(ctx, run).await;
            RunEnd::Failed {
                kind: classify(&err),
                message: format!("{err:#}"),
            }
        }
    }
}

/// After a failure or a cancellation: what the run staged is of no use to anyone (a retry
/// is a new run that exports again), so its uploads are aborted and its objects deleted.
/// Best effort: the failure is what gets reported.
pub async fn discard_staged(ctx: &RunContext, run: &Run) {
    let Ok((bucket, prefix)) = staging::run_prefix(&ctx.config.aws, &run.job_id, &run.id) else {
        return;
    };
    if let Err(err) = staging::clear_run(&ctx.clients, &bucket, &prefix).await {
        tracing::warn!(run = %run.id, error = %format!("{err:#}"), "could not delete what the failed run staged");
    }
    discard_azure_snapshots(ctx, run).await;
}

/// The steps; `Ok(None)` when stopped on request.
async fn execute_steps(ctx: &RunContext, run: &Run) -> Result<Option<String>> {
    let job = ctx.store.with(|s| s.job(&run.job_id))?.with_context(|| {
        format!(
            "run {} names job {}, which is not in the store",
            run.id, run.job_id
        )
    })?;
    let mut checkpoint =
        Checkpoint::parse(ctx.store.with(|s| s.run_checkpoint(&run.id))?.as_deref())?;
    let progress = Progress::new(ctx.store.clone(), run);

    if checkpoint.export.is_none() {
        let staged = export_step(ctx, &job, run, &progress).await?;
        checkpoint.export = Some(staged);
        save(ctx, run, &checkpoint)?;
    }
    if stop_requested(ctx) {
        return Ok(None);
    }
    for key in checkpoint.disks_to_import() {
        let Some(imported) = import_step(ctx, &job, run, &mut checkpoint, &key, &progress).await?
        else {
            return Ok(None);
        };
        checkpoint.snapshots.insert(key, imported);
        save(ctx, run, &checkpoint)?;
    }
    if checkpoint.ami_id.is_none() {
        progress.stage(RunStage::RegisterAmi, 95)?;
        let ami_id = register_step(ctx, &job, run, &checkpoint).await?;
        checkpoint.ami_id = Some(ami_id);
        save(ctx, run, &checkpoint)?;
    }
    let ami_id = checkpoint
        .ami_id
        .clone()
        .context("the run's checkpoint lost its AMI")?;
    // From here on the run has its AMI: retention and clean-up failing must not fail it
    // (its lineage would then point at snapshots retention may have deleted). What they
    // leave is logged, and the next run's retention covers every AMI of the job again.
    if !checkpoint.retention_done {
        progress.stage(RunStage::Retention, 97)?;
        if let Err(err) = retention_step(ctx, &job, &ami_id).await {
            tracing::warn!(run = %run.id, error = %format!("{err:#}"), "AMI retention failed; the next run applies it again");
        }
        checkpoint.retention_done = true;
        save(ctx, run, &checkpoint)?;
    }
    let staged = checkpoint
        .export
        .clone()
        .context("the run's checkpoint lost its export")?;
    if !checkpoint.staging_done {
        progress.stage(RunStage::CleanupStaged, 99)?;
        if !ctx.config.aws.keep_staged {
            // The manifest and block lists stay: the next incremental export builds on them.
            if let Err(err) = staging::delete_objects(&ctx.clients, &staged.image_locations).await {
                tracing::warn!(run = %run.id, error = %format!("{err:#}"), "staged images not deleted");
            }
        }
        checkpoint.staging_done = true;
        save(ctx, run, &checkpoint)?;
    }
    let lineage = lineage_of(&job, run, &staged, &checkpoint, ctx.config.aws.keep_staged);
    ctx.store
        .with(|s| Ok(s.complete_run(&run.id, &ami_id, &lineage, Timestamp::now())?))?;
    retire_azure_base(ctx, &job, &staged.manifest).await;
    retire_hyperv_base(ctx, &job, &staged.manifest).await;
    Ok(Some(ami_id))
}

/// Hyper-V: the reference point this run asked RCT from is replaced, as the next run's
/// base, by this run's: deleted. Best effort once the run is complete.
async fn retire_hyperv_base(ctx: &RunContext, job: &Job, manifest: &export::manifest::Manifest) {
    let Ok(source) = ctx.config.source(&job.source) else {
        return;
    };
    if source.kind != SourceKind::Hyperv
        || manifest.disks.iter().all(|d| d.since_change_id.is_none())
    {
        return;
    }
    let outcome = async {
        let hyperv = crate::sources::connect_hyperv(&ctx.config, source)?;
        export::hyperv::retire_base(&hyperv, &manifest.vm.id, manifest).await
    }
    .await;
    if let Err(err) = outcome {
        tracing::warn!(job = %job.id, error = %format!("{err:#}"), "the previous run's Hyper-V reference point was not deleted");
    }
}

/// Azure: the snapshots this run diffed against are replaced, as the next run's base, by
/// this run's (now in the lineage): deleted. Best effort once the run is complete; what
/// fails is logged (the snapshots carry rehost's tag).
async fn retire_azure_base(ctx: &RunContext, job: &Job, manifest: &export::manifest::Manifest) {
    let Ok(source) = ctx.config.source(&job.source) else {
        return;
    };
    if source.kind != SourceKind::Azure
        || manifest.disks.iter().all(|d| d.since_change_id.is_none())
    {
        return;
    }
    let outcome = async {
        let azure = crate::sources::connect_azure(&ctx.config, source)?;
        export::azure::retire_base(&azure, manifest).await
    }
    .await;
    if let Err(err) = outcome {
        tracing::warn!(job = %job.id, error = %format!("{err:#}"), "the previous run's Azure snapshots were not deleted");
    }
}

/// A deleted job's source-side state: an Azure job keeps its last run's disk snapshots as
/// the next run's base; with no next run they go. Nothing to do for vSphere (its snapshots
/// never outlive a run). A snapshot already gone is fine.
pub async fn release_source_bases(config: &Config, store: &SharedStore, job: &Job) -> Result<()> {
    let source = config.source(&job.source)?;
    if source.kind == SourceKind::Hyperv {
        return release_hyperv_base(config, store, job, source).await;
    }
    if source.kind != SourceKind::Azure {
        return Ok(());
    }
    let lineage = store.with(|s| s.lineage(&job.id))?;
    let snapshots: Vec<&str> = lineage
        .iter()
        .filter_map(|l| l.last_change_id.as_deref())
        .collect();
    if snapshots.is_empty() {
        return Ok(());
    }
    let azure = crate::sources::connect_azure(config, source)?;
    for snapshot in snapshots {
        azure.delete_snapshot(snapshot).await?;
        tracing::info!(job = %job.id, snapshot, "deleted the base snapshot the job kept");
    }
    Ok(())
}

/// Hyper-V: a deleted job's last reference point (the RCT ids its lineage keeps) goes with
/// it. A reference point already gone is fine.
async fn release_hyperv_base(
    config: &Config,
    store: &SharedStore,
    job: &Job,
    source: &crate::config::SourceConfig,
) -> Result<()> {
    let lineage = store.with(|s| s.lineage(&job.id))?;
    let kept: Vec<&str> = lineage
        .iter()
        .filter_map(|l| l.last_change_id.as_deref())
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    let hyperv = crate::sources::connect_hyperv(config, source)?;
    for point in hyperv.client().reference_points(&job.vm_id).await? {
        if point
            .disks
            .iter()
            .any(|(_, rct)| kept.contains(&rct.as_str()))
        {
            hyperv
                .client()
                .destroy_reference_point(&point.instance_id)
                .await?;
            tracing::info!(job = %job.id, point = %point.instance_id, "deleted the reference point the job kept");
        }
    }
    Ok(())
}

/// Azure: a failed run's kept snapshots (its export succeeded, a later step failed) are no
/// one's base: deleted, unless the lineage names them.
async fn discard_azure_snapshots(ctx: &RunContext, run: &Run) {
    let outcome = async {
        let Some(job) = ctx.store.with(|s| s.job(&run.job_id))? else {
            return Ok(());
        };
        let source = ctx.config.source(&job.source)?;
        if source.kind != SourceKind::Azure {
            return Ok(());
        }
        let checkpoint =
            Checkpoint::parse(ctx.store.with(|s| s.run_checkpoint(&run.id))?.as_deref())?;
        let Some(staged) = checkpoint.export else {
            return Ok(());
        };
        let lineage = ctx.store.with(|s| s.lineage(&job.id))?;
        let azure = crate::sources::connect_azure(&ctx.config, source)?;
        for disk in &staged.manifest.disks {
            let Some(snapshot) = &disk.change_id else {
                continue;
            };
            if lineage
                .iter()
                .any(|l| l.last_change_id.as_deref() == Some(snapshot.as_str()))
            {
                continue;
            }
            azure.delete_snapshot(snapshot).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(err) = outcome {
        tracing::warn!(run = %run.id, error = %format!("{err:#}"), "the failed run's Azure snapshots were not deleted");
    }
}

fn stop_requested(ctx: &RunContext) -> bool {
    *ctx.stop.borrow()
}

fn save(ctx: &RunContext, run: &Run, checkpoint: &Checkpoint) -> Result<()> {
    let json = checkpoint.to_json()?;
    ctx.store.with(|s| s.save_run_checkpoint(&run.id, &json))
}

/// Snapshot, export and stage every disk; the snapshot is removed before this returns.
async fn export_step(
    ctx: &RunContext,
    job: &Job,
    run: &Run,
    progress: &Progress,
) -> Result<StagedExport> {
    progress.stage(RunStage::Snapshot, 0)?;
    let source_config = ctx.config.source(&job.source)?;
    let client = crate::sources::connect(&ctx.config, source_config).await?;
    let outcome = async {
        let purpose = run_purpose(run);
        let (bucket, prefix) = staging::run_prefix(&ctx.config.aws, &job.id, &run.id)?;
        // An earlier attempt of this run that was killed may have left its snapshot on
        // the VM and its uploads open: both go before the export is taken again.
        remove_leftover_snapshots(ctx, &client, &job.source, &purpose).await?;
        staging::clear_run(&ctx.clients, &bucket, &prefix).await?;

        let lineage = ctx.store.with(|s| s.lineage(&job.id))?;
        let base = incremental_base(&lineage, job);
        if let Some(base) = &base {
            tracing::info!(run = %run.id, base, "incremental export");
        }
        progress.stage(RunStage::Export, 1)?;
        let export_progress = progress.clone();
        let request = ExportRequest {
            source: source_config,
            vm: job.vm_id.clone(),
            to: format!("s3://{bucket}/{prefix}"),
            // The staged images of the base were deleted once imported: partly changed
            // blocks are completed from the snapshots they became.
            base_snapshots: match &base {
                Some(_) => lineage
                    .iter()
                    .filter_map(|l| Some((l.disk_key.clone(), l.last_snapshot_id.clone()?)))
                    .collect(),
                None => Default::default(),
            },
            base,
            quiesce: false,
            via: Via::Snapshot,
            quiet: true,
            purpose,
            progress: Some(ExportProgress(Arc::new(move |done, total| {
                export_progress.export_bytes(done, total);
            }))),
            stop: Stop::When(ctx.stop.clone()),
            // Azure: the base's snapshots go once this run has completed (see
            // retire_azure_base), so a retry of this run can still diff against them.
            retire_base: false,
        };
        let exported = export::export(
            &request,
            &client,
            Some(ctx.clients.clone()),
            &ctx.store,
            ctx.handle.clone(),
        )
        .await?;
        progress.stage(RunStage::ReleaseSnapshot, 50)?;
        Ok(StagedExport {
            manifest_location: exported.manifest_location,
            manifest: exported.manifest,
            image_locations: exported.image_locations,
        })
    }
    .await;
    client.logout().await;
    outcome
}

/// The ledger purpose of a run's snapshots: how a later attempt finds them.
fn run_purpose(run: &Run) -> String {
    format!("run:{}", run.id)
}

/// Removes the snapshots the ledger still holds open for this run (a killed attempt's).
async fn remove_leftover_snapshots(
    ctx: &RunContext,
    connected: &Connected,
    source: &str,
    purpose: &str,
) -> Result<()> {
    let open = ctx.store.with(|s| s.open_snapshots(source))?;
    for entry in open.into_iter().filter(|e| e.purpose == purpose) {
        tracing::info!(snapshot = %entry.name, vm = %entry.vm_id, "removing a snapshot an earlier attempt left");
        match connected {
            Connected::Vsphere(client) => {
                let vm = client.find_vm(&entry.vm_id).await.with_context(|| {
                    format!(
                        "finding VM {} to remove snapshot {}",
                        entry.vm_id, entry.name
                    )
                })?;
                export::remove_by_name(&ctx.store, client, entry.id, &vm.moref, &entry.name).await;
            }
            Connected::Azure(azure) => {
                export::azure::remove_tagged(&ctx.store, azure, entry.id, &entry.name).await;
            }
            Connected::Hyperv(hyperv) => {
                export::hyperv::remove_named(
                    &ctx.store,
                    hyperv,
                    entry.id,
                    &entry.vm_ref,
                    &entry.name,
                )
                .await;
            }
        }
        let still_open = ctx
            .store
            .with(|s| s.open_snapshots(source))?
            .iter()
            .any(|e| e.id == entry.id);
        if still_open {
            bail!(
                "snapshot {} that an earlier attempt of this run left on VM {} could not be removed; see `rehost export --cleanup`",
                entry.name,
                entry.vm_id
            );
        }
    }
    Ok(())
}

/// The manifest to export incrementally from: the last completed run's, when every disk
/// of the VM has a lineage from it (a disk added since forces a full export).
fn incremental_base(lineage: &[DiskLineage], job: &Job) -> Option<String> {
    let first = lineage.first()?;
    let manifest = first.last_manifest.clone()?;
    let same_run = lineage.iter().all(|l| {
        l.last_manifest.as_deref() == Some(manifest.as_str())
            && l.last_snapshot_id.is_some()
            // Without a changeId (CBT was off) the changes since cannot be asked for.
            && l.last_change_id.is_some()
    });
    if !same_run {
        tracing::warn!(job = %job.id, "the disks' lineage comes from different runs: full export");
        return None;
    }
    Some(manifest)
}

/// Imports one disk's staged image; `None` when stopped (the import's journal lets the
/// next attempt continue into the same pending snapshot).
async fn import_step(
    ctx: &RunContext,
    job: &Job,
    run: &Run,
    checkpoint: &mut Checkpoint,
    key: &str,
    progress: &Progress,
) -> Result<Option<ImportedDisk>> {
    let staged = checkpoint.export.clone().context("no export to import")?;
    let (index, entry) = staged
        .manifest
        .disks
        .iter()
        .enumerate()
        .find(|(_, d)| d.key == key)
        .with_context(|| format!("disk {key} is not in the run's manifest"))?;
    let location = staged
        .image_locations
        .get(index)
        .with_context(|| format!("disk {key} has no staged image"))?
        .clone();
    let incremental = entry.parent_image.is_some();
    let lineage = ctx.store.with(|s| s.lineage(&job.id))?;
    let parent_snapshot_id = if incremental {
        Some(
            lineage
                .iter()
                .find(|l| l.disk_key == key)
                .and_then(|l| l.last_snapshot_id.clone())
                .with_context(|| format!("disk {key} was exported incrementally but its previous EBS snapshot is not known"))?,
        )
    } else {
        None
    };
    let is_root = index == 0;
    let need_boot = is_root && checkpoint.boot.is_none() && !incremental;
    let boot_request = source_boot_request(&staged.manifest)?;

    // Opening reads headers through S3 with blocking ranged GETs: a blocking thread.
    let clients = ctx.clients.clone();
    let handle = ctx.handle.clone();
    let open_location = location.clone();
    let (disk, identity, boot) = tokio::task::spawn_blocking(move || {
        open_staged(
            &clients,
            &handle,
            &open_location,
            incremental,
            need_boot.then_some(boot_request),
        )
    })
    .await
    .context("the image opening thread failed")??;
    if let Some(boot) = boot {
        checkpoint.boot = Some(boot);
    }
    if is_root && checkpoint.boot.is_none() {
        checkpoint.boot = Some(previous_boot(ctx, &lineage)?);
    }

    let journal = JournalLocation {
        dir: journal_dir(&ctx.config, run),
        file: None,
    };
    // A crash after CompleteSnapshot but before the checkpoint was saved: the journal
    // knows the snapshot; importing again would make a second one.
    if let Some(done) = completed_import(&journal.dir, &identity)? {
        tracing::info!(run = %run.id, disk = key, snapshot_id = %done.snapshot_id, "disk already imported by an earlier attempt");
        return Ok(Some(done));
    }
    // Continues the pending snapshot of an earlier attempt when its journal is there.
    let resume = journal.find_pending(&identity)?.is_some();
    let mut options = ImportOptions::new(identity, journal);
    options.resume = resume;
    options.parent_snapshot_id = parent_snapshot_id.clone();
    options.description = Some(format!(
        "rehost: disk {key} of {} ({}), run {}",
        job.vm_name, job.server_id, run.id
    ));
    options.tags = resource_tags(job, run);
    options
        .tags
        .push(("rehost:disk-key".into(), key.to_owned()));
    // Only a chain's first snapshot asks: children inherit their parent's encryption.
    if parent_snapshot_id.is_none() {
        options.encryption = rehost_importer::kms::encryption(
            &ctx.config.aws_options(),
            job.encrypted,
            job.kms_key_id.as_deref(),
        )
        .await
        .context("resolving the job's KMS key")?;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    options.cancel = Some(cancel.clone());
    let disks = staged.manifest.disks.len().max(1);
    let import_progress = progress.clone();
    options.progress = Some(ProgressCallback(Arc::new(move |p| {
        import_progress.import_position(
            index,
            disks,
            p.position_bytes,
            p.virtual_size_bytes,
            p.blocks_written,
        );
    })));
    progress.stage(
        RunStage::Import,
        progress.import_start_percent(index, disks),
    )?;

    let mut stop = ctx.stop.clone();
    let watcher = tokio::spawn(async move {
        if stop.wait_for(|s| *s).await.is_ok() {
            cancel.store(true, Ordering::Relaxed);
        }
    });
    let report = rehost_importer::import::import(&ctx.clients, &disk, &options).await;
    watcher.abort();
    let report = report.with_context(|| format!("importing disk {key} from {location}"))?;
    progress.imported_bytes(report.blocks_written);
    if report.status == ImportStatus::Interrupted {
        return Ok(None);
    }
    Ok(Some(ImportedDisk {
        snapshot_id: report.snapshot_id,
        volume_size_gib: report.volume_size_gib,
        blocks_written: report.blocks_written,
        parent_snapshot_id,
    }))
}

/// The completed import of `identity` among the journals in `dir`, if any.
fn completed_import(
    dir: &std::path::Path,
    identity: &SourceIdentity,
) -> Result<Option<ImportedDisk>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "jsonl") {
            continue;
        }
        let state = rehost_importer::ebs::journal::JournalState::read(&path)?;
        let (Some(start), Some(snapshot_id), Some(_)) =
            (&state.start, &state.snapshot_id, state.completed)
        else {
            continue;
        };
        if start.source == *identity {
            return Ok(Some(ImportedDisk {
                snapshot_id: snapshot_id.clone(),
                volume_size_gib: start.volume_size_gib,
                blocks_written: state.acknowledged.len() as u64,
                parent_snapshot_id: start.parent_snapshot_id.clone(),
            }));
        }
    }
    Ok(None)
}

type Boot = (String, String);

/// What the source knows of how the VM boots. A Hyper-V generation (Azure's or a Hyper-V
/// host's) is authoritative: a generation 2 VM boots UEFI whatever its disk's partition
/// table looks like; for vSphere the image decides (a GPT with an EFI system partition is
/// UEFI).
fn source_boot_request(manifest: &export::manifest::Manifest) -> Result<BootRequest> {
    let mode = match (manifest.source.kind.as_str(), manifest.vm.firmware) {
        ("azure" | "hyperv", rehost_core::Firmware::Efi) => "uefi",
        ("azure" | "hyperv", rehost_core::Firmware::Bios) => "legacy-bios",
        _ => "auto",
    };
    Ok(BootRequest::parse(mode, "auto")?)
}

/// Opens a staged image: the whole chain for a full one, the delta alone for an
/// incremental one (its parent's contents are the parent EBS snapshot, and the parent's
/// image may have been deleted after its own import). Reads the boot facts if asked.
fn open_staged(
    clients: &Clients,
    handle: &tokio::runtime::Handle,
    location: &str,
    delta_only: bool,
    read_boot: Option<BootRequest>,
) -> Result<(Disk, SourceIdentity, Option<Boot>)> {
    use rehost_diskimage::ReadAt;
    let url = S3Url::parse(location)?;
    let fs = S3Fs::new(clients.s3.clone(), url.bucket.clone(), handle.clone());
    let object = fs
        .open_object(&url.key)
        .with_context(|| format!("opening {location}"))?;
    let identity = SourceIdentity {
        location: location.to_owned(),
        size_bytes: object.len().with_context(|| format!("sizing {location}"))?,
        fingerprint: object.etag().to_owned(),
    };
    let disk = if delta_only {
        Disk::top_only_with(&fs, &url.key)
    } else {
        Disk::open_with(&fs, &url.key)
    }
    .with_context(|| format!("opening {location}"))?;
    let boot = if let Some(request) = read_boot {
        let (mode, arch) = ami::resolve_boot(&disk, request)
            .with_context(|| format!("reading the boot mode of {location}"))?;
        Some((mode.as_aws().to_owned(), arch.as_aws().to_owned()))
    } else {
        None
    };
    Ok((disk, identity, boot))
}

/// The boot facts of the previous completed run (an incremental run's delta cannot show them).
fn previous_boot(ctx: &RunContext, lineage: &[DiskLineage]) -> Result<Boot> {
    let previous = lineage
        .iter()
        .find_map(|l| l.last_run_id.clone())
        .context("an incremental run without a previous run to take the boot mode from")?;
    let stored = ctx.store.with(|s| s.run_checkpoint(&previous))?;
    Checkpoint::parse(stored.as_deref())?
        .boot
        .with_context(|| format!("the previous run {previous} recorded no boot mode"))
}

/// Import journals of a run: next to the store, so a restarted connector finds them.
fn journal_dir(config: &Config, run: &Run) -> std::path::PathBuf {
    let store = config.store_path();
    let dir = store
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    dir.join("journals").join(&run.id.0)
}

/// Tags on every snapshot and AMI of a run.
fn resource_tags(job: &Job, run: &Run) -> Vec<(String, String)> {
    let license = serde_json::to_value(job.license_type)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    vec![
        (JOB_TAG.into(), job.id.0.clone()),
        (RUN_TAG.into(), run.id.0.clone()),
        ("rehost:server-id".into(), job.server_id.0.clone()),
        ("rehost:vm-name".into(), job.vm_name.clone()),
        // RegisterImage has no license type; SMS passed it to ImportImage. Recorded so
        // that launches and audits can apply it.
        ("rehost:license-type".into(), license),
    ]
}

/// The AMI name of a run: unique to the run, so registering it twice finds the first.
pub fn ami_name(job: &Job, run: &Run) -> String {
    let vm: String = job
        .vm_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "()[]./-'@_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    format!("rehost-{vm}-{}", run.id)
}

async fn register_step(
    ctx: &RunContext,
    job: &Job,
    run: &Run,
    checkpoint: &Checkpoint,
) -> Result<String> {
    let staged = checkpoint
        .export
        .as_ref()
        .context("no export to register")?;
    let mut volumes = staged.manifest.disks.iter().map(|d| {
        checkpoint
            .snapshots
            .get(&d.key)
            .map(|s| SnapshotVolume {
                snapshot_id: s.snapshot_id.clone(),
                volume_size_gib: u32::try_from(s.volume_size_gib).ok(),
            })
            .with_context(|| format!("disk {} has no snapshot", d.key))
    });
    let root = volumes.next().context("the VM has no disk")??;
    let data = volumes.collect::<Result<Vec<_>>>()?;
    let (mode, arch) = checkpoint
        .boot
        .clone()
        .context("the root disk's boot mode is not known")?;
    let boot = BootRequest::parse(&mode, &arch)?;
    let spec = AmiSpec {
        name: ami_name(job, run),
        description: Some(format!(
            "rehost replication of {} ({}), job {}, run {}",
            job.vm_name, job.server_id, job.id, run.id
        )),
        root,
        data,
        boot_mode: boot.boot_mode.context("boot mode")?,
        architecture: boot.architecture.context("architecture")?,
        tags: resource_tags(job, run),
    };
    let name = spec.name.clone();
    ami::register(&ctx.clients, spec)
        .await
        .with_context(|| format!("registering AMI {name}"))
}

/// Keeps the job's newest `number_of_recent_amis_to_keep` AMIs (0: all), deregistering
/// the others and deleting their snapshots; their runs are marked DELETED.
async fn retention_step(ctx: &RunContext, job: &Job, ami_id: &str) -> Result<()> {
    let keep = usize::try_from(job.number_of_recent_amis_to_keep).unwrap_or(usize::MAX);
    if keep == 0 {
        return Ok(());
    }
    let tag = TagFilter {
        key: JOB_TAG.into(),
        value: job.id.0.clone(),
    };
    // This run's AMI first (its run is not COMPLETED yet), then the completed runs'.
    let runs = ctx.store.with(|s| s.amis_of_job(&job.id))?;
    let newest: Vec<String> = std::iter::once(ami_id.to_owned())
        .chain(runs.iter().map(|(_, ami)| ami.clone()))
        .collect();
    let report = ami::prune_ranked(&ctx.clients, &tag, keep, &newest, false)
        .await
        .context("applying the job's AMI retention")?;
    for gone in &report.plan.deregister {
        if let Some((run, _)) = runs.iter().find(|(_, ami)| *ami == gone.image_id) {
            ctx.store
                .with(|s| Ok(s.mark_run_ami_deleted(run, Timestamp::now())?))?;
        }
    }
    Ok(())
}

/// What the next run builds on, per disk.
fn lineage_of(
    job: &Job,
    run: &Run,
    staged: &StagedExport,
    checkpoint: &Checkpoint,
    keep_staged: bool,
) -> Vec<DiskLineage> {
    staged
        .manifest
        .disks
        .iter()
        .zip(&staged.image_locations)
        .map(|(disk, image)| DiskLineage {
            job_id: job.id.clone(),
            disk_key: disk.key.clone(),
            last_change_id: disk.change_id.clone(),
            last_snapshot_id: checkpoint
                .snapshots
                .get(&disk.key)
                .map(|s| s.snapshot_id.clone()),
            last_manifest: Some(staged.manifest_location.clone()),
            last_staged_image: keep_staged.then(|| image.clone()),
            last_run_id: Some(run.id.clone()),
        })
        .collect()
}

/// The kind of a run's error, read from the first typed error in its chain: what the
/// scheduler retries by. An error of no known type (an I/O error from a connection, say)
/// counts as transient.
pub fn classify(err: &anyhow::Error) -> ErrorKind {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<rehost_importer::Error>() {
            return e.kind();
        }
        if let Some(e) = cause.downcast_ref::<rehost_vsphere::Error>() {
            return e.kind();
        }
        if let Some(e) = cause.downcast_ref::<rehost_diskimage::Error>() {
            return e.kind();
        }
        if let Some(e) = cause.downcast_ref::<rehost_importer::kms::KmsError>() {
            return e.kind();
        }
    }
    ErrorKind::Transient
}

/// Writes a run's stage, percentage and bytes moved to the store, at most every
/// [`Progress::MIN_INTERVAL`] for byte updates (a run reports thousands of blocks).
#[derive(Clone)]
struct Progress {
    store: SharedStore,
    run: crate::jobs::model::RunId,
    state: Arc<std::sync::Mutex<ProgressState>>,
}

#[derive(Debug, Default)]
struct ProgressState {
    stage: Option<RunStage>,
    percent: u8,
    exported_bytes: u64,
    imported_bytes: u64,
    written: Option<std::time::Instant>,
}

impl Progress {
    const MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

    fn new(store: SharedStore, run: &Run) -> Progress {
        Progress {
            store,
            run: run.id.clone(),
            state: Arc::new(std::sync::Mutex::new(ProgressState {
                percent: run.progress_percent,
                ..ProgressState::default()
            })),
        }
    }

    fn stage(&self, stage: RunStage, percent: u8) -> Result<()> {
        self.update(
            |s| {
                s.stage = Some(stage);
                s.percent = s.percent.max(percent);
            },
            true,
        )
    }

    /// Export: 1–50 %.
    fn export_bytes(&self, done: u64, total: u64) {
        let percent = 1 + scale(done, total, 49);
        let _ = self.update(
            |s| {
                s.exported_bytes = done;
                s.percent = s.percent.max(percent);
            },
            false,
        );
    }

    /// Import: 50–95 %, the disks in turn.
    fn import_start_percent(&self, index: usize, disks: usize) -> u8 {
        50 + scale(index as u64, disks as u64, 45)
    }

    fn import_position(
        &self,
        index: usize,
        disks: usize,
        position: u64,
        size: u64,
        blocks_written: u64,
    ) {
        let span = u8::try_from(45 / disks.max(1)).unwrap_or(45);
        let percent = self.import_start_percent(index, disks) + scale(position, size, span);
        let _ = self.update(
            |s| {
                s.percent = s.percent.max(percent.min(95));
                s.imported_bytes = s
                    .imported_bytes
                    .max(blocks_written * rehost_core::EBS_BLOCK_SIZE);
            },
            false,
        );
    }

    fn imported_bytes(&self, blocks_written: u64) {
        let _ = self.update(
            |s| {
                s.imported_bytes = s
                    .imported_bytes
                    .max(blocks_written * rehost_core::EBS_BLOCK_SIZE);
            },
            true,
        );
    }

    fn update(&self, change: impl FnOnce(&mut ProgressState), force: bool) -> Result<()> {
        let (stage, percent, bytes) = {
            let mut state = self
                .state
                .lock()
                .map_err(|_| anyhow::anyhow!("progress lock poisoned"))?;
            change(&mut state);
            let due = state
                .written
                .is_none_or(|t| t.elapsed() >= Self::MIN_INTERVAL);
            if !force && !due {
                return Ok(());
            }
            state.written = Some(std::time::Instant::now());
            (
                state.stage.unwrap_or(RunStage::Queued),
                state.percent,
                // Bytes moved: read from the source, then written to EBS.
                state.exported_bytes + state.imported_bytes,
            )
        };
        self.store
            .with(|s| s.run_progress(&self.run, stage, percent, bytes, None, Timestamp::now()))
    }
}

/// `part` of `whole` as a share of `span` (0 when `whole` is 0).
fn scale(part: u64, whole: u64, span: u8) -> u8 {
    if whole == 0 {
        return 0;
    }
    let share = u128::from(part.min(whole)) * u128::from(span) / u128::from(whole);
    u8::try_from(share).unwrap_or(span)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{JobId, JobState, LicenseType, RunId, ServerId};

    fn job() -> Job {
        Job {
            id: JobId("sms-job-1".into()),
            server_id: ServerId("s-1".into()),
            source: "vc1".into(),
            vm_id: "uuid-1".into(),
            vm_name: "web 01/prod".into(),
            seed_replication_time: Timestamp(0),
            frequency_hours: Some(12),
            run_once: false,
            license_type: LicenseType::Byol,
            number_of_recent_amis_to_keep: 2,
            encrypted: false,
            kms_key_id: None,
            description: None,
            state: JobState::Active,
            status_message: None,
            next_replication_run_start_time: None,
            consecutive_failures: 0,
            latest_ami_id: None,
            created_at: Timestamp(0),
        }
    }

    fn lineage(key: &str, manifest: &str, change_id: Option<&str>) -> DiskLineage {
        DiskLineage {
            job_id: JobId("sms-job-1".into()),
            disk_key: key.into(),
            last_change_id: change_id.map(str::to_owned),
            last_snapshot_id: Some(format!("snap-{key}")),
            last_manifest: Some(manifest.into()),
            last_staged_image: None,
            last_run_id: Some(RunId("sms-run-1".into())),
        }
    }

    #[test]
    fn a_run_is_incremental_only_when_every_disk_has_a_lineage_from_one_run_with_a_change_id() {
        let job = job();
        assert_eq!(incremental_base(&[], &job), None);
        let m = "s3://b/p/sms-job-1/sms-run-1/web.manifest.json";
        assert_eq!(
            incremental_base(
                &[
                    lineage("2000", m, Some("c1")),
                    lineage("2001", m, Some("c2"))
                ],
                &job
            ),
            Some(m.to_owned())
        );
        // A disk read without CBT has no changeId: no changes can be asked since.
        assert_eq!(incremental_base(&[lineage("2000", m, None)], &job), None);
        // Lineages from two different runs.
        assert_eq!(
            incremental_base(
                &[
                    lineage("2000", m, Some("c1")),
                    lineage("2001", "other", Some("c2"))
                ],
                &job
            ),
            None
        );
    }

    #[test]
    fn ami_names_are_unique_to_the_run_and_use_only_allowed_characters() {
        let run_id = RunId("sms-run-0123456789abcdef0".into());
        let name = super::ami_name(&job(), &run_with(&run_id));
        assert_eq!(name, "rehost-web-01/prod-sms-run-0123456789abcdef0");
        assert!(name.len() <= 128, "EC2 allows 128 characters");
    }

    fn run_with(id: &RunId) -> Run {
        Run {
            id: id.clone(),
            job_id: JobId("sms-job-1".into()),
            run_type: crate::jobs::model::RunType::OnDemand,
            state: crate::jobs::model::RunState::Active,
            stage: RunStage::Queued,
            progress_percent: 0,
            bytes_moved: 0,
            status_message: None,
            ami_id: None,
            scheduled_start_time: Timestamp(0),
            started_at: None,
            completed_at: None,
            attempt: 1,
            description: None,
        }
    }

    #[test]
    fn tags_name_the_job_run_server_and_license() {
        let tags = resource_tags(&job(), &run_with(&RunId("sms-run-1".into())));
        let get = |k: &str| {
            tags.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get(JOB_TAG), Some("sms-job-1"));
        assert_eq!(get(RUN_TAG), Some("sms-run-1"));
        assert_eq!(get("rehost:license-type"), Some("BYOL"));
    }

    #[test]
    fn progress_scales_stay_in_their_span() {
        assert_eq!(scale(0, 0, 49), 0);
        assert_eq!(scale(5, 10, 49), 24);
        assert_eq!(scale(20, 10, 49), 49);
        assert_eq!(scale(u64::MAX, u64::MAX, 45), 45);
    }

    #[test]
    fn unknown_errors_are_transient_and_typed_ones_keep_their_kind() {
        let plain = anyhow::anyhow!("connection reset");
        assert_eq!(classify(&plain), ErrorKind::Transient);
        let typed = anyhow::Error::new(rehost_importer::Error::InvalidInput("bad".into()))
            .context("importing disk 2000");
        assert_eq!(classify(&typed), ErrorKind::InvalidInput);
    }
}
