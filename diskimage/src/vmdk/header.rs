//! The hosted sparse extent header (`SparseExtentHeader`, VMware "Virtual Disk Format 1.1",
//! section "Hosted Sparse Extent Header") and the stream-optimized markers.

use crate::error::{Error, Result};
use crate::io::le;

/// Bytes per sector: every VMDK offset and size is counted in 512-byte sectors.
pub const SECTOR: u64 = 512;
/// [`SECTOR`] as a buffer length.
pub const SECTOR_BYTES: usize = 512;
/// Size of the header (one sector; its tail is padding).
pub const HEADER_SIZE: usize = 512;
/// `magicNumber`: "KDMV", 0x564d444b read little-endian.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// flags bit 0: the four newline-detection characters are valid.
pub const FLAG_VALID_NEWLINE: u32 = 1 << 0;
/// flags bit 1: a redundant grain directory and tables exist (`rgdOffset`).
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
// flags bit 2 (qemu's `zeroed_grain`) announces grain table entries of 1 meaning "zero
// grain"; ESXi writes such entries too, so they are read as zero whatever the flag says.
/// flags bit 16: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// flags bit 17: the file has markers (grain headers and metadata markers).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` of a stream whose grain directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// `compressAlgorithm`: RFC 1951 deflate (in zlib framing, as VMware and qemu write it).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// Grain table entry meaning "not allocated here".
pub const GTE_UNALLOCATED: u32 = 0;
/// Grain table entry meaning "this grain is zero" (with [`FLAG_ZERO_GRAIN`], or as ESXi writes).
pub const GTE_ZERO: u32 = 1;
/// Largest grain we accept: 1 MiB (2048 sectors). VMware uses 64 KiB; qemu caps at 1 MiB too.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest `numGTEsPerGT` we accept; the spec fixes 512, qemu refuses more.
pub const MAX_GTES_PER_GT: u32 = 512;
/// Largest virtual size we accept for one extent: 64 TiB (VMFS's limit is 62 TiB), so
/// offsets computed from it never overflow.
pub const MAX_CAPACITY_SECTORS: u64 = (64u64 << 40) / SECTOR;
/// Largest grain directory we load: 4 Mi entries (16 MiB), enough for 64 TiB of 64 KiB grains.
pub const MAX_GD_ENTRIES: u64 = 4 << 20;

/// Marker `type` of an end-of-stream marker (stream-optimized format, "Markers").
pub const MARKER_EOS: u32 = 0;
/// Marker `type` of a grain table marker.
pub const MARKER_GT: u32 = 1;
/// Marker `type` of a grain directory marker.
pub const MARKER_GD: u32 = 2;
/// Marker `type` of a footer marker.
pub const MARKER_FOOTER: u32 = 3;
/// Bytes before a compressed grain's data: `lba` (u64) and `size` (u32).
pub const GRAIN_MARKER_SIZE: usize = 12;

/// The fields of a `SparseExtentHeader` we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SparseHeader {
    /// `version`: 1, 2 (zeroed grains) or 3 (stream-optimized).
    pub version: u32,
    /// `flags`.
    pub flags: u32,
    /// `capacity` in sectors.
    pub capacity: u64,
    /// `grainSize` in sectors.
    pub grain_size: u64,
    /// `descriptorOffset` in sectors (0 = no embedded descriptor).
    pub descriptor_offset: u64,
    /// `descriptorSize` in sectors.
    pub descriptor_size: u64,
    /// `numGTEsPerGT`.
    pub gtes_per_gt: u32,
    /// `rgdOffset` in sectors.
    pub rgd_offset: u64,
    /// `gdOffset` in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// `overHead` in sectors: where grains start.
    pub overhead: u64,
    /// `compressAlgorithm`.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Parses and checks a header read at `offset` of `file` (for errors).
    pub fn parse(buf: &[u8; HEADER_SIZE], file: &str, offset: u64) -> Result<Self> {
        let bad = |reason: String| Error::corrupt(file, "VMDK sparse header", offset, reason);
        if &buf[0..4] != MAGIC {
            return Err(bad("no KDMV magic".into()));
        }
        let h = Self {
            version: le::u32(buf, 4),
            flags: le::u32(buf, 8),
            capacity: le::u64(buf, 12),
            grain_size: le::u64(buf, 20),
            descriptor_offset: le::u64(buf, 28),
            descriptor_size: le::u64(buf, 36),
            gtes_per_gt: le::u32(buf, 44),
            rgd_offset: le::u64(buf, 48),
            gd_offset: le::u64(buf, 56),
            overhead: le::u64(buf, 64),
            compress_algorithm: le::u16(buf, 77),
        };
        if !(1..=3).contains(&h.version) {
            return Err(Error::unsupported(
                file,
                format!("VMDK sparse extent version {}", h.version),
            ));
        }
        // Bytes 73..77 are "\n \r\n": a file moved through a text-mode transfer has them mangled.
        if h.flags & FLAG_VALID_NEWLINE != 0 && &buf[73..77] != b"\n \r\n" {
            return Err(bad(
                "newline detection characters are altered (was the file transferred in text mode?)"
                    .into(),
            ));
        }
        if h.capacity > MAX_CAPACITY_SECTORS {
            return Err(bad(format!(
                "capacity of {} sectors exceeds the 64 TiB we accept",
                h.capacity
            )));
        }
        if h.grain_size == 0 || !h.grain_size.is_power_of_two() || h.grain_size > MAX_GRAIN_SECTORS
        {
            return Err(bad(format!(
                "grain size of {} sectors is not a power of two up to {MAX_GRAIN_SECTORS}",
                h.grain_size
            )));
        }
        if h.gtes_per_gt == 0 || h.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(bad(format!(
                "{} grain table entries per table (1 to {MAX_GTES_PER_GT} accepted)",
                h.gtes_per_gt
            )));
        }
        if h.compressed() && h.compress_algorithm != COMPRESSION_DEFLATE {
            return Err(Error::unsupported(
                file,
                format!("VMDK compression algorithm {}", h.compress_algorithm),
            ));
        }
        if h.compressed() && !h.has_markers() {
            return Err(Error::unsupported(
                file,
                "compressed VMDK grains without grain markers",
            ));
        }
        Ok(h)
    }

    /// Grains are deflate-compressed.
    pub fn compressed(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0
    }

    /// Grains carry markers (LBA + size) and metadata is introduced by markers.
    pub fn has_markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// Bytes per grain.
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    /// Number of grain directory entries needed to cover the capacity.
    pub fn gd_entries(&self) -> u64 {
        let per_gt = self.grain_size * u64::from(self.gtes_per_gt);
        self.capacity.div_ceil(per_gt)
    }
}

/// A metadata marker (size field 0): what follows and how many sectors it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// `val`: for a grain marker the LBA, for a metadata marker the sectors that follow.
    pub val: u64,
    /// `size`: compressed bytes of a grain, 0 for metadata markers.
    pub size: u32,
    /// `type` of a metadata marker (only meaningful when `size` is 0).
    pub kind: u32,
}

impl Marker {
    /// Parses the first 16 bytes of a marker sector.
    pub fn parse(buf: &[u8; 16]) -> Self {
        Self {
            val: le::u64(buf, 0),
            size: le::u32(buf, 8),
            kind: le::u32(buf, 12),
        }
    }
}

/// The largest compressed size we accept for a grain: deflate never expands data by more
/// than a few bytes per 16 KiB block, so twice the grain plus a sector is generous.
pub fn max_compressed_size(grain_bytes: u64) -> u64 {
    grain_bytes * 2 + SECTOR
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header as a writer would build it from the spec.
    pub fn header_bytes(
        capacity: u64,
        grain: u64,
        flags: u32,
        gd: u64,
        rgd: u64,
        overhead: u64,
    ) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(MAGIC);
        let version: u32 = if flags & FLAG_COMPRESSED != 0 { 3 } else { 1 };
        b[4..8].copy_from_slice(&version.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        b[12..20].copy_from_slice(&capacity.to_le_bytes());
        b[20..28].copy_from_slice(&grain.to_le_bytes());
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        b[48..56].copy_from_slice(&rgd.to_le_bytes());
        b[56..64].copy_from_slice(&gd.to_le_bytes());
        b[64..72].copy_from_slice(&overhead.to_le_bytes());
        b[73..77].copy_from_slice(b"\n \r\n");
        let algo = if flags & FLAG_COMPRESSED != 0 {
            COMPRESSION_DEFLATE
        } else {
            0
        };
        b[77..79].copy_from_slice(&algo.to_le_bytes());
        b
    }

    #[test]
    fn parses_and_rejects_lies() {
        let b = header_bytes(2048, 128, FLAG_VALID_NEWLINE, 1, 0, 8);
        let h = SparseHeader::parse(&b, "t", 0).unwrap();
        assert_eq!(
            (h.capacity, h.grain_bytes(), h.gd_entries()),
            (2048, 65536, 1)
        );

        let mut lie = b;
        lie[12..20].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(
            SparseHeader::parse(&lie, "t", 0)
                .unwrap_err()
                .to_string()
                .contains("capacity")
        );
        let mut lie = b;
        lie[20..28].copy_from_slice(&3u64.to_le_bytes());
        assert!(SparseHeader::parse(&lie, "t", 0).is_err());
        let mut lie = b;
        lie[44..48].copy_from_slice(&0u32.to_le_bytes());
        assert!(SparseHeader::parse(&lie, "t", 0).is_err());
        let mut lie = b;
        lie[75] = b'\n';
        assert!(
            SparseHeader::parse(&lie, "t", 0)
                .unwrap_err()
                .to_string()
                .contains("text mode")
        );
        let mut lie = b;
        lie[0] = b'X';
        assert!(SparseHeader::parse(&lie, "t", 0).is_err());
        let mut lie = b;
        lie[4] = 9;
        assert!(matches!(
            SparseHeader::parse(&lie, "t", 0),
            Err(Error::Unsupported { .. })
        ));
    }
}
