//! What each operation does, on the store: the one implementation behind the HTTP API
//! and behind the CLI's `jobs`/`runs` commands when they use the store directly.

use std::collections::HashMap;
use std::sync::Arc;

use rehost_importer::kms::KeyResolver;
use serde::Serialize;

use super::errors::ApiError;
use super::requests::{
    ApiRequest, CreateReplicationJobRequest, GetReplicationJobsRequest, GetReplicationRunsRequest,
    GetServersRequest, UpdateReplicationJobRequest, page,
};
use super::responses::{
    self, Connector, CreateReplicationJobResponse, EmptyResponse, GetConnectorsResponse,
    GetReplicationJobsResponse, GetReplicationRunsResponse, GetServersResponse,
    StartOnDemandReplicationRunResponse, VM_MANAGER_TYPE, VmManager,
};
use crate::config::Config;
use crate::jobs::JobError;
use crate::jobs::model::{Job, JobId, JobSpec, JobState, JobUpdate, RunType, Timestamp};
use crate::store::{SharedStore, Store};

/// What `GetConnectors` says about the process serving the API.
#[derive(Debug, Clone)]
pub struct ConnectorInfo {
    /// The address the API listens on.
    pub ip_address: Option<String>,
    /// When the process started serving.
    pub started_at: Timestamp,
}

/// The operations, on one store.
#[derive(Debug)]
pub struct Service {
    config: Arc<Config>,
    store: SharedStore,
    /// Loaded on the first job naming a KMS key: building AWS clients costs a config and
    /// credential lookup that most requests do not need.
    kms: tokio::sync::OnceCell<KeyResolver>,
    connector: ConnectorInfo,
}

impl Service {
    /// The operations on `store`, with the sources and AWS account of `config`.
    pub fn new(config: Arc<Config>, store: SharedStore, connector: ConnectorInfo) -> Service {
        Service {
            config,
            store,
            kms: tokio::sync::OnceCell::new(),
            connector,
        }
    }

    /// The store the operations work on.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The store the operations work on.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Does what `request` asks and returns the answer's JSON.
    pub async fn execute(&self, request: ApiRequest) -> Result<serde_json::Value, ApiError> {
        match request {
            ApiRequest::GetConnectors(r) => {
                // One connector: there is never a next page.
                page(vec![()], r.next_token.as_deref(), r.max_results)?;
                json(&self.get_connectors().await?)
            }
            ApiRequest::ImportServerCatalog(_) => json(&self.import_server_catalog().await?),
            ApiRequest::GetServers(r) => json(&self.get_servers(r).await?),
            ApiRequest::CreateReplicationJob(r) => json(&self.create_job(r).await?),
            ApiRequest::GetReplicationJobs(r) => json(&self.get_jobs(r).await?),
            ApiRequest::UpdateReplicationJob(r) => json(&self.update_job(r).await?),
            ApiRequest::DeleteReplicationJob(r) => {
                on_store(&self.store, move |s| {
                    s.delete_job(&r.replication_job_id, r.keep_amis, Timestamp::now())?;
                    Ok(())
                })
                .await?;
                json(&EmptyResponse {})
            }
            ApiRequest::StartOnDemandReplicationRun(r) => {
                let run = on_store(&self.store, move |s| {
                    let now = Timestamp::now();
                    Ok(s.request_run(
                        &r.replication_job_id,
                        RunType::OnDemand,
                        now,
                        r.description.as_deref(),
                        now,
                    )?)
                })
                .await?;
                json(&StartOnDemandReplicationRunResponse {
                    replication_run_id: run.id,
                })
            }
            ApiRequest::GetReplicationRuns(r) => json(&self.get_runs(r).await?),
            ApiRequest::ResumeReplicationJob(r) => {
                on_store(&self.store, move |s| {
                    s.resume_job(&r.replication_job_id, Timestamp::now())?;
                    Ok(())
                })
                .await?;
                json(&EmptyResponse {})
            }
        }
    }

    async fn get_connectors(&self) -> Result<GetConnectorsResponse, ApiError> {
        let connector_id = on_store(&self.store, |s| Ok(s.connector_id()?)).await?;
        let managers: Vec<VmManager> = self
            .config
            .sources
            .iter()
            .map(|source| VmManager {
                vm_manager_name: source.name.clone(),
                vm_manager_type: VM_MANAGER_TYPE.to_owned(),
                vm_manager_id: source.name.clone(),
            })
            .collect();
        let first = managers.first();
        Ok(GetConnectorsResponse {
            connector_list: vec![Connector {
                connector_id,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                status: "HEALTHY".to_owned(),
                capability_list: vec![VM_MANAGER_TYPE.to_owned()],
                vm_manager_name: first.map(|m| m.vm_manager_name.clone()),
                vm_manager_type: first.map(|m| m.vm_manager_type.clone()),
                vm_manager_id: first.map(|m| m.vm_manager_id.clone()),
                vm_manager_list: managers,
                ip_address: self.connector.ip_address.clone(),
                associated_on: self.connector.started_at,
            }],
            next_token: None,
        })
    }

    async fn import_server_catalog(&self) -> Result<EmptyResponse, ApiError> {
        if self.config.sources.is_empty() {
            return Err(ApiError::invalid_parameter(
                "the connector's config names no [[sources]] to import a catalog from",
            ));
        }
        for source in &self.config.sources {
            let report =
                crate::servers_cmd::import_source_catalog(&self.config, source, &self.store)
                    .await
                    .map_err(|err| {
                        // The user's vCenter, not the connector, failed: say which and why.
                        tracing::warn!(
                            source = source.name,
                            error = format!("{err:#}"),
                            "catalog import failed"
                        );
                        ApiError::new(
                            axum::http::StatusCode::BAD_GATEWAY,
                            super::errors::SOURCE_UNAVAILABLE,
                            format!("importing the catalog of source {:?}: {err:#}", source.name),
                        )
                    })?;
            tracing::info!(
                source = report.source,
                servers = report.servers,
                "catalog imported"
            );
        }
        Ok(EmptyResponse {})
    }

    async fn get_servers(&self, r: GetServersRequest) -> Result<GetServersResponse, ApiError> {
        let (servers, jobs) =
            on_store(&self.store, |s| Ok((s.servers(None)?, s.jobs(false)?))).await?;
        let status = if servers.is_empty() {
            "NOT_IMPORTED"
        } else {
            "AVAILABLE"
        };
        let job_of = jobs_by_server(&jobs);
        let (servers, next_token) = page(servers, r.next_token.as_deref(), r.max_results)?;
        Ok(GetServersResponse {
            server_catalog_status: status.to_owned(),
            server_list: servers
                .iter()
                .map(|s| responses::server(s, job_of.get(&s.server_id).copied()))
                .collect(),
            next_token,
        })
    }

    async fn create_job(
        &self,
        r: CreateReplicationJobRequest,
    ) -> Result<CreateReplicationJobResponse, ApiError> {
        let server_text = r.server_id.clone();
        let server = on_store(&self.store, move |s| {
            s.find_server(&server_text).map_err(|err| match err {
                // The store's NotFound answers as a missing *job*; here a parameter is wrong.
                JobError::NotFound(message) => {
                    ApiError::invalid_parameter(format!("serverId: {message}"))
                }
                other => ApiError::from(other),
            })
        })
        .await?;
        if let Some(key) = &r.kms_key_id {
            self.check_kms_key(key).await?;
        }
        let spec = JobSpec {
            server_id: server.server_id,
            seed_replication_time: r.seed_replication_time,
            frequency_hours: r.frequency,
            run_once: r.run_once,
            license_type: r.license_type.unwrap_or_default(),
            number_of_recent_amis_to_keep: r.number_of_recent_amis_to_keep.unwrap_or(0),
            encrypted: r.encrypted,
            kms_key_id: r.kms_key_id,
            description: r.description,
        };
        let job = on_store(&self.store, move |s| {
            Ok(s.create_job(&spec, Timestamp::now())?)
        })
        .await?;
        tracing::info!(job = %job.id, server = %job.server_id, "replication job created");
        Ok(CreateReplicationJobResponse {
            replication_job_id: job.id,
        })
    }

    async fn get_jobs(
        &self,
        r: GetReplicationJobsRequest,
    ) -> Result<GetReplicationJobsResponse, ApiError> {
        on_store(&self.store, move |s| {
            let jobs = match &r.replication_job_id {
                Some(id) => vec![existing_job(s, id)?],
                None => s.jobs(false)?,
            };
            let (jobs, next_token) = page(jobs, r.next_token.as_deref(), r.max_results)?;
            let mut list = Vec::with_capacity(jobs.len());
            for job in &jobs {
                let server = s.server(&job.server_id)?;
                let runs = s.runs(&job.id)?;
                list.push(responses::replication_job(job, server.as_ref(), &runs));
            }
            Ok(GetReplicationJobsResponse {
                replication_job_list: list,
                next_token,
            })
        })
        .await
    }

    async fn update_job(&self, r: UpdateReplicationJobRequest) -> Result<EmptyResponse, ApiError> {
        if let Some(key) = &r.kms_key_id {
            self.check_kms_key(key).await?;
        }
        let update = JobUpdate {
            next_replication_run_start_time: r.next_replication_run_start_time,
            frequency_hours: r.frequency,
            license_type: r.license_type,
            number_of_recent_amis_to_keep: r.number_of_recent_amis_to_keep,
            encrypted: r.encrypted,
            kms_key_id: r.kms_key_id,
            description: r.description,
        };
        let id = r.replication_job_id;
        on_store(&self.store, move |s| {
            s.update_job(&id, &update, Timestamp::now())?;
            Ok(())
        })
        .await?;
        Ok(EmptyResponse {})
    }

    async fn get_runs(
        &self,
        r: GetReplicationRunsRequest,
    ) -> Result<GetReplicationRunsResponse, ApiError> {
        on_store(&self.store, move |s| {
            let job = existing_job(s, &r.replication_job_id)?;
            let server = s.server(&job.server_id)?;
            let runs = s.runs(&job.id)?;
            let replication_job = responses::replication_job(&job, server.as_ref(), &runs);
            let (runs, next_token) = page(runs, r.next_token.as_deref(), r.max_results)?;
            Ok(GetReplicationRunsResponse {
                replication_job,
                replication_run_list: runs
                    .iter()
                    .map(|run| responses::replication_run(run, &job))
                    .collect(),
                next_token,
            })
        })
        .await
    }

    /// A job naming a KMS key is refused unless the key exists, is enabled and can
    /// encrypt: finding out at the first run, hours later, helps nobody.
    async fn check_kms_key(&self, key: &str) -> Result<(), ApiError> {
        let resolver = self
            .kms
            .get_or_init(|| async {
                let options = self.config.aws_options();
                KeyResolver::load(&options).await
            })
            .await;
        match resolver.resolve(key).await {
            Ok(resolved) => {
                tracing::debug!(key, arn = resolved.arn, "KMS key checked");
                Ok(())
            }
            Err(err) => Err(ApiError::invalid_parameter(format!(
                "kmsKeyId: {:#}",
                anyhow::Error::new(err)
            ))),
        }
    }
}

/// The job `id`, or ReplicationJobNotFoundException.
fn existing_job(store: &Store, id: &JobId) -> Result<Job, ApiError> {
    store
        .job(id)?
        .ok_or_else(|| JobError::NotFound(format!("no replication job {id}")).into())
}

/// The live job of each server (deleted ones are not listed by the store; of several,
/// the newest, which is the one that counts).
fn jobs_by_server(jobs: &[Job]) -> HashMap<crate::jobs::model::ServerId, &Job> {
    let mut by_server: HashMap<_, &Job> = HashMap::new();
    for job in jobs.iter().filter(|j| j.state != JobState::Deleted) {
        by_server
            .entry(job.server_id.clone())
            .and_modify(|seen| {
                if job.created_at > seen.created_at {
                    *seen = job;
                }
            })
            .or_insert(job);
    }
    by_server
}

fn json(value: &impl Serialize) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::from(anyhow::Error::new(e)))
}

/// Runs `f` on the store on a blocking thread: SQLite calls block (up to the store's busy
/// timeout), and an async worker must not.
pub async fn on_store<T, F>(store: &SharedStore, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&mut Store) -> Result<T, ApiError> + Send + 'static,
{
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.with(|s| Ok(f(s))))
        .await
        .map_err(|e| ApiError::from(anyhow::Error::new(e).context("the store's thread")))?
        .map_err(ApiError::from)?
}
