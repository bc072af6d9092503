//! The metadata region (MS-VHDX 2.6): block size, virtual size, sector sizes and, for a
//! differencing image, the parent locator.

use super::guid::{Guid, guid};
use super::region::Region;
use super::source::Source;
use super::{KIB, MAX_VIRTUAL_SIZE, MIB};
use crate::error::{Error, Result};
use crate::io::le;

/// Metadata table signature, "metadata" (MS-VHDX 2.6.1.1).
pub(crate) const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
/// The table's size at the start of the region; items live after it.
pub(crate) const TABLE_SIZE: usize = 64 * 1024;
/// Most entries a table may hold (MS-VHDX 2.6.1.1, `EntryCount`).
const MAX_ENTRIES: u16 = 2047;
/// An item is at most 1 MiB (MS-VHDX 2.6.1.2, `Length`).
const MAX_ITEM: u32 = 1 << 20;
/// Item entry flag bits (MS-VHDX 2.6.1.2).
pub(crate) const IS_VIRTUAL_DISK: u32 = 2;
/// The reader must understand the item to open the file.
pub(crate) const IS_REQUIRED: u32 = 4;

/// Item GUIDs (MS-VHDX 2.6.2).
pub(crate) const FILE_PARAMETERS: Guid = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
/// Virtual Disk Size item.
pub(crate) const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
/// Page 83 Data item (the disk's SCSI identity).
pub(crate) const PAGE_83_DATA: Guid = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
/// Logical Sector Size item.
pub(crate) const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
/// Physical Sector Size item.
pub(crate) const PHYSICAL_SECTOR_SIZE: Guid = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
/// Parent Locator item.
pub(crate) const PARENT_LOCATOR: Guid = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);
/// Locator type of a VHDX parent (MS-VHDX 2.6.2.6.1).
pub(crate) const VHDX_PARENT_LOCATOR_TYPE: Guid = guid(
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
);

/// File Parameters flag: blocks stay allocated (a fixed image).
pub(crate) const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File Parameters flag: a differencing image.
pub(crate) const HAS_PARENT: u32 = 2;

/// What the metadata region says.
#[derive(Debug, Clone)]
pub(crate) struct Metadata {
    /// Payload block size.
    pub block_size: u64,
    /// Set on fixed images.
    pub leave_blocks_allocated: bool,
    /// Set on differencing images.
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// 512 or 4096.
    pub logical_sector_size: u64,
    /// Parent locator key/value pairs of a differencing image.
    pub parent_locator: Vec<(String, String)>,
}

/// One item to encode: its GUID, flags and bytes.
pub(crate) type Item = (Guid, u32, Vec<u8>);

/// Encodes a metadata region of `length` bytes holding `items` one after another past
/// the table.
pub(crate) fn encode(items: &[Item], length: usize) -> Vec<u8> {
    let mut b = vec![0u8; length.max(TABLE_SIZE)];
    b[..8].copy_from_slice(METADATA_SIGNATURE);
    let count = u16::try_from(items.len()).unwrap_or(0);
    b[10..12].copy_from_slice(&count.to_le_bytes());
    let mut pos = TABLE_SIZE;
    for (i, (id, flags, data)) in items.iter().enumerate() {
        let e = 32 + 32 * i;
        b[e..e + 16].copy_from_slice(id);
        let (off, len) = (
            u32::try_from(pos).unwrap_or(0),
            u32::try_from(data.len()).unwrap_or(0),
        );
        b[e + 16..e + 20].copy_from_slice(&off.to_le_bytes());
        b[e + 20..e + 24].copy_from_slice(&len.to_le_bytes());
        b[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        if pos + data.len() <= b.len() {
            b[pos..pos + data.len()].copy_from_slice(data);
        }
        pos += data.len();
    }
    b
}

#[cfg(test)]
/// Encodes a VHDX parent locator item from key/value pairs (UTF-16LE strings).
pub(crate) fn encode_parent_locator(pairs: &[(&str, &str)]) -> Vec<u8> {
    let utf16 = |s: &str| {
        s.encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect::<Vec<u8>>()
    };
    let mut b = Vec::new();
    b.extend_from_slice(&VHDX_PARENT_LOCATOR_TYPE);
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&u16::try_from(pairs.len()).unwrap_or(0).to_le_bytes());
    let mut strings = Vec::new();
    let mut pos = 20 + 12 * pairs.len();
    for (k, v) in pairs {
        let (k, v) = (utf16(k), utf16(v));
        let (ko, vo) = (pos, pos + k.len());
        pos += k.len() + v.len();
        for x in [ko, vo] {
            b.extend_from_slice(&u32::try_from(x).unwrap_or(0).to_le_bytes());
        }
        for x in [k.len(), v.len()] {
            b.extend_from_slice(&u16::try_from(x).unwrap_or(0).to_le_bytes());
        }
        strings.extend(k);
        strings.extend(v);
    }
    b.extend(strings);
    b
}

/// Reads and validates the metadata region.
pub(crate) fn read(src: &Source, region: Region) -> Result<Metadata> {
    let name = src.name();
    let table_at = region.offset;
    let corrupt = |reason: String| Error::corrupt(name, "VHDX metadata table", table_at, reason);
    if region.length < TABLE_SIZE as u64 {
        return Err(corrupt(
            "the metadata region is smaller than its table".into(),
        ));
    }
    let table = src.read_vec(TABLE_SIZE, table_at, "VHDX metadata table")?;
    if &table[..8] != METADATA_SIGNATURE {
        return Err(corrupt("no \"metadata\" signature".into()));
    }
    let count = le::u16(&table, 10);
    if count > MAX_ENTRIES {
        return Err(corrupt(format!(
            "{count} entries, at most {MAX_ENTRIES} fit"
        )));
    }
    let mut found: Vec<(Guid, Vec<u8>)> = Vec::new();
    for i in 0..usize::from(count) {
        let e = 32 + 32 * i;
        let mut id = [0u8; 16];
        id.copy_from_slice(&table[e..e + 16]);
        let (offset, length, flags) = (
            le::u32(&table, e + 16),
            le::u32(&table, e + 20),
            le::u32(&table, e + 24),
        );
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE_83_DATA,
            LOGICAL_SECTOR_SIZE,
            PHYSICAL_SECTOR_SIZE,
            PARENT_LOCATOR,
        ];
        if !known.contains(&id) {
            if flags & IS_REQUIRED != 0 {
                return Err(Error::unsupported(
                    name,
                    format!(
                        "VHDX metadata item {} marked required",
                        super::guid::format(&id)
                    ),
                ));
            }
            continue;
        }
        let item_end = u64::from(offset) + u64::from(length);
        if length > MAX_ITEM
            || (length > 0 && u64::from(offset) < TABLE_SIZE as u64)
            || item_end > region.length
        {
            return Err(Error::corrupt(
                name,
                "VHDX metadata item",
                table_at + e as u64,
                format!(
                    "item {} at {offset} of {length} bytes lies outside the {}-byte region",
                    super::guid::format(&id),
                    region.length
                ),
            ));
        }
        if found.iter().any(|(g, _)| *g == id) {
            return Err(corrupt(format!(
                "item {} listed twice",
                super::guid::format(&id)
            )));
        }
        let len = usize::try_from(length).unwrap_or(0);
        found.push((
            id,
            src.read_vec(len, region.offset + u64::from(offset), "VHDX metadata item")?,
        ));
    }
    let item = |id: Guid, what: &str, len: usize| -> Result<&[u8]> {
        match found.iter().find(|(g, _)| *g == id) {
            Some((_, d)) if d.len() >= len => Ok(d),
            Some(_) => Err(corrupt(format!(
                "the {what} item is shorter than {len} bytes"
            ))),
            None => Err(corrupt(format!("the required {what} item is missing"))),
        }
    };
    let params = item(FILE_PARAMETERS, "File Parameters", 8)?;
    let (block_size, flags) = (u64::from(le::u32(params, 0)), le::u32(params, 4));
    let virtual_size = le::u64(item(VIRTUAL_DISK_SIZE, "Virtual Disk Size", 8)?, 0);
    let logical_sector_size = u64::from(le::u32(
        item(LOGICAL_SECTOR_SIZE, "Logical Sector Size", 4)?,
        0,
    ));
    let physical = le::u32(item(PHYSICAL_SECTOR_SIZE, "Physical Sector Size", 4)?, 0);
    item(PAGE_83_DATA, "Page 83 Data", 16)?;
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(corrupt(format!(
            "block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    if logical_sector_size != 512 && logical_sector_size != 4 * KIB {
        return Err(corrupt(format!(
            "logical sector size {logical_sector_size} is neither 512 nor 4096"
        )));
    }
    if physical != 512 && physical != 4096 {
        return Err(corrupt(format!(
            "physical sector size {physical} is neither 512 nor 4096"
        )));
    }
    if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % logical_sector_size != 0 {
        return Err(corrupt(format!(
            "virtual size {virtual_size} is over 64 TiB or not a multiple of the {logical_sector_size}-byte sector"
        )));
    }
    let has_parent = flags & HAS_PARENT != 0;
    let parent_locator = if has_parent {
        parse_parent_locator(name, item(PARENT_LOCATOR, "Parent Locator", 20)?, table_at)?
    } else {
        Vec::new()
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & LEAVE_BLOCKS_ALLOCATED != 0,
        has_parent,
        virtual_size,
        logical_sector_size,
        parent_locator,
    })
}

fn parse_parent_locator(name: &str, item: &[u8], table_at: u64) -> Result<Vec<(String, String)>> {
    let corrupt = |reason: String| Error::corrupt(name, "VHDX parent locator", table_at, reason);
    if item[..16] != VHDX_PARENT_LOCATOR_TYPE {
        return Err(Error::unsupported(
            name,
            format!(
                "parent locator type {}",
                super::guid::format(&guid_of(item))
            ),
        ));
    }
    let count = usize::from(le::u16(item, 18));
    if 20 + 12 * count > item.len() {
        return Err(corrupt(format!(
            "{count} entries do not fit in {} bytes",
            item.len()
        )));
    }
    let text = |off: u32, len: u16| -> Result<String> {
        let start = usize::try_from(off).unwrap_or(usize::MAX);
        let bytes = start
            .checked_add(usize::from(len))
            .and_then(|end| item.get(start..end))
            .filter(|b| b.len() % 2 == 0)
            .ok_or_else(|| {
                corrupt(format!(
                    "string at {off} of {len} bytes is outside the item or odd"
                ))
            })?;
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).map_err(|_| corrupt(format!("string at {off} is not UTF-16")))
    };
    (0..count)
        .map(|i| {
            let e = 20 + 12 * i;
            Ok((
                text(le::u32(item, e), le::u16(item, e + 8))?,
                text(le::u32(item, e + 4), le::u16(item, e + 10))?,
            ))
        })
        .collect()
}

fn guid_of(b: &[u8]) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[..16]);
    g
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::io::ImageFile;

    fn items(block: u32, size: u64) -> Vec<Item> {
        vec![
            (
                FILE_PARAMETERS,
                IS_REQUIRED,
                [block.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            ),
            (
                VIRTUAL_DISK_SIZE,
                IS_REQUIRED | IS_VIRTUAL_DISK,
                size.to_le_bytes().to_vec(),
            ),
            (PAGE_83_DATA, IS_REQUIRED | IS_VIRTUAL_DISK, vec![3; 16]),
            (
                LOGICAL_SECTOR_SIZE,
                IS_REQUIRED | IS_VIRTUAL_DISK,
                512u32.to_le_bytes().to_vec(),
            ),
            (
                PHYSICAL_SECTOR_SIZE,
                IS_REQUIRED | IS_VIRTUAL_DISK,
                4096u32.to_le_bytes().to_vec(),
            ),
        ]
    }

    fn read_items(items: &[Item]) -> Result<Metadata> {
        let region = encode(items, 1 << 20);
        read(
            &Source::plain(ImageFile::from_bytes("m", region)),
            Region {
                offset: 0,
                length: MIB,
            },
        )
    }

    #[test]
    fn reads_what_it_encodes() {
        let m = read_items(&items(1 << 25, 7 << 20)).unwrap();
        assert_eq!(m.block_size, 1 << 25);
        assert_eq!(m.virtual_size, 7 << 20);
        assert!(!m.has_parent);
    }

    #[test]
    fn rejects_lying_values() {
        let err = read_items(&items(3 << 20, 7 << 20)).unwrap_err();
        assert!(err.to_string().contains("block size"), "{err}");
        let err = read_items(&items(1 << 20, 1 << 60)).unwrap_err();
        assert!(err.to_string().contains("virtual size"), "{err}");
        let mut unknown = items(1 << 20, 1 << 20);
        unknown.push(([9; 16], IS_REQUIRED, vec![1]));
        assert!(matches!(
            read_items(&unknown).unwrap_err(),
            Error::Unsupported { .. }
        ));
        // An item whose offset points past the region's end.
        let mut region = encode(&items(1 << 20, 1 << 20), 1 << 20);
        region[32 + 16..32 + 20].copy_from_slice(&(2u32 << 20).to_le_bytes());
        let err = read(
            &Source::plain(ImageFile::from_bytes("m", region)),
            Region {
                offset: 0,
                length: MIB,
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    structure: "VHDX metadata item",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn parent_locator_round_trips_and_bounds_are_checked() {
        let loc =
            encode_parent_locator(&[("parent_linkage", "{X}"), ("relative_path", "..\\p.vhdx")]);
        let pairs = parse_parent_locator("m", &loc, 0).unwrap();
        assert_eq!(
            pairs[1],
            ("relative_path".to_owned(), "..\\p.vhdx".to_owned())
        );
        let mut bad = loc.clone();
        bad[20..24].copy_from_slice(&5000u32.to_le_bytes());
        assert!(matches!(
            parse_parent_locator("m", &bad, 0).unwrap_err(),
            Error::Corrupt { .. }
        ));
    }
}
