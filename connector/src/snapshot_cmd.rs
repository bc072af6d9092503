//! `rehost snapshot verify|download`: read an EBS snapshot back through the EBS direct
//! APIs, to prove it equals an image or to get it as a raw file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use rehost_importer::verify::{self, DownloadReport, ReadOptions, VerifyReport};

use crate::aws_args::{self, AwsArgs};
use crate::output::{OutputMode, print_json};
use crate::progress::bytes_bar;

/// The `snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Compare a snapshot block by block with an image (exit 0 only if identical).
    Verify {
        /// The snapshot (snap-…), or an AMI (ami-…) whose root volume's snapshot to verify.
        snapshot_id: String,
        /// The image: a local file or s3://bucket/key, in any format `rehost disk` reads.
        #[arg(long, value_name = "FILE_OR_S3")]
        against: String,
        #[command(flatten)]
        common: Common,
    },
    /// Write a snapshot out as a raw file of the volume's size (sparse).
    Download {
        /// The snapshot (snap-…), or an AMI (ami-…) whose root volume's snapshot to download.
        snapshot_id: String,
        /// The raw file to write (replaced if it exists).
        #[arg(value_name = "OUT")]
        out: PathBuf,
        #[command(flatten)]
        common: Common,
    },
}

/// Options of both subcommands.
#[derive(Debug, Args)]
pub struct Common {
    /// GetSnapshotBlock calls in flight (EBS serves 1,000 a second).
    #[arg(long, default_value_t = verify::DEFAULT_CONCURRENCY)]
    concurrency: usize,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    output: OutputMode,
    #[command(flatten)]
    aws: AwsArgs,
}

impl Common {
    fn read_options(&self) -> ReadOptions {
        ReadOptions {
            concurrency: self.concurrency.max(1),
            ..ReadOptions::default()
        }
    }
}

/// Runs a snapshot command.
pub fn run(command: SnapshotCommand) -> Result<ExitCode> {
    match command {
        SnapshotCommand::Verify {
            snapshot_id,
            against,
            common,
        } => verify(&snapshot_id, &against, &common),
        SnapshotCommand::Download {
            snapshot_id,
            out,
            common,
        } => download(&snapshot_id, &out, &common),
    }
}

/// The snapshot named, or an AMI's root volume's snapshot when given an `ami-…`.
fn root_snapshot_of(
    id: &str,
    clients: &rehost_importer::aws::Clients,
    runtime: &tokio::runtime::Runtime,
) -> Result<String> {
    if !id.starts_with("ami-") {
        return Ok(id.to_owned());
    }
    runtime
        .block_on(rehost_importer::ami::root_snapshot(clients, id))
        .with_context(|| format!("finding the root snapshot of {id}"))
}

fn verify(snapshot_id: &str, against: &str, common: &Common) -> Result<ExitCode> {
    let runtime = aws_args::runtime()?;
    let clients = runtime.block_on(common.aws.clients());
    let root_of = root_snapshot_of(snapshot_id, &clients, &runtime)?;
    let snapshot_id = root_of.as_str();
    // Opening reads headers (through S3 with ranged GETs): done here, on a thread outside
    // the runtime, as the S3 reader requires.
    let (disk, _) = aws_args::open_source(against, &clients, &runtime)?;
    let bar = bytes_bar(
        disk.virtual_size(),
        &format!("verifying {snapshot_id}"),
        common.output == OutputMode::Json,
    );
    let progress_bar = bar.clone();
    let report = runtime.block_on(verify::verify_with(
        &clients,
        snapshot_id,
        &disk,
        &common.read_options(),
        move |done| progress_bar.set_position(done),
    ));
    bar.finish_and_clear();
    let report =
        report.with_context(|| format!("verifying snapshot {snapshot_id} against {against}"))?;
    match common.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => print_verify(&report, against),
    }
    Ok(if report.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_verify(r: &VerifyReport, against: &str) {
    if r.identical {
        println!(
            "{} is identical to {against} ({} blocks with data)",
            r.snapshot_id, r.image_data_blocks
        );
        return;
    }
    println!("{} differs from {against}", r.snapshot_id);
    if r.image_size_bytes > r.volume_size_bytes {
        println!(
            "  the image ({} bytes) is larger than the volume ({} bytes)",
            r.image_size_bytes, r.volume_size_bytes
        );
    }
    println!(
        "  {} differing blocks of 512 KiB; the first:",
        r.differing_blocks
    );
    for d in &r.first_differences {
        println!(
            "  block {:>10} (offset {:>14}): {:?}",
            d.block_index,
            d.block_index * 512 * 1024,
            d.kind
        );
    }
}

fn download(snapshot_id: &str, out: &std::path::Path, common: &Common) -> Result<ExitCode> {
    let runtime = aws_args::runtime()?;
    let hidden = common.output == OutputMode::Json;
    let clients = runtime.block_on(common.aws.clients());
    let root_of = root_snapshot_of(snapshot_id, &clients, &runtime)?;
    let snapshot_id = root_of.as_str();
    let report = runtime.block_on(async {
        // The volume size is known after the first page: the bar learns its length then.
        let bar = bytes_bar(0, &format!("downloading {snapshot_id}"), hidden);
        let progress_bar = bar.clone();
        let result = verify::download(
            &clients,
            snapshot_id,
            out,
            &common.read_options(),
            move |done, total| {
                progress_bar.set_length(total);
                progress_bar.set_position(done);
            },
        )
        .await;
        bar.finish_and_clear();
        result
    });
    let report = report
        .with_context(|| format!("downloading snapshot {snapshot_id} to {}", out.display()))?;
    match common.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => print_download(&report),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_download(r: &DownloadReport) {
    println!("snapshot:   {}", r.snapshot_id);
    println!("written:    {}", r.path.display());
    println!("size:       {} bytes", r.volume_size_bytes);
    println!(
        "blocks:     {} listed, {} with data",
        r.snapshot_blocks, r.blocks_written
    );
}
