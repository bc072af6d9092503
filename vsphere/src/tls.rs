//! How the server's certificate is trusted: the system's roots, a CA file, a pinned
//! SHA-256 thumbprint (as `govc -thumbprint`), or not at all.
//!
//! vCenters often run on the certificate their own VMCA issued, which no system trusts;
//! pinning its thumbprint is what administrators do with govc, so we offer the same, and
//! still check the handshake signature so the pin cannot be replayed by another key.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// How to trust the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// The operating system's trust store (with the usual host name checks).
    System,
    /// A PEM file of CA certificates to trust instead (e.g. the vCenter's VMCA root).
    CaFile(PathBuf),
    /// The SHA-256 of the server's leaf certificate, hex, with or without colons.
    Thumbprint(String),
    /// Trust any certificate (tests, lab setups); the handshake signature is still checked.
    Insecure,
}

/// The rustls configuration for `tls`, or `None` for the system's roots (reqwest's own
/// platform verifier). Also what `rehost jobs --api` uses to trust an appliance's
/// self-signed certificate by its thumbprint.
pub fn client_config(tls: &Tls) -> Result<Option<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS protocol versions: {e}")))?;
    let config = match tls {
        Tls::System => return Ok(None),
        Tls::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| Error::Config(format!("CA file {}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| {
                    Error::Config(format!(
                        "CA file {}: certificate refused: {e}",
                        path.display()
                    ))
                })?;
            }
            if roots.is_empty() {
                return Err(Error::Config(format!(
                    "CA file {} holds no certificate",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Tls::Thumbprint(hex) => {
            let expected = parse_thumbprint(hex)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                    expected: Some(expected),
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth()
        }
        Tls::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                expected: None,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    Ok(Some(config))
}

/// Parses `AA:BB:…` or `aabb…` (64 hex digits) into the 32 bytes of a SHA-256.
pub fn parse_thumbprint(text: &str) -> Result<[u8; 32]> {
    let digits: String = text
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&digits)
        .map_err(|e| Error::Config(format!("thumbprint {text:?} is not hex: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        Error::Config(format!(
            "thumbprint {text:?} has {} bytes; a SHA-256 thumbprint has 32 (a 20-byte one is \
             SHA-1, which rehost does not accept)",
            b.len()
        ))
    })
}

/// `AA:BB:…`, as vCenter and govc print thumbprints.
pub fn format_thumbprint(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The SHA-256 thumbprint of a DER certificate, `AA:BB:…`.
pub fn thumbprint_of(der: &[u8]) -> String {
    format_thumbprint(&Sha256::digest(der))
}

/// Why a pinned thumbprint refused a certificate, carried through rustls to our error.
#[derive(Debug)]
pub(crate) struct ThumbprintMismatch {
    pub(crate) actual: String,
    pub(crate) expected: String,
}

impl fmt::Display for ThumbprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server certificate thumbprint {} does not match the pinned {}",
            self.actual, self.expected
        )
    }
}

impl std::error::Error for ThumbprintMismatch {}

/// Accepts the leaf certificate whose SHA-256 is `expected` (any when `None`), and checks
/// handshake signatures with the provider's algorithms.
#[derive(Debug)]
struct PinnedVerifier {
    expected: Option<[u8; 32]>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(expected) = self.expected else {
            return Ok(ServerCertVerified::assertion());
        };
        let actual = Sha256::digest(end_entity.as_ref());
        if actual.as_slice() == expected.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(ThumbprintMismatch {
                    actual: format_thumbprint(&actual),
                    expected: format_thumbprint(&expected),
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Finds a TLS failure in an HTTP client error's source chain and says it plainly.
pub(crate) fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(mismatch) = e.downcast_ref::<ThumbprintMismatch>() {
            return Some(mismatch.to_string());
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            if let rustls::Error::InvalidCertificate(CertificateError::Other(other)) = tls {
                if let Some(m) = other.0.downcast_ref::<ThumbprintMismatch>() {
                    return Some(m.to_string());
                }
            }
            return Some(format!(
                "{tls} (trust the server with a CA file or pin its SHA-256 thumbprint)"
            ));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = tls_failure(inner) {
                    return Some(found);
                }
            }
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprints_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_thumbprint(&hex64).unwrap(), [0xab; 32]);
        assert_eq!(parse_thumbprint(&colons).unwrap(), [0xab; 32]);
        assert_eq!(format_thumbprint(&[0xab; 32]), colons);
        let sha1 = vec!["AB"; 20].join(":");
        assert!(
            parse_thumbprint(&sha1)
                .unwrap_err()
                .to_string()
                .contains("SHA-1")
        );
        assert!(parse_thumbprint("zz").is_err());
    }

    #[test]
    fn mismatch_is_found_in_an_error_chain() {
        let inner = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
            Arc::new(ThumbprintMismatch {
                actual: "AA".into(),
                expected: "BB".into(),
            }),
        )));
        let io = std::io::Error::other(inner);
        let msg = tls_failure(&io).unwrap();
        assert_eq!(
            msg,
            "server certificate thumbprint AA does not match the pinned BB"
        );
        assert!(tls_failure(&std::io::Error::other("plain")).is_none());
    }
}
