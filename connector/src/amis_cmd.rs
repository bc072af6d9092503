//! `rehost amis`: AMIs the importer registered; today their retention (`prune`).

use std::process::ExitCode;

use crate::aws_args::AwsArgs;
use anyhow::{Context, Result};
use clap::Subcommand;
use rehost_importer::ami::{self, PruneReport, TagFilter};

use crate::output::{OutputMode, print_json};

/// The `amis` subcommands.
#[derive(Debug, Subcommand)]
pub enum AmisCommand {
    /// Keep the newest N AMIs carrying a tag; deregister the older ones and delete their
    /// snapshots, except snapshots another remaining AMI still maps.
    Prune {
        /// The tag selecting the AMIs, e.g. `rehost:server=web1`.
        #[arg(long, value_name = "KEY=VALUE", value_parser = parse_tag)]
        tag: TagFilter,
        /// How many of the newest to keep.
        #[arg(long, value_name = "N")]
        keep: usize,
        /// Only report what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Output for people (table) or scripts (json).
        #[arg(long, value_enum, default_value_t)]
        output: OutputMode,
        #[command(flatten)]
        aws: AwsArgs,
    },
}

fn parse_tag(s: &str) -> Result<TagFilter, String> {
    s.parse().map_err(|e: rehost_importer::Error| e.to_string())
}

/// Runs an `amis` command.
pub fn run(command: AmisCommand) -> Result<ExitCode> {
    let runtime = crate::aws_args::runtime()?;
    match command {
        AmisCommand::Prune {
            tag,
            keep,
            dry_run,
            output,
            aws,
        } => runtime.block_on(async {
            let clients = aws.clients().await;
            let report = ami::prune(&clients, &tag, keep, dry_run)
                .await
                .with_context(|| format!("pruning AMIs tagged {}={}", tag.key, tag.value))?;
            match output {
                OutputMode::Json => print_json(&report)?,
                OutputMode::Table => print_table(&report),
            }
            Ok(ExitCode::SUCCESS)
        }),
    }
}

fn print_table(report: &PruneReport) {
    let (deregister, delete) = if report.dry_run {
        ("would deregister", "would delete")
    } else {
        ("deregistered", "deleted")
    };
    let plan = &report.plan;
    for ami in &plan.keep {
        println!(
            "kept              {}  {}  {}",
            ami.image_id, ami.creation_date, ami.name
        );
    }
    for ami in &plan.deregister {
        println!(
            "{deregister:<17} {}  {}  {}",
            ami.image_id, ami.creation_date, ami.name
        );
    }
    for snapshot in &plan.delete_snapshots {
        println!("{delete:<17} {snapshot}");
    }
    for retained in &plan.retained_snapshots {
        println!(
            "retained          {}  (still mapped by {})",
            retained.snapshot_id,
            retained.used_by.join(", ")
        );
    }
    if plan.deregister.is_empty() {
        println!(
            "nothing to prune: {} AMI(s) tagged {}={}, keeping {}",
            plan.keep.len(),
            report.tag.key,
            report.tag.value,
            report.keep_count
        );
    }
}
