//! A client of a running connector's API, for the CLI's `--api URL`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::http::StatusCode;

use super::errors::ApiError;
use super::requests::ApiRequest;

/// One request may take this long: ImportServerCatalog reads whole inventories.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// A connector's API at a base URL, with its token.
pub struct ApiClient {
    base_url: String,
    token: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for ApiClient {
    // Written by hand so the token is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// A client of the API at `base_url` (`http://127.0.0.1:8080`), trusting an https://
    /// server's certificate as `tls` says (a pinned thumbprint for an appliance's
    /// self-signed one).
    pub fn new(base_url: &str, token: String, tls: &rehost_vsphere::Tls) -> Result<ApiClient> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            bail!("--api must be an http(s):// URL, got {base_url:?}");
        }
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("rehost/", env!("CARGO_PKG_VERSION")));
        if let Some(config) =
            rehost_vsphere::tls::client_config(tls).context("the API's TLS settings")?
        {
            builder = builder.tls_backend_preconfigured(config);
        }
        let http = builder.build().context("building the HTTP client")?;
        Ok(ApiClient {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }

    /// Sends `request`; an error answer becomes an [`ApiError`] (code and message as the
    /// API gave them) inside the returned error.
    pub async fn execute(&self, request: &ApiRequest) -> Result<serde_json::Value> {
        let operation = request.operation();
        let url = format!("{}{}", self.base_url, operation.path());
        let body = serde_json::to_vec(&request.body()?)?;
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .with_context(|| format!("{} at {url}", operation.name()))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .with_context(|| format!("reading the answer to {}", operation.name()))?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .with_context(|| format!("the answer to {} is not JSON", operation.name()));
        }
        let mut error: ApiError = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UnexpectedAnswer",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(500)
                    .collect::<String>(),
            )
        });
        error.status =
            StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Err(anyhow::Error::new(error).context(format!("{} at {url}", operation.name())))
    }
}
