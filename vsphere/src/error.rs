//! The crate's one error type: every vSphere fault rehost acts on, typed, with the
//! method and object it concerned, classified by [`ErrorKind`].

use rehost_core::{ErrorKind, SourceError};

use crate::soap::{Fault, Node};

/// A failure talking to vSphere.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The URL, CA file or thumbprint given to [`crate::Client::connect`] is unusable.
    #[error("invalid connection settings: {0}")]
    Config(String),
    /// Wrong user name or password.
    #[error("login to {url} as {user:?} refused: incorrect user name or password")]
    InvalidLogin {
        /// The SDK URL.
        url: String,
        /// Who tried.
        user: String,
    },
    /// The user lacks a privilege.
    #[error("{method}: permission denied, privilege {privilege:?} missing on {object}")]
    NoPermission {
        /// The call.
        method: String,
        /// The object the privilege is needed on.
        object: String,
        /// The missing privilege (`VirtualMachine.State.CreateSnapshot`).
        privilege: String,
    },
    /// The session expired and logging in again did not help.
    #[error("{method}: not authenticated (the session expired and re-login failed)")]
    NotAuthenticated {
        /// The call.
        method: String,
    },
    /// The VM is in the wrong power state for the call (ExportVm on a running VM).
    #[error("{method}: the VM is {existing}, which the operation does not allow: {message}")]
    InvalidPowerState {
        /// The call.
        method: String,
        /// The current state, when reported.
        existing: String,
        /// The server's message.
        message: String,
    },
    /// Another task holds the object; worth retrying later.
    #[error("{method}: another task is in progress on the object: {message}")]
    TaskInProgress {
        /// The call.
        method: String,
        /// The server's message.
        message: String,
    },
    /// A managed object (VM, snapshot, task) does not exist (any more).
    #[error("{method}: {object} not found")]
    ManagedObjectNotFound {
        /// The call.
        method: String,
        /// What was looked for.
        object: String,
    },
    /// No VM matched what was asked for.
    #[error("no VM named or with instance UUID {query:?}")]
    VmNotFound {
        /// The name or UUID asked for.
        query: String,
    },
    /// Several VMs share the name asked for.
    #[error("{count} VMs are named {query:?} ({refs}); use the instance UUID")]
    AmbiguousVm {
        /// The name.
        query: String,
        /// How many matched.
        count: usize,
        /// Their managed object ids.
        refs: String,
    },
    /// The name is already taken in the folder (`DuplicateName`).
    #[error("{method}: the name {name:?} is already taken in the folder")]
    DuplicateName {
        /// The call.
        method: String,
        /// The name.
        name: String,
    },
    /// A disk key that the VM or snapshot does not have.
    #[error("{what} has no disk with device key {key}")]
    DiskNotFound {
        /// The VM or snapshot.
        what: String,
        /// The device key.
        key: String,
    },
    /// The server refused an argument (`InvalidArgument`, `InvalidRequest`).
    #[error("{method}: invalid argument ({fault}): {message}")]
    InvalidArgument {
        /// The call.
        method: String,
        /// The fault type.
        fault: String,
        /// The server's message.
        message: String,
    },
    /// A datastore file operation failed (`FileNotFound`, `FileLocked`, …).
    #[error("{method}: file fault {fault}: {message}")]
    FileFault {
        /// The call.
        method: String,
        /// The fault type.
        fault: String,
        /// The server's message.
        message: String,
    },
    /// Any other SOAP fault.
    #[error("{method}: {fault}: {message}")]
    Fault {
        /// The call.
        method: String,
        /// The fault type (`""` for a plain SOAP fault).
        fault: String,
        /// `faultstring`.
        message: String,
    },
    /// The server answered with an unexpected HTTP status.
    #[error("{what}: HTTP {status}: {body}")]
    Http {
        /// The call or the URL.
        what: String,
        /// The status code.
        status: u16,
        /// The start of the body, for diagnosis.
        body: String,
    },
    /// The connection failed or timed out.
    #[error("{what}: {source}")]
    Transport {
        /// The call or the URL.
        what: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },
    /// TLS failed: an untrusted or mismatching certificate.
    #[error("TLS connection to {host} failed: {message}")]
    Tls {
        /// The server.
        host: String,
        /// Why (e.g. the thumbprint mismatch, with both values).
        message: String,
    },
    /// A reply that is not the XML the vim25 schema promises.
    #[error("{method}: malformed reply: {detail}")]
    Protocol {
        /// The call.
        method: String,
        /// What was wrong or missing.
        detail: String,
    },
    /// A task did not finish in time.
    #[error("task {task} ({description}) still running after {seconds} s")]
    TaskTimeout {
        /// The task.
        task: String,
        /// What it does.
        description: String,
        /// How long we waited.
        seconds: u64,
    },
    /// A disk's snapshot has no CBT change id.
    #[error(
        "changed block tracking is off for disk {disk} of {vm}: enable it (rehost does with \
         enable_change_tracking, or set ctkEnabled=TRUE in the VM's advanced settings), then \
         take a new snapshot"
    )]
    ChangeTrackingOff {
        /// The VM.
        vm: String,
        /// The disk's device key.
        disk: String,
    },
    /// QueryChangedDiskAreas answered without moving forward.
    #[error(
        "QueryChangedDiskAreas at offset {offset} answered [{start}, +{length}), which does \
         not move past it; refusing to loop"
    )]
    NoProgress {
        /// Where we asked from.
        offset: u64,
        /// Where the answer started.
        start: u64,
        /// Its length.
        length: u64,
    },
    /// A ranged read came back with other bytes than asked for.
    #[error("{url}: asked for bytes {start}-{end}, server sent {got}")]
    RangeMismatch {
        /// The file.
        url: String,
        /// First byte asked for.
        start: u64,
        /// Last byte asked for (inclusive).
        end: u64,
        /// What came back (`Content-Range` or the length).
        got: String,
    },
    /// A disk whose layout rehost does not read (a delta left by an older snapshot).
    #[error("{0}")]
    Unsupported(String),
    /// An export or import lease went to state `error`.
    #[error("{method} lease of {entity} failed: {message}")]
    LeaseFailed {
        /// ExportVm or ImportVApp.
        method: String,
        /// The VM.
        entity: String,
        /// The server's message.
        message: String,
    },
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// How the failure should be handled.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_)
            | Error::InvalidArgument { .. }
            | Error::AmbiguousVm { .. }
            | Error::DuplicateName { .. } => ErrorKind::InvalidInput,
            Error::InvalidLogin { .. }
            | Error::NoPermission { .. }
            | Error::NotAuthenticated { .. }
            | Error::Tls { .. } => ErrorKind::PermissionDenied,
            // The VM must be powered off (or on) first: a caller can do that and retry,
            // but retrying as is would fail the same way.
            Error::InvalidPowerState { .. } => ErrorKind::InvalidInput,
            Error::TaskInProgress { .. } => ErrorKind::Throttled,
            Error::ManagedObjectNotFound { .. }
            | Error::VmNotFound { .. }
            | Error::DiskNotFound { .. } => ErrorKind::NotFound,
            Error::FileFault { fault, .. } => match fault.as_str() {
                "FileNotFound" => ErrorKind::NotFound,
                "FileLocked" => ErrorKind::Throttled,
                "NoDiskSpace" | "FileTooLarge" => ErrorKind::Unsupported,
                _ => ErrorKind::Transient,
            },
            Error::Fault { fault, .. } => match fault.as_str() {
                "HostCommunication" | "HostNotConnected" | "Timedout" | "SystemError" => {
                    ErrorKind::Transient
                }
                "NotSupported" => ErrorKind::Unsupported,
                _ => ErrorKind::InvalidInput,
            },
            Error::Http { status, .. } => match status {
                401 | 403 => ErrorKind::PermissionDenied,
                404 => ErrorKind::NotFound,
                429 | 503 => ErrorKind::Throttled,
                _ => ErrorKind::Transient,
            },
            Error::Transport { .. } | Error::TaskTimeout { .. } | Error::NoProgress { .. } => {
                ErrorKind::Transient
            }
            // A malformed reply is almost always a truncated body or a proxy's error page in
            // place of vCenter's answer: worth retrying; the scheduler's retry budget ends a
            // server that keeps answering wrongly. (CorruptImage is for disk bytes, not
            // protocol replies.)
            Error::Protocol { .. } | Error::RangeMismatch { .. } => ErrorKind::Transient,
            Error::ChangeTrackingOff { .. } => ErrorKind::InvalidInput,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::LeaseFailed { .. } => ErrorKind::Transient,
        }
    }

    /// Builds the typed error of a SOAP fault raised by `method`.
    pub fn from_fault(method: &str, fault: &Fault) -> Self {
        from_fault_parts(method, &fault.fault_type, &fault.message, &fault.detail)
    }
}

/// Builds the typed error of a fault given as type, message and detail (a SOAP fault's or
/// a failed task's `LocalizedMethodFault`).
pub(crate) fn from_fault_parts(
    method: &str,
    fault_type: &str,
    message: &str,
    detail: &Node,
) -> Error {
    let method = method.to_owned();
    let message = message.to_owned();
    match fault_type {
        "InvalidLogin" => Error::InvalidLogin {
            url: String::new(),
            user: String::new(),
        },
        "NoPermission" => {
            let object = detail
                .child("object")
                .map(|o| format!("{}:{}", o.type_attr.as_deref().unwrap_or("?"), o.trimmed()))
                .unwrap_or_else(|| "?".into());
            // vSphere 7+ lists missingPrivileges; older servers give one privilegeId.
            let privilege = detail
                .child_text("privilegeId")
                .map(str::to_owned)
                .or_else(|| {
                    detail
                        .child("missingPrivileges")
                        .and_then(|m| m.child("privileges"))
                        .map(|p| p.trimmed().to_owned())
                })
                .unwrap_or_else(|| "?".into());
            Error::NoPermission {
                method,
                object,
                privilege,
            }
        }
        "NotAuthenticated" => Error::NotAuthenticated { method },
        "DuplicateName" => Error::DuplicateName {
            method,
            name: detail
                .child_text("name")
                .map(str::to_owned)
                .unwrap_or(message),
        },
        "InvalidPowerState" => Error::InvalidPowerState {
            method,
            existing: detail
                .child_text("existingState")
                .unwrap_or("in another state")
                .to_owned(),
            message,
        },
        "TaskInProgress" | "ConcurrentAccess" | "Busy" => Error::TaskInProgress { method, message },
        "ManagedObjectNotFound" => {
            let object = detail
                .child("obj")
                .map(|o| format!("{}:{}", o.type_attr.as_deref().unwrap_or("?"), o.trimmed()))
                .unwrap_or(message);
            Error::ManagedObjectNotFound { method, object }
        }
        "InvalidArgument" | "InvalidRequest" | "InvalidType" | "InvalidProperty"
        | "InvalidName" | "AlreadyExists" => Error::InvalidArgument {
            method,
            fault: fault_type.to_owned(),
            message: if message.is_empty() {
                detail
                    .child_text("invalidProperty")
                    .unwrap_or_default()
                    .to_owned()
            } else {
                message
            },
        },
        "FileFault"
        | "FileNotFound"
        | "FileLocked"
        | "FileAlreadyExists"
        | "CannotAccessFile"
        | "NoDiskSpace"
        | "FileTooLarge"
        | "FileBackedPortNotSupported" => Error::FileFault {
            method,
            fault: fault_type.to_owned(),
            message: match detail.child_text("file") {
                Some(file) if !message.contains(file) => format!("{message} ({file})"),
                _ => message,
            },
        },
        _ => Error::Fault {
            method,
            fault: fault_type.to_owned(),
            message,
        },
    }
}

impl SourceError for Error {
    fn kind(&self) -> ErrorKind {
        Error::kind(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soap::{Reply, parse_reply};

    fn fault_of(detail: &str) -> Fault {
        let doc = format!(
            r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>msg</faultstring><detail>{detail}</detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#
        );
        match parse_reply(doc.as_bytes()).unwrap() {
            Reply::Fault(f) => f,
            Reply::Response(_) => panic!("not a fault"),
        }
    }

    #[test]
    fn faults_map_to_kinds() {
        let cases = [
            (
                r#"<InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"/>"#,
                ErrorKind::PermissionDenied,
            ),
            (
                r#"<NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated"/>"#,
                ErrorKind::PermissionDenied,
            ),
            (
                r#"<InvalidPowerStateFault xsi:type="InvalidPowerState"><existingState>poweredOn</existingState></InvalidPowerStateFault>"#,
                ErrorKind::InvalidInput,
            ),
            (
                r#"<TaskInProgressFault xsi:type="TaskInProgress"/>"#,
                ErrorKind::Throttled,
            ),
            (
                r#"<ManagedObjectNotFoundFault xsi:type="ManagedObjectNotFound"><obj type="VirtualMachineSnapshot">snapshot-7</obj></ManagedObjectNotFoundFault>"#,
                ErrorKind::NotFound,
            ),
            (
                r#"<InvalidArgumentFault xsi:type="InvalidArgument"><invalidProperty>changeId</invalidProperty></InvalidArgumentFault>"#,
                ErrorKind::InvalidInput,
            ),
            (
                r#"<InvalidRequestFault xsi:type="InvalidRequest"/>"#,
                ErrorKind::InvalidInput,
            ),
            (
                r#"<FileNotFoundFault xsi:type="FileNotFound"><file>[ds] a.vmdk</file></FileNotFoundFault>"#,
                ErrorKind::NotFound,
            ),
            (
                r#"<DuplicateNameFault xsi:type="DuplicateName"><name>app</name><object type="Folder">group-v3</object></DuplicateNameFault>"#,
                ErrorKind::InvalidInput,
            ),
            (
                r#"<HostCommunicationFault xsi:type="HostCommunication"/>"#,
                ErrorKind::Transient,
            ),
        ];
        for (detail, kind) in cases {
            let err = Error::from_fault("M", &fault_of(detail));
            assert_eq!(err.kind(), kind, "{detail}: {err}");
        }
    }

    #[test]
    fn no_permission_names_privilege_and_object() {
        let old = fault_of(
            r#"<NoPermissionFault xsi:type="NoPermission"><object type="VirtualMachine">vm-42</object><privilegeId>VirtualMachine.State.CreateSnapshot</privilegeId></NoPermissionFault>"#,
        );
        let msg = Error::from_fault("CreateSnapshot_Task", &old).to_string();
        assert!(msg.contains("VirtualMachine.State.CreateSnapshot"), "{msg}");
        assert!(msg.contains("VirtualMachine:vm-42"), "{msg}");
        let new = fault_of(
            r#"<NoPermissionFault xsi:type="NoPermission"><object type="VirtualMachine">vm-1</object><missingPrivileges><entity type="VirtualMachine">vm-1</entity><privileges>VirtualMachine.Provisioning.DiskRandomRead</privileges></missingPrivileges></NoPermissionFault>"#,
        );
        let msg = Error::from_fault("QueryChangedDiskAreas", &new).to_string();
        assert!(msg.contains("DiskRandomRead"), "{msg}");
        let snapshot_gone = fault_of(
            r#"<ManagedObjectNotFoundFault xsi:type="ManagedObjectNotFound"><obj type="VirtualMachineSnapshot">snapshot-7</obj></ManagedObjectNotFoundFault>"#,
        );
        let msg = Error::from_fault("RemoveSnapshot_Task", &snapshot_gone).to_string();
        assert_eq!(
            msg,
            "RemoveSnapshot_Task: VirtualMachineSnapshot:snapshot-7 not found"
        );
    }
}
