//! Store tests of jobs and runs: every state change through the transition function,
//! one open run per job, claims that race, atomic completion, events, the v1 migration.

use super::*;
use crate::jobs::JobError;
use crate::jobs::model::{
    DiskLineage, Job, JobId, JobSpec, JobState, JobUpdate, LicenseType, RunId, RunStage, RunState,
    RunType, ServerId, Timestamp,
};
use crate::jobs::transition::Policy;
use catalog::tests::vm;
use rehost_core::ErrorKind;

const T0: Timestamp = Timestamp(1_800_000_000);
const HOUR: i64 = 3600;

fn store() -> Store {
    let mut store = Store::in_memory().unwrap();
    store
        .replace_catalog(
            "vc1",
            "vsphere",
            "https://a/sdk",
            &[vm("u1", "web", false), vm("u2", "db", true)],
        )
        .unwrap();
    store
}

fn web() -> ServerId {
    ids::server_id("vc1", "u1")
}

fn spec(server: ServerId) -> JobSpec {
    JobSpec {
        server_id: server,
        seed_replication_time: T0,
        frequency_hours: Some(12),
        run_once: false,
        license_type: LicenseType::Byol,
        number_of_recent_amis_to_keep: 2,
        encrypted: false,
        kms_key_id: None,
        description: Some("web tier".into()),
    }
}

fn new_job(store: &mut Store) -> Job {
    store.create_job(&spec(web()), T0).unwrap()
}

/// The (previousState, state) of every event, oldest first.
fn transitions(store: &Store) -> Vec<(Option<String>, String)> {
    store
        .undelivered_events(1000)
        .unwrap()
        .into_iter()
        .map(|(_, e)| {
            assert_eq!(e["type"], "ReplicationJobStateChanged");
            (
                e["previousState"].as_str().map(str::to_owned),
                e["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn pair(previous: Option<&str>, state: &str) -> (Option<String>, String) {
    (previous.map(str::to_owned), state.to_owned())
}

fn policy() -> Policy {
    Policy {
        max_consecutive_failures: 3,
        retry_backoff_secs: 60,
        frequency_unit_secs: HOUR,
    }
}

#[test]
fn a_job_is_created_pending_and_stored_as_given() {
    let mut store = store();
    let job = new_job(&mut store);
    assert!(job.id.0.starts_with("sms-job-"), "{}", job.id);
    assert_eq!(job.state, JobState::Pending);
    assert_eq!(job.next_replication_run_start_time, Some(T0));
    assert_eq!(
        (
            job.source.as_str(),
            job.vm_id.as_str(),
            job.vm_name.as_str()
        ),
        ("vc1", "u1", "web")
    );
    assert_eq!(job.license_type, LicenseType::Byol);
    assert_eq!(job.number_of_recent_amis_to_keep, 2);
    assert_eq!(store.job(&job.id).unwrap(), Some(job.clone()));
    assert_eq!(store.jobs(false).unwrap(), vec![job.clone()]);
    let events = store.undelivered_events(10).unwrap();
    assert_eq!(events.len(), 1);
    let (_, body) = &events[0];
    assert_eq!(body["replicationJobId"], job.id.0);
    assert_eq!(body["serverId"], web().0);
    assert_eq!(body["state"], "PENDING");
    assert!(body["previousState"].is_null());
    assert_eq!(body["time"], T0.to_rfc3339());
}

#[test]
fn bad_jobs_are_refused_with_their_status() {
    let mut store = store();
    new_job(&mut store);
    let second = store.create_job(&spec(web()), T0).unwrap_err();
    assert_eq!(second.code(), "ReplicationJobAlreadyExistsException");
    let rdm = store
        .create_job(&spec(ids::server_id("vc1", "u2")), T0)
        .unwrap_err();
    assert_eq!(rdm.http_status(), 400);
    assert!(rdm.to_string().contains("raw device mapping"), "{rdm}");
    let unknown = store
        .create_job(&spec(ServerId("s-00000000000000000".into())), T0)
        .unwrap_err();
    assert!(
        unknown.to_string().contains("unknown server id"),
        "{unknown}"
    );
    let missing = store.update_job(&JobId("sms-job-nope".into()), &JobUpdate::default(), T0);
    assert_eq!(missing.unwrap_err().http_status(), 404);
}

#[test]
fn updates_change_settings_and_the_schedule() {
    let mut store = store();
    let job = new_job(&mut store);
    let update = JobUpdate {
        next_replication_run_start_time: Some(T0.plus_secs(HOUR)),
        frequency_hours: Some(6),
        kms_key_id: Some("alias/rehost".into()),
        description: Some("new".into()),
        ..JobUpdate::default()
    };
    let updated = store.update_job(&job.id, &update, T0).unwrap();
    assert_eq!(updated.frequency_hours, Some(6));
    assert_eq!(
        updated.next_replication_run_start_time,
        Some(T0.plus_secs(HOUR))
    );
    assert!(updated.encrypted);
    assert_eq!(updated.kms_key_id.as_deref(), Some("alias/rehost"));
    assert_eq!(updated.description.as_deref(), Some("new"));
    assert_eq!(updated.license_type, LicenseType::Byol);
    let bad = JobUpdate {
        frequency_hours: Some(30),
        ..JobUpdate::default()
    };
    assert_eq!(
        store
            .update_job(&job.id, &bad, T0)
            .unwrap_err()
            .http_status(),
        400
    );
}

#[test]
fn one_open_run_per_job() {
    let mut store = store();
    let job = new_job(&mut store);
    let run = store
        .request_run(&job.id, RunType::Automatic, T0, Some("first"), T0)
        .unwrap();
    assert_eq!(
        (run.state, run.stage, run.attempt),
        (RunState::Pending, RunStage::Queued, 1)
    );
    assert_eq!(run.description.as_deref(), Some("first"));
    // The automatic run moved the next slot by the frequency.
    let job = store.job(&job.id).unwrap().unwrap();
    assert_eq!(
        job.next_replication_run_start_time,
        Some(T0.plus_secs(12 * HOUR))
    );
    let err = store
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap_err();
    assert_eq!(err.code(), "ReplicationRunLimitExceededException");
    assert_eq!(store.pending_runs().unwrap(), vec![run]);
}

#[test]
fn two_claims_of_one_run_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rehost.db");
    let mut a = Store::open(&path).unwrap();
    a.replace_catalog("vc1", "vsphere", "https://a/sdk", &[vm("u1", "web", false)])
        .unwrap();
    let job = new_job(&mut a);
    let run = a
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap();
    let mut b = Store::open(&path).unwrap();
    let (first, second) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.claim_run(&run.id, "worker-a", T0).unwrap());
        let tb = s.spawn(|| b.claim_run(&run.id, "worker-b", T0).unwrap());
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(
        usize::from(first.is_some()) + usize::from(second.is_some()),
        1,
        "{first:?} {second:?}"
    );
    let claimed = first.or(second).unwrap();
    assert_eq!(claimed.state, RunState::Active);
    assert_eq!(claimed.started_at, Some(T0));
    let a = Store::open(&path).unwrap();
    assert_eq!(a.job(&job.id).unwrap().unwrap().state, JobState::Active);
    assert_eq!(a.active_runs().unwrap().len(), 1);
    // A claimed run is not claimed again.
    let mut a = a;
    assert_eq!(a.claim_run(&run.id, "worker-c", T0).unwrap(), None);
}

#[test]
fn a_dead_workers_run_is_reclaimed_as_a_new_attempt() {
    let mut store = store();
    let job = new_job(&mut store);
    let run = store
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap();
    store.claim_run(&run.id, "w1", T0).unwrap().unwrap();
    store.heartbeat(&run.id, "w1", T0.plus_secs(10)).unwrap();
    let active = store.active_runs().unwrap();
    assert_eq!(
        (active[0].owner.as_str(), active[0].heartbeat_at),
        ("w1", T0.plus_secs(10))
    );
    let moved = store
        .reclaim_run(&run.id, "w1", "w2", T0.plus_secs(99))
        .unwrap()
        .unwrap();
    assert_eq!(moved.attempt, 2);
    assert_eq!(store.reclaim_run(&run.id, "w1", "w3", T0).unwrap(), None);
    let stale = store
        .heartbeat(&run.id, "w1", T0.plus_secs(100))
        .unwrap_err();
    assert!(
        stale
            .to_string()
            .contains("no longer ACTIVE under worker w1"),
        "{stale}"
    );
    store.heartbeat(&run.id, "w2", T0.plus_secs(100)).unwrap();
}

#[test]
fn progress_and_checkpoints_are_kept() {
    let mut store = store();
    let job = new_job(&mut store);
    let run = store
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap();
    assert!(
        store
            .run_progress(&run.id, RunStage::Export, 10, 5, None, T0)
            .is_err()
    );
    store.claim_run(&run.id, "w1", T0).unwrap();
    store
        .run_progress(
            &run.id,
            RunStage::Export,
            140,
            1 << 30,
            Some("disk 1 of 2"),
            T0,
        )
        .unwrap();
    let seen = store.run(&run.id).unwrap().unwrap();
    assert_eq!(
        (seen.stage, seen.progress_percent, seen.bytes_moved),
        (RunStage::Export, 100, 1 << 30)
    );
    assert_eq!(seen.status_message.as_deref(), Some("disk 1 of 2"));
    assert_eq!(store.run_checkpoint(&run.id).unwrap(), None);
    store.save_run_checkpoint(&run.id, r#"{"disk":1}"#).unwrap();
    assert_eq!(
        store.run_checkpoint(&run.id).unwrap().as_deref(),
        Some(r#"{"disk":1}"#)
    );
    assert!(
        store
            .save_run_checkpoint(&RunId("sms-run-x".into()), "{}")
            .is_err()
    );
    assert_eq!(store.bytes_moved_total().unwrap(), 1 << 30);
}

fn lineage(job: &JobId, disk: &str, change: &str) -> DiskLineage {
    DiskLineage {
        job_id: job.clone(),
        disk_key: disk.into(),
        last_change_id: Some(change.into()),
        last_snapshot_id: Some(format!("snap-{change}")),
        last_manifest: Some("s3://b/m.json".into()),
        last_staged_image: None,
        last_run_id: None,
    }
}

#[test]
fn completing_a_run_writes_the_job_ami_and_lineage_together() {
    let mut store = store();
    let job = new_job(&mut store);
    let run = store
        .request_run(&job.id, RunType::Automatic, T0, None, T0)
        .unwrap();
    store.claim_run(&run.id, "w1", T0).unwrap();
    // Lineage of another job: refused, and nothing of the completion is written.
    let stranger = lineage(&JobId("sms-job-other".into()), "2000", "c1");
    let err = store
        .complete_run(&run.id, "ami-1", &[stranger], T0.plus_secs(60))
        .unwrap_err();
    assert_eq!(err.http_status(), 400);
    assert_eq!(store.run(&run.id).unwrap().unwrap().state, RunState::Active);
    assert_eq!(store.job(&job.id).unwrap().unwrap().latest_ami_id, None);
    assert!(store.lineage(&job.id).unwrap().is_empty());

    let disks = [
        lineage(&job.id, "2000", "c1"),
        lineage(&job.id, "2001", "c1"),
    ];
    let done = store
        .complete_run(&run.id, "ami-1", &disks, T0.plus_secs(60))
        .unwrap();
    assert_eq!(done.state, JobState::Active);
    assert_eq!(done.latest_ami_id.as_deref(), Some("ami-1"));
    assert_eq!(store.lineage(&job.id).unwrap(), disks);
    let finished = store.run(&run.id).unwrap().unwrap();
    assert_eq!(
        (finished.state, finished.stage, finished.progress_percent),
        (RunState::Completed, RunStage::Done, 100)
    );
    assert_eq!(store.run_durations_secs().unwrap(), vec![60.0]);

    // The next run's lineage replaces the first's whole: disk 2001, gone from the VM,
    // leaves no row behind that would make later runs look mixed.
    let next = store
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap();
    store.claim_run(&next.id, "w1", T0).unwrap();
    let newer = [lineage(&job.id, "2000", "c2")];
    store
        .complete_run(&next.id, "ami-2", &newer, T0.plus_secs(120))
        .unwrap();
    assert_eq!(store.lineage(&job.id).unwrap(), newer);
    assert_eq!(
        store.amis_of_job(&job.id).unwrap(),
        vec![
            (next.id.clone(), "ami-2".to_owned()),
            (run.id.clone(), "ami-1".to_owned())
        ]
    );
    // Completing twice is refused by the transition.
    let again = store.complete_run(&next.id, "ami-3", &[], T0).unwrap_err();
    assert_eq!(again.http_status(), 409);
}

/// Requests the job's due automatic run, claims it and fails it with `kind`.
fn fail_next(store: &mut Store, job: &JobId, kind: ErrorKind, now: Timestamp) -> Job {
    let scheduled = store
        .job(job)
        .unwrap()
        .unwrap()
        .next_replication_run_start_time
        .unwrap_or(now);
    let run = store
        .request_run(job, RunType::Automatic, scheduled, None, now)
        .unwrap();
    store.claim_run(&run.id, "w1", now).unwrap().unwrap();
    let job = store
        .fail_run(&run.id, kind, "connection reset", &policy(), now)
        .unwrap();
    let failed = store.run(&run.id).unwrap().unwrap();
    assert_eq!(failed.state, RunState::Failed);
    assert_eq!(
        failed.status_message.as_deref(),
        Some(&*format!("{kind}: connection reset"))
    );
    job
}

#[test]
fn failures_retry_then_pause_and_resume_starts_over() {
    let mut store = store();
    let job = new_job(&mut store);
    let first = fail_next(&mut store, &job.id, ErrorKind::Transient, T0);
    assert_eq!(first.state, JobState::Failing);
    assert_eq!(first.consecutive_failures, 1);
    assert_eq!(
        first.next_replication_run_start_time,
        Some(T0.plus_secs(60))
    );
    assert!(
        first
            .status_message
            .as_deref()
            .unwrap_or_default()
            .contains("connection reset")
    );
    let second = fail_next(&mut store, &job.id, ErrorKind::Throttled, T0.plus_secs(60));
    assert_eq!(
        (second.state, second.consecutive_failures),
        (JobState::Failing, 2)
    );
    let third = fail_next(&mut store, &job.id, ErrorKind::Transient, T0.plus_secs(180));
    assert_eq!(
        (third.state, third.consecutive_failures),
        (JobState::PausedOnFailure, 3)
    );
    assert_eq!(third.next_replication_run_start_time, None);
    let refused = store
        .request_run(&job.id, RunType::Automatic, T0, None, T0)
        .unwrap_err();
    assert_eq!(refused.code(), "OperationNotPermittedException");
    let resumed = store.resume_job(&job.id, T0.plus_secs(999)).unwrap();
    assert_eq!(
        (resumed.state, resumed.consecutive_failures),
        (JobState::Active, 0)
    );
    assert_eq!(
        resumed.next_replication_run_start_time,
        Some(T0.plus_secs(999))
    );
    let fatal = fail_next(
        &mut store,
        &job.id,
        ErrorKind::PermissionDenied,
        T0.plus_secs(999),
    );
    assert_eq!(fatal.state, JobState::Failed);
    assert_eq!(
        transitions(&store),
        vec![
            pair(None, "PENDING"),
            pair(Some("PENDING"), "ACTIVE"),
            pair(Some("ACTIVE"), "FAILING"),
            pair(Some("FAILING"), "PAUSED_ON_FAILURE"),
            pair(Some("PAUSED_ON_FAILURE"), "ACTIVE"),
            pair(Some("ACTIVE"), "FAILED"),
        ]
    );
    let events = store.undelivered_events(100).unwrap();
    let failing = &events[2].1;
    assert!(
        failing["replicationRunId"]
            .as_str()
            .unwrap_or_default()
            .starts_with("sms-run-")
    );
    assert!(
        failing["statusMessage"]
            .as_str()
            .unwrap_or_default()
            .contains("connection reset")
    );
}

#[test]
fn events_are_delivered_once() {
    let mut store = store();
    new_job(&mut store);
    let events = store.undelivered_events(10).unwrap();
    store.event_delivered(events[0].0).unwrap();
    assert!(store.undelivered_events(10).unwrap().is_empty());
}

#[test]
fn missed_slots_are_runs_and_move_the_schedule() {
    let mut store = store();
    let job = new_job(&mut store);
    let next = T0.plus_secs(12 * HOUR);
    let missed = store
        .miss_run(&job.id, T0, Some(next), "missed: connector stopped", next)
        .unwrap();
    assert_eq!(
        (missed.state, missed.run_type),
        (RunState::Missed, RunType::Automatic)
    );
    assert_eq!(missed.scheduled_start_time, T0);
    assert_eq!(
        missed.status_message.as_deref(),
        Some("missed: connector stopped")
    );
    let job = store.job(&job.id).unwrap().unwrap();
    assert_eq!(
        (job.state, job.next_replication_run_start_time),
        (JobState::Pending, Some(next))
    );
    assert_eq!(store.runs(&job.id).unwrap(), vec![missed]);
}

#[test]
fn deleting_drops_the_pending_run_and_deregisters_before_finishing() {
    let mut store = store();
    let job = new_job(&mut store);
    let run = store
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap();
    store.claim_run(&run.id, "w1", T0).unwrap();
    store.complete_run(&run.id, "ami-1", &[], T0).unwrap();
    let pending = store
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap();

    let deleting = store.delete_job(&job.id, false, T0).unwrap();
    assert_eq!(deleting.state, JobState::Deleting);
    assert_eq!(deleting.next_replication_run_start_time, None);
    assert_eq!(store.delete_keeps_amis(&job.id).unwrap(), Some(false));
    let dropped = store.run(&pending.id).unwrap().unwrap();
    assert_eq!(dropped.state, RunState::Missed);
    assert!(
        dropped
            .status_message
            .unwrap_or_default()
            .contains("deleted")
    );
    let refused = store
        .request_run(&job.id, RunType::OnDemand, T0, None, T0)
        .unwrap_err();
    assert_eq!(refused.http_status(), 409);
    assert_eq!(
        store
            .delete_job(&job.id, false, T0)
            .unwrap_err()
            .http_status(),
        409
    );

    let early = store.finish_delete(&job.id, T0).unwrap_err();
    assert!(early.to_string().contains("ami-1"), "{early}");
    store.mark_run_ami_deleting(&run.id, T0).unwrap();
    assert_eq!(
        store.run(&run.id).unwrap().unwrap().state,
        RunState::Deleting
    );
    store.mark_run_ami_deleted(&run.id, T0).unwrap();
    assert_eq!(
        store.run(&run.id).unwrap().unwrap().state,
        RunState::Deleted
    );
    assert!(store.amis_of_job(&job.id).unwrap().is_empty());
    let deleted = store.finish_delete(&job.id, T0).unwrap();
    assert_eq!(deleted.state, JobState::Deleted);
    assert!(store.jobs(false).unwrap().is_empty());
    assert_eq!(store.jobs(true).unwrap().len(), 1);
    assert!(store.resume_job(&job.id, T0).is_err());
    // The server may have a job again.
    let again = new_job(&mut store);
    assert_ne!(again.id, job.id);
    let states: Vec<_> = transitions(&store).into_iter().map(|(_, s)| s).collect();
    assert_eq!(
        states,
        ["PENDING", "ACTIVE", "DELETING", "DELETED", "PENDING"]
    );
}

#[test]
fn a_run_once_job_completes_and_is_counted_in_metrics() {
    let mut store = store();
    let once = JobSpec {
        frequency_hours: None,
        run_once: true,
        ..spec(web())
    };
    let job = store.create_job(&once, T0).unwrap();
    let run = store
        .request_run(&job.id, RunType::Automatic, T0, None, T0)
        .unwrap();
    assert_eq!(
        store
            .job(&job.id)
            .unwrap()
            .unwrap()
            .next_replication_run_start_time,
        None
    );
    store.claim_run(&run.id, "w1", T0).unwrap();
    let done = store
        .complete_run(&run.id, "ami-1", &[], T0.plus_secs(5))
        .unwrap();
    assert_eq!(done.state, JobState::Completed);
    let counts = store.run_counts_by_state().unwrap();
    assert_eq!(counts.len(), RunState::ALL.len());
    assert!(counts.contains(&(RunState::Completed, 1)));
    assert!(counts.contains(&(RunState::Pending, 0)));
}

#[test]
fn the_store_policy_sets_the_frequency_unit() {
    let mut store = store();
    store.set_policy(Policy {
        frequency_unit_secs: 1,
        ..policy()
    });
    let job = new_job(&mut store);
    store
        .request_run(&job.id, RunType::Automatic, T0, None, T0)
        .unwrap();
    let job = store.job(&job.id).unwrap().unwrap();
    assert_eq!(job.next_replication_run_start_time, Some(T0.plus_secs(12)));
}

#[test]
fn a_v1_database_gets_server_ids_and_a_connector_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0].sql).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        for (vm_id, name) in [("u1", "web"), ("u2", "db")] {
            let info = serde_json::to_string(&vm(vm_id, name, false)).unwrap();
            conn.execute(
                "INSERT INTO servers (source, vm_id, name, path, source_ref, power_state, guest_os,
                    cpus, memory_mib, firmware, change_tracking, info, catalogued_at)
                 VALUES ('vc1', ?1, ?2, '/p', 'vm-1', 'powered_on', 'Linux', 1, 512, 'bios', 0, ?3,
                    '2027-01-01T00:00:00Z')",
                rusqlite::params![vm_id, name, info],
            )
            .unwrap();
        }
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
    let stored: Vec<Option<String>> = store
        .conn
        .prepare("SELECT server_id FROM servers ORDER BY vm_id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert_eq!(
        stored,
        vec![
            Some(ids::server_id("vc1", "u1").0),
            Some(ids::server_id("vc1", "u2").0)
        ]
    );
    assert!(store.server(&web()).unwrap().is_some());
    let id = store.connector_id().unwrap();
    assert!(id.starts_with("c-") && id.len() == 19, "{id}");
    drop(store);
    assert_eq!(Store::open(&path).unwrap().connector_id().unwrap(), id);
}

#[test]
fn the_shared_store_reports_a_poisoned_lock() {
    let shared = SharedStore::new(store());
    assert_eq!(shared.with(|s| Ok(s.servers(None)?.len())).unwrap(), 2);
    let clone = shared.clone();
    let _ = std::thread::spawn(move || {
        clone.with(|_| -> anyhow::Result<()> { panic!("worker died holding the store") })
    })
    .join();
    let err = shared.with(|s| s.connector_id()).unwrap_err();
    assert!(err.to_string().contains("poisoned"), "{err}");
}

#[test]
fn a_store_error_maps_to_500() {
    let err: JobError = rusqlite::Error::QueryReturnedNoRows.into();
    assert_eq!((err.http_status(), err.code()), (500, "InternalError"));
}
