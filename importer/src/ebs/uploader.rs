//! Writing one snapshot through the EBS direct APIs: StartSnapshot, PutSnapshotBlock with
//! bounded concurrency (blocks partly unchanged merged with the parent's block first),
//! CompleteSnapshot with the linear aggregated checksum. Which blocks to write is decided
//! elsewhere ([`crate::blocks`], [`crate::import`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use bytes::Bytes;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;

use super::read;
use super::retry::{NotFound, RetryPolicy, classify, with_retry};
use crate::blocks::{BLOCK_LEN, base64, block_sha256, merge_with_parent};
use crate::error::{Error, Result};

/// Concurrent PutSnapshotBlock calls by default. EBS accepts 1,000 puts/s per snapshot; a
/// 512 KiB put takes ~50–100 ms from within the region, so by Little's law ~64 in flight
/// reach that rate (more only earns throttling). Memory in flight: 64 × 512 KiB = 32 MiB.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// Minutes EBS keeps a pending snapshot without writes or completion before cancelling it.
/// A day, rather than the 60-minute default, so an interrupted import can be resumed the
/// next morning; an abandoned one still disappears by itself.
pub const DEFAULT_TIMEOUT_MINUTES: i32 = 24 * 60;

/// Largest EBS snapshot, GiB (StartSnapshot VolumeSize).
pub const MAX_VOLUME_GIB: i64 = 65_536;

/// Encryption of a first-of-chain snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Encryption {
    /// Not asked for (the account's encryption-by-default may still apply; a child inherits
    /// its parent's).
    #[default]
    Default,
    /// Encrypted, with this KMS key ARN or the account's default EBS key.
    Encrypted { kms_key_arn: Option<String> },
}

/// What StartSnapshot is asked.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    /// Volume size, GiB.
    pub volume_size_gib: i64,
    /// Snapshot description.
    pub description: Option<String>,
    /// Tags.
    pub tags: Vec<(String, String)>,
    /// Idempotency token (kept in the journal).
    pub client_token: String,
    /// Minutes before EBS cancels the pending snapshot.
    pub timeout_minutes: i32,
    /// Parent snapshot.
    pub parent_snapshot_id: Option<String>,
    /// Encryption (first of a chain only).
    pub encryption: Encryption,
}

impl SnapshotSpec {
    /// Refuses what EBS refuses, with a message that says why.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_VOLUME_GIB).contains(&self.volume_size_gib) {
            return Err(Error::InvalidInput(format!(
                "volume size {} GiB is outside 1–{MAX_VOLUME_GIB} GiB",
                self.volume_size_gib
            )));
        }
        if self.parent_snapshot_id.is_some() && self.encryption != Encryption::Default {
            return Err(Error::InvalidInput(
                "encryption options cannot be combined with a parent snapshot: EBS refuses ParentSnapshotId with Encrypted, and a child inherits its parent's encryption".into(),
            ));
        }
        Ok(())
    }
}

/// Starts a snapshot (idempotent on `client_token`); returns its id.
pub async fn start(
    ebs: &aws_sdk_ebs::Client,
    retry: &RetryPolicy,
    spec: &SnapshotSpec,
) -> Result<String> {
    spec.validate()?;
    let tags: Vec<Tag> = spec
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let output = with_retry(retry, NotFound::Fail, || {
        let mut request = ebs
            .start_snapshot()
            .volume_size(spec.volume_size_gib)
            .client_token(&spec.client_token)
            .timeout(spec.timeout_minutes)
            .set_description(spec.description.clone())
            .set_parent_snapshot_id(spec.parent_snapshot_id.clone());
        if !tags.is_empty() {
            request = request.set_tags(Some(tags.clone()));
        }
        if let Encryption::Encrypted { kms_key_arn } = &spec.encryption {
            request = request.encrypted(true).set_kms_key_arn(kms_key_arn.clone());
        }
        async move {
            request
                .send()
                .await
                .map_err(|e| classify("StartSnapshot", "", &e))
        }
    })
    .await?;
    output
        .snapshot_id()
        .map(str::to_owned)
        .ok_or_else(|| Error::Aws {
            operation: "StartSnapshot",
            code: None,
            message: "the answer has no snapshot id".into(),
            kind: rehost_core::ErrorKind::Transient,
        })
}

/// A block ready to send: 512 KiB and its SHA-256.
#[derive(Debug, Clone)]
pub struct HashedBlock {
    /// Block index.
    pub index: u64,
    /// The bytes.
    pub data: Bytes,
    /// SHA-256 of `data`.
    pub sha256: [u8; 32],
}

impl HashedBlock {
    /// Hashes `data`.
    pub fn new(index: u64, data: Bytes) -> Self {
        let sha256 = block_sha256(&data);
        Self {
            index,
            data,
            sha256,
        }
    }
}

/// Writes blocks into one pending snapshot.
#[derive(Debug, Clone)]
pub struct Uploader {
    ebs: aws_sdk_ebs::Client,
    retry: RetryPolicy,
    snapshot_id: Arc<str>,
    parent_snapshot_id: Option<Arc<str>>,
    /// The parent's block tokens, listed on the first partial block.
    parent_tokens: Arc<OnceCell<BTreeMap<u64, String>>>,
}

impl Uploader {
    /// An uploader for `snapshot_id` (child of `parent_snapshot_id`, if any).
    pub fn new(
        ebs: aws_sdk_ebs::Client,
        retry: RetryPolicy,
        snapshot_id: &str,
        parent_snapshot_id: Option<&str>,
    ) -> Self {
        Self {
            ebs,
            retry,
            snapshot_id: snapshot_id.into(),
            parent_snapshot_id: parent_snapshot_id.map(Into::into),
            parent_tokens: Arc::default(),
        }
    }

    /// The snapshot written.
    pub fn snapshot_id(&self) -> &str {
        &self.snapshot_id
    }

    /// A block partly unchanged: the parent's block with the `present` ranges of `data` laid
    /// over it (a block the parent never wrote is zero).
    pub async fn merge_partial(
        &self,
        index: u64,
        data: Bytes,
        present: Vec<(usize, usize)>,
    ) -> Result<HashedBlock> {
        let Some(parent) = &self.parent_snapshot_id else {
            return Err(Error::InvalidInput(format!(
                "block {index} is partly unchanged but the import has no parent snapshot"
            )));
        };
        let tokens = self
            .parent_tokens
            .get_or_try_init(|| read::list_blocks(&self.ebs, &self.retry, parent))
            .await?;
        let parent_block = match tokens.get(&index) {
            Some(token) => read::get_block(&self.ebs, &self.retry, parent, index, token).await?,
            None => Bytes::from(vec![0u8; BLOCK_LEN]),
        };
        let merged = merge_with_parent(&data, &present, &parent_block)?;
        Ok(HashedBlock::new(index, merged))
    }

    /// Sends one block (retrying); resolves to its index and digest once acknowledged.
    pub fn spawn_put(&self, tasks: &mut JoinSet<Result<(u64, [u8; 32])>>, block: HashedBlock) {
        let this = self.clone();
        tasks.spawn(async move {
            this.put(&block).await?;
            Ok((block.index, block.sha256))
        });
    }

    async fn put(&self, block: &HashedBlock) -> Result<()> {
        let context = format!("snapshot {} block {}", self.snapshot_id, block.index);
        let index = i32::try_from(block.index)
            .map_err(|_| Error::InvalidInput(format!("{context}: index too large")))?;
        let length = i32::try_from(block.data.len())
            .map_err(|_| Error::InvalidInput(format!("{context}: block too large")))?;
        let checksum = base64(&block.sha256);
        with_retry(&self.retry, NotFound::Retry, || {
            let request = self
                .ebs
                .put_snapshot_block()
                .snapshot_id(&*self.snapshot_id)
                .block_index(index)
                .block_data(ByteStream::from(block.data.clone()))
                .data_length(length)
                .checksum(&checksum)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256);
            let context = &context;
            async move {
                request
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| classify("PutSnapshotBlock", context, &e))
            }
        })
        .await
    }

    /// CompleteSnapshot with the count of blocks written and their linear checksum (omitted
    /// when nothing was written: there is nothing to aggregate).
    pub async fn complete(&self, changed_blocks: u64, linear_checksum: String) -> Result<()> {
        let context = format!("snapshot {}", self.snapshot_id);
        let count = i32::try_from(changed_blocks)
            .map_err(|_| Error::InvalidInput(format!("{context}: too many blocks")))?;
        with_retry(&self.retry, NotFound::Retry, || {
            let mut request = self
                .ebs
                .complete_snapshot()
                .snapshot_id(&*self.snapshot_id)
                .changed_blocks_count(count);
            if changed_blocks > 0 {
                request = request
                    .checksum(&linear_checksum)
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .checksum_aggregation_method(
                        ChecksumAggregationMethod::ChecksumAggregationLinear,
                    );
            }
            let context = &context;
            async move {
                request
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| classify("CompleteSnapshot", context, &e))
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SnapshotSpec {
        SnapshotSpec {
            volume_size_gib: 1,
            description: None,
            tags: vec![],
            client_token: "t".into(),
            timeout_minutes: DEFAULT_TIMEOUT_MINUTES,
            parent_snapshot_id: None,
            encryption: Encryption::Default,
        }
    }

    #[test]
    fn a_child_cannot_ask_for_encryption() {
        assert!(spec().validate().is_ok());
        let child = SnapshotSpec {
            parent_snapshot_id: Some("snap-1".into()),
            encryption: Encryption::Encrypted { kms_key_arn: None },
            ..spec()
        };
        assert!(matches!(child.validate(), Err(Error::InvalidInput(m)) if m.contains("parent")));
        assert!(
            SnapshotSpec {
                volume_size_gib: 0,
                ..spec()
            }
            .validate()
            .is_err()
        );
        assert!(
            SnapshotSpec {
                volume_size_gib: MAX_VOLUME_GIB + 1,
                ..spec()
            }
            .validate()
            .is_err()
        );
    }
}
