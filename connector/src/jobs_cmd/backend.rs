//! Where the `jobs` and `runs` commands send their operations: the store directly, or a
//! running connector's API. Both take the same typed requests and give the same answers
//! (the API's JSON), so each command is written once.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;

use super::BackendArgs;
use crate::api::client::ApiClient;
use crate::api::requests::{ApiRequest, GetReplicationJobsRequest, GetReplicationRunsRequest};
use crate::api::responses::{
    GetReplicationJobsResponse, GetReplicationRunsResponse, ReplicationJob,
};
use crate::api::service::{ConnectorInfo, Service};
use crate::config::Config;
use crate::jobs::model::{JobId, Timestamp};
use crate::store::SharedStore;

/// The two places operations can go.
#[derive(Debug)]
pub enum JobsBackend {
    /// The store of the config file, in this process.
    Store(Service),
    /// A connector's API (`--api URL`).
    Api(ApiClient),
}

impl JobsBackend {
    /// The backend `args` ask for: the API with `--api`, else the config's store.
    pub fn open(args: &BackendArgs) -> Result<JobsBackend> {
        if let Some(url) = &args.api {
            let token = std::env::var(&args.token_env).with_context(|| {
                format!(
                    "--api needs the API token in the environment variable {} (--token-env names another)",
                    args.token_env
                )
            })?;
            let tls = match (&args.api_thumbprint, &args.api_ca_file) {
                (Some(thumbprint), _) => rehost_vsphere::Tls::Thumbprint(thumbprint.clone()),
                (None, Some(ca)) => rehost_vsphere::Tls::CaFile(ca.clone()),
                (None, None) => rehost_vsphere::Tls::System,
            };
            return Ok(JobsBackend::Api(ApiClient::new(url, token, &tls)?));
        }
        let config = Config::locate(args.common.config.as_deref())?;
        let store = SharedStore::for_config(&config)?;
        Ok(JobsBackend::Store(Service::new(
            Arc::new(config),
            store,
            ConnectorInfo {
                ip_address: None,
                started_at: Timestamp::now(),
            },
        )))
    }

    /// Sends `request` and reads the answer as `T`.
    pub async fn call<T: DeserializeOwned>(&self, request: ApiRequest) -> Result<T> {
        let operation = request.operation().name();
        let answer = match self {
            JobsBackend::Store(service) => {
                service.execute(request).await.map_err(anyhow::Error::new)?
            }
            JobsBackend::Api(client) => client.execute(&request).await?,
        };
        serde_json::from_value(answer)
            .with_context(|| format!("the answer to {operation} has an unexpected shape"))
    }

    /// Every job (following the pages).
    pub async fn jobs(&self) -> Result<GetReplicationJobsResponse> {
        let mut all = GetReplicationJobsResponse {
            replication_job_list: Vec::new(),
            next_token: None,
        };
        let mut next_token = None;
        loop {
            let page: GetReplicationJobsResponse = self
                .call(ApiRequest::GetReplicationJobs(GetReplicationJobsRequest {
                    replication_job_id: None,
                    next_token,
                    max_results: None,
                }))
                .await?;
            all.replication_job_list.extend(page.replication_job_list);
            match page.next_token {
                Some(token) => next_token = Some(token),
                None => return Ok(all),
            }
        }
    }

    /// The job `id`.
    pub async fn job(&self, id: &JobId) -> Result<ReplicationJob> {
        let answer: GetReplicationJobsResponse = self
            .call(ApiRequest::GetReplicationJobs(GetReplicationJobsRequest {
                replication_job_id: Some(id.clone()),
                next_token: None,
                max_results: None,
            }))
            .await?;
        match answer.replication_job_list.into_iter().next() {
            Some(job) => Ok(job),
            None => bail!("the answer to GetReplicationJobs does not list job {id}"),
        }
    }

    /// The job `id` and all its runs, newest first (following the pages).
    pub async fn job_with_runs(&self, id: &JobId) -> Result<GetReplicationRunsResponse> {
        let mut next_token = None;
        let mut all: Option<GetReplicationRunsResponse> = None;
        loop {
            let page: GetReplicationRunsResponse = self
                .call(ApiRequest::GetReplicationRuns(GetReplicationRunsRequest {
                    replication_job_id: id.clone(),
                    next_token,
                    max_results: None,
                }))
                .await?;
            next_token = page.next_token.clone();
            match &mut all {
                None => all = Some(page),
                Some(all) => all.replication_run_list.extend(page.replication_run_list),
            }
            if next_token.is_none() {
                break;
            }
        }
        let mut all = all.context("GetReplicationRuns answered nothing")?;
        all.next_token = None;
        Ok(all)
    }
}
