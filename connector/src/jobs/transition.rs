//! The one function through which every job and run state change goes ([`apply`]).
//!
//! It is pure: given the job's status, the state of the run concerned, an event, the
//! retry policy and the time, it answers the new status and run state, or a typed
//! error naming the job state and the event. The store calls it inside the transaction
//! that writes the result, so the rules live here once and are tested without SQLite.
//!
//! The rules are SMS's: a new job is PENDING until its first run starts, then ACTIVE; a
//! completed run resets the failure count (a run-once job is then COMPLETED); a failed
//! run counts, and the job retries (FAILING, with exponential backoff), stops on errors
//! retrying cannot fix (FAILED), or pauses after too many failures in a row
//! (PAUSED_ON_FAILURE); the last two wait for the user to resume them.
//!
//! Schedule: an automatic run for the slot at `T` moves the next slot to `T + frequency`
//! (a run-once job has no next slot). A retry's slot replaces the next one, so the runs
//! after a retry are spaced `frequency` from the retry: the frequency is the time between
//! runs, as in SMS, not a wall-clock grid.

use rehost_core::ErrorKind;

use super::model::{Job, JobState, RunState, RunType, Timestamp};
use crate::config::SchedulerConfig;

/// The longest wait before retrying a failed run. Six hours: a daily job still gets
/// several retries before its next regular slot, and a retry never waits longer than a
/// user would reasonably expect to see the job try again.
pub const MAX_RETRY_BACKOFF_SECS: i64 = 6 * 3600;

/// Exponent cap for the backoff doubling: 2^20 times any sane base is far past the cap,
/// and it keeps the shift from overflowing.
const MAX_BACKOFF_DOUBLINGS: u32 = 20;

/// The retry and schedule policy of `[scheduler]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Failed runs in a row after which a job is PAUSED_ON_FAILURE (at least 1).
    pub max_consecutive_failures: u32,
    /// Wait before the first retry; doubled per further failure, up to
    /// [`MAX_RETRY_BACKOFF_SECS`].
    pub retry_backoff_secs: u64,
    /// Seconds in one unit of `frequency_hours` (3600; 1 in tests).
    pub frequency_unit_secs: i64,
}

impl Policy {
    /// The policy of a `[scheduler]` section.
    pub fn from_config(config: &SchedulerConfig) -> Policy {
        Policy {
            max_consecutive_failures: config.max_consecutive_failures.max(1),
            retry_backoff_secs: config.retry_backoff_secs,
            frequency_unit_secs: config.frequency_unit_secs(),
        }
    }

    /// Seconds between runs of a job with this frequency; `None` without one.
    pub fn interval_secs(&self, frequency_hours: Option<u32>) -> Option<i64> {
        frequency_hours.map(|hours| i64::from(hours).saturating_mul(self.frequency_unit_secs))
    }

    /// The wait before retrying after `failures` failed runs in a row (from 1):
    /// `retry_backoff_secs · 2^(failures−1)`, capped at [`MAX_RETRY_BACKOFF_SECS`].
    pub fn retry_delay_secs(&self, failures: u32) -> i64 {
        let doublings = failures.saturating_sub(1).min(MAX_BACKOFF_DOUBLINGS);
        let base = i64::try_from(self.retry_backoff_secs).unwrap_or(i64::MAX);
        base.saturating_mul(1_i64 << doublings)
            .min(MAX_RETRY_BACKOFF_SECS)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from_config(&SchedulerConfig::default())
    }
}

/// What of a job the transitions read and change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStatus {
    pub state: JobState,
    pub consecutive_failures: u32,
    pub next_replication_run_start_time: Option<Timestamp>,
    pub run_once: bool,
    pub frequency_hours: Option<u32>,
}

impl JobStatus {
    /// The status part of a job.
    pub fn of(job: &Job) -> JobStatus {
        JobStatus {
            state: job.state,
            consecutive_failures: job.consecutive_failures,
            next_replication_run_start_time: job.next_replication_run_start_time,
            run_once: job.run_once,
            frequency_hours: job.frequency_hours,
        }
    }

    /// A job just created: PENDING, its first run due at the seed time.
    pub fn new(seed: Timestamp, run_once: bool, frequency_hours: Option<u32>) -> JobStatus {
        JobStatus {
            state: JobState::Pending,
            consecutive_failures: 0,
            next_replication_run_start_time: Some(seed),
            run_once,
            frequency_hours,
        }
    }
}

/// Something that happens to a job or one of its runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A run is asked for: by the schedule (for the slot at `scheduled`) or on demand.
    RunRequested {
        run_type: RunType,
        scheduled: Timestamp,
    },
    /// A PENDING run was claimed by a worker.
    RunStarted,
    /// A slot passed without a run (the run is new, or was PENDING); `next` is the job's
    /// next slot, when the schedule moved it.
    RunMissed { next: Option<Timestamp> },
    /// A run ended with an AMI.
    RunCompleted { ami_id: String },
    /// A run ended in an error of `kind`.
    RunFailed { kind: ErrorKind, message: String },
    /// The user resumed a FAILED or PAUSED_ON_FAILURE job.
    Resumed,
    /// The user changed the job's schedule (and perhaps other settings, which do not
    /// concern its state).
    Updated {
        next_replication_run_start_time: Option<Timestamp>,
        frequency_hours: Option<u32>,
    },
    /// The user deleted the job.
    DeleteRequested { keep_amis: bool },
    /// The connector finished deleting the job (runs stopped, AMIs handled).
    DeleteFinished,
    /// A completed run's AMI is being deregistered.
    AmiDeregistering,
    /// A completed run's AMI was deregistered.
    AmiDeregistered,
}

impl Event {
    /// The event's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Event::RunRequested {
                run_type: RunType::Automatic,
                ..
            } => "an automatic run",
            Event::RunRequested {
                run_type: RunType::OnDemand,
                ..
            } => "an on-demand run",
            Event::RunStarted => "starting a run",
            Event::RunMissed { .. } => "missing a run",
            Event::RunCompleted { .. } => "completing a run",
            Event::RunFailed { .. } => "failing a run",
            Event::Resumed => "resuming",
            Event::Updated { .. } => "updating",
            Event::DeleteRequested { .. } => "deleting",
            Event::DeleteFinished => "finishing deletion",
            Event::AmiDeregistering => "deregistering a run's AMI",
            Event::AmiDeregistered => "recording a run's AMI as deregistered",
        }
    }
}

/// The result of an allowed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The job's new status.
    pub job: JobStatus,
    /// The new state of the run concerned (PENDING for a requested run, MISSED for a
    /// missed slot); `None` when the event concerns no run.
    pub run: Option<RunState>,
    /// The job's new status message; `None` keeps the current one.
    pub status_message: Option<String>,
}

/// Why an event was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionErrorKind {
    /// The job already has a PENDING or ACTIVE run.
    RunAlreadyOpen,
    /// The job's (or run's) state does not allow the event.
    NotPermitted,
}

/// An event the job's or run's state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not allowed for a job in state {job_state}{}: {reason}",
    .run_state.map(|s| format!(" (run {s})")).unwrap_or_default())]
pub struct TransitionError {
    pub job_state: JobState,
    pub run_state: Option<RunState>,
    /// [`Event::name`].
    pub event: &'static str,
    pub kind: TransitionErrorKind,
    pub reason: String,
}

/// Applies `event` to a job in status `current`.
///
/// `run` is the state of the run the event concerns: for run events, that run's
/// current state (`None` for a slot recorded as missed that never had a run); for
/// [`Event::RunRequested`] and [`Event::DeleteFinished`], the job's open (PENDING or
/// ACTIVE) run if it has one; ignored otherwise.
pub fn apply(
    current: &JobStatus,
    run: Option<RunState>,
    event: &Event,
    policy: &Policy,
    now: Timestamp,
) -> Result<Outcome, TransitionError> {
    use JobState as J;
    let deny = |kind: TransitionErrorKind, reason: &str| -> Result<Outcome, TransitionError> {
        Err(TransitionError {
            job_state: current.state,
            run_state: run,
            event: event.name(),
            kind,
            reason: reason.to_owned(),
        })
    };
    let not_permitted = |reason: &str| -> Result<Outcome, TransitionError> {
        deny(TransitionErrorKind::NotPermitted, reason)
    };
    if current.state == J::Deleted {
        return not_permitted("the job is deleted, and a deleted job never changes");
    }
    let mut job = current.clone();
    let (run_after, message) = match event {
        Event::RunRequested {
            run_type,
            scheduled,
        } => {
            match current.state {
                J::Pending | J::Active | J::Failing => {}
                J::Failed | J::PausedOnFailure => {
                    return not_permitted("it takes no runs until it is resumed");
                }
                J::Completed => {
                    return not_permitted(
                        "its one run has completed; create a new job for another run",
                    );
                }
                J::Deleting | J::Deleted => return not_permitted("the job is being deleted"),
            }
            if let Some(open) = run.filter(|r| r.is_open()) {
                return deny(
                    TransitionErrorKind::RunAlreadyOpen,
                    &format!("the job already has a {open} run; a job runs one at a time"),
                );
            }
            if *run_type == RunType::Automatic {
                job.next_replication_run_start_time = if current.run_once {
                    None
                } else {
                    policy
                        .interval_secs(current.frequency_hours)
                        .map(|secs| scheduled.plus_secs(secs))
                };
            }
            (Some(RunState::Pending), None)
        }
        Event::RunStarted => {
            if run != Some(RunState::Pending) {
                return not_permitted("only a PENDING run starts");
            }
            match current.state {
                J::Pending => job.state = J::Active,
                J::Active | J::Failing => {}
                _ => return not_permitted("it takes no runs in this state"),
            }
            (Some(RunState::Active), None)
        }
        Event::RunMissed { next } => {
            match (current.state, run) {
                (J::Pending | J::Active | J::Failing, None | Some(RunState::Pending)) => {
                    if let Some(next) = next {
                        job.next_replication_run_start_time = Some(*next);
                    }
                }
                // Deleting a job drops its PENDING run as missed.
                (J::Deleting, Some(RunState::Pending)) => {}
                (_, Some(state)) if state != RunState::Pending => {
                    return not_permitted("only a PENDING run (or a slot without one) is missed");
                }
                _ => return not_permitted("it is not scheduled in this state"),
            }
            (Some(RunState::Missed), None)
        }
        Event::RunCompleted { ami_id } => {
            if run != Some(RunState::Active) {
                return not_permitted("only an ACTIVE run completes");
            }
            let message = match current.state {
                J::Deleting => None,
                J::Pending | J::Active | J::Failing => {
                    job.consecutive_failures = 0;
                    if current.run_once {
                        job.state = J::Completed;
                        job.next_replication_run_start_time = None;
                    } else {
                        job.state = J::Active;
                    }
                    Some(format!("the last run completed with {ami_id}"))
                }
                _ => return not_permitted("it has no running run in this state"),
            };
            (Some(RunState::Completed), message)
        }
        Event::RunFailed { kind, message } => {
            if !run.is_some_and(RunState::is_open) {
                return not_permitted("only a PENDING or ACTIVE run fails");
            }
            let note = match current.state {
                J::Deleting => None,
                J::Pending | J::Active | J::Failing => {
                    Some(fail(&mut job, *kind, message, policy, now))
                }
                _ => return not_permitted("it has no running run in this state"),
            };
            (Some(RunState::Failed), note)
        }
        Event::Resumed => {
            if !matches!(current.state, J::Failed | J::PausedOnFailure) {
                return not_permitted("only a FAILED or PAUSED_ON_FAILURE job is resumed");
            }
            job.state = J::Active;
            job.consecutive_failures = 0;
            job.next_replication_run_start_time = Some(now);
            (None, Some("resumed; the next run is due now".to_owned()))
        }
        Event::Updated {
            next_replication_run_start_time,
            frequency_hours,
        } => {
            if current.state == J::Deleting {
                return not_permitted("the job is being deleted");
            }
            if let Some(hours) = frequency_hours {
                job.frequency_hours = Some(*hours);
            }
            if let Some(next) = next_replication_run_start_time {
                job.next_replication_run_start_time = Some(*next);
            }
            (None, None)
        }
        Event::DeleteRequested { keep_amis } => {
            if current.state == J::Deleting {
                return not_permitted("the job is already being deleted");
            }
            job.state = J::Deleting;
            job.next_replication_run_start_time = None;
            let amis = if *keep_amis {
                "keeping its AMIs"
            } else {
                "deregistering its AMIs"
            };
            (None, Some(format!("being deleted, {amis}")))
        }
        Event::DeleteFinished => {
            if current.state != J::Deleting {
                return not_permitted("only a DELETING job finishes deletion");
            }
            if run.is_some_and(RunState::is_open) {
                return not_permitted("its run has not stopped yet");
            }
            job.state = J::Deleted;
            (None, Some("deleted".to_owned()))
        }
        Event::AmiDeregistering => match run {
            Some(RunState::Completed) => (Some(RunState::Deleting), None),
            _ => return not_permitted("only a COMPLETED run's AMI is deregistered"),
        },
        Event::AmiDeregistered => match run {
            Some(RunState::Deleting) => (Some(RunState::Deleted), None),
            _ => return not_permitted("only a run whose AMI is DELETING becomes DELETED"),
        },
    };
    Ok(Outcome {
        job,
        run: run_after,
        status_message: message,
    })
}

/// A failed run of a scheduled job: counts it and picks FAILING, FAILED or
/// PAUSED_ON_FAILURE; returns the job's status message.
fn fail(
    job: &mut JobStatus,
    kind: ErrorKind,
    message: &str,
    policy: &Policy,
    now: Timestamp,
) -> String {
    let failures = job.consecutive_failures.saturating_add(1);
    let max = policy.max_consecutive_failures.max(1);
    job.consecutive_failures = failures.min(max);
    if failures >= max {
        job.state = JobState::PausedOnFailure;
        job.next_replication_run_start_time = None;
        return format!(
            "paused after {failures} failed runs in a row ({kind}: {message}); resume the job to run it again"
        );
    }
    if !rehost_importer::retry::is_retryable(kind) {
        job.state = JobState::Failed;
        job.next_replication_run_start_time = None;
        return format!(
            "the last run failed with an error retrying cannot fix ({kind}: {message}); fix the cause and resume the job"
        );
    }
    let retry_at = now.plus_secs(policy.retry_delay_secs(failures));
    let next = match job.next_replication_run_start_time {
        Some(regular) if regular < retry_at => regular,
        _ => retry_at,
    };
    job.state = JobState::Failing;
    job.next_replication_run_start_time = Some(next);
    format!(
        "the last run failed ({kind}: {message}); failure {failures} of {max} in a row, next try at {next}"
    )
}

#[cfg(test)]
#[path = "transition_tests.rs"]
mod tests;
