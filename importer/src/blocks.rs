//! Which EBS blocks to send, and their checksums: pure code over the ordered extent
//! stream the disk-image library produces, so every rule is unit-tested without AWS.
//!
//! EBS direct APIs take whole 512 KiB blocks. Extents are re-cut at block boundaries;
//! what a block becomes depends on the import:
//! - full import: data is sent; zero and unallocated areas are skipped, since an unwritten
//!   block of a new unencrypted snapshot reads as zero. An encrypted snapshot's unwritten
//!   blocks read as garbage, so there zeros are written too ([`Policy::write_zeros`]);
//! - incremental import of a delta image: `Unchanged` is skipped (the child snapshot
//!   inherits the parent's block), `Zero` is written as zeros, data is sent. A block that is
//!   only partly unchanged must be merged with the parent's block before it is sent.

use base64::Engine;
use bytes::{Bytes, BytesMut};
use rehost_core::{EBS_BLOCK_SIZE, Extent};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// [`EBS_BLOCK_SIZE`] as a buffer length.
pub const BLOCK_LEN: usize = 512 * 1024;
const _: () = assert!(BLOCK_LEN as u64 == EBS_BLOCK_SIZE);

/// How zero and unchanged areas are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Write all-zero blocks instead of skipping them (encrypted snapshots).
    pub write_zeros: bool,
    /// The snapshot has a parent: `Unchanged` means "keep the parent's bytes" and `Zero`
    /// must be written.
    pub has_parent: bool,
}

/// What to do with one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockContent {
    /// Send these 512 KiB.
    Whole(Bytes),
    /// Send these 512 KiB after replacing the byte ranges *not* listed in `present` with the
    /// parent snapshot's bytes (the block is partly unchanged).
    Partial {
        /// The block, with zeros where the parent's bytes go.
        data: Bytes,
        /// Byte ranges `[start, end)` within the block that come from the image.
        present: Vec<(usize, usize)>,
    },
}

/// A block to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedBlock {
    /// Index of the block in the volume.
    pub index: u64,
    /// Its content.
    pub content: BlockContent,
}

/// Re-cuts an ordered extent stream into the EBS blocks to send. Feed it every extent
/// with [`BlockPlanner::push`], then call [`BlockPlanner::finish`]; blocks come out in
/// index order, which is what the linear aggregated checksum needs.
#[derive(Debug)]
pub struct BlockPlanner {
    policy: Policy,
    position: u64,
    current: Option<Assembly>,
    skipped: u64,
}

/// The block being assembled.
#[derive(Debug)]
struct Assembly {
    index: u64,
    data: BytesMut,
    /// Ranges from the image (data or zero); the rest is unchanged.
    present: Vec<(usize, usize)>,
    any_data: bool,
}

impl BlockPlanner {
    /// A planner at offset 0.
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            position: 0,
            current: None,
            skipped: 0,
        }
    }

    /// Blocks decided not to be sent so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Takes the next extent; returns the blocks it completed.
    pub fn push(&mut self, extent: Extent) -> Result<Vec<PlannedBlock>> {
        if extent.offset() != self.position {
            return Err(Error::InvalidInput(format!(
                "extent at {} does not continue the stream at {}",
                extent.offset(),
                self.position
            )));
        }
        let mut out = Vec::new();
        let end = extent.end();
        while self.position < end {
            let index = self.position / EBS_BLOCK_SIZE;
            let block_start = index * EBS_BLOCK_SIZE;
            let piece_end = end.min(block_start + EBS_BLOCK_SIZE);
            let (from, to) = (
                offset_in_block(self.position),
                offset_in_block_end(piece_end, block_start),
            );
            let skip_whole = matches!(&extent, Extent::Unchanged { .. } | Extent::Zero { .. })
                && from == 0
                && to == BLOCK_LEN
                && self.current.is_none()
                && !self.must_write(&extent);
            if skip_whole {
                self.skipped += 1;
            } else {
                let block = self.current.get_or_insert_with(|| Assembly::new(index));
                match &extent {
                    Extent::Data { offset, data } => {
                        let at = usize::try_from(self.position - offset).map_err(|_| too_big())?;
                        block.data[from..to].copy_from_slice(&data[at..at + (to - from)]);
                        block.present.push((from, to));
                        block.any_data = true;
                    }
                    Extent::Zero { .. } => block.present.push((from, to)),
                    Extent::Unchanged { .. } if !self.policy.has_parent => {
                        block.present.push((from, to))
                    }
                    Extent::Unchanged { .. } => {}
                }
                if to == BLOCK_LEN {
                    if let Some(done) = self.close_current() {
                        out.push(done);
                    }
                }
            }
            self.position = piece_end;
        }
        Ok(out)
    }

    /// Ends the stream at `virtual_size` (the last block is padded with zeros).
    pub fn finish(mut self) -> (Option<PlannedBlock>, u64) {
        let last = self.current.take().and_then(|mut a| {
            // Past the end of the disk the volume reads as zero: that is part of the image.
            let end = offset_in_block_end(self.position, a.index * EBS_BLOCK_SIZE);
            if end < BLOCK_LEN {
                a.present.push((end, BLOCK_LEN));
            }
            self.current = Some(a);
            self.close_current()
        });
        (last, self.skipped)
    }

    fn must_write(&self, extent: &Extent) -> bool {
        match extent {
            Extent::Data { .. } => true,
            Extent::Zero { .. } => self.policy.has_parent || self.policy.write_zeros,
            Extent::Unchanged { .. } => !self.policy.has_parent && self.policy.write_zeros,
        }
    }

    fn close_current(&mut self) -> Option<PlannedBlock> {
        let a = self.current.take()?;
        let present = merge_ranges(a.present);
        let whole = present == [(0, BLOCK_LEN)];
        let all_zero = !a.any_data || rehost_diskimage::sink::is_zero(&a.data);
        // A full import skips a block that ends up all zero (unless zeros must be written).
        if !self.policy.has_parent && all_zero && !self.policy.write_zeros {
            self.skipped += 1;
            return None;
        }
        if present.is_empty() {
            self.skipped += 1;
            return None;
        }
        let content = if whole || !self.policy.has_parent {
            BlockContent::Whole(a.data.freeze())
        } else {
            BlockContent::Partial {
                data: a.data.freeze(),
                present,
            }
        };
        Some(PlannedBlock {
            index: a.index,
            content,
        })
    }
}

impl Assembly {
    fn new(index: u64) -> Self {
        Self {
            index,
            data: BytesMut::zeroed(BLOCK_LEN),
            present: Vec::new(),
            any_data: false,
        }
    }
}

fn offset_in_block(position: u64) -> usize {
    // Always < BLOCK_LEN, so the conversion cannot fail.
    usize::try_from(position % EBS_BLOCK_SIZE).unwrap_or(0)
}

fn offset_in_block_end(end: u64, block_start: u64) -> usize {
    usize::try_from(end - block_start)
        .unwrap_or(BLOCK_LEN)
        .min(BLOCK_LEN)
}

fn too_big() -> Error {
    Error::InvalidInput("extent offset does not fit in memory".into())
}

/// Sorts and merges touching ranges.
fn merge_ranges(mut ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Fills the parts of a partial block that are not `present` from the parent's block.
pub fn merge_with_parent(data: &Bytes, present: &[(usize, usize)], parent: &[u8]) -> Result<Bytes> {
    if parent.len() != BLOCK_LEN {
        return Err(Error::InvalidInput(format!(
            "parent block is {} bytes, not {BLOCK_LEN}",
            parent.len()
        )));
    }
    let mut merged = BytesMut::from(parent);
    for &(s, e) in present {
        merged[s..e].copy_from_slice(&data[s..e]);
    }
    Ok(merged.freeze())
}

/// SHA-256 of one block.
pub fn block_sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Base64 of a digest, as the EBS checksum headers carry it.
pub fn base64(digest: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// EBS's LINEAR aggregated checksum: the SHA-256 of the concatenated per-block SHA-256
/// digests, in block-index order. Fed in order as blocks are planned, so it needs no
/// memory per block.
#[derive(Debug, Clone, Default)]
pub struct LinearChecksum {
    hasher: Sha256,
    last_index: Option<u64>,
    blocks: u64,
}

impl LinearChecksum {
    /// Adds block `index`'s digest; indexes must increase.
    pub fn add(&mut self, index: u64, digest: &[u8; 32]) -> Result<()> {
        if self.last_index.is_some_and(|last| index <= last) {
            return Err(Error::InvalidInput(format!(
                "block {index} added out of order"
            )));
        }
        self.last_index = Some(index);
        self.blocks += 1;
        self.hasher.update(digest);
        Ok(())
    }

    /// Blocks added.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The aggregate, base64.
    pub fn finish(self) -> String {
        base64(&self.hasher.finalize())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: u64 = EBS_BLOCK_SIZE;

    fn data(offset: u64, len: usize, byte: u8) -> Extent {
        Extent::Data {
            offset,
            data: Bytes::from(vec![byte; len]),
        }
    }

    fn plan(policy: Policy, extents: Vec<Extent>) -> (Vec<PlannedBlock>, u64) {
        let mut p = BlockPlanner::new(policy);
        let mut out = Vec::new();
        for e in extents {
            out.extend(p.push(e).unwrap());
        }
        let (last, skipped) = p.finish();
        out.extend(last);
        (out, skipped)
    }

    const FULL: Policy = Policy {
        write_zeros: false,
        has_parent: false,
    };
    const ENCRYPTED: Policy = Policy {
        write_zeros: true,
        has_parent: false,
    };
    const DELTA: Policy = Policy {
        write_zeros: false,
        has_parent: true,
    };

    #[test]
    fn full_import_skips_holes_and_zero_data() {
        let (blocks, skipped) = plan(
            FULL,
            vec![
                data(0, BLOCK_LEN, 1),
                Extent::Unchanged {
                    offset: B,
                    len: 2 * B,
                },
                data(3 * B, BLOCK_LEN, 0),
            ],
        );
        assert_eq!(blocks.iter().map(|b| b.index).collect::<Vec<_>>(), vec![0]);
        assert_eq!(skipped, 3);
    }

    #[test]
    fn encrypted_import_writes_every_block() {
        let (blocks, skipped) = plan(
            ENCRYPTED,
            vec![
                Extent::Zero { offset: 0, len: B },
                Extent::Unchanged {
                    offset: B,
                    len: B + 512,
                },
            ],
        );
        assert_eq!(blocks.len(), 3);
        assert_eq!(skipped, 0);
        assert!(
            blocks
                .iter()
                .all(|b| matches!(&b.content, BlockContent::Whole(d) if d.iter().all(|&x| x == 0)))
        );
    }

    #[test]
    fn delta_writes_zeros_skips_unchanged_and_merges_partial_blocks() {
        let (blocks, skipped) = plan(
            DELTA,
            vec![
                Extent::Unchanged { offset: 0, len: B },
                Extent::Zero { offset: B, len: B },
                data(2 * B, 65536, 7),
                Extent::Unchanged {
                    offset: 2 * B + 65536,
                    len: B - 65536,
                },
            ],
        );
        assert_eq!(skipped, 1);
        assert_eq!(
            blocks[0],
            PlannedBlock {
                index: 1,
                content: BlockContent::Whole(Bytes::from(vec![0; BLOCK_LEN]))
            }
        );
        let BlockContent::Partial { data, present } = &blocks[1].content else {
            panic!("{:?}", blocks[1])
        };
        assert_eq!(present, &vec![(0, 65536)]);
        let merged = merge_with_parent(data, present, &vec![9u8; BLOCK_LEN]).unwrap();
        assert_eq!(merged[65535], 7);
        assert_eq!(merged[65536], 9);
    }

    #[test]
    fn the_last_partial_block_is_padded_with_zeros() {
        let (blocks, _) = plan(DELTA, vec![data(0, 1000, 3)]);
        let BlockContent::Whole(d) = &blocks[0].content else {
            panic!()
        };
        assert_eq!((d[999], d[1000], d.len()), (3, 0, BLOCK_LEN));
    }

    #[test]
    fn gaps_are_rejected() {
        let mut p = BlockPlanner::new(FULL);
        assert!(p.push(data(512, 512, 1)).is_err());
    }

    #[test]
    fn linear_checksum_is_sha256_of_concatenated_digests_in_order() {
        let (a, b) = (block_sha256(b"a"), block_sha256(b"b"));
        let mut l = LinearChecksum::default();
        l.add(3, &a).unwrap();
        l.add(9, &b).unwrap();
        assert!(l.clone().add(9, &b).is_err());
        let expected = base64(&Sha256::digest([a, b].concat()));
        assert_eq!(l.finish(), expected);
    }

    proptest! {
        /// Whatever the extents, a full import's blocks, laid over zeros, give the image.
        #[test]
        fn full_import_blocks_rebuild_the_image(cuts in proptest::collection::vec((1u64..200_000, 0u8..4), 1..40)) {
            let mut extents = Vec::new();
            let mut image = Vec::new();
            let mut pos = 0u64;
            for (len, kind) in cuts {
                let e = match kind {
                    0 => Extent::Unchanged { offset: pos, len },
                    1 => Extent::Zero { offset: pos, len },
                    2 => data(pos, len as usize, 0),
                    _ => data(pos, len as usize, (pos % 251) as u8 + 1),
                };
                if let Extent::Data { data, .. } = &e { image.extend_from_slice(data) } else { image.resize(image.len() + len as usize, 0) }
                extents.push(e);
                pos += len;
            }
            let (blocks, skipped) = plan(FULL, extents);
            let mut rebuilt = vec![0u8; (pos.div_ceil(B) * B) as usize];
            for b in &blocks {
                let BlockContent::Whole(d) = &b.content else { panic!("partial in a full import") };
                prop_assert!(d.iter().any(|&x| x != 0));
                rebuilt[(b.index * B) as usize..][..BLOCK_LEN].copy_from_slice(d);
            }
            rebuilt.truncate(image.len());
            prop_assert_eq!(rebuilt, image);
            prop_assert_eq!(blocks.len() as u64 + skipped, pos.div_ceil(B));
        }
    }
}
