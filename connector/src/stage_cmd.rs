//! `rehost stage FILE s3://bucket/prefix/name`: uploads an image to S3 (multipart, SHA-256
//! checked, aborted on failure or Ctrl-C so no parts stay billed).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use rehost_importer::s3::{self, S3Url, StageOptions, StageReport};

use crate::aws_args::{self, AwsArgs};
use crate::output::{OutputMode, print_json};
use crate::progress::bytes_bar;

/// `rehost stage`.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// The local file to upload.
    file: PathBuf,
    /// Destination `s3://bucket/key`; a key ending in `/` gets the file's name appended.
    #[arg(value_name = "S3_URL")]
    destination: String,
    /// Parts uploaded at once.
    #[arg(long, default_value_t = s3::DEFAULT_STAGE_CONCURRENCY)]
    concurrency: usize,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    output: OutputMode,
    #[command(flatten)]
    aws: AwsArgs,
}

/// Runs `rehost stage`.
pub fn run(args: StageArgs) -> Result<ExitCode> {
    let url = destination(&args)?;
    let size = std::fs::metadata(&args.file)
        .with_context(|| format!("{}: cannot read", args.file.display()))?
        .len();
    let bar = bytes_bar(
        size,
        &format!("staging to {url}"),
        args.output == OutputMode::Json,
    );
    let cancel = Arc::new(AtomicBool::new(false));
    let options = StageOptions {
        concurrency: args.concurrency.max(1),
        part_size_bytes: None,
        cancel: Some(cancel.clone()),
    };
    let report = aws_args::runtime()?.block_on(async {
        // Ctrl-C stops new parts; the upload is then aborted rather than left billed.
        let on_interrupt = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.store(true, Ordering::Relaxed);
            }
        });
        let clients = args.aws.clients().await;
        let progress_bar = bar.clone();
        let result = s3::stage(&clients, &args.file, &url, &options, &move |done| {
            progress_bar.set_position(done)
        })
        .await;
        on_interrupt.abort();
        result
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("staging {} to {url}", args.file.display()))?;
    match args.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => print_table(&report),
    }
    Ok(ExitCode::SUCCESS)
}

fn destination(args: &StageArgs) -> Result<S3Url> {
    let mut text = args.destination.clone();
    if text.ends_with('/') {
        let name = args
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| {
                format!(
                    "{}: no usable file name to append to {text}",
                    args.file.display()
                )
            })?;
        text.push_str(name);
    }
    Ok(S3Url::parse(&text)?)
}

fn print_table(r: &StageReport) {
    println!("object:     s3://{}/{}", r.bucket, r.key);
    println!("size:       {} bytes", r.size_bytes);
    println!("parts:      {} of {} bytes", r.parts, r.part_size_bytes);
    println!("etag:       {}", r.etag);
    println!("sha256:     {}", r.sha256);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: StageArgs,
    }

    #[test]
    fn a_trailing_slash_appends_the_file_name() {
        let cli = Cli::parse_from([
            "t",
            "/images/vm1.vmdk",
            "s3://bucket/staging/",
            "--region",
            "eu-west-1",
        ]);
        assert_eq!(destination(&cli.args).unwrap().key, "staging/vm1.vmdk");
        let cli = Cli::parse_from(["t", "vm1.vmdk", "s3://bucket/x/disk.vmdk"]);
        assert_eq!(destination(&cli.args).unwrap().key, "x/disk.vmdk");
        let cli = Cli::parse_from(["t", "vm1.vmdk", "/not/s3"]);
        assert!(
            destination(&cli.args)
                .unwrap_err()
                .to_string()
                .contains("s3://")
        );
    }
}
