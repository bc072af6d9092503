//! The 1024-byte dynamic disk header of dynamic and differencing VHDs (spec, "Dynamic Disk
//! Header Format"): where the BAT is, the block size and, for a differencing disk, who
//! the parent is. Big-endian.

use crate::io::be;

use super::footer::checksum;

/// Size of the header.
pub const HEADER_SIZE: usize = 1024;
/// `cxsparse`, the header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Header version 1.0.
pub const HEADER_VERSION: u32 = 0x0001_0000;
/// Blocks of 2 MiB: the spec's default, what Virtual PC, Hyper-V and qemu write.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Bytes of the parent unicode name field (UTF-16BE, 256 code units).
pub const PARENT_NAME_SIZE: usize = 512;
/// Parent locator entries in the header.
pub const LOCATOR_COUNT: usize = 8;
/// Bytes of one parent locator entry.
pub const LOCATOR_ENTRY_SIZE: usize = 24;

/// Field offsets (spec, table "Dynamic disk header fields").
pub mod at {
    /// Cookie, 8 bytes.
    pub const COOKIE: usize = 0;
    /// Next structure (unused, all ones), u64.
    pub const DATA_OFFSET: usize = 8;
    /// Offset of the BAT, u64.
    pub const TABLE_OFFSET: usize = 16;
    /// Header version, u32.
    pub const VERSION: usize = 24;
    /// Entries in the BAT, u32.
    pub const MAX_TABLE_ENTRIES: usize = 28;
    /// Block size in bytes, u32.
    pub const BLOCK_SIZE: usize = 32;
    /// Checksum, u32.
    pub const CHECKSUM: usize = 36;
    /// Parent's footer unique id, 16 bytes.
    pub const PARENT_UNIQUE_ID: usize = 40;
    /// Parent's modification time, u32.
    pub const PARENT_TIMESTAMP: usize = 56;
    /// Parent file name, UTF-16BE, 512 bytes.
    pub const PARENT_NAME: usize = 64;
    /// First of 8 parent locator entries of 24 bytes.
    pub const LOCATORS: usize = 576;
}

/// A parent locator's platform code (spec, "Parent Locator Entries").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// `W2ru`: path relative to the child, UTF-16LE.
    W2ru,
    /// `W2ku`: absolute path, UTF-16LE.
    W2ku,
    /// `Wi2r`: relative path, ASCII (deprecated).
    Wi2r,
    /// `Wi2k`: absolute path, ASCII (deprecated).
    Wi2k,
    /// `MacX`: a `file://` URL, UTF-8.
    MacX,
    /// `Mac `: a Mac OS alias record, which we cannot use.
    Mac,
}

impl Platform {
    /// The four-character code.
    pub fn code(self) -> [u8; 4] {
        *match self {
            Platform::W2ru => b"W2ru",
            Platform::W2ku => b"W2ku",
            Platform::Wi2r => b"Wi2r",
            Platform::Wi2k => b"Wi2k",
            Platform::MacX => b"MacX",
            Platform::Mac => b"Mac ",
        }
    }

    fn from_code(code: [u8; 4]) -> Option<Self> {
        [
            Platform::W2ru,
            Platform::W2ku,
            Platform::Wi2r,
            Platform::Wi2k,
            Platform::MacX,
            Platform::Mac,
        ]
        .into_iter()
        .find(|p| p.code() == code)
    }
}

/// One parent locator entry: where in the file a path to the parent is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locator {
    /// How the path is encoded.
    pub platform: Platform,
    /// Space reserved for it (sectors per the spec, bytes as Hyper-V writes it; unused).
    pub data_space: u32,
    /// Length of the path in bytes.
    pub data_length: u32,
    /// Where it is in the file.
    pub data_offset: u64,
}

/// A parsed dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// Offset of the BAT.
    pub table_offset: u64,
    /// Header version (1.0 expected).
    pub version: u32,
    /// Entries the BAT holds.
    pub max_table_entries: u32,
    /// Bytes per block.
    pub block_size: u32,
    /// The parent's footer unique id (differencing disks).
    pub parent_unique_id: [u8; 16],
    /// The parent's modification time, seconds since 2000 (differencing disks).
    pub parent_timestamp: u32,
    /// The parent's file name, UTF-16BE, as stored (differencing disks).
    pub parent_name: [u8; PARENT_NAME_SIZE],
    /// Locator entries with a known platform code, in header order.
    pub locators: Vec<Locator>,
}

/// Why a header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// No `cxsparse` cookie.
    Cookie,
    /// The checksum does not match.
    Checksum {
        /// As stored.
        stored: u32,
        /// As computed.
        computed: u32,
    },
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Cookie => write!(f, "no \"cxsparse\" cookie"),
            HeaderError::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum {stored:#010x} does not match the computed {computed:#010x}"
                )
            }
        }
    }
}

impl DynamicHeader {
    /// Parses a header, checking cookie and checksum (values are checked by the reader,
    /// which knows the file).
    pub fn parse(buf: &[u8; HEADER_SIZE]) -> Result<Self, HeaderError> {
        if &buf[at::COOKIE..at::COOKIE + 8] != HEADER_COOKIE {
            return Err(HeaderError::Cookie);
        }
        let stored = be::u32(buf, at::CHECKSUM);
        let computed = checksum(buf, at::CHECKSUM);
        if stored != computed {
            return Err(HeaderError::Checksum { stored, computed });
        }
        let mut parent_unique_id = [0u8; 16];
        parent_unique_id.copy_from_slice(&buf[at::PARENT_UNIQUE_ID..at::PARENT_UNIQUE_ID + 16]);
        let mut parent_name = [0u8; PARENT_NAME_SIZE];
        parent_name.copy_from_slice(&buf[at::PARENT_NAME..at::PARENT_NAME + PARENT_NAME_SIZE]);
        let locators = buf[at::LOCATORS..at::LOCATORS + LOCATOR_COUNT * LOCATOR_ENTRY_SIZE]
            .chunks_exact(LOCATOR_ENTRY_SIZE)
            .filter_map(|e| {
                let platform = Platform::from_code([e[0], e[1], e[2], e[3]])?;
                Some(Locator {
                    platform,
                    data_space: be::u32(e, 4),
                    data_length: be::u32(e, 8),
                    data_offset: be::u64(e, 16),
                })
            })
            .collect();
        Ok(Self {
            table_offset: be::u64(buf, at::TABLE_OFFSET),
            version: be::u32(buf, at::VERSION),
            max_table_entries: be::u32(buf, at::MAX_TABLE_ENTRIES),
            block_size: be::u32(buf, at::BLOCK_SIZE),
            parent_unique_id,
            parent_timestamp: be::u32(buf, at::PARENT_TIMESTAMP),
            parent_name,
            locators,
        })
    }

    /// Serialises the header with its checksum. At most [`LOCATOR_COUNT`] locators are
    /// written; the caller passes fewer.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut buf = [0u8; HEADER_SIZE];
        buf[at::COOKIE..at::COOKIE + 8].copy_from_slice(HEADER_COOKIE);
        buf[at::DATA_OFFSET..at::DATA_OFFSET + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        buf[at::TABLE_OFFSET..at::TABLE_OFFSET + 8]
            .copy_from_slice(&self.table_offset.to_be_bytes());
        buf[at::VERSION..at::VERSION + 4].copy_from_slice(&self.version.to_be_bytes());
        buf[at::MAX_TABLE_ENTRIES..at::MAX_TABLE_ENTRIES + 4]
            .copy_from_slice(&self.max_table_entries.to_be_bytes());
        buf[at::BLOCK_SIZE..at::BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_be_bytes());
        buf[at::PARENT_UNIQUE_ID..at::PARENT_UNIQUE_ID + 16]
            .copy_from_slice(&self.parent_unique_id);
        buf[at::PARENT_TIMESTAMP..at::PARENT_TIMESTAMP + 4]
            .copy_from_slice(&self.parent_timestamp.to_be_bytes());
        buf[at::PARENT_NAME..at::PARENT_NAME + PARENT_NAME_SIZE].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().take(LOCATOR_COUNT).enumerate() {
            let e = at::LOCATORS + i * LOCATOR_ENTRY_SIZE;
            buf[e..e + 4].copy_from_slice(&l.platform.code());
            buf[e + 4..e + 8].copy_from_slice(&l.data_space.to_be_bytes());
            buf[e + 8..e + 12].copy_from_slice(&l.data_length.to_be_bytes());
            buf[e + 16..e + 24].copy_from_slice(&l.data_offset.to_be_bytes());
        }
        let sum = checksum(&buf, at::CHECKSUM);
        buf[at::CHECKSUM..at::CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        buf
    }
}

/// Bytes of a block's sector bitmap: one bit per 512-byte sector, padded to a whole
/// sector (spec, "Block Allocation Table and Data Blocks").
pub fn bitmap_size(block_size: u32) -> u64 {
    (u64::from(block_size) / 512).div_ceil(8).div_ceil(512) * 512
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DynamicHeader {
        DynamicHeader {
            table_offset: 1536,
            version: HEADER_VERSION,
            max_table_entries: 3,
            block_size: DEFAULT_BLOCK_SIZE,
            parent_unique_id: [9; 16],
            parent_timestamp: 77,
            parent_name: [0; PARENT_NAME_SIZE],
            locators: vec![Locator {
                platform: Platform::W2ru,
                data_space: 512,
                data_length: 20,
                data_offset: 2048,
            }],
        }
    }

    #[test]
    fn round_trips_and_checks_its_checksum() {
        let bytes = sample().to_bytes();
        assert_eq!(DynamicHeader::parse(&bytes).unwrap(), sample());
        let mut bad = bytes;
        bad[40] ^= 0x10;
        assert!(matches!(
            DynamicHeader::parse(&bad),
            Err(HeaderError::Checksum { .. })
        ));
        let mut bad = bytes;
        bad[2] = 0;
        assert_eq!(DynamicHeader::parse(&bad), Err(HeaderError::Cookie));
    }

    #[test]
    fn bitmaps_are_sector_padded() {
        assert_eq!(bitmap_size(DEFAULT_BLOCK_SIZE), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(1 << 26), 16384);
    }
}
