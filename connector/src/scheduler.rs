//! The scheduler inside `rehost serve`: starts runs when they are due, runs at most
//! `max_concurrent_runs` at once, records the end of each through the store (whose
//! transition function decides retries, FAILING and PAUSED_ON_FAILURE), finishes job
//! deletions, and picks up the runs a crashed connector left ACTIVE.
//!
//! Every decision is the store's or a pure function's (`jobs::schedule::plan`); this loop
//! only applies them, once a second or as soon as it is woken (an on-demand run).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::jobs::model::{JobId, JobState, Run, RunId, Timestamp};
use crate::jobs::schedule::{self, Plan};
use crate::jobs::transition::Policy;
use crate::pipeline::{self, RunContext, RunEnd};
use crate::store::SharedStore;

/// How often the loop looks for due jobs when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);
/// How often a run's owner proves it is alive.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A run whose owner has not proved it is alive for this long is taken over, even if a
/// process of the owner's pid exists (the pid may have been reused).
const STALE_AFTER_SECS: i64 = 120;

/// The running scheduler.
#[derive(Debug)]
pub struct Scheduler {
    wake: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Scheduler {
    /// Starts the scheduler's loop on the current runtime; it stops when `shutdown` turns true.
    pub fn start(
        config: Arc<Config>,
        store: SharedStore,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Scheduler> {
        if config.aws.staging_bucket.is_none() {
            // The API still serves; each run fails with this reason until it is set.
            tracing::warn!(
                "[aws] staging_bucket is not set in the config: replication runs will fail until it is"
            );
        }
        let wake = Arc::new(Notify::new());
        let state = Loop {
            owner: owner_id(),
            policy: Policy::from_config(&config.scheduler),
            config,
            store,
            wake: wake.clone(),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            task_runs: HashMap::new(),
            clients: None,
        };
        let task = tokio::spawn(state.run(shutdown));
        Ok(Scheduler { wake, task })
    }

    /// Wakes the loop now (a new on-demand run, a resumed or deleted job).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Waits for the loop (and the runs it owns) to stop after shutdown.
    pub async fn stopped(self) {
        if let Err(err) = self.task.await {
            tracing::error!(error = %err, "the scheduler task failed");
        }
    }
}

/// This process, as recorded as the owner of the runs it executes: `pid:START`, so a
/// restarted connector (same pid or not) never mistakes an old run for its own.
pub fn owner_id() -> String {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}:{started}", std::process::id())
}

/// Whether the owner of a run is gone: its process no longer exists, or it has not sent
/// a heartbeat for [`STALE_AFTER_SECS`].
pub fn owner_is_gone(owner: &str, heartbeat_at: Timestamp, now: Timestamp) -> bool {
    if now.0 - heartbeat_at.0 > STALE_AFTER_SECS {
        return true;
    }
    match owner.split(':').next().and_then(|p| p.parse::<u32>().ok()) {
        // The connector runs on Linux (the appliance): a live process has /proc/PID.
        Some(pid) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        // Not an owner this code wrote: only the heartbeat can tell.
        None => false,
    }
}

struct Loop {
    owner: String,
    policy: Policy,
    config: Arc<Config>,
    store: SharedStore,
    wake: Arc<Notify>,
    /// Runs executing here, with the sender that stops each.
    running: HashMap<RunId, RunningRun>,
    tasks: JoinSet<(RunId, RunEnd)>,
    /// Which run each task executes, to record a task that panicked.
    task_runs: HashMap<tokio::task::Id, RunId>,
    /// Built on the first run (loading credentials may take a moment).
    clients: Option<rehost_importer::aws::Clients>,
}

struct RunningRun {
    job: JobId,
    stop: watch::Sender<bool>,
    /// The job is being deleted: a stop is a cancellation, not a shutdown (shared with the
    /// run's task, which then discards what the run staged).
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

impl Loop {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            if *shutdown.borrow() {
                break;
            }
            if let Err(err) = self.tick().await {
                tracing::error!(error = %format!("{err:#}"), "scheduler pass failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                () = self.wake.notified() => {}
                _ = heartbeat.tick() => self.heartbeat(),
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => self.finished(joined),
                _ = shutdown.changed() => {}
            }
        }
        // Shutdown: every run stops where it is and stays ACTIVE with its checkpoint; the
        // next connector to start takes it over and resumes it.
        for running in self.running.values() {
            let _ = running.stop.send(true);
        }
        while let Some(joined) = self.tasks.join_next().await {
            self.finished(joined);
        }
        tracing::info!("scheduler stopped");
    }

    /// One pass: take over orphaned runs, schedule due jobs, finish deletions, start
    /// pending runs up to the limit.
    async fn tick(&mut self) -> Result<()> {
        let now = Timestamp::now();
        self.take_over_orphans(now).await?;
        let jobs = self.store.with(|s| s.jobs(false))?;
        let open: std::collections::HashSet<JobId> = self
            .store
            .with(|s| {
                let mut open: Vec<JobId> =
                    s.pending_runs()?.into_iter().map(|r| r.job_id).collect();
                open.extend(s.active_runs()?.into_iter().map(|a| a.run.job_id));
                Ok(open)
            })?
            .into_iter()
            .collect();
        for job in &jobs {
            if job.state == JobState::Deleting {
                self.continue_delete(job, open.contains(&job.id)).await?;
                continue;
            }
            match schedule::plan(
                job,
                open.contains(&job.id),
                now,
                self.config.scheduler.frequency_unit_secs(),
            ) {
                Plan::Wait => {}
                Plan::Start { scheduled } => {
                    let run = self.store.with(|s| {
                        Ok(s.request_run(
                            &job.id,
                            crate::jobs::model::RunType::Automatic,
                            scheduled,
                            None,
                            now,
                        )?)
                    })?;
                    tracing::info!(job = %job.id, run = %run.id, "run due");
                }
                Plan::Miss {
                    scheduled,
                    missed_total,
                    next,
                    message,
                } => {
                    // The last recorded slot moves the job's next slot on; the slot at
                    // `next` is planned (and may start) on the next pass.
                    let last = scheduled.len().saturating_sub(1);
                    for (i, slot) in scheduled.iter().enumerate() {
                        let moved = (i == last).then_some(next);
                        self.store
                            .with(|s| Ok(s.miss_run(&job.id, *slot, moved, &message, now)?))?;
                    }
                    tracing::warn!(job = %job.id, missed_total, "runs missed");
                    self.wake.notify_one();
                }
            }
        }
        self.start_pending(now).await
    }

    /// Runs ACTIVE under an owner that is gone are taken over and resumed here.
    async fn take_over_orphans(&mut self, now: Timestamp) -> Result<()> {
        let active = self.store.with(|s| s.active_runs())?;
        for orphan in active {
            if orphan.owner == self.owner || !owner_is_gone(&orphan.owner, orphan.heartbeat_at, now)
            {
                continue;
            }
            if self.running.len() >= self.max_runs() {
                return Ok(());
            }
            let taken = self
                .store
                .with(|s| Ok(s.reclaim_run(&orphan.run.id, &orphan.owner, &self.owner, now)?))?;
            if let Some(run) = taken {
                tracing::warn!(run = %run.id, previous_owner = %orphan.owner, "resuming a run its connector left");
                self.spawn(run).await?;
            }
        }
        Ok(())
    }

    async fn start_pending(&mut self, now: Timestamp) -> Result<()> {
        if self.running.len() >= self.max_runs() {
            return Ok(());
        }
        let pending = self.store.with(|s| s.pending_runs())?;
        for run in pending {
            if self.running.len() >= self.max_runs() {
                break;
            }
            let claimed = self
                .store
                .with(|s| Ok(s.claim_run(&run.id, &self.owner, now)?))?;
            if let Some(run) = claimed {
                self.spawn(run).await?;
            }
        }
        Ok(())
    }

    fn max_runs(&self) -> usize {
        usize::try_from(self.config.scheduler.max_concurrent_runs).unwrap_or(usize::MAX)
    }

    /// The AWS clients every run shares, built on first use.
    async fn clients(&mut self) -> rehost_importer::aws::Clients {
        if let Some(clients) = &self.clients {
            return clients.clone();
        }
        let clients = rehost_importer::aws::Clients::load(&self.config.aws_options()).await;
        self.clients = Some(clients.clone());
        clients
    }

    async fn spawn(&mut self, run: Run) -> Result<()> {
        let clients = self.clients().await;
        let (stop_tx, stop_rx) = watch::channel(false);
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ctx = RunContext {
            config: self.config.clone(),
            store: self.store.clone(),
            clients,
            stop: stop_rx,
            handle: tokio::runtime::Handle::current(),
        };
        self.running.insert(
            run.id.clone(),
            RunningRun {
                job: run.job_id.clone(),
                stop: stop_tx,
                cancelled: cancelled.clone(),
            },
        );
        tracing::info!(run = %run.id, job = %run.job_id, attempt = run.attempt, "run started");
        let id = run.id.clone();
        let task = self.tasks.spawn(async move {
            let end = pipeline::execute(&ctx, &run).await;
            if end == RunEnd::Stopped && cancelled.load(std::sync::atomic::Ordering::Relaxed) {
                // Cancelled for good: nothing will resume it.
                pipeline::discard_staged(&ctx, &run).await;
            }
            (run.id, end)
        });
        self.task_runs.insert(task.id(), id);
        Ok(())
    }

    fn heartbeat(&self) {
        let now = Timestamp::now();
        for id in self.running.keys() {
            if let Err(err) = self.store.with(|s| s.heartbeat(id, &self.owner, now)) {
                // The run is no longer ours (taken over after a stall, or ended): stop
                // working on it rather than race its new owner.
                tracing::warn!(run = %id, error = %format!("{err:#}"), "heartbeat refused; stopping the run");
                if let Some(running) = self.running.get(id) {
                    let _ = running.stop.send(true);
                }
            }
        }
    }

    /// Records how a run ended.
    fn finished(&mut self, joined: std::result::Result<(RunId, RunEnd), tokio::task::JoinError>) {
        let (id, end) = match joined {
            Ok(done) => {
                self.task_runs.retain(|_, run| *run != done.0);
                done
            }
            Err(err) => {
                let Some(id) = self.task_runs.remove(&err.id()) else {
                    tracing::error!(error = %err, "an unknown run task failed");
                    return;
                };
                tracing::error!(run = %id, error = %err, "a run task panicked");
                (
                    id,
                    RunEnd::Failed {
                        kind: rehost_core::ErrorKind::Transient,
                        message: format!("the run's task failed: {err}"),
                    },
                )
            }
        };
        let cancelled = self
            .running
            .remove(&id)
            .is_some_and(|r| r.cancelled.load(std::sync::atomic::Ordering::Relaxed));
        record_end(&self.store, &self.policy, &id, end, cancelled);
        self.wake.notify_one();
    }

    /// A job being deleted: its run (if any) is cancelled; once none is open, its AMIs are
    /// deregistered unless it keeps them, the snapshots its source keeps as the next run's
    /// base (Azure) are deleted, and it becomes DELETED.
    async fn continue_delete(
        &mut self,
        job: &crate::jobs::model::Job,
        has_open_run: bool,
    ) -> Result<()> {
        if has_open_run {
            for running in self.running.values_mut().filter(|r| r.job == job.id) {
                running
                    .cancelled
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = running.stop.send(true);
            }
            return Ok(());
        }
        let keep_amis = self
            .store
            .with(|s| s.delete_keeps_amis(&job.id))?
            .unwrap_or(true);
        if !keep_amis {
            let clients = self.clients().await;
            let tag = rehost_importer::ami::TagFilter {
                key: pipeline::JOB_TAG.into(),
                value: job.id.0.clone(),
            };
            rehost_importer::ami::prune(&clients, &tag, 0, false)
                .await
                .with_context(|| format!("deregistering the AMIs of job {}", job.id))?;
            let amis = self.store.with(|s| s.amis_of_job(&job.id))?;
            for (run, _) in amis {
                self.store
                    .with(|s| Ok(s.mark_run_ami_deleted(&run, Timestamp::now())?))?;
            }
        }
        pipeline::release_source_bases(&self.config, &self.store, job)
            .await
            .with_context(|| format!("deleting the source snapshots job {} kept", job.id))?;
        self.store
            .with(|s| Ok(s.finish_delete(&job.id, Timestamp::now())?))?;
        tracing::info!(job = %job.id, "job deleted");
        Ok(())
    }
}

/// Records how a run ended: a completed run was recorded by the pipeline itself (with
/// its lineage, in one transaction); a failure goes through the store's transition (retry,
/// FAILING, PAUSED_ON_FAILURE); a stop leaves the run ACTIVE to be resumed, unless its job
/// is being deleted (`cancelled`).
pub fn record_end(store: &SharedStore, policy: &Policy, id: &RunId, end: RunEnd, cancelled: bool) {
    let now = Timestamp::now();
    let recorded = match end {
        RunEnd::Completed { ami_id } => {
            tracing::info!(run = %id, ami_id, "run completed");
            Ok(())
        }
        RunEnd::Failed { kind, message } => {
            tracing::warn!(run = %id, %kind, message, "run failed");
            store
                .with(|s| Ok(s.fail_run(id, kind, &message, policy, now)?))
                .map(|_| ())
        }
        RunEnd::Stopped if cancelled => store
            .with(|s| {
                Ok(s.fail_run(
                    id,
                    rehost_core::ErrorKind::Cancelled,
                    "cancelled: the job is being deleted",
                    policy,
                    now,
                )?)
            })
            .map(|_| ()),
        RunEnd::Stopped => {
            tracing::info!(run = %id, "run stopped; it resumes when a connector starts");
            Ok(())
        }
    };
    if let Err(err) = recorded {
        tracing::error!(run = %id, error = %format!("{err:#}"), "the run's end was not recorded");
    }
}

/// Runs the PENDING run `id` in this process, if no connector has claimed it first (for
/// `rehost jobs start --wait` when no `rehost serve` is running): `None` when another
/// executor has it. Ctrl-C stops it where it is, to be resumed by the next connector.
pub async fn run_here(
    config: Arc<Config>,
    store: SharedStore,
    id: RunId,
) -> Result<Option<RunEnd>> {
    let id = &id;
    let owner = owner_id();
    let Some(run) = store.with(|s| Ok(s.claim_run(id, &owner, Timestamp::now())?))? else {
        return Ok(None);
    };
    let clients = rehost_importer::aws::Clients::load(&config.aws_options()).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = stop_tx.send(true);
        }
    });
    let ctx = RunContext {
        config: config.clone(),
        store: store.clone(),
        clients,
        stop: stop_rx,
        handle: tokio::runtime::Handle::current(),
    };
    // Heartbeats, so a `rehost serve` started meanwhile leaves this run alone.
    let beat_store = store.clone();
    let beat_run = run.id.clone();
    let beat_owner = owner.clone();
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tick.tick().await;
            let _ = beat_store.with(|s| s.heartbeat(&beat_run, &beat_owner, Timestamp::now()));
        }
    });
    let end = pipeline::execute(&ctx, &run).await;
    heartbeat.abort();
    record_end(
        &store,
        &Policy::from_config(&config.scheduler),
        id,
        end.clone(),
        false,
    );
    Ok(Some(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_whose_process_is_gone_or_silent_is_gone() {
        let now = Timestamp(1_000_000);
        // This process is alive and fresh.
        assert!(!owner_is_gone(&owner_id(), now, now));
        // Silent for too long, alive or not.
        assert!(owner_is_gone(
            &owner_id(),
            Timestamp(now.0 - STALE_AFTER_SECS - 1),
            now
        ));
        // A pid that cannot exist (above the kernel's pid_max).
        assert!(owner_is_gone("2147483646:1", now, now));
        // Not our format: only the heartbeat decides.
        assert!(!owner_is_gone("somewhere-else", now, now));
    }
}
