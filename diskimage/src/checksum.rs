//! Checksums of a virtual disk's contents.
//!
//! - [`sha256`]: the SHA-256 of the whole disk, what `qemu-img convert -O raw` followed by
//!   `sha256sum` prints, computed without writing the raw file.
//! - [`BlockDigests`]: the SHA-256 of every 512 KiB block and the digest of that list
//!   (the "block-list SHA-256"). An incremental export reads only changed blocks, so it
//!   cannot hash the whole disk; it can update the previous export's block list and
//!   hash that. The same per-block digests are what EBS checks each block against.

use rehost_core::{EBS_BLOCK_SIZE, Extent};
use sha2::{Digest, Sha256};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::stream::{StreamOptions, for_each_extent};

/// Hashes `disk`, calling `progress` with the number of virtual bytes done so far.
pub fn sha256(disk: &Disk, threads: usize, progress: &mut dyn FnMut(u64)) -> Result<[u8; 32]> {
    let options = StreamOptions {
        threads,
        detect_zeros: false,
        unallocated_as_zero: true,
        ..StreamOptions::default()
    };
    let mut hasher = Sha256::new();
    for_each_extent(disk, &options, |extent| {
        match &extent {
            Extent::Data { data, .. } => hasher.update(data),
            Extent::Zero { len, .. } | Extent::Unchanged { len, .. } => {
                update_zeros(&mut hasher, *len)
            }
        }
        progress(extent.end());
        Ok(())
    })?;
    Ok(hasher.finalize().into())
}

/// Feeds `len` zero bytes to `hasher` without allocating them.
pub fn update_zeros(hasher: &mut Sha256, len: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left).map_or(ZEROS.len(), |l| l.min(ZEROS.len()));
        hasher.update(&ZEROS[..n]);
        left -= n as u64;
    }
}

/// The block size of [`BlockDigests`]: the EBS block.
pub const DIGEST_BLOCK_SIZE: u64 = EBS_BLOCK_SIZE;

/// Per-block SHA-256 digests of a disk, built from an ordered extent stream.
///
/// `Data` and `Zero` are hashed; `Unchanged` takes the parent's digest of that block
/// (with no parent, `Unchanged` means unallocated: zeros). A block only partly
/// `Unchanged` with a parent needs the parent's bytes: given a [`ParentBytes`] reader
/// ([`BlockDigests::with_parent_bytes`]), the parent's block is read, checked against the
/// parent's digest of it, and overlaid with the new parts; without one it is refused.
/// This lets a source read only what changed, at the image grain, rather than whole
/// 512 KiB blocks from the live hypervisor.
pub struct BlockDigests {
    capacity: u64,
    position: u64,
    parent: Option<Vec<[u8; 32]>>,
    digests: Vec<[u8; 32]>,
    /// The block being hashed, and whether any of it came from an `Unchanged` extent.
    current: Sha256,
    current_unchanged: bool,
    /// Reads the parent's bytes of a partly unchanged block.
    parent_bytes: Option<ParentBytes>,
    /// The new (`Data`, `Zero`) parts of the current block, kept (cheap `Bytes` clones)
    /// while a reader of the parent's bytes is set, to overlay a partly unchanged block.
    new_parts: Vec<Extent>,
    /// The parent's bytes of one block (allocated at the first partial block).
    scratch: Vec<u8>,
    parent_bytes_read: u64,
}

/// Reads `buf.len()` bytes of the parent disk at an offset: the previous state of a
/// block that is now only partly changed.
pub type ParentBytes = Box<dyn FnMut(u64, &mut [u8]) -> Result<()> + Send>;

impl std::fmt::Debug for BlockDigests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDigests")
            .field("capacity", &self.capacity)
            .field("position", &self.position)
            .field("blocks", &self.digests.len())
            .field("parent_bytes", &self.parent_bytes.is_some())
            .finish_non_exhaustive()
    }
}

impl BlockDigests {
    /// Digests of a disk of `capacity` bytes; `parent` is the previous state's list.
    pub fn new(capacity: u64, parent: Option<Vec<[u8; 32]>>) -> Result<Self> {
        if let Some(list) = &parent {
            let expected = capacity.div_ceil(DIGEST_BLOCK_SIZE);
            if list.len() as u64 != expected {
                return Err(Error::InvalidInput(format!(
                    "the parent's block list has {} digests; a {capacity}-byte disk has {expected} blocks",
                    list.len()
                )));
            }
        }
        Ok(Self {
            capacity,
            position: 0,
            parent,
            digests: Vec::new(),
            current: Sha256::new(),
            current_unchanged: false,
            parent_bytes: None,
            new_parts: Vec::new(),
            scratch: Vec::new(),
            parent_bytes_read: 0,
        })
    }

    /// Digests blocks that are partly unchanged from the parent's bytes, read with `read`.
    pub fn with_parent_bytes(mut self, read: ParentBytes) -> Self {
        self.parent_bytes = Some(read);
        self
    }

    /// Whether the new parts of each block are kept, to overlay a partly unchanged one.
    fn keeps_parts(&self) -> bool {
        self.parent.is_some() && self.parent_bytes.is_some()
    }

    /// Bytes read from the parent so far, to digest partly unchanged blocks.
    pub fn parent_bytes_read(&self) -> u64 {
        self.parent_bytes_read
    }

    /// Where the block being digested (the next one not yet in the list) starts and ends.
    fn block_bounds(&self) -> (u64, u64) {
        let start = (self.digests.len() as u64).saturating_mul(DIGEST_BLOCK_SIZE);
        (
            start,
            start.saturating_add(DIGEST_BLOCK_SIZE).min(self.capacity),
        )
    }

    fn block_end(&self) -> u64 {
        self.block_bounds().1
    }

    fn close_block_if_full(&mut self) -> Result<()> {
        if self.position == self.block_end() {
            let hasher = std::mem::take(&mut self.current);
            let digest = match &self.parent {
                Some(parent) if self.current_unchanged => {
                    let expected = parent[self.digests.len()];
                    self.digest_over_parent(expected)?
                }
                _ => hasher.finalize().into(),
            };
            self.digests.push(digest);
            self.current_unchanged = false;
            self.new_parts.clear();
        }
        Ok(())
    }

    /// The digest of the current block, partly unchanged: the parent's bytes of it, checked
    /// against the parent's digest `expected`, with the new parts laid over them.
    fn digest_over_parent(&mut self, expected: [u8; 32]) -> Result<[u8; 32]> {
        let index = self.digests.len();
        let (start, end) = self.block_bounds();
        let Some(read) = self.parent_bytes.as_mut() else {
            return Err(Error::InvalidInput(format!(
                "block {index} is partly unchanged and partly new; its digest needs the parent's bytes"
            )));
        };
        let len = usize::try_from(end - start)
            .map_err(|_| Error::InvalidInput(format!("block {index} is too large")))?;
        self.scratch.resize(len, 0);
        read(start, &mut self.scratch)?;
        self.parent_bytes_read += len as u64;
        let found: [u8; 32] = Sha256::digest(&self.scratch).into();
        if found != expected {
            return Err(Error::InvalidInput(format!(
                "block {index} (bytes {start}..{end}) of the parent image does not match the \
                 parent's block list (SHA-256 {} recorded, {} read): the parent changed since it \
                 was written",
                hex::encode(expected),
                hex::encode(found)
            )));
        }
        for part in &self.new_parts {
            // Parts were checked to lie in this block when they were put.
            let at = usize::try_from(part.offset() - start).unwrap_or(usize::MAX);
            let slot = self
                .scratch
                .get_mut(at..)
                .and_then(|rest| rest.get_mut(..usize::try_from(part.len()).ok()?))
                .ok_or_else(|| {
                    Error::InvalidInput(format!("a part of block {index} lies outside it"))
                })?;
            match part {
                Extent::Data { data, .. } => slot.copy_from_slice(data),
                _ => slot.fill(0),
            }
        }
        Ok(Sha256::digest(&self.scratch).into())
    }

    /// Takes the next extent (in order, contiguous).
    pub fn put(&mut self, extent: &Extent) -> Result<()> {
        if extent.offset() != self.position || extent.end() > self.capacity {
            return Err(Error::InvalidInput(format!(
                "extent at {} of {} bytes: expected one at {} within {} bytes",
                extent.offset(),
                extent.len(),
                self.position,
                self.capacity
            )));
        }
        match extent {
            Extent::Data { data, .. } => {
                let mut rest: &[u8] = data;
                while !rest.is_empty() {
                    let take = usize::try_from(self.block_end() - self.position)
                        .map_or(rest.len(), |n| n.min(rest.len()));
                    self.current.update(&rest[..take]);
                    if self.keeps_parts() {
                        let at = data.len() - rest.len();
                        self.new_parts.push(Extent::Data {
                            offset: self.position,
                            data: data.slice(at..at + take),
                        });
                    }
                    rest = &rest[take..];
                    self.position += take as u64;
                    self.close_block_if_full()?;
                }
            }
            Extent::Zero { len, .. } | Extent::Unchanged { len, .. } => {
                let unchanged = matches!(extent, Extent::Unchanged { .. });
                let end = self.position + len;
                while self.position < end {
                    let (block_start, block_end) = self.block_bounds();
                    let whole = self.position == block_start && end >= block_end;
                    if whole
                        && unchanged
                        && let Some(parent) = &self.parent
                    {
                        // The block is as in the parent: its digest too, nothing to hash.
                        self.digests.push(parent[self.digests.len()]);
                        self.position = block_end;
                        continue;
                    }
                    let take = block_end.min(end) - self.position;
                    update_zeros(&mut self.current, take);
                    self.current_unchanged |= unchanged;
                    if !unchanged && self.keeps_parts() {
                        self.new_parts.push(Extent::Zero {
                            offset: self.position,
                            len: take,
                        });
                    }
                    self.position += take;
                    self.close_block_if_full()?;
                }
            }
        }
        Ok(())
    }

    /// The digests, one per block; fails if the stream stopped short.
    pub fn finish(self) -> Result<Vec<[u8; 32]>> {
        if self.position != self.capacity {
            return Err(Error::InvalidInput(format!(
                "the extent stream stopped at {} of {} bytes",
                self.position, self.capacity
            )));
        }
        Ok(self.digests)
    }
}

/// The SHA-256 of a block list: the disk's content digest as export manifests record it.
pub fn block_list_digest(digests: &[[u8; 32]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for digest in digests {
        hasher.update(digest);
    }
    hasher.finalize().into()
}

/// The block list of `disk` read whole (`rehost disk checksum --blocks`).
pub fn block_digests(
    disk: &Disk,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<Vec<[u8; 32]>> {
    let options = StreamOptions {
        threads,
        detect_zeros: false,
        unallocated_as_zero: true,
        ..StreamOptions::default()
    };
    let mut digests = BlockDigests::new(disk.virtual_size(), None)?;
    for_each_extent(disk, &options, |extent| {
        digests.put(&extent)?;
        progress(extent.end());
        Ok(())
    })?;
    digests.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFs;
    use bytes::Bytes;

    fn digests_of(bytes: &[u8]) -> Vec<[u8; 32]> {
        bytes
            .chunks(usize::try_from(DIGEST_BLOCK_SIZE).unwrap())
            .map(|b| Sha256::digest(b).into())
            .collect()
    }

    #[test]
    fn block_digests_of_a_full_stream_hash_every_block() {
        let size = 3 * DIGEST_BLOCK_SIZE + 4096;
        let mut bytes = vec![0u8; usize::try_from(size).unwrap()];
        bytes[700_000..700_100].fill(9);
        let mut d = BlockDigests::new(size, None).unwrap();
        d.put(&Extent::Unchanged {
            offset: 0,
            len: 600_000,
        })
        .unwrap();
        d.put(&Extent::Data {
            offset: 600_000,
            data: Bytes::copy_from_slice(&bytes[600_000..800_000]),
        })
        .unwrap();
        d.put(&Extent::Zero {
            offset: 800_000,
            len: size - 800_000,
        })
        .unwrap();
        assert_eq!(d.finish().unwrap(), digests_of(&bytes));
    }

    #[test]
    fn unchanged_blocks_take_the_parents_digest() {
        let size = 4 * DIGEST_BLOCK_SIZE;
        let parent = vec![[1u8; 32], [2; 32], [3; 32], [4; 32]];
        let new_block = vec![5u8; usize::try_from(DIGEST_BLOCK_SIZE).unwrap()];
        let mut d = BlockDigests::new(size, Some(parent)).unwrap();
        d.put(&Extent::Unchanged {
            offset: 0,
            len: 2 * DIGEST_BLOCK_SIZE,
        })
        .unwrap();
        d.put(&Extent::Data {
            offset: 2 * DIGEST_BLOCK_SIZE,
            data: Bytes::from(new_block.clone()),
        })
        .unwrap();
        d.put(&Extent::Unchanged {
            offset: 3 * DIGEST_BLOCK_SIZE,
            len: DIGEST_BLOCK_SIZE,
        })
        .unwrap();
        let got = d.finish().unwrap();
        assert_eq!(
            got,
            vec![
                [1u8; 32],
                [2; 32],
                Sha256::digest(&new_block).into(),
                [4; 32]
            ]
        );
    }

    #[test]
    fn a_partly_unchanged_block_with_a_parent_is_refused() {
        let size = 2 * DIGEST_BLOCK_SIZE;
        let mut d = BlockDigests::new(size, Some(vec![[0; 32]; 2])).unwrap();
        d.put(&Extent::Unchanged {
            offset: 0,
            len: 4096,
        })
        .unwrap();
        let err = d.put(&Extent::Data {
            offset: 4096,
            data: Bytes::from(vec![1u8; 524_288 - 4096]),
        });
        assert!(err.unwrap_err().to_string().contains("partly unchanged"));
    }

    /// A reader of `parent`'s bytes, as an export reads its base image.
    fn reader_of(parent: Vec<u8>) -> ParentBytes {
        Box::new(move |offset, buf| {
            let at = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&parent[at..at + buf.len()]);
            Ok(())
        })
    }

    #[test]
    fn a_partly_unchanged_block_is_digested_over_the_parents_bytes() {
        let block = usize::try_from(DIGEST_BLOCK_SIZE).unwrap();
        let size = 3 * DIGEST_BLOCK_SIZE;
        let parent: Vec<u8> = (0..3 * block)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let mut now = parent.clone();
        // A 64 KiB change straddling blocks 0 and 1, and zeros in the middle of block 2.
        now[block - 65_536 / 2..block + 65_536 / 2].fill(7);
        now[2 * block + 4096..2 * block + 8192].fill(0);
        let mut d = BlockDigests::new(size, Some(digests_of(&parent)))
            .unwrap()
            .with_parent_bytes(reader_of(parent.clone()));
        let change = (block - 32_768) as u64;
        d.put(&Extent::Unchanged {
            offset: 0,
            len: change,
        })
        .unwrap();
        d.put(&Extent::Data {
            offset: change,
            data: Bytes::copy_from_slice(&now[block - 32_768..block + 32_768]),
        })
        .unwrap();
        let after = change + 65_536;
        d.put(&Extent::Unchanged {
            offset: after,
            len: 2 * DIGEST_BLOCK_SIZE + 4096 - after,
        })
        .unwrap();
        d.put(&Extent::Zero {
            offset: 2 * DIGEST_BLOCK_SIZE + 4096,
            len: 4096,
        })
        .unwrap();
        d.put(&Extent::Unchanged {
            offset: 2 * DIGEST_BLOCK_SIZE + 8192,
            len: DIGEST_BLOCK_SIZE - 8192,
        })
        .unwrap();
        assert_eq!(
            d.parent_bytes_read(),
            size,
            "three partial blocks, read once each"
        );
        assert_eq!(d.finish().unwrap(), digests_of(&now));
    }

    #[test]
    fn a_parent_whose_bytes_differ_from_its_block_list_is_refused() {
        let block = usize::try_from(DIGEST_BLOCK_SIZE).unwrap();
        let parent = vec![3u8; block];
        let mut tampered = parent.clone();
        tampered[100] = 4;
        let mut d = BlockDigests::new(DIGEST_BLOCK_SIZE, Some(digests_of(&parent)))
            .unwrap()
            .with_parent_bytes(reader_of(tampered));
        d.put(&Extent::Data {
            offset: 0,
            data: Bytes::from(vec![1u8; 4096]),
        })
        .unwrap();
        let err = d
            .put(&Extent::Unchanged {
                offset: 4096,
                len: DIGEST_BLOCK_SIZE - 4096,
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("block 0") && err.contains("does not match"),
            "{err}"
        );
    }

    proptest::proptest! {
        /// Whatever the cuts, digesting new parts over the parent's bytes gives the
        /// digests of the disk as it is now.
        #[test]
        fn digests_over_the_parent_match_the_new_disk(
            cuts in proptest::collection::btree_set(1u64..(3 * 524_288 + 1000), 0..12),
            kinds in proptest::collection::vec(0u8..3, 13),
        ) {
            let size = 3 * DIGEST_BLOCK_SIZE + 1000;
            let parent: Vec<u8> = (0..size).map(|i| u8::try_from(i % 253).unwrap() | 1).collect();
            let mut now = parent.clone();
            let mut bounds = vec![0];
            bounds.extend(cuts);
            bounds.push(size);
            let mut extents = Vec::new();
            for (i, w) in bounds.windows(2).enumerate() {
                let (lo, hi) = (w[0], w[1]);
                let (a, b) = (usize::try_from(lo).unwrap(), usize::try_from(hi).unwrap());
                extents.push(match kinds[i] {
                    0 => Extent::Unchanged { offset: lo, len: hi - lo },
                    1 => {
                        now[a..b].fill(0);
                        Extent::Zero { offset: lo, len: hi - lo }
                    }
                    _ => {
                        now[a..b].iter_mut().for_each(|x| *x = x.wrapping_add(1));
                        Extent::Data { offset: lo, data: Bytes::copy_from_slice(&now[a..b]) }
                    }
                });
            }
            let mut d = BlockDigests::new(size, Some(digests_of(&parent)))
                .unwrap()
                .with_parent_bytes(reader_of(parent.clone()));
            for e in &extents {
                d.put(e).unwrap();
            }
            proptest::prop_assert_eq!(d.finish().unwrap(), digests_of(&now));
        }
    }

    #[test]
    fn a_short_stream_and_a_wrong_parent_list_are_refused() {
        assert!(BlockDigests::new(DIGEST_BLOCK_SIZE, Some(vec![])).is_err());
        let d = BlockDigests::new(DIGEST_BLOCK_SIZE, None).unwrap();
        assert!(d.finish().is_err());
    }

    #[test]
    fn block_digests_of_a_disk_match_its_bytes() {
        let mut bytes = vec![0u8; 5 << 20];
        bytes[3_000_000] = 7;
        let disk = Disk::from_bytes(&MemFs::new(), "r", bytes.clone()).unwrap();
        assert_eq!(
            block_digests(&disk, 2, &mut |_| {}).unwrap(),
            digests_of(&bytes)
        );
    }

    #[test]
    fn checksum_of_a_raw_disk_is_the_sha256_of_its_bytes() {
        let mut bytes = vec![0u8; 3 << 20];
        bytes[2_000_000] = 7;
        let disk = Disk::from_bytes(&MemFs::new(), "r", bytes.clone()).unwrap();
        let ours = sha256(&disk, 2, &mut |_| {}).unwrap();
        let expected: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(ours, expected);
    }
}
