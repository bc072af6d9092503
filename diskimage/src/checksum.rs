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
/// `Unchanged` with a parent cannot be digested without the parent's bytes and is refused.
#[derive(Debug, Clone)]
pub struct BlockDigests {
    capacity: u64,
    position: u64,
    parent: Option<Vec<[u8; 32]>>,
    digests: Vec<[u8; 32]>,
    /// The block being hashed, and whether any of it came from an `Unchanged` extent.
    current: Sha256,
    current_unchanged: bool,
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
        })
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
            if self.current_unchanged && self.parent.is_some() {
                return Err(Error::InvalidInput(format!(
                    "block {} is partly unchanged and partly new; its digest needs the parent's bytes",
                    self.digests.len()
                )));
            }
            self.digests.push(hasher.finalize().into());
            self.current_unchanged = false;
        }
        Ok(())
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
