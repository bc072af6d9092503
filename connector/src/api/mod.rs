//! `rehost serve`: the connector's API (SMS's operations as `POST /v1/{Operation}` JSON
//! endpoints, bearer-token auth, `/healthz`, `/metrics`), the scheduler and the webhook
//! poster, in one process until Ctrl-C or SIGTERM.
//!
//! Plain HTTP: meant for loopback or a private network until the appliance brings TLS.

pub mod auth;
pub mod client;
pub mod errors;
pub mod metrics;
#[cfg(test)]
mod openapi_test;
pub mod requests;
pub mod responses;
pub mod routes;
pub mod service;
pub mod tls;
pub mod webhook;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::sync::watch;

use crate::config::Config;
use crate::jobs::model::Timestamp;
use crate::scheduler::Scheduler;
use crate::store::SharedStore;
use auth::ApiToken;
use routes::{AppState, SchedulerSlot};
use service::{ConnectorInfo, Service};

/// `rehost serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The config file (else $REHOST_CONFIG, else ./rehost.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Runs the connector until Ctrl-C or SIGTERM.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let config = Config::locate(args.config.as_deref())?;
    let Some(token) = config.api_token()? else {
        bail!(
            "refusing to serve the API without a token: set `token_env` (an environment variable holding it) or `token_file` in the [api] section of {}",
            config.file.display()
        );
    };
    crate::aws_args::runtime()?.block_on(serve(config, ApiToken::new(&token)))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config, token: ApiToken) -> Result<()> {
    let config = Arc::new(config);
    let store_path = config.store_path();
    let store = SharedStore::for_config(&config)
        .with_context(|| format!("opening the store {}", store_path.display()))?;
    let listener = tokio::net::TcpListener::bind(&config.api.listen)
        .await
        .with_context(|| format!("[api] listen: binding {}", config.api.listen))?;
    let address = listener
        .local_addr()
        .context("reading the address the API listens on")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let scheduler = Scheduler::start(config.clone(), store.clone(), shutdown_rx.clone())
        .context("starting the scheduler")?;
    let scheduler: SchedulerSlot = Arc::new(Mutex::new(Some(scheduler)));
    let webhook = match &config.api.webhook_url {
        Some(url) => Some(
            webhook::spawn(url.clone(), store.clone(), shutdown_rx.clone())
                .context("starting the webhook poster")?,
        ),
        None => None,
    };

    let service = Service::new(
        config.clone(),
        store,
        ConnectorInfo {
            ip_address: Some(address.ip().to_string()),
            started_at: Timestamp::now(),
        },
    );
    let app = routes::router(
        AppState {
            service: Arc::new(service),
            scheduler: scheduler.clone(),
        },
        token,
    );

    let tls = match (&config.api.tls_cert_file, &config.api.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls::load(&config.resolve(cert), &config.resolve(key))?),
        _ => None,
    };
    tracing::info!(%address, store = %store_path.display(), webhook = config.api.webhook_url.is_some(), https = tls.is_some(), "serving the API");
    // One line on stderr that people and tests read to find the port (`listen = "…:0"`).
    match tls {
        Some(tls) => {
            eprintln!(
                "listening on https://{address} (certificate SHA-256 {})",
                tls.thumbprint
            );
            axum::serve(tls::TlsListener::new(listener, tls.config)?, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
                .context("serving the API")?;
        }
        None => {
            eprintln!("listening on http://{address}");
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
                .context("serving the API")?;
        }
    }

    // The server has stopped taking requests and finished those in flight; now the
    // background work stops.
    tracing::info!("shutting down: stopping the scheduler and the webhook poster");
    let _ = shutdown_tx.send(true);
    let scheduler = scheduler
        .lock()
        .map_err(|_| anyhow::anyhow!("the scheduler's slot is poisoned"))?
        .take();
    if let Some(scheduler) = scheduler {
        scheduler.stopped().await;
    }
    if let Some(webhook) = webhook {
        let _ = webhook.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (what systemd and `docker stop` send).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}
