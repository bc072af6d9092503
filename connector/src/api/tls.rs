//! HTTPS for `rehost serve`: a listener that hands axum TLS streams. Handshakes run on
//! their own tasks (with a deadline), so a slow or silent client never holds up the
//! others; a failed handshake is logged and dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rehost_vsphere::tls::thumbprint_of;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for axum to take them.
const ACCEPTED_QUEUE: usize = 64;

/// The server's TLS settings: the rustls configuration and the certificate's SHA-256
/// thumbprint (what clients pin, as `govc` users do with vCenter's).
pub struct TlsSettings {
    pub config: Arc<rustls::ServerConfig>,
    pub thumbprint: String,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("thumbprint", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// Reads the certificate chain and key (PEM) into a server configuration (HTTP/1.1 only,
/// like the API).
pub fn load(cert_file: &Path, key_file: &Path) -> Result<TlsSettings> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("[api] tls_cert_file {}", cert_file.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("[api] tls_cert_file {}", cert_file.display()))?;
    let Some(leaf) = certs.first() else {
        bail!(
            "[api] tls_cert_file {} holds no certificate",
            cert_file.display()
        );
    };
    let thumbprint = thumbprint_of(leaf);
    let key = PrivateKeyDer::from_pem_file(key_file).with_context(|| {
        format!(
            "[api] tls_key_file {}: no usable private key",
            key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "[api] the key in {} does not go with the certificate in {}",
                key_file.display(),
                cert_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsSettings {
        config: Arc::new(config),
        thumbprint,
    })
}

/// A TLS listener for `axum::serve`.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp`, handshaking each connection on its own task.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> Result<Self> {
        let local = tcp.local_addr().context("reading the listening address")?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, accepted) = mpsc::channel(ACCEPTED_QUEUE);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors and the like: wait, as axum's own loop does.
                        tracing::warn!(error = %err, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    break; // the listener is gone: the server stopped
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { accepted, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(pair) => pair,
            // The accept task only ends when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_are_colon_separated_hex() {
        let t = thumbprint_of(b"abc");
        assert_eq!(t.len(), 32 * 3 - 1);
        assert!(t.starts_with("BA:78:16:BF"), "{t}");
    }

    #[test]
    fn missing_or_mismatched_files_are_named() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let err = load(&cert, &key)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("tls_cert_file"), "{err}");
        std::fs::write(&cert, "not a certificate").unwrap_or_else(|e| panic!("{e}"));
        let err = load(&cert, &key)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(err.contains("holds no certificate"), "{err}");
    }
}
