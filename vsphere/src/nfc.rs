//! ExportVm: an HttpNfcLease whose URLs serve the powered-off VM's disks as
//! streamOptimized VMDKs, kept alive while downloading and always completed or aborted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::Url;
use reqwest::header::COOKIE;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::client::{Client, protocol, snippet, transport};
use crate::error::{Error, Result, from_fault_parts};
use crate::soap::model::HttpNfcLeaseInfo;
use crate::soap::{MoRef, Request, escape};

/// How an export runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportOptions {
    /// How often the lease is told of progress. vCenter cancels a lease after 5 minutes
    /// without it; once a minute leaves room for a slow call or two.
    pub keepalive_interval: Duration,
    /// How long the lease may take to become ready (vCenter prepares every disk first).
    pub ready_timeout: Duration,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            keepalive_interval: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(600),
        }
    }
}

/// One file an export lease serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseFile {
    /// The lease's device key (`/vm-42/VirtualLsiLogicController0:0`).
    pub key: String,
    /// Absolute URL, with a `*` host replaced by the host connected to.
    pub url: Url,
    /// Whether it is a disk.
    pub disk: bool,
    /// The file name vCenter proposes (`disk-0.vmdk`), when set.
    pub target_id: Option<String>,
}

/// A ready export lease. Call [`ExportLease::complete`] after the downloads, or
/// [`ExportLease::abort`]; dropping it without either aborts it in the background.
#[derive(Debug)]
pub struct ExportLease {
    keeper: LeaseKeeper,
    vm: MoRef,
    info: HttpNfcLeaseInfo,
}

/// A ready lease kept alive by a background task telling the server its progress, ended
/// by [`LeaseKeeper::complete`] or [`LeaseKeeper::abort`]; dropped without either, it
/// aborts the lease in the background (an error or a cancelled future left it unfinished,
/// and the server should free it at once rather than after the lease timeout).
#[derive(Debug)]
pub(crate) struct LeaseKeeper {
    client: Client,
    lease: MoRef,
    progress: Arc<AtomicU8>,
    keepalive: Option<JoinHandle<()>>,
    finished: Arc<AtomicBool>,
}

impl LeaseKeeper {
    /// Starts the keep-alive of a ready lease.
    pub(crate) fn start(client: &Client, lease: MoRef, interval: Duration) -> LeaseKeeper {
        let progress = Arc::new(AtomicU8::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let keepalive = tokio::spawn(keepalive(
            client.clone(),
            lease.clone(),
            progress.clone(),
            finished.clone(),
            interval,
        ));
        LeaseKeeper {
            client: client.clone(),
            lease,
            progress,
            keepalive: Some(keepalive),
            finished,
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn moref(&self) -> &MoRef {
        &self.lease
    }

    /// The percentage the next keep-alive reports (0–100).
    pub(crate) fn set_progress(&self, percent: u8) {
        self.progress.store(percent.min(100), Ordering::SeqCst);
    }

    /// Reports 100 % and completes the lease.
    pub(crate) async fn complete(mut self) -> Result<()> {
        self.finish();
        let mut req = Request::new("HttpNfcLeaseProgress", &self.lease);
        req.text("percent", "100");
        // The final progress is a courtesy; completion is what counts.
        let _ = self.client.call(&req).await;
        self.client
            .call(&Request::new("HttpNfcLeaseComplete", &self.lease))
            .await?;
        Ok(())
    }

    /// Aborts the lease, telling the server why when `reason` is given (a SystemError
    /// fault with it as the reason and message).
    pub(crate) async fn abort(mut self, reason: Option<&str>) -> Result<()> {
        self.finish();
        let mut req = Request::new("HttpNfcLeaseAbort", &self.lease);
        if let Some(reason) = reason {
            let reason = escape(reason);
            req.raw(&format!(
                "<fault><fault xsi:type=\"SystemError\"><reason>{reason}</reason></fault>\
                 <localizedMessage>{reason}</localizedMessage></fault>"
            ));
        }
        self.client.call(&req).await?;
        Ok(())
    }

    fn finish(&mut self) {
        self.finished.store(true, Ordering::SeqCst);
        if let Some(handle) = self.keepalive.take() {
            handle.abort();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(handle) = self.keepalive.take() {
            handle.abort();
        }
        let client = self.client.clone();
        let lease = self.lease.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = client
                        .call(&Request::new("HttpNfcLeaseAbort", &lease))
                        .await
                    {
                        warn!(lease = %lease, error = %e, "aborting a dropped lease failed");
                    }
                });
            }
            Err(_) => warn!(lease = %lease, "lease dropped outside a runtime; it expires"),
        }
    }
}

impl Client {
    /// Exports a powered-off VM with the default options.
    pub async fn export_vm(&self, vm: &MoRef) -> Result<ExportLease> {
        self.export_vm_with(vm, ExportOptions::default()).await
    }

    /// Exports a powered-off VM: waits for the lease to be ready and starts its keep-alive.
    pub async fn export_vm_with(&self, vm: &MoRef, options: ExportOptions) -> Result<ExportLease> {
        let req = Request::new("ExportVm", vm);
        let lease = self.call_moref(&req).await?;
        let info = self
            .wait_for_lease(&lease, "ExportVm", &vm.value, options.ready_timeout)
            .await?;
        Ok(ExportLease {
            keeper: LeaseKeeper::start(self, lease, options.keepalive_interval),
            vm: vm.clone(),
            info,
        })
    }

    /// Waits until `lease` (of `method`, for `entity`) is ready and answers its info; a
    /// lease in `error` answers its fault; past `timeout` the lease is aborted.
    pub(crate) async fn wait_for_lease(
        &self,
        lease: &MoRef,
        method: &str,
        entity: &str,
        timeout: Duration,
    ) -> Result<HttpNfcLeaseInfo> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let content = self
                .retrieve_one(lease, &["state", "error", "info"])
                .await?;
            let state = content.prop("state").map(|s| s.trimmed().to_owned());
            match state.as_deref() {
                Some("ready") => {
                    let info = content.prop("info").ok_or_else(|| Error::Protocol {
                        method: method.into(),
                        detail: format!("lease {} is ready without info", lease.value),
                    })?;
                    return HttpNfcLeaseInfo::from_node(info).map_err(|e| protocol(method, e));
                }
                Some("error") => {
                    let error = content.prop("error");
                    let fault = error
                        .and_then(|e| e.child("fault"))
                        .cloned()
                        .unwrap_or_default();
                    let message = error
                        .and_then(|e| e.child_text("localizedMessage"))
                        .unwrap_or_default()
                        .to_owned();
                    let fault_type = fault.xsi_type.clone().unwrap_or_default();
                    if fault_type.is_empty() {
                        return Err(Error::LeaseFailed {
                            method: method.to_owned(),
                            entity: entity.to_owned(),
                            message,
                        });
                    }
                    return Err(from_fault_parts(method, &fault_type, &message, &fault));
                }
                Some("initializing") | None => {}
                Some(other) => {
                    return Err(Error::LeaseFailed {
                        method: method.to_owned(),
                        entity: entity.to_owned(),
                        message: format!("lease is {other} before it was ready"),
                    });
                }
            }
            if started.elapsed() >= timeout {
                let _ = self.call(&Request::new("HttpNfcLeaseAbort", lease)).await;
                return Err(Error::TaskTimeout {
                    task: lease.value.clone(),
                    description: format!("{method} lease initialisation"),
                    seconds: timeout.as_secs(),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// The `state` of a lease (`initializing`, `ready`, `done`, `error`).
    pub async fn lease_state(&self, lease: &MoRef) -> Result<String> {
        let content = self.retrieve_one(lease, &["state"]).await?;
        Ok(content
            .prop("state")
            .map(|s| s.trimmed().to_owned())
            .unwrap_or_default())
    }
}

async fn keepalive(
    client: Client,
    lease: MoRef,
    progress: Arc<AtomicU8>,
    finished: Arc<AtomicBool>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if finished.load(Ordering::SeqCst) {
            return;
        }
        let mut req = Request::new("HttpNfcLeaseProgress", &lease);
        req.text(
            "percent",
            &progress.load(Ordering::SeqCst).min(100).to_string(),
        );
        match client.call(&req).await {
            Ok(_) => debug!(lease = %lease, "lease kept alive"),
            // A failed keep-alive is not fatal by itself; the download that follows
            // reports the lease's end if there is one.
            Err(e) => warn!(lease = %lease, error = %e, "HttpNfcLeaseProgress failed"),
        }
    }
}

impl ExportLease {
    /// The lease's managed object.
    pub fn moref(&self) -> &MoRef {
        self.keeper.moref()
    }

    /// The lease's info as it was when it became ready.
    pub fn info(&self) -> &HttpNfcLeaseInfo {
        &self.info
    }

    /// The files served, disks first in the VM's order, with absolute URLs.
    pub fn files(&self) -> Result<Vec<LeaseFile>> {
        self.info
            .device_urls
            .iter()
            .map(|d| {
                Ok(LeaseFile {
                    key: d.key.clone(),
                    url: absolute_url(self.keeper.client().url(), &d.url)?,
                    disk: d.disk,
                    target_id: d.target_id.clone(),
                })
            })
            .collect()
    }

    /// The disk URLs by the lease's device key.
    pub fn disk_urls(&self) -> Result<Vec<(String, Url)>> {
        Ok(self
            .files()?
            .into_iter()
            .filter(|f| f.disk)
            .map(|f| (f.key, f.url))
            .collect())
    }

    /// Tells the keep-alive how far the export is (0–100), reported at its next call.
    pub fn set_progress(&self, percent: u8) {
        self.keeper.set_progress(percent);
    }

    /// Downloads one file of the lease as a stream of byte chunks.
    pub async fn download(
        &self,
        url: &Url,
    ) -> Result<impl Stream<Item = Result<Bytes>> + Send + 'static + use<>> {
        let client = self.keeper.client();
        let mut req = client.http().get(url.clone());
        if let Some(cookie) = client.cookie() {
            req = req.header(COOKIE, cookie);
        }
        let response = req
            .send()
            .await
            .map_err(|e| transport(url, url.as_str(), e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(Error::Http {
                what: url.to_string(),
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        let url = url.clone();
        Ok(response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|e| transport(&url, url.as_str(), e))))
    }

    /// Ends the lease successfully.
    pub async fn complete(self) -> Result<()> {
        let lease = self.keeper.moref().clone();
        self.keeper.complete().await?;
        debug!(vm = %self.vm, lease = %lease, "export lease completed");
        Ok(())
    }

    /// Ends the lease as failed (the server discards it).
    pub async fn abort(self) -> Result<()> {
        self.keeper.abort(None).await
    }
}

/// Resolves a lease URL: vCenter writes `*` for the host, meaning the one the client
/// connected to.
pub fn absolute_url(sdk: &Url, lease_url: &str) -> Result<Url> {
    let bad = |why: &str| Error::Protocol {
        method: "HttpNfcLease".into(),
        detail: format!("lease URL {lease_url:?}: {why}"),
    };
    let (scheme, rest) = lease_url
        .split_once("://")
        .ok_or_else(|| bad("no scheme"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (h, Some(p)),
        _ => (authority, None),
    };
    let text = if host == "*" {
        let sdk_host = sdk
            .host_str()
            .ok_or_else(|| bad("the SDK URL has no host"))?;
        let sdk_host = if sdk_host.contains(':') && !sdk_host.starts_with('[') {
            format!("[{sdk_host}]")
        } else {
            sdk_host.to_owned()
        };
        let port = match (port, sdk.port()) {
            (Some(p), _) => format!(":{p}"),
            (None, Some(p)) => format!(":{p}"),
            (None, None) => String::new(),
        };
        format!("{scheme}://{sdk_host}{port}{path}")
    } else {
        lease_url.to_owned()
    };
    Url::parse(&text).map_err(|e| bad(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_host_is_the_connected_host() {
        let sdk = Url::parse("https://vc.example.com/sdk").unwrap();
        assert_eq!(
            absolute_url(&sdk, "https://*/nfc/52a/disk-0.vmdk")
                .unwrap()
                .as_str(),
            "https://vc.example.com/nfc/52a/disk-0.vmdk"
        );
        let sdk = Url::parse("https://127.0.0.1:8443/sdk").unwrap();
        assert_eq!(
            absolute_url(&sdk, "https://*/nfc/x").unwrap().as_str(),
            "https://127.0.0.1:8443/nfc/x"
        );
        assert_eq!(
            absolute_url(&sdk, "https://*:9443/nfc/x").unwrap().as_str(),
            "https://127.0.0.1:9443/nfc/x"
        );
        assert_eq!(
            absolute_url(&sdk, "https://esx1.example.com/nfc/x")
                .unwrap()
                .as_str(),
            "https://esx1.example.com/nfc/x"
        );
        assert!(absolute_url(&sdk, "nfc/x").is_err());
    }
}
