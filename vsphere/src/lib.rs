//! The vSphere source of rehost: a vSphere Web Services (SOAP) client written for what
//! replication needs — inventory, snapshots, changed block tracking (CBT), ranged reads of
//! a snapshot's frozen disk through the datastore HTTP interface, ExportVm, and the OVF
//! import that deploys the connector appliance — and the
//! [`rehost_core::Source`] built on it.
//!
//! The SOAP layer ([`soap`]) is pure over bytes, so it is unit-tested and fuzzable; the
//! client keeps one logged-in session (re-login on expiry) shared by cheap clones.

#![warn(missing_docs)]

pub mod cbt;
pub mod client;
pub mod datastore;
pub mod error;
pub mod import;
pub mod inventory;
pub mod nfc;
pub mod placement;
pub mod privileges;
pub mod snapshot;
pub mod soap;
pub mod source;
pub mod task;
pub mod tls;

pub use client::{Client, ConnectOptions, Password};
pub use datastore::DatastoreFile;
pub use error::{Error, Result};
pub use import::{ImportLease, ImportOptions, ImportSpec, ImportSpecParams, UploadMethod};
pub use inventory::Vm;
pub use nfc::{ExportLease, ExportOptions, LeaseFile};
pub use soap::MoRef;
pub use soap::model::{DiskChangeInfo, SnapshotInfo, TaskInfo, VirtualDisk};
pub use source::VsphereSource;
pub use tls::Tls;
