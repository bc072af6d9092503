//! Errors of the importer, each classified by [`ErrorKind`] so callers know whether to retry.

use rehost_core::ErrorKind;

/// Result of importer operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to AWS or reading the image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or decoding the source image failed.
    #[error("reading the image")]
    Image(#[from] rehost_diskimage::Error),
    /// An AWS call failed; `operation` names it, `code` is AWS's error code if any.
    #[error("{operation} failed{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Aws {
        operation: &'static str,
        code: Option<String>,
        message: String,
        kind: ErrorKind,
    },
    /// The user asked for something invalid.
    #[error("{0}")]
    InvalidInput(String),
    /// A snapshot read back differs from the image.
    #[error("snapshot {snapshot_id} differs from the image at block {block_index}")]
    Mismatch {
        snapshot_id: String,
        block_index: u64,
    },
    /// Local I/O (journals, output files).
    #[error("{path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// How a caller should treat this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Image(e) => e.kind(),
            Error::Aws { kind, .. } => *kind,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::Mismatch { .. } => ErrorKind::CorruptImage,
            Error::Io { .. } => ErrorKind::Transient,
        }
    }
}
