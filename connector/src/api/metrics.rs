//! `GET /metrics`: Prometheus text format 0.0.4, computed from the store at each scrape,
//! so counters survive restarts and two connectors' numbers never disagree with the
//! store's.

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::jobs::model::{JobState, RunState};
use crate::store::Store;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the run-duration histogram, in seconds: runs take from about a minute
/// (a small incremental) to a day (a first full copy of a large VM; longer than the
/// longest schedule interval is a problem worth seeing in its own bucket).
pub const DURATION_BUCKETS_SECS: [f64; 10] = [
    60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0,
];

/// Every run state, so each is reported (as 0 when no run is in it): a series that
/// disappears reads to Prometheus as "no data", not "zero".
pub const RUN_STATES: [RunState; 7] = [
    RunState::Pending,
    RunState::Missed,
    RunState::Active,
    RunState::Failed,
    RunState::Completed,
    RunState::Deleting,
    RunState::Deleted,
];

/// Every job state, for the same reason.
pub const JOB_STATES: [JobState; 8] = [
    JobState::Pending,
    JobState::Active,
    JobState::Failing,
    JobState::Failed,
    JobState::PausedOnFailure,
    JobState::Completed,
    JobState::Deleting,
    JobState::Deleted,
];

// A new state must be added to the lists above: this stops compiling until it is.
#[allow(dead_code)]
fn every_state_is_listed(run: RunState, job: JobState) {
    match run {
        RunState::Pending
        | RunState::Missed
        | RunState::Active
        | RunState::Failed
        | RunState::Completed
        | RunState::Deleting
        | RunState::Deleted => {}
    }
    match job {
        JobState::Pending
        | JobState::Active
        | JobState::Failing
        | JobState::Failed
        | JobState::PausedOnFailure
        | JobState::Completed
        | JobState::Deleting
        | JobState::Deleted => {}
    }
}

/// What a scrape reports, read from the store.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    pub runs_by_state: Vec<(RunState, u64)>,
    pub jobs_by_state: Vec<(JobState, u64)>,
    pub bytes_moved_total: u64,
    /// Durations of finished runs.
    pub run_durations_secs: Vec<f64>,
}

impl MetricsSnapshot {
    /// Reads the figures from `store`.
    pub fn collect(store: &Store) -> anyhow::Result<MetricsSnapshot> {
        let mut jobs: HashMap<JobState, u64> = HashMap::new();
        for job in store.jobs(true)? {
            *jobs.entry(job.state).or_default() += 1;
        }
        Ok(MetricsSnapshot {
            runs_by_state: store.run_counts_by_state()?,
            jobs_by_state: jobs.into_iter().collect(),
            bytes_moved_total: store.bytes_moved_total()?,
            run_durations_secs: store.run_durations_secs()?,
        })
    }
}

/// The snapshot in the text format.
pub fn render(snapshot: &MetricsSnapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail; the results are ignored for that reason.
    let _ = writeln!(
        out,
        "# HELP rehost_replication_runs Replication runs by state."
    );
    let _ = writeln!(out, "# TYPE rehost_replication_runs gauge");
    for state in RUN_STATES {
        let count = count_of(&snapshot.runs_by_state, state);
        let _ = writeln!(
            out,
            "rehost_replication_runs{{state=\"{}\"}} {count}",
            super::responses::serde_name(&state)
        );
    }
    let _ = writeln!(
        out,
        "# HELP rehost_replication_jobs Replication jobs by state."
    );
    let _ = writeln!(out, "# TYPE rehost_replication_jobs gauge");
    for state in JOB_STATES {
        let count = count_of(&snapshot.jobs_by_state, state);
        let _ = writeln!(
            out,
            "rehost_replication_jobs{{state=\"{}\"}} {count}",
            super::responses::serde_name(&state)
        );
    }
    let _ = writeln!(
        out,
        "# HELP rehost_bytes_moved_total Bytes read from sources and written to EBS by all runs."
    );
    let _ = writeln!(out, "# TYPE rehost_bytes_moved_total counter");
    let _ = writeln!(
        out,
        "rehost_bytes_moved_total {}",
        snapshot.bytes_moved_total
    );
    let _ = writeln!(
        out,
        "# HELP rehost_replication_run_duration_seconds How long finished replication runs took."
    );
    let _ = writeln!(
        out,
        "# TYPE rehost_replication_run_duration_seconds histogram"
    );
    let durations = &snapshot.run_durations_secs;
    for bound in DURATION_BUCKETS_SECS {
        let within = durations.iter().filter(|d| **d <= bound).count();
        let _ = writeln!(
            out,
            "rehost_replication_run_duration_seconds_bucket{{le=\"{bound}\"}} {within}"
        );
    }
    let _ = writeln!(
        out,
        "rehost_replication_run_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        durations.len()
    );
    let _ = writeln!(
        out,
        "rehost_replication_run_duration_seconds_sum {}",
        durations.iter().sum::<f64>()
    );
    let _ = writeln!(
        out,
        "rehost_replication_run_duration_seconds_count {}",
        durations.len()
    );
    out
}

fn count_of<S: PartialEq>(counts: &[(S, u64)], state: S) -> u64 {
    counts
        .iter()
        .filter(|(s, _)| *s == state)
        .map(|(_, n)| n)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_the_text_format() {
        let text = render(&MetricsSnapshot {
            runs_by_state: vec![(RunState::Completed, 3), (RunState::Failed, 1)],
            jobs_by_state: vec![(JobState::Active, 2)],
            bytes_moved_total: 12_345,
            run_durations_secs: vec![30.0, 600.0, 90_000.0],
        });
        for line in [
            "# TYPE rehost_replication_runs gauge",
            "rehost_replication_runs{state=\"COMPLETED\"} 3",
            "rehost_replication_runs{state=\"FAILED\"} 1",
            "rehost_replication_runs{state=\"PENDING\"} 0",
            "rehost_replication_jobs{state=\"ACTIVE\"} 2",
            "rehost_replication_jobs{state=\"PAUSED_ON_FAILURE\"} 0",
            "# TYPE rehost_bytes_moved_total counter",
            "rehost_bytes_moved_total 12345",
            "# TYPE rehost_replication_run_duration_seconds histogram",
            "rehost_replication_run_duration_seconds_bucket{le=\"60\"} 1",
            "rehost_replication_run_duration_seconds_bucket{le=\"900\"} 2",
            "rehost_replication_run_duration_seconds_bucket{le=\"86400\"} 2",
            "rehost_replication_run_duration_seconds_bucket{le=\"+Inf\"} 3",
            "rehost_replication_run_duration_seconds_sum 90630",
            "rehost_replication_run_duration_seconds_count 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name{labels} number`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let text = render(&MetricsSnapshot {
            run_durations_secs: vec![1.0, 61.0, 301.0, 86_401.0],
            ..MetricsSnapshot::default()
        });
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with("rehost_replication_run_duration_seconds_bucket"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(counts.len(), DURATION_BUCKETS_SECS.len() + 1);
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts[0], 1);
        assert_eq!(*counts.last().unwrap(), 4);
    }
}
