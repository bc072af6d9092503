//! Types every rehost crate shares: what a piece of a disk is ([`Extent`]), how an
//! allocation map is described ([`MapExtent`]), and the small set of error kinds
//! ([`ErrorKind`]) that callers match on to decide whether to retry, report or stop.
//!
//! This crate depends on nothing of ours, so formats, sources and the importer can all
//! speak the same language without depending on each other.

use std::fmt;

pub mod plan;
mod source;
pub use source::{
    ChangeToken, DiskInfo, DiskRead, ExtentStream, Firmware, PowerState, SnapshotOptions,
    SnapshotRef, Source, SourceError, VmInfo,
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The block size of EBS direct APIs: the only size `PutSnapshotBlock` accepts.
pub const EBS_BLOCK_SIZE: u64 = 512 * 1024;

/// How sources align the areas they read: the VMDK grain, the coarsest unit an export's
/// images store (a VHD stores sectors). Not the EBS block: the unchanged rest of a 512 KiB
/// block the source changed only in part comes from the previous export, never from the
/// hypervisor again.
pub const READ_ALIGNMENT: u64 = 64 * 1024;

/// The sector size every format we handle addresses in.
pub const SECTOR_SIZE: u64 = 512;

/// One piece of a virtual disk. A stream of extents is in order and covers
/// `[0, virtual_size)` without gaps or overlaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// Bytes to be written at `offset`.
    Data { offset: u64, data: Bytes },
    /// Known to be zero. In a delta this must be written: it may differ from the parent.
    Zero { offset: u64, len: u64 },
    /// Same as the parent; in a full image, never written (reads as zero).
    Unchanged { offset: u64, len: u64 },
}

impl Extent {
    /// Where the extent starts on the virtual disk.
    pub fn offset(&self) -> u64 {
        match self {
            Extent::Data { offset, .. }
            | Extent::Zero { offset, .. }
            | Extent::Unchanged { offset, .. } => *offset,
        }
    }

    /// How many bytes of the virtual disk it covers.
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { data, .. } => data.len() as u64,
            Extent::Zero { len, .. } | Extent::Unchanged { len, .. } => *len,
        }
    }

    /// True when the extent covers nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One past the last byte it covers.
    pub fn end(&self) -> u64 {
        self.offset() + self.len()
    }
}

/// What an allocation map says of a range, without its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    /// Stored in the image: must be read.
    Data,
    /// Recorded as zero by the image (e.g. a VMDK zero grain, a VHDX PAYLOAD_BLOCK_ZERO).
    Zero,
    /// Not stored: in a differencing image "as in the parent", in a base image zero.
    Unallocated,
}

/// A range of the virtual disk and what the map says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapExtent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl MapExtent {
    /// One past the last byte it covers.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// How a failure should be handled, whatever module raised it: the scheduler retries by
/// kind and the API maps kinds to HTTP status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Worth retrying as it is (a network blip, a 5xx).
    Transient,
    /// Worth retrying after backing off.
    Throttled,
    /// Something named does not exist (a file, a VM, a snapshot, a parent image).
    NotFound,
    /// Credentials or privileges are missing.
    PermissionDenied,
    /// The caller asked for something invalid.
    InvalidInput,
    /// An image's bytes contradict its format.
    CorruptImage,
    /// Valid, but something we do not handle.
    Unsupported,
    /// Stopped on request.
    Cancelled,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Throttled => "throttled",
            ErrorKind::NotFound => "not_found",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::CorruptImage => "corrupt_image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Cancelled => "cancelled",
        };
        f.write_str(name)
    }
}

macro_rules! id_newtype {
    ($(#[$doc:meta] $name:ident),* $(,)?) => {$(
        #[$doc]
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    )*};
}

id_newtype!(
    /// A VM's stable id at its source (vSphere instance UUID, Hyper-V VM id, Azure VM id).
    VmId,
    /// A disk's stable id within its VM (vSphere device key, Hyper-V path, Azure disk id).
    DiskId,
    /// A replication job.
    JobId,
    /// One run of a replication job.
    RunId,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_bounds() {
        let e = Extent::Data {
            offset: 512,
            data: Bytes::from_static(&[1; 1024]),
        };
        assert_eq!((e.offset(), e.len(), e.end()), (512, 1024, 1536));
        let z = Extent::Zero { offset: 0, len: 0 };
        assert!(z.is_empty());
    }

    #[test]
    fn ids_display_as_their_value() {
        assert_eq!(VmId::from("vm-42").to_string(), "vm-42");
    }
}
