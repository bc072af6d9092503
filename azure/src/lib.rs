//! The Azure source of rehost: an Azure Resource Manager client written for what
//! replication needs — Entra ID tokens (client credentials or the VM's managed identity),
//! the VM and disk inventory, incremental managed-disk snapshots, read access (SAS) granted
//! and always revoked — and page-range reads of a snapshot's blob: every allocated page for
//! a first copy, the diff against the previous snapshot (with cleared pages) afterwards.
//!
//! Plain REST over reqwest: the calls are a dozen, and the Azure SDK crates for Rust would
//! bring their own HTTP stack and a large dependency tree for them.
//!
//! The parsers ([`pages`], the token and error bodies in [`auth`] and [`error`]) are pure
//! over bytes, unit-tested and fuzzable.

#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod error;
pub mod inventory;
pub mod pages;
pub mod permissions;
pub mod source;

pub use auth::{Credential, Secret};
pub use client::{Client, ConnectOptions};
pub use error::{Error, Result};
pub use inventory::AzureVm;
pub use source::AzureSource;
