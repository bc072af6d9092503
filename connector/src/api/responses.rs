//! The API's answers: SMS's response shapes in camelCase, built from the store's model.
//! The CLI prints the same shapes (`--output json`), whether it asked the API or the store.
//!
//! Optional fields are left out when they have no value, as SMS does.

use serde::{Deserialize, Serialize};

use crate::jobs::model::{
    Job, JobId, JobState, LicenseType, Run, RunId, RunState, RunType, ServerId, Timestamp,
};
use crate::store::Server as CatalogServer;

/// SMS's `ServerType`: the only kind there is.
pub const SERVER_TYPE: &str = "VIRTUAL_MACHINE";
/// SMS's `VmManagerType` of a vSphere source.
pub const VM_MANAGER_TYPE: &str = "VSPHERE";

/// `GetConnectors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetConnectorsResponse {
    pub connector_list: Vec<Connector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// SMS's `Connector`: this connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connector {
    pub connector_id: String,
    pub version: String,
    /// `HEALTHY` (a connector that answers is healthy; an unhealthy one does not answer).
    pub status: String,
    pub capability_list: Vec<String>,
    /// The first configured source (SMS has one per connector; see `vmManagerList`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_manager_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_manager_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_manager_id: Option<String>,
    /// Not SMS's: every configured source (one connector serves several).
    pub vm_manager_list: Vec<VmManager>,
    /// The address the API listens on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_address: Option<String>,
    /// When this connector process started serving.
    pub associated_on: Timestamp,
}

/// A configured source, as `GetConnectors` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmManager {
    pub vm_manager_name: String,
    pub vm_manager_type: String,
    pub vm_manager_id: String,
}

/// `ImportServerCatalog`, `UpdateReplicationJob`, `DeleteReplicationJob` and
/// `ResumeReplicationJob` answer an empty object, as SMS does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyResponse {}

/// SMS's `VmServerAddress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmServerAddress {
    /// The source's name in the config.
    pub vm_manager_id: String,
    /// The VM's stable id there (vSphere: the instance UUID).
    pub vm_id: String,
}

/// SMS's `VmServer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmServer {
    pub vm_server_address: VmServerAddress,
    pub vm_name: String,
    pub vm_manager_name: String,
    pub vm_manager_type: String,
    /// Where the VM sits in the inventory; absent when it left the catalog.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_path: Option<String>,
}

/// SMS's `Server`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Server {
    pub server_id: ServerId,
    pub server_type: String,
    pub vm_server: VmServer,
    /// The job replicating it, if any (deleted jobs are not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_job_id: Option<JobId>,
    /// Whether that job has stopped for good (COMPLETED, FAILED, DELETING).
    pub replication_job_terminated: bool,
}

/// `GetServers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetServersResponse {
    /// `AVAILABLE` once a catalog was imported, else `NOT_IMPORTED`.
    pub server_catalog_status: String,
    pub server_list: Vec<Server>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// `CreateReplicationJob`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateReplicationJobResponse {
    pub replication_job_id: JobId,
}

/// `StartOnDemandReplicationRun`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartOnDemandReplicationRunResponse {
    pub replication_run_id: RunId,
}

/// SMS's `ReplicationJob`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationJob {
    pub replication_job_id: JobId,
    pub server_id: ServerId,
    pub server_type: String,
    pub vm_server: VmServer,
    pub seed_replication_time: Timestamp,
    /// Hours between runs; absent for a run-once job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u32>,
    pub run_once: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_replication_run_start_time: Option<Timestamp>,
    pub license_type: LicenseType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_ami_id: Option<String>,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub number_of_recent_amis_to_keep: u32,
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// The job's newest runs (at most [`RUNS_IN_JOB`]; `GetReplicationRuns` pages
    /// through all of them).
    pub replication_run_list: Vec<ReplicationRun>,
}

/// How many runs a `ReplicationJob` carries: a job replicating hourly has thousands.
pub const RUNS_IN_JOB: usize = 10;

/// SMS's `ReplicationRunStageDetails`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageDetails {
    /// `queued`, `snapshot`, `export`, `release_snapshot`, `import`, `register_ami`,
    /// `retention`, `cleanup_staged`, `done`.
    pub stage: String,
    /// The whole run's progress, `42%`.
    pub stage_progress: String,
}

/// SMS's `ReplicationRun`, with our `bytesMoved` and `progressPercent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationRun {
    pub replication_run_id: RunId,
    pub state: RunState,
    #[serde(rename = "type")]
    pub run_type: RunType,
    pub stage_details: StageDetails,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami_id: Option<String>,
    pub scheduled_start_time: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_time: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub encrypted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// Not SMS's: bytes read from the source and written to EBS so far.
    pub bytes_moved: u64,
    /// Not SMS's: 0–100 within the whole run.
    pub progress_percent: u8,
}

/// `GetReplicationJobs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetReplicationJobsResponse {
    pub replication_job_list: Vec<ReplicationJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// `GetReplicationRuns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetReplicationRunsResponse {
    pub replication_job: ReplicationJob,
    pub replication_run_list: Vec<ReplicationRun>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// Whether a job in `state` has stopped for good.
pub fn terminated(state: JobState) -> bool {
    matches!(
        state,
        JobState::Completed | JobState::Failed | JobState::Deleting | JobState::Deleted
    )
}

/// The `VmServer` of a catalogued server.
pub fn vm_server(server: &CatalogServer) -> VmServer {
    VmServer {
        vm_server_address: VmServerAddress {
            vm_manager_id: server.source.clone(),
            vm_id: server.info.id.to_string(),
        },
        vm_name: server.info.name.clone(),
        vm_manager_name: server.source.clone(),
        vm_manager_type: VM_MANAGER_TYPE.to_owned(),
        vm_path: Some(server.info.path.clone()),
    }
}

/// A catalogued server and the job replicating it, if any.
pub fn server(server: &CatalogServer, job: Option<&Job>) -> Server {
    Server {
        server_id: server.server_id.clone(),
        server_type: SERVER_TYPE.to_owned(),
        vm_server: vm_server(server),
        replication_job_id: job.map(|j| j.id.clone()),
        replication_job_terminated: job.is_some_and(|j| terminated(j.state)),
    }
}

/// A job as SMS shows it; `server` (from the catalog) gives the VM's path, `runs` (newest
/// first) its run list.
pub fn replication_job(job: &Job, server: Option<&CatalogServer>, runs: &[Run]) -> ReplicationJob {
    ReplicationJob {
        replication_job_id: job.id.clone(),
        server_id: job.server_id.clone(),
        server_type: SERVER_TYPE.to_owned(),
        vm_server: server.map_or_else(
            || VmServer {
                vm_server_address: VmServerAddress {
                    vm_manager_id: job.source.clone(),
                    vm_id: job.vm_id.clone(),
                },
                vm_name: job.vm_name.clone(),
                vm_manager_name: job.source.clone(),
                vm_manager_type: VM_MANAGER_TYPE.to_owned(),
                vm_path: None,
            },
            vm_server,
        ),
        seed_replication_time: job.seed_replication_time,
        frequency: job.frequency_hours,
        run_once: job.run_once,
        next_replication_run_start_time: job.next_replication_run_start_time,
        license_type: job.license_type,
        latest_ami_id: job.latest_ami_id.clone(),
        state: job.state,
        status_message: job.status_message.clone(),
        description: job.description.clone(),
        number_of_recent_amis_to_keep: job.number_of_recent_amis_to_keep,
        encrypted: job.encrypted,
        kms_key_id: job.kms_key_id.clone(),
        replication_run_list: runs
            .iter()
            .take(RUNS_IN_JOB)
            .map(|run| replication_run(run, job))
            .collect(),
    }
}

/// A run as SMS shows it; encryption is the job's.
pub fn replication_run(run: &Run, job: &Job) -> ReplicationRun {
    ReplicationRun {
        replication_run_id: run.id.clone(),
        state: run.state,
        run_type: run.run_type,
        stage_details: StageDetails {
            stage: serde_name(&run.stage),
            stage_progress: format!("{}%", run.progress_percent),
        },
        status_message: run.status_message.clone(),
        ami_id: run.ami_id.clone(),
        scheduled_start_time: run.scheduled_start_time,
        completed_time: run.completed_at,
        description: run.description.clone(),
        encrypted: job.encrypted,
        kms_key_id: job.kms_key_id.clone(),
        bytes_moved: run.bytes_moved,
        progress_percent: run.progress_percent,
    }
}

/// The serde name of a unit enum variant (`register_ami`, `PAUSED_ON_FAILURE`).
pub fn serde_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => String::new(),
    }
}

#[cfg(test)]
pub mod samples {
    //! Values with every optional field set, for the OpenAPI check and other tests.
    use super::*;
    use crate::jobs::model::RunStage;

    pub fn job() -> Job {
        Job {
            id: JobId("sms-job-0123456789abcdef0".into()),
            server_id: ServerId("s-0123456789abcdef0".into()),
            source: "vc1".into(),
            vm_id: "4207d0a4-0000-0000-0000-000000000001".into(),
            vm_name: "web01".into(),
            seed_replication_time: Timestamp(1_796_000_000),
            frequency_hours: Some(12),
            run_once: false,
            license_type: LicenseType::Byol,
            number_of_recent_amis_to_keep: 3,
            encrypted: true,
            kms_key_id: Some("alias/rehost".into()),
            description: Some("the web server".into()),
            state: JobState::Active,
            status_message: Some("last run completed".into()),
            next_replication_run_start_time: Some(Timestamp(1_796_043_200)),
            consecutive_failures: 0,
            latest_ami_id: Some("ami-0123456789abcdef0".into()),
            created_at: Timestamp(1_795_990_000),
        }
    }

    pub fn run() -> Run {
        Run {
            id: RunId("sms-run-0123456789abcdef0".into()),
            job_id: job().id,
            run_type: RunType::OnDemand,
            state: RunState::Completed,
            stage: RunStage::Done,
            progress_percent: 100,
            bytes_moved: 5 << 30,
            status_message: Some("AMI registered".into()),
            ami_id: Some("ami-0123456789abcdef0".into()),
            scheduled_start_time: Timestamp(1_796_000_000),
            started_at: Some(Timestamp(1_796_000_010)),
            completed_at: Some(Timestamp(1_796_003_600)),
            attempt: 1,
            description: Some("before the upgrade".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_shows_with_sms_field_names() {
        let job = replication_job(&samples::job(), None, &[samples::run()]);
        let json = serde_json::to_value(&job).unwrap();
        assert_eq!(json["replicationJobId"], "sms-job-0123456789abcdef0");
        assert_eq!(json["serverType"], "VIRTUAL_MACHINE");
        assert_eq!(json["vmServer"]["vmServerAddress"]["vmManagerId"], "vc1");
        assert_eq!(json["vmServer"]["vmManagerType"], "VSPHERE");
        assert_eq!(json["frequency"], 12);
        assert_eq!(json["licenseType"], "BYOL");
        assert_eq!(json["state"], "ACTIVE");
        assert_eq!(json["seedReplicationTime"], "2026-11-30T00:53:20Z");
        let run = &json["replicationRunList"][0];
        assert_eq!(run["type"], "ON_DEMAND");
        assert_eq!(run["stageDetails"]["stage"], "done");
        assert_eq!(run["stageDetails"]["stageProgress"], "100%");
        assert_eq!(run["completedTime"], "2026-11-30T01:53:20Z");
        assert_eq!(run["bytesMoved"], 5u64 << 30);
        // Absent values are left out, not null.
        let mut bare = samples::job();
        bare.kms_key_id = None;
        let json = serde_json::to_value(replication_job(&bare, None, &[])).unwrap();
        assert!(json.get("kmsKeyId").is_none());
        assert!(json.get("vmServer").unwrap().get("vmPath").is_none());
        // The client reads back what the server wrote.
        let back: ReplicationJob =
            serde_json::from_value(serde_json::to_value(&job).unwrap()).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn a_job_carries_only_its_newest_runs() {
        let runs = vec![samples::run(); RUNS_IN_JOB + 5];
        let job = replication_job(&samples::job(), None, &runs);
        assert_eq!(job.replication_run_list.len(), RUNS_IN_JOB);
    }
}
