//! Access tokens for Azure Resource Manager: OAuth2 client credentials against Microsoft
//! Entra ID, or the managed identity of the VM the connector runs on (the instance metadata
//! service). The answers are parsed here, purely; [`crate::Client`] fetches, caches and
//! renews them.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result, excerpt};

/// The scope of a Resource Manager token asked for with client credentials.
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";
/// The resource a managed identity token is asked for.
pub const ARM_RESOURCE: &str = "https://management.azure.com/";
/// The instance metadata service, reachable only from inside an Azure VM.
pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";

/// A client secret. Never printed: `Debug` shows stars.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the connector proves who it is.
#[derive(Debug, Clone)]
pub enum Credential {
    /// An app registration's client id and secret (OAuth2 client credentials).
    ClientSecret {
        /// The directory (tenant) id.
        tenant_id: String,
        /// The application (client) id.
        client_id: String,
        /// The client secret's value.
        secret: Secret,
    },
    /// The managed identity of the Azure VM the connector runs on; `client_id` picks a
    /// user-assigned identity.
    ManagedIdentity {
        /// A user-assigned identity's client id; `None` for the system-assigned one.
        client_id: Option<String>,
    },
}

impl Credential {
    /// Who is asking, for messages (never the secret).
    pub fn principal(&self) -> String {
        match self {
            Credential::ClientSecret {
                tenant_id,
                client_id,
                ..
            } => format!("client {client_id} of tenant {tenant_id}"),
            Credential::ManagedIdentity {
                client_id: Some(id),
            } => {
                format!("managed identity {id}")
            }
            Credential::ManagedIdentity { client_id: None } => {
                "the VM's system-assigned managed identity".into()
            }
        }
    }
}

/// A token and how long it is valid for.
#[derive(Clone)]
pub struct Token {
    /// The bearer token.
    pub access_token: String,
    /// Its lifetime from when it was issued.
    pub lifetime: Duration,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct EntraToken {
    access_token: String,
    expires_in: serde_json::Value,
}

#[derive(Deserialize)]
struct EntraError {
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    error_codes: Vec<u64>,
}

/// Entra ID's token answer (`status`, `body`): the token, or the refusal with its AADSTS
/// codes.
pub fn parse_entra_answer(
    status: u16,
    body: &[u8],
    authority: &str,
    client_id: &str,
) -> Result<Token> {
    if (200..300).contains(&status) {
        let token: EntraToken = serde_json::from_slice(body).map_err(|e| Error::Protocol {
            operation: format!("token from {authority}"),
            detail: format!("{e}: {}", excerpt(body)),
        })?;
        let seconds = seconds_of(&token.expires_in).ok_or_else(|| Error::Protocol {
            operation: format!("token from {authority}"),
            detail: format!("expires_in is {}", token.expires_in),
        })?;
        return Ok(Token {
            access_token: token.access_token,
            lifetime: Duration::from_secs(seconds),
        });
    }
    match serde_json::from_slice::<EntraError>(body) {
        Ok(refusal) => Err(Error::Token {
            authority: authority.to_owned(),
            client_id: client_id.to_owned(),
            error: refusal.error,
            codes: refusal.error_codes,
            // The first line: the rest is trace and correlation ids.
            description: refusal
                .error_description
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }),
        Err(_) => Err(Error::Token {
            authority: authority.to_owned(),
            client_id: client_id.to_owned(),
            error: format!("HTTP {status}"),
            codes: Vec::new(),
            description: excerpt(body),
        }),
    }
}

#[derive(Deserialize)]
struct ImdsToken {
    access_token: String,
    expires_in: serde_json::Value,
}

#[derive(Deserialize)]
struct ImdsError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The instance metadata service's token answer. IMDS writes its numbers as strings
/// (`"expires_in": "86399"`); both forms are read.
pub fn parse_imds_answer(status: u16, body: &[u8], endpoint: &str) -> Result<Token> {
    if (200..300).contains(&status) {
        let token: ImdsToken = serde_json::from_slice(body).map_err(|e| Error::Protocol {
            operation: format!("managed identity token from {endpoint}"),
            detail: format!("{e}: {}", excerpt(body)),
        })?;
        let seconds = seconds_of(&token.expires_in).ok_or_else(|| Error::Protocol {
            operation: format!("managed identity token from {endpoint}"),
            detail: format!("expires_in is {}", token.expires_in),
        })?;
        return Ok(Token {
            access_token: token.access_token,
            lifetime: Duration::from_secs(seconds),
        });
    }
    let detail = match serde_json::from_slice::<ImdsError>(body) {
        Ok(e) => format!("{}: {}", e.error, e.error_description),
        Err(_) => format!("HTTP {status}: {}", excerpt(body)),
    };
    Err(Error::ManagedIdentity {
        endpoint: endpoint.to_owned(),
        detail,
    })
}

/// A lifetime given as a number or a string of digits.
fn seconds_of(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// When to ask for a new token: five minutes before expiry (Azure's SDKs do the same), or
/// at half the lifetime of a short-lived one.
pub fn renew_after(lifetime: Duration) -> Duration {
    let margin = Duration::from_secs(300).min(lifetime / 2);
    lifetime - margin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entra_token_is_read() {
        let token = parse_entra_answer(
            200,
            br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0"}"#,
            "login",
            "c",
        )
        .expect("token");
        assert_eq!(token.access_token, "eyJ0");
        assert_eq!(token.lifetime, Duration::from_secs(3599));
        assert!(!format!("{token:?}").contains("eyJ0"));
    }

    #[test]
    fn a_wrong_secret_names_its_aadsts_code() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: 1\r\nCorrelation ID: 2","error_codes":[7000215]}"#;
        let err = parse_entra_answer(401, body, "https://login/t", "app").expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("AADSTS7000215"), "{text}");
        assert!(text.contains("Invalid client secret provided."), "{text}");
        assert!(!text.contains("Trace ID"), "{text}");
        assert_eq!(err.kind(), rehost_core::ErrorKind::PermissionDenied);
    }

    #[test]
    fn imds_numbers_as_strings_are_read() {
        let body = br#"{"access_token":"t","expires_in":"86399","expires_on":"1","resource":"https://management.azure.com/","token_type":"Bearer"}"#;
        let token = parse_imds_answer(200, body, "imds").expect("token");
        assert_eq!(token.lifetime, Duration::from_secs(86399));
        let err = parse_imds_answer(
            400,
            br#"{"error":"invalid_request","error_description":"Identity not found"}"#,
            "imds",
        )
        .expect_err("refused");
        assert!(err.to_string().contains("Identity not found"));
    }

    #[test]
    fn tokens_are_renewed_before_they_expire() {
        assert_eq!(
            renew_after(Duration::from_secs(3599)),
            Duration::from_secs(3299)
        );
        assert_eq!(
            renew_after(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn odd_answers_are_errors_not_panics() {
        for body in [&b""[..], b"{", b"[]", br#"{"access_token":1}"#] {
            assert!(parse_entra_answer(200, body, "a", "c").is_err());
            assert!(parse_imds_answer(200, body, "i").is_err());
            assert!(parse_entra_answer(500, body, "a", "c").is_err());
        }
    }

    #[test]
    fn secrets_are_not_printed() {
        let credential = Credential::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: Secret::new("hunter2"),
        };
        assert!(!format!("{credential:?}").contains("hunter2"));
    }
}
