//! Schedule planning for the scheduler loop: given a job, whether it has an open run and
//! the time, what to do now. Pure, so every case is tested without a clock.
//!
//! A job's slots are its next run time and every `frequency` after it. The slot at `T`
//! may start until the next slot, `T + frequency`; a slot whose window passed (the
//! connector was down, or the job's previous run was still going) is one MISSED run.
//! After a long outage only the newest [`MAX_MISSED_RECORDED`] missed slots are recorded,
//! and the newest slot still in its window starts. A run-once job has one slot, which
//! never expires: it starts as soon as it can.

use super::model::{Job, Timestamp};

/// Missed slots recorded after one outage: a day of hourly slots. Beyond that, one MISSED
/// run per slot only buries the runs that matter; the message says how many there were.
pub const MAX_MISSED_RECORDED: usize = 24;

/// What the scheduler should do for a job now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing yet (not due, not scheduled, or its run is still going).
    Wait,
    /// Request an automatic run for the slot at `scheduled`.
    Start { scheduled: Timestamp },
    /// Record these slots (oldest first) as MISSED runs and move the job's next slot to
    /// `next`; then plan again (the slot at `next` may start now).
    Miss {
        scheduled: Vec<Timestamp>,
        /// How many slots were missed in all (more than `scheduled.len()` after a long outage).
        missed_total: u64,
        next: Timestamp,
        /// The status message of each missed run.
        message: String,
    },
}

/// Plans job `job` at `now`; `has_open_run` is whether it has a PENDING or ACTIVE run;
/// `frequency_unit_secs` is seconds per unit of `frequency_hours` (3600, or 1 in tests).
pub fn plan(job: &Job, has_open_run: bool, now: Timestamp, frequency_unit_secs: i64) -> Plan {
    if !job.state.is_scheduled() {
        return Plan::Wait;
    }
    let Some(due) = job.next_replication_run_start_time else {
        return Plan::Wait;
    };
    if now < due {
        return Plan::Wait;
    }
    let interval_secs = match job.frequency_hours {
        Some(hours) if !job.run_once && hours > 0 => {
            i64::from(hours).saturating_mul(frequency_unit_secs.max(1))
        }
        // One slot, never expiring.
        _ => {
            return if has_open_run {
                Plan::Wait
            } else {
                Plan::Start { scheduled: due }
            };
        }
    };
    // Slots due, due+i, … whose window [T, T+i) ended by now.
    let passed = (now.0 - due.0) / interval_secs;
    if passed == 0 {
        return if has_open_run {
            Plan::Wait
        } else {
            Plan::Start { scheduled: due }
        };
    }
    let missed_total = passed.unsigned_abs();
    let recorded = passed.min(i64::try_from(MAX_MISSED_RECORDED).unwrap_or(i64::MAX));
    let scheduled = (passed - recorded..passed)
        .map(|k| due.plus_secs(k.saturating_mul(interval_secs)))
        .collect();
    let why = if has_open_run {
        "the job's previous run was still going when the slot's window ended"
    } else {
        "no run started before the next slot (was the connector stopped?)"
    };
    let message = if passed > recorded {
        format!(
            "missed: {why}; {missed_total} slots in a row were missed, the newest {recorded} are recorded"
        )
    } else {
        format!("missed: {why}")
    };
    Plan::Miss {
        scheduled,
        missed_total,
        next: due.plus_secs(passed.saturating_mul(interval_secs)),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{JobId, JobState, LicenseType, ServerId};
    use proptest::prelude::*;

    const SEED: Timestamp = Timestamp(1_800_000_000);
    const HOUR: i64 = 3600;

    fn job(state: JobState, next: Option<Timestamp>, frequency_hours: Option<u32>) -> Job {
        Job {
            id: JobId("sms-job-0123456789abcdef0".into()),
            server_id: ServerId("s-0123456789abcdef0".into()),
            source: "vc1".into(),
            vm_id: "vm-1".into(),
            vm_name: "web".into(),
            seed_replication_time: SEED,
            frequency_hours,
            run_once: frequency_hours.is_none(),
            license_type: LicenseType::Aws,
            number_of_recent_amis_to_keep: 0,
            encrypted: false,
            kms_key_id: None,
            description: None,
            state,
            status_message: None,
            next_replication_run_start_time: next,
            consecutive_failures: 0,
            latest_ami_id: None,
            created_at: SEED,
        }
    }

    #[test]
    fn the_first_run_starts_at_the_seed_time() {
        let j = job(JobState::Pending, Some(SEED), Some(12));
        assert_eq!(plan(&j, false, SEED.plus_secs(-1), HOUR), Plan::Wait);
        assert_eq!(plan(&j, false, SEED, HOUR), Plan::Start { scheduled: SEED });
        // Late but within the slot's window: still that slot.
        assert_eq!(
            plan(&j, false, SEED.plus_secs(12 * HOUR - 1), HOUR),
            Plan::Start { scheduled: SEED }
        );
    }

    #[test]
    fn regular_slots_follow_the_frequency() {
        let next = SEED.plus_secs(12 * HOUR);
        let j = job(JobState::Active, Some(next), Some(12));
        assert_eq!(plan(&j, false, next.plus_secs(-1), HOUR), Plan::Wait);
        assert_eq!(plan(&j, false, next, HOUR), Plan::Start { scheduled: next });
    }

    #[test]
    fn a_slot_due_during_a_run_waits_then_is_missed() {
        let due = SEED.plus_secs(HOUR);
        let j = job(JobState::Active, Some(due), Some(1));
        assert_eq!(plan(&j, true, due.plus_secs(HOUR - 1), HOUR), Plan::Wait);
        let Plan::Miss {
            scheduled,
            missed_total,
            next,
            message,
        } = plan(&j, true, due.plus_secs(HOUR), HOUR)
        else {
            panic!("expected a miss")
        };
        assert_eq!((scheduled, missed_total), (vec![due], 1));
        assert_eq!(next, due.plus_secs(HOUR));
        assert!(
            message.contains("previous run was still going"),
            "{message}"
        );
        // The moved slot waits for the run too.
        let moved = job(JobState::Active, Some(next), Some(1));
        assert_eq!(plan(&moved, true, next, HOUR), Plan::Wait);
        assert_eq!(
            plan(&moved, false, next, HOUR),
            Plan::Start { scheduled: next }
        );
    }

    #[test]
    fn a_long_outage_records_at_most_24_missed_slots_and_starts_the_newest() {
        let j = job(JobState::Active, Some(SEED), Some(1));
        let now = SEED.plus_secs(100 * HOUR + 5);
        let Plan::Miss {
            scheduled,
            missed_total,
            next,
            message,
        } = plan(&j, false, now, HOUR)
        else {
            panic!("expected a miss")
        };
        assert_eq!(missed_total, 100);
        assert_eq!(scheduled.len(), MAX_MISSED_RECORDED);
        assert_eq!(scheduled[0], SEED.plus_secs(76 * HOUR));
        assert_eq!(scheduled[23], SEED.plus_secs(99 * HOUR));
        assert_eq!(next, SEED.plus_secs(100 * HOUR));
        assert!(
            message.contains("100 slots") && message.contains("newest 24"),
            "{message}"
        );
        let after = job(JobState::Active, Some(next), Some(1));
        assert_eq!(
            plan(&after, false, now, HOUR),
            Plan::Start { scheduled: next }
        );
    }

    #[test]
    fn a_run_once_job_has_one_slot_that_never_expires() {
        let j = job(JobState::Pending, Some(SEED), None);
        let much_later = SEED.plus_secs(1000 * HOUR);
        assert_eq!(
            plan(&j, false, much_later, HOUR),
            Plan::Start { scheduled: SEED }
        );
        assert_eq!(plan(&j, true, much_later, HOUR), Plan::Wait);
        let done = job(JobState::Completed, None, None);
        assert_eq!(plan(&done, false, much_later, HOUR), Plan::Wait);
    }

    #[test]
    fn the_test_unit_counts_seconds() {
        let j = job(JobState::Active, Some(SEED), Some(5));
        assert_eq!(
            plan(&j, false, SEED.plus_secs(4), 1),
            Plan::Start { scheduled: SEED }
        );
        let Plan::Miss { next, .. } = plan(&j, false, SEED.plus_secs(11), 1) else {
            panic!("expected a miss")
        };
        assert_eq!(next, SEED.plus_secs(10));
    }

    #[test]
    fn only_pending_active_and_failing_jobs_are_scheduled() {
        for state in JobState::ALL {
            let j = job(state, Some(SEED), Some(1));
            let planned = plan(&j, false, SEED, HOUR);
            assert_eq!(planned != Plan::Wait, state.is_scheduled(), "{state}");
        }
    }

    proptest! {
        #[test]
        fn a_miss_leaves_the_next_slot_in_its_window(
            hours in 1u32..=24, late_secs in 0i64..(400 * HOUR), open in any::<bool>(),
        ) {
            let j = job(JobState::Active, Some(SEED), Some(hours));
            let now = SEED.plus_secs(late_secs);
            let interval = i64::from(hours) * HOUR;
            match plan(&j, open, now, HOUR) {
                Plan::Wait => prop_assert!(open && late_secs < interval),
                Plan::Start { scheduled } => {
                    prop_assert!(!open);
                    prop_assert!(scheduled <= now && now.0 < scheduled.0 + interval);
                }
                Plan::Miss { scheduled, missed_total, next, .. } => {
                    prop_assert!(next <= now && now.0 < next.0 + interval);
                    prop_assert!(scheduled.len() <= MAX_MISSED_RECORDED);
                    prop_assert_eq!(missed_total, ((next.0 - SEED.0) / interval).unsigned_abs());
                    prop_assert!(scheduled.windows(2).all(|w| w[1].0 - w[0].0 == interval));
                    prop_assert_eq!(scheduled.last().map(|t| t.0 + interval), Some(next.0));
                }
            }
        }
    }
}
