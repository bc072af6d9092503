//! Replication jobs in the store: create, read, update, delete, resume; and what every
//! state-changing method of jobs and runs shares: the job's status written from a
//! transition's outcome, with an outbox event when the job's state changed.

// Called by the API, the scheduler and the run pipeline, written alongside.
#![allow(dead_code)]

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::Store;
use crate::jobs::JobError;
use crate::jobs::ids;
use crate::jobs::model::{Job, JobId, JobSpec, JobState, JobUpdate, RunId, RunState, Timestamp};
use crate::jobs::transition::{self, Event, JobStatus, Outcome};
use crate::jobs::validate;

/// The columns [`job_from_row`] reads, in its order.
pub(super) const JOB_COLUMNS: &str =
    "id, server_id, source, vm_id, vm_name, seed_time, frequency_hours,
    run_once, license_type, amis_to_keep, encrypted, kms_key_id, description, state,
    status_message, next_run_at, consecutive_failures, latest_ami_id, created_at";

impl Store {
    /// Creates a job for `spec` (validated: see [`validate::validate_spec`]; the caller
    /// has resolved the KMS key). It is PENDING, its first run due at the seed time.
    pub fn create_job(&mut self, spec: &JobSpec, now: Timestamp) -> Result<Job, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let server = super::catalog::server_in(&tx, &spec.server_id)?;
        let live: Option<String> = tx
            .query_row(
                "SELECT id FROM jobs WHERE server_id = ?1 AND state <> 'DELETED'",
                params![spec.server_id.0],
                |row| row.get(0),
            )
            .optional()?;
        let spec = validate::validate_spec(spec, server.as_ref(), live.map(JobId).as_ref())?;
        let server = server.ok_or_else(|| validate::unknown_server(&spec.server_id))?;
        let id = ids::new_job_id();
        let status = JobStatus::new(
            spec.seed_replication_time,
            spec.run_once,
            spec.frequency_hours,
        );
        tx.execute(
            "INSERT INTO jobs (id, server_id, source, vm_id, vm_name, seed_time, frequency_hours,
                run_once, license_type, amis_to_keep, encrypted, kms_key_id, description, state,
                next_run_at, consecutive_failures, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, 0, ?16, ?16)",
            params![
                id.0,
                spec.server_id.0,
                server.source,
                server.info.id.0,
                server.info.name,
                spec.seed_replication_time.0,
                spec.frequency_hours,
                spec.run_once,
                name_of(&spec.license_type)?,
                spec.number_of_recent_amis_to_keep,
                spec.encrypted,
                spec.kms_key_id,
                spec.description,
                status.state.as_str(),
                status.next_replication_run_start_time.map(|t| t.0),
                now.0,
            ],
        )
        .map_err(|err| match err {
            // The partial unique index: another writer created one in between.
            rusqlite::Error::SqliteFailure(e, _)
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                JobError::AlreadyExists(format!(
                    "server {} already has a live replication job",
                    spec.server_id
                ))
            }
            other => other.into(),
        })?;
        let job = load_job(&tx, &id)?;
        record_state_change(&tx, &job, None, None, now)?;
        tx.commit()?;
        Ok(job)
    }

    /// The job `id`, deleted or not.
    pub fn job(&self, id: &JobId) -> Result<Option<Job>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
                params![id.0],
                job_from_row,
            )
            .optional()?)
    }

    /// Every job, oldest first; DELETED ones only when asked.
    pub fn jobs(&self, include_deleted: bool) -> Result<Vec<Job>> {
        let mut query = self.conn.prepare(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 OR state <> 'DELETED'
             ORDER BY created_at, rowid"
        ))?;
        let jobs = query
            .query_map(params![include_deleted], job_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(jobs)
    }

    /// Changes the job's settings (validated: [`validate::validate_update`]).
    pub fn update_job(
        &mut self,
        id: &JobId,
        update: &JobUpdate,
        now: Timestamp,
    ) -> Result<Job, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job = load_job(&tx, id)?;
        let update = validate::validate_update(&job, update)?;
        let event = Event::Updated {
            next_replication_run_start_time: update.next_replication_run_start_time,
            frequency_hours: update.frequency_hours,
        };
        let outcome = transition::apply(&JobStatus::of(&job), None, &event, &self.policy, now)?;
        tx.execute(
            "UPDATE jobs SET
                license_type = COALESCE(?2, license_type),
                amis_to_keep = COALESCE(?3, amis_to_keep),
                encrypted = COALESCE(?4, encrypted),
                kms_key_id = COALESCE(?5, kms_key_id),
                description = COALESCE(?6, description)
             WHERE id = ?1",
            params![
                id.0,
                update.license_type.as_ref().map(name_of).transpose()?,
                update.number_of_recent_amis_to_keep,
                update.encrypted,
                update.kms_key_id,
                update.description,
            ],
        )?;
        let job = write_status(&tx, &job, &outcome, None, now)?;
        tx.commit()?;
        Ok(job)
    }

    /// Starts deleting the job: DELETING, no more runs; a PENDING run is dropped (as
    /// MISSED); an ACTIVE one is stopped by its worker, which sees the state. The
    /// connector deregisters the AMIs unless `keep_amis`, then calls
    /// [`Store::finish_delete`].
    pub fn delete_job(
        &mut self,
        id: &JobId,
        keep_amis: bool,
        now: Timestamp,
    ) -> Result<Job, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job = load_job(&tx, id)?;
        let outcome = transition::apply(
            &JobStatus::of(&job),
            None,
            &Event::DeleteRequested { keep_amis },
            &self.policy,
            now,
        )?;
        tx.execute(
            "UPDATE jobs SET delete_keep_amis = ?2 WHERE id = ?1",
            params![id.0, keep_amis],
        )?;
        let job = write_status(&tx, &job, &outcome, None, now)?;
        if let Some((run_id, RunState::Pending)) = open_run_of(&tx, id)? {
            let dropped = transition::apply(
                &JobStatus::of(&job),
                Some(RunState::Pending),
                &Event::RunMissed { next: None },
                &self.policy,
                now,
            )?;
            set_run_state(
                &tx,
                &run_id,
                dropped.run.unwrap_or(RunState::Missed),
                Some("the job was deleted before this run started"),
                now,
            )?;
        }
        tx.commit()?;
        Ok(job)
    }

    /// Whether the deletion asked for keeps the job's AMIs; `None` if it was not deleted.
    pub fn delete_keeps_amis(&self, id: &JobId) -> Result<Option<bool>> {
        Ok(self
            .conn
            .query_row(
                "SELECT delete_keep_amis FROM jobs WHERE id = ?1",
                params![id.0],
                |row| row.get::<_, Option<bool>>(0),
            )
            .optional()?
            .flatten())
    }

    /// Ends a deletion: DELETED. Refused while a run is still open or, when the AMIs
    /// were not to be kept, while a run still has one.
    pub fn finish_delete(&mut self, id: &JobId, now: Timestamp) -> Result<Job, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job = load_job(&tx, id)?;
        let open = open_run_of(&tx, id)?.map(|(_, state)| state);
        let outcome = transition::apply(
            &JobStatus::of(&job),
            open,
            &Event::DeleteFinished,
            &self.policy,
            now,
        )?;
        let keep: Option<bool> = tx.query_row(
            "SELECT delete_keep_amis FROM jobs WHERE id = ?1",
            params![id.0],
            |row| row.get(0),
        )?;
        if keep == Some(false) {
            let left: Vec<String> = tx
                .prepare(
                    "SELECT ami_id FROM runs WHERE job_id = ?1 AND ami_id IS NOT NULL
                     AND state IN ('COMPLETED', 'DELETING') ORDER BY rowid",
                )?
                .query_map(params![id.0], |row| row.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            if !left.is_empty() {
                return Err(JobError::Conflict(format!(
                    "job {id} is deleted without keeping its AMIs, and {} are not deregistered yet: {}",
                    left.len(),
                    left.join(", ")
                )));
            }
        }
        let job = write_status(&tx, &job, &outcome, None, now)?;
        tx.commit()?;
        Ok(job)
    }

    /// Resumes a FAILED or PAUSED_ON_FAILURE job: ACTIVE, its next run due now.
    pub fn resume_job(&mut self, id: &JobId, now: Timestamp) -> Result<Job, JobError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let job = load_job(&tx, id)?;
        let outcome = transition::apply(
            &JobStatus::of(&job),
            None,
            &Event::Resumed,
            &self.policy,
            now,
        )?;
        let job = write_status(&tx, &job, &outcome, None, now)?;
        tx.commit()?;
        Ok(job)
    }

    /// Events not yet delivered (to the webhook), oldest first.
    pub fn undelivered_events(&self, limit: usize) -> Result<Vec<(i64, serde_json::Value)>> {
        let mut query = self.conn.prepare(
            "SELECT id, body FROM events WHERE delivered_at IS NULL ORDER BY id LIMIT ?1",
        )?;
        let rows = query.query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut events = Vec::new();
        for row in rows {
            let (id, body) = row?;
            events.push((id, serde_json::from_str(&body)?));
        }
        Ok(events)
    }

    /// Records that event `id` was delivered.
    pub fn event_delivered(&self, id: i64) -> Result<()> {
        self.conn.execute(
            "UPDATE events SET delivered_at = ?2 WHERE id = ?1 AND delivered_at IS NULL",
            params![id, Timestamp::now().0],
        )?;
        Ok(())
    }
}

/// The job `id` within a transaction; NotFound if there is none.
pub(super) fn load_job(conn: &Connection, id: &JobId) -> Result<Job, JobError> {
    conn.query_row(
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
        params![id.0],
        job_from_row,
    )
    .optional()?
    .ok_or_else(|| JobError::NotFound(format!("no replication job {id}")))
}

/// The job's PENDING or ACTIVE run, if it has one.
pub(super) fn open_run_of(
    conn: &Connection,
    job: &JobId,
) -> Result<Option<(RunId, RunState)>, JobError> {
    Ok(conn
        .query_row(
            "SELECT id, state FROM runs WHERE job_id = ?1 AND state IN ('PENDING', 'ACTIVE')",
            params![job.0],
            |row| Ok((RunId(row.get(0)?), parse_column::<RunState>(row, 1)?)),
        )
        .optional()?)
}

/// Writes a run's new state (and message, when given).
pub(super) fn set_run_state(
    conn: &Connection,
    run: &RunId,
    state: RunState,
    message: Option<&str>,
    now: Timestamp,
) -> Result<(), JobError> {
    conn.execute(
        "UPDATE runs SET state = ?2, status_message = COALESCE(?3, status_message), updated_at = ?4
         WHERE id = ?1",
        params![run.0, state.as_str(), message, now.0],
    )?;
    Ok(())
}

/// Writes the job's status from `outcome`; when the job's state changed, adds the event
/// to the outbox (same transaction). Returns the job as stored.
pub(super) fn write_status(
    conn: &Connection,
    before: &Job,
    outcome: &Outcome,
    run: Option<&RunId>,
    now: Timestamp,
) -> Result<Job, JobError> {
    let status = &outcome.job;
    conn.execute(
        "UPDATE jobs SET state = ?2, consecutive_failures = ?3, next_run_at = ?4,
            frequency_hours = ?5, status_message = COALESCE(?6, status_message), updated_at = ?7
         WHERE id = ?1",
        params![
            before.id.0,
            status.state.as_str(),
            status.consecutive_failures,
            status.next_replication_run_start_time.map(|t| t.0),
            status.frequency_hours,
            outcome.status_message,
            now.0,
        ],
    )?;
    let job = load_job(conn, &before.id)?;
    if job.state != before.state {
        record_state_change(conn, &job, Some(before.state), run, now)?;
    }
    Ok(job)
}

/// Adds a `ReplicationJobStateChanged` event (SMS-like, camelCase) to the outbox.
fn record_state_change(
    conn: &Connection,
    job: &Job,
    previous: Option<JobState>,
    run: Option<&RunId>,
    now: Timestamp,
) -> Result<(), JobError> {
    let mut body = json!({
        "type": "ReplicationJobStateChanged",
        "replicationJobId": job.id,
        "serverId": job.server_id,
        "previousState": previous,
        "state": job.state,
        "time": now,
    });
    if let Some(run) = run {
        body["replicationRunId"] = json!(run);
    }
    if let Some(message) = &job.status_message {
        body["statusMessage"] = json!(message);
    }
    conn.execute(
        "INSERT INTO events (created_at, body) VALUES (?1, ?2)",
        params![now.0, body.to_string()],
    )?;
    Ok(())
}

/// A job from a row of [`JOB_COLUMNS`].
pub(super) fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: JobId(row.get(0)?),
        server_id: crate::jobs::model::ServerId(row.get(1)?),
        source: row.get(2)?,
        vm_id: row.get(3)?,
        vm_name: row.get(4)?,
        seed_replication_time: Timestamp(row.get(5)?),
        frequency_hours: row.get(6)?,
        run_once: row.get(7)?,
        license_type: parse_column(row, 8)?,
        number_of_recent_amis_to_keep: row.get(9)?,
        encrypted: row.get(10)?,
        kms_key_id: row.get(11)?,
        description: row.get(12)?,
        state: parse_column(row, 13)?,
        status_message: row.get(14)?,
        next_replication_run_start_time: row.get::<_, Option<i64>>(15)?.map(Timestamp),
        consecutive_failures: row.get(16)?,
        latest_ami_id: row.get(17)?,
        created_at: Timestamp(row.get(18)?),
    })
}

/// The stored name of an enum value (its serde name: `PAUSED_ON_FAILURE`, `BYOL`).
pub(super) fn name_of<T: serde::Serialize>(value: &T) -> Result<String, JobError> {
    Ok(super::enum_name(value)?)
}

/// Reads column `index` as an enum stored by its serde name.
pub(super) fn parse_column<T: DeserializeOwned>(
    row: &Row<'_>,
    index: usize,
) -> rusqlite::Result<T> {
    let text: String = row.get(index)?;
    serde_json::from_value(serde_json::Value::String(text)).map_err(|err| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(err))
    })
}
