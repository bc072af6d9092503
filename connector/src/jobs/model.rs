//! What replication jobs and runs are, with the names and states of AWS SMS, so that a
//! user (or a script) that knew SMS finds the same fields here.
//!
//! Times are whole seconds since the Unix epoch ([`Timestamp`]), shown and parsed as RFC 3339
//! UTC (`2026-12-07T15:00:00Z`).

use serde::{Deserialize, Serialize};

/// A point in time, whole seconds since the Unix epoch, UTC; RFC 3339 in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Now, from the system clock.
    pub fn now() -> Timestamp {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Timestamp(secs)
    }

    /// `2026-12-07T15:00:00Z`.
    pub fn to_rfc3339(self) -> String {
        use aws_smithy_types::date_time::{DateTime, Format};
        DateTime::from_secs(self.0)
            .fmt(Format::DateTime)
            .unwrap_or_else(|_| self.0.to_string())
    }

    /// Parses RFC 3339 (`2026-12-07T15:00:00Z`, an offset, fractions of a second dropped).
    pub fn parse(text: &str) -> Result<Timestamp, String> {
        use aws_smithy_types::date_time::{DateTime, Format};
        DateTime::from_str(text.trim(), Format::DateTime)
            .map(|t| Timestamp(t.secs()))
            .map_err(|e| {
                format!("{text:?} is not an RFC 3339 time such as 2026-12-07T15:00:00Z: {e}")
            })
    }

    /// This time plus `secs` seconds (saturating).
    pub fn plus_secs(self, secs: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(secs))
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let text = String::deserialize(d)?;
        Timestamp::parse(&text).map_err(serde::de::Error::custom)
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// What every id of this kind starts with.
            pub const PREFIX: &'static str = $prefix;
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A catalogued server: `s-` and 17 hex digits of SHA-256(`source/vm_id`), stable
    /// across catalog imports (the VM id is the source's stable id).
    ServerId,
    "s-"
);
id_type!(
    /// A replication job: `sms-job-` and 17 random hex digits.
    JobId,
    "sms-job-"
);
id_type!(
    /// A replication run: `sms-run-` and 17 random hex digits.
    RunId,
    "sms-run-"
);

/// SMS's `ReplicationJobState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Created; its first run has not started.
    Pending,
    /// Running or waiting for its next run; the last run did not fail.
    Active,
    /// The last run failed and the job will try again.
    Failing,
    /// Stopped for good on an error that retrying cannot fix (it can be resumed by the user).
    Failed,
    /// Stopped after too many consecutive failed runs; resumed by the user.
    PausedOnFailure,
    /// A run-once job whose run completed.
    Completed,
    /// Being deleted (its runs are stopped, optionally its AMIs deregistered).
    Deleting,
    /// Deleted; kept for the record.
    Deleted,
}

/// SMS's `ReplicationRunState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    /// Due (or asked for) and waiting for a slot.
    Pending,
    /// Could not start within its window (the connector was down, or the job's previous
    /// run was still going); never ran.
    Missed,
    /// Running.
    Active,
    /// Ended in an error; `status_message` says which.
    Failed,
    /// Ended with an AMI.
    Completed,
    /// Its AMI is being deregistered (the job is deleted without keeping AMIs).
    Deleting,
    /// Its AMI was deregistered.
    Deleted,
}

impl JobState {
    /// The SMS name (`PAUSED_ON_FAILURE`), as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Active => "ACTIVE",
            JobState::Failing => "FAILING",
            JobState::Failed => "FAILED",
            JobState::PausedOnFailure => "PAUSED_ON_FAILURE",
            JobState::Completed => "COMPLETED",
            JobState::Deleting => "DELETING",
            JobState::Deleted => "DELETED",
        }
    }

    /// Whether the schedule starts runs of a job in this state.
    pub fn is_scheduled(self) -> bool {
        matches!(
            self,
            JobState::Pending | JobState::Active | JobState::Failing
        )
    }

    /// Every state, for tests and for listing.
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Active,
        JobState::Failing,
        JobState::Failed,
        JobState::PausedOnFailure,
        JobState::Completed,
        JobState::Deleting,
        JobState::Deleted,
    ];
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl RunState {
    /// The SMS name (`COMPLETED`), as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "PENDING",
            RunState::Missed => "MISSED",
            RunState::Active => "ACTIVE",
            RunState::Failed => "FAILED",
            RunState::Completed => "COMPLETED",
            RunState::Deleting => "DELETING",
            RunState::Deleted => "DELETED",
        }
    }

    /// PENDING or ACTIVE: a job has at most one such run.
    pub fn is_open(self) -> bool {
        matches!(self, RunState::Pending | RunState::Active)
    }

    /// Every state, for tests and for metrics.
    pub const ALL: [RunState; 7] = [
        RunState::Pending,
        RunState::Missed,
        RunState::Active,
        RunState::Failed,
        RunState::Completed,
        RunState::Deleting,
        RunState::Deleted,
    ];
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// SMS's `ReplicationRunType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunType {
    /// Started by the schedule.
    Automatic,
    /// Started by `StartOnDemandReplicationRun` / `rehost jobs start`.
    OnDemand,
}

/// SMS's `LicenseType`: who brings the OS license to EC2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum LicenseType {
    /// AWS provides the license (license-included AMI).
    #[default]
    Aws,
    /// Bring your own license.
    Byol,
}

/// Where a run is, in the order a run goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStage {
    /// Not started.
    Queued,
    /// Taking the source snapshot (recorded in the ledger first).
    Snapshot,
    /// Reading the disks and staging their images in S3.
    Export,
    /// Removing the source snapshot.
    ReleaseSnapshot,
    /// Importing the staged images into EBS snapshots.
    Import,
    /// Registering the AMI.
    RegisterAmi,
    /// Deregistering AMIs beyond the job's `number_of_recent_amis_to_keep`.
    Retention,
    /// Deleting the staged images.
    CleanupStaged,
    /// Finished.
    Done,
}

/// What a user gives to create a job (SMS `CreateReplicationJob`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub server_id: ServerId,
    /// When the first run is due.
    pub seed_replication_time: Timestamp,
    /// Hours between runs, 1–24. Required unless `run_once`.
    pub frequency_hours: Option<u32>,
    /// One run, then the job is COMPLETED.
    #[serde(default)]
    pub run_once: bool,
    #[serde(default)]
    pub license_type: LicenseType,
    /// AMIs to keep, newest first; 0 keeps them all.
    #[serde(default)]
    pub number_of_recent_amis_to_keep: u32,
    /// Encrypt the snapshots (the first of a chain; children inherit).
    #[serde(default)]
    pub encrypted: bool,
    /// KMS key (id, alias or ARN); implies `encrypted`. Checked to exist when the job is created.
    pub kms_key_id: Option<String>,
    pub description: Option<String>,
}

/// What a user may change on a job (SMS `UpdateReplicationJob`); `None` keeps the value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobUpdate {
    pub next_replication_run_start_time: Option<Timestamp>,
    pub frequency_hours: Option<u32>,
    pub license_type: Option<LicenseType>,
    pub number_of_recent_amis_to_keep: Option<u32>,
    pub encrypted: Option<bool>,
    pub kms_key_id: Option<String>,
    pub description: Option<String>,
}

/// A replication job as stored and shown (SMS `ReplicationJob`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub server_id: ServerId,
    /// The source (config name) and the VM's stable id there.
    pub source: String,
    pub vm_id: String,
    pub vm_name: String,
    pub seed_replication_time: Timestamp,
    pub frequency_hours: Option<u32>,
    pub run_once: bool,
    pub license_type: LicenseType,
    pub number_of_recent_amis_to_keep: u32,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub description: Option<String>,
    pub state: JobState,
    pub status_message: Option<String>,
    /// When the next automatic run is due; `None` once no more are (run-once done, deleted).
    pub next_replication_run_start_time: Option<Timestamp>,
    /// Failed runs in a row since the last success (for PAUSED_ON_FAILURE).
    pub consecutive_failures: u32,
    /// The AMI of the newest completed run.
    pub latest_ami_id: Option<String>,
    pub created_at: Timestamp,
}

/// One replication run (SMS `ReplicationRun`), with its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: RunId,
    pub job_id: JobId,
    pub run_type: RunType,
    pub state: RunState,
    pub stage: RunStage,
    /// 0–100 within the whole run.
    pub progress_percent: u8,
    /// Bytes read from the source and written to EBS so far.
    pub bytes_moved: u64,
    pub status_message: Option<String>,
    pub ami_id: Option<String>,
    /// When it was due (scheduled) or asked for (on demand).
    pub scheduled_start_time: Timestamp,
    pub started_at: Option<Timestamp>,
    pub completed_at: Option<Timestamp>,
    /// Which attempt of this run (retries after transient failures), from 1.
    pub attempt: u32,
    pub description: Option<String>,
}

/// What the connector knows of one disk of a job's VM across runs: what the next,
/// incremental run builds on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLineage {
    pub job_id: JobId,
    /// The source's disk id (vSphere device key).
    pub disk_key: String,
    /// The CBT changeId (or other source change token) the last completed run read up to.
    pub last_change_id: Option<String>,
    /// The EBS snapshot of the last completed run: the next run's parent.
    pub last_snapshot_id: Option<String>,
    /// Where the last completed run's export manifest is (s3://…): the next export's base.
    pub last_manifest: Option<String>,
    /// The last completed run's staged image (s3://…), if it was kept.
    pub last_staged_image: Option<String>,
    /// The run these came from.
    pub last_run_id: Option<RunId>,
}
