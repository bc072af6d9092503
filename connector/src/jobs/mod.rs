//! Replication jobs and runs: the SMS model ([`model`]), their ids ([`ids`]), the one
//! state transition function ([`transition`]), schedule planning ([`schedule`]) and the
//! errors they answer ([`JobError`]). Everything here is pure.

// The API, the scheduler and the `jobs`/`runs` commands, written alongside, are what call
// most of this; until they land only the store and the tests do.
#![allow(dead_code)]

pub mod error;
pub mod ids;
pub mod model;
pub mod schedule;
pub mod transition;

#[allow(unused_imports)] // for the store and the API, next
pub use error::JobError;
