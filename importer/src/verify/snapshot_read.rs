//! The EBS side of reading a snapshot back: ListSnapshotBlocks page by page, and
//! GetSnapshotBlock rate-limited, retried and checked against its checksum.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rehost_core::{EBS_BLOCK_SIZE, ErrorKind};
use tokio::time::Instant;

use crate::aws::Clients;
use crate::blocks::{BLOCK_LEN, base64, block_sha256};
use crate::error::{Error, Result};
use crate::retry::{classify as aws_error, retry};

/// EBS serves at most 1,000 GetSnapshotBlock requests per second (per account and
/// region); staying at it rather than above saves the throttling round trips.
const GET_BLOCKS_PER_SECOND: u32 = 1000;

/// ListSnapshotBlocks, one page at a time as blocks are consumed.
pub(super) struct BlockLister<'a> {
    ebs: &'a aws_sdk_ebs::Client,
    snapshot_id: &'a str,
    page_size: i32,
    pub(super) volume_size_bytes: u64,
    pending: VecDeque<(u64, String)>,
    next_token: Option<String>,
    finished: bool,
    last_index: Option<u64>,
    pub(super) listed: u64,
}

impl<'a> BlockLister<'a> {
    /// Fetches the first page, which gives the volume size.
    pub(super) async fn start(
        ebs: &'a aws_sdk_ebs::Client,
        snapshot_id: &'a str,
        page_size: i32,
    ) -> Result<Self> {
        let mut lister = Self {
            ebs,
            snapshot_id,
            page_size,
            volume_size_bytes: 0,
            pending: VecDeque::new(),
            next_token: None,
            finished: false,
            last_index: None,
            listed: 0,
        };
        lister.fetch().await?;
        Ok(lister)
    }

    pub(super) async fn next(&mut self) -> Result<Option<(u64, String)>> {
        loop {
            if let Some(block) = self.pending.pop_front() {
                self.listed += 1;
                return Ok(Some(block));
            }
            if self.finished {
                return Ok(None);
            }
            self.fetch().await?;
        }
    }

    async fn fetch(&mut self) -> Result<()> {
        let what = format!("snapshot {}", self.snapshot_id);
        let page = retry(|| async {
            self.ebs
                .list_snapshot_blocks()
                .snapshot_id(self.snapshot_id)
                .max_results(self.page_size)
                .set_next_token(self.next_token.clone())
                .send()
                .await
                .map_err(|e| aws_error("ListSnapshotBlocks", &what, &e))
        })
        .await?;
        let invalid = |why: String| Error::Aws {
            operation: "ListSnapshotBlocks",
            code: None,
            message: format!("{what}: {why}"),
            kind: ErrorKind::InvalidInput,
        };
        if let Some(size) = page.block_size() {
            if u64::try_from(size).ok() != Some(EBS_BLOCK_SIZE) {
                return Err(invalid(format!(
                    "block size {size}, expected {EBS_BLOCK_SIZE}"
                )));
            }
        }
        if let Some(gib) = page.volume_size() {
            self.volume_size_bytes =
                u64::try_from(gib).map_err(|_| invalid(format!("volume size {gib} GiB")))? << 30;
        }
        for block in page.blocks() {
            let (Some(index), Some(token)) = (block.block_index(), block.block_token()) else {
                return Err(invalid("a block without index or token".into()));
            };
            let index =
                u64::try_from(index).map_err(|_| invalid(format!("block index {index}")))?;
            // The merge with the image relies on increasing indexes, as EBS documents.
            if self.last_index.is_some_and(|last| index <= last) {
                return Err(invalid(format!(
                    "block {index} listed after block {:?}",
                    self.last_index
                )));
            }
            self.last_index = Some(index);
            self.pending.push_back((index, token.to_owned()));
        }
        self.next_token = page.next_token().map(str::to_owned);
        self.finished = self.next_token.is_none();
        Ok(())
    }
}

/// GetSnapshotBlock with checksum checks, rate-limited and retried.
pub(super) struct BlockReader<'a> {
    ebs: &'a aws_sdk_ebs::Client,
    snapshot_id: &'a str,
    limiter: RateLimiter,
}

impl<'a> BlockReader<'a> {
    pub(super) fn new(clients: &'a Clients, snapshot_id: &'a str) -> Self {
        Self {
            ebs: &clients.ebs,
            snapshot_id,
            limiter: RateLimiter::per_second(GET_BLOCKS_PER_SECOND),
        }
    }

    /// The block's bytes and SHA-256.
    pub(super) async fn get(&self, block_index: u64, token: &str) -> Result<(Bytes, [u8; 32])> {
        let what = format!("snapshot {} block {block_index}", self.snapshot_id);
        let index = i32::try_from(block_index)
            .map_err(|_| Error::InvalidInput(format!("{what}: index too large")))?;
        retry(|| async {
            self.limiter.acquire().await;
            let output = self
                .ebs
                .get_snapshot_block()
                .snapshot_id(self.snapshot_id)
                .block_index(index)
                .block_token(token)
                .send()
                .await
                .map_err(|e| aws_error("GetSnapshotBlock", &what, &e))?;
            let transient = |message: String| Error::Aws {
                operation: "GetSnapshotBlock",
                code: None,
                message,
                kind: ErrorKind::Transient,
            };
            let expected = output.checksum.clone();
            let data = output
                .block_data
                .collect()
                .await
                .map_err(|e| transient(format!("{what}: reading the body: {e}")))?
                .into_bytes();
            if data.len() != BLOCK_LEN {
                return Err(transient(format!(
                    "{what}: {} bytes, expected {BLOCK_LEN}",
                    data.len()
                )));
            }
            let hashed = data.clone();
            let digest = tokio::task::spawn_blocking(move || block_sha256(&hashed))
                .await
                .map_err(|e| transient(format!("{what}: hashing: {e}")))?;
            match expected {
                Some(expected) if expected != base64(&digest) => Err(transient(format!(
                    "{what}: checksum {} does not match the data's {}",
                    expected,
                    base64(&digest)
                ))),
                None => Err(transient(format!("{what}: no checksum in the response"))),
                Some(_) => Ok((data, digest)),
            }
        })
        .await
    }
}

/// Spaces requests evenly at a rate shared by all tasks. Each caller reserves the next
/// free slot under a short lock, then sleeps outside it.
struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn per_second(rate: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / rate.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = (*next).max(Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limiter_spaces_requests() {
        let limiter = RateLimiter::per_second(1000);
        let start = Instant::now();
        for _ in 0..50 {
            limiter.acquire().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(49),
            "{:?}",
            start.elapsed()
        );
    }
}
