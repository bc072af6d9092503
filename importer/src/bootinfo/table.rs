//! MBR and GPT partition tables, as far as finding an ESP needs: entries with their type
//! and byte range, the GPT headers checked by their CRC-32s.

use std::fmt;
use std::ops::Range;

use super::{DiskBytes, read_exact};
use crate::Result;

/// Sector size assumed for the tables. EBS volumes present 512-byte logical sectors, and
/// images meant for them are partitioned that way.
pub const SECTOR_BYTES: u64 = 512;

/// MBR partition type of an EFI System Partition.
const MBR_TYPE_ESP: u8 = 0xEF;
/// MBR partition type of the protective entry in front of a GPT.
const MBR_TYPE_PROTECTIVE: u8 = 0xEE;
/// "EFI PART", the GPT header signature.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Smallest GPT header (UEFI 2.x, up to the entries' CRC).
const GPT_HEADER_MIN_BYTES: u32 = 92;
/// The spec only allows entries of 128 × 2^n bytes; 4 KiB covers any tool's choice.
const GPT_ENTRY_MAX_BYTES: u32 = 4096;
/// Tools write 128 entries; the cap bounds the work a hostile header can ask for.
const GPT_MAX_ENTRIES: u32 = 1024;

/// A GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Builds a GUID from its textual fields (`AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE`).
    pub const fn from_fields(a: u32, b: u16, c: u16, d: u16, e: u64) -> Self {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        let d = d.to_be_bytes();
        let e = e.to_be_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], e[2], e[3], e[4], e[5],
            e[6], e[7],
        ])
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            g[3],
            g[2],
            g[1],
            g[0],
            g[5],
            g[4],
            g[7],
            g[6],
            g[8],
            g[9],
            g[10],
            g[11],
            g[12],
            g[13],
            g[14],
            g[15]
        )
    }
}

/// GPT type of the EFI System Partition.
pub const GPT_TYPE_ESP: Guid =
    Guid::from_fields(0xC12A_7328, 0xF81F, 0x11D2, 0xBA4B, 0x00A0_C93E_C93B);
/// GPT type of a BIOS boot partition (GRUB's core image on a GPT disk booted by BIOS).
pub const GPT_TYPE_BIOS_BOOT: Guid =
    Guid::from_fields(0x2168_6148, 0x6449, 0x6E6F, 0x744E, 0x6565_6445_4649);

/// What a partition entry says its partition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionType {
    /// An MBR type byte.
    Mbr(u8),
    /// A GPT type GUID.
    Gpt(Guid),
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its type.
    pub kind: PartitionType,
    /// First sector.
    pub first_lba: u64,
    /// Number of sectors.
    pub sectors: u64,
}

impl Partition {
    /// Bytes of the disk this partition covers.
    pub fn byte_range(&self) -> Range<u64> {
        let start = self.first_lba.saturating_mul(SECTOR_BYTES);
        start..start.saturating_add(self.sectors.saturating_mul(SECTOR_BYTES))
    }

    /// Whether this is an EFI System Partition.
    pub fn is_esp(&self) -> bool {
        matches!(self.kind, PartitionType::Mbr(MBR_TYPE_ESP))
            || self.kind == PartitionType::Gpt(GPT_TYPE_ESP)
    }

    /// Whether this is a GPT BIOS boot partition.
    pub fn is_bios_boot(&self) -> bool {
        self.kind == PartitionType::Gpt(GPT_TYPE_BIOS_BOOT)
    }
}

/// The partition table of a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionTable {
    /// No valid table (a bare file system, a blank disk, or a table too damaged to trust).
    None,
    /// A classic MBR with its primary partitions.
    Mbr(Vec<Partition>),
    /// A GPT (from the primary header, else the backup) with its used entries.
    Gpt(Vec<Partition>),
}

impl PartitionTable {
    /// The partitions, in table order.
    pub fn partitions(&self) -> &[Partition] {
        match self {
            PartitionTable::None => &[],
            PartitionTable::Mbr(p) | PartitionTable::Gpt(p) => p,
        }
    }

    /// The first EFI System Partition.
    pub fn esp(&self) -> Option<&Partition> {
        self.partitions().iter().find(|p| p.is_esp())
    }

    /// Short name for reports: `gpt`, `mbr` or `none`.
    pub fn name(&self) -> &'static str {
        match self {
            PartitionTable::None => "none",
            PartitionTable::Mbr(_) => "mbr",
            PartitionTable::Gpt(_) => "gpt",
        }
    }
}

/// Reads the partition table: a GPT behind a protective MBR (primary header, else the
/// backup at the disk's end), else the MBR's primary partitions.
pub fn read(disk: &dyn DiskBytes) -> Result<PartitionTable> {
    let Some(mbr) = read_exact(disk, 0, SECTOR_BYTES)? else {
        return Ok(PartitionTable::None);
    };
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(PartitionTable::None);
    }
    let primaries = mbr_partitions(&mbr);
    if primaries
        .iter()
        .any(|p| p.kind == PartitionType::Mbr(MBR_TYPE_PROTECTIVE))
    {
        if let Some(entries) = read_gpt(disk, 1)? {
            return Ok(PartitionTable::Gpt(entries));
        }
        let last_lba = (disk.size_bytes() / SECTOR_BYTES).saturating_sub(1);
        if let Some(entries) = read_gpt(disk, last_lba)? {
            tracing::warn!("the primary GPT header is damaged; using the backup at LBA {last_lba}");
            return Ok(PartitionTable::Gpt(entries));
        }
        tracing::warn!("a protective MBR but no valid GPT header: reading the MBR alone");
    }
    let real: Vec<Partition> = primaries
        .into_iter()
        .filter(|p| p.kind != PartitionType::Mbr(MBR_TYPE_PROTECTIVE))
        .collect();
    Ok(if real.is_empty() {
        PartitionTable::None
    } else {
        PartitionTable::Mbr(real)
    })
}

/// The four primary entries of an MBR that are in use.
fn mbr_partitions(mbr: &[u8]) -> Vec<Partition> {
    (0..4)
        .filter_map(|i| {
            let e = &mbr[446 + i * 16..446 + (i + 1) * 16];
            let kind = e[4];
            let first_lba = u64::from(le_u32(e, 8));
            let sectors = u64::from(le_u32(e, 12));
            (kind != 0 && sectors != 0).then_some(Partition {
                kind: PartitionType::Mbr(kind),
                first_lba,
                sectors,
            })
        })
        .collect()
}

/// The used entries of the GPT whose header is at `header_lba`, or `None` if that header
/// or its entry array fails its checks.
fn read_gpt(disk: &dyn DiskBytes, header_lba: u64) -> Result<Option<Vec<Partition>>> {
    let Some(mut header) = read_exact(disk, header_lba.saturating_mul(SECTOR_BYTES), SECTOR_BYTES)?
    else {
        return Ok(None);
    };
    if &header[..8] != GPT_SIGNATURE {
        return Ok(None);
    }
    let header_size = le_u32(&header, 12);
    if !(GPT_HEADER_MIN_BYTES..=512).contains(&header_size) {
        return Ok(None);
    }
    let stored_crc = le_u32(&header, 16);
    header[16..20].fill(0);
    let header_size = header_size as usize;
    if crc32(&header[..header_size]) != stored_crc {
        return Ok(None);
    }
    let my_lba = le_u64(&header, 24);
    let entries_lba = le_u64(&header, 72);
    let entry_count = le_u32(&header, 80);
    let entry_bytes = le_u32(&header, 84);
    let entries_crc = le_u32(&header, 88);
    if my_lba != header_lba
        || entry_count > GPT_MAX_ENTRIES
        || !(128..=GPT_ENTRY_MAX_BYTES).contains(&entry_bytes)
        || !entry_bytes.is_power_of_two()
    {
        return Ok(None);
    }
    let array_bytes = u64::from(entry_count) * u64::from(entry_bytes);
    let Some(array) = read_exact(disk, entries_lba.saturating_mul(SECTOR_BYTES), array_bytes)?
    else {
        return Ok(None);
    };
    if crc32(&array) != entries_crc {
        return Ok(None);
    }
    let disk_sectors = disk.size_bytes() / SECTOR_BYTES;
    let partitions = array
        .chunks_exact(entry_bytes as usize)
        .filter_map(|e| {
            let mut kind = [0u8; 16];
            kind.copy_from_slice(&e[..16]);
            let first_lba = le_u64(e, 32);
            let last_lba = le_u64(e, 40);
            // Unused entries have a zero type; entries past the disk's end are garbage.
            (kind != [0; 16] && first_lba <= last_lba && last_lba < disk_sectors).then_some(
                Partition {
                    kind: PartitionType::Gpt(Guid(kind)),
                    first_lba,
                    sectors: last_lba - first_lba + 1,
                },
            )
        })
        .collect();
    Ok(Some(partitions))
}

pub(super) fn le_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

pub(super) fn le_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn le_u64(buf: &[u8], at: usize) -> u64 {
    u64::from(le_u32(buf, at)) | (u64::from(le_u32(buf, at + 4)) << 32)
}

/// CRC-32 (IEEE 802.3, reflected, as GPT uses). Bitwise: it runs over at most a few
/// hundred KiB per disk, where a table or a crate would buy nothing.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn guids_print_as_written() {
        assert_eq!(
            format!("{GPT_TYPE_ESP:?}"),
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
        );
        assert_eq!(
            format!("{GPT_TYPE_BIOS_BOOT:?}"),
            "21686148-6449-6E6F-744E-656564454649"
        );
        assert_eq!(&GPT_TYPE_ESP.0[..4], &[0x28, 0x73, 0x2A, 0xC1]);
    }
}
