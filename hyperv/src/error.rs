//! The crate's one error type: transport, authentication, WS-Management faults, WMI method
//! and job failures, SMB reads — each with what was being done, classified by
//! [`ErrorKind`] so callers retry, report or stop.

use rehost_core::{ErrorKind, SourceError};

use crate::wsman::Fault;

/// A failure talking to a Hyper-V host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting (URL, CA file, password) is unusable.
    #[error("invalid Hyper-V settings: {0}")]
    Config(String),
    /// The request got no answer (connection refused, TLS, timeout).
    #[error("{operation}: {detail}")]
    Unreachable {
        /// What was being done (`Enumerate Msvm_ComputerSystem at https://hv01:5986/wsman`).
        operation: String,
        /// Why, with the causes.
        detail: String,
    },
    /// The host refused the credentials.
    #[error("{url}: the host refused the credentials of {user:?} ({detail})")]
    Unauthorized {
        url: String,
        user: String,
        /// What was tried (`NTLM`, `Basic over HTTPS`) and how it ended.
        detail: String,
    },
    /// An HTTP status other than 200 without a SOAP fault.
    #[error("{operation}: the host answered HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status {
        operation: String,
        status: u16,
        /// The start of the body, if any.
        body: String,
    },
    /// A SOAP fault.
    #[error("{operation}: {fault}")]
    Fault {
        operation: String,
        fault: Box<Fault>,
    },
    /// A reply that is not what WS-Management or the class promises.
    #[error("{operation}: unexpected reply: {detail}")]
    Reply { operation: String, detail: String },
    /// A WMI method returned an error code.
    #[error("{operation}: {method} returned {code} ({})", method_code_meaning(*.code))]
    Method {
        operation: String,
        method: String,
        code: u64,
    },
    /// A WMI job ended in failure.
    #[error("{operation}: the job {job} ended in state {state}: {description} (error code {code})")]
    Job {
        operation: String,
        job: String,
        state: u64,
        code: u64,
        description: String,
    },
    /// A WMI job did not end in time.
    #[error("{operation}: the job {job} was still running after {seconds} s ({percent}% done)")]
    JobTimeout {
        operation: String,
        job: String,
        seconds: u64,
        percent: u64,
    },
    /// Something named does not exist (a VM, a disk, a checkpoint).
    #[error("{0}")]
    NotFound(String),
    /// Valid, but not something we handle (a VHD set, RCT on an old configuration).
    #[error("{0}")]
    Unsupported(String),
    /// The RCT id a previous run kept is no longer valid on the host.
    #[error("disk {path}: the host no longer knows RCT id {rct_id} ({detail})")]
    RctInvalid {
        path: String,
        rct_id: String,
        detail: String,
    },
    /// An SMB failure reading a disk file.
    #[error("SMB {operation}: {detail}")]
    Smb {
        /// What was being done (`open \\hv01\C$\…\vm1.vhdx`).
        operation: String,
        detail: String,
        kind: ErrorKind,
    },
    /// A disk image read over SMB is corrupt or unsupported.
    #[error(transparent)]
    Image(#[from] rehost_diskimage::Error),
    /// Stopped on request.
    #[error("stopped on request")]
    Cancelled,
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl SourceError for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) => ErrorKind::InvalidInput,
            Error::Unreachable { .. } => ErrorKind::Transient,
            Error::Unauthorized { .. } => ErrorKind::PermissionDenied,
            Error::Status { status, .. } => match status {
                401 | 403 => ErrorKind::PermissionDenied,
                429 | 503 => ErrorKind::Throttled,
                500..=599 => ErrorKind::Transient,
                _ => ErrorKind::InvalidInput,
            },
            Error::Fault { fault, .. } => match fault.subcode.as_str() {
                "AccessDenied" => ErrorKind::PermissionDenied,
                "InvalidSelectors" => ErrorKind::NotFound,
                "TimedOut" | "QuotaLimit" | "InternalError" => ErrorKind::Transient,
                _ if fault.wsman_code == Some(5) => ErrorKind::PermissionDenied,
                _ => ErrorKind::InvalidInput,
            },
            Error::Reply { .. } => ErrorKind::InvalidInput,
            Error::Method { code, .. } => match code {
                32769 => ErrorKind::PermissionDenied,
                32770 => ErrorKind::Unsupported,
                32772 | 32774 | 32777 | 32778 => ErrorKind::Transient,
                32779 => ErrorKind::NotFound,
                _ => ErrorKind::InvalidInput,
            },
            Error::Job { .. } => ErrorKind::InvalidInput,
            Error::JobTimeout { .. } => ErrorKind::Transient,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::RctInvalid { .. } => ErrorKind::InvalidInput,
            Error::Smb { kind, .. } => *kind,
            Error::Image(e) => e.kind(),
            Error::Cancelled => ErrorKind::Cancelled,
        }
    }
}

/// What a Hyper-V WMI method's return code means (the codes every `Msvm_*` service method
/// documents).
pub fn method_code_meaning(code: u64) -> &'static str {
    match code {
        0 => "completed with no error",
        4096 => "job started",
        32768 => "failed",
        32769 => "access denied",
        32770 => "not supported",
        32771 => "status is unknown",
        32772 => "timeout",
        32773 => "invalid parameter",
        32774 => "system is in use",
        32775 => "invalid state for this operation",
        32776 => "incorrect data type",
        32777 => "system is not available",
        32778 => "out of memory",
        32779 => "file not found",
        _ => "unknown code",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_errors_read_as_sentences_and_classify() {
        let e = Error::Method {
            operation: "snapshotting vm1".into(),
            method: "CreateSnapshot".into(),
            code: 32775,
        };
        assert_eq!(
            e.to_string(),
            "snapshotting vm1: CreateSnapshot returned 32775 (invalid state for this operation)"
        );
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let denied = Error::Fault {
            operation: "x".into(),
            fault: Box::new(Fault {
                subcode: "AccessDenied".into(),
                ..Fault::default()
            }),
        };
        assert_eq!(denied.kind(), ErrorKind::PermissionDenied);
    }
}
