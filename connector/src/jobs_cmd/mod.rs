//! `rehost jobs …` and `rehost runs list`: replication jobs from the command line, on the
//! store directly or (`--api URL`) through a running connector's API.

mod backend;
mod table;
mod wait;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};

pub use backend::JobsBackend;
pub use wait::wait_for_run;

use crate::api::requests::{
    ApiRequest, CreateReplicationJobRequest, DeleteReplicationJobRequest,
    ResumeReplicationJobRequest, StartOnDemandReplicationRunRequest, UpdateReplicationJobRequest,
};
use crate::api::responses::{
    CreateReplicationJobResponse, EmptyResponse, StartOnDemandReplicationRunResponse,
};
use crate::aws_args::runtime;
use crate::jobs::model::{JobId, LicenseType, Timestamp};
use crate::output::{OutputMode, print_json};
use crate::servers_cmd::ConfigArgs;

/// Where the commands send their operations, and how they print.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    #[command(flatten)]
    pub common: ConfigArgs,
    /// A running connector's API (`http://127.0.0.1:8080`) instead of the store.
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// The environment variable holding the API's token (with --api).
    #[arg(long, value_name = "VAR", default_value = "REHOST_API_TOKEN")]
    pub token_env: String,
    /// With an https:// --api: trust the connector's certificate by its SHA-256 thumbprint
    /// (what the appliance's console shows), instead of the system's roots.
    #[arg(long, value_name = "SHA256", conflicts_with = "api_ca_file")]
    pub api_thumbprint: Option<String>,
    /// With an https:// --api: trust the CA (or self-signed certificate) in this PEM file.
    #[arg(long, value_name = "PEM")]
    pub api_ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Create a replication job for a catalogued server.
    Create(CreateArgs),
    /// List the jobs (deleted ones are not shown).
    List {
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Show a job and its runs.
    Show {
        /// The job id (sms-job-…).
        id: String,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Change a job's schedule, retention, encryption or description.
    Update(UpdateArgs),
    /// Delete a job: its runs stop, and its AMIs are deregistered unless --keep-amis.
    Delete {
        id: String,
        /// Keep the AMIs the job registered.
        #[arg(long)]
        keep_amis: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Take a FAILED or PAUSED_ON_FAILURE job up again.
    Resume {
        id: String,
        #[command(flatten)]
        backend: BackendArgs,
    },
    /// Ask for a run now (on demand); --wait follows it to the end.
    Start {
        id: String,
        /// Why this run (shown with the run).
        #[arg(long)]
        description: Option<String>,
        /// Wait for the run to end, showing its progress; exit 1 unless it completes.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        backend: BackendArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List a job's runs, newest first.
    List {
        /// The job id (sms-job-…).
        #[arg(long)]
        job: String,
        #[command(flatten)]
        backend: BackendArgs,
    },
}

/// `jobs create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The server: its id (s-…), VM id or VM name in the catalog.
    #[arg(long, value_name = "ID_OR_NAME")]
    server: String,
    /// Hours between runs, 1–24 (not with --run-once).
    #[arg(long, value_name = "N")]
    frequency_hours: Option<u32>,
    /// When the first run is due: RFC 3339 (2026-12-07T15:00:00Z) or `now`.
    #[arg(long, value_name = "RFC3339|now", default_value = "now", value_parser = parse_time)]
    seed_time: Timestamp,
    /// One run, then the job is COMPLETED.
    #[arg(long)]
    run_once: bool,
    /// Who brings the OS license: AWS (license included) or BYOL.
    #[arg(long, value_name = "AWS|BYOL", value_parser = parse_license)]
    license_type: Option<LicenseType>,
    /// AMIs to keep, newest first (0 keeps all).
    #[arg(long, value_name = "N")]
    keep_amis: Option<u32>,
    /// Encrypt the snapshots (with the account's default EBS key unless --kms-key-id).
    #[arg(long)]
    encrypted: bool,
    /// KMS key (id, alias/name, or ARN); checked to exist now.
    #[arg(long, value_name = "KEY")]
    kms_key_id: Option<String>,
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    #[command(flatten)]
    backend: BackendArgs,
}

/// `jobs update`: only what is given changes.
#[derive(Debug, Args)]
pub struct UpdateArgs {
    id: String,
    /// When the next run is due: RFC 3339 or `now`.
    #[arg(long, value_name = "RFC3339|now", value_parser = parse_time)]
    next_run_time: Option<Timestamp>,
    /// Hours between runs, 1–24.
    #[arg(long, value_name = "N")]
    frequency_hours: Option<u32>,
    #[arg(long, value_name = "AWS|BYOL", value_parser = parse_license)]
    license_type: Option<LicenseType>,
    /// AMIs to keep, newest first (0 keeps all).
    #[arg(long, value_name = "N")]
    keep_amis: Option<u32>,
    /// Encrypt the snapshots of the next runs.
    #[arg(long, value_name = "true|false")]
    encrypted: Option<bool>,
    #[arg(long, value_name = "KEY")]
    kms_key_id: Option<String>,
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    #[command(flatten)]
    backend: BackendArgs,
}

fn parse_time(text: &str) -> Result<Timestamp, String> {
    if text.eq_ignore_ascii_case("now") {
        Ok(Timestamp::now())
    } else {
        Timestamp::parse(text)
    }
}

fn parse_license(text: &str) -> Result<LicenseType, String> {
    match text.to_ascii_uppercase().as_str() {
        "AWS" => Ok(LicenseType::Aws),
        "BYOL" => Ok(LicenseType::Byol),
        _ => Err(format!("{text:?} is not AWS or BYOL")),
    }
}

/// `rehost jobs …`.
pub fn run(cmd: JobsCommand) -> Result<ExitCode> {
    runtime()?.block_on(run_jobs(cmd))
}

/// `rehost runs …`.
pub fn run_runs(cmd: RunsCommand) -> Result<ExitCode> {
    let RunsCommand::List { job, backend: args } = cmd;
    runtime()?.block_on(async {
        let backend = JobsBackend::open(&args)?;
        let answer = backend.job_with_runs(&JobId(job)).await?;
        match args.common.output {
            OutputMode::Json => print_json(&answer)?,
            OutputMode::Table => table::print_runs(&answer.replication_run_list),
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn run_jobs(cmd: JobsCommand) -> Result<ExitCode> {
    match cmd {
        JobsCommand::Create(a) => {
            let backend = JobsBackend::open(&a.backend)?;
            let created: CreateReplicationJobResponse = backend
                .call(ApiRequest::CreateReplicationJob(
                    CreateReplicationJobRequest {
                        server_id: a.server,
                        seed_replication_time: a.seed_time,
                        frequency: a.frequency_hours,
                        run_once: a.run_once,
                        license_type: a.license_type,
                        number_of_recent_amis_to_keep: a.keep_amis,
                        encrypted: a.encrypted,
                        kms_key_id: a.kms_key_id,
                        description: a.description,
                    },
                ))
                .await?;
            show_job(
                &backend,
                &created.replication_job_id,
                a.backend.common.output,
                "created",
            )
            .await
        }
        JobsCommand::List { backend: args } => {
            let answer = JobsBackend::open(&args)?.jobs().await?;
            match args.common.output {
                OutputMode::Json => print_json(&answer)?,
                OutputMode::Table => table::print_jobs(&answer.replication_job_list),
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Show { id, backend: args } => {
            let answer = JobsBackend::open(&args)?.job_with_runs(&JobId(id)).await?;
            match args.common.output {
                OutputMode::Json => print_json(&answer)?,
                OutputMode::Table => {
                    table::print_job(&answer.replication_job);
                    println!();
                    table::print_runs(&answer.replication_run_list);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        JobsCommand::Update(a) => {
            let backend = JobsBackend::open(&a.backend)?;
            let id = JobId(a.id);
            let _: EmptyResponse = backend
                .call(ApiRequest::UpdateReplicationJob(
                    UpdateReplicationJobRequest {
                        replication_job_id: id.clone(),
                        next_replication_run_start_time: a.next_run_time,
                        frequency: a.frequency_hours,
                        license_type: a.license_type,
                        number_of_recent_amis_to_keep: a.keep_amis,
                        encrypted: a.encrypted,
                        kms_key_id: a.kms_key_id,
                        description: a.description,
                    },
                ))
                .await?;
            show_job(&backend, &id, a.backend.common.output, "updated").await
        }
        JobsCommand::Delete {
            id,
            keep_amis,
            backend: args,
        } => {
            let backend = JobsBackend::open(&args)?;
            let id = JobId(id);
            let _: EmptyResponse = backend
                .call(ApiRequest::DeleteReplicationJob(
                    DeleteReplicationJobRequest {
                        replication_job_id: id.clone(),
                        keep_amis,
                    },
                ))
                .await?;
            show_job(&backend, &id, args.common.output, "deleting").await
        }
        JobsCommand::Resume { id, backend: args } => {
            let backend = JobsBackend::open(&args)?;
            let id = JobId(id);
            let _: EmptyResponse = backend
                .call(ApiRequest::ResumeReplicationJob(
                    ResumeReplicationJobRequest {
                        replication_job_id: id.clone(),
                    },
                ))
                .await?;
            show_job(&backend, &id, args.common.output, "resumed").await
        }
        JobsCommand::Start {
            id,
            description,
            wait,
            backend: args,
        } => {
            let backend = JobsBackend::open(&args)?;
            let id = JobId(id);
            let started: StartOnDemandReplicationRunResponse = backend
                .call(ApiRequest::StartOnDemandReplicationRun(
                    StartOnDemandReplicationRunRequest {
                        replication_job_id: id.clone(),
                        description,
                    },
                ))
                .await?;
            let output = args.common.output;
            if !wait {
                match output {
                    OutputMode::Json => print_json(&started)?,
                    OutputMode::Table => println!("{}", started.replication_run_id),
                }
                return Ok(ExitCode::SUCCESS);
            }
            if output == OutputMode::Table {
                eprintln!(
                    "run {} requested; waiting for it",
                    started.replication_run_id
                );
            }
            let run = wait_for_run(
                &backend,
                &id,
                &started.replication_run_id,
                output == OutputMode::Json,
            )
            .await?;
            wait::report_end(&run, output)
        }
    }
}

/// Prints the job after a change: its JSON, or one line for people.
async fn show_job(
    backend: &JobsBackend,
    id: &JobId,
    output: OutputMode,
    what: &str,
) -> Result<ExitCode> {
    let job = backend.job(id).await?;
    match output {
        OutputMode::Json => print_json(&job)?,
        OutputMode::Table => println!(
            "{what} {} ({}): {}",
            job.replication_job_id,
            job.vm_server.vm_name,
            crate::api::responses::serde_name(&job.state)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_licenses_parse_as_documented() {
        assert_eq!(
            parse_time("2026-12-07T15:00:00Z").unwrap(),
            Timestamp::parse("2026-12-07T15:00:00Z").unwrap()
        );
        let before = Timestamp::now();
        assert!(parse_time("now").unwrap() >= before);
        assert!(parse_time("tomorrow").is_err());
        assert_eq!(parse_license("byol").unwrap(), LicenseType::Byol);
        assert_eq!(parse_license("AWS").unwrap(), LicenseType::Aws);
        assert!(parse_license("free").is_err());
    }
}
