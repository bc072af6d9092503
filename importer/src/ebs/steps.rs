//! The reading side of an import: the disk streamed on a blocking thread (several reader
//! threads for a full image, the top layer only for a delta), re-cut into 512 KiB blocks by
//! [`BlockPlanner`], hashed, compared with the parent's digests, and handed to the uploader
//! in block-index order as [`Step`]s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use rehost_core::{Extent, ExtentKind};
use rehost_diskimage::stream::{StreamOptions, for_each_extent};
use rehost_diskimage::{Disk, Layer, map::MapWalker};
use tokio::sync::mpsc;

use super::uploader::HashedBlock;
use crate::blocks::{BLOCK_LEN, BlockContent, BlockPlanner, Policy, base64, block_sha256};
use crate::error::{Error, Result};
use crate::import::ImportMode;

/// Largest data chunk read from a delta's top layer at once.
const DELTA_CHUNK_BYTES: u64 = 1 << 20;

static ZERO_BLOCK: [u8; BLOCK_LEN] = [0; BLOCK_LEN];

/// One step from the reading thread to the uploader, in block order.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send this block (unless already acknowledged).
    Send(HashedBlock),
    /// Merge with the parent's block, then send.
    Partial {
        index: u64,
        data: Bytes,
        present: Vec<(usize, usize)>,
    },
    /// Not sent: the parent holds the same bytes (journaled for the next incremental import).
    Same { index: u64, sha256: String },
}

/// The import's plan, decided before any block is read.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) mode: ImportMode,
    pub(crate) policy: Policy,
    pub(crate) volume_blocks: u64,
    /// Full image onto a parent: the parent's digests (index → base64 SHA-256).
    pub(crate) parent_digests: Option<Arc<BTreeMap<u64, String>>>,
    /// Blocks the snapshot would hold unwritten read as garbage (encrypted).
    pub(crate) encrypted: bool,
}

/// The reading thread: extents → blocks → steps, in index order.
pub(crate) fn plan_blocks(
    disk: &Disk,
    plan: &Plan,
    threads: usize,
    bytes_read: &AtomicU64,
    position: &AtomicU64,
    tx: &mpsc::Sender<Result<Step>>,
) -> Result<()> {
    let mut planner = BlockPlanner::new(plan.policy);
    let mut next_index = 0u64;
    let send = |step: Step| {
        tx.blocking_send(Ok(step))
            .map_err(|_| Error::InvalidInput("upload stopped".into()))
    };
    let emit = |planned: crate::blocks::PlannedBlock, next_index: &mut u64| -> Result<()> {
        fill_gap(plan, *next_index, planned.index, &send)?;
        *next_index = planned.index + 1;
        match planned.content {
            BlockContent::Whole(data) => {
                let block = HashedBlock::new(planned.index, data);
                let sha256 = base64(&block.sha256);
                match &plan.parent_digests {
                    Some(parent) if parent.get(&block.index) == Some(&sha256) => send(Step::Same {
                        index: block.index,
                        sha256,
                    }),
                    _ => send(Step::Send(block)),
                }
            }
            BlockContent::Partial { data, present } => send(Step::Partial {
                index: planned.index,
                data,
                present,
            }),
        }
    };
    let mut on_extent = |extent: Extent| -> rehost_diskimage::Result<()> {
        if let Extent::Data { data, .. } = &extent {
            bytes_read.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        position.store(extent.end(), Ordering::Relaxed);
        let blocks = planner.push(extent).map_err(to_image_error)?;
        for planned in blocks {
            emit(planned, &mut next_index).map_err(to_image_error)?;
        }
        Ok(())
    };
    let streamed = if plan.mode == ImportMode::Delta {
        stream_top_layer(disk.layers()[0].as_ref(), &mut on_extent)
    } else {
        let options = StreamOptions {
            threads: threads.max(1),
            ..StreamOptions::default()
        };
        for_each_extent(disk, &options, &mut on_extent)
    };
    streamed.map_err(from_image_error)?;
    let (last, _) = planner.finish();
    if let Some(planned) = last {
        emit(planned, &mut next_index)?;
    }
    fill_gap(plan, next_index, plan.volume_blocks, &send)
}

/// Blocks `[from, to)` are zero in the image and were not planned: write zeros where the
/// snapshot would otherwise read something else (the parent's non-zero block, or an
/// encrypted snapshot's unwritten block, which reads as garbage).
fn fill_gap(plan: &Plan, from: u64, to: u64, send: &impl Fn(Step) -> Result<()>) -> Result<()> {
    if from >= to || plan.mode == ImportMode::Delta {
        return Ok(());
    }
    let zero = || HashedBlock {
        index: 0,
        data: Bytes::from_static(&ZERO_BLOCK),
        sha256: zero_digest(),
    };
    match &plan.parent_digests {
        // An encrypted parent holds every block it was imported with, but not past its end.
        Some(parent) if !plan.encrypted => {
            let zero_b64 = base64(&zero_digest());
            for (index, digest) in parent.range(from..to) {
                if *digest != zero_b64 {
                    send(Step::Send(HashedBlock {
                        index: *index,
                        ..zero()
                    }))?;
                }
            }
        }
        Some(parent) => {
            let zero_b64 = base64(&zero_digest());
            for index in from..to {
                if parent.get(&index) != Some(&zero_b64) {
                    send(Step::Send(HashedBlock { index, ..zero() }))?;
                }
            }
        }
        None if plan.encrypted => {
            for index in from..to {
                send(Step::Send(HashedBlock { index, ..zero() }))?;
            }
        }
        None => {}
    }
    Ok(())
}

fn zero_digest() -> [u8; 32] {
    static DIGEST: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    *DIGEST.get_or_init(|| block_sha256(&ZERO_BLOCK))
}

/// Streams only the top layer of a differencing disk: its unallocated areas are `Unchanged`
/// (the parent snapshot holds them), its zero areas `Zero`, its data read from it. Read on
/// one thread: a delta holds little data.
fn stream_top_layer(
    layer: &dyn Layer,
    sink: &mut impl FnMut(Extent) -> rehost_diskimage::Result<()>,
) -> rehost_diskimage::Result<()> {
    for (window, len) in MapWalker::new(layer.info().virtual_size_bytes) {
        for e in layer.map_range(window, len)? {
            match e.kind {
                ExtentKind::Data => {
                    let mut offset = e.offset;
                    while offset < e.end() {
                        let len = (e.end() - offset).min(DELTA_CHUNK_BYTES);
                        let mut buf = BytesMut::zeroed(usize::try_from(len).unwrap_or(0));
                        layer.read_at(&mut buf, offset)?;
                        sink(Extent::Data {
                            offset,
                            data: buf.freeze(),
                        })?;
                        offset += len;
                    }
                }
                ExtentKind::Zero => sink(Extent::Zero {
                    offset: e.offset,
                    len: e.len,
                })?,
                ExtentKind::Unallocated => sink(Extent::Unchanged {
                    offset: e.offset,
                    len: e.len,
                })?,
            }
        }
    }
    Ok(())
}

/// Errors from inside the disk-image library's callback travel as its error type.
fn to_image_error(e: Error) -> rehost_diskimage::Error {
    match e {
        Error::Image(inner) => inner,
        other => rehost_diskimage::Error::InvalidInput(other.to_string()),
    }
}

fn from_image_error(e: rehost_diskimage::Error) -> Error {
    Error::Image(e)
}
