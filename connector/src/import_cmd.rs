//! `rehost import`: a disk image (any format the disk-image library reads) to a verified
//! EBS snapshot through the EBS direct APIs, incrementally onto a parent snapshot, resumable.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::Args;
use rehost_diskimage::Disk;
use rehost_importer::aws::{AwsOptions, Clients};
use rehost_importer::ebs::journal::{JournalLocation, SourceIdentity};
use rehost_importer::ebs::uploader::Encryption;
use rehost_importer::import::{
    ImportOptions, ImportReport, ImportStatus, ProgressCallback, import,
};

use crate::output::{OutputMode, print_json};
use crate::progress::bytes_bar;

/// `rehost import` arguments.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The image: a local file (`s3://bucket/key` sources are coming).
    source: String,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    output: OutputMode,
    /// AWS region (else the profile's or the environment's).
    #[arg(long)]
    region: Option<String>,
    /// Named AWS profile.
    #[arg(long)]
    profile: Option<String>,
    /// One endpoint for every AWS service (e.g. an emulator).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// Volume size in GiB (default: the image's virtual size rounded up).
    #[arg(long)]
    volume_size_gib: Option<i64>,
    /// Snapshot description.
    #[arg(long)]
    description: Option<String>,
    /// Snapshot tag KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Concurrent PutSnapshotBlock calls (default sized for EBS's 1,000 puts/s per snapshot).
    #[arg(long, default_value_t = rehost_importer::ebs::uploader::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Parent snapshot (snap-…): write only what differs from it.
    #[arg(long, value_name = "SNAPSHOT_ID")]
    parent_snapshot: Option<String>,
    /// KMS key ARN encrypting the first snapshot of a chain (implies --encrypted).
    #[arg(long, conflicts_with = "parent_snapshot")]
    kms_key_id: Option<String>,
    /// Encrypt the snapshot (with the account's default EBS key unless --kms-key-id).
    #[arg(long, conflicts_with = "parent_snapshot")]
    encrypted: bool,
    /// Do not wait for the snapshot to be completed.
    #[arg(long)]
    no_wait: bool,
    /// Continue an interrupted import of the same source into its pending snapshot.
    #[arg(long)]
    resume: bool,
    /// Journal file (default: one per import under $XDG_STATE_HOME/rehost/imports).
    #[arg(long, value_name = "FILE")]
    journal: Option<PathBuf>,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Runs `rehost import`.
pub fn run(args: ImportArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: ImportArgs) -> Result<ExitCode> {
    if args.source.starts_with("s3://") {
        // Wired by the S3 source module: open the object as a `Disk`, then `import_disk`.
        bail!("{}: s3 sources: not yet", args.source);
    }
    let path = Path::new(&args.source);
    let disk = Disk::open(&args.source).with_context(|| format!("opening {}", args.source))?;
    let source = SourceIdentity::local(path)?;
    let clients = Clients::load(&AwsOptions {
        region: args.region.clone(),
        profile: args.profile.clone(),
        endpoint_url: args.endpoint_url.clone(),
        static_credentials: None,
    })
    .await;
    import_disk(&clients, &disk, source, &args).await
}

/// Imports an opened disk with the command's options, showing progress and printing the
/// report. Every source (local, S3) ends here.
pub async fn import_disk(
    clients: &Clients,
    disk: &Disk,
    source: SourceIdentity,
    args: &ImportArgs,
) -> Result<ExitCode> {
    let location = JournalLocation {
        dir: JournalLocation::default_dir(),
        file: args.journal.clone(),
    };
    let mut options = ImportOptions::new(source, location);
    options.volume_size_gib = args.volume_size_gib;
    options.description = args.description.clone();
    options.tags = args.tags.clone();
    options.concurrency = args.concurrency.max(1);
    options.parent_snapshot_id = args.parent_snapshot.clone();
    options.encryption = if args.encrypted || args.kms_key_id.is_some() {
        Encryption::Encrypted {
            kms_key_arn: args.kms_key_id.clone(),
        }
    } else {
        Encryption::Default
    };
    options.no_wait = args.no_wait;
    options.resume = args.resume;

    let bar = bytes_bar(
        disk.virtual_size(),
        "importing",
        args.output == OutputMode::Json,
    );
    let progress_bar = bar.clone();
    options.progress = Some(ProgressCallback(Arc::new(move |p| {
        progress_bar.set_position(p.position_bytes);
    })));
    // Ctrl-C stops cleanly: blocks in flight are acknowledged and journaled, so --resume
    // continues where this run stopped.
    let cancel = Arc::new(AtomicBool::new(false));
    options.cancel = Some(cancel.clone());
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.store(true, Ordering::Relaxed);
        }
    });

    let report = import(clients, disk, &options).await;
    bar.finish_and_clear();
    let report = report?;
    match args.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => print_table(&report),
    }
    if report.status == ImportStatus::Interrupted {
        eprintln!(
            "interrupted: snapshot {} is pending; run the same command with --resume to finish it",
            report.snapshot_id
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &ImportReport) {
    let status = serde_json::to_value(r.status).unwrap_or_default();
    let rows = [
        ("snapshot", r.snapshot_id.clone()),
        ("status", status.as_str().unwrap_or("").to_owned()),
        ("volume size", format!("{} GiB", r.volume_size_gib)),
        (
            "blocks written",
            format!("{} ({} resumed)", r.blocks_written, r.blocks_resumed),
        ),
        ("blocks skipped", r.blocks_skipped.to_string()),
        ("bytes read", r.bytes_read.to_string()),
        (
            "parent",
            r.parent_snapshot_id.clone().unwrap_or_else(|| "-".into()),
        ),
        ("encrypted", r.encrypted.to_string()),
        ("journal", r.journal.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<15} {v}");
    }
}
