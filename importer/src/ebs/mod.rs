//! The EBS direct APIs as the importer uses them: retries ([`retry`]), snapshot writing
//! ([`uploader`]), reading blocks and state back ([`read`]), and the local journal that makes
//! an import resumable and incremental imports cheap ([`journal`]).

pub mod journal;
pub mod read;
/// Retries are shared by every AWS call of the importer; kept here under their old path.
pub use crate::retry;
pub mod steps;
pub mod uploader;
