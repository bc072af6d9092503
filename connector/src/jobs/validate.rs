//! Checks of what a user asks for (a new job, a change to one), with messages that name
//! the field and the value. Pure: the store looks up the server and the server's live
//! job and hands them in.
//!
//! Whether a KMS key exists cannot be checked here (it is an AWS call): the caller
//! resolves `kms_key_id` with [`rehost_importer::kms::KeyResolver::resolve`] before
//! creating or updating the job, and answers InvalidParameter when it does not resolve.

use super::error::JobError;
use super::model::{Job, JobId, JobSpec, JobUpdate, ServerId, Timestamp};
use crate::store::Server;

/// The frequencies SMS accepts, in hours.
pub const FREQUENCY_HOURS: std::ops::RangeInclusive<u32> = 1..=24;

/// Checks `spec` for server `server` (`None`: not in the catalog), which already has the
/// live (not DELETED) job `live_job`, if any. Returns the spec as it will be stored
/// (a KMS key implies encryption).
pub fn validate_spec(
    spec: &JobSpec,
    server: Option<&Server>,
    live_job: Option<&JobId>,
) -> Result<JobSpec, JobError> {
    match spec.frequency_hours {
        Some(hours) => check_frequency(hours)?,
        None if !spec.run_once => {
            return Err(JobError::InvalidParameter(
                "frequency_hours is required (1–24) unless run_once is true".to_owned(),
            ));
        }
        None => {}
    }
    let server = server.ok_or_else(|| unknown_server(&spec.server_id))?;
    if !server.unsupported.is_empty() {
        return Err(JobError::InvalidParameter(format!(
            "server {} ({}) cannot be replicated: {}",
            server.server_id,
            server.info.name,
            server.unsupported.join("; ")
        )));
    }
    if let Some(job) = live_job {
        return Err(JobError::AlreadyExists(format!(
            "server {} ({}) already has replication job {job}; delete it before creating another",
            server.server_id, server.info.name
        )));
    }
    let mut spec = spec.clone();
    spec.kms_key_id = check_kms_key(spec.kms_key_id.take())?;
    if spec.kms_key_id.is_some() {
        spec.encrypted = true;
    }
    Ok(spec)
}

/// Checks `update` of `job`; returns it as it will be applied (a KMS key implies
/// encryption).
pub fn validate_update(job: &Job, update: &JobUpdate) -> Result<JobUpdate, JobError> {
    let mut update = update.clone();
    if let Some(hours) = update.frequency_hours {
        if job.run_once {
            return Err(JobError::InvalidParameter(format!(
                "job {} runs once and has no frequency_hours to change",
                job.id
            )));
        }
        check_frequency(hours)?;
    }
    update.kms_key_id = check_kms_key(update.kms_key_id.take())?;
    if update.kms_key_id.is_some() {
        if update.encrypted == Some(false) {
            return Err(JobError::InvalidParameter(
                "kms_key_id was given with encrypted = false; a KMS key encrypts the snapshots (drop encrypted or set it true)".to_owned(),
            ));
        }
        update.encrypted = Some(true);
    }
    if update.encrypted == Some(false) && job.kms_key_id.is_some() && update.kms_key_id.is_none() {
        return Err(JobError::InvalidParameter(format!(
            "job {} encrypts with KMS key {}; encrypted = false would contradict it",
            job.id,
            job.kms_key_id.as_deref().unwrap_or_default()
        )));
    }
    Ok(update)
}

/// A frequency of 1–24 hours.
pub fn check_frequency(hours: u32) -> Result<(), JobError> {
    if FREQUENCY_HOURS.contains(&hours) {
        Ok(())
    } else {
        Err(JobError::InvalidParameter(format!(
            "frequency_hours must be between 1 and 24, got {hours}"
        )))
    }
}

/// Parses a time field a user gave (`seed_replication_time`, …) as RFC 3339.
pub fn parse_time(field: &str, text: &str) -> Result<Timestamp, JobError> {
    Timestamp::parse(text).map_err(|why| JobError::InvalidParameter(format!("{field}: {why}")))
}

/// The error for a server id that is not in the catalog.
pub fn unknown_server(id: &ServerId) -> JobError {
    JobError::InvalidParameter(format!(
        "unknown server id {id}; `rehost servers list` shows the catalog (import it with `rehost servers import-catalog`)"
    ))
}

fn check_kms_key(key: Option<String>) -> Result<Option<String>, JobError> {
    match key.map(|k| k.trim().to_owned()) {
        Some(key) if key.is_empty() => Err(JobError::InvalidParameter(
            "kms_key_id is empty; give a key id, alias/NAME or ARN, or leave it out".to_owned(),
        )),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::model::{JobState, LicenseType};
    use rehost_core::{Firmware, PowerState, VmId, VmInfo};

    const SEED: Timestamp = Timestamp(1_800_000_000);

    fn server(unsupported: &[&str]) -> Server {
        Server {
            server_id: ServerId("s-0123456789abcdef0".into()),
            source: "vc1".into(),
            info: VmInfo {
                id: VmId::from("vm-uuid-1"),
                name: "web".into(),
                path: "/DC0/vm/web".into(),
                source_ref: "vm-1".into(),
                power_state: PowerState::PoweredOn,
                guest_os: "Ubuntu".into(),
                cpus: 1,
                memory_mib: 512,
                firmware: Firmware::Bios,
                change_tracking: true,
                disks: Vec::new(),
            },
            unsupported: unsupported.iter().map(|s| (*s).to_owned()).collect(),
            catalogued_at: "2027-01-15T08:00:00Z".into(),
        }
    }

    fn spec() -> JobSpec {
        JobSpec {
            server_id: ServerId("s-0123456789abcdef0".into()),
            seed_replication_time: SEED,
            frequency_hours: Some(12),
            run_once: false,
            license_type: LicenseType::Aws,
            number_of_recent_amis_to_keep: 0,
            encrypted: false,
            kms_key_id: None,
            description: None,
        }
    }

    fn message(result: Result<impl std::fmt::Debug, JobError>) -> (u16, String) {
        let err = result.unwrap_err();
        (err.http_status(), err.to_string())
    }

    #[test]
    fn a_good_spec_passes_and_a_kms_key_implies_encryption() {
        let s = server(&[]);
        assert_eq!(validate_spec(&spec(), Some(&s), None).unwrap(), spec());
        let with_key = JobSpec {
            kms_key_id: Some(" alias/rehost ".into()),
            ..spec()
        };
        let stored = validate_spec(&with_key, Some(&s), None).unwrap();
        assert!(stored.encrypted);
        assert_eq!(stored.kms_key_id.as_deref(), Some("alias/rehost"));
        let once = JobSpec {
            frequency_hours: None,
            run_once: true,
            ..spec()
        };
        assert!(validate_spec(&once, Some(&s), None).is_ok());
    }

    #[test]
    fn bad_specs_are_named() {
        let s = server(&[]);
        for hours in [0, 25, 1000] {
            let bad = JobSpec {
                frequency_hours: Some(hours),
                ..spec()
            };
            let (status, text) = message(validate_spec(&bad, Some(&s), None));
            assert_eq!(status, 400);
            assert!(text.contains(&format!("got {hours}")), "{text}");
        }
        let no_frequency = JobSpec {
            frequency_hours: None,
            ..spec()
        };
        let (_, text) = message(validate_spec(&no_frequency, Some(&s), None));
        assert!(text.contains("frequency_hours is required"), "{text}");
        let (status, text) = message(validate_spec(&spec(), None, None));
        assert_eq!(status, 400);
        assert!(
            text.contains("unknown server id s-0123456789abcdef0"),
            "{text}"
        );
        let rdm = server(&[
            "disk 2000 (Hard disk 1): raw device mapping",
            "disk 2001 (Hard disk 2): independent",
        ]);
        let (status, text) = message(validate_spec(&spec(), Some(&rdm), None));
        assert_eq!(status, 400);
        assert!(text.contains("raw device mapping; disk 2001"), "{text}");
        let other = JobId("sms-job-00000000000000001".into());
        let err = validate_spec(&spec(), Some(&s), Some(&other)).unwrap_err();
        assert_eq!(err.code(), "ReplicationJobAlreadyExistsException");
        assert!(
            err.to_string().contains("sms-job-00000000000000001"),
            "{err}"
        );
        let empty_key = JobSpec {
            kms_key_id: Some("  ".into()),
            ..spec()
        };
        let (_, text) = message(validate_spec(&empty_key, Some(&s), None));
        assert!(text.contains("kms_key_id is empty"), "{text}");
    }

    #[test]
    fn seed_times_are_parsed_with_the_field_named() {
        assert_eq!(
            parse_time("seed_replication_time", &SEED.to_rfc3339()).unwrap(),
            SEED
        );
        let (status, text) = message(parse_time("seed_replication_time", "tomorrow"));
        assert_eq!(status, 400);
        assert!(
            text.starts_with("seed_replication_time: \"tomorrow\" is not an RFC 3339 time"),
            "{text}"
        );
    }

    #[test]
    fn updates_are_checked_against_the_job() {
        let job = Job {
            id: JobId("sms-job-00000000000000001".into()),
            server_id: spec().server_id,
            source: "vc1".into(),
            vm_id: "vm-uuid-1".into(),
            vm_name: "web".into(),
            seed_replication_time: SEED,
            frequency_hours: Some(12),
            run_once: false,
            license_type: LicenseType::Aws,
            number_of_recent_amis_to_keep: 0,
            encrypted: true,
            kms_key_id: Some("alias/a".into()),
            description: None,
            state: JobState::Active,
            status_message: None,
            next_replication_run_start_time: Some(SEED),
            consecutive_failures: 0,
            latest_ami_id: None,
            created_at: SEED,
        };
        let (_, text) = message(validate_update(
            &job,
            &JobUpdate {
                frequency_hours: Some(48),
                ..JobUpdate::default()
            },
        ));
        assert!(text.contains("got 48"), "{text}");
        let (_, text) = message(validate_update(
            &job,
            &JobUpdate {
                kms_key_id: Some("alias/b".into()),
                encrypted: Some(false),
                ..JobUpdate::default()
            },
        ));
        assert!(text.contains("encrypted = false"), "{text}");
        let (_, text) = message(validate_update(
            &job,
            &JobUpdate {
                encrypted: Some(false),
                ..JobUpdate::default()
            },
        ));
        assert!(text.contains("alias/a"), "{text}");
        let ok = validate_update(
            &job,
            &JobUpdate {
                kms_key_id: Some("alias/b".into()),
                ..JobUpdate::default()
            },
        )
        .unwrap();
        assert_eq!(ok.encrypted, Some(true));
        let once = Job {
            run_once: true,
            frequency_hours: None,
            ..job
        };
        let (_, text) = message(validate_update(
            &once,
            &JobUpdate {
                frequency_hours: Some(2),
                ..JobUpdate::default()
            },
        ));
        assert!(text.contains("runs once"), "{text}");
    }
}
