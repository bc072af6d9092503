//! Reading a snapshot back through the EBS direct APIs: [`verify`] compares it block by
//! block with an image's virtual contents, [`download`] writes it out as a raw file.
//!
//! Both walk ListSnapshotBlocks page by page (block tokens expire, and a large volume's
//! list does not belong in memory) and fetch blocks with GetSnapshotBlock concurrently,
//! under EBS's rate limit, checking each block's SHA-256 against the checksum EBS sends.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures::{TryStreamExt, stream};
use rehost_core::EBS_BLOCK_SIZE;
use rehost_diskimage::Disk;
use rehost_diskimage::sink::is_zero;
use rehost_diskimage::stream::{StreamOptions, for_each_extent};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::aws::Clients;
use crate::blocks::{BlockContent, BlockPlanner, Policy, block_sha256};
use crate::error::{Error, Result};

mod snapshot_read;

use snapshot_read::{BlockLister, BlockReader};

/// Blocks fetched at once by default: at ~50 ms per GetSnapshotBlock, 64 in flight reach
/// the 1,000/s limit, and hold 32 MiB.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// ListSnapshotBlocks' largest page (the API takes 100 to 10,000): fewer round trips.
pub const DEFAULT_LIST_PAGE: i32 = 10_000;
/// Differences listed in a report; the rest are only counted.
const MAX_LISTED_DIFFERENCES: usize = 10;

/// How to read a snapshot back.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// GetSnapshotBlock calls in flight.
    pub concurrency: usize,
    /// Threads reading and decoding the image (verify).
    pub image_threads: usize,
    /// Blocks per ListSnapshotBlocks page (tests make it small to cover pagination).
    pub list_page_size: i32,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            image_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            list_page_size: DEFAULT_LIST_PAGE,
        }
    }
}

/// How a block differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// The image has data there; the snapshot has no block (reads as zero).
    MissingFromSnapshot,
    /// The snapshot holds non-zero bytes where the image is zero.
    ExtraInSnapshot,
    /// Both have the block, with different bytes.
    ContentDiffers,
}

/// One differing block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct BlockDifference {
    /// The block's index (offset / 512 KiB).
    pub block_index: u64,
    /// How it differs.
    pub kind: DifferenceKind,
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The snapshot read.
    pub snapshot_id: String,
    /// True when every block of the volume equals the image (zero past the image's end).
    pub identical: bool,
    /// The snapshot's volume size.
    pub volume_size_bytes: u64,
    /// The image's virtual size.
    pub image_size_bytes: u64,
    /// Blocks the snapshot lists (all read back).
    pub snapshot_blocks: u64,
    /// Blocks of the image that are not all zero.
    pub image_data_blocks: u64,
    /// How many blocks differ.
    pub differing_blocks: u64,
    /// The first differing blocks, by index (at most 10).
    pub first_differences: Vec<BlockDifference>,
}

/// The result of [`download`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownloadReport {
    /// The snapshot read.
    pub snapshot_id: String,
    /// The raw file written.
    pub path: PathBuf,
    /// Its length: the volume size.
    pub volume_size_bytes: u64,
    /// Blocks the snapshot lists.
    pub snapshot_blocks: u64,
    /// Blocks written (the others were all zero and left as holes).
    pub blocks_written: u64,
}

/// Compares snapshot `snapshot_id` with `disk`; `progress` gets the image bytes compared.
pub async fn verify(
    clients: &Clients,
    snapshot_id: &str,
    disk: &Disk,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<VerifyReport> {
    verify_with(
        clients,
        snapshot_id,
        disk,
        &ReadOptions::default(),
        progress,
    )
    .await
}

/// [`verify`] with options.
pub async fn verify_with(
    clients: &Clients,
    snapshot_id: &str,
    disk: &Disk,
    options: &ReadOptions,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> Result<VerifyReport> {
    let reader = BlockReader::new(clients, snapshot_id);
    let lister = BlockLister::start(&clients.ebs, snapshot_id, options.list_page_size).await?;
    let volume_size_bytes = lister.volume_size_bytes;
    let (image_rx, image_task) = image_blocks(disk.clone(), options.image_threads, progress);
    let mut merge = Merge {
        lister,
        image: image_rx,
        snapshot_head: None,
        image_head: None,
        snapshot_done: false,
        image_done: false,
    };
    let counts = Counts::default();
    let first = Mutex::new(BTreeSet::new());
    let compared = stream::try_unfold(&mut merge, |merge| async move {
        Ok(merge.next().await?.map(|check| (check, merge)))
    })
    .map_ok(|check| async {
        let block_index = check_index(&check);
        let difference = match check {
            Check::ImageOnly { .. } => Some(DifferenceKind::MissingFromSnapshot),
            Check::SnapshotOnly { token, .. } => {
                let (data, _) = reader.get(block_index, &token).await?;
                (!is_zero(&data)).then_some(DifferenceKind::ExtraInSnapshot)
            }
            Check::Both {
                token,
                image_digest,
                ..
            } => {
                let (_, digest) = reader.get(block_index, &token).await?;
                (digest != image_digest).then_some(DifferenceKind::ContentDiffers)
            }
        };
        Ok::<_, Error>((block_index, difference))
    })
    .try_buffer_unordered(options.concurrency.max(1))
    .try_for_each(|(block_index, difference)| {
        if let Some(kind) = difference {
            counts.differing.fetch_add(1, Ordering::Relaxed);
            let mut first = first.lock().unwrap_or_else(PoisonError::into_inner);
            first.insert(BlockDifference { block_index, kind });
            if first.len() > MAX_LISTED_DIFFERENCES {
                first.pop_last();
            }
        }
        futures::future::ready(Ok(()))
    })
    .await;
    // On an early error the merge (and the image receiver) are dropped here, which stops
    // the image reader at its next block.
    let snapshot_blocks = merge.lister.listed;
    drop(merge);
    let image_data_blocks = join_image(image_task).await;
    compared?;
    let image_data_blocks = image_data_blocks?;
    let differing_blocks = counts.differing.load(Ordering::Relaxed);
    let image_size_bytes = disk.virtual_size();
    Ok(VerifyReport {
        snapshot_id: snapshot_id.to_owned(),
        identical: differing_blocks == 0 && image_size_bytes <= volume_size_bytes,
        volume_size_bytes,
        image_size_bytes,
        snapshot_blocks,
        image_data_blocks,
        differing_blocks,
        first_differences: first
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .into_iter()
            .collect(),
    })
}

#[derive(Debug, Default)]
struct Counts {
    differing: AtomicU64,
}

fn check_index(check: &Check) -> u64 {
    match check {
        Check::ImageOnly { block_index }
        | Check::SnapshotOnly { block_index, .. }
        | Check::Both { block_index, .. } => *block_index,
    }
}

/// Writes snapshot `snapshot_id` to `out` as a raw file of the volume's size, leaving
/// holes where the snapshot has no block or an all-zero one. Written to `OUT.part` and
/// renamed at the end, so `out` is never a partial download. `progress` gets the volume
/// bytes covered so far and the volume size.
pub async fn download(
    clients: &Clients,
    snapshot_id: &str,
    out: &Path,
    options: &ReadOptions,
    progress: impl Fn(u64, u64) + Send + Sync,
) -> Result<DownloadReport> {
    let reader = BlockReader::new(clients, snapshot_id);
    let mut lister = BlockLister::start(&clients.ebs, snapshot_id, options.list_page_size).await?;
    let volume_size_bytes = lister.volume_size_bytes;
    let partial = PathBuf::from(format!("{}.part", out.display()));
    let io_error = |path: &Path, op: &'static str| {
        let path = path.display().to_string();
        move |source| Error::Io { path, op, source }
    };
    let file = std::fs::File::create(&partial).map_err(io_error(&partial, "create"))?;
    file.set_len(volume_size_bytes)
        .map_err(io_error(&partial, "size"))?;
    let file = Arc::new(file);
    let covered = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let result = stream::try_unfold(&mut lister, |lister| async move { Ok(lister.next().await?.map(|block| (block, lister))) })
        .map_ok(|(block_index, token)| {
            let (reader, file, partial) = (&reader, file.clone(), partial.clone());
            let (covered, written, progress) = (&covered, &written, &progress);
            async move {
                let offset = block_index * EBS_BLOCK_SIZE;
                if offset >= volume_size_bytes {
                    return Err(Error::InvalidInput(format!(
                        "snapshot {snapshot_id} lists block {block_index}, past its {volume_size_bytes}-byte volume"
                    )));
                }
                let (data, _) = reader.get(block_index, &token).await?;
                if !is_zero(&data) {
                    let path = partial.display().to_string();
                    tokio::task::spawn_blocking(move || std::os::unix::fs::FileExt::write_all_at(&*file, &data, offset))
                        .await
                        .map_err(|e| Error::InvalidInput(format!("writing block {block_index}: {e}")))?
                        .map_err(|source| Error::Io { path, op: "write", source })?;
                    written.fetch_add(1, Ordering::Relaxed);
                }
                let done = covered.fetch_max(offset + EBS_BLOCK_SIZE, Ordering::Relaxed).max(offset + EBS_BLOCK_SIZE);
                progress(done, volume_size_bytes);
                Ok(())
            }
        })
        .try_buffer_unordered(options.concurrency.max(1))
        .try_collect::<()>()
        .await;
    if let Err(err) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(err);
    }
    file.sync_all().map_err(io_error(&partial, "sync"))?;
    std::fs::rename(&partial, out).map_err(io_error(out, "rename into place"))?;
    progress(volume_size_bytes, volume_size_bytes);
    Ok(DownloadReport {
        snapshot_id: snapshot_id.to_owned(),
        path: out.to_owned(),
        volume_size_bytes,
        snapshot_blocks: lister.listed,
        blocks_written: written.load(Ordering::Relaxed),
    })
}

/// One comparison to make.
enum Check {
    /// The image has a non-zero block the snapshot does not list.
    ImageOnly { block_index: u64 },
    /// The snapshot lists a block where the image is zero.
    SnapshotOnly { block_index: u64, token: String },
    /// Both have the block.
    Both {
        block_index: u64,
        token: String,
        image_digest: [u8; 32],
    },
}

/// Walks the snapshot's block list and the image's non-zero blocks together, both in
/// index order, pairing equal indexes.
struct Merge<'a> {
    lister: BlockLister<'a>,
    image: ImageDigests,
    snapshot_head: Option<(u64, String)>,
    image_head: Option<(u64, [u8; 32])>,
    snapshot_done: bool,
    image_done: bool,
}

impl Merge<'_> {
    async fn next(&mut self) -> Result<Option<Check>> {
        if self.snapshot_head.is_none() && !self.snapshot_done {
            self.snapshot_head = self.lister.next().await?;
            self.snapshot_done = self.snapshot_head.is_none();
        }
        if self.image_head.is_none() && !self.image_done {
            self.image_head = self.image.recv().await.transpose()?;
            self.image_done = self.image_head.is_none();
        }
        Ok(match (self.snapshot_head.take(), self.image_head.take()) {
            (None, None) => None,
            (Some((block_index, token)), Some((image_index, image_digest)))
                if block_index == image_index =>
            {
                Some(Check::Both {
                    block_index,
                    token,
                    image_digest,
                })
            }
            (Some((block_index, token)), Some(image)) if block_index < image.0 => {
                self.image_head = Some(image);
                Some(Check::SnapshotOnly { block_index, token })
            }
            (Some((block_index, token)), None) => Some(Check::SnapshotOnly { block_index, token }),
            // The snapshot's next block, if any, comes after the image's.
            (snapshot, Some((block_index, _))) => {
                self.snapshot_head = snapshot;
                Some(Check::ImageOnly { block_index })
            }
        })
    }
}

/// The image's non-zero blocks: index and SHA-256, in index order; a failure to read the
/// image comes through it too, so that the comparison stops at once.
type ImageDigests = mpsc::Receiver<Result<(u64, [u8; 32])>>;

/// Streams `disk` on a blocking thread and sends the index and SHA-256 of every block
/// that is not all zero, in order. The task returns how many it sent.
fn image_blocks(
    disk: Disk,
    threads: usize,
    progress: impl Fn(u64) + Send + Sync + 'static,
) -> (ImageDigests, tokio::task::JoinHandle<Result<u64>>) {
    // A few hundred digests in the channel keep the reader ahead of the fetchers.
    let (tx, rx) = mpsc::channel(1024);
    let task =
        tokio::task::spawn_blocking(
            move || match stream_digests(&disk, threads, &progress, &tx) {
                Ok(sent) => Ok(sent),
                Err(err) => {
                    let message = err.to_string();
                    let _ = tx.blocking_send(Err(err));
                    Err(Error::InvalidInput(format!("reading the image: {message}")))
                }
            },
        );
    (rx, task)
}

/// The body of [`image_blocks`]' task.
fn stream_digests(
    disk: &Disk,
    threads: usize,
    progress: &dyn Fn(u64),
    tx: &mpsc::Sender<Result<(u64, [u8; 32])>>,
) -> Result<u64> {
    let mut planner = BlockPlanner::new(Policy {
        write_zeros: false,
        has_parent: false,
    });
    let mut sent = 0u64;
    let mut send = |block: crate::blocks::PlannedBlock| -> Result<()> {
        let BlockContent::Whole(data) = block.content else {
            return Err(Error::InvalidInput(format!(
                "block {} planned as partial in a full read",
                block.index
            )));
        };
        tx.blocking_send(Ok((block.index, block_sha256(&data))))
            .map_err(|_| Error::InvalidInput("verification stopped".into()))?;
        sent += 1;
        Ok(())
    };
    let options = StreamOptions {
        threads: threads.max(1),
        ..StreamOptions::default()
    };
    let mut failure = None;
    let streamed = for_each_extent(disk, &options, |extent| {
        let end = extent.end();
        let planned = planner
            .push(extent)
            .and_then(|blocks| blocks.into_iter().try_for_each(&mut send));
        progress(end);
        planned.map_err(|e| {
            failure = Some(e);
            rehost_diskimage::Error::InvalidInput("stopped".into())
        })
    });
    if let Some(err) = failure {
        return Err(err);
    }
    streamed?;
    if let (Some(last), _) = planner.finish() {
        send(last)?;
    }
    Ok(sent)
}

async fn join_image(task: tokio::task::JoinHandle<Result<u64>>) -> Result<u64> {
    task.await
        .map_err(|e| Error::InvalidInput(format!("image reader: {e}")))?
}
