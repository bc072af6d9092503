use super::*;
use proptest::prelude::*;

const T0: Timestamp = Timestamp(1_800_000_000);
const HOUR: i64 = 3600;

fn policy() -> Policy {
    Policy {
        max_consecutive_failures: 3,
        retry_backoff_secs: 60,
        frequency_unit_secs: HOUR,
    }
}

fn status(state: JobState) -> JobStatus {
    JobStatus {
        state,
        consecutive_failures: 0,
        next_replication_run_start_time: Some(T0.plus_secs(12 * HOUR)),
        run_once: false,
        frequency_hours: Some(12),
    }
}

fn failed(kind: ErrorKind) -> Event {
    Event::RunFailed {
        kind,
        message: "boom".to_owned(),
    }
}

/// One letter per job state, in [`JobState::ALL`]'s order.
fn letter(state: JobState) -> char {
    match state {
        JobState::Pending => 'P',
        JobState::Active => 'A',
        JobState::Failing => 'G',
        JobState::Failed => 'F',
        JobState::PausedOnFailure => 'U',
        JobState::Completed => 'C',
        JobState::Deleting => 'D',
        JobState::Deleted => 'X',
    }
}

#[test]
fn every_event_from_every_state_is_allowed_or_refused_by_name() {
    let auto = Event::RunRequested {
        run_type: RunType::Automatic,
        scheduled: T0,
    };
    let on_demand = Event::RunRequested {
        run_type: RunType::OnDemand,
        scheduled: T0,
    };
    // Columns: PENDING ACTIVE FAILING FAILED PAUSED COMPLETED DELETING DELETED. A letter is
    // the job's state after the event; `-` refused as not permitted, `c` as a run already open.
    let table: Vec<(Event, Option<RunState>, &str)> = vec![
        (auto.clone(), None, "PAG-----"),
        (on_demand.clone(), Some(RunState::Completed), "PAG-----"),
        (on_demand.clone(), Some(RunState::Active), "ccc-----"),
        (auto.clone(), Some(RunState::Pending), "ccc-----"),
        (Event::RunStarted, Some(RunState::Pending), "AAG-----"),
        (Event::RunStarted, Some(RunState::Active), "--------"),
        (Event::RunMissed { next: None }, None, "PAG-----"),
        (
            Event::RunMissed { next: None },
            Some(RunState::Pending),
            "PAG---D-",
        ),
        (
            Event::RunMissed { next: None },
            Some(RunState::Active),
            "--------",
        ),
        (
            Event::RunCompleted {
                ami_id: "ami-1".into(),
            },
            Some(RunState::Active),
            "AAA---D-",
        ),
        (
            Event::RunCompleted {
                ami_id: "ami-1".into(),
            },
            Some(RunState::Pending),
            "--------",
        ),
        (
            failed(ErrorKind::Transient),
            Some(RunState::Active),
            "GGG---D-",
        ),
        (
            failed(ErrorKind::Throttled),
            Some(RunState::Pending),
            "GGG---D-",
        ),
        (
            failed(ErrorKind::PermissionDenied),
            Some(RunState::Active),
            "FFF---D-",
        ),
        (
            failed(ErrorKind::Transient),
            Some(RunState::Completed),
            "--------",
        ),
        (Event::Resumed, None, "---AA---"),
        (
            Event::Updated {
                next_replication_run_start_time: Some(T0),
                frequency_hours: Some(2),
            },
            None,
            "PAGFUC--",
        ),
        (
            Event::DeleteRequested { keep_amis: false },
            None,
            "DDDDDD--",
        ),
        (Event::DeleteFinished, None, "------X-"),
        (Event::DeleteFinished, Some(RunState::Active), "--------"),
        (
            Event::AmiDeregistering,
            Some(RunState::Completed),
            "PAGFUCD-",
        ),
        (Event::AmiDeregistering, Some(RunState::Failed), "--------"),
        (Event::AmiDeregistered, Some(RunState::Deleting), "PAGFUCD-"),
    ];
    for (event, run, expected) in table {
        let got: String = JobState::ALL
            .iter()
            .map(
                |&state| match apply(&status(state), run, &event, &policy(), T0) {
                    Ok(outcome) => letter(outcome.job.state),
                    Err(err) => {
                        let text = err.to_string();
                        assert!(
                            text.contains(state.as_str()) && text.contains(event.name()),
                            "{text}"
                        );
                        match err.kind {
                            TransitionErrorKind::RunAlreadyOpen => 'c',
                            TransitionErrorKind::NotPermitted => '-',
                        }
                    }
                },
            )
            .collect();
        assert_eq!(got, expected, "{event:?} with run {run:?}");
    }
}

#[test]
fn errors_read_well() {
    let err = apply(
        &status(JobState::PausedOnFailure),
        None,
        &Event::RunRequested {
            run_type: RunType::Automatic,
            scheduled: T0,
        },
        &policy(),
        T0,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "an automatic run is not allowed for a job in state PAUSED_ON_FAILURE: it takes no runs until it is resumed"
    );
    let err = apply(
        &status(JobState::Active),
        Some(RunState::Active),
        &Event::RunRequested {
            run_type: RunType::OnDemand,
            scheduled: T0,
        },
        &policy(),
        T0,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "an on-demand run is not allowed for a job in state ACTIVE (run ACTIVE): the job already has a ACTIVE run; a job runs one at a time"
    );
}

#[test]
fn an_automatic_run_moves_the_next_slot_and_an_on_demand_one_does_not() {
    let job = status(JobState::Active);
    let slot = T0.plus_secs(12 * HOUR);
    let auto = apply(
        &job,
        None,
        &Event::RunRequested {
            run_type: RunType::Automatic,
            scheduled: slot,
        },
        &policy(),
        slot,
    )
    .unwrap();
    assert_eq!(auto.run, Some(RunState::Pending));
    assert_eq!(
        auto.job.next_replication_run_start_time,
        Some(slot.plus_secs(12 * HOUR))
    );
    let on_demand = apply(
        &job,
        None,
        &Event::RunRequested {
            run_type: RunType::OnDemand,
            scheduled: T0,
        },
        &policy(),
        T0,
    )
    .unwrap();
    assert_eq!(on_demand.job, job);
}

#[test]
fn a_run_once_job_completes_with_its_run() {
    let mut job = JobStatus::new(T0, true, None);
    let p = policy();
    let requested = Event::RunRequested {
        run_type: RunType::Automatic,
        scheduled: T0,
    };
    job = apply(&job, None, &requested, &p, T0).unwrap().job;
    assert_eq!(job.next_replication_run_start_time, None);
    job = apply(&job, Some(RunState::Pending), &Event::RunStarted, &p, T0)
        .unwrap()
        .job;
    assert_eq!(job.state, JobState::Active);
    let done = apply(
        &job,
        Some(RunState::Active),
        &Event::RunCompleted {
            ami_id: "ami-9".into(),
        },
        &p,
        T0,
    )
    .unwrap();
    assert_eq!(done.job.state, JobState::Completed);
    assert_eq!(done.run, Some(RunState::Completed));
    assert!(done.status_message.unwrap().contains("ami-9"));
}

/// The job's due automatic run is requested, starts and ends with `end` at `now`.
fn run_due(job: &JobStatus, end: &Event, now: Timestamp) -> Outcome {
    let p = policy();
    let scheduled = job.next_replication_run_start_time.unwrap_or(now);
    let requested = Event::RunRequested {
        run_type: RunType::Automatic,
        scheduled,
    };
    let job = apply(job, None, &requested, &p, now).unwrap().job;
    let job = apply(&job, Some(RunState::Pending), &Event::RunStarted, &p, now)
        .unwrap()
        .job;
    apply(&job, Some(RunState::Active), end, &p, now).unwrap()
}

#[test]
fn failures_back_off_then_pause_and_a_success_resets_the_count() {
    let fail = failed(ErrorKind::Transient);
    let t1 = T0.plus_secs(12 * HOUR);
    let first = run_due(&status(JobState::Active), &fail, t1);
    assert_eq!(first.job.state, JobState::Failing);
    assert_eq!(first.job.consecutive_failures, 1);
    assert_eq!(
        first.job.next_replication_run_start_time,
        Some(t1.plus_secs(60))
    );
    let t2 = t1.plus_secs(60);
    let second = run_due(&first.job, &fail, t2);
    assert_eq!(second.job.state, JobState::Failing);
    assert_eq!(
        second.job.next_replication_run_start_time,
        Some(t2.plus_secs(120))
    );
    let third = run_due(&second.job, &fail, t2.plus_secs(120));
    assert_eq!(third.job.state, JobState::PausedOnFailure);
    assert_eq!(third.job.consecutive_failures, 3);
    assert_eq!(third.job.next_replication_run_start_time, None);
    assert!(third.status_message.unwrap().contains("resume"));

    let ok = run_due(
        &second.job,
        &Event::RunCompleted {
            ami_id: "ami-1".into(),
        },
        t2.plus_secs(120),
    );
    assert_eq!(
        (ok.job.state, ok.job.consecutive_failures),
        (JobState::Active, 0)
    );
}

#[test]
fn a_retry_is_never_later_than_the_regular_slot() {
    // A second failure in a row with a 3 h base waits 6 h (the cap).
    let p = Policy {
        max_consecutive_failures: 10,
        retry_backoff_secs: 3 * 3600,
        ..policy()
    };
    let mut job = status(JobState::Failing);
    job.consecutive_failures = 1;
    job.next_replication_run_start_time = Some(T0.plus_secs(12 * HOUR));
    let far = apply(
        &job,
        Some(RunState::Active),
        &failed(ErrorKind::Throttled),
        &p,
        T0,
    )
    .unwrap();
    assert_eq!(
        far.job.next_replication_run_start_time,
        Some(T0.plus_secs(6 * HOUR))
    );
    job.next_replication_run_start_time = Some(T0.plus_secs(HOUR));
    let near = apply(
        &job,
        Some(RunState::Active),
        &failed(ErrorKind::Throttled),
        &p,
        T0,
    )
    .unwrap();
    assert_eq!(
        near.job.next_replication_run_start_time,
        Some(T0.plus_secs(HOUR))
    );
}

#[test]
fn the_retry_delay_doubles_up_to_its_cap() {
    let p = policy();
    assert_eq!(p.retry_delay_secs(1), 60);
    assert_eq!(p.retry_delay_secs(2), 120);
    assert_eq!(p.retry_delay_secs(4), 480);
    assert_eq!(p.retry_delay_secs(30), MAX_RETRY_BACKOFF_SECS);
    assert_eq!(p.retry_delay_secs(u32::MAX), MAX_RETRY_BACKOFF_SECS);
}

#[test]
fn resuming_runs_now_with_a_clean_count() {
    let mut job = status(JobState::PausedOnFailure);
    job.consecutive_failures = 3;
    job.next_replication_run_start_time = None;
    let later = T0.plus_secs(999);
    let resumed = apply(&job, None, &Event::Resumed, &policy(), later).unwrap();
    assert_eq!(resumed.job.state, JobState::Active);
    assert_eq!(resumed.job.consecutive_failures, 0);
    assert_eq!(resumed.job.next_replication_run_start_time, Some(later));
}

#[test]
fn a_run_ending_while_the_job_is_deleted_leaves_the_job_deleting() {
    let job = status(JobState::Deleting);
    let out = apply(
        &job,
        Some(RunState::Active),
        &failed(ErrorKind::Cancelled),
        &policy(),
        T0,
    )
    .unwrap();
    assert_eq!(out.job, job);
    assert_eq!(out.run, Some(RunState::Failed));
}

#[test]
fn the_policy_follows_the_config() {
    let config = SchedulerConfig {
        max_consecutive_failures: 5,
        retry_backoff_secs: 7,
        test_frequency_unit_secs: true,
        ..SchedulerConfig::default()
    };
    let p = Policy::from_config(&config);
    assert_eq!(p.max_consecutive_failures, 5);
    assert_eq!(p.retry_backoff_secs, 7);
    assert_eq!(p.interval_secs(Some(4)), Some(4));
    assert_eq!(Policy::default().interval_secs(Some(2)), Some(2 * HOUR));
}

/// Event number `choice` (failures of the kind `kind_choice` picks), for random sequences.
fn event_of(choice: u8, kind_choice: u8) -> Event {
    const KINDS: [ErrorKind; 4] = [
        ErrorKind::Transient,
        ErrorKind::Throttled,
        ErrorKind::InvalidInput,
        ErrorKind::NotFound,
    ];
    match choice % 11 {
        0 => Event::RunRequested {
            run_type: RunType::Automatic,
            scheduled: T0,
        },
        1 => Event::RunRequested {
            run_type: RunType::OnDemand,
            scheduled: T0,
        },
        2 => Event::RunStarted,
        3 => Event::RunMissed { next: None },
        4 => Event::RunCompleted {
            ami_id: "ami-1".into(),
        },
        5 | 6 => failed(KINDS[usize::from(kind_choice) % KINDS.len()]),
        7 => Event::Resumed,
        8 => Event::Updated {
            next_replication_run_start_time: None,
            frequency_hours: Some(1),
        },
        9 => Event::DeleteRequested { keep_amis: true },
        _ => Event::DeleteFinished,
    }
}

proptest! {
    #[test]
    fn invariants_hold_over_any_sequence_of_events(
        steps in prop::collection::vec((any::<u8>(), any::<u8>()), 1..80),
        max in 1u32..5,
        run_once in any::<bool>(),
    ) {
        let p = Policy { max_consecutive_failures: max, ..policy() };
        let mut job = JobStatus::new(T0, run_once, (!run_once).then_some(6));
        let mut run: Option<RunState> = None;
        for (i, (choice, kind)) in steps.into_iter().enumerate() {
            let now = T0.plus_secs(i64::try_from(i).unwrap_or(0) * 60);
            let event = event_of(choice, kind);
            let before = job.clone();
            let result = apply(&job, run, &event, &p, now);
            if before.state == JobState::Deleted {
                prop_assert!(result.is_err(), "something left DELETED: {event:?}");
            }
            if !before.state.is_scheduled()
                && matches!(event, Event::RunRequested { .. })
            {
                prop_assert!(result.is_err(), "{:?} got a run", before.state);
            }
            if let Ok(outcome) = result {
                job = outcome.job;
                if outcome.run.is_some() {
                    run = outcome.run;
                }
            }
            prop_assert!(job.consecutive_failures <= max);
            if job.consecutive_failures == max {
                prop_assert!(
                    matches!(job.state, JobState::PausedOnFailure | JobState::Deleting | JobState::Deleted),
                    "{} failures without pausing: {:?}", max, job.state
                );
            }
            if job.state == JobState::Completed {
                prop_assert!(run_once);
            }
        }
    }
}
