//! Replication jobs and runs: the SMS model ([`model`]), their ids ([`ids`]), the one
//! state transition function ([`transition`]), schedule planning ([`schedule`]),
//! validation of what users ask for ([`validate`]) and the errors all of them answer
//! ([`JobError`]). Everything here is pure; the store ([`crate::store`]) persists it.

// The API, the scheduler and the `jobs`/`runs` commands, written alongside, are what call
// most of this; until they land only the store and the tests do.
#![allow(dead_code)]

pub mod error;
pub mod ids;
pub mod model;
pub mod schedule;
pub mod transition;
pub mod validate;

pub use error::JobError;
