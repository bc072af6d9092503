//! `rehost`: the connector's command line: the disk-image tools (`rehost disk …`), the
//! importer (`import`, `stage`, `snapshot`, `amis`), the config and server catalog
//! (`config check`, `servers`), vSphere and Azure exports (`export`), replication jobs
//! (`jobs`, `runs`), the connector itself (`serve`: the API, the scheduler, the webhook)
//! and its appliance (`appliance package|deploy`).

mod amis_cmd;
mod api;
mod appliance_cmd;
mod aws_args;
mod config;
mod disk_cmd;
mod export;
mod import_cmd;
mod jobs;
mod jobs_cmd;
mod output;
mod pipeline;
mod progress;
mod scheduler;
mod servers_cmd;
mod snapshot_cmd;
mod sources;
mod stage_cmd;
mod store;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Agentless server migration to AWS: replicate VMs from vSphere, Hyper-V and Azure
/// into EBS snapshots and AMIs.
#[derive(Debug, Parser)]
#[command(name = "rehost", version, about, propagate_version = true)]
struct Cli {
    /// Log filter (e.g. `debug`, `rehost_diskimage=trace`); also read from RUST_LOG.
    #[arg(long, global = true, env = "REHOST_LOG", default_value = "warn")]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The connector appliance: pack its images, deploy its OVA to vCenter.
    #[command(subcommand)]
    Appliance(appliance_cmd::ApplianceCommand),
    /// Inspect, map, checksum and convert disk images (raw, VMDK, VHD, VHDX).
    #[command(subcommand)]
    Disk(disk_cmd::DiskCommand),
    /// Manage the AMIs rehost registered (retention).
    #[command(subcommand)]
    Amis(amis_cmd::AmisCommand),
    /// Upload a local image to S3 (multipart, checksummed, aborted on failure).
    Stage(stage_cmd::StageArgs),
    /// Read EBS snapshots back: verify against an image, download as raw.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Import a disk image into a verified EBS snapshot (incrementally onto a parent).
    Import(Box<import_cmd::ImportArgs>),
    /// Check the config file and every source in it.
    #[command(subcommand)]
    Config(servers_cmd::ConfigCommand),
    /// The server catalog: VMs read from the sources.
    #[command(subcommand)]
    Servers(servers_cmd::ServersCommand),
    /// Export a VM's disks (vSphere or Azure) through a snapshot (changed blocks only with
    /// --base) to a folder or S3; --cleanup removes snapshots a crashed export left.
    Export(Box<export::ExportArgs>),
    /// Run the connector: the API, the job scheduler and the webhook, until Ctrl-C/SIGTERM.
    Serve(api::ServeArgs),
    /// Replication jobs: create, list, show, update, delete, resume, start a run.
    #[command(subcommand)]
    Jobs(jobs_cmd::JobsCommand),
    /// Replication runs of a job.
    #[command(subcommand)]
    Runs(jobs_cmd::RunsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    let result = match cli.command {
        Command::Appliance(cmd) => appliance_cmd::run(cmd),
        Command::Disk(cmd) => disk_cmd::run(cmd),
        Command::Amis(cmd) => amis_cmd::run(cmd),
        Command::Stage(args) => stage_cmd::run(args),
        Command::Snapshot(cmd) => snapshot_cmd::run(cmd),
        Command::Import(args) => import_cmd::run(*args),
        Command::Config(cmd) => servers_cmd::run_config(cmd),
        Command::Servers(cmd) => servers_cmd::run(cmd),
        Command::Export(args) => export::run(*args),
        Command::Serve(args) => api::run(args),
        Command::Jobs(cmd) => jobs_cmd::run(cmd),
        Command::Runs(cmd) => jobs_cmd::run_runs(cmd),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
