//! Reading snapshots through the EBS direct APIs and EC2: the block list (following
//! pagination), single blocks, and the snapshot's state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_ebs::types::ChecksumAlgorithm;
use aws_sdk_ec2::types::SnapshotState;
use bytes::Bytes;
use rehost_core::ErrorKind;

use super::retry::{NotFound, RetryPolicy, classify, with_retry};
use crate::blocks::{BLOCK_LEN, base64, block_sha256};
use crate::error::{Error, Result};

/// The largest ListSnapshotBlocks page (the API allows 100–10,000): fewest calls.
const LIST_PAGE: i32 = 10_000;

/// Every block of `snapshot_id` (including those inherited from its parents): index → block
/// token, following NextToken.
pub async fn list_blocks(
    ebs: &aws_sdk_ebs::Client,
    retry: &RetryPolicy,
    snapshot_id: &str,
) -> Result<BTreeMap<u64, String>> {
    let mut blocks = BTreeMap::new();
    let mut next: Option<String> = None;
    loop {
        let page = with_retry(retry, NotFound::Fail, || {
            let request = ebs
                .list_snapshot_blocks()
                .snapshot_id(snapshot_id)
                .max_results(LIST_PAGE)
                .set_next_token(next.clone());
            async move {
                request.send().await.map_err(|e| {
                    classify("ListSnapshotBlocks", &format!("snapshot {snapshot_id}"), &e)
                })
            }
        })
        .await?;
        for block in page.blocks() {
            if let (Some(index), Some(token)) = (block.block_index(), block.block_token()) {
                let index = u64::try_from(index).map_err(|_| {
                    Error::InvalidInput(format!(
                        "snapshot {snapshot_id}: negative block index {index}"
                    ))
                })?;
                blocks.insert(index, token.to_owned());
            }
        }
        match page.next_token() {
            Some(token) if !token.is_empty() => next = Some(token.to_owned()),
            _ => return Ok(blocks),
        }
    }
}

/// One block of a snapshot, checked against the checksum EBS sends with it.
pub async fn get_block(
    ebs: &aws_sdk_ebs::Client,
    retry: &RetryPolicy,
    snapshot_id: &str,
    index: u64,
    token: &str,
) -> Result<Bytes> {
    let context = format!("snapshot {snapshot_id} block {index}");
    let block_index = i32::try_from(index)
        .map_err(|_| Error::InvalidInput(format!("{context}: index too large")))?;
    with_retry(retry, NotFound::Retry, || {
        let request = ebs
            .get_snapshot_block()
            .snapshot_id(snapshot_id)
            .block_index(block_index)
            .block_token(token);
        let context = context.clone();
        async move {
            let output = request
                .send()
                .await
                .map_err(|e| classify("GetSnapshotBlock", &context, &e))?;
            let checksum = output.checksum().map(str::to_owned);
            let sha256 = matches!(
                output.checksum_algorithm(),
                Some(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            );
            let data = output.block_data.collect().await.map_err(|e| Error::Aws {
                operation: "GetSnapshotBlock",
                code: None,
                message: format!("{context}: reading the body: {e}"),
                kind: ErrorKind::Transient,
            })?;
            let data = data.into_bytes();
            if data.len() != BLOCK_LEN {
                return Err(Error::Aws {
                    operation: "GetSnapshotBlock",
                    code: None,
                    message: format!("{context}: {} bytes, not {BLOCK_LEN}", data.len()),
                    kind: ErrorKind::Transient,
                });
            }
            if let (Some(expected), true) = (checksum, sha256) {
                if base64(&block_sha256(&data)) != expected {
                    return Err(Error::Aws {
                        operation: "GetSnapshotBlock",
                        code: None,
                        message: format!("{context}: the data does not match its checksum"),
                        kind: ErrorKind::Transient,
                    });
                }
            }
            Ok(data)
        }
    })
    .await
}

/// What EC2 says of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// pending, completed, error, …
    pub state: String,
    /// Why it is in error, if it is.
    pub state_message: Option<String>,
    /// Size in GiB.
    pub volume_size_gib: i64,
    /// Whether it is encrypted.
    pub encrypted: bool,
}

/// DescribeSnapshots of one snapshot.
pub async fn describe(
    ec2: &aws_sdk_ec2::Client,
    retry: &RetryPolicy,
    snapshot_id: &str,
) -> Result<SnapshotInfo> {
    let output = with_retry(retry, NotFound::Fail, || {
        let request = ec2.describe_snapshots().snapshot_ids(snapshot_id);
        async move {
            request
                .send()
                .await
                .map_err(|e| classify("DescribeSnapshots", &format!("snapshot {snapshot_id}"), &e))
        }
    })
    .await?;
    let snapshot = output.snapshots().first().ok_or_else(|| Error::Aws {
        operation: "DescribeSnapshots",
        code: Some("InvalidSnapshot.NotFound".into()),
        message: format!("snapshot {snapshot_id} does not exist"),
        kind: ErrorKind::NotFound,
    })?;
    Ok(SnapshotInfo {
        state: snapshot
            .state()
            .map_or_else(|| "unknown".into(), |s| s.as_str().to_owned()),
        state_message: snapshot.state_message().map(str::to_owned),
        volume_size_gib: i64::from(snapshot.volume_size().unwrap_or(0)),
        encrypted: snapshot.encrypted().unwrap_or(false),
    })
}

/// First pause between DescribeSnapshots polls; completion of a small snapshot takes seconds.
const POLL_FIRST: Duration = Duration::from_secs(1);
/// Longest pause: DescribeSnapshots has a shared account-wide rate limit, so a long wait
/// must not poll often.
const POLL_MAX: Duration = Duration::from_secs(15);

/// Polls until the snapshot is `completed`; `error` or `timeout` end the wait with an error.
pub async fn wait_completed(
    ec2: &aws_sdk_ec2::Client,
    retry: &RetryPolicy,
    snapshot_id: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pause = POLL_FIRST;
    loop {
        let info = describe(ec2, retry, snapshot_id).await?;
        match SnapshotState::from(info.state.as_str()) {
            SnapshotState::Completed => return Ok(()),
            SnapshotState::Error => {
                return Err(Error::Aws {
                    operation: "DescribeSnapshots",
                    code: None,
                    message: format!(
                        "snapshot {snapshot_id} is in state error: {}",
                        info.state_message.as_deref().unwrap_or("no reason given")
                    ),
                    kind: ErrorKind::Transient,
                });
            }
            _ => {}
        }
        if Instant::now() + pause > deadline {
            return Err(Error::Aws {
                operation: "DescribeSnapshots",
                code: None,
                message: format!(
                    "snapshot {snapshot_id} still {} after {} s (use --no-wait to skip waiting)",
                    info.state,
                    timeout.as_secs()
                ),
                kind: ErrorKind::Transient,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 3 / 2).min(POLL_MAX);
    }
}
