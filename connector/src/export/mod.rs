//! `rehost export`: a VM's disks, read through a snapshot (changed areas only with
//! `--base`), written as streamOptimized VMDKs (deltas for incrementals) with a manifest,
//! to a folder or an S3 prefix; and `rehost export --cleanup`, which removes snapshots
//! rehost left behind after a crash.
//!
//! The snapshot is recorded in the store's ledger *before* it is asked for, and removed on
//! every path out of the export: success, error, Ctrl-C or SIGTERM. `--cleanup` finds the
//! rest (a `kill -9`): the ledger's open entries and, on the VMs, snapshots carrying
//! rehost's name prefix *and* description marker, never anyone else's.

pub mod azure;
mod disk;
pub mod hyperv;
pub mod manifest;
pub mod target;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use rehost_core::{ChangeToken, SnapshotOptions, SnapshotRef, Source, VmInfo};
use rehost_importer::aws::Clients;
use rehost_vsphere::{Client, MoRef, Vm, VsphereSource};
use serde::Serialize;

use crate::aws_args::{AwsArgs, runtime};
use crate::config::{Config, SourceConfig, SourceKind};
use crate::output::{OutputMode, print_json};
use crate::sources::Connected;
use crate::store::{SharedStore, Store};
use manifest::{DiskEntry, ExportKind, Manifest, SourceEntry, VmEntry};
use target::Target;

/// Every snapshot rehost takes starts with this; `--cleanup` also requires the marker below.
pub const SNAPSHOT_PREFIX: &str = "rehost-export-";
/// The start of the description of every snapshot rehost takes.
pub const SNAPSHOT_MARKER: &str = "Created by rehost";

/// `rehost export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The source, as named in the config.
    #[arg(long)]
    source: String,
    /// The VM: its name, or (vSphere) inventory path or instance UUID, or (Azure) VM id or
    /// resource id.
    #[arg(long, required_unless_present = "cleanup")]
    vm: Option<String>,
    /// Where to write: a folder, or s3://bucket/prefix.
    #[arg(long, value_name = "DIR|S3_URL", required_unless_present = "cleanup")]
    to: Option<String>,
    /// An earlier export's manifest: export only what changed since, as delta images whose
    /// parents are that export's images (keep the chain in one folder). Azure: the base's
    /// snapshots are deleted once this export's replace them.
    #[arg(long, value_name = "MANIFEST")]
    base: Option<String>,
    /// Ask the guest to quiesce its file systems for the snapshot: VMware Tools (vSphere),
    /// or an application-consistent checkpoint through the guest's VSS (Hyper-V).
    #[arg(long)]
    quiesce: bool,
    /// How to read the disks: through a snapshot and CBT (any power state), or with
    /// ExportVm (powered-off VMs only, full exports only).
    #[arg(long, value_enum, default_value_t = Via::Snapshot)]
    via: Via,
    /// Instead of exporting: remove the snapshots rehost left on the source's VMs (all
    /// VMs, or just --vm).
    #[arg(long, conflicts_with_all = ["to", "base", "quiesce"])]
    cleanup: bool,
    /// The config file (else $REHOST_CONFIG, else ./rehost.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    aws: AwsArgs,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    output: OutputMode,
}

/// How disks are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    Snapshot,
    ExportVm,
}

/// One export, as `rehost export` and replication runs ask for it.
pub struct ExportRequest<'a> {
    /// The source, from the config.
    pub source: &'a SourceConfig,
    /// The VM: its name, inventory path or instance UUID.
    pub vm: String,
    /// A folder or `s3://bucket/prefix`.
    pub to: String,
    /// An earlier export's manifest: export only what changed since.
    pub base: Option<String>,
    /// Disk key → the EBS snapshot the base export was imported into. A replication run
    /// deletes its staged images once imported, so the unchanged rest of a block the VM
    /// changed in part is read from these instead of the base's image. Empty: the image.
    pub base_snapshots: BTreeMap<String, String>,
    pub quiesce: bool,
    pub via: Via,
    /// No progress bars or notes on the terminal (JSON output, or a run of the connector).
    pub quiet: bool,
    /// Why the snapshot is taken, as the ledger records it (`export`, `run:sms-run-…`).
    pub purpose: String,
    /// Told the source bytes read so far, of `total` to read, as the export goes.
    pub progress: Option<ExportProgress>,
    /// What stops the export early (the snapshot is still removed).
    pub stop: Stop,
    /// Azure: once this incremental export is written, delete the base's snapshots (this
    /// export's replace them as the next base). A replication run leaves that until the
    /// run has completed, so a retried run can still diff against them.
    pub retire_base: bool,
}

impl std::fmt::Debug for ExportRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportRequest")
            .field("source", &self.source.name)
            .field("vm", &self.vm)
            .field("to", &self.to)
            .field("base", &self.base)
            .field("purpose", &self.purpose)
            .finish_non_exhaustive()
    }
}

/// A progress callback: `(bytes read so far, bytes to read)` across all disks.
#[derive(Clone)]
pub struct ExportProgress(pub Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for ExportProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportProgress")
    }
}

/// What ends an export early.
#[derive(Debug, Clone)]
pub enum Stop {
    /// Ctrl-C or SIGTERM (the command line).
    Signals,
    /// The receiver turning true (the connector stopping or cancelling a run).
    When(tokio::sync::watch::Receiver<bool>),
}

impl Stop {
    /// Resolves when the export must stop, saying why.
    async fn stopped(&self) -> String {
        match self {
            Stop::Signals => shutdown_signal().await.to_owned(),
            Stop::When(rx) => {
                let mut rx = rx.clone();
                // A dropped sender means nobody can cancel any more: never resolve.
                if rx.wait_for(|stop| *stop).await.is_err() {
                    std::future::pending::<()>().await;
                }
                "a stop request".to_owned()
            }
        }
    }

    /// Runs `work` unless a stop comes first.
    pub async fn guard<T>(&self, work: impl std::future::Future<Output = T>) -> Result<T> {
        tokio::select! {
            out = work => Ok(out),
            why = self.stopped() => Err(anyhow::anyhow!("interrupted by {why}; the snapshot is being removed")),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// Where the manifest is.
    pub manifest_location: String,
    pub manifest: Manifest,
    /// The target's location of each image, in manifest order.
    pub image_locations: Vec<String>,
    /// Bytes read from the source's storage, where the source can count them (Hyper-V:
    /// over SMB, image metadata included).
    pub source_bytes_read: Option<u64>,
}

/// What `rehost export` prints.
#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub manifest: String,
    pub kind: ExportKind,
    pub vm: String,
    pub disks: Vec<DiskReport>,
    pub snapshot_removed: bool,
    /// Hyper-V: bytes read over SMB (data and image metadata).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_bytes_read: Option<u64>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct DiskReport {
    pub key: String,
    pub image: String,
    pub capacity_bytes: u64,
    pub data_bytes: u64,
    /// Read from the base export's image, not the source (see the manifest's field).
    pub base_bytes_read: u64,
    pub image_bytes: u64,
    pub content_sha256: String,
}

/// Runs `rehost export`.
pub fn run(args: ExportArgs) -> Result<ExitCode> {
    let rt = runtime()?;
    let handle = rt.handle().clone();
    rt.block_on(async move {
        let config = Config::locate(args.config.as_deref())?;
        let source_config = config.source(&args.source)?.clone();
        let store = Store::open(&config.store_path())?;
        let connected = crate::sources::connect(&config, &source_config).await?;
        let result = if args.cleanup {
            match &connected {
                Connected::Vsphere(client) => {
                    cleanup(
                        &store,
                        client,
                        &args.source,
                        args.vm.as_deref(),
                        args.output,
                    )
                    .await
                }
                Connected::Azure(azure) => {
                    cleanup_azure(store, azure, &args.source, args.vm.as_deref(), args.output).await
                }
                Connected::Hyperv(hyperv) => {
                    let ledger = SharedStore::new(store);
                    let (removed, failed, vms) =
                        hyperv::cleanup(&ledger, hyperv, &args.source, args.vm.as_deref()).await?;
                    CleanupReport { removed, failed }.print(
                        args.output,
                        &format!("no rehost checkpoint left on {vms} VM(s)"),
                    )
                }
            }
        } else {
            let needs_s3 =
                args.to.as_deref().is_some_and(is_s3) || args.base.as_deref().is_some_and(is_s3);
            let clients = if needs_s3 {
                Some(args.aws.clients().await)
            } else {
                None
            };
            export_command(&args, &source_config, store, &connected, clients, handle).await
        };
        // Log out whatever happened: sessions are a limited resource on vCenter.
        connected.logout().await;
        result
    })
}

fn is_s3(text: &str) -> bool {
    rehost_importer::s3::S3Url::is_s3(text)
}

/// `rehost export` (not `--cleanup`): one export, then its report.
async fn export_command(
    args: &ExportArgs,
    source_config: &SourceConfig,
    store: Store,
    connected: &Connected,
    clients: Option<Clients>,
    handle: tokio::runtime::Handle,
) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let (Some(vm_name), Some(to)) = (args.vm.as_deref(), args.to.as_deref()) else {
        bail!("--vm and --to are needed to export");
    };
    let request = ExportRequest {
        source: source_config,
        vm: vm_name.to_owned(),
        to: to.to_owned(),
        base: args.base.clone(),
        base_snapshots: BTreeMap::new(),
        quiesce: args.quiesce,
        via: args.via,
        quiet: args.output == OutputMode::Json,
        purpose: "export".to_owned(),
        progress: None,
        stop: Stop::Signals,
        retire_base: true,
    };
    let ledger = SharedStore::new(store);
    let exported = export(&request, connected, clients, &ledger, handle).await?;
    let manifest = &exported.manifest;
    let report = ExportReport {
        manifest: exported.manifest_location.clone(),
        kind: manifest.kind,
        vm: manifest.vm.name.clone(),
        disks: manifest
            .disks
            .iter()
            .zip(&exported.image_locations)
            .map(|(d, image)| DiskReport {
                key: d.key.clone(),
                image: image.clone(),
                capacity_bytes: d.capacity_bytes,
                data_bytes: d.data_bytes,
                base_bytes_read: d.base_bytes_read,
                image_bytes: d.image_bytes,
                content_sha256: d.content_sha256.clone(),
            })
            .collect(),
        snapshot_removed: args.via == Via::Snapshot && source_config.kind == SourceKind::Vsphere,
        source_bytes_read: exported.source_bytes_read,
        seconds: started.elapsed().as_secs_f64(),
    };
    match args.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => {
            println!(
                "{} export of {} written: {}",
                kind_name(report.kind),
                report.vm,
                report.manifest
            );
            for d in &report.disks {
                println!(
                    "  disk {}: {} ({} of {} bytes read, image {} bytes)",
                    d.key, d.image, d.data_bytes, d.capacity_bytes, d.image_bytes
                );
            }
            if report.snapshot_removed {
                println!("  snapshot {} removed", manifest.snapshot_name);
            }
            println!("  {:.1} s", report.seconds);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Exports one VM as `request` says: preflight, snapshot (recorded in `ledger` first),
/// each disk's image and block list, the manifest; a vSphere snapshot is removed on every
/// path, an Azure one kept as the next base only when the export succeeded.
pub async fn export(
    request: &ExportRequest<'_>,
    source: &Connected,
    clients: Option<Clients>,
    ledger: &SharedStore,
    handle: tokio::runtime::Handle,
) -> Result<Exported> {
    match source {
        Connected::Vsphere(client) => {
            export_vsphere(request, client, clients, ledger, handle).await
        }
        Connected::Azure(azure) => {
            if request.via == Via::ExportVm {
                bail!("--via export-vm is for vSphere; Azure VMs are read through snapshots");
            }
            if request.quiesce {
                bail!("--quiesce is for vSphere; Azure snapshots are crash-consistent");
            }
            azure::export(request, azure, clients, ledger, handle).await
        }
        Connected::Hyperv(hv) => {
            if request.via == Via::ExportVm {
                bail!("--via export-vm is for vSphere; Hyper-V VMs are read through checkpoints");
            }
            hyperv::export(request, hv, clients, ledger, handle).await
        }
    }
}

async fn export_vsphere(
    request: &ExportRequest<'_>,
    client: &Client,
    clients: Option<Clients>,
    ledger: &SharedStore,
    handle: tokio::runtime::Handle,
) -> Result<Exported> {
    let found = client.find_vm(&request.vm).await?;
    let vm = found.info.clone();
    let base = Base::of_request(request, clients.as_ref(), &vm).await?;
    preflight(client, &found, request, base.as_ref()).await?;

    let target = Target::parse(&request.to, clients.clone())?;
    target.prepare()?;
    if let Some(base) = &base
        && target::folder_of(&target.location("x")) != target::folder_of(&base.location)
    {
        tracing::warn!(
            base = %base.location,
            "the delta images name their parents by file name: keep them in the base's folder for qemu-img to follow the chain"
        );
    }

    let export_id = new_export_id();
    let snapshot_name = format!("{SNAPSHOT_PREFIX}{export_id}");
    let job = ExportJob {
        request,
        source_config: SourceEntry {
            name: request.source.name.clone(),
            kind: request.source.kind.to_string(),
            url: request.source.url.clone(),
        },
        client,
        found: &found,
        base: base.as_ref(),
        target: &target,
        export_id: &export_id,
        snapshot_name: &snapshot_name,
        handle,
        read_so_far: Arc::new(std::sync::atomic::AtomicU64::new(0)),
    };
    let (manifest_location, manifest) = if request.via == Via::ExportVm {
        // No snapshot: the VM is powered off, and the lease is aborted if we stop early.
        request.stop.guard(job.run_export_vm()).await??
    } else {
        export_through_snapshot(&job, ledger).await?
    };
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

/// Takes the snapshot (ledger first), exports from it, and removes it whatever happened.
async fn export_through_snapshot(
    job: &ExportJob<'_>,
    ledger: &SharedStore,
) -> Result<(String, Manifest)> {
    let vm = &job.found.info;
    let source = VsphereSource::new(job.client.clone());
    let entry = ledger.with(|s| {
        s.snapshot_intended(
            &job.source_config.name,
            &vm.id.0,
            &job.found.moref.value,
            job.snapshot_name,
            &job.request.purpose,
        )
    })?;
    let options = SnapshotOptions {
        name: job.snapshot_name.to_owned(),
        description: format!(
            "{SNAPSHOT_MARKER} export {}; removed when the export ends. If no rehost export is running, `rehost export --cleanup` removes it.",
            job.export_id
        ),
        quiesce: job.request.quiesce,
    };
    if !job.request.quiet {
        eprintln!("Taking snapshot {} of {}…", job.snapshot_name, vm.name);
    }
    let created = job
        .request
        .stop
        .guard(source.snapshot(&vm.id, &options))
        .await
        .and_then(|r| {
            r.map_err(|e| anyhow::Error::new(e).context(format!("snapshotting {}", vm.name)))
        });
    let snapshot = match created {
        Ok(snapshot) => snapshot,
        Err(err) => {
            // The task may have created it before failing or being interrupted.
            remove_by_name(
                ledger,
                job.client,
                entry,
                &job.found.moref,
                job.snapshot_name,
            )
            .await;
            return Err(err);
        }
    };
    ledger.with(|s| s.snapshot_created(entry, &snapshot.snapshot_ref))?;
    let outcome = job
        .request
        .stop
        .guard(job.run(&source, &snapshot))
        .await
        .and_then(|r| r);
    let removed = release(ledger, &source, entry, &snapshot).await;
    let exported = outcome?;
    removed?;
    Ok(exported)
}

fn kind_name(kind: ExportKind) -> &'static str {
    match kind {
        ExportKind::Full => "Full",
        ExportKind::Incremental => "Incremental",
    }
}

/// Checks the VM can be exported as asked, and turns CBT on when it is off.
async fn preflight(
    client: &Client,
    found: &Vm,
    request: &ExportRequest<'_>,
    base: Option<&Base>,
) -> Result<()> {
    let vm = &found.info;
    let unsupported = vm.unsupported_reasons();
    if !unsupported.is_empty() {
        bail!(
            "{} cannot be exported: {} (snapshots do not cover such disks; detach them or make them dependent)",
            vm.name,
            unsupported.join("; ")
        );
    }
    if vm.disks.is_empty() {
        bail!("{} has no virtual disk to export", vm.name);
    }
    let running = client.running_tasks(&found.moref).await?;
    if let Some(task) = running.first() {
        bail!(
            "{} has a task in progress ({}); try again when it has finished",
            vm.name,
            task.description_id
        );
    }
    if request.via == Via::ExportVm {
        if base.is_some() {
            bail!("--via export-vm makes full exports only; drop --base, or use --via snapshot");
        }
        if vm.power_state != rehost_core::PowerState::PoweredOff {
            bail!(
                "{} is {:?}: ExportVm needs a powered-off VM (vCenter refuses it otherwise); use --via snapshot",
                vm.name,
                vm.power_state
            );
        }
    }
    if !vm.change_tracking && request.via == Via::Snapshot {
        if base.is_some() {
            bail!(
                "changed-block tracking is off on {}, so the changes since the base cannot be known; run a full export (without --base)",
                vm.name
            );
        }
        client
            .enable_change_tracking(&found.moref)
            .await
            .with_context(|| format!("enabling changed-block tracking on {}", vm.name))?;
        tracing::info!(vm = %vm.name, "changed-block tracking was off; turned it on");
        if !request.quiet {
            eprintln!(
                "note: changed-block tracking was off on {}; rehost turned it on. vSphere starts tracking at the VM's next stun (the snapshot this export takes is one), so the next export can be incremental.",
                vm.name
            );
        }
    }
    Ok(())
}

/// The export a `--base` manifest describes.
struct Base {
    location: String,
    manifest: Manifest,
    clients: Option<Clients>,
    /// See [`ExportRequest::base_snapshots`].
    snapshots: BTreeMap<String, String>,
}

impl Base {
    /// The request's base export, if it names one.
    async fn of_request(
        request: &ExportRequest<'_>,
        clients: Option<&Clients>,
        vm: &VmInfo,
    ) -> Result<Option<Base>> {
        let Some(location) = &request.base else {
            return Ok(None);
        };
        let mut base = Base::load(location, clients, vm).await?;
        base.snapshots = request.base_snapshots.clone();
        Ok(Some(base))
    }

    async fn load(location: &str, clients: Option<&Clients>, vm: &VmInfo) -> Result<Base> {
        let bytes = target::read_small(location, clients).await?;
        let manifest = Manifest::parse(&bytes, location)?;
        if manifest.vm.id != vm.id.0 {
            bail!(
                "--base {location} is an export of VM {} ({}), not of {} ({})",
                manifest.vm.name,
                manifest.vm.id,
                vm.name,
                vm.id
            );
        }
        Ok(Base {
            location: location.to_owned(),
            manifest,
            clients: clients.cloned(),
            snapshots: BTreeMap::new(),
        })
    }

    /// Refuses a base whose images are not all `format` (`whose`: "a Hyper-V export's VHD"):
    /// a delta can only be written over an image of its own format.
    fn require_format(&self, format: disk::ImageFormat, whose: &str) -> Result<()> {
        match self
            .manifest
            .disks
            .iter()
            .find(|d| d.image_format != format.name())
        {
            Some(entry) => bail!(
                "--base {}: disk {} is a {} image, not {whose}",
                self.location,
                entry.key,
                entry.image_format
            ),
            None => Ok(()),
        }
    }

    /// Where the unchanged rest of a partly changed block of `entry`'s disk is read.
    fn parent_bytes(&self, entry: &DiskEntry) -> Result<disk::ParentBytesFrom> {
        match self.snapshots.get(&entry.key) {
            Some(snapshot_id) => Ok(disk::ParentBytesFrom::Snapshot {
                snapshot_id: snapshot_id.clone(),
                clients: self.clients.clone().with_context(|| {
                    format!("reading snapshot {snapshot_id} needs AWS clients (internal error)")
                })?,
            }),
            None => Ok(disk::ParentBytesFrom::Image {
                location: target::sibling(&self.location, &entry.image),
                clients: self.clients.clone(),
            }),
        }
    }

    async fn block_list(&self, entry: &DiskEntry) -> Result<Vec<[u8; 32]>> {
        let location = target::sibling(&self.location, &entry.block_list);
        let bytes = target::read_small(&location, self.clients.as_ref()).await?;
        manifest::decode_block_list(&bytes, &entry.content_sha256, &location)
    }
}

struct ExportJob<'a> {
    request: &'a ExportRequest<'a>,
    source_config: SourceEntry,
    client: &'a Client,
    found: &'a Vm,
    base: Option<&'a Base>,
    target: &'a Target,
    export_id: &'a str,
    snapshot_name: &'a str,
    handle: tokio::runtime::Handle,
    /// Source bytes read so far, across disks, for the progress callback.
    read_so_far: Arc<std::sync::atomic::AtomicU64>,
}

impl ExportJob<'_> {
    fn stem(&self) -> String {
        format!("{}-{}", file_safe(&self.found.info.name), self.export_id)
    }

    async fn run(
        &self,
        source: &VsphereSource,
        snapshot: &SnapshotRef,
    ) -> Result<(String, Manifest)> {
        let vm = &self.found.info;
        let stem = self.stem();
        let mut disks = Vec::new();
        for disk in &vm.disks {
            let image = format!("{stem}-disk{}.vmdk", disk.id);
            disks.push(
                export_disk(
                    source,
                    snapshot,
                    &vm.name,
                    disk,
                    self.base,
                    self.target,
                    image.clone(),
                    disk::ImageFormat::VmdkStream,
                    |parent| self.disk_job(&image, disk, parent),
                )
                .await?,
            );
        }
        self.finish(disks).await
    }

    /// The ExportVm path: one lease, each disk's streamOptimized download decoded and
    /// re-written as it arrives.
    async fn run_export_vm(&self) -> Result<(String, Manifest)> {
        let vm = &self.found.info;
        let lease = self
            .client
            .export_vm(&self.found.moref)
            .await
            .with_context(|| format!("exporting {} with ExportVm", vm.name))?;
        let urls = lease.disk_urls()?;
        if urls.len() != vm.disks.len() {
            let _ = lease.abort().await;
            bail!(
                "the export lease serves {} disk(s), {} has {}",
                urls.len(),
                vm.name,
                vm.disks.len()
            );
        }
        let total: u64 = vm
            .disks
            .iter()
            .map(|d| d.capacity_bytes)
            .sum::<u64>()
            .max(1);
        let lease = std::sync::Arc::new(lease);
        let mut disks = Vec::new();
        let mut done_before = 0u64;
        for (disk, (_, url)) in vm.disks.iter().zip(urls) {
            let image = format!("{}-disk{}.vmdk", self.stem(), disk.id);
            let outcome = async {
                let body = Box::pin(lease.download(&url).await?);
                let progress_lease = lease.clone();
                let offset = done_before;
                disk::write_from_vmdk_stream(
                    self.disk_job(&image, disk, None),
                    disk.capacity_bytes,
                    body,
                    move |done| {
                        let percent = (offset + done).saturating_mul(100) / total;
                        progress_lease.set_progress(u8::try_from(percent).unwrap_or(100));
                    },
                )
                .await
            }
            .await
            .with_context(|| format!("exporting disk {} ({}) of {}", disk.id, disk.label, vm.name));
            let written = match outcome {
                Ok(written) => written,
                Err(err) => {
                    if let Ok(lease) = std::sync::Arc::try_unwrap(lease) {
                        let _ = lease.abort().await;
                    }
                    return Err(err);
                }
            };
            done_before += disk.capacity_bytes;
            // A powered-off VM's disks do not change: their current changeId is the state read.
            let change_id = if vm.change_tracking {
                disk.change_id.clone()
            } else {
                None
            };
            disks.push(
                self.disk_entry(disk, image, written, change_id, None, None)
                    .await?,
            );
        }
        if let Ok(lease) = std::sync::Arc::try_unwrap(lease) {
            lease
                .complete()
                .await
                .context("completing the export lease")?;
        }
        self.finish(disks).await
    }

    /// The per-disk byte callback feeding the request's progress, if it has one.
    fn on_data(&self) -> Option<Arc<dyn Fn(u64) + Send + Sync>> {
        on_data(self.request, &self.found.info, &self.read_so_far)
    }

    fn disk_job(
        &self,
        image: &str,
        disk: &rehost_core::DiskInfo,
        parent: Option<disk::Parent>,
    ) -> disk::DiskJob {
        disk::DiskJob {
            target: self.target.clone(),
            image: image.to_owned(),
            format: disk::ImageFormat::VmdkStream,
            label: format!("disk {}", disk.id),
            parent,
            quiet: self.request.quiet,
            on_data: self.on_data(),
            handle: self.handle.clone(),
        }
    }

    async fn disk_entry(
        &self,
        disk: &rehost_core::DiskInfo,
        image: String,
        written: disk::DiskWritten,
        change_id: Option<String>,
        since_change_id: Option<String>,
        base_entry: Option<&DiskEntry>,
    ) -> Result<DiskEntry> {
        disk_entry(
            self.target,
            disk,
            image,
            disk::ImageFormat::VmdkStream,
            written,
            change_id,
            since_change_id,
            base_entry,
        )
        .await
    }

    async fn finish(&self, disks: Vec<DiskEntry>) -> Result<(String, Manifest)> {
        write_manifest(
            self.target,
            &self.stem(),
            ManifestHead {
                export_id: self.export_id,
                snapshot_name: self.snapshot_name,
                source: self.source_config.clone(),
                vm: &self.found.info,
                base: self.base,
            },
            disks,
        )
        .await
    }
}

/// Exports one disk of a snapshot through any source: every allocated area, or with a base
/// the changes since the base's change token, written by the job `make_job` makes (a delta
/// of the base's image when there is a base); answers the disk's manifest entry.
#[allow(clippy::too_many_arguments)]
async fn export_disk<S: Source>(
    source: &S,
    snapshot: &SnapshotRef,
    vm_name: &str,
    disk: &rehost_core::DiskInfo,
    base: Option<&Base>,
    target: &Target,
    image: String,
    format: disk::ImageFormat,
    make_job: impl FnOnce(Option<disk::Parent>) -> disk::DiskJob,
) -> Result<DiskEntry> {
    let base_entry = match base {
        Some(base) => Some(base.manifest.disk(&disk.id.0).with_context(|| {
            format!(
                "disk {} ({}) is not in the base export {}: it was added since; run a full export",
                disk.id, disk.label, base.location
            )
        })?),
        None => None,
    };
    let since = match base_entry {
        Some(entry) => Some(ChangeToken(entry.change_id.clone().with_context(|| {
            format!(
                "disk {} has no change token in the base export (on vSphere: changed-block tracking was off); run a full export",
                disk.id
            )
        })?)),
        None => None,
    };
    let read = source
        .read_disk(snapshot, &disk.id, since.as_ref())
        .await
        .with_context(|| format!("reading disk {} ({}) of {vm_name}", disk.id, disk.label))?;
    let parent = match (base, base_entry) {
        (Some(base), Some(entry)) => {
            if entry.capacity_bytes != read.capacity_bytes {
                bail!(
                    "disk {} was {} bytes in the base export and is {} now: a resized disk needs a full export",
                    disk.id,
                    entry.capacity_bytes,
                    read.capacity_bytes
                );
            }
            Some(disk::Parent {
                entry: entry.clone(),
                location: target::sibling(&base.location, &entry.image),
                digests: base.block_list(entry).await?,
                bytes_from: base.parent_bytes(entry)?,
            })
        }
        _ => None,
    };
    let written = disk::write(make_job(parent), read)
        .await
        .with_context(|| format!("exporting disk {} ({}) of {vm_name}", disk.id, disk.label))?;
    let change_id = Some(written.token.0.clone());
    disk_entry(
        target,
        disk,
        image,
        format,
        written,
        change_id,
        since.map(|t| t.0),
        base_entry,
    )
    .await
}

/// One disk's manifest entry; writes its block list beside the image (`<image>.blocks`,
/// the extension replaced).
#[allow(clippy::too_many_arguments)]
async fn disk_entry(
    target: &Target,
    disk: &rehost_core::DiskInfo,
    image: String,
    format: disk::ImageFormat,
    written: disk::DiskWritten,
    change_id: Option<String>,
    since_change_id: Option<String>,
    base_entry: Option<&DiskEntry>,
) -> Result<DiskEntry> {
    let stem = image.rsplit_once('.').map_or(image.as_str(), |(s, _)| s);
    let block_list = format!("{stem}.blocks");
    let list = target
        .put(&block_list, manifest::encode_block_list(&written.digests))
        .await?;
    let (image_cid, image_unique_id) = match &written.id {
        rehost_diskimage::ImageId::VmdkCid(cid) => (*cid, None),
        rehost_diskimage::ImageId::VhdUniqueId(id) => (0, Some(hex::encode(id))),
        other => bail!("{image}: an image id of {other:?} is not one an export writes"),
    };
    Ok(DiskEntry {
        key: disk.id.0.clone(),
        label: disk.label.clone(),
        capacity_bytes: written.capacity_bytes,
        change_id,
        since_change_id,
        image,
        image_format: format.name().to_owned(),
        image_bytes: written.image.bytes,
        image_sha256: written.image.sha256,
        image_cid,
        image_unique_id,
        parent_image: base_entry.map(|e| e.image.clone()),
        data_bytes: written.data_bytes,
        base_bytes_read: written.parent_bytes_read,
        block_list,
        content_sha256: list.sha256,
        disk_sha256: written.disk_sha256,
    })
}

/// Exports every supported disk of `vm` as a dynamic VHD named `<stem>-disk-<id>.vhd` (a
/// differencing VHD of the base's image for an incremental): how the Azure and Hyper-V
/// sources, whose disks are VHDs, write theirs.
#[allow(clippy::too_many_arguments)]
async fn export_vhd_disks<S: Source>(
    source: &S,
    snapshot: &SnapshotRef,
    request: &ExportRequest<'_>,
    vm: &VmInfo,
    base: Option<&Base>,
    target: &Target,
    stem: &str,
    handle: &tokio::runtime::Handle,
    read_so_far: &Arc<std::sync::atomic::AtomicU64>,
) -> Result<Vec<DiskEntry>> {
    let mut disks = Vec::new();
    for disk in vm.disks.iter().filter(|d| d.unsupported.is_none()) {
        let image = format!("{stem}-disk-{}.vhd", disk.id);
        disks.push(
            export_disk(
                source,
                snapshot,
                &vm.name,
                disk,
                base,
                target,
                image.clone(),
                disk::ImageFormat::VhdDynamic,
                |parent| disk::DiskJob {
                    target: target.clone(),
                    image: image.clone(),
                    format: disk::ImageFormat::VhdDynamic,
                    label: format!("disk {}", disk.id),
                    parent,
                    quiet: request.quiet,
                    on_data: on_data(request, vm, read_so_far),
                    handle: handle.clone(),
                },
            )
            .await?,
        );
    }
    Ok(disks)
}

/// The per-disk byte callback feeding `request`'s progress, if it has one: bytes read so far
/// (`so_far`, shared across the VM's disks) of the VM's whole capacity.
fn on_data(
    request: &ExportRequest<'_>,
    vm: &VmInfo,
    so_far: &Arc<std::sync::atomic::AtomicU64>,
) -> Option<Arc<dyn Fn(u64) + Send + Sync>> {
    let progress = request.progress.clone()?;
    let total: u64 = vm.disks.iter().map(|d| d.capacity_bytes).sum();
    let so_far = so_far.clone();
    Some(Arc::new(move |bytes| {
        let done = so_far.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed) + bytes;
        (progress.0)(done, total);
    }))
}

/// What a manifest says besides its disks.
struct ManifestHead<'a> {
    export_id: &'a str,
    snapshot_name: &'a str,
    source: SourceEntry,
    vm: &'a VmInfo,
    base: Option<&'a Base>,
}

/// Writes `<stem>.manifest.json` to the target; answers where, and the manifest.
async fn write_manifest(
    target: &Target,
    stem: &str,
    head: ManifestHead<'_>,
    disks: Vec<DiskEntry>,
) -> Result<(String, Manifest)> {
    let vm = head.vm;
    let manifest = Manifest {
        format: manifest::FORMAT.to_owned(),
        export_id: head.export_id.to_owned(),
        created_at: now_rfc3339(),
        source: head.source,
        vm: VmEntry {
            id: vm.id.0.clone(),
            name: vm.name.clone(),
            path: vm.path.clone(),
            firmware: vm.firmware,
            guest_os: vm.guest_os.clone(),
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
        },
        snapshot_name: head.snapshot_name.to_owned(),
        kind: if head.base.is_some() {
            ExportKind::Incremental
        } else {
            ExportKind::Full
        },
        parent_manifest: head.base.map(|b| {
            b.location
                .rsplit('/')
                .next()
                .unwrap_or(&b.location)
                .to_owned()
        }),
        disks,
    };
    let name = format!("{stem}.manifest.json");
    target
        .put(&name, serde_json::to_vec_pretty(&manifest)?)
        .await?;
    Ok((target.location(&name), manifest))
}

/// Removes the export's snapshot and closes its ledger entry; on failure the entry stays
/// open for `--cleanup`.
async fn release(
    ledger: &SharedStore,
    source: &VsphereSource,
    entry: i64,
    snapshot: &SnapshotRef,
) -> Result<()> {
    match source.release(snapshot).await {
        Ok(()) => {
            ledger.with(|s| s.snapshot_removed(entry))?;
            Ok(())
        }
        Err(err) => {
            let text = format!("{err:#}");
            ledger.with(|s| s.snapshot_removal_failed(entry, &text))?;
            Err(anyhow::Error::new(err).context(format!(
                "removing snapshot {} failed; run `rehost export --cleanup` to retry",
                snapshot.name
            )))
        }
    }
}

/// After a failed or interrupted CreateSnapshot: removes a snapshot of that name if the
/// task made one.
pub async fn remove_by_name(
    ledger: &SharedStore,
    client: &Client,
    entry: i64,
    vm: &MoRef,
    name: &str,
) {
    let mut failures = Vec::new();
    match client.list_snapshots(vm).await {
        Ok(snapshots) => {
            for snap in snapshots.iter().filter(|s| s.name == name) {
                if let Err(err) = client.remove_snapshot(&snap.snapshot).await {
                    failures.push(err.to_string());
                }
            }
        }
        Err(err) => failures.push(err.to_string()),
    }
    settle_removal(ledger, entry, &failures);
}

/// Removes a failed or interrupted export's snapshot (a source that keeps its snapshot on
/// success: Azure, Hyper-V); the ledger entry stays open for `--cleanup` if that fails too.
pub(crate) async fn release_failed<S: Source>(
    ledger: &SharedStore,
    source: &S,
    entry: i64,
    snapshot: &SnapshotRef,
) {
    let failures = match source.release(snapshot).await {
        Ok(()) => Vec::new(),
        Err(err) => {
            tracing::warn!(snapshot = %snapshot.name, error = %err, "could not remove the failed export's snapshot");
            vec![err.to_string()]
        }
    };
    settle_removal(ledger, entry, &failures);
}

/// Records how removing ledger entry `entry`'s snapshots went: closed when they were
/// listed and all removed, each failure recorded otherwise (the entry then stays open for
/// `--cleanup`). Shared by every source's leftover removal.
pub(crate) fn settle_removal(ledger: &SharedStore, entry: i64, failures: &[String]) {
    if failures.is_empty() {
        let _ = ledger.with(|s| s.snapshot_removed(entry));
    }
    for failure in failures {
        let _ = ledger.with(|s| s.snapshot_removal_failed(entry, failure));
    }
}

pub(crate) async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "Ctrl-C",
                _ = term.recv() => "SIGTERM",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "Ctrl-C"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

#[derive(Debug, Serialize)]
struct CleanupReport {
    removed: Vec<String>,
    failed: Vec<String>,
}

impl CleanupReport {
    /// Prints the report (`nothing` when there was nothing to do); exit 1 if anything failed.
    fn print(&self, output: OutputMode, nothing: &str) -> Result<ExitCode> {
        match output {
            OutputMode::Json => print_json(self)?,
            OutputMode::Table => {
                for r in &self.removed {
                    println!("removed {r}");
                }
                for f in &self.failed {
                    println!("FAILED {f}");
                }
                if self.removed.is_empty() && self.failed.is_empty() {
                    println!("{nothing}");
                }
            }
        }
        Ok(if self.failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

/// `rehost export --cleanup`.
async fn cleanup(
    store: &Store,
    client: &Client,
    source: &str,
    vm_filter: Option<&str>,
    output: OutputMode,
) -> Result<ExitCode> {
    let vms = match vm_filter {
        Some(name) => vec![client.find_vm(name).await?],
        None => client.inventory_vms().await?,
    };
    let mut report = CleanupReport {
        removed: Vec::new(),
        failed: Vec::new(),
    };
    // (VM id, snapshot name) of every snapshot still on the VMs once we are done.
    let mut remaining = std::collections::HashSet::new();
    for vm in &vms {
        let snapshots = client
            .list_snapshots(&vm.moref)
            .await
            .with_context(|| format!("listing the snapshots of {}", vm.info.name))?;
        for snap in snapshots {
            let ours = snap.name.starts_with(SNAPSHOT_PREFIX)
                && snap.description.starts_with(SNAPSHOT_MARKER);
            if !ours {
                remaining.insert((vm.info.id.0.clone(), snap.name));
                continue;
            }
            let label = format!("{} on {}", snap.name, vm.info.name);
            match client.remove_snapshot(&snap.snapshot).await {
                Ok(()) => {
                    if let Some(id) = store.snapshot_by_name(&snap.name)? {
                        store.snapshot_removed(id)?;
                    }
                    report.removed.push(label);
                }
                Err(err) => {
                    report.failed.push(format!("{label}: {err}"));
                    remaining.insert((vm.info.id.0.clone(), snap.name));
                }
            }
        }
    }
    // Ledger entries whose snapshot is no longer on its VM (removed by hand, or never
    // created) are closed; those on VMs outside the filter are left alone.
    for entry in store.open_snapshots(source)? {
        let in_scope = vms.iter().any(|v| v.info.id.0 == entry.vm_id);
        if in_scope && !remaining.contains(&(entry.vm_id.clone(), entry.name.clone())) {
            store.snapshot_removed(entry.id)?;
        }
    }
    report.print(
        output,
        &format!("no rehost snapshot left on {} VM(s)", vms.len()),
    )
}

/// `rehost export --cleanup` of an Azure source: the snapshot sets the ledger still holds
/// open (an export killed before it could delete them), found by their tag and deleted.
/// Snapshots kept as the base of the next incremental export are closed in the ledger and
/// never touched.
async fn cleanup_azure(
    store: Store,
    azure: &rehost_azure::AzureSource,
    source: &str,
    vm_filter: Option<&str>,
    output: OutputMode,
) -> Result<ExitCode> {
    let vm_id = match vm_filter {
        Some(name) => Some(azure.client().find_vm(name).await?.info.id.0),
        None => None,
    };
    let ledger = SharedStore::new(store);
    let open = ledger.with(|s| s.open_snapshots(source))?;
    let mut report = CleanupReport {
        removed: Vec::new(),
        failed: Vec::new(),
    };
    for entry in open {
        if vm_id.as_ref().is_some_and(|id| *id != entry.vm_id) {
            continue;
        }
        azure::remove_tagged(&ledger, azure, entry.id, &entry.name).await;
        let still_open = ledger
            .with(|s| s.open_snapshots(source))?
            .iter()
            .any(|e| e.id == entry.id);
        let label = format!("{}-* of VM {}", entry.name, entry.vm_id);
        if still_open {
            report.failed.push(label);
        } else {
            report.removed.push(label);
        }
    }
    report.print(output, "no rehost snapshot left behind")
}

/// `20261125T160102Z-1a2b3c`: sortable, unique enough for one VM's exports.
fn new_export_id() -> String {
    let now = SystemTime::now();
    let stamp = now_rfc3339().replace(['-', ':'], "");
    let nanos = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{stamp}-{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

/// The current time as `2026-11-25T16:01:02Z`.
pub fn now_rfc3339() -> String {
    use aws_smithy_types::date_time::{DateTime, Format};
    let now = DateTime::from(SystemTime::now());
    let secs = DateTime::from_secs(now.secs());
    secs.fmt(Format::DateTime)
        .unwrap_or_else(|_| now.secs().to_string())
}

/// A VM name made safe for a file name.
fn file_safe(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    safe.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_ids_sort_by_time_and_names_are_file_safe() {
        let id = new_export_id();
        assert!(id.starts_with("20"), "{id}");
        assert!(!id.contains(':'));
        assert_eq!(file_safe("web 01/prod"), "web_01_prod");
    }
}
