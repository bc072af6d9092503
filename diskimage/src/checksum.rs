//! The SHA-256 of a virtual disk's whole contents: what `qemu-img convert -O raw` followed
//! by `sha256sum` prints, computed without writing the raw file.

use rehost_core::Extent;
use sha2::{Digest, Sha256};

use crate::disk::Disk;
use crate::error::Result;
use crate::stream::{StreamOptions, for_each_extent};

/// Hashes `disk`, calling `progress` with the number of virtual bytes done so far.
pub fn sha256(disk: &Disk, threads: usize, progress: &mut dyn FnMut(u64)) -> Result<[u8; 32]> {
    let options = StreamOptions {
        threads,
        detect_zeros: false,
        unallocated_as_zero: true,
        ..StreamOptions::default()
    };
    let zeros = vec![0u8; 1 << 20];
    let mut hasher = Sha256::new();
    for_each_extent(disk, &options, |extent| {
        match &extent {
            Extent::Data { data, .. } => hasher.update(data),
            Extent::Zero { len, .. } | Extent::Unchanged { len, .. } => {
                let mut left = *len;
                while left > 0 {
                    let n = usize::try_from(left).map_or(zeros.len(), |l| l.min(zeros.len()));
                    hasher.update(&zeros[..n]);
                    left -= n as u64;
                }
            }
        }
        progress(extent.end());
        Ok(())
    })?;
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFs;

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
