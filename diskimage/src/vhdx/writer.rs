//! Writes a dynamic VHDX. Every structure but the BAT is fixed once the virtual size is
//! known, so it is written first; payload blocks are appended at 1 MiB boundaries as data
//! arrives, and each one's BAT entry is written when it is allocated. Nothing grows with
//! the disk in memory.

use std::io::{Seek, SeekFrom, Write};

use rehost_core::Extent;

use super::bat::{Geometry, PAYLOAD_BLOCK_FULLY_PRESENT};
use super::header::{HEADER_OFFSETS, HEADER_VERSION, Header, LOG_VERSION, file_identifier};
use super::metadata::{self, IS_REQUIRED, IS_VIRTUAL_DISK};
use super::region::{self, BAT_GUID, METADATA_GUID, REGION_TABLE_OFFSETS, Region};
use super::{MAX_VIRTUAL_SIZE, MIB, guid};
use crate::error::{Error, Result};
use crate::sink::{ExtentSink, SinkCursor, WriteSummary, is_zero};

/// Where the log goes and how big it is: 1 MiB right after the headers, as qemu and
/// Hyper-V lay it out. We leave it empty (LogGuid zero): the file is written once.
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
/// The metadata region: 1 MiB after the log.
const METADATA_OFFSET: u64 = 2 * MIB;
const METADATA_LENGTH: u64 = MIB;
/// The BAT starts after the metadata region.
const BAT_OFFSET: u64 = 3 * MIB;
/// Logical sector size we write: 512, what every importer and hypervisor accepts.
const LOGICAL_SECTOR: u64 = 512;
/// Physical sector size we advertise: 4096, as Hyper-V does.
const PHYSICAL_SECTOR: u32 = 4096;
/// Within a block, data is checked for zeros in pieces of this size so that zero runs
/// inside an allocated block stay holes in the output file.
const ZERO_CHECK: u64 = 64 * 1024;

/// Writes a dynamic VHDX.
#[derive(Debug)]
pub struct VhdxWriter<W: Write + Seek> {
    out: W,
    cursor: SinkCursor,
    geometry: Geometry,
    /// End of the file: where the next block goes.
    file_end: u64,
    /// One past the last byte written.
    written_end: u64,
    /// The block data is going into and its file offset. Blocks come in disk order, so
    /// only the current one can still receive data.
    current: Option<(u64, u64)>,
    data_bytes: u64,
    name: String,
}

/// The default block size, by disk size. qemu picks 8 MiB up to 1 GiB, 16 MiB up to
/// 100 GiB and 32 MiB above, to keep its in-memory BAT small; we keep the same steps
/// because smaller blocks also waste less space around scattered data, and stop at
/// 32 MiB, Hyper-V's own default.
fn default_block_size(virtual_size: u64) -> u32 {
    if virtual_size <= 1 << 30 {
        8 << 20
    } else if virtual_size <= 100 << 30 {
        16 << 20
    } else {
        32 << 20
    }
}

impl<W: Write + Seek> VhdxWriter<W> {
    /// A writer of a `virtual_size`-byte disk with `block_size` (by default 8, 16 or
    /// 32 MiB depending on the disk size, see [`default_block_size`]).
    pub fn new(out: W, virtual_size: u64, block_size: Option<u32>, name: String) -> Result<Self> {
        let block_size = block_size.unwrap_or_else(|| default_block_size(virtual_size));
        let bs = u64::from(block_size);
        if !bs.is_power_of_two() || !(MIB..=256 * MIB).contains(&bs) {
            return Err(Error::InvalidInput(format!(
                "{name}: VHDX block size {block_size} must be a power of two from 1 MiB to 256 MiB"
            )));
        }
        if virtual_size > MAX_VIRTUAL_SIZE || virtual_size % LOGICAL_SECTOR != 0 {
            return Err(Error::InvalidInput(format!(
                "{name}: a VHDX disk must be a multiple of {LOGICAL_SECTOR} bytes up to 64 TiB, not {virtual_size}"
            )));
        }
        let geometry = Geometry::new(bs, LOGICAL_SECTOR, virtual_size, false);
        let bat_length = geometry.entries.saturating_mul(8).div_ceil(MIB).max(1) * MIB;
        let mut w = Self {
            out,
            cursor: SinkCursor::new(virtual_size, LOGICAL_SECTOR),
            geometry,
            file_end: BAT_OFFSET + bat_length,
            written_end: 0,
            current: None,
            data_bytes: 0,
            name,
        };
        w.write_structures(virtual_size, bat_length)?;
        Ok(w)
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8], structure: &'static str) -> Result<()> {
        let err = |source| Error::Io {
            file: self.name.clone(),
            op: "write",
            structure,
            offset,
            source,
        };
        self.out.seek(SeekFrom::Start(offset)).map_err(err)?;
        let err = |source| Error::Io {
            file: self.name.clone(),
            op: "write",
            structure,
            offset,
            source,
        };
        self.out.write_all(bytes).map_err(err)?;
        self.written_end = self.written_end.max(offset + bytes.len() as u64);
        Ok(())
    }

    /// Writes the file identifier, both headers, both region tables and the metadata.
    fn write_structures(&mut self, virtual_size: u64, bat_length: u64) -> Result<()> {
        self.write_at(0, &file_identifier("rehost"), "VHDX file type identifier")?;
        let (file_write_guid, data_write_guid) = (guid::random(), guid::random());
        for (i, at) in HEADER_OFFSETS.into_iter().enumerate() {
            let header = Header {
                sequence: i as u64,
                file_write_guid,
                data_write_guid,
                log_guid: guid::ZERO,
                log_version: LOG_VERSION,
                version: HEADER_VERSION,
                log_length: u32::try_from(LOG_LENGTH).unwrap_or(0),
                log_offset: LOG_OFFSET,
            };
            self.write_at(at, &header.encode(), "VHDX header")?;
        }
        let table = region::encode(&[
            (
                BAT_GUID,
                Region {
                    offset: BAT_OFFSET,
                    length: bat_length,
                },
            ),
            (
                METADATA_GUID,
                Region {
                    offset: METADATA_OFFSET,
                    length: METADATA_LENGTH,
                },
            ),
        ]);
        for at in REGION_TABLE_OFFSETS {
            self.write_at(at, &table, "VHDX region table")?;
        }
        let block_size = u32::try_from(self.geometry.block_size).unwrap_or(0);
        let vd = IS_REQUIRED | IS_VIRTUAL_DISK;
        let items: Vec<metadata::Item> = vec![
            (
                metadata::FILE_PARAMETERS,
                IS_REQUIRED,
                [block_size.to_le_bytes(), 0u32.to_le_bytes()].concat(),
            ),
            (
                metadata::VIRTUAL_DISK_SIZE,
                vd,
                virtual_size.to_le_bytes().to_vec(),
            ),
            (metadata::PAGE_83_DATA, vd, guid::random().to_vec()),
            (
                metadata::LOGICAL_SECTOR_SIZE,
                vd,
                u32::try_from(LOGICAL_SECTOR)
                    .unwrap_or(0)
                    .to_le_bytes()
                    .to_vec(),
            ),
            (
                metadata::PHYSICAL_SECTOR_SIZE,
                vd,
                PHYSICAL_SECTOR.to_le_bytes().to_vec(),
            ),
        ];
        let bytes = metadata::encode(&items, metadata::TABLE_SIZE + 4096);
        self.write_at(METADATA_OFFSET, &bytes, "VHDX metadata region")
    }

    /// The file offset of `block`, allocating it at the end of the file on first use.
    fn block_offset(&mut self, block: u64) -> Result<u64> {
        if let Some((b, at)) = self.current {
            if b == block {
                return Ok(at);
            }
        }
        let at = self.file_end;
        self.file_end += self.geometry.block_size;
        let entry = at | PAYLOAD_BLOCK_FULLY_PRESENT;
        let index = self.geometry.payload_index(block);
        self.write_at(
            BAT_OFFSET + index * 8,
            &entry.to_le_bytes(),
            "VHDX BAT entry",
        )?;
        self.current = Some((block, at));
        Ok(at)
    }

    /// Writes the non-zero parts of `data`, which starts at virtual offset `offset`.
    fn put_data(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let bs = self.geometry.block_size;
        let mut pos = 0usize;
        while pos < data.len() {
            let at = offset + pos as u64;
            // The next piece ends at a zero-check boundary (which never crosses a block).
            let piece_end = ((at / ZERO_CHECK + 1) * ZERO_CHECK).min(offset + data.len() as u64);
            let n = usize::try_from(piece_end - at).unwrap_or(0);
            let piece = &data[pos..pos + n];
            if !is_zero(piece) {
                let block = at / bs;
                let file_at = self.block_offset(block)? + (at - block * bs);
                self.write_at(file_at, piece, "VHDX payload block")?;
                self.data_bytes += n as u64;
            }
            pos += n;
        }
        Ok(())
    }
}

impl<W: Write + Seek> ExtentSink for VhdxWriter<W> {
    fn put(&mut self, extent: Extent) -> Result<()> {
        self.cursor.advance(&extent)?;
        // Zero and unchanged extents are not stored: unallocated blocks read as zero, and
        // the unwritten rest of an allocated block lies past the old end of file.
        if let Extent::Data { offset, data } = &extent {
            self.put_data(*offset, data)?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<WriteSummary> {
        self.cursor.finish()?;
        if self.written_end < self.file_end {
            // The file must hold the whole BAT region and every allocated block.
            let last = self.file_end - 1;
            self.write_at(last, &[0], "VHDX payload block")?;
        }
        let end = self.file_end;
        self.out.flush().map_err(|source| Error::Io {
            file: self.name.clone(),
            op: "flush",
            structure: "file",
            offset: end,
            source,
        })?;
        Ok(WriteSummary {
            data_bytes: self.data_bytes,
            file_bytes: self.file_end,
        })
    }
}
