//! The API's operations and their request bodies, parsed by one pure function
//! ([`parse_request`]) so that every rule about a body is tested without a server.
//!
//! Bodies are SMS's request shapes in camelCase; unknown fields are refused (a typo such
//! as `frequncy` is an error, never silently ignored).

use serde::{Deserialize, Serialize};

use super::errors::ApiError;
use crate::jobs::model::{JobId, LicenseType, Timestamp};

/// Every operation, each answered at `POST /v1/{name}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    GetConnectors,
    ImportServerCatalog,
    GetServers,
    CreateReplicationJob,
    GetReplicationJobs,
    UpdateReplicationJob,
    DeleteReplicationJob,
    StartOnDemandReplicationRun,
    GetReplicationRuns,
    /// Not SMS's: takes a FAILED or PAUSED_ON_FAILURE job up again.
    ResumeReplicationJob,
}

impl Operation {
    /// All of them, in the order the README and the OpenAPI document list them.
    pub const ALL: [Operation; 10] = [
        Operation::GetConnectors,
        Operation::ImportServerCatalog,
        Operation::GetServers,
        Operation::CreateReplicationJob,
        Operation::GetReplicationJobs,
        Operation::UpdateReplicationJob,
        Operation::DeleteReplicationJob,
        Operation::StartOnDemandReplicationRun,
        Operation::GetReplicationRuns,
        Operation::ResumeReplicationJob,
    ];

    /// SMS's name of the operation.
    pub fn name(self) -> &'static str {
        match self {
            Operation::GetConnectors => "GetConnectors",
            Operation::ImportServerCatalog => "ImportServerCatalog",
            Operation::GetServers => "GetServers",
            Operation::CreateReplicationJob => "CreateReplicationJob",
            Operation::GetReplicationJobs => "GetReplicationJobs",
            Operation::UpdateReplicationJob => "UpdateReplicationJob",
            Operation::DeleteReplicationJob => "DeleteReplicationJob",
            Operation::StartOnDemandReplicationRun => "StartOnDemandReplicationRun",
            Operation::GetReplicationRuns => "GetReplicationRuns",
            Operation::ResumeReplicationJob => "ResumeReplicationJob",
        }
    }

    /// Its path, `/v1/{name}`.
    pub fn path(self) -> String {
        format!("/v1/{}", self.name())
    }
}

/// `GetConnectors`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetConnectorsRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_results: Option<u32>,
}

/// `ImportServerCatalog`: no parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportServerCatalogRequest {}

/// `GetServers`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetServersRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_results: Option<u32>,
}

/// `CreateReplicationJob`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateReplicationJobRequest {
    /// A server id (`s-…`); as an extension, also the VM's id or name in the catalog.
    pub server_id: String,
    /// When the first run is due (RFC 3339).
    pub seed_replication_time: Timestamp,
    /// Hours between runs, 1–24; required unless `runOnce`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u32>,
    #[serde(default)]
    pub run_once: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_type: Option<LicenseType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_recent_amis_to_keep: Option<u32>,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `GetReplicationJobs`: one job, or a page of all of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetReplicationJobsRequest {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication_job_id: Option<JobId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_results: Option<u32>,
}

/// `UpdateReplicationJob`: absent fields keep their value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateReplicationJobRequest {
    pub replication_job_id: JobId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_replication_run_start_time: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_type: Option<LicenseType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number_of_recent_amis_to_keep: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `DeleteReplicationJob`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeleteReplicationJobRequest {
    pub replication_job_id: JobId,
    /// Keep the AMIs the job's runs registered (default: deregister them).
    #[serde(default)]
    pub keep_amis: bool,
}

/// `StartOnDemandReplicationRun`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StartOnDemandReplicationRunRequest {
    pub replication_job_id: JobId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `GetReplicationRuns`: a job and a page of its runs, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetReplicationRunsRequest {
    pub replication_job_id: JobId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_results: Option<u32>,
}

/// `ResumeReplicationJob` (an extension).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResumeReplicationJobRequest {
    pub replication_job_id: JobId,
}

/// A parsed request: the operation and its typed body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    GetConnectors(GetConnectorsRequest),
    ImportServerCatalog(ImportServerCatalogRequest),
    GetServers(GetServersRequest),
    CreateReplicationJob(CreateReplicationJobRequest),
    GetReplicationJobs(GetReplicationJobsRequest),
    UpdateReplicationJob(UpdateReplicationJobRequest),
    DeleteReplicationJob(DeleteReplicationJobRequest),
    StartOnDemandReplicationRun(StartOnDemandReplicationRunRequest),
    GetReplicationRuns(GetReplicationRunsRequest),
    ResumeReplicationJob(ResumeReplicationJobRequest),
}

impl ApiRequest {
    /// Which operation it is.
    pub fn operation(&self) -> Operation {
        match self {
            ApiRequest::GetConnectors(_) => Operation::GetConnectors,
            ApiRequest::ImportServerCatalog(_) => Operation::ImportServerCatalog,
            ApiRequest::GetServers(_) => Operation::GetServers,
            ApiRequest::CreateReplicationJob(_) => Operation::CreateReplicationJob,
            ApiRequest::GetReplicationJobs(_) => Operation::GetReplicationJobs,
            ApiRequest::UpdateReplicationJob(_) => Operation::UpdateReplicationJob,
            ApiRequest::DeleteReplicationJob(_) => Operation::DeleteReplicationJob,
            ApiRequest::StartOnDemandReplicationRun(_) => Operation::StartOnDemandReplicationRun,
            ApiRequest::GetReplicationRuns(_) => Operation::GetReplicationRuns,
            ApiRequest::ResumeReplicationJob(_) => Operation::ResumeReplicationJob,
        }
    }

    /// Whether the scheduler should look at the jobs again once this has been done
    /// (a job or run that may be due now, or one it must stop).
    pub fn wakes_scheduler(&self) -> bool {
        matches!(
            self,
            ApiRequest::CreateReplicationJob(_)
                | ApiRequest::UpdateReplicationJob(_)
                | ApiRequest::DeleteReplicationJob(_)
                | ApiRequest::StartOnDemandReplicationRun(_)
                | ApiRequest::ResumeReplicationJob(_)
        )
    }

    /// The body as JSON, as a client sends it.
    pub fn body(&self) -> serde_json::Result<serde_json::Value> {
        match self {
            ApiRequest::GetConnectors(r) => serde_json::to_value(r),
            ApiRequest::ImportServerCatalog(r) => serde_json::to_value(r),
            ApiRequest::GetServers(r) => serde_json::to_value(r),
            ApiRequest::CreateReplicationJob(r) => serde_json::to_value(r),
            ApiRequest::GetReplicationJobs(r) => serde_json::to_value(r),
            ApiRequest::UpdateReplicationJob(r) => serde_json::to_value(r),
            ApiRequest::DeleteReplicationJob(r) => serde_json::to_value(r),
            ApiRequest::StartOnDemandReplicationRun(r) => serde_json::to_value(r),
            ApiRequest::GetReplicationRuns(r) => serde_json::to_value(r),
            ApiRequest::ResumeReplicationJob(r) => serde_json::to_value(r),
        }
    }
}

/// Parses the body of `operation`. An empty body is `{}` (operations without required
/// parameters can be called with none).
pub fn parse_request(operation: Operation, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        body
    };
    Ok(match operation {
        Operation::GetConnectors => ApiRequest::GetConnectors(parse(body)?),
        Operation::ImportServerCatalog => ApiRequest::ImportServerCatalog(parse(body)?),
        Operation::GetServers => ApiRequest::GetServers(parse(body)?),
        Operation::CreateReplicationJob => ApiRequest::CreateReplicationJob(parse(body)?),
        Operation::GetReplicationJobs => ApiRequest::GetReplicationJobs(parse(body)?),
        Operation::UpdateReplicationJob => ApiRequest::UpdateReplicationJob(parse(body)?),
        Operation::DeleteReplicationJob => ApiRequest::DeleteReplicationJob(parse(body)?),
        Operation::StartOnDemandReplicationRun => {
            ApiRequest::StartOnDemandReplicationRun(parse(body)?)
        }
        Operation::GetReplicationRuns => ApiRequest::GetReplicationRuns(parse(body)?),
        Operation::ResumeReplicationJob => ApiRequest::ResumeReplicationJob(parse(body)?),
    })
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T =
        serde_path_to_error::deserialize(&mut de).map_err(|e| ApiError::from_json(&e))?;
    // Trailing bytes after the object are as malformed as a missing brace.
    de.end()
        .map_err(|e| ApiError::invalid_parameter(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// The most items one page holds, and how many when `maxResults` is not given.
pub const MAX_RESULTS_LIMIT: u32 = 100;
pub const MAX_RESULTS_DEFAULT: u32 = 50;

/// Cuts `items` into the page `next_token` / `max_results` ask for; the token is the
/// index of the page's first item (opaque to clients; checked, since they send it back).
pub fn page<T>(
    items: Vec<T>,
    next_token: Option<&str>,
    max_results: Option<u32>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let max = max_results.unwrap_or(MAX_RESULTS_DEFAULT);
    if !(1..=MAX_RESULTS_LIMIT).contains(&max) {
        return Err(ApiError::invalid_parameter(format!(
            "maxResults: must be 1–{MAX_RESULTS_LIMIT}, got {max}"
        )));
    }
    let start = match next_token {
        None => 0,
        Some(token) => token
            .parse::<usize>()
            .ok()
            .filter(|start| *start <= items.len())
            .ok_or_else(|| {
                ApiError::invalid_parameter(format!(
                    "nextToken: {token:?} is not a token this list returned"
                ))
            })?,
    };
    let end = start
        .saturating_add(usize::try_from(max).unwrap_or(usize::MAX))
        .min(items.len());
    let next = (end < items.len()).then(|| end.to_string());
    let page = items.into_iter().skip(start).take(end - start).collect();
    Ok((page, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::errors::{INVALID_PARAMETER, MISSING_PARAMETER};

    fn err(operation: Operation, body: &str) -> ApiError {
        parse_request(operation, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn create_replication_job_parses_sms_fields() {
        let request = parse_request(
            Operation::CreateReplicationJob,
            br#"{"serverId": "s-0123456789abcdef0", "seedReplicationTime": "2026-12-07T15:00:00Z",
                "frequency": 12, "licenseType": "BYOL", "numberOfRecentAmisToKeep": 3,
                "encrypted": true, "kmsKeyId": "alias/rehost", "description": "web"}"#,
        )
        .unwrap();
        let ApiRequest::CreateReplicationJob(create) = request else {
            panic!("{request:?}")
        };
        assert_eq!(create.server_id, "s-0123456789abcdef0");
        assert_eq!(
            create.seed_replication_time,
            Timestamp::parse("2026-12-07T15:00:00Z").unwrap()
        );
        assert_eq!(create.frequency, Some(12));
        assert!(!create.run_once);
        assert_eq!(create.license_type, Some(LicenseType::Byol));
        assert_eq!(create.number_of_recent_amis_to_keep, Some(3));
        assert!(create.encrypted);
        assert_eq!(create.kms_key_id.as_deref(), Some("alias/rehost"));
    }

    #[test]
    fn bad_bodies_name_what_is_wrong() {
        let e = err(
            Operation::CreateReplicationJob,
            r#"{"seedReplicationTime": "2026-12-07T15:00:00Z"}"#,
        );
        assert_eq!(
            (e.code.as_str(), e.status.as_u16()),
            (MISSING_PARAMETER, 400)
        );
        assert!(e.message.contains("serverId"), "{e}");

        let e = err(
            Operation::CreateReplicationJob,
            r#"{"serverId": "s-1", "seedReplicationTime": "tomorrow"}"#,
        );
        assert_eq!(e.code, INVALID_PARAMETER);
        assert!(e.message.starts_with("seedReplicationTime: "), "{e}");

        let e = err(
            Operation::CreateReplicationJob,
            r#"{"serverId": "s-1", "seedReplicationTime": "2026-12-07T15:00:00Z", "frequency": -1}"#,
        );
        assert!(e.message.starts_with("frequency: "), "{e}");

        let e = err(
            Operation::CreateReplicationJob,
            r#"{"serverId": "s-1", "seedReplicationTime": "2026-12-07T15:00:00Z", "licenseType": "FREE"}"#,
        );
        assert!(e.message.starts_with("licenseType: unknown variant"), "{e}");

        let e = err(
            Operation::UpdateReplicationJob,
            r#"{"replicationJobId": "sms-job-1", "roleName": "sms"}"#,
        );
        assert!(e.message.contains("unknown field `roleName`"), "{e}");

        let e = err(
            Operation::DeleteReplicationJob,
            r#"{"replicationJobId": "sms-job-1"} x"#,
        );
        assert!(e.message.starts_with("the body is not valid JSON"), "{e}");

        let e = err(Operation::GetServers, "[1, 2]");
        assert_eq!(e.code, INVALID_PARAMETER);

        let e = err(Operation::ImportServerCatalog, r#"{"force": true}"#);
        assert!(e.message.contains("unknown field `force`"), "{e}");
    }

    #[test]
    fn an_empty_body_is_an_empty_object() {
        assert_eq!(
            parse_request(Operation::GetServers, b"").unwrap(),
            ApiRequest::GetServers(GetServersRequest::default())
        );
        let e = err(Operation::StartOnDemandReplicationRun, " ");
        assert!(e.message.contains("replicationJobId"), "{e}");
    }

    #[test]
    fn requests_round_trip_through_their_json_body() {
        let requests = [
            ApiRequest::DeleteReplicationJob(DeleteReplicationJobRequest {
                replication_job_id: JobId("sms-job-0123456789abcdef0".into()),
                keep_amis: true,
            }),
            ApiRequest::UpdateReplicationJob(UpdateReplicationJobRequest {
                replication_job_id: JobId("sms-job-0123456789abcdef0".into()),
                next_replication_run_start_time: Some(Timestamp(1_800_000_000)),
                frequency: Some(6),
                license_type: Some(LicenseType::Aws),
                number_of_recent_amis_to_keep: None,
                encrypted: Some(false),
                kms_key_id: None,
                description: Some("db".into()),
            }),
            ApiRequest::GetReplicationJobs(GetReplicationJobsRequest::default()),
        ];
        for request in requests {
            let body = serde_json::to_vec(&request.body().unwrap()).unwrap();
            assert_eq!(parse_request(request.operation(), &body).unwrap(), request);
        }
    }

    #[test]
    fn pages_follow_their_tokens() {
        let items: Vec<u32> = (0..7).collect();
        let (first, next) = page(items.clone(), None, Some(3)).unwrap();
        assert_eq!((first, next.as_deref()), (vec![0, 1, 2], Some("3")));
        let (second, next) = page(items.clone(), Some("3"), Some(3)).unwrap();
        assert_eq!((second, next.as_deref()), (vec![3, 4, 5], Some("6")));
        let (last, next) = page(items.clone(), Some("6"), Some(3)).unwrap();
        assert_eq!((last, next), (vec![6], None));
        let (all, next) = page(items.clone(), None, None).unwrap();
        assert_eq!((all.len(), next), (7, None));
        assert!(
            page(items.clone(), Some("8"), None)
                .unwrap_err()
                .message
                .starts_with("nextToken")
        );
        assert!(page(items.clone(), Some("x"), None).is_err());
        assert!(
            page(items.clone(), None, Some(0))
                .unwrap_err()
                .message
                .starts_with("maxResults")
        );
        assert!(page(items, None, Some(101)).is_err());
        assert_eq!(page(Vec::<u32>::new(), None, None).unwrap(), (vec![], None));
    }
}
