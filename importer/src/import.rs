//! `import`: one disk image to one verified EBS snapshot.
//!
//! The disk is streamed on a blocking thread (the disk-image library reads and decodes on
//! several threads), re-cut into 512 KiB blocks by [`BlockPlanner`], hashed there, and sent
//! through a bounded channel to the async side, which merges partly unchanged blocks with
//! the parent's, feeds the linear checksum in index order, skips what the journal says was
//! already acknowledged, and writes the rest with bounded concurrency. Memory is bounded by
//! the channel ([`CHANNEL_BLOCKS`] × 512 KiB) plus the puts in flight (concurrency × 512 KiB).
//!
//! Three kinds of import:
//! - full (no parent): zero and unallocated blocks are skipped, unless encrypted;
//! - delta (a differencing image, e.g. a VMDK delta, onto `parent_snapshot_id`): only the top
//!   layer is read; its unallocated areas are the parent's, its zero areas are written;
//! - full image onto `parent_snapshot_id`: only blocks whose SHA-256 differs from the parent's
//!   are sent (see [`parent_digests`] for where the parent's digests come from).

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use rehost_core::EBS_BLOCK_SIZE;
use rehost_diskimage::Disk;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::aws::Clients;
use crate::blocks::{LinearChecksum, Policy, base64, block_sha256};
use crate::ebs::journal::{
    JournalLocation, JournalState, JournalWriter, Record, SourceIdentity, StartRecord,
};
use crate::ebs::read;
use crate::ebs::retry::{RetryPolicy, without_sdk_retries_ebs, without_sdk_retries_ec2};
use crate::ebs::steps::{Plan, Step, plan_blocks};
use crate::ebs::uploader::{self, Encryption, SnapshotSpec, Uploader};
use crate::error::{Error, Result};

/// Planned blocks buffered between the reading thread and the uploader: 64 × 512 KiB =
/// 32 MiB, enough to keep 64 puts busy while the reader decodes the next ones.
pub const CHANNEL_BLOCKS: usize = 64;
/// Parent blocks fetched at once to merge partly unchanged blocks (kept in order).
const PARTIAL_FETCHES: usize = 16;
/// 512 KiB blocks per GiB.
const BLOCKS_PER_GIB: u64 = (1 << 30) / EBS_BLOCK_SIZE;

/// Progress, reported as blocks are acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Blocks in the snapshot so far (including those acknowledged before a resume).
    pub blocks_written: u64,
    /// How far the image has been read, bytes of its virtual size.
    pub position_bytes: u64,
    /// The image's virtual size.
    pub virtual_size_bytes: u64,
}

/// A progress callback.
#[derive(Clone)]
pub struct ProgressCallback(pub Arc<dyn Fn(&Progress) + Send + Sync>);

impl std::fmt::Debug for ProgressCallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressCallback")
    }
}

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// What the source is (for the journal and resume checks).
    pub source: SourceIdentity,
    /// Volume size; default: the virtual size rounded up to a GiB (or the parent's, if larger).
    pub volume_size_gib: Option<i64>,
    /// Snapshot description.
    pub description: Option<String>,
    /// Snapshot tags.
    pub tags: Vec<(String, String)>,
    /// Concurrent PutSnapshotBlock calls.
    pub concurrency: usize,
    /// Parent snapshot: an incremental import.
    pub parent_snapshot_id: Option<String>,
    /// Encryption of a first snapshot.
    pub encryption: Encryption,
    /// Return once CompleteSnapshot answered, without waiting for `completed`.
    pub no_wait: bool,
    /// Longest wait for `completed`.
    pub wait_timeout: Duration,
    /// Continue the pending import of the same source, if the journal has one.
    pub resume: bool,
    /// Where journals live.
    pub journal: JournalLocation,
    /// Retries of AWS calls.
    pub retry: RetryPolicy,
    /// Minutes before EBS cancels the pending snapshot.
    pub timeout_minutes: i32,
    /// Threads reading the image.
    pub reader_threads: usize,
    /// Called as blocks are acknowledged.
    pub progress: Option<ProgressCallback>,
    /// Set to stop: in-flight puts finish and are journaled, then the import returns
    /// [`ImportStatus::Interrupted`] with the snapshot still pending, ready for `--resume`.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl ImportOptions {
    /// Defaults for a source, journals in `journal_dir`.
    pub fn new(source: SourceIdentity, journal: JournalLocation) -> Self {
        Self {
            source,
            volume_size_gib: None,
            description: None,
            tags: Vec::new(),
            concurrency: uploader::DEFAULT_CONCURRENCY,
            parent_snapshot_id: None,
            encryption: Encryption::Default,
            no_wait: false,
            wait_timeout: Duration::from_secs(3600),
            resume: false,
            journal,
            retry: RetryPolicy::default(),
            timeout_minutes: uploader::DEFAULT_TIMEOUT_MINUTES,
            reader_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            progress: None,
            cancel: None,
        }
    }
}

/// How an import ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportStatus {
    /// The snapshot is completed.
    Completed,
    /// CompleteSnapshot answered; not waited for `completed` (`no_wait`).
    Pending,
    /// Stopped on request; resume with `--resume`.
    Interrupted,
}

/// Which kind of import ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportMode {
    /// A full image, no parent.
    Full,
    /// A differencing image onto its parent's snapshot.
    Delta,
    /// A full image compared block by block with the parent snapshot.
    FullAgainstParent,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The snapshot.
    pub snapshot_id: String,
    /// How it ended.
    pub status: ImportStatus,
    /// Kind of import.
    pub mode: ImportMode,
    /// Volume size, GiB.
    pub volume_size_gib: i64,
    /// Blocks in the snapshot written by this import (ChangedBlocksCount), resumed ones included.
    pub blocks_written: u64,
    /// Of those, blocks acknowledged before a resume and not sent again.
    pub blocks_resumed: u64,
    /// Blocks of the volume not written (zero, unallocated, or the same as the parent's).
    pub blocks_skipped: u64,
    /// Bytes of image data read (zero and unallocated areas are not read).
    pub bytes_read: u64,
    /// Parent snapshot.
    pub parent_snapshot_id: Option<String>,
    /// Where the parent's block digests came from (`journal` or `snapshot`), for a full image
    /// onto a parent.
    pub parent_digests_from: Option<&'static str>,
    /// Whether the snapshot is encrypted.
    pub encrypted: bool,
    /// The KMS key ARN asked for (first snapshot of a chain; children inherit their
    /// parent's key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_arn: Option<String>,
    /// The image's virtual size.
    pub virtual_size_bytes: u64,
    /// The journal of this import.
    pub journal: String,
    /// The AMI registered from the snapshot, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ami_id: Option<String>,
}

/// Imports `disk` into a new EBS snapshot (or resumes the pending one).
pub async fn import(
    clients: &Clients,
    disk: &Disk,
    options: &ImportOptions,
) -> Result<ImportReport> {
    check_kms_key_arn(&options.encryption)?;
    let ebs = without_sdk_retries_ebs(&clients.ebs);
    let ec2 = without_sdk_retries_ec2(&clients.ec2);
    let retry = &options.retry;
    let virtual_size = disk.virtual_size();

    let parent = match &options.parent_snapshot_id {
        Some(id) => {
            let info = read::describe(&ec2, retry, id).await?;
            if info.state != "completed" {
                return Err(Error::InvalidInput(format!(
                    "parent snapshot {id} is {}, not completed",
                    info.state
                )));
            }
            Some((id.clone(), info))
        }
        None => None,
    };
    let parent_gib = parent.as_ref().map_or(0, |(_, p)| p.volume_size_gib);
    let volume_size_gib = volume_size_gib(virtual_size, options.volume_size_gib, parent_gib)?;
    let spec_encryption = options.encryption.clone();
    let encrypted = match &parent {
        Some((_, info)) => info.encrypted,
        None => spec_encryption != Encryption::Default,
    };
    let delta = parent.is_some() && disk.top().info().parent.is_some();
    let mode = match (&parent, delta) {
        (None, _) => ImportMode::Full,
        (Some(_), true) => ImportMode::Delta,
        (Some(_), false) => ImportMode::FullAgainstParent,
    };

    // Resume or start the journal.
    let resumed = if options.resume {
        resume_state(options)?
    } else {
        None
    };
    let (mut journal, state) = match resumed {
        Some((path, state)) => (JournalWriter::open(&path)?, state),
        None => {
            let client_token = client_token(&options.source);
            let path = options.journal.new_pending(&options.source, &client_token);
            let start = StartRecord {
                source: options.source.clone(),
                client_token,
                parent_snapshot_id: options.parent_snapshot_id.clone(),
                volume_size_gib,
            };
            let mut writer = JournalWriter::open(&path)?;
            writer.append(&Record::Start(start.clone()), true)?;
            (
                writer,
                JournalState {
                    start: Some(start),
                    ..JournalState::default()
                },
            )
        }
    };
    let start = state.start.clone().ok_or_else(|| {
        Error::InvalidInput(format!(
            "journal {} has no start line",
            journal.path().display()
        ))
    })?;
    if start.parent_snapshot_id != options.parent_snapshot_id
        || start.volume_size_gib != volume_size_gib
    {
        return Err(Error::InvalidInput(format!(
            "journal {} was for parent {:?} and {} GiB; this run asks for {:?} and {volume_size_gib} GiB: run without --resume",
            journal.path().display(),
            start.parent_snapshot_id,
            start.volume_size_gib,
            options.parent_snapshot_id
        )));
    }

    let (parent_digests, parent_digests_from) = match (&parent, mode) {
        (Some((id, _)), ImportMode::FullAgainstParent) => {
            let (digests, from) = parent_digests(&ebs, options, id).await?;
            (Some(Arc::new(digests)), Some(from))
        }
        _ => (None, None),
    };

    let snapshot_id = match &state.snapshot_id {
        Some(id) => {
            let info = read::describe(&ec2, retry, id).await?;
            if info.state != "pending" {
                return Err(Error::InvalidInput(format!(
                    "the interrupted import's snapshot {id} is {}, not pending (EBS cancels a pending snapshot after its timeout): run without --resume",
                    info.state
                )));
            }
            id.clone()
        }
        None => {
            let spec = SnapshotSpec {
                volume_size_gib,
                description: options.description.clone(),
                tags: options.tags.clone(),
                client_token: start.client_token.clone(),
                timeout_minutes: options.timeout_minutes,
                parent_snapshot_id: options.parent_snapshot_id.clone(),
                encryption: spec_encryption,
            };
            let id = uploader::start(&ebs, retry, &spec).await?;
            journal.append(
                &Record::Started {
                    snapshot_id: id.clone(),
                },
                true,
            )?;
            id
        }
    };
    tracing::info!(
        snapshot_id,
        ?mode,
        volume_size_gib,
        resumed = state.acknowledged.len(),
        "importing"
    );

    let volume_blocks = u64::try_from(volume_size_gib).unwrap_or(0) * BLOCKS_PER_GIB;
    let plan = Plan {
        mode,
        policy: Policy {
            write_zeros: encrypted && parent.is_none(),
            has_parent: mode == ImportMode::Delta,
        },
        volume_blocks,
        parent_digests,
        encrypted,
    };
    let up = Uploader::new(
        ebs.clone(),
        *retry,
        &snapshot_id,
        options.parent_snapshot_id.as_deref(),
    );
    let outcome = upload(disk, &plan, &up, options, &state.acknowledged, &mut journal).await?;

    let journal_path = journal.path().display().to_string();
    let report = |status| ImportReport {
        snapshot_id: snapshot_id.clone(),
        status,
        mode,
        volume_size_gib,
        blocks_written: outcome.blocks_written,
        blocks_resumed: outcome.blocks_resumed,
        blocks_skipped: volume_blocks.saturating_sub(outcome.blocks_written),
        bytes_read: outcome.bytes_read,
        parent_snapshot_id: options.parent_snapshot_id.clone(),
        parent_digests_from,
        encrypted,
        kms_key_arn: match &options.encryption {
            Encryption::Encrypted { kms_key_arn } => kms_key_arn.clone(),
            Encryption::Default => None,
        },
        virtual_size_bytes: virtual_size,
        journal: journal_path.clone(),
        ami_id: None,
    };
    if outcome.interrupted {
        journal.flush()?;
        return Ok(report(ImportStatus::Interrupted));
    }
    up.complete(outcome.blocks_written, outcome.linear_checksum)
        .await?;
    journal.append(
        &Record::Completed {
            snapshot_id: snapshot_id.clone(),
            checksums_complete: mode != ImportMode::Delta,
        },
        true,
    )?;
    let mut report = report(if options.no_wait {
        ImportStatus::Pending
    } else {
        ImportStatus::Completed
    });
    report.journal = journal
        .finish(&options.journal, &snapshot_id)?
        .display()
        .to_string();
    if !options.no_wait {
        read::wait_completed(&ec2, retry, &snapshot_id, options.wait_timeout).await?;
    }
    Ok(report)
}

/// The snapshot's size: the image's virtual size rounded up to a GiB, or the parent's if
/// larger, or what was asked if not smaller than either.
fn volume_size_gib(virtual_size: u64, asked: Option<i64>, parent_gib: i64) -> Result<i64> {
    let needed_gib = i64::try_from(virtual_size.div_ceil(1 << 30).max(1))
        .map_err(|_| Error::InvalidInput("image too large".into()))?;
    match asked {
        Some(asked) if asked < needed_gib.max(parent_gib) => Err(Error::InvalidInput(format!(
            "--volume-size-gib {asked} is smaller than the image ({needed_gib} GiB) or the parent snapshot ({parent_gib} GiB)"
        ))),
        Some(asked) => Ok(asked),
        None => Ok(needed_gib.max(parent_gib)),
    }
}

/// What a full import of an image would write, found without AWS.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    /// Always `full`: a dry run has no parent snapshot to compare with.
    pub mode: ImportMode,
    /// Volume size the snapshot would have, GiB.
    pub volume_size_gib: i64,
    /// Blocks an import would write (PutSnapshotBlock calls, ChangedBlocksCount).
    pub blocks_written: u64,
    /// Blocks of the volume it would not write (zero or unallocated).
    pub blocks_skipped: u64,
    /// Bytes of image data read.
    pub bytes_read: u64,
    /// Whether it was planned as encrypted (every block written).
    pub encrypted: bool,
    /// The image's virtual size.
    pub virtual_size_bytes: u64,
    /// The linear aggregated checksum CompleteSnapshot would carry (base64).
    pub linear_checksum: String,
}

/// The reading half of a full import into a null sink: the image read and decoded, re-cut
/// into blocks, each hashed, the linear checksum aggregated, exactly as [`import`] does it,
/// but nothing sent. It answers "what would this import write?" without credentials, and
/// measures the pipeline's own throughput (see `bench/import.sh`).
pub async fn dry_run(disk: &Disk, options: &ImportOptions) -> Result<DryRunReport> {
    if options.parent_snapshot_id.is_some() {
        return Err(Error::InvalidInput(
            "a dry run reads no snapshot: it plans full imports only (no parent snapshot)".into(),
        ));
    }
    let virtual_size = disk.virtual_size();
    let volume_size_gib = volume_size_gib(virtual_size, options.volume_size_gib, 0)?;
    let encrypted = options.encryption != Encryption::Default;
    let volume_blocks = u64::try_from(volume_size_gib).unwrap_or(0) * BLOCKS_PER_GIB;
    let plan = Plan {
        mode: ImportMode::Full,
        policy: Policy {
            write_zeros: encrypted,
            has_parent: false,
        },
        volume_blocks,
        parent_digests: None,
        encrypted,
    };
    let (tx, mut rx) = mpsc::channel::<Result<Step>>(CHANNEL_BLOCKS);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let position = Arc::new(AtomicU64::new(0));
    {
        let (disk, bytes_read, position, threads) = (
            disk.clone(),
            bytes_read.clone(),
            position.clone(),
            options.reader_threads,
        );
        tokio::task::spawn_blocking(move || {
            if let Err(e) = plan_blocks(&disk, &plan, threads, &bytes_read, &position, &tx) {
                // The receiver is gone only if the caller stopped waiting.
                let _ = tx.blocking_send(Err(e));
            }
        });
    }
    let mut linear = LinearChecksum::default();
    while let Some(step) = rx.recv().await {
        match step? {
            Step::Send(block) => linear.add(block.index, &block.sha256)?,
            Step::Same { index, .. } | Step::Partial { index, .. } => {
                return Err(Error::InvalidInput(format!(
                    "block {index}: a full import without a parent planned a parent comparison"
                )));
            }
        }
        if let Some(progress) = &options.progress {
            (progress.0)(&Progress {
                blocks_written: linear.blocks(),
                position_bytes: position.load(Ordering::Relaxed),
                virtual_size_bytes: virtual_size,
            });
        }
    }
    let blocks_written = linear.blocks();
    Ok(DryRunReport {
        mode: ImportMode::Full,
        volume_size_gib,
        blocks_written,
        blocks_skipped: volume_blocks.saturating_sub(blocks_written),
        bytes_read: bytes_read.load(Ordering::Relaxed),
        encrypted,
        virtual_size_bytes: virtual_size,
        linear_checksum: linear.finish(),
    })
}

/// StartSnapshot takes only a key ARN: an id or alias must be resolved first (with
/// [`crate::kms::KeyResolver`], which also checks the key is enabled), else EBS would refuse
/// it, or worse, a lax endpoint would accept a name that later means another key.
fn check_kms_key_arn(encryption: &Encryption) -> Result<()> {
    match encryption {
        Encryption::Encrypted {
            kms_key_arn: Some(key),
        } if !crate::kms::is_key_arn(key) => Err(Error::InvalidInput(format!(
            "KMS key {key:?} is not a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID): resolve ids and aliases with kms::KeyResolver first"
        ))),
        _ => Ok(()),
    }
}

/// The pending journal to resume, checked against the source.
fn resume_state(options: &ImportOptions) -> Result<Option<(std::path::PathBuf, JournalState)>> {
    let Some(path) = options.journal.find_pending(&options.source)? else {
        tracing::warn!(
            source = options.source.location,
            "no interrupted import to resume: starting a new one"
        );
        return Ok(None);
    };
    let state = JournalState::read(&path)?;
    if state.completed.is_some() {
        return Ok(None);
    }
    match &state.start {
        Some(start) if start.source == options.source => Ok(Some((path, state))),
        Some(start) => Err(Error::InvalidInput(format!(
            "{} changed since the interrupted import (journal {}: size {} fingerprint {}, now size {} fingerprint {}): run without --resume",
            options.source.location,
            path.display(),
            start.source.size_bytes,
            start.source.fingerprint,
            options.source.size_bytes,
            options.source.fingerprint
        ))),
        None => Ok(None),
    }
}

/// A new ClientToken: random per run (so two runs never share one), derived with the source
/// fingerprint, and kept in the journal so the StartSnapshot of a resumed run is idempotent.
fn client_token(source: &SourceIdentity) -> String {
    let mut h = Sha256::new();
    h.update(source.location.as_bytes());
    h.update(source.fingerprint.as_bytes());
    for salt in 0u8..2 {
        h.update(
            std::collections::hash_map::RandomState::new()
                .hash_one(salt)
                .to_le_bytes(),
        );
    }
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    let d = h.finalize();
    let x: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// The parent snapshot's block digests (index → base64 SHA-256), for a full image onto a
/// parent. Cheap when this machine imported the parent: its completed journal lists them.
/// Otherwise costly: every block of the parent is listed (ListSnapshotBlocks, one call per
/// 10,000 blocks) and read (GetSnapshotBlock, 512 KiB each, the whole parent downloaded once,
/// within EBS's 1,000 GetSnapshotBlock/s), which is still cheaper than re-sending a volume.
pub async fn parent_digests(
    ebs: &aws_sdk_ebs::Client,
    options: &ImportOptions,
    parent_id: &str,
) -> Result<(BTreeMap<u64, String>, &'static str)> {
    if let Some(path) = options.journal.completed(parent_id) {
        if let Some(digests) = JournalState::read(&path)?.snapshot_digests() {
            tracing::info!(parent_id, journal = %path.display(), "parent digests from the local journal");
            return Ok((digests, "journal"));
        }
    }
    tracing::info!(
        parent_id,
        "no complete local journal of the parent: reading its blocks (costly)"
    );
    let retry = &options.retry;
    let tokens = read::list_blocks(ebs, retry, parent_id).await?;
    let digests = futures::stream::iter(tokens)
        .map(|(index, token)| async move {
            let data = read::get_block(ebs, retry, parent_id, index, &token).await?;
            Ok::<_, Error>((index, base64(&block_sha256(&data))))
        })
        .buffer_unordered(options.concurrency.max(1))
        .try_collect::<BTreeMap<_, _>>()
        .await?;
    Ok((digests, "snapshot"))
}

/// What the upload loop did.
#[derive(Debug)]
struct Outcome {
    blocks_written: u64,
    blocks_resumed: u64,
    bytes_read: u64,
    linear_checksum: String,
    interrupted: bool,
}

async fn upload(
    disk: &Disk,
    plan: &Plan,
    up: &Uploader,
    options: &ImportOptions,
    acknowledged: &BTreeMap<u64, String>,
    journal: &mut JournalWriter,
) -> Result<Outcome> {
    let (tx, rx) = mpsc::channel::<Result<Step>>(CHANNEL_BLOCKS);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let position = Arc::new(AtomicU64::new(0));
    {
        let (disk, plan, bytes_read, position, threads) = (
            disk.clone(),
            plan.clone(),
            bytes_read.clone(),
            position.clone(),
            options.reader_threads,
        );
        tokio::task::spawn_blocking(move || {
            let result = plan_blocks(&disk, &plan, threads, &bytes_read, &position, &tx);
            if let Err(e) = result {
                // The receiver may be gone (the upload failed first): nothing more to tell.
                let _ = tx.blocking_send(Err(e));
            }
        });
    }
    let steps = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|step| (step, rx))
    })
    .map(|step: Result<Step>| async move {
        let step: Result<Step> = match step? {
            Step::Partial {
                index,
                data,
                present,
            } => Ok(Step::Send(up.merge_partial(index, data, present).await?)),
            other => Ok(other),
        };
        step
    })
    .buffered(PARTIAL_FETCHES);
    let mut steps = std::pin::pin!(steps);

    let mut linear = LinearChecksum::default();
    let mut tasks: JoinSet<Result<(u64, [u8; 32])>> = JoinSet::new();
    let mut written = acknowledged.len() as u64;
    let mut resumed = 0u64;
    let mut input_done = false;
    let mut interrupted = false;
    let concurrency = options.concurrency.max(1);
    let report = |written| {
        if let Some(progress) = &options.progress {
            (progress.0)(&Progress {
                blocks_written: written,
                position_bytes: position.load(Ordering::Relaxed),
                virtual_size_bytes: disk.virtual_size(),
            });
        }
    };
    loop {
        if !input_done
            && options
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            input_done = true;
            interrupted = true;
        }
        if input_done && tasks.is_empty() {
            break;
        }
        tokio::select! {
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let (index, sha256) = joined.map_err(|e| Error::InvalidInput(format!("upload task failed: {e}")))??;
                journal.append(&Record::Block { index, sha256: base64(&sha256) }, false)?;
                written += 1;
                report(written);
            }
            step = steps.next(), if !input_done && tasks.len() < concurrency => match step {
                None => input_done = true,
                Some(step) => match step? {
                    Step::Same { index, sha256 } => journal.append(&Record::Same { index, sha256 }, false)?,
                    Step::Send(block) => {
                        linear.add(block.index, &block.sha256)?;
                        match acknowledged.get(&block.index) {
                            Some(done) if *done == base64(&block.sha256) => resumed += 1,
                            Some(_) => return Err(Error::InvalidInput(format!(
                                "block {} of {} differs from the one the interrupted import sent: the source changed; run without --resume",
                                block.index, options.source.location
                            ))),
                            None => up.spawn_put(&mut tasks, block),
                        }
                    }
                    Step::Partial { index, .. } => return Err(Error::InvalidInput(format!("block {index} was not merged"))),
                },
            },
            else => break,
        }
    }
    journal.flush()?;
    Ok(Outcome {
        blocks_written: written,
        blocks_resumed: resumed,
        bytes_read: bytes_read.load(Ordering::Relaxed),
        linear_checksum: linear.finish(),
        interrupted,
    })
}
