//! `rehost import`: a disk image (any format the disk-image library reads) to a verified
//! EBS snapshot through the EBS direct APIs, incrementally onto a parent snapshot, resumable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use rehost_diskimage::Disk;
use rehost_importer::ami::{self, AmiSpec, BootRequest, SnapshotVolume};
use rehost_importer::aws::Clients;
use rehost_importer::ebs::journal::{JournalLocation, SourceIdentity};
use rehost_importer::ebs::uploader::Encryption;
use rehost_importer::import::{
    DryRunReport, ImportOptions, ImportReport, ImportStatus, ProgressCallback, dry_run, import,
};

use crate::aws_args::{self, AwsArgs};
use crate::output::{OutputMode, print_json};
use crate::progress::bytes_bar;

/// `rehost import` arguments.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The image: a local file or `s3://bucket/key`, in any format `rehost disk` reads.
    source: String,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    output: OutputMode,
    #[command(flatten)]
    aws: AwsArgs,
    /// Register an AMI of this name with the snapshot as its root volume.
    #[arg(long, value_name = "NAME")]
    register_ami: Option<String>,
    /// More volumes for the AMI (file or s3://), each imported and mapped as /dev/sdb, …
    #[arg(
        long = "data-disk",
        value_name = "FILE_OR_S3",
        requires = "register_ami",
        conflicts_with = "journal"
    )]
    data_disks: Vec<String>,
    /// The AMI's boot mode; auto reads it from the image (GPT with an EFI System
    /// Partition → uefi, else legacy-bios).
    #[arg(long, default_value = "auto", value_parser = ["auto", "uefi", "legacy-bios"])]
    boot_mode: String,
    /// The AMI's architecture; auto reads the EFI loader's name and PE header (default x86_64).
    #[arg(long, default_value = "auto", value_parser = ["auto", "x86_64", "arm64"])]
    architecture: String,
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
    /// KMS key encrypting the first snapshot of a chain (implies --encrypted): a key id,
    /// alias/NAME, an alias ARN or a key ARN, resolved to the key's ARN (and checked to be
    /// enabled) with KMS DescribeKey before anything is uploaded.
    #[arg(long, value_name = "KEY", conflicts_with = "parent_snapshot")]
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
    /// Read, plan and checksum the image as an import would, send nothing: prints the
    /// blocks it would write and the checksum CompleteSnapshot would carry. Needs no
    /// credentials for a local file.
    #[arg(long, conflicts_with_all = ["parent_snapshot", "resume", "register_ami", "journal", "no_wait", "kms_key_id"])]
    dry_run: bool,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Runs `rehost import`.
pub fn run(args: ImportArgs) -> Result<ExitCode> {
    let runtime = aws_args::runtime()?;
    if args.dry_run {
        return run_dry(&args, &runtime);
    }
    let clients = runtime.block_on(args.aws.clients());
    // Boot settings and the KMS key are checked before anything is uploaded.
    let boot_request = BootRequest::parse(&args.boot_mode, &args.architecture)?;
    let encryption = runtime.block_on(encryption(&args))?;
    // Opening reads headers (through S3 with ranged GETs when the source is there): done
    // outside the runtime's async context, as the S3 reader blocks on the runtime.
    let (disk, source) = aws_args::open_source(&args.source, &clients, &runtime)?;
    let Some(ami_name) = args.register_ami.clone() else {
        let (report, code) = runtime.block_on(import_disk(
            &clients,
            &disk,
            source,
            &args,
            &encryption,
            args.parent_snapshot.clone(),
        ))?;
        print_report(&report, args.output)?;
        return Ok(code);
    };
    let (boot_mode, architecture) = ami::resolve_boot(&disk, boot_request)
        .with_context(|| format!("reading the boot mode of {}", args.source))?;
    let (mut report, code) = runtime.block_on(import_disk(
        &clients,
        &disk,
        source,
        &args,
        &encryption,
        args.parent_snapshot.clone(),
    ))?;
    if code != ExitCode::SUCCESS {
        print_report(&report, args.output)?;
        return Ok(code);
    }
    let mut data = Vec::new();
    for data_disk in &args.data_disks {
        let (disk, source) = aws_args::open_source(data_disk, &clients, &runtime)?;
        // Data disks are full imports: --parent-snapshot names the root disk's parent.
        let (data_report, code) = runtime.block_on(import_disk(
            &clients,
            &disk,
            source,
            &args,
            &encryption,
            None,
        ))?;
        if code != ExitCode::SUCCESS {
            print_report(&data_report, args.output)?;
            return Ok(code);
        }
        data.push(SnapshotVolume {
            snapshot_id: data_report.snapshot_id,
            volume_size_gib: u32::try_from(data_report.volume_size_gib).ok(),
        });
    }
    let spec = AmiSpec {
        name: ami_name.clone(),
        description: args.description.clone(),
        root: SnapshotVolume {
            snapshot_id: report.snapshot_id.clone(),
            volume_size_gib: u32::try_from(report.volume_size_gib).ok(),
        },
        data,
        boot_mode,
        architecture,
        tags: args.tags.clone(),
    };
    let ami_id = runtime
        .block_on(ami::register(&clients, spec))
        .with_context(|| format!("registering AMI {ami_name}"))?;
    report.ami_id = Some(ami_id);
    print_report(&report, args.output)?;
    Ok(ExitCode::SUCCESS)
}

/// The encryption asked for, the KMS key resolved to its ARN (StartSnapshot takes nothing
/// else) and checked to be usable, so a wrong or disabled key stops the import before it
/// starts a snapshot.
async fn encryption(args: &ImportArgs) -> Result<Encryption> {
    rehost_importer::kms::encryption(
        &args.aws.options(),
        args.encrypted,
        args.kms_key_id.as_deref(),
    )
    .await
    .context("resolving --kms-key-id")
}

/// `--dry-run`: the import's read → plan → checksum pipeline, nothing sent.
fn run_dry(args: &ImportArgs, runtime: &tokio::runtime::Runtime) -> Result<ExitCode> {
    // A local file needs no AWS configuration (loading it may probe for a region).
    let (disk, source) = if rehost_importer::s3::S3Url::is_s3(&args.source) {
        let clients = runtime.block_on(args.aws.clients());
        aws_args::open_source(&args.source, &clients, runtime)?
    } else {
        let disk = Disk::open(&args.source).with_context(|| format!("opening {}", args.source))?;
        let source = SourceIdentity::local(std::path::Path::new(&args.source))?;
        (disk, source)
    };
    // No journal is written: the location is only where an import would keep it.
    let location = JournalLocation {
        dir: JournalLocation::default_dir(),
        file: None,
    };
    let mut options = ImportOptions::new(source, location);
    options.volume_size_gib = args.volume_size_gib;
    if args.encrypted {
        options.encryption = Encryption::Encrypted { kms_key_arn: None };
    }
    let bar = progress_into(&mut options, disk.virtual_size(), "reading", args.output);
    let report = runtime.block_on(dry_run(&disk, &options));
    bar.finish_and_clear();
    let report = report.with_context(|| format!("planning {}", args.source))?;
    match args.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => print_dry_table(&report),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_dry_table(r: &DryRunReport) {
    let rows = [
        ("volume size", format!("{} GiB", r.volume_size_gib)),
        ("blocks to write", r.blocks_written.to_string()),
        ("blocks skipped", r.blocks_skipped.to_string()),
        ("bytes read", r.bytes_read.to_string()),
        ("encrypted", r.encrypted.to_string()),
        ("checksum", r.linear_checksum.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<15} {v}");
    }
}

fn print_report(report: &ImportReport, output: OutputMode) -> Result<()> {
    match output {
        OutputMode::Json => print_json(report)?,
        OutputMode::Table => print_table(report),
    }
    Ok(())
}

/// Imports an opened disk with the command's options, showing progress and printing the
/// report. Every source (local, S3) ends here.
pub async fn import_disk(
    clients: &Clients,
    disk: &Disk,
    source: SourceIdentity,
    args: &ImportArgs,
    encryption: &Encryption,
    parent_snapshot: Option<String>,
) -> Result<(ImportReport, ExitCode)> {
    let location = JournalLocation {
        dir: JournalLocation::default_dir(),
        file: args.journal.clone(),
    };
    let mut options = ImportOptions::new(source, location);
    options.volume_size_gib = args.volume_size_gib;
    options.description = args.description.clone();
    options.tags = args.tags.clone();
    options.concurrency = args.concurrency.max(1);
    options.parent_snapshot_id = parent_snapshot;
    options.encryption = encryption.clone();
    options.no_wait = args.no_wait;
    options.resume = args.resume;

    let bar = progress_into(&mut options, disk.virtual_size(), "importing", args.output);
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
    let report = report.with_context(|| format!("importing {}", options.source.location))?;
    if report.status == ImportStatus::Interrupted {
        eprintln!(
            "interrupted: snapshot {} is pending; run the same command with --resume to finish it",
            report.snapshot_id
        );
        return Ok((report, ExitCode::FAILURE));
    }
    Ok((report, ExitCode::SUCCESS))
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
        (
            "kms key",
            r.kms_key_arn.clone().unwrap_or_else(|| "-".into()),
        ),
        ("journal", r.journal.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<15} {v}");
    }
}

/// A progress bar of `total` bytes, fed by the import's progress callback.
fn progress_into(
    options: &mut ImportOptions,
    total: u64,
    message: &str,
    output: OutputMode,
) -> indicatif::ProgressBar {
    let bar = bytes_bar(total, message, output == OutputMode::Json);
    let progress_bar = bar.clone();
    options.progress = Some(ProgressCallback(Arc::new(move |p| {
        progress_bar.set_position(p.position_bytes);
    })));
    bar
}
