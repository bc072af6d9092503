//! `jobs start --wait`: following a run to its end with a progress bar.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::HumanBytes;

use super::JobsBackend;
use crate::api::responses::{ReplicationRun, serde_name};
use crate::jobs::model::{JobId, RunId, RunState};
use crate::output::{OutputMode, print_json};

/// How often the run is looked at: its progress moves in seconds, not milliseconds, and
/// each look is a store read or an API request.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Whether a run in `state` has ended.
pub fn has_ended(state: RunState) -> bool {
    !matches!(state, RunState::Pending | RunState::Active)
}

/// Waits for run `run_id` of job `job_id` to end and returns it as it ended, showing its
/// stage, progress and bytes moved unless `quiet`.
///
/// With `--api`, the connector behind the API runs it. On the local store, this process
/// runs it unless a `rehost serve` on the same store claims it first (the claim is atomic,
/// so exactly one does); Ctrl-C stops it where it is, and the next connector to start
/// resumes it.
pub async fn wait_for_run(
    backend: &JobsBackend,
    job_id: &JobId,
    run_id: &RunId,
    quiet: bool,
) -> Result<ReplicationRun> {
    let bar = crate::progress::percent_bar(&format!("{run_id}: pending"), quiet);
    let mut here = match backend {
        JobsBackend::Store(service) => Some(tokio::spawn(crate::scheduler::run_here(
            service.config().clone(),
            service.store().clone(),
            run_id.clone(),
        ))),
        JobsBackend::Api(_) => None,
    };
    loop {
        let run = find_run(backend, job_id, run_id).await?;
        bar.set_position(u64::from(run.progress_percent));
        bar.set_message(format!(
            "{}: {} {}, {} moved",
            run.replication_run_id,
            serde_name(&run.state),
            run.stage_details.stage,
            HumanBytes(run.bytes_moved)
        ));
        if has_ended(run.state) {
            // A run carried out here may still be tidying up after it completed (retiring
            // the previous run's base at the source): let it finish before the process ends.
            if let Some(task) = here.take() {
                let _ = task.await;
            }
            bar.finish_and_clear();
            return Ok(run);
        }
        let Some(task) = here.as_mut() else {
            tokio::time::sleep(POLL_INTERVAL).await;
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            joined = task => {
                here = None;
                let ran_here = joined.context("the run's task failed")??;
                if ran_here == Some(crate::pipeline::RunEnd::Stopped) {
                    bar.finish_and_clear();
                    anyhow::bail!(
                        "stopped: run {run_id} stays ACTIVE and resumes when a connector (`rehost serve`) starts"
                    );
                }
            }
        }
    }
}

async fn find_run(backend: &JobsBackend, job_id: &JobId, run_id: &RunId) -> Result<ReplicationRun> {
    let answer = backend.job_with_runs(job_id).await?;
    answer
        .replication_run_list
        .into_iter()
        .find(|r| &r.replication_run_id == run_id)
        .with_context(|| format!("job {job_id} has no run {run_id}"))
}

/// Prints how a waited-for run ended: the AMI (exit 0) or why it did not complete (exit 1).
pub fn report_end(run: &ReplicationRun, output: OutputMode) -> Result<ExitCode> {
    let completed = run.state == RunState::Completed;
    match output {
        OutputMode::Json => print_json(run)?,
        OutputMode::Table if completed => {
            println!("{}", run.ami_id.as_deref().unwrap_or("(no AMI recorded)"));
        }
        OutputMode::Table => eprintln!(
            "run {} {}: {}",
            run.replication_run_id,
            serde_name(&run.state),
            run.status_message.as_deref().unwrap_or("no status message")
        ),
    }
    Ok(if completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pending_and_active_runs_are_waited_for() {
        assert!(!has_ended(RunState::Pending));
        assert!(!has_ended(RunState::Active));
        for state in [
            RunState::Completed,
            RunState::Failed,
            RunState::Missed,
            RunState::Deleted,
        ] {
            assert!(has_ended(state), "{state:?}");
        }
    }
}
