//! The SOAP session: connect, log in, call methods, log in again when the session
//! expires, and the PropertyCollector reads every other module builds on.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, COOKIE, HeaderValue, SET_COOKIE};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::soap::model::{AboutInfo, ObjectContent, RetrieveResult, ServiceContent};
use crate::soap::{MoRef, Node, Reply, Request, escape, parse_reply};
use crate::tls::{Tls, client_config, tls_failure};

/// The session cookie vCenter and ESXi set at login.
const SESSION_COOKIE: &str = "vmware_soap_session";

/// Sent before we know the server's API version: every vCenter since 6.7 accepts it, and
/// the version the server reports replaces it right after RetrieveServiceContent.
const INITIAL_API_VERSION: &str = "6.7";

/// How many objects a PropertyCollector page holds by default: big enough that a 5,000-VM
/// inventory takes a few dozen round trips, small enough that one page of VMs with their
/// device lists stays a few megabytes.
pub const DEFAULT_PAGE_SIZE: u32 = 200;

/// A password whose `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: impl Into<String>) -> Self {
        Password(password.into())
    }

    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Password {
    fn from(s: &str) -> Self {
        Password::new(s)
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The SDK endpoint, `https://vcenter.example.com/sdk`.
    pub url: String,
    /// User name (`administrator@vsphere.local`).
    pub username: String,
    /// Password.
    pub password: Password,
    /// How to trust the server's certificate.
    pub tls: Tls,
    /// Timeout of each HTTP request (not of the tasks they start).
    pub timeout: Duration,
    /// Objects per PropertyCollector page (`maxObjects`), [`DEFAULT_PAGE_SIZE`] unless set.
    pub page_size: u32,
}

impl ConnectOptions {
    /// Options with the system's trust store and a 5-minute request timeout (a
    /// RetrievePropertiesEx over thousands of VMs can take a minute on a busy vCenter).
    pub fn new(url: impl Into<String>, username: impl Into<String>, password: Password) -> Self {
        ConnectOptions {
            url: url.into(),
            username: username.into(),
            password,
            tls: Tls::System,
            timeout: Duration::from_secs(300),
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// A logged-in vSphere session. Cheap to clone; clones share the session and may be used
/// concurrently.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.url.as_str())
            .field("username", &self.inner.username)
            .finish_non_exhaustive()
    }
}

struct Inner {
    http: reqwest::Client,
    url: Url,
    username: String,
    password: Password,
    content: ServiceContent,
    soap_action: HeaderValue,
    page_size: u32,
    /// `vmware_soap_session=…`, replaced on re-login.
    cookie: RwLock<Option<String>>,
    /// Counts logins: objects a session owns (container views) die with it, and a
    /// caller holding one can tell from this that it must start over.
    logins: AtomicU64,
    /// Serialises re-logins so that concurrent calls hitting an expired session log in
    /// once, not once each.
    relogin: tokio::sync::Mutex<()>,
}

impl Client {
    /// Connects, reads the service content and logs in.
    pub async fn connect(options: ConnectOptions) -> Result<Client> {
        let url = Url::parse(&options.url)
            .map_err(|e| Error::Config(format!("URL {:?}: {e}", options.url)))?;
        if url.host_str().is_none() {
            return Err(Error::Config(format!("URL {:?} has no host", options.url)));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(Duration::from_secs(30));
        if let Some(config) = client_config(&options.tls)? {
            builder = builder.tls_backend_preconfigured(config);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        let content_node = call_raw(
            &http,
            &url,
            &soap_action(INITIAL_API_VERSION)?,
            None,
            &Request::new(
                "RetrieveServiceContent",
                &MoRef::new("ServiceInstance", "ServiceInstance"),
            ),
        )
        .await?
        .0;
        let content =
            ServiceContent::from_node(returnval(&content_node, "RetrieveServiceContent")?)
                .map_err(|e| protocol("RetrieveServiceContent", e))?;
        debug!(server = %content.about.full_name, "vSphere service content read");
        let client = Client {
            inner: Arc::new(Inner {
                http,
                soap_action: soap_action(&content.about.api_version)?,
                url,
                page_size: options.page_size.max(1),
                username: options.username,
                password: options.password,
                content,
                cookie: RwLock::new(None),
                logins: AtomicU64::new(0),
                relogin: tokio::sync::Mutex::new(()),
            }),
        };
        client.login().await?;
        Ok(client)
    }

    /// What the server is.
    pub fn about(&self) -> &AboutInfo {
        &self.inner.content.about
    }

    /// The service content read at connect time.
    pub fn service_content(&self) -> &ServiceContent {
        &self.inner.content
    }

    /// The SDK URL connected to.
    pub fn url(&self) -> &Url {
        &self.inner.url
    }

    /// The user name logged in with.
    pub fn username(&self) -> &str {
        &self.inner.username
    }

    /// How many times this client logged in; changes when the session was renewed.
    pub(crate) fn session_generation(&self) -> u64 {
        self.inner.logins.load(Ordering::SeqCst)
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    /// The session cookie header value, for datastore and NFC transfers.
    pub(crate) fn cookie(&self) -> Option<String> {
        self.inner.cookie.read().ok().and_then(|c| c.clone())
    }

    async fn login(&self) -> Result<()> {
        let mut req = Request::new("Login", &self.inner.content.session_manager);
        req.text("userName", &self.inner.username)
            .text("password", self.inner.password.expose());
        let result = call_raw(
            &self.inner.http,
            &self.inner.url,
            &self.inner.soap_action,
            None,
            &req,
        )
        .await;
        let (_, cookie) = match result {
            Err(Error::InvalidLogin { .. }) => {
                return Err(Error::InvalidLogin {
                    url: self.inner.url.to_string(),
                    user: self.inner.username.clone(),
                });
            }
            other => other?,
        };
        let cookie = cookie.ok_or_else(|| Error::Protocol {
            method: "Login".into(),
            detail: format!("no {SESSION_COOKIE} cookie in the reply"),
        })?;
        if let Ok(mut slot) = self.inner.cookie.write() {
            *slot = Some(cookie);
        }
        self.inner.logins.fetch_add(1, Ordering::SeqCst);
        info!(url = %self.inner.url, user = %self.inner.username, "logged in to vSphere");
        Ok(())
    }

    /// Ends the session. Other clones cannot be used afterwards.
    pub async fn logout(&self) -> Result<()> {
        let req = Request::new("Logout", &self.inner.content.session_manager);
        self.call(&req).await?;
        if let Ok(mut slot) = self.inner.cookie.write() {
            *slot = None;
        }
        Ok(())
    }

    /// Calls a method and returns its response element; logs in again once if the session
    /// expired.
    pub async fn call(&self, req: &Request) -> Result<Node> {
        let cookie = self.cookie();
        let first = call_raw(
            &self.inner.http,
            &self.inner.url,
            &self.inner.soap_action,
            cookie.as_deref(),
            req,
        )
        .await;
        match first {
            Err(Error::NotAuthenticated { .. }) => {
                warn!(
                    method = req.method(),
                    "vSphere session expired; logging in again"
                );
                {
                    let _guard = self.inner.relogin.lock().await;
                    // Another call may have logged in while we waited.
                    if self.cookie() == cookie {
                        self.login().await?;
                    }
                }
                let cookie = self.cookie();
                call_raw(
                    &self.inner.http,
                    &self.inner.url,
                    &self.inner.soap_action,
                    cookie.as_deref(),
                    req,
                )
                .await
                .map(|(node, _)| node)
            }
            other => other.map(|(node, _)| node),
        }
    }

    /// Calls a method whose result is one managed object reference.
    pub(crate) async fn call_moref(&self, req: &Request) -> Result<MoRef> {
        let response = self.call(req).await?;
        let rv = returnval(&response, req.method())?;
        MoRef::from_node(rv).map_err(|e| protocol(req.method(), e))
    }

    /// RetrievePropertiesEx with `spec_set` (the `<specSet>…</specSet>` XML), following
    /// ContinueRetrievePropertiesEx until the last page.
    pub(crate) async fn retrieve(&self, spec_set: &str) -> Result<Vec<ObjectContent>> {
        let pc = &self.inner.content.property_collector;
        let mut req = Request::new("RetrievePropertiesEx", pc);
        req.raw(spec_set).raw(&format!(
            "<options><maxObjects>{}</maxObjects></options>",
            self.inner.page_size
        ));
        let response = self.call(&req).await?;
        let mut page =
            RetrieveResult::from_response(&response).map_err(|e| protocol(req.method(), e))?;
        let mut objects = std::mem::take(&mut page.objects);
        while let Some(token) = page.token.take() {
            let mut next = Request::new("ContinueRetrievePropertiesEx", pc);
            next.text("token", &token);
            let response = self.call(&next).await?;
            page =
                RetrieveResult::from_response(&response).map_err(|e| protocol(next.method(), e))?;
            objects.append(&mut page.objects);
        }
        Ok(objects)
    }

    /// The properties `paths` of one object (those unset are absent).
    pub(crate) async fn retrieve_one(&self, obj: &MoRef, paths: &[&str]) -> Result<ObjectContent> {
        let spec = format!(
            "<specSet><propSet><type>{}</type>{}</propSet><objectSet><obj type=\"{}\">{}</obj>\
             <skip>false</skip></objectSet></specSet>",
            escape(&obj.kind),
            path_set(paths),
            escape(&obj.kind),
            escape(&obj.value)
        );
        let mut objects = self.retrieve(&spec).await?;
        match objects.pop() {
            Some(content) => Ok(content),
            // The collector answers nothing (not a fault) for an object that is gone.
            None => Err(Error::ManagedObjectNotFound {
                method: "RetrievePropertiesEx".into(),
                object: obj.to_string(),
            }),
        }
    }

    /// A ContainerView of `types` over the root folder, recursive.
    pub(crate) async fn create_container_view(&self, types: &[&str]) -> Result<MoRef> {
        let root = self.inner.content.root_folder.clone();
        self.create_container_view_in(&root, types).await
    }

    /// A ContainerView of `types` over `container`, recursive.
    pub(crate) async fn create_container_view_in(
        &self,
        container: &MoRef,
        types: &[&str],
    ) -> Result<MoRef> {
        let mut req = Request::new("CreateContainerView", &self.inner.content.view_manager);
        req.moref("container", container);
        for t in types {
            req.text("type", t);
        }
        req.text("recursive", "true");
        self.call_moref(&req).await
    }

    /// Destroys a view; failures are logged, not returned (the session's end frees it).
    pub(crate) async fn destroy_view(&self, view: &MoRef) {
        let req = Request::new("DestroyView", view);
        if let Err(e) = self.call(&req).await {
            warn!(view = %view, error = %e, "DestroyView failed");
        }
    }
}

/// `<pathSet>` elements for `paths`.
pub(crate) fn path_set(paths: &[&str]) -> String {
    paths
        .iter()
        .map(|p| format!("<pathSet>{}</pathSet>", escape(p)))
        .collect()
}

/// The `returnval` of a response, or a protocol error naming the method.
pub(crate) fn returnval<'a>(response: &'a Node, method: &str) -> Result<&'a Node> {
    response.child("returnval").ok_or_else(|| Error::Protocol {
        method: method.to_owned(),
        detail: "no returnval in the response".into(),
    })
}

/// A protocol error of `method` from a model error.
pub(crate) fn protocol(method: &str, e: impl fmt::Display) -> Error {
    Error::Protocol {
        method: method.to_owned(),
        detail: e.to_string(),
    }
}

/// A transport error, or a TLS error said plainly when the chain holds one.
pub(crate) fn transport(url: &Url, what: &str, e: reqwest::Error) -> Error {
    if let Some(message) = tls_failure(&e) {
        return Error::Tls {
            host: url.host_str().unwrap_or_default().to_owned(),
            message,
        };
    }
    Error::Transport {
        what: what.to_owned(),
        source: e,
    }
}

fn soap_action(api_version: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(&format!("urn:vim25/{api_version}"))
        .map_err(|e| Error::Config(format!("API version {api_version:?}: {e}")))
}

/// One POST; returns the response element and the session cookie if one was set.
async fn call_raw(
    http: &reqwest::Client,
    url: &Url,
    soap_action: &HeaderValue,
    cookie: Option<&str>,
    req: &Request,
) -> Result<(Node, Option<String>)> {
    let method = req.method();
    let mut builder = http
        .post(url.clone())
        .header(CONTENT_TYPE, "text/xml; charset=utf-8")
        .header("SOAPAction", soap_action.clone())
        .body(req.envelope());
    if let Some(cookie) = cookie {
        builder = builder.header(COOKIE, cookie);
    }
    let response = builder
        .send()
        .await
        .map_err(|e| transport(url, method, e))?;
    let status = response.status();
    let new_cookie = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session_cookie);
    let body = response
        .bytes()
        .await
        .map_err(|e| transport(url, method, e))?;
    // Faults come with 500; anything else but 200 is not a SOAP answer.
    if status.as_u16() != 200 && status.as_u16() != 500 {
        return Err(Error::Http {
            what: method.to_owned(),
            status: status.as_u16(),
            body: snippet(&body),
        });
    }
    match parse_reply(&body) {
        Ok(Reply::Response(node)) => Ok((node, new_cookie)),
        Ok(Reply::Fault(fault)) => Err(Error::from_fault(method, &fault)),
        Err(e) => Err(Error::Protocol {
            method: method.to_owned(),
            detail: format!("HTTP {status}: {e}: {}", snippet(&body)),
        }),
    }
}

/// `vmware_soap_session="…"` out of a Set-Cookie header, without its attributes.
fn session_cookie(header: &str) -> Option<String> {
    let pair = header.split(';').next()?.trim();
    let (name, _) = pair.split_once('=')?;
    (name.trim() == SESSION_COOKIE).then(|| pair.to_owned())
}

/// The first 200 characters of a body, for an error message.
pub(crate) fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_not_printed() {
        let opts = ConnectOptions::new("https://h/sdk", "u", Password::new("hunter2"));
        let text = format!("{opts:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("***"));
    }

    #[test]
    fn session_cookie_is_taken_without_attributes() {
        assert_eq!(
            session_cookie(r#"vmware_soap_session="52c1"; Path=/; HttpOnly; Secure;"#).as_deref(),
            Some(r#"vmware_soap_session="52c1""#)
        );
        assert_eq!(session_cookie("other=1; Path=/"), None);
    }
}
