//! Encoding of the hosted sparse extent header and of streamOptimized markers, as laid
//! out in VMware's "Virtual Disk Format 1.1" (section "Hosted Sparse Extent Header" and
//! "Stream-Optimized Compressed Sparse Extents"). The writers own this encoding so they
//! do not depend on the reader's parsing code.

use rehost_core::SECTOR_SIZE;

// The spec's flag bits and special values are shared with the reader; only what the
// writers alone need is defined here.
pub(crate) use crate::vmdk::header::{
    COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_REDUNDANT_GT, FLAG_VALID_NEWLINE,
    GD_AT_END, GTE_ZERO,
};

/// `magicNumber`: "KDMV" read as a little-endian u32 (spec: `SPARSE_MAGICNUMBER 0x564d444b`).
pub(crate) const MAGIC: u32 = 0x564d_444b;
/// Header `version` of a plain hosted sparse extent (spec 1.1).
pub(crate) const VERSION_SPARSE: u32 = 1;
/// Header `version` when zeroed-grain GTEs (value 1) may appear: VMware and qemu bump the
/// version to 2 together with [`FLAG_ZERO_GRAIN`] so older readers refuse the file.
pub(crate) const VERSION_ZERO_GRAIN: u32 = 2;
/// Header `version` of a streamOptimized extent (what ExportVm and qemu write).
pub(crate) const VERSION_STREAM: u32 = 3;

/// Flag bit 2: a GTE of 1 means "this grain reads as zeros" (zeroed-grain GTE).
pub(crate) const FLAG_ZERO_GRAIN: u32 = 1 << 2;

/// Grain size in sectors: 128 sectors = 64 KiB, the default of VMware and qemu.
pub(crate) const GRAIN_SECTORS: u64 = 128;
/// Grain size in bytes.
pub(crate) const GRAIN_BYTES: u64 = GRAIN_SECTORS * SECTOR_SIZE;
/// [`GRAIN_BYTES`] as a buffer length.
pub(crate) const GRAIN_LEN: usize = 64 * 1024;
const _: () = assert!(GRAIN_LEN as u64 == GRAIN_BYTES);
/// `numGTEsPerGT`: 512 entries per grain table (spec: fixed at 512).
pub(crate) const GTES_PER_GT: u64 = 512;
/// One grain table: 512 four-byte entries = 4 sectors.
pub(crate) const GT_SECTORS: u64 = GTES_PER_GT * 4 / SECTOR_SIZE;
/// Bytes of one grain table.
pub(crate) const GT_LEN: usize = 2048;
const _: () = assert!(GT_LEN as u64 == GTES_PER_GT * 4);
/// A zero sector, for padding.
pub(crate) const ZERO_SECTOR: [u8; 512] = [0; 512];
/// Sectors reserved for the embedded descriptor when it fits (what qemu reserves).
pub(crate) const DESCRIPTOR_MIN_SECTORS: u64 = 20;

/// Stream marker `type` (spec: `MARKER_EOS`, `MARKER_GT`, `MARKER_GD`, `MARKER_FOOTER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum MarkerType {
    /// End of stream.
    Eos = 0,
    /// A grain table follows.
    GrainTable = 1,
    /// The grain directory follows.
    GrainDirectory = 2,
    /// The footer (a header copy) follows.
    Footer = 3,
}

/// The fields of a `SparseExtentHeader` we set; the rest are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseHeader {
    /// `version`.
    pub version: u32,
    /// `flags`.
    pub flags: u32,
    /// `capacity`: the virtual size in sectors.
    pub capacity: u64,
    /// `descriptorOffset` in sectors (0 if none).
    pub descriptor_offset: u64,
    /// `descriptorSize` in sectors.
    pub descriptor_size: u64,
    /// `rgdOffset` in sectors (0 without a redundant directory).
    pub rgd_offset: u64,
    /// `gdOffset` in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// `overHead`: sectors before the first grain.
    pub overhead: u64,
    /// `compressAlgorithm`.
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// The 512-byte on-disk form, little-endian at the spec's packed offsets.
    pub(crate) fn encode(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
        b[28..36].copy_from_slice(&self.descriptor_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.descriptor_size.to_le_bytes());
        // numGTEsPerGT is a u32 in the header; 512 always fits.
        b[44..48].copy_from_slice(&512u32.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.overhead.to_le_bytes());
        // 72: uncleanShutdown = 0. 73..77: the newline-detection characters, which let a
        // reader notice a file mangled by a text-mode (CRLF) transfer.
        b[73] = b'\n';
        b[74] = b' ';
        b[75] = b'\r';
        b[76] = b'\n';
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }
}

/// A metadata marker sector: `numSectors` of what follows, `size` 0 (which tells it from
/// a grain marker), `type`, padded to a sector.
pub(crate) fn encode_marker(num_sectors: u64, kind: MarkerType) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..8].copy_from_slice(&num_sectors.to_le_bytes());
    // 8..12: size = 0.
    b[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    b
}

/// Length of a grain marker's fixed part: `lba` (u64) then `size` (u32), data follows.
pub(crate) const GRAIN_MARKER_LEN: usize = 12;

/// The fixed part of a compressed grain's marker: the grain's first sector on the virtual
/// disk and the compressed length.
pub(crate) fn encode_grain_marker(lba: u64, compressed_len: u32) -> [u8; GRAIN_MARKER_LEN] {
    let mut b = [0u8; GRAIN_MARKER_LEN];
    b[0..8].copy_from_slice(&lba.to_le_bytes());
    b[8..12].copy_from_slice(&compressed_len.to_le_bytes());
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn header_fields_sit_at_the_spec_offsets() {
        let h = SparseHeader {
            version: 3,
            flags: 0x30001,
            capacity: 0x1_2345_6789,
            descriptor_offset: 1,
            descriptor_size: 20,
            rgd_offset: 0x11,
            gd_offset: GD_AT_END,
            overhead: 128,
            compress_algorithm: COMPRESSION_DEFLATE,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], b"KDMV");
        assert_eq!(u32_at(&b, 4), 3);
        assert_eq!(u32_at(&b, 8), 0x30001);
        assert_eq!(u64_at(&b, 12), 0x1_2345_6789);
        assert_eq!(u64_at(&b, 20), 128);
        assert_eq!(u64_at(&b, 28), 1);
        assert_eq!(u64_at(&b, 36), 20);
        assert_eq!(u32_at(&b, 44), 512);
        assert_eq!(u64_at(&b, 48), 0x11);
        assert_eq!(u64_at(&b, 56), u64::MAX);
        assert_eq!(u64_at(&b, 64), 128);
        assert_eq!(b[72], 0);
        assert_eq!(&b[73..77], b"\n \r\n");
        assert_eq!(u16::from_le_bytes([b[77], b[78]]), 1);
        assert!(b[79..].iter().all(|&x| x == 0));
    }

    #[test]
    fn header_matches_what_qemu_writes_for_a_small_monolithic_sparse_disk() {
        // First 80 bytes of `qemu-img create -f vmdk x.vmdk 5000000` (9766 sectors).
        let h = SparseHeader {
            version: 1,
            flags: FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT,
            capacity: 9766,
            descriptor_offset: 1,
            descriptor_size: 20,
            rgd_offset: 21,
            gd_offset: 26,
            overhead: 128,
            compress_algorithm: 0,
        };
        let expected: [u8; 80] = [
            0x4b, 0x44, 0x4d, 0x56, 1, 0, 0, 0, 3, 0, 0, 0, 0x26, 0x26, 0, 0, 0, 0, 0, 0, 0x80, 0,
            0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0x15,
            0, 0, 0, 0, 0, 0, 0, 0x1a, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a,
            0x20, 0x0d, 0x0a, 0, 0, 0,
        ];
        assert_eq!(&h.encode()[..80], &expected[..]);
    }

    #[test]
    fn markers() {
        let m = encode_marker(4, MarkerType::GrainTable);
        assert_eq!(u64_at(&m, 0), 4);
        assert_eq!(u32_at(&m, 8), 0);
        assert_eq!(u32_at(&m, 12), 1);
        assert_eq!(u32_at(&encode_marker(1, MarkerType::Footer), 12), 3);
        assert_eq!(u32_at(&encode_marker(2, MarkerType::GrainDirectory), 12), 2);
        assert_eq!(encode_marker(0, MarkerType::Eos), [0u8; 512]);
        let g = encode_grain_marker(0x80, 0x1234);
        assert_eq!(u64_at(&g, 0), 0x80);
        assert_eq!(u32_at(&g, 8), 0x1234);
    }
}
