//! The region table (MS-VHDX 2.2.3): where the BAT and the metadata region are.

use super::guid::{Guid, guid};
use super::header::{CHECKSUM_AT, checksum, seal};
use super::source::Source;
use super::{KIB, MIB};
use crate::error::{Error, Result};
use crate::io::le;

/// Region table signature, "regi".
pub(crate) const REGION_SIGNATURE: &[u8; 4] = b"regi";
/// The two region table copies, at 192 KiB and 256 KiB.
pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// A region table's checksummed size: 64 KiB.
pub(crate) const REGION_TABLE_SIZE: usize = 64 * 1024;
/// Most entries a table may hold (MS-VHDX 2.2.3.1, `EntryCount`).
const MAX_ENTRIES: u32 = 2047;
/// Region GUID of the block allocation table.
pub(crate) const BAT_GUID: Guid = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
/// Region GUID of the metadata region.
pub(crate) const METADATA_GUID: Guid = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
/// `Required` bit of a region entry: a reader that does not know the region must refuse.
const REQUIRED: u32 = 1;

/// A region's place in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    /// File offset (a multiple of 1 MiB, at least 1 MiB).
    pub offset: u64,
    /// Length (a multiple of 1 MiB).
    pub length: u64,
}

impl Region {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// The regions a reader needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Regions {
    /// The block allocation table.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
}

/// Encodes a region table holding `entries` (GUID, region), every one required.
pub(crate) fn encode(entries: &[(Guid, Region)]) -> Vec<u8> {
    let mut b = vec![0u8; REGION_TABLE_SIZE];
    b[..4].copy_from_slice(REGION_SIGNATURE);
    let count = u32::try_from(entries.len()).unwrap_or(0);
    b[8..12].copy_from_slice(&count.to_le_bytes());
    for (i, (g, r)) in entries.iter().enumerate() {
        let at = 16 + 32 * i;
        b[at..at + 16].copy_from_slice(g);
        b[at + 16..at + 24].copy_from_slice(&r.offset.to_le_bytes());
        let len = u32::try_from(r.length).unwrap_or(u32::MAX);
        b[at + 24..at + 28].copy_from_slice(&len.to_le_bytes());
        b[at + 28..at + 32].copy_from_slice(&REQUIRED.to_le_bytes());
    }
    seal(&mut b);
    b
}

/// Reads the first valid region table copy (the second one if the first is damaged).
pub(crate) fn read(src: &Source, warnings: &mut Vec<String>) -> Result<Regions> {
    let mut first_err = None;
    for at in REGION_TABLE_OFFSETS {
        let buf = src.read_vec(REGION_TABLE_SIZE, at, "VHDX region table")?;
        match parse(src.name(), &buf, at) {
            Ok(r) => {
                if let Some(e) = &first_err {
                    warnings.push(format!("ignored invalid region table: {e}"));
                }
                return Ok(r);
            }
            // An unknown required region is a decision, not damage: the copy says the same.
            Err(e @ Error::Unsupported { .. }) => return Err(e),
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
    }
    Err(first_err.unwrap_or_else(|| {
        Error::corrupt(
            src.name(),
            "VHDX region table",
            REGION_TABLE_OFFSETS[0],
            "no valid copy",
        )
    }))
}

fn parse(name: &str, buf: &[u8], at: u64) -> Result<Regions> {
    let corrupt = |reason: String| Error::corrupt(name, "VHDX region table", at, reason);
    if &buf[..4] != REGION_SIGNATURE {
        return Err(corrupt("no \"regi\" signature".into()));
    }
    let (stored, computed) = (le::u32(buf, CHECKSUM_AT), checksum(buf));
    if stored != computed {
        return Err(corrupt(format!(
            "checksum {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let count = le::u32(buf, 8);
    if count > MAX_ENTRIES {
        return Err(corrupt(format!(
            "{count} entries, at most {MAX_ENTRIES} fit"
        )));
    }
    let (mut bat, mut metadata) = (None, None);
    for i in 0..usize::try_from(count).unwrap_or(0) {
        let e = 16 + 32 * i;
        let mut id = [0u8; 16];
        id.copy_from_slice(&buf[e..e + 16]);
        let region = Region {
            offset: le::u64(buf, e + 16),
            length: u64::from(le::u32(buf, e + 24)),
        };
        let required = le::u32(buf, e + 28) & REQUIRED != 0;
        let slot = if id == BAT_GUID {
            &mut bat
        } else if id == METADATA_GUID {
            &mut metadata
        } else if required {
            return Err(Error::unsupported(
                name,
                format!("VHDX region {} marked required", super::guid::format(&id)),
            ));
        } else {
            continue;
        };
        if region.offset < MIB
            || region.offset % MIB != 0
            || region.length % MIB != 0
            || region.length == 0
        {
            return Err(corrupt(format!(
                "region {} at {} of {} bytes is not 1 MiB-aligned past the headers",
                super::guid::format(&id),
                region.offset,
                region.length
            )));
        }
        if slot.replace(region).is_some() {
            return Err(corrupt(format!(
                "region {} listed twice",
                super::guid::format(&id)
            )));
        }
    }
    let (Some(bat), Some(metadata)) = (bat, metadata) else {
        return Err(corrupt("the BAT or metadata region is missing".into()));
    };
    if bat.offset < metadata.end() && metadata.offset < bat.end() {
        return Err(corrupt("the BAT and metadata regions overlap".into()));
    }
    Ok(Regions { bat, metadata })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::io::ImageFile;

    fn src_with(tables: [Vec<u8>; 2]) -> Source {
        let mut b = vec![0u8; 320 * 1024];
        b[192 * 1024..256 * 1024].copy_from_slice(&tables[0]);
        b[256 * 1024..320 * 1024].copy_from_slice(&tables[1]);
        Source::plain(ImageFile::from_bytes("t.vhdx", b))
    }

    fn good() -> Vec<u8> {
        encode(&[
            (
                BAT_GUID,
                Region {
                    offset: 3 * MIB,
                    length: MIB,
                },
            ),
            (
                METADATA_GUID,
                Region {
                    offset: 2 * MIB,
                    length: MIB,
                },
            ),
        ])
    }

    #[test]
    fn reads_and_falls_back_to_the_second_copy() {
        let r = read(&src_with([good(), good()]), &mut Vec::new()).unwrap();
        assert_eq!(r.bat.offset, 3 * MIB);
        assert_eq!(r.metadata.offset, 2 * MIB);
        let mut bad = good();
        bad[20] ^= 1;
        let mut w = Vec::new();
        read(&src_with([bad.clone(), good()]), &mut w).unwrap();
        assert_eq!(w.len(), 1);
        let err = read(&src_with([bad.clone(), bad]), &mut w).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    structure: "VHDX region table",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn refuses_unknown_required_regions_and_overlaps() {
        let unknown = encode(&[
            (
                BAT_GUID,
                Region {
                    offset: 3 * MIB,
                    length: MIB,
                },
            ),
            (
                METADATA_GUID,
                Region {
                    offset: 2 * MIB,
                    length: MIB,
                },
            ),
            (
                [7; 16],
                Region {
                    offset: 4 * MIB,
                    length: MIB,
                },
            ),
        ]);
        let err = read(&src_with([unknown.clone(), unknown]), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
        let overlap = encode(&[
            (
                BAT_GUID,
                Region {
                    offset: 2 * MIB,
                    length: 2 * MIB,
                },
            ),
            (
                METADATA_GUID,
                Region {
                    offset: 3 * MIB,
                    length: MIB,
                },
            ),
        ]);
        let err = read(&src_with([overlap.clone(), overlap]), &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
    }
}
