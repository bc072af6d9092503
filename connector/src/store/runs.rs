//! Replication runs in the store: requested, missed, claimed by a worker (and reclaimed
//! when it died), their progress and checkpoint, completed or failed (with the job's
//! transition and disk lineage in the same transaction), their AMIs deregistered; and
//! the figures `/metrics` shows.

// Called by the API, the scheduler and the run pipeline, written alongside.
#![allow(dead_code)]

use anyhow::{Result, bail};
use rehost_core::ErrorKind;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::Store;
use super::jobs::{load_job, name_of, open_run_of, parse_column, set_run_state, write_status};
use crate::jobs::JobError;
use crate::jobs::ids;
use crate::jobs::model::{
    DiskLineage, Job, JobId, Run, RunId, RunStage, RunState, RunType, Timestamp,
};
use crate::jobs::transition::{self, Event, JobStatus, Policy};

/// The columns [`run_from_row`] reads, in its order.
const RUN_COLUMNS: &str = "id, job_id, run_type, state, stage, progress_percent, bytes_moved,
    status_message, ami_id, scheduled_at, started_at, completed_at, attempt, description";

/// An ACTIVE run and the worker holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveRun {
    pub run: Run,
    /// The worker that claimed it (its id, as given to `claim_run`).
    pub owner: String,
    /// The worker's last sign of life.
    pub heartbeat_at: Timestamp,
}

impl Store {
    /// Asks for a run of `job` (PENDING): automatic for the slot at `scheduled` (which
    /// moves the job's next slot), or on demand. Refused while the job has an open run.
    pub fn request_run(
        &mut self,
        job: &JobId,
        run_type: RunType,
        scheduled: Timestamp,
        description: Option<&str>,
        now: Timestamp,
    ) -> Result<Run, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = load_job(&tx, job)?;
        let open = open_run_of(&tx, job)?.map(|(_, state)| state);
        let event = Event::RunRequested {
            run_type,
            scheduled,
        };
        let outcome = transition::apply(&JobStatus::of(&current), open, &event, &self.policy, now)?;
        let id = ids::new_run_id();
        insert_run(
            &tx,
            &NewRun {
                id: &id,
                job,
                run_type,
                state: outcome.run.unwrap_or(RunState::Pending),
                scheduled,
                description,
                message: None,
            },
            now,
        )?;
        write_status(&tx, &current, &outcome, Some(&id), now)?;
        let run = load_run(&tx, &id)?;
        tx.commit()?;
        Ok(run)
    }

    /// Records the slot at `scheduled` as a MISSED run of `job` (see
    /// [`crate::jobs::schedule::Plan::Miss`]); `next` moves the job's next slot.
    pub fn miss_run(
        &mut self,
        job: &JobId,
        scheduled: Timestamp,
        next: Option<Timestamp>,
        message: &str,
        now: Timestamp,
    ) -> Result<Run, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = load_job(&tx, job)?;
        let outcome = transition::apply(
            &JobStatus::of(&current),
            None,
            &Event::RunMissed { next },
            &self.policy,
            now,
        )?;
        let id = ids::new_run_id();
        insert_run(
            &tx,
            &NewRun {
                id: &id,
                job,
                run_type: RunType::Automatic,
                state: outcome.run.unwrap_or(RunState::Missed),
                scheduled,
                description: None,
                message: Some(message),
            },
            now,
        )?;
        write_status(&tx, &current, &outcome, Some(&id), now)?;
        let run = load_run(&tx, &id)?;
        tx.commit()?;
        Ok(run)
    }

    /// Claims a PENDING run for worker `owner`: ACTIVE, atomically; `None` if another
    /// worker took it first (or it is no longer PENDING).
    pub fn claim_run(
        &mut self,
        run: &RunId,
        owner: &str,
        now: Timestamp,
    ) -> Result<Option<Run>, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = load_run(&tx, run)?;
        if current.state != RunState::Pending {
            return Ok(None);
        }
        let job = load_job(&tx, &current.job_id)?;
        let outcome = transition::apply(
            &JobStatus::of(&job),
            Some(current.state),
            &Event::RunStarted,
            &self.policy,
            now,
        )?;
        let claimed = tx.execute(
            "UPDATE runs SET state = ?2, owner = ?3, heartbeat_at = ?4, started_at = ?4,
                updated_at = ?4
             WHERE id = ?1 AND state = 'PENDING'",
            params![
                run.0,
                outcome.run.unwrap_or(RunState::Active).as_str(),
                owner,
                now.0
            ],
        )?;
        if claimed == 0 {
            return Ok(None);
        }
        write_status(&tx, &job, &outcome, Some(run), now)?;
        let run = load_run(&tx, run)?;
        tx.commit()?;
        Ok(Some(run))
    }

    /// Moves an ACTIVE run from `old_owner` (a worker that died: no heartbeat) to
    /// `new_owner`, as its next attempt; `None` if it is not ACTIVE under `old_owner`
    /// (someone reclaimed it first).
    pub fn reclaim_run(
        &mut self,
        run: &RunId,
        old_owner: &str,
        new_owner: &str,
        now: Timestamp,
    ) -> Result<Option<Run>, JobError> {
        let moved = self.conn.execute(
            "UPDATE runs SET owner = ?3, heartbeat_at = ?4, attempt = attempt + 1, updated_at = ?4
             WHERE id = ?1 AND state = 'ACTIVE' AND owner = ?2",
            params![run.0, old_owner, new_owner, now.0],
        )?;
        if moved == 0 {
            return Ok(None);
        }
        Ok(Some(load_run(&self.conn, run)?))
    }

    /// The run `id`.
    pub fn run(&self, id: &RunId) -> Result<Option<Run>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                params![id.0],
                run_from_row,
            )
            .optional()?)
    }

    /// The runs of `job`, newest first.
    pub fn runs(&self, job: &JobId) -> Result<Vec<Run>> {
        self.select_runs(
            "WHERE job_id = ?1 ORDER BY created_at DESC, rowid DESC",
            &job.0,
        )
    }

    /// Every PENDING run, oldest first (the order workers take them in).
    pub fn pending_runs(&self) -> Result<Vec<Run>> {
        self.select_runs(
            "WHERE state = ?1 ORDER BY created_at, rowid",
            &RunState::Pending.as_str(),
        )
    }

    /// Every ACTIVE run with its worker and last heartbeat.
    pub fn active_runs(&self) -> Result<Vec<ActiveRun>> {
        let mut query = self.conn.prepare(&format!(
            "SELECT {RUN_COLUMNS}, owner, heartbeat_at FROM runs WHERE state = 'ACTIVE'
             ORDER BY created_at, rowid"
        ))?;
        let rows = query.query_map([], |row| {
            Ok(ActiveRun {
                run: run_from_row(row)?,
                owner: row.get::<_, Option<String>>(14)?.unwrap_or_default(),
                heartbeat_at: Timestamp(row.get::<_, Option<i64>>(15)?.unwrap_or(0)),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Worker `owner` is alive and still running `run`; an error if the run is no longer
    /// ACTIVE under it (it was reclaimed, or ended): the worker must stop.
    pub fn heartbeat(&self, run: &RunId, owner: &str, now: Timestamp) -> Result<()> {
        let updated = self.conn.execute(
            "UPDATE runs SET heartbeat_at = ?3 WHERE id = ?1 AND owner = ?2 AND state = 'ACTIVE'",
            params![run.0, owner, now.0],
        )?;
        if updated == 0 {
            bail!("run {run} is no longer ACTIVE under worker {owner}; stop working on it");
        }
        Ok(())
    }

    /// Records an ACTIVE run's progress (`percent` of the whole run, capped at 100).
    pub fn run_progress(
        &self,
        run: &RunId,
        stage: RunStage,
        percent: u8,
        bytes_moved: u64,
        message: Option<&str>,
        now: Timestamp,
    ) -> Result<()> {
        let updated = self.conn.execute(
            "UPDATE runs SET stage = ?2, progress_percent = ?3, bytes_moved = ?4,
                status_message = COALESCE(?5, status_message), updated_at = ?6
             WHERE id = ?1 AND state = 'ACTIVE'",
            params![
                run.0,
                name_of(&stage)?,
                percent.min(100),
                i64::try_from(bytes_moved).unwrap_or(i64::MAX),
                message,
                now.0
            ],
        )?;
        if updated == 0 {
            bail!("run {run} is not ACTIVE; its progress is not recorded");
        }
        Ok(())
    }

    /// The run's checkpoint (JSON the pipeline resumes from), if one was saved.
    pub fn run_checkpoint(&self, run: &RunId) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT checkpoint FROM runs WHERE id = ?1",
                params![run.0],
                |row| row.get::<_, Option<String>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Saves the run's checkpoint (replacing the previous one).
    pub fn save_run_checkpoint(&self, run: &RunId, json: &str) -> Result<()> {
        if self.conn.execute(
            "UPDATE runs SET checkpoint = ?2 WHERE id = ?1",
            params![run.0, json],
        )? == 0
        {
            bail!("no replication run {run} to save a checkpoint for");
        }
        Ok(())
    }

    /// Completes a run with `ami_id`, in one transaction: the run COMPLETED, the job's
    /// transition (ACTIVE, or COMPLETED when it runs once), its latest AMI, and the disk
    /// lineage the next run builds on.
    pub fn complete_run(
        &mut self,
        run: &RunId,
        ami_id: &str,
        lineage: &[DiskLineage],
        now: Timestamp,
    ) -> Result<Job, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = load_run(&tx, run)?;
        if let Some(other) = lineage.iter().find(|l| l.job_id != current.job_id) {
            return Err(JobError::InvalidParameter(format!(
                "the lineage of disk {} belongs to job {}, not to run {run}'s job {}",
                other.disk_key, other.job_id, current.job_id
            )));
        }
        let job = load_job(&tx, &current.job_id)?;
        let event = Event::RunCompleted {
            ami_id: ami_id.to_owned(),
        };
        let outcome = transition::apply(
            &JobStatus::of(&job),
            Some(current.state),
            &event,
            &self.policy,
            now,
        )?;
        tx.execute(
            "UPDATE runs SET state = ?2, ami_id = ?3, completed_at = ?4, updated_at = ?4,
                stage = ?5, progress_percent = 100
             WHERE id = ?1",
            params![
                run.0,
                outcome.run.unwrap_or(RunState::Completed).as_str(),
                ami_id,
                now.0,
                name_of(&RunStage::Done)?
            ],
        )?;
        tx.execute(
            "UPDATE jobs SET latest_ami_id = ?2 WHERE id = ?1",
            params![job.id.0, ami_id],
        )?;
        // The lineage is the completed run's disks, no more: a disk removed from the VM
        // must not keep a row that makes every later run look mixed (and so full).
        tx.execute(
            "DELETE FROM disk_lineage WHERE job_id = ?1",
            params![job.id.0],
        )?;
        for disk in lineage {
            tx.execute(
                "INSERT INTO disk_lineage (job_id, disk_key, last_change_id, last_snapshot_id,
                    last_manifest, last_staged_image, last_run_id, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (job_id, disk_key) DO UPDATE SET last_change_id = ?3,
                    last_snapshot_id = ?4, last_manifest = ?5, last_staged_image = ?6,
                    last_run_id = ?7, updated_at = ?8",
                params![
                    disk.job_id.0,
                    disk.disk_key,
                    disk.last_change_id,
                    disk.last_snapshot_id,
                    disk.last_manifest,
                    disk.last_staged_image,
                    disk.last_run_id.as_ref().map(|r| &r.0),
                    now.0,
                ],
            )?;
        }
        let job = write_status(&tx, &job, &outcome, Some(run), now)?;
        tx.commit()?;
        Ok(job)
    }

    /// Fails a run with an error of `kind`: the job counts it and retries (FAILING),
    /// stops (FAILED) or pauses (PAUSED_ON_FAILURE) as `policy` says.
    pub fn fail_run(
        &mut self,
        run: &RunId,
        kind: ErrorKind,
        message: &str,
        policy: &Policy,
        now: Timestamp,
    ) -> Result<Job, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = load_run(&tx, run)?;
        let job = load_job(&tx, &current.job_id)?;
        let event = Event::RunFailed {
            kind,
            message: message.to_owned(),
        };
        let outcome = transition::apply(
            &JobStatus::of(&job),
            Some(current.state),
            &event,
            policy,
            now,
        )?;
        tx.execute(
            "UPDATE runs SET state = ?2, status_message = ?3, completed_at = ?4, updated_at = ?4
             WHERE id = ?1",
            params![
                run.0,
                outcome.run.unwrap_or(RunState::Failed).as_str(),
                format!("{kind}: {message}"),
                now.0
            ],
        )?;
        let job = write_status(&tx, &job, &outcome, Some(run), now)?;
        tx.commit()?;
        Ok(job)
    }

    /// What the job's last completed run left per disk, by disk key.
    pub fn lineage(&self, job: &JobId) -> Result<Vec<DiskLineage>> {
        let mut query = self.conn.prepare(
            "SELECT job_id, disk_key, last_change_id, last_snapshot_id, last_manifest,
                last_staged_image, last_run_id
             FROM disk_lineage WHERE job_id = ?1 ORDER BY disk_key",
        )?;
        let rows = query.query_map(params![job.0], |row| {
            Ok(DiskLineage {
                job_id: JobId(row.get(0)?),
                disk_key: row.get(1)?,
                last_change_id: row.get(2)?,
                last_snapshot_id: row.get(3)?,
                last_manifest: row.get(4)?,
                last_staged_image: row.get(5)?,
                last_run_id: row.get::<_, Option<String>>(6)?.map(RunId),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The AMIs of the job's COMPLETED runs, newest first.
    pub fn amis_of_job(&self, job: &JobId) -> Result<Vec<(RunId, String)>> {
        let mut query = self.conn.prepare(
            "SELECT id, ami_id FROM runs
             WHERE job_id = ?1 AND state = 'COMPLETED' AND ami_id IS NOT NULL
             ORDER BY completed_at DESC, rowid DESC",
        )?;
        let rows = query.query_map(params![job.0], |row| Ok((RunId(row.get(0)?), row.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Marks a COMPLETED run's AMI as being deregistered (DELETING): call before asking
    /// EC2, so a crash in between leaves a mark to finish from.
    pub fn mark_run_ami_deleting(&mut self, run: &RunId, now: Timestamp) -> Result<(), JobError> {
        self.step_run_ami(run, &[Event::AmiDeregistering], now)
    }

    /// Marks a run's AMI as deregistered: COMPLETED (or DELETING) → DELETED, through
    /// DELETING, by the transition function.
    pub fn mark_run_ami_deleted(&mut self, run: &RunId, now: Timestamp) -> Result<(), JobError> {
        let state = load_run(&self.conn, run)?.state;
        let steps: &[Event] = if state == RunState::Deleting {
            &[Event::AmiDeregistered]
        } else {
            &[Event::AmiDeregistering, Event::AmiDeregistered]
        };
        self.step_run_ami(run, steps, now)
    }

    fn step_run_ami(
        &mut self,
        run: &RunId,
        steps: &[Event],
        now: Timestamp,
    ) -> Result<(), JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = load_run(&tx, run)?;
        let job = load_job(&tx, &current.job_id)?;
        let mut state = current.state;
        for step in steps {
            let outcome =
                transition::apply(&JobStatus::of(&job), Some(state), step, &self.policy, now)?;
            state = outcome.run.unwrap_or(state);
        }
        set_run_state(&tx, run, state, None, now)?;
        tx.commit()?;
        Ok(())
    }

    /// How many runs are in each state (states without runs included, as 0), for `/metrics`.
    pub fn run_counts_by_state(&self) -> Result<Vec<(RunState, u64)>> {
        let mut query = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM runs GROUP BY state")?;
        let counted: Vec<(RunState, i64)> = query
            .query_map([], |row| Ok((parse_column(row, 0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(RunState::ALL
            .iter()
            .map(|&state| {
                let n = counted
                    .iter()
                    .find(|(s, _)| *s == state)
                    .map_or(0, |(_, n)| n.unsigned_abs());
                (state, n)
            })
            .collect())
    }

    /// Bytes moved by every run, ever.
    pub fn bytes_moved_total(&self) -> Result<u64> {
        let total: i64 = self.conn.query_row(
            "SELECT COALESCE(SUM(bytes_moved), 0) FROM runs",
            [],
            |row| row.get(0),
        )?;
        Ok(total.unsigned_abs())
    }

    /// How long each completed run took, in seconds, oldest first.
    pub fn run_durations_secs(&self) -> Result<Vec<f64>> {
        let mut query = self.conn.prepare(
            "SELECT completed_at - started_at FROM runs
             WHERE state IN ('COMPLETED', 'DELETING', 'DELETED') AND ami_id IS NOT NULL
                AND started_at IS NOT NULL AND completed_at IS NOT NULL
             ORDER BY completed_at, rowid",
        )?;
        let rows = query.query_map([], |row| row.get::<_, i64>(0))?;
        let mut durations = Vec::new();
        for secs in rows {
            // Whole seconds; f64 holds them exactly far beyond any run's length.
            durations.push(secs?.max(0) as f64);
        }
        Ok(durations)
    }

    fn select_runs(&self, filter: &str, value: &dyn rusqlite::ToSql) -> Result<Vec<Run>> {
        let mut query = self
            .conn
            .prepare(&format!("SELECT {RUN_COLUMNS} FROM runs {filter}"))?;
        let rows = query.query_map(params![value], run_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// A run to insert.
struct NewRun<'a> {
    id: &'a RunId,
    job: &'a JobId,
    run_type: RunType,
    state: RunState,
    scheduled: Timestamp,
    description: Option<&'a str>,
    message: Option<&'a str>,
}

fn insert_run(conn: &Connection, run: &NewRun<'_>, now: Timestamp) -> Result<(), JobError> {
    conn.execute(
        "INSERT INTO runs (id, job_id, run_type, state, stage, progress_percent, bytes_moved,
            status_message, scheduled_at, attempt, description, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, ?6, ?7, 1, ?8, ?9, ?9)",
        params![
            run.id.0,
            run.job.0,
            name_of(&run.run_type)?,
            run.state.as_str(),
            name_of(&RunStage::Queued)?,
            run.message,
            run.scheduled.0,
            run.description,
            now.0,
        ],
    )
    .map_err(|err| match err {
        // The partial unique index: a run was opened in between.
        rusqlite::Error::SqliteFailure(e, _)
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            JobError::RunLimitExceeded(format!(
                "job {} already has a PENDING or ACTIVE run",
                run.job
            ))
        }
        other => other.into(),
    })?;
    Ok(())
}

/// The run `id` within a transaction; NotFound if there is none.
fn load_run(conn: &Connection, id: &RunId) -> Result<Run, JobError> {
    conn.query_row(
        &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
        params![id.0],
        run_from_row,
    )
    .optional()?
    .ok_or_else(|| JobError::NotFound(format!("no replication run {id}")))
}

fn run_from_row(row: &Row<'_>) -> rusqlite::Result<Run> {
    Ok(Run {
        id: RunId(row.get(0)?),
        job_id: JobId(row.get(1)?),
        run_type: parse_column(row, 2)?,
        state: parse_column(row, 3)?,
        stage: parse_column(row, 4)?,
        progress_percent: row.get(5)?,
        bytes_moved: row.get::<_, i64>(6)?.unsigned_abs(),
        status_message: row.get(7)?,
        ami_id: row.get(8)?,
        scheduled_start_time: Timestamp(row.get(9)?),
        started_at: row.get::<_, Option<i64>>(10)?.map(Timestamp),
        completed_at: row.get::<_, Option<i64>>(11)?.map(Timestamp),
        attempt: row.get(12)?,
        description: row.get(13)?,
    })
}
