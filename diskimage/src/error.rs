//! The one error type of the disk-image library. Every variant names the file, and where it
//! applies the structure and byte offset, so a user can find what is wrong with `hexdump`.

use std::io;

use rehost_core::ErrorKind;

/// Result of disk-image operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong reading or writing an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying read or write failed.
    #[error("{file}: cannot {op} {structure} at offset {offset}")]
    Io {
        file: String,
        op: &'static str,
        structure: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The image ends before a structure it needs.
    #[error(
        "{file}: truncated: {structure} at offset {offset} needs {needed} bytes, the file has {file_len}"
    )]
    Truncated {
        file: String,
        structure: &'static str,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    /// The bytes contradict the format.
    #[error("{file}: corrupt {structure} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        structure: &'static str,
        offset: u64,
        reason: String,
    },
    /// A valid image using something we do not handle.
    #[error("{file}: unsupported: {what}")]
    Unsupported { file: String, what: String },
    /// No known format's magic matched.
    #[error("{file}: not a disk image we can read: {reason}")]
    UnknownFormat { file: String, reason: String },
    /// A differencing image's parent cannot be opened.
    #[error("{file}: parent image not found (tried {tried:?})")]
    ParentNotFound { file: String, tried: Vec<String> },
    /// A parent was found but is not the one the child was made from.
    #[error("{file}: parent {parent} does not match: {reason}")]
    ParentMismatch {
        file: String,
        parent: String,
        reason: String,
    },
    /// A parent chain that loops or is deeper than we follow.
    #[error("{file}: parent chain {reason}")]
    ParentChain { file: String, reason: String },
    /// A file named by a descriptor or given by the user cannot be opened.
    #[error("{file}: cannot open")]
    Open {
        file: String,
        #[source]
        source: io::Error,
    },
    /// The caller asked for something invalid (a read past the end, extents out of order).
    #[error("{0}")]
    InvalidInput(String),
}

impl Error {
    /// How a caller should treat this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } | Error::Open { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => {
                    ErrorKind::CorruptImage
                }
                _ => ErrorKind::Transient,
            },
            Error::Truncated { .. }
            | Error::Corrupt { .. }
            | Error::UnknownFormat { .. }
            | Error::ParentMismatch { .. }
            | Error::ParentChain { .. } => ErrorKind::CorruptImage,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::ParentNotFound { .. } => ErrorKind::NotFound,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
        }
    }

    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(
        file: &str,
        structure: &'static str,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            file: file.to_owned(),
            structure,
            offset,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(file: &str, what: impl Into<String>) -> Self {
        Error::Unsupported {
            file: file.to_owned(),
            what: what.into(),
        }
    }
}
