//! The crate's one error type: token, Resource Manager and blob failures, typed, with the
//! call they concerned, classified by [`ErrorKind`] so callers retry, report or stop.

use rehost_core::{ErrorKind, SourceError};
use serde::Deserialize;

/// A failure talking to Azure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting (URL, CA file, secret) is unusable.
    #[error("invalid Azure settings: {0}")]
    Config(String),
    /// Entra ID refused to issue a token.
    #[error("Entra ID ({authority}) refused a token for client {client_id}: {error}{}: {description}", code_suffix(.codes))]
    Token {
        /// The token endpoint.
        authority: String,
        /// The application (client) id asked for (never the secret).
        client_id: String,
        /// The OAuth2 error (`invalid_client`).
        error: String,
        /// The AADSTS codes (`7000215` is a wrong secret).
        codes: Vec<u64>,
        /// Entra's description, first line.
        description: String,
    },
    /// The managed identity endpoint of the instance metadata service refused a token.
    #[error("managed identity token from {endpoint} refused: {detail}")]
    ManagedIdentity {
        /// The IMDS URL.
        endpoint: String,
        /// What it said.
        detail: String,
    },
    /// Resource Manager answered with an error.
    #[error("{operation}: Azure answered {status} {code}: {message}")]
    Arm {
        /// What was being done (`PUT snapshot rehost-…`).
        operation: String,
        /// The HTTP status.
        status: u16,
        /// Azure's error code (`AuthorizationFailed`, `ResourceNotFound`).
        code: String,
        /// Azure's message.
        message: String,
    },
    /// A long-running operation ended in failure or was cancelled.
    #[error("{operation}: the operation ended {status}: {code}: {message}")]
    OperationFailed {
        /// What was being done.
        operation: String,
        /// `Failed` or `Canceled`.
        status: String,
        /// Azure's error code.
        code: String,
        /// Azure's message.
        message: String,
    },
    /// The blob service (a snapshot's SAS URL) answered with an error.
    #[error("{operation}: the blob service answered {status} {code}: {message}")]
    Blob {
        /// What was being done (`GET bytes=0-4194303`).
        operation: String,
        /// The HTTP status.
        status: u16,
        /// The storage error code (`AuthenticationFailed`).
        code: String,
        /// The message's first line.
        message: String,
    },
    /// The request did not get an answer (connection refused or reset, TLS, timeout).
    #[error("{operation}: {source}")]
    Http {
        /// What was being done.
        operation: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// An answer we cannot make sense of.
    #[error("{operation}: unexpected answer: {detail}")]
    Protocol {
        /// What was being done.
        operation: String,
        /// What was wrong with it.
        detail: String,
    },
    /// Something asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Several things match what was asked for.
    #[error("{0}")]
    Ambiguous(String),
    /// Valid, but not something rehost handles.
    #[error("{0}")]
    Unsupported(String),
    /// A wait ran out.
    #[error("{operation}: no result after {seconds} s")]
    Timeout {
        /// What was waited for.
        operation: String,
        /// How long.
        seconds: u64,
    },
}

fn code_suffix(codes: &[u64]) -> String {
    match codes.first() {
        Some(code) => format!(" (AADSTS{code})"),
        None => String::new(),
    }
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// How the failure should be handled.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::InvalidInput,
            Error::Token { error, .. } => match error.as_str() {
                "temporarily_unavailable" => ErrorKind::Transient,
                _ => ErrorKind::PermissionDenied,
            },
            Error::ManagedIdentity { .. } => ErrorKind::PermissionDenied,
            Error::Arm { status, code, .. } => status_kind(*status, code),
            Error::Blob { status, code, .. } => status_kind(*status, code),
            Error::OperationFailed { code, .. } => match code.as_str() {
                "TooManyRequests" | "OperationPreempted" => ErrorKind::Throttled,
                "InternalExecutionError" | "InternalOperationError" => ErrorKind::Transient,
                _ => ErrorKind::InvalidInput,
            },
            Error::Http { .. } | Error::Timeout { .. } => ErrorKind::Transient,
            Error::Protocol { .. } => ErrorKind::Transient,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Ambiguous(_) => ErrorKind::InvalidInput,
            Error::Unsupported(_) => ErrorKind::Unsupported,
        }
    }

    /// Azure's error code, when it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Arm { code, .. } | Error::Blob { code, .. } => Some(code),
            Error::OperationFailed { code, .. } => Some(code),
            Error::Token { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The HTTP status, for errors that came with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Arm { status, .. } | Error::Blob { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn status_kind(status: u16, code: &str) -> ErrorKind {
    match (status, code) {
        (429, _) | (503, "ServerBusy") => ErrorKind::Throttled,
        (401 | 403, _) => ErrorKind::PermissionDenied,
        (404, _) => ErrorKind::NotFound,
        (408, _) | (500..=599, _) => ErrorKind::Transient,
        _ => ErrorKind::InvalidInput,
    }
}

impl SourceError for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}

#[derive(Deserialize)]
struct ArmErrorBody {
    error: Option<ArmErrorDetail>,
}

#[derive(Deserialize)]
struct ArmErrorDetail {
    code: Option<String>,
    message: Option<String>,
}

/// Azure Resource Manager's error body, `{"error":{"code","message"}}`, as (code, message);
/// anything else is kept as text so the user still sees what came back.
pub fn parse_arm_error(body: &[u8]) -> (String, String) {
    match serde_json::from_slice::<ArmErrorBody>(body) {
        Ok(ArmErrorBody {
            error: Some(detail),
        }) => (
            detail.code.unwrap_or_else(|| "Unknown".into()),
            detail.message.unwrap_or_default(),
        ),
        _ => ("Unknown".into(), excerpt(body)),
    }
}

/// The storage service's XML error `<Error><Code>…</Code><Message>…</Message></Error>`, as
/// (code, first line of the message); `header_code` (`x-ms-error-code`) wins when present
/// (HEAD answers have no body).
pub fn parse_blob_error(body: &[u8], header_code: Option<&str>) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let element = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&close)? + start;
        Some(text[start..end].to_owned())
    };
    let code = header_code
        .map(str::to_owned)
        .or_else(|| element("Code"))
        .unwrap_or_else(|| "Unknown".into());
    let message = element("Message")
        .map(|m| m.lines().next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| excerpt(body));
    (code, message)
}

/// At most 300 characters of a body, for error messages.
pub(crate) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_errors_are_read_and_classified() {
        let body = br#"{"error":{"code":"AuthorizationFailed","message":"The client 'x' does not have authorization to perform action 'Microsoft.Compute/snapshots/write'"}}"#;
        let (code, message) = parse_arm_error(body);
        assert_eq!(code, "AuthorizationFailed");
        assert!(message.contains("snapshots/write"));
        let err = Error::Arm {
            operation: "PUT".into(),
            status: 403,
            code,
            message,
        };
        assert_eq!(err.kind(), ErrorKind::PermissionDenied);
        assert_eq!(status_kind(429, "TooManyRequests"), ErrorKind::Throttled);
        assert_eq!(status_kind(503, "ServerBusy"), ErrorKind::Throttled);
        assert_eq!(status_kind(502, "BadGateway"), ErrorKind::Transient);
    }

    #[test]
    fn odd_error_bodies_are_kept_as_text() {
        assert_eq!(
            parse_arm_error(b"<html>gateway</html>"),
            ("Unknown".into(), "<html>gateway</html>".into())
        );
        assert_eq!(parse_arm_error(b"").0, "Unknown");
    }

    #[test]
    fn blob_errors_are_read() {
        let body = b"<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code><Message>Server failed to authenticate the request.\nRequestId:1</Message></Error>";
        assert_eq!(
            parse_blob_error(body, None),
            (
                "AuthenticationFailed".into(),
                "Server failed to authenticate the request.".into()
            )
        );
        assert_eq!(parse_blob_error(b"", Some("ServerBusy")).0, "ServerBusy");
    }
}
