//! The vSphere source of rehost: a vSphere Web Services (SOAP) client written for what
//! replication needs — inventory, snapshots, changed block tracking (CBT), ranged reads of
//! a snapshot's frozen disk through the datastore HTTP interface, and ExportVm — and the
//! [`rehost_core::Source`] built on it.
//!
//! The SOAP layer ([`soap`]) is pure over bytes, so it is unit-tested and fuzzable; the
//! client keeps one logged-in session (re-login on expiry) shared by cheap clones.

pub mod client;
pub mod error;
pub mod soap;
pub mod task;
pub mod tls;

pub use client::{Client, ConnectOptions, Password};
pub use error::{Error, Result};
pub use soap::MoRef;
pub use tls::Tls;
