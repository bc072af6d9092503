//! VMDK writers: a streamOptimized one for forward-only outputs (uploads, OVAs) and a
//! monolithicSparse one, full or as a delta child of a VMDK parent. Both are fed grains in
//! disk order and hold only the grain directory and the grain table being filled.

mod descriptor;
mod grains;
mod header;
#[cfg(test)]
mod roundtrip_tests;
mod sparse;
mod stream;

pub use sparse::SparseWriter;
pub use stream::StreamOptimizedWriter;

use rehost_core::SECTOR_SIZE;

use crate::error::{Error, Result};
use header::{DESCRIPTOR_MIN_SECTORS, GRAIN_BYTES, GRAIN_SECTORS, GTES_PER_GT};

/// Sizes every layout derives from a virtual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    /// The header's `capacity`: the virtual size rounded up to a whole sector, since VMDK
    /// counts in sectors (the padding reads as zeros).
    capacity_sectors: u64,
    /// Number of grain tables, hence of grain directory entries.
    gt_count: u64,
    /// Sectors of one grain directory.
    gd_sectors: u64,
}

impl Geometry {
    fn new(name: &str, virtual_size: u64, max_size: u64) -> Result<Self> {
        if virtual_size == 0 || virtual_size > max_size {
            return Err(Error::InvalidInput(format!(
                "{name}: a VMDK of {virtual_size} bytes cannot be written (1 byte to {max_size} bytes)"
            )));
        }
        let capacity_sectors = virtual_size.div_ceil(SECTOR_SIZE);
        let grains = capacity_sectors.div_ceil(GRAIN_SECTORS);
        let gt_count = grains.div_ceil(GTES_PER_GT);
        let gd_sectors = (gt_count * 4).div_ceil(SECTOR_SIZE);
        Ok(Self {
            capacity_sectors,
            gt_count,
            gd_sectors,
        })
    }
}

/// The descriptor text zero-padded to whole sectors (at least the 20 qemu reserves).
fn padded_descriptor(text: &str) -> Vec<u8> {
    let sectors = (text.len() as u64)
        .div_ceil(SECTOR_SIZE)
        .max(DESCRIPTOR_MIN_SECTORS);
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(
        usize::try_from(sectors * SECTOR_SIZE).unwrap_or(bytes.len()),
        0,
    );
    bytes
}

/// Bytes of the virtual disk grain `grain` covers (the last one may be short).
fn grain_len(grain: u64, virtual_size: u64) -> u64 {
    virtual_size
        .saturating_sub(grain * GRAIN_BYTES)
        .min(GRAIN_BYTES)
}

/// A sector number as a 32-bit grain table or directory entry, the format's limit.
fn entry(name: &str, sector: u64) -> Result<u32> {
    u32::try_from(sector).map_err(|_| {
        Error::unsupported(
            name,
            format!("the image grows past sector {sector}, beyond the 2 TiB a VMDK sparse extent can address"),
        )
    })
}

/// Turns an I/O error while writing `structure` at `offset` into ours.
fn write_err(
    name: &str,
    structure: &'static str,
    offset: u64,
) -> impl FnOnce(std::io::Error) -> Error {
    let file = name.to_owned();
    move |source| Error::Io {
        file,
        op: "write",
        structure,
        offset,
        source,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rounds_up() {
        let g = Geometry::new("x", 5_000_000, u64::MAX).unwrap();
        assert_eq!(
            g,
            Geometry {
                capacity_sectors: 9766,
                gt_count: 1,
                gd_sectors: 1
            }
        );
        let g = Geometry::new("x", 2 << 40, u64::MAX).unwrap();
        assert_eq!(g.gt_count, 65536);
        assert_eq!(g.gd_sectors, 512);
        assert!(Geometry::new("x", 0, u64::MAX).is_err());
        assert!(Geometry::new("x", 10, 9).is_err());
    }

    #[test]
    fn last_grain_is_short() {
        assert_eq!(grain_len(0, 100), 100);
        assert_eq!(grain_len(1, GRAIN_BYTES + 7), 7);
        assert_eq!(grain_len(0, 3 * GRAIN_BYTES), GRAIN_BYTES);
    }

    #[test]
    fn descriptor_padding() {
        assert_eq!(padded_descriptor("abc").len(), 20 * 512);
        assert_eq!(padded_descriptor(&"x".repeat(20 * 512 + 1)).len(), 21 * 512);
    }
}
