//! The EBS direct APIs as the importer uses them: retries ([`retry`]), snapshot writing
//! ([`uploader`]), reading blocks and state back ([`read`]), and the local journal that makes
//! an import resumable and incremental imports cheap ([`journal`]).

pub mod journal;
pub mod read;
pub mod retry;
pub mod steps;
pub mod uploader;
