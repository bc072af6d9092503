//! The 512-byte hard disk footer every VHD ends with (and dynamic and differencing ones
//! also begin with), per the "Virtual Hard Disk Image Format Specification", section
//! "Hard Disk Footer Format". All fields are big-endian.

use crate::io::be;

/// Size of the footer. Virtual PC before 2004 wrote 511-byte footers on fixed disks; the
/// missing byte is the last reserved one.
pub const FOOTER_SIZE: usize = 512;
/// `conectix`, the footer cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Features field: bit 1 is "reserved, must always be set" (spec, "Features").
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// File format version 1.0 (spec, "File Format Version").
pub const FORMAT_VERSION: u32 = 0x0001_0000;
/// Data offset of a fixed disk: there is no next structure.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Seconds from the Unix epoch to the VHD epoch, 2000-01-01 00:00:00 UTC.
pub const VHD_EPOCH_UNIX_SECONDS: u64 = 946_684_800;
/// The largest geometry the footer can hold (65535 cylinders, 16 heads, 255 sectors):
/// tools that size by `current_size` (qemu's `force_size`) write it to say "ignore CHS".
pub const MAX_CHS_SECTORS: u64 = 65_535 * 16 * 255;

/// Field offsets in the footer (spec, table "Hard disk footer fields").
pub mod at {
    /// Cookie, 8 bytes.
    pub const COOKIE: usize = 0;
    /// Features, u32.
    pub const FEATURES: usize = 8;
    /// File format version, u32.
    pub const VERSION: usize = 12;
    /// Offset of the dynamic header, u64.
    pub const DATA_OFFSET: usize = 16;
    /// Creation time, u32 seconds since 2000-01-01.
    pub const TIMESTAMP: usize = 24;
    /// Creator application, 4 bytes.
    pub const CREATOR_APP: usize = 28;
    /// Creator version, u32.
    pub const CREATOR_VERSION: usize = 32;
    /// Creator host OS, 4 bytes.
    pub const CREATOR_OS: usize = 36;
    /// Original size in bytes, u64.
    pub const ORIGINAL_SIZE: usize = 40;
    /// Current size in bytes, u64.
    pub const CURRENT_SIZE: usize = 48;
    /// Cylinders u16, heads u8, sectors per track u8.
    pub const GEOMETRY: usize = 56;
    /// Disk type, u32.
    pub const DISK_TYPE: usize = 60;
    /// Checksum, u32.
    pub const CHECKSUM: usize = 64;
    /// Unique id, 16 bytes.
    pub const UNIQUE_ID: usize = 68;
    /// Saved state flag, 1 byte.
    pub const SAVED_STATE: usize = 84;
}

/// The disk types of the footer's "Disk Type" field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// 2: the data precedes the footer.
    Fixed,
    /// 3: blocks allocated on demand.
    Dynamic,
    /// 4: blocks holding what differs from a parent.
    Differencing,
}

impl DiskType {
    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    /// The type of an on-disk code (0, 1, 5 and 6 are "none" or deprecated).
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }

    /// The `LayerInfo.subformat` name.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// Cylinders, heads, sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors_per_track: u8,
}

impl Geometry {
    /// The number of sectors the geometry addresses.
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    /// The geometry for a disk of `total_sectors`, as the spec's appendix "CHS
    /// Calculation" computes it (it rounds down, so it may address fewer sectors).
    pub fn for_sectors(total_sectors: u64) -> Self {
        let total = total_sectors.min(MAX_CHS_SECTORS);
        let (spt, heads, cyl_times_heads) = if total >= 65_535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17u64;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        // All three fit by construction (total is capped at the maximum geometry).
        Self {
            cylinders: u16::try_from(cyl_times_heads / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors_per_track: u8::try_from(spt).unwrap_or(255),
        }
    }
}

/// A parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Offset of the dynamic header, [`NO_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// The creating application's four-character code.
    pub creator_app: [u8; 4],
    /// `current_size`: the disk size as Hyper-V and Azure read it.
    pub current_size: u64,
    /// The CHS geometry, which Virtual PC used as the disk size.
    pub geometry: Geometry,
    /// The disk type code (checked by the reader, kept raw here).
    pub disk_type_code: u32,
    /// The identity children record as their parent's.
    pub unique_id: [u8; 16],
    /// Set when the disk belongs to a VM in a saved state.
    pub saved_state: bool,
}

impl Footer {
    /// Parses a footer, checking its cookie and checksum.
    pub fn parse(buf: &[u8; FOOTER_SIZE]) -> Result<Self, FooterError> {
        if &buf[at::COOKIE..at::COOKIE + 8] != FOOTER_COOKIE {
            return Err(FooterError::Cookie);
        }
        let stored = be::u32(buf, at::CHECKSUM);
        let computed = checksum(buf, at::CHECKSUM);
        if stored != computed {
            return Err(FooterError::Checksum { stored, computed });
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&buf[at::CREATOR_APP..at::CREATOR_APP + 4]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&buf[at::UNIQUE_ID..at::UNIQUE_ID + 16]);
        Ok(Self {
            data_offset: be::u64(buf, at::DATA_OFFSET),
            timestamp: be::u32(buf, at::TIMESTAMP),
            creator_app,
            current_size: be::u64(buf, at::CURRENT_SIZE),
            geometry: Geometry {
                cylinders: be::u16(buf, at::GEOMETRY),
                heads: buf[at::GEOMETRY + 2],
                sectors_per_track: buf[at::GEOMETRY + 3],
            },
            disk_type_code: be::u32(buf, at::DISK_TYPE),
            unique_id,
            saved_state: buf[at::SAVED_STATE] != 0,
        })
    }

    /// The disk size in bytes, chosen as qemu (10.0, `vpc_open`) does so that our decode
    /// matches `qemu-img convert`: Virtual PC (`vpc `) and old qemu (`qemu`) size the disk
    /// by its CHS geometry, unless the geometry is the maximum (meaning "too big for CHS");
    /// every other creator (Hyper-V `win `, Azure, Disk2vhd, XenServer, qemu's `qem2`) by
    /// `current_size`. Sizes are whole sectors; a `current_size` that is not is rounded
    /// down, as qemu does.
    pub fn disk_size(&self) -> u64 {
        let chs = self.geometry.sectors();
        let uses_chs = matches!(&self.creator_app, b"vpc " | b"qemu");
        if uses_chs && chs != MAX_CHS_SECTORS {
            chs * 512
        } else {
            self.current_size / 512 * 512
        }
    }

    /// Serialises the footer with its checksum (features, version, creator version and
    /// host OS are the constants we write).
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut buf = [0u8; FOOTER_SIZE];
        buf[at::COOKIE..at::COOKIE + 8].copy_from_slice(FOOTER_COOKIE);
        buf[at::FEATURES..at::FEATURES + 4].copy_from_slice(&FEATURES_RESERVED.to_be_bytes());
        buf[at::VERSION..at::VERSION + 4].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        buf[at::DATA_OFFSET..at::DATA_OFFSET + 8].copy_from_slice(&self.data_offset.to_be_bytes());
        buf[at::TIMESTAMP..at::TIMESTAMP + 4].copy_from_slice(&self.timestamp.to_be_bytes());
        buf[at::CREATOR_APP..at::CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        buf[at::CREATOR_VERSION..at::CREATOR_VERSION + 4]
            .copy_from_slice(&CREATOR_VERSION.to_be_bytes());
        buf[at::CREATOR_OS..at::CREATOR_OS + 4].copy_from_slice(CREATOR_OS_WINDOWS);
        buf[at::ORIGINAL_SIZE..at::ORIGINAL_SIZE + 8]
            .copy_from_slice(&self.current_size.to_be_bytes());
        buf[at::CURRENT_SIZE..at::CURRENT_SIZE + 8]
            .copy_from_slice(&self.current_size.to_be_bytes());
        buf[at::GEOMETRY..at::GEOMETRY + 2].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        buf[at::GEOMETRY + 2] = self.geometry.heads;
        buf[at::GEOMETRY + 3] = self.geometry.sectors_per_track;
        buf[at::DISK_TYPE..at::DISK_TYPE + 4].copy_from_slice(&self.disk_type_code.to_be_bytes());
        buf[at::UNIQUE_ID..at::UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        buf[at::SAVED_STATE] = u8::from(self.saved_state);
        let sum = checksum(&buf, at::CHECKSUM);
        buf[at::CHECKSUM..at::CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
        buf
    }
}

/// Creator version we write: 1.0.
pub const CREATOR_VERSION: u32 = 0x0001_0000;
/// Creator host OS we write: `Wi2k`, what every Windows-bound tool writes (the spec's only
/// other value is `Mac `).
pub const CREATOR_OS_WINDOWS: &[u8; 4] = b"Wi2k";

/// Why a footer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FooterError {
    /// No `conectix` cookie.
    Cookie,
    /// The checksum does not match the bytes.
    Checksum {
        /// As stored.
        stored: u32,
        /// As computed.
        computed: u32,
    },
}

impl std::fmt::Display for FooterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FooterError::Cookie => write!(f, "no \"conectix\" cookie"),
            FooterError::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum {stored:#010x} does not match the computed {computed:#010x}"
                )
            }
        }
    }
}

/// The VHD checksum: the one's complement of the byte sum of the structure, its 4-byte
/// checksum field (at `checksum_at`) counted as zero.
pub fn checksum(buf: &[u8], checksum_at: usize) -> u32 {
    let sum = buf.iter().enumerate().fold(0u32, |acc, (i, &b)| {
        if (checksum_at..checksum_at + 4).contains(&i) {
            acc
        } else {
            acc.wrapping_add(u32::from(b))
        }
    });
    !sum
}

/// Seconds since the VHD epoch for a time (0 before it, saturating after 2136).
pub fn vhd_timestamp(time: std::time::SystemTime) -> u32 {
    let unix = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX_SECONDS)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            data_offset: 512,
            timestamp: 0x3299_a049,
            creator_app: *b"qemu",
            current_size: 5_013_504,
            geometry: Geometry {
                cylinders: 144,
                heads: 4,
                sectors_per_track: 17,
            },
            disk_type_code: 3,
            unique_id: [7; 16],
            saved_state: false,
        }
    }

    #[test]
    fn round_trips_and_checks_its_checksum() {
        let bytes = sample().to_bytes();
        assert_eq!(Footer::parse(&bytes).unwrap(), sample());
        let mut bad = bytes;
        bad[100] ^= 1;
        assert!(matches!(
            Footer::parse(&bad),
            Err(FooterError::Checksum { .. })
        ));
        let mut bad = bytes;
        bad[0] = b'C';
        assert_eq!(Footer::parse(&bad), Err(FooterError::Cookie));
    }

    #[test]
    fn checksum_is_the_complemented_byte_sum() {
        let mut buf = [0u8; 16];
        buf[0] = 1;
        buf[1] = 2;
        buf[4] = 0xFF; // inside the checksum field: ignored
        assert_eq!(checksum(&buf, 4), !3u32);
    }

    #[test]
    fn size_follows_qemu_choice_of_chs_or_current_size() {
        let mut f = sample();
        f.current_size = 5_000_000 / 512 * 512 + 512;
        // qemu: CHS (144 * 4 * 17 sectors).
        assert_eq!(f.disk_size(), 9792 * 512);
        f.creator_app = *b"win ";
        assert_eq!(f.disk_size(), f.current_size);
        f.creator_app = *b"qemu";
        f.geometry = Geometry {
            cylinders: 65535,
            heads: 16,
            sectors_per_track: 255,
        };
        assert_eq!(f.disk_size(), f.current_size);
        f.creator_app = *b"rhst";
        f.current_size = 1000;
        assert_eq!(f.disk_size(), 512);
    }

    #[test]
    fn geometry_matches_the_spec_algorithm() {
        // Values qemu-img writes for these sizes (checked with xxd).
        assert_eq!(
            Geometry::for_sectors(9792),
            Geometry {
                cylinders: 144,
                heads: 4,
                sectors_per_track: 17
            }
        );
        let big = Geometry::for_sectors(u64::MAX);
        assert_eq!(big.sectors(), 65_535 * 16 * 255);
        assert_eq!(Geometry::for_sectors(0).sectors(), 0);
    }

    #[test]
    fn timestamps_count_from_2000() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(VHD_EPOCH_UNIX_SECONDS + 5);
        assert_eq!(vhd_timestamp(t), 5);
        assert_eq!(vhd_timestamp(std::time::UNIX_EPOCH), 0);
    }
}
