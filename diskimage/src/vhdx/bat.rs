//! The block allocation table (MS-VHDX 2.5): one 8-byte entry per payload block, with a
//! sector bitmap entry after every `chunk_ratio` payload entries.

use super::MIB;
use super::metadata::Metadata;
use super::region::Region;
use super::source::Source;
use crate::error::{Error, Result};
use crate::io::le;

/// 2^23: how many sectors one 1 MiB sector bitmap block describes (MS-VHDX 2.5).
const SECTORS_PER_BITMAP: u64 = 1 << 23;
/// Size of one sector bitmap block.
pub(crate) const BITMAP_BLOCK_SIZE: u64 = MIB;
/// A BAT up to this size is read whole at open (and every entry checked); a larger one is
/// read in pieces per call so memory stays bounded whatever the virtual size.
const CACHE_LIMIT: u64 = 8 * MIB;
/// Entries read per piece when the BAT is read lazily.
const PIECE_ENTRIES: u64 = 4096;

/// Payload block states (MS-VHDX 2.5.1.1), the entry's low 3 bits.
pub(crate) const PAYLOAD_BLOCK_NOT_PRESENT: u64 = 0;
/// Content undefined: reads as zero in a base image.
pub(crate) const PAYLOAD_BLOCK_UNDEFINED: u64 = 1;
/// Explicitly zero.
pub(crate) const PAYLOAD_BLOCK_ZERO: u64 = 2;
/// Unmapped (trimmed): reads as zero.
pub(crate) const PAYLOAD_BLOCK_UNMAPPED: u64 = 3;
/// Stored in the file.
pub(crate) const PAYLOAD_BLOCK_FULLY_PRESENT: u64 = 6;
/// Partly stored, per the chunk's sector bitmap (differencing images only).
pub(crate) const PAYLOAD_BLOCK_PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap block present (MS-VHDX 2.5.1.2).
pub(crate) const SB_BLOCK_PRESENT: u64 = 6;
/// The entry's state bits.
const STATE_MASK: u64 = 7;
/// The file offset is the entry's bits 20..63, in MiB.
const OFFSET_SHIFT: u32 = 20;

/// What an entry says of a payload block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    /// Not stored here (parent's in a differencing image; zero otherwise).
    NotPresent,
    /// Recorded as zero.
    Zero,
    /// Stored at this file offset.
    Present(u64),
    /// Partly stored at this file offset; the sector bitmap says which sectors.
    Partial(u64),
}

/// Sizes derived from the metadata.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Payload block size.
    pub block_size: u64,
    /// Logical sector size.
    pub sector_size: u64,
    /// Payload blocks per sector bitmap block.
    pub chunk_ratio: u64,
    /// Entries the BAT must hold.
    pub entries: u64,
    /// A differencing image.
    pub has_parent: bool,
}

impl Geometry {
    /// Derives the BAT's shape (MS-VHDX 2.5: chunk ratio, entry counts).
    pub(crate) fn new(
        block_size: u64,
        sector_size: u64,
        virtual_size: u64,
        has_parent: bool,
    ) -> Self {
        let chunk_ratio = (SECTORS_PER_BITMAP * sector_size / block_size).max(1);
        let data_blocks = virtual_size.div_ceil(block_size);
        let entries = if has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
        };
        Self {
            block_size,
            sector_size,
            chunk_ratio,
            entries,
            has_parent,
        }
    }

    /// From validated metadata.
    pub(crate) fn of(m: &Metadata) -> Self {
        Self::new(
            m.block_size,
            m.logical_sector_size,
            m.virtual_size,
            m.has_parent,
        )
    }

    /// The BAT index of payload block `block`.
    pub(crate) fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// The BAT index of the sector bitmap entry of the chunk holding `block`.
    pub(crate) fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }
}

/// The BAT of an opened image.
#[derive(Debug)]
pub(crate) struct Bat {
    offset: u64,
    geometry: Geometry,
    cache: Option<Vec<u64>>,
    /// The regions no block may overlap (BAT, metadata, log), as `[start, end)`.
    reserved: Vec<(u64, u64)>,
}

impl Bat {
    /// Checks the region can hold the entries and, for a small BAT, reads and checks them all.
    pub(crate) fn open(
        src: &Source,
        region: Region,
        geometry: Geometry,
        others: &[Region],
    ) -> Result<Self> {
        let bytes = geometry.entries.saturating_mul(8);
        if bytes > region.length {
            return Err(Error::corrupt(
                src.name(),
                "VHDX BAT",
                region.offset,
                format!(
                    "{} entries need {bytes} bytes, the region has {}",
                    geometry.entries, region.length
                ),
            ));
        }
        if region.offset.saturating_add(bytes) > src.len() {
            return Err(Error::Truncated {
                file: src.name().to_owned(),
                structure: "VHDX BAT",
                offset: region.offset,
                needed: bytes,
                file_len: src.len(),
            });
        }
        let mut bat = Self {
            offset: region.offset,
            geometry,
            cache: None,
            reserved: std::iter::once(&region)
                .chain(others)
                .map(|r| (r.offset, r.offset.saturating_add(r.length)))
                .collect(),
        };
        if bytes <= CACHE_LIMIT {
            let raw = src.read_vec(
                usize::try_from(bytes).unwrap_or(0),
                region.offset,
                "VHDX BAT",
            )?;
            let entries: Vec<u64> = raw.chunks_exact(8).map(|c| le::u64(c, 0)).collect();
            bat.cache = Some(entries);
            bat.check_all(src)?;
        }
        Ok(bat)
    }

    fn check_all(&self, src: &Source) -> Result<()> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        let g = self.geometry;
        for (i, &raw) in cache.iter().enumerate() {
            let index = i as u64;
            if (index + 1) % (g.chunk_ratio + 1) == 0 {
                self.bitmap(src, index, raw)?;
            } else {
                self.decode(src, index, raw)?;
            }
        }
        Ok(())
    }

    /// A reader of entries that fetches the BAT in pieces, reading ahead no further than
    /// the entry of `last_block` (so a small read does not fetch a whole piece).
    pub(crate) fn cursor<'a>(&'a self, src: &'a Source, last_block: u64) -> Cursor<'a> {
        let limit = self.geometry.payload_index(last_block).saturating_add(1);
        Cursor {
            bat: self,
            src,
            first: 0,
            piece: Vec::new(),
            limit,
        }
    }

    fn entry_offset(&self, index: u64) -> u64 {
        self.offset + index * 8
    }

    fn corrupt(&self, src: &Source, index: u64, reason: String) -> Error {
        Error::corrupt(
            src.name(),
            "VHDX BAT entry",
            self.entry_offset(index),
            reason,
        )
    }

    /// Decodes payload entry `index` and checks where it points.
    pub(crate) fn decode(&self, src: &Source, index: u64, raw: u64) -> Result<Block> {
        let offset = (raw >> OFFSET_SHIFT) << OFFSET_SHIFT;
        let state = raw & STATE_MASK;
        let stored = |off: u64| -> Result<u64> {
            if off < MIB || off.saturating_add(self.geometry.block_size) > src.len() {
                return Err(self.corrupt(
                    src,
                    index,
                    format!(
                        "payload block at {off} lies outside the file of {} bytes",
                        src.len()
                    ),
                ));
            }
            self.check_overlap(src, index, off, self.geometry.block_size)?;
            Ok(off)
        };
        match state {
            PAYLOAD_BLOCK_NOT_PRESENT | PAYLOAD_BLOCK_UNDEFINED => Ok(Block::NotPresent),
            PAYLOAD_BLOCK_ZERO | PAYLOAD_BLOCK_UNMAPPED => Ok(Block::Zero),
            PAYLOAD_BLOCK_FULLY_PRESENT => Ok(Block::Present(stored(offset)?)),
            PAYLOAD_BLOCK_PARTIALLY_PRESENT if self.geometry.has_parent => {
                Ok(Block::Partial(stored(offset)?))
            }
            _ => Err(self.corrupt(src, index, format!("invalid payload block state {state}"))),
        }
    }

    /// Refuses a block or bitmap placed over the BAT, the metadata or the log: reading
    /// it would return table bytes as disk content.
    fn check_overlap(&self, src: &Source, index: u64, off: u64, len: u64) -> Result<()> {
        let end = off.saturating_add(len);
        if self
            .reserved
            .iter()
            .any(|&(s, e)| s < e && off < e && s < end)
        {
            return Err(self.corrupt(
                src,
                index,
                format!("block at {off} overlaps the BAT, metadata or log region"),
            ));
        }
        Ok(())
    }

    /// Decodes sector bitmap entry `index`: the bitmap block's offset if present.
    pub(crate) fn bitmap(&self, src: &Source, index: u64, raw: u64) -> Result<Option<u64>> {
        let offset = (raw >> OFFSET_SHIFT) << OFFSET_SHIFT;
        match raw & STATE_MASK {
            PAYLOAD_BLOCK_NOT_PRESENT => Ok(None),
            SB_BLOCK_PRESENT
                if offset >= MIB && offset.saturating_add(BITMAP_BLOCK_SIZE) <= src.len() =>
            {
                self.check_overlap(src, index, offset, BITMAP_BLOCK_SIZE)?;
                Ok(Some(offset))
            }
            SB_BLOCK_PRESENT => Err(self.corrupt(
                src,
                index,
                format!("sector bitmap at {offset} lies outside the file"),
            )),
            state => Err(self.corrupt(src, index, format!("invalid sector bitmap state {state}"))),
        }
    }
}

/// Reads BAT entries, a piece at a time when the BAT is not cached.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    bat: &'a Bat,
    src: &'a Source,
    first: u64,
    piece: Vec<u64>,
    limit: u64,
}

impl Cursor<'_> {
    /// The raw entry at `index` (which the geometry keeps below the entry count).
    pub(crate) fn raw(&mut self, index: u64) -> Result<u64> {
        if index >= self.bat.geometry.entries {
            return Err(self
                .bat
                .corrupt(self.src, index, "entry index past the table".into()));
        }
        if let Some(cache) = &self.bat.cache {
            return cache
                .get(usize::try_from(index).unwrap_or(usize::MAX))
                .copied()
                .ok_or_else(|| {
                    self.bat
                        .corrupt(self.src, index, "entry index past the table".into())
                });
        }
        let in_piece = index
            .checked_sub(self.first)
            .filter(|&i| i < self.piece.len() as u64);
        if let Some(i) = in_piece {
            return Ok(self.piece[usize::try_from(i).unwrap_or(0)]);
        }
        let wanted = self.limit.saturating_sub(index).max(1);
        let count = PIECE_ENTRIES
            .min(self.bat.geometry.entries - index)
            .min(wanted);
        let raw = self.src.read_vec(
            usize::try_from(count * 8).unwrap_or(0),
            self.bat.entry_offset(index),
            "VHDX BAT",
        )?;
        self.piece = raw.chunks_exact(8).map(|c| le::u64(c, 0)).collect();
        self.first = index;
        Ok(self.piece.first().copied().unwrap_or(0))
    }

    /// What the entry of payload block `block` says.
    pub(crate) fn block(&mut self, block: u64) -> Result<Block> {
        let index = self.bat.geometry.payload_index(block);
        let raw = self.raw(index)?;
        self.bat.decode(self.src, index, raw)
    }

    /// The file offset of the sector bitmap of `block`'s chunk.
    pub(crate) fn bitmap_of(&mut self, block: u64) -> Result<u64> {
        let index = self.bat.geometry.bitmap_index(block);
        let raw = self.raw(index)?;
        self.bat.bitmap(self.src, index, raw)?.ok_or_else(|| {
            self.bat.corrupt(
                self.src,
                index,
                format!("block {block} is partially present but its sector bitmap is not"),
            )
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn geometry_follows_the_spec() {
        // 32 MiB blocks, 512-byte sectors: chunk ratio 2^23 * 512 / 2^25 = 128.
        let g = Geometry::new(32 * MIB, 512, 300 * 32 * MIB, false);
        assert_eq!(g.chunk_ratio, 128);
        assert_eq!(g.entries, 300 + 2);
        assert_eq!(g.payload_index(128), 129);
        assert_eq!(g.bitmap_index(5), 128);
        let d = Geometry::new(32 * MIB, 512, 300 * 32 * MIB, true);
        assert_eq!(d.entries, 3 * 129);
        assert_eq!(Geometry::new(MIB, 4096, 0, false).entries, 0);
    }
}
