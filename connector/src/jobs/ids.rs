//! Ids of servers, jobs, runs and the connector itself.
//!
//! A server id is derived (the same VM always gets the same id, across catalog imports
//! and machines); job, run and connector ids are random, SMS-style: a prefix and 17 hex
//! digits (68 bits: collisions are not a concern at the scale of one connector).

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::model::{JobId, RunId, ServerId};

/// Hex digits after the prefix, as SMS ids have.
const ID_HEX_DIGITS: usize = 17;

/// `s-` and 17 hex digits of SHA-256(`{source}/{vm_id}`).
pub fn server_id(source: &str, vm_id: &str) -> ServerId {
    let digest = Sha256::digest(format!("{source}/{vm_id}").as_bytes());
    let mut text = hex::encode(digest);
    text.truncate(ID_HEX_DIGITS);
    ServerId(format!("{}{text}", ServerId::PREFIX))
}

/// A new random job id (`sms-job-…`).
pub fn new_job_id() -> JobId {
    JobId(format!("{}{}", JobId::PREFIX, random_hex()))
}

/// A new random run id (`sms-run-…`).
pub fn new_run_id() -> RunId {
    RunId(format!("{}{}", RunId::PREFIX, random_hex()))
}

/// A new random connector id (`c-…`), made once per store.
pub fn new_connector_id() -> String {
    format!("c-{}", random_hex())
}

/// 17 random hex digits. `getrandom` (already built for `ring`, so no new crate) reads
/// the OS generator; should that fail, std's `RandomState` (keyed from OS randomness once
/// per process) hashes the time, the pid and a counter, which is unique within the
/// process and unpredictable enough for ids that are not secrets.
fn random_hex() -> String {
    let mut bytes = [0u8; 9];
    if getrandom::getrandom(&mut bytes).is_err() {
        bytes = fallback_random();
    }
    let mut text = hex::encode(bytes);
    text.truncate(ID_HEX_DIGITS);
    text
}

fn fallback_random() -> [u8; 9] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut out = [0u8; 9];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_usize(i);
        let value = hasher.finish().to_le_bytes();
        chunk.copy_from_slice(&value[..chunk.len()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_id(text: &str, prefix: &str) -> bool {
        text.strip_prefix(prefix).is_some_and(|rest| {
            rest.len() == ID_HEX_DIGITS && rest.chars().all(|c| c.is_ascii_hexdigit())
        })
    }

    #[test]
    fn server_ids_are_stable_and_distinct() {
        let a = server_id("vc1", "4201-aa");
        assert_eq!(a, server_id("vc1", "4201-aa"));
        assert_ne!(a, server_id("vc2", "4201-aa"));
        assert!(is_id(&a.0, "s-"), "{a}");
        // The id is the first 17 hex digits of SHA-256("source/vm_id").
        let digest = hex::encode(Sha256::digest(b"vc1/vm-1"));
        assert_eq!(server_id("vc1", "vm-1").0, format!("s-{}", &digest[..17]));
    }

    #[test]
    fn random_ids_have_the_sms_form_and_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let job = new_job_id();
            assert!(is_id(&job.0, "sms-job-"), "{job}");
            assert!(seen.insert(job.0));
        }
        assert!(is_id(&new_run_id().0, "sms-run-"));
        assert!(is_id(&new_connector_id(), "c-"));
        let fallback: Vec<_> = (0..100).map(|_| fallback_random()).collect();
        let distinct: std::collections::HashSet<_> = fallback.iter().collect();
        assert_eq!(distinct.len(), fallback.len());
    }
}
