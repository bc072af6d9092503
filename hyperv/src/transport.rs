//! WS-Management over HTTP(S): one kept-alive connection per client, authenticated the
//! way Hyper-V hosts are configured — NTLM through `Negotiate` (over plain HTTP with
//! every message sealed, since WinRM refuses unencrypted traffic by default), or Basic
//! over HTTPS only. NTLM authenticates a connection, not a request, so requests go one at
//! a time over one connection, and a dropped connection is re-authenticated.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, WWW_AUTHENTICATE};
use hyper_util::rt::TokioIo;
use smb2::auth::ntlm::{NtlmAuthenticator, NtlmCredentials};
use tokio::net::TcpStream;

use crate::error::{Error, Result};
use crate::ntlm_seal::Sealing;

/// The SOAP 1.2 content type WinRM expects.
const SOAP: &str = "application/soap+xml;charset=UTF-8";
/// The content type of sealed messages (as pywinrm sends them).
const ENCRYPTED: &str = "multipart/encrypted;protocol=\"application/HTTP-SPNEGO-session-encrypted\";boundary=\"Encrypted Boundary\"";
/// A reply larger than this is refused (WinRM's envelopes are at most 500 KiB).
const MAX_REPLY: usize = 16 * 1024 * 1024;

/// How to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// NTLM through `Authorization: Negotiate` (HTTP or HTTPS).
    Ntlm,
    /// `Authorization: Basic` (HTTPS only).
    Basic,
}

/// Who to authenticate as. The password never appears in `Debug` output.
#[derive(Clone)]
pub struct Credentials {
    /// `user`, `DOMAIN\user` or `user@domain`.
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// (domain, user) as NTLM wants them.
    fn split(&self) -> (String, String) {
        split_user(&self.user)
    }
}

/// `DOMAIN\user`, `user@domain` or `user` as (domain, user), the domain empty for a local
/// account: what NTLM takes, for WinRM and SMB alike.
pub fn split_user(user: &str) -> (String, String) {
    if let Some((domain, name)) = user.split_once('\\') {
        return (domain.to_owned(), name.to_owned());
    }
    if let Some((name, domain)) = user.split_once('@') {
        return (domain.to_owned(), name.to_owned());
    }
    (String::new(), user.to_owned())
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `https://hv01:5986/wsman`.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub path: String,
    /// The TLS configuration for `https`, `None` for `http`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    /// Parses `http(s)://host[:port]/path`; ports default to WinRM's 5985 and 5986.
    pub fn parse(url: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Endpoint> {
        let bad = |why: &str| Error::Config(format!("url {url:?}: {why}"));
        let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/wsman"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            _ => (authority, if https { 5986 } else { 5985 }),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let tls = match (https, tls) {
            (true, Some(tls)) => Some(tls),
            (true, None) => return Err(bad("https needs a TLS configuration")),
            (false, _) => None,
        };
        Ok(Endpoint {
            url: url.to_owned(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            path: path.to_owned(),
            tls,
        })
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// An authenticated connection.
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    /// NTLM over plain HTTP: the session's sealing state.
    sealing: Option<Sealing>,
}

/// Sends SOAP envelopes to one WS-Management endpoint.
pub struct Transport {
    endpoint: Endpoint,
    credentials: Credentials,
    method: AuthMethod,
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<Connection>>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("url", &self.endpoint.url)
            .field("user", &self.credentials.user)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A transport; nothing is connected until the first request.
    pub fn new(endpoint: Endpoint, credentials: Credentials, method: AuthMethod) -> Result<Self> {
        if method == AuthMethod::Basic && endpoint.tls.is_none() {
            return Err(Error::Config(format!(
                "{}: Basic authentication sends the password in the clear, and WinRM refuses it over HTTP; use https:// (port 5986) or NTLM",
                endpoint.url
            )));
        }
        Ok(Transport {
            endpoint,
            credentials,
            method,
            timeout: Duration::from_secs(120),
            connection: tokio::sync::Mutex::new(None),
        })
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        &self.endpoint.url
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.credentials.user
    }

    /// Posts one envelope; returns the HTTP status and the (unsealed) body.
    pub async fn post(&self, operation: &str, xml: String) -> Result<(u16, Vec<u8>)> {
        let mut guard = self.connection.lock().await;
        // One retry: a kept-alive connection the server closed in between is reopened.
        for attempt in 0..2 {
            if guard.is_none() {
                *guard = Some(self.connect(operation).await?);
            }
            let Some(connection) = guard.as_mut() else {
                continue;
            };
            match tokio::time::timeout(self.timeout, self.send(connection, &xml, operation)).await {
                Ok(Ok((401, _))) => {
                    *guard = None;
                    if attempt == 1 {
                        return Err(
                            self.unauthorized("the host answered 401 to an authenticated request")
                        );
                    }
                }
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(Error::Unreachable { detail, .. })) if attempt == 0 => {
                    tracing::debug!(%detail, "connection lost; reconnecting");
                    *guard = None;
                }
                Ok(Err(e)) => {
                    *guard = None;
                    return Err(e);
                }
                Err(_) => {
                    *guard = None;
                    return Err(Error::Unreachable {
                        operation: operation.to_owned(),
                        detail: format!("no answer in {} s", self.timeout.as_secs()),
                    });
                }
            }
        }
        Err(self.unauthorized("the host kept refusing the connection's authentication"))
    }

    fn unauthorized(&self, detail: &str) -> Error {
        Error::Unauthorized {
            url: self.endpoint.url.clone(),
            user: self.credentials.user.clone(),
            detail: format!(
                "{}: {detail}",
                match self.method {
                    AuthMethod::Ntlm => "NTLM",
                    AuthMethod::Basic => "Basic over HTTPS",
                }
            ),
        }
    }

    async fn open(&self, operation: &str) -> Result<SendRequest<Full<Bytes>>> {
        let unreachable = |detail: String| Error::Unreachable {
            operation: format!("{operation} at {}", self.endpoint.url),
            detail,
        };
        let address = format!("{}:{}", self.endpoint.host, self.endpoint.port);
        let tcp = tokio::time::timeout(Duration::from_secs(30), TcpStream::connect(&address))
            .await
            .map_err(|_| unreachable(format!("connecting to {address} timed out")))?
            .map_err(|e| unreachable(format!("connecting to {address}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.endpoint.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(self.endpoint.host.clone())
                    .map_err(|e| Error::Config(format!("host {:?}: {e}", self.endpoint.host)))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS handshake: {}", chain(&e))))?;
                Box::new(tls)
            }
        };
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(format!("HTTP: {}", chain(&e))))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    async fn connect(&self, operation: &str) -> Result<Connection> {
        let mut sender = self.open(operation).await?;
        match self.method {
            AuthMethod::Basic => Ok(Connection {
                sender,
                sealing: None,
            }),
            AuthMethod::Ntlm => {
                let (domain, user) = self.credentials.split();
                let mut ntlm = NtlmAuthenticator::new(NtlmCredentials {
                    username: user,
                    password: self.credentials.password.clone(),
                    domain,
                });
                let negotiate = ntlm.negotiate();
                let (status, headers, _) = self
                    .exchange(&mut sender, Some(&negotiate), None, operation)
                    .await?;
                let challenge = headers
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(|v| v.strip_prefix("Negotiate "))
                    .and_then(|token| B64.decode(token.trim()).ok());
                let Some(challenge) = challenge.filter(|_| status == 401) else {
                    return Err(self.unauthorized(&format!(
                        "the host answered {status} without an NTLM challenge to Negotiate (is Negotiate authentication enabled in WinRM?)"
                    )));
                };
                let authenticate = ntlm.authenticate(&challenge).map_err(|e| {
                    self.unauthorized(&format!("the host's NTLM challenge is unusable: {e}"))
                })?;
                let (status, _, _) = self
                    .exchange(&mut sender, Some(&authenticate), None, operation)
                    .await?;
                if status == 401 {
                    return Err(self.unauthorized("wrong user name or password"));
                }
                if status != 200 {
                    return Err(self.unauthorized(&format!(
                        "the host answered {status} to the NTLM authentication"
                    )));
                }
                let sealing = match (&self.endpoint.tls, ntlm.session_key()) {
                    (Some(_), _) => None,
                    (None, Some(key)) => Some(Sealing::new(key)),
                    (None, None) => {
                        return Err(self.unauthorized(
                            "NTLM gave no session key, so messages cannot be sealed over HTTP",
                        ));
                    }
                };
                Ok(Connection { sender, sealing })
            }
        }
    }

    /// One HTTP POST on the connection: `token` in `Authorization: Negotiate`, or the
    /// request's own authorization (Basic) and `body`.
    async fn exchange(
        &self,
        sender: &mut SendRequest<Full<Bytes>>,
        token: Option<&[u8]>,
        body: Option<(String, Vec<u8>)>,
        operation: &str,
    ) -> Result<(u16, hyper::HeaderMap, Vec<u8>)> {
        let unreachable = |detail: String| Error::Unreachable {
            operation: format!("{operation} at {}", self.endpoint.url),
            detail,
        };
        let (content_type, bytes) = body.unwrap_or_else(|| (SOAP.to_owned(), Vec::new()));
        let mut request = hyper::Request::post(self.endpoint.path.as_str())
            .header(
                HOST,
                format!("{}:{}", self.endpoint.host, self.endpoint.port),
            )
            .header(CONTENT_TYPE, content_type)
            .header(CONTENT_LENGTH, bytes.len())
            .header("User-Agent", "rehost WS-Management client");
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Negotiate {}", B64.encode(token)));
        } else if self.method == AuthMethod::Basic {
            let pair = format!("{}:{}", self.credentials.user, self.credentials.password);
            request = request.header(AUTHORIZATION, format!("Basic {}", B64.encode(pair)));
        }
        let request = request
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| Error::Config(format!("building a request: {e}")))?;
        sender
            .ready()
            .await
            .map_err(|e| unreachable(format!("connection: {}", chain(&e))))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("sending: {}", chain(&e))))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_REPLY);
        let body = limited
            .collect()
            .await
            .map_err(|e| unreachable(format!("reading the reply: {e}")))?
            .to_bytes()
            .to_vec();
        Ok((status, headers, body))
    }

    async fn send(
        &self,
        connection: &mut Connection,
        xml: &str,
        operation: &str,
    ) -> Result<(u16, Vec<u8>)> {
        let body = match connection.sealing.as_mut() {
            Some(sealing) => (ENCRYPTED.to_owned(), sealing.wrap_message(xml.as_bytes())),
            None => (SOAP.to_owned(), xml.as_bytes().to_vec()),
        };
        let (status, headers, reply) = self
            .exchange(&mut connection.sender, None, Some(body), operation)
            .await?;
        let sealed_reply = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("multipart/encrypted"));
        match (connection.sealing.as_mut(), sealed_reply) {
            (Some(sealing), true) => {
                let plain = sealing
                    .unwrap_message(&reply)
                    .map_err(|detail| Error::Reply {
                        operation: operation.to_owned(),
                        detail: format!("the sealed reply: {detail}"),
                    })?;
                Ok((status, plain))
            }
            (Some(_), false) if status == 200 => Err(Error::Reply {
                operation: operation.to_owned(),
                detail: "the host answered in the clear on a sealed NTLM session".into(),
            }),
            _ => Ok((status, reply)),
        }
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_winrm_default_ports() {
        let e = Endpoint::parse("http://hv01/wsman", None).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("hv01", 5985, "/wsman")
        );
        let e = Endpoint::parse("http://127.0.0.1:4000", None).unwrap();
        assert_eq!((e.port, e.path.as_str()), (4000, "/wsman"));
        assert!(Endpoint::parse("ftp://hv01", None).is_err());
        assert!(Endpoint::parse("http://:80/wsman", None).is_err());
        assert!(Endpoint::parse("http://hv01:port/wsman", None).is_err());
        assert!(Endpoint::parse("https://hv01/wsman", None).is_err());
    }

    #[test]
    fn basic_over_http_is_refused_and_passwords_stay_out_of_debug() {
        let endpoint = Endpoint::parse("http://hv01/wsman", None).unwrap();
        let credentials = Credentials {
            user: "HV01\\admin".into(),
            password: "s3cret".into(),
        };
        assert!(format!("{credentials:?}").contains("redacted"));
        assert!(!format!("{credentials:?}").contains("s3cret"));
        assert_eq!(credentials.split(), ("HV01".into(), "admin".into()));
        let err = Transport::new(endpoint, credentials, AuthMethod::Basic).unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
    }
}
