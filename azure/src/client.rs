//! The Resource Manager and blob client: one reqwest client (rustls, optional extra CA),
//! a token cached and renewed before it expires, retries of throttled (429, `ServerBusy`)
//! and failed (5xx, connection) requests honouring `Retry-After`, long-running operations
//! polled through `Azure-AsyncOperation` or `Location`, and `nextLink` paging.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tracing::{debug, warn};

use crate::auth::{
    ARM_RESOURCE, ARM_SCOPE, Credential, DEFAULT_IMDS_URL, Token, parse_entra_answer,
    parse_imds_answer, renew_after,
};
use crate::error::{Error, Result, excerpt, parse_arm_error, parse_blob_error};

/// Resource Manager API versions of the calls we make (ones every public cloud region has).
pub mod api {
    /// Virtual machines, their instance view and sizes.
    pub const COMPUTE_VMS: &str = "2024-07-01";
    /// Managed disks and snapshots.
    pub const COMPUTE_DISKS: &str = "2024-03-02";
    /// Subscriptions.
    pub const SUBSCRIPTIONS: &str = "2022-12-01";
    /// The caller's permissions.
    pub const PERMISSIONS: &str = "2022-04-01";
    /// The blob service: 2019-07-07 or later is needed for `x-ms-previous-snapshot-url`
    /// (older versions silently ignore it and list every page), 2020-10-02 or later for
    /// paged page lists.
    pub const STORAGE: &str = "2021-08-06";
}

/// How failed requests are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Tries in all, the first included.
    pub attempts: u32,
    /// The wait before the second try when the answer gives no `Retry-After`; doubled each time.
    pub first_delay: Duration,
    /// The longest wait between tries, whatever `Retry-After` says.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Who we are.
    pub credential: Credential,
    /// The subscription holding the VMs.
    pub subscription_id: String,
    /// Only these resource groups (all when empty).
    pub resource_groups: Vec<String>,
    /// Entra ID (`https://login.microsoftonline.com`).
    pub authority_url: String,
    /// Resource Manager (`https://management.azure.com`).
    pub resource_manager_url: String,
    /// The instance metadata service, for a managed identity.
    pub imds_url: String,
    /// A PEM file of CA certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Retries of throttled and failed requests.
    pub retry: RetryPolicy,
    /// How long a long-running operation may take.
    pub operation_timeout: Duration,
}

impl ConnectOptions {
    /// Options with Azure's public-cloud endpoints.
    pub fn new(credential: Credential, subscription_id: impl Into<String>) -> Self {
        ConnectOptions {
            credential,
            subscription_id: subscription_id.into(),
            resource_groups: Vec::new(),
            authority_url: "https://login.microsoftonline.com".into(),
            resource_manager_url: "https://management.azure.com".into(),
            imds_url: DEFAULT_IMDS_URL.into(),
            ca_file: None,
            retry: RetryPolicy::default(),
            operation_timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// An Azure client; clones share the connection pool and the token.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    options: ConnectOptions,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

#[derive(Debug)]
struct CachedToken {
    token: Token,
    fetched: Instant,
}

/// An answer that was not retried any further: status, headers and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self, operation: &str) -> Result<Value> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| Error::Protocol {
            operation: operation.to_owned(),
            detail: format!("{e}: {}", excerpt(&self.body)),
        })
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

impl Client {
    /// A client for `options`; nothing is sent until the first call.
    pub fn new(options: ConnectOptions) -> Result<Client> {
        for (what, url) in [
            ("authority_url", &options.authority_url),
            ("resource_manager_url", &options.resource_manager_url),
        ] {
            if reqwest::Url::parse(url).is_err() {
                return Err(Error::Config(format!("{what} {url:?} is not a URL")));
            }
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            // A ranged GET of 4 MiB or an ARM call never takes this long on a live link.
            .read_timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(32);
        if let Some(path) = &options.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(Error::Config(format!(
                    "CA file {} holds no certificate",
                    path.display()
                )));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                options,
                token: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The options the client was made with.
    pub fn options(&self) -> &ConnectOptions {
        &self.inner.options
    }

    /// The subscription's resource id, `/subscriptions/{id}`.
    pub fn subscription_path(&self) -> String {
        format!("/subscriptions/{}", self.inner.options.subscription_id)
    }

    /// A bearer token for Resource Manager, from the cache while it is fresh.
    pub async fn token(&self) -> Result<String> {
        let mut cached = self.inner.token.lock().await;
        if let Some(c) = cached.as_ref()
            && c.fetched.elapsed() < renew_after(c.token.lifetime)
        {
            return Ok(c.token.access_token.clone());
        }
        let fetched = Instant::now();
        let token = self.fetch_token().await?;
        debug!(lifetime = ?token.lifetime, "got a Resource Manager token");
        let access = token.access_token.clone();
        *cached = Some(CachedToken { token, fetched });
        Ok(access)
    }

    async fn forget_token(&self) {
        *self.inner.token.lock().await = None;
    }

    async fn fetch_token(&self) -> Result<Token> {
        let options = &self.inner.options;
        match &options.credential {
            Credential::ClientSecret {
                tenant_id,
                client_id,
                secret,
            } => {
                let url = format!(
                    "{}/{}/oauth2/v2.0/token",
                    options.authority_url.trim_end_matches('/'),
                    encode(tenant_id)
                );
                let form = format!(
                    "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
                    encode(client_id),
                    encode(secret.expose()),
                    encode(ARM_SCOPE)
                );
                let answer = self
                    .send_retrying(&format!("token from {url}"), || {
                        self.inner
                            .http
                            .post(&url)
                            .header("content-type", "application/x-www-form-urlencoded")
                            .body(form.clone())
                    })
                    .await?;
                parse_entra_answer(answer.status.as_u16(), &answer.body, &url, client_id)
            }
            Credential::ManagedIdentity { client_id } => {
                let mut url = format!(
                    "{}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}",
                    options.imds_url.trim_end_matches('/'),
                    encode(ARM_RESOURCE)
                );
                if let Some(id) = client_id {
                    url.push_str(&format!("&client_id={}", encode(id)));
                }
                let answer = self
                    .send_retrying(&format!("managed identity token from {url}"), || {
                        self.inner.http.get(&url).header("Metadata", "true")
                    })
                    .await?;
                parse_imds_answer(answer.status.as_u16(), &answer.body, &url)
            }
        }
    }

    /// The absolute URL of a Resource Manager path with its `api-version`.
    pub fn arm_url(&self, path: &str, api_version: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!(
            "{}{path}{sep}api-version={api_version}",
            self.inner
                .options
                .resource_manager_url
                .trim_end_matches('/')
        )
    }

    /// Sends a Resource Manager request (retrying throttling and failures, renewing an
    /// expired token once); any answer but a 2xx becomes [`Error::Arm`].
    pub async fn arm(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        operation: &str,
    ) -> Result<Answer> {
        let mut renewed = false;
        loop {
            let token = self.token().await?;
            let body = body.map(|b| b.to_string());
            let answer = self
                .send_retrying(operation, || {
                    let mut request = self
                        .inner
                        .http
                        .request(method.clone(), url)
                        .bearer_auth(&token);
                    if let Some(body) = &body {
                        request = request
                            .header("content-type", "application/json")
                            .body(body.clone());
                    }
                    request
                })
                .await?;
            if answer.status.is_success() {
                return Ok(answer);
            }
            let (code, message) = parse_arm_error(&answer.body);
            if answer.status == StatusCode::UNAUTHORIZED && !renewed {
                // The token expired or was revoked under us: one fresh token, once.
                debug!(%code, "token refused; getting a new one");
                self.forget_token().await;
                renewed = true;
                continue;
            }
            return Err(Error::Arm {
                operation: operation.to_owned(),
                status: answer.status.as_u16(),
                code,
                message,
            });
        }
    }

    /// GETs a Resource Manager path as JSON.
    pub async fn get_json(&self, path: &str, api_version: &str, operation: &str) -> Result<Value> {
        let url = self.arm_url(path, api_version);
        self.arm(Method::GET, &url, None, operation)
            .await?
            .json(operation)
    }

    /// Every item of a Resource Manager list, following `nextLink`.
    pub async fn list(&self, path: &str, api_version: &str, operation: &str) -> Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut url = self.arm_url(path, api_version);
        let mut pages = 0u32;
        loop {
            let page = self
                .arm(Method::GET, &url, None, operation)
                .await?
                .json(operation)?;
            pages += 1;
            match page.get("value") {
                Some(Value::Array(values)) => items.extend(values.iter().cloned()),
                _ => {
                    return Err(Error::Protocol {
                        operation: operation.to_owned(),
                        detail: "a list without `value`".into(),
                    });
                }
            }
            match page.get("nextLink").and_then(Value::as_str) {
                Some(next) if !next.is_empty() => {
                    if pages > 100_000 {
                        return Err(Error::Protocol {
                            operation: operation.to_owned(),
                            detail: "nextLink never ends".into(),
                        });
                    }
                    url = next.to_owned();
                }
                _ => return Ok(items),
            }
        }
    }

    /// Starts a long-running operation and waits for it: the final status body of
    /// `Azure-AsyncOperation` (its `properties.output` holds a POST's result), or the last
    /// answer of `Location` polling, or the first answer when it was synchronous. With
    /// `want_result`, a result the status lacks is read from `Location`.
    pub async fn long_running(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        operation: &str,
        want_result: bool,
    ) -> Result<LongRunning> {
        let first = self.arm(method, url, body, operation).await?;
        let async_url = first.header("azure-asyncoperation");
        let location = first.header("location");
        if first.status != StatusCode::ACCEPTED
            && first.status != StatusCode::CREATED
            && async_url.is_none()
        {
            return Ok(LongRunning {
                status: first.json(operation)?,
                result: None,
                first_status: first.status,
            });
        }
        let started = Instant::now();
        let timeout = self.inner.options.operation_timeout;
        let mut wait = retry_after(&first.headers);
        if let Some(status_url) = async_url {
            loop {
                self.sleep_polling(wait, started, timeout, operation)
                    .await?;
                let answer = self.arm(Method::GET, &status_url, None, operation).await?;
                let status = answer.json(operation)?;
                let state = status
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                match state.as_str() {
                    "Succeeded" => {
                        // A POST's result may only be at Location (beginGetAccess puts it in
                        // both places); ask there when the status has none.
                        let result = match (&location, status.pointer("/properties/output")) {
                            (_, Some(output)) => Some(output.clone()),
                            (Some(location), None) if want_result => {
                                let last = self.arm(Method::GET, location, None, operation).await?;
                                Some(last.json(operation)?)
                            }
                            _ => None,
                        };
                        return Ok(LongRunning {
                            status,
                            result,
                            first_status: first.status,
                        });
                    }
                    "Failed" | "Canceled" => {
                        let code = status
                            .pointer("/error/code")
                            .and_then(Value::as_str)
                            .unwrap_or("Unknown")
                            .to_owned();
                        let message = status
                            .pointer("/error/message")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned();
                        return Err(Error::OperationFailed {
                            operation: operation.to_owned(),
                            status: state,
                            code,
                            message,
                        });
                    }
                    _ => wait = retry_after(&answer.headers),
                }
            }
        }
        let Some(location) = location else {
            return Err(Error::Protocol {
                operation: operation.to_owned(),
                detail: format!(
                    "{} without Azure-AsyncOperation or Location to follow",
                    first.status
                ),
            });
        };
        loop {
            self.sleep_polling(wait, started, timeout, operation)
                .await?;
            let answer = self.arm(Method::GET, &location, None, operation).await?;
            if answer.status != StatusCode::ACCEPTED {
                let result = answer.json(operation)?;
                return Ok(LongRunning {
                    status: Value::Null,
                    result: Some(result),
                    first_status: first.status,
                });
            }
            wait = retry_after(&answer.headers);
        }
    }

    async fn sleep_polling(
        &self,
        wait: Option<Duration>,
        started: Instant,
        timeout: Duration,
        operation: &str,
    ) -> Result<()> {
        if started.elapsed() > timeout {
            return Err(Error::Timeout {
                operation: operation.to_owned(),
                seconds: timeout.as_secs(),
            });
        }
        // Azure's guidance: poll no sooner than Retry-After; without one, a short default.
        let wait = wait
            .unwrap_or(Duration::from_millis(500))
            .min(self.inner.options.retry.max_delay);
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// A GET of a blob (a snapshot's SAS URL) with extra headers, retrying throttling and
    /// failures; a non-2xx answer becomes [`Error::Blob`].
    pub async fn blob_get(
        &self,
        url: &str,
        headers: &[(&str, String)],
        operation: &str,
    ) -> Result<Answer> {
        let answer = self
            .send_retrying(operation, || {
                let mut request = self
                    .inner
                    .http
                    .get(url)
                    .header("x-ms-version", api::STORAGE);
                for (name, value) in headers {
                    request = request.header(*name, value);
                }
                request
            })
            .await?;
        if answer.status.is_success() {
            return Ok(answer);
        }
        let header_code = answer.header("x-ms-error-code");
        let (code, message) = parse_blob_error(&answer.body, header_code.as_deref());
        Err(Error::Blob {
            operation: operation.to_owned(),
            status: answer.status.as_u16(),
            code,
            message,
        })
    }

    /// Sends what `build` makes, again while the answer is a 429, a 5xx or no answer,
    /// waiting `Retry-After` (or doubling delays); returns the last answer.
    async fn send_retrying(
        &self,
        operation: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer> {
        let policy = &self.inner.options.retry;
        let mut delay = policy.first_delay;
        let mut attempt = 1;
        loop {
            let outcome = match build().send().await {
                Ok(response) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    match response.bytes().await {
                        Ok(body) => Ok(Answer {
                            status,
                            headers,
                            body,
                        }),
                        Err(source) => Err(Error::Http {
                            operation: operation.to_owned(),
                            source,
                        }),
                    }
                }
                Err(source) => Err(Error::Http {
                    operation: operation.to_owned(),
                    source,
                }),
            };
            let (retry, wait) = match &outcome {
                Ok(answer) if retryable_status(answer.status) => {
                    (true, retry_after(&answer.headers))
                }
                Ok(_) => (false, None),
                Err(_) => (true, None),
            };
            if !retry || attempt >= policy.attempts {
                return outcome;
            }
            let wait = wait.unwrap_or(delay).min(policy.max_delay);
            match &outcome {
                Ok(answer) => warn!(
                    operation,
                    status = answer.status.as_u16(),
                    attempt,
                    wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                    "Azure asked to retry"
                ),
                Err(e) => warn!(operation, attempt, error = %e, "request failed; retrying"),
            }
            tokio::time::sleep(wait).await;
            delay = (delay * 2).min(policy.max_delay);
            attempt += 1;
        }
    }
}

/// What a long-running operation ended with.
#[derive(Debug, Clone)]
pub struct LongRunning {
    /// The final `Azure-AsyncOperation` status body (or the synchronous answer).
    pub status: Value,
    /// The operation's result: `properties.output`, or the last `Location` answer.
    pub result: Option<Value>,
    /// The status of the first answer (201/202: started; 200: done at once; 204: nothing to do).
    pub first_status: StatusCode,
}

fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// `Retry-After` in seconds (Azure sends seconds; an HTTP date is not used by ARM).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Percent-encodes a form or query value.
pub(crate) fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn urls_get_their_api_version() {
        let client = Client::new(ConnectOptions::new(
            Credential::ManagedIdentity { client_id: None },
            "sub",
        ))
        .expect("client");
        assert_eq!(
            client.arm_url("/subscriptions/sub", "2022-12-01"),
            "https://management.azure.com/subscriptions/sub?api-version=2022-12-01"
        );
        assert_eq!(
            client.arm_url("/x?$filter=a", "1"),
            "https://management.azure.com/x?$filter=a&api-version=1"
        );
    }

    #[test]
    fn only_throttling_and_failures_are_retried() {
        assert!(retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable_status(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retryable_status(StatusCode::FORBIDDEN));
        assert!(!retryable_status(StatusCode::NOT_FOUND));
    }
}
