//! The crate's error type.

/// A failure building, packing or reading the appliance's files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {origin}: {detail}")]
    Manifest { origin: String, detail: String },
    #[error("OVF template: {0}")]
    Template(String),
    #[error("{0}")]
    Size(String),
    #[error("OVF descriptor: {0}")]
    Descriptor(String),
    #[error("OVA {path}: {detail}")]
    Ova { path: String, detail: String },
}

/// Shorthand.
pub type Result<T> = std::result::Result<T, Error>;
