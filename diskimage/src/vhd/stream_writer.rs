//! Writing a dynamic or differencing VHD to a forward-only output (an S3 multipart upload).
//!
//! A VHD's block allocation table comes before the blocks, so a writer that cannot seek
//! back must know which blocks it will store before the first byte: the caller passes the
//! areas its extent stream will carry as data or zeros (a source knows them from its
//! change map before reading). Each planned block is then laid out in order — sector
//! bitmap, 2 MiB of data — and the stream fills them as it passes. Memory: the BAT and
//! one block.

use std::io::Write;

use rehost_core::Extent;

use crate::error::{Error, Result};
use crate::sink::{ExtentSink, ParentLink, SinkCursor, WriteSummary, is_zero};

use super::dynamic_header::{DEFAULT_BLOCK_SIZE, bitmap_size};
use super::footer::{DiskType, FOOTER_SIZE, Footer, Geometry, vhd_timestamp};
use super::writer::{BAT_AT, CREATOR_APP, HEADER_AT, SparseState, new_unique_id};

const SECTOR: u64 = 512;

/// Writes a dynamic (no parent) or differencing VHD forward-only.
#[derive(Debug)]
pub struct VhdStreamWriter<W: Write> {
    out: W,
    name: String,
    cursor: SinkCursor,
    footer: Footer,
    differencing: bool,
    /// The blocks that will be stored, in order, and how many were written.
    planned: Vec<u64>,
    emitted: usize,
    /// The block being filled: its index, sector bitmap and data.
    current: Option<(u64, Vec<u8>, Vec<u8>)>,
    position: u64,
    data_bytes: u64,
}

impl<W: Write> VhdStreamWriter<W> {
    /// A writer of a `virtual_size`-byte disk into `out`, storing the blocks that `areas`
    /// (`(offset, len)`, the extents that will be `Data` or `Zero`) touch; a differencing
    /// VHD of `parent` when given. The headers are written at once.
    pub fn new(
        mut out: W,
        virtual_size: u64,
        parent: Option<ParentLink>,
        areas: &[(u64, u64)],
        name: String,
    ) -> Result<Self> {
        if virtual_size % SECTOR != 0 {
            return Err(Error::InvalidInput(format!(
                "{name}: a VHD holds whole 512-byte sectors; {virtual_size} bytes is not a multiple of 512"
            )));
        }
        let mut sparse = SparseState::new(&name, virtual_size, parent.as_ref())?;
        let block_size = u64::from(DEFAULT_BLOCK_SIZE);
        let mut planned: Vec<u64> = Vec::new();
        for &(offset, len) in areas {
            if len == 0 {
                continue;
            }
            if offset.checked_add(len).is_none_or(|end| end > virtual_size) {
                return Err(Error::InvalidInput(format!(
                    "{name}: planned area {offset}+{len} is past the disk's {virtual_size} bytes"
                )));
            }
            for block in offset / block_size..=(offset + len - 1) / block_size {
                match planned.last() {
                    Some(&last) if last > block => {
                        return Err(Error::InvalidInput(format!(
                            "{name}: planned areas are not in order (block {block} after {last})"
                        )));
                    }
                    Some(&last) if last == block => {}
                    _ => planned.push(block),
                }
            }
        }
        let stride = bitmap_size(DEFAULT_BLOCK_SIZE) + block_size;
        for (k, &block) in planned.iter().enumerate() {
            let at = sparse.next_free + k as u64 * stride;
            let sector = u32::try_from(at / SECTOR).map_err(|_| {
                Error::InvalidInput(format!("{name}: the VHD outgrew 2 TiB of blocks"))
            })?;
            let slot = usize::try_from(block)
                .ok()
                .and_then(|b| sparse.bat.get_mut(b))
                .ok_or_else(|| {
                    Error::InvalidInput(format!("{name}: block {block} past the BAT"))
                })?;
            *slot = sector;
        }
        let differencing = parent.is_some();
        let footer = Footer {
            data_offset: HEADER_AT,
            timestamp: vhd_timestamp(std::time::SystemTime::now()),
            creator_app: *CREATOR_APP,
            current_size: virtual_size,
            geometry: Geometry::for_sectors(virtual_size / SECTOR),
            disk_type_code: if differencing {
                DiskType::Differencing.code()
            } else {
                DiskType::Dynamic.code()
            },
            unique_id: new_unique_id(),
            saved_state: false,
        };
        // Footer copy, dynamic header, BAT, parent locators: everything before the blocks.
        let mut head = Vec::with_capacity(usize::try_from(sparse.next_free).unwrap_or(0));
        head.extend_from_slice(&footer.to_bytes());
        head.extend_from_slice(&sparse.header.to_bytes());
        debug_assert_eq!(head.len() as u64, BAT_AT);
        let mut bat: Vec<u8> = sparse.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
        bat.resize(bat.len().div_ceil(FOOTER_SIZE) * FOOTER_SIZE, 0xFF);
        head.extend_from_slice(&bat);
        for (locator, bytes) in sparse.header.locators.iter().zip(&sparse.locator_data) {
            let at = usize::try_from(locator.data_offset).unwrap_or(usize::MAX);
            head.resize(at, 0);
            head.extend_from_slice(bytes);
        }
        head.resize(usize::try_from(sparse.next_free).unwrap_or(usize::MAX), 0);
        let position = head.len() as u64;
        write_all(&mut out, &head, &name, 0, "VHD headers")?;
        Ok(Self {
            out,
            name,
            cursor: SinkCursor::new(virtual_size, SECTOR),
            footer,
            differencing,
            planned,
            emitted: 0,
            current: None,
            position,
            data_bytes: 0,
        })
    }

    /// The unique id the footer records (what a child names as its parent).
    pub fn unique_id(&self) -> [u8; 16] {
        self.footer.unique_id
    }

    /// Makes `block` the block being filled, writing out every planned block before it.
    fn enter(&mut self, block: u64) -> Result<()> {
        if self.current.as_ref().is_some_and(|(b, _, _)| *b == block) {
            return Ok(());
        }
        if !self.planned[self.emitted..].contains(&block) {
            return Err(Error::InvalidInput(format!(
                "{}: data at block {block} was not in the planned areas",
                self.name
            )));
        }
        while let Some(&next) = self.planned.get(self.emitted) {
            if next == block {
                break;
            }
            self.emit_next()?;
        }
        let bitmap_len = usize::try_from(bitmap_size(DEFAULT_BLOCK_SIZE)).unwrap_or(512);
        // A full disk's stored block is all data (its unwritten sectors are zeros, like the
        // disk); a delta's marks only the sectors it holds.
        let fill = if self.differencing { 0 } else { 0xFF };
        self.current = Some((
            block,
            vec![fill; bitmap_len],
            vec![0; DEFAULT_BLOCK_SIZE as usize],
        ));
        Ok(())
    }

    /// Writes the next planned block: the one being filled, or an empty one.
    fn emit_next(&mut self) -> Result<()> {
        let Some(&block) = self.planned.get(self.emitted) else {
            return Ok(());
        };
        let (bitmap, data) = match self.current.take() {
            Some((b, bitmap, data)) if b == block => (bitmap, data),
            other => {
                self.current = other;
                let bitmap_len = usize::try_from(bitmap_size(DEFAULT_BLOCK_SIZE)).unwrap_or(512);
                let fill = if self.differencing { 0 } else { 0xFF };
                (vec![fill; bitmap_len], vec![0; DEFAULT_BLOCK_SIZE as usize])
            }
        };
        let at = self.position;
        write_all(&mut self.out, &bitmap, &self.name, at, "VHD sector bitmap")?;
        write_all(
            &mut self.out,
            &data,
            &self.name,
            at + bitmap.len() as u64,
            "VHD block data",
        )?;
        self.position += (bitmap.len() + data.len()) as u64;
        self.emitted += 1;
        Ok(())
    }

    /// Stores `[offset, offset + len)` (within one block): `data`, or zeros when `None`.
    fn put_piece(&mut self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let block_size = u64::from(DEFAULT_BLOCK_SIZE);
        self.enter(offset / block_size)?;
        let differencing = self.differencing;
        let Some((_, bitmap, buffer)) = self.current.as_mut() else {
            return Ok(());
        };
        let within = usize::try_from(offset % block_size).unwrap_or(0);
        let n = usize::try_from(len).unwrap_or(0);
        match data {
            Some(bytes) => buffer[within..within + n].copy_from_slice(bytes),
            None => buffer[within..within + n].fill(0),
        }
        if differencing {
            let first = (offset % block_size) / SECTOR;
            for sector in first..first + len.div_ceil(SECTOR) {
                if let Some(byte) = usize::try_from(sector / 8)
                    .ok()
                    .and_then(|i| bitmap.get_mut(i))
                {
                    *byte |= 0x80 >> (sector % 8);
                }
            }
        }
        Ok(())
    }
}

fn write_all<W: Write>(
    out: &mut W,
    bytes: &[u8],
    name: &str,
    offset: u64,
    structure: &'static str,
) -> Result<()> {
    out.write_all(bytes).map_err(|source| Error::Io {
        file: name.to_owned(),
        op: "write",
        structure,
        offset,
        source,
    })
}

impl<W: Write> ExtentSink for VhdStreamWriter<W> {
    fn put(&mut self, extent: Extent) -> Result<()> {
        self.cursor.advance(&extent)?;
        let block_size = u64::from(DEFAULT_BLOCK_SIZE);
        let (offset, len) = (extent.offset(), extent.len());
        let mut pos = offset;
        while pos < offset + len {
            let piece_end = (offset + len).min((pos / block_size + 1) * block_size);
            let piece_len = piece_end - pos;
            match &extent {
                Extent::Data { data, .. } => {
                    let start = usize::try_from(pos - offset).unwrap_or(usize::MAX);
                    let end = usize::try_from(piece_end - offset).unwrap_or(usize::MAX);
                    let bytes = data.get(start..end).unwrap_or_default();
                    // A full disk need not store zeros (its block may not be planned);
                    // a delta must (they may differ from the parent).
                    if self.differencing || !is_zero(bytes) {
                        self.put_piece(pos, piece_len, Some(bytes))?;
                        self.data_bytes += piece_len;
                    }
                }
                Extent::Zero { .. } if self.differencing => {
                    self.put_piece(pos, piece_len, None)?;
                    self.data_bytes += piece_len;
                }
                Extent::Zero { .. } | Extent::Unchanged { .. } => {}
            }
            pos = piece_end;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<WriteSummary> {
        self.cursor.finish()?;
        while self.emitted < self.planned.len() {
            self.emit_next()?;
        }
        let footer = self.footer.to_bytes();
        let at = self.position;
        write_all(&mut self.out, &footer, &self.name, at, "VHD footer")?;
        let file_bytes = at + FOOTER_SIZE as u64;
        let name = self.name.clone();
        self.out.flush().map_err(|source| Error::Io {
            file: name,
            op: "flush",
            structure: "VHD",
            offset: file_bytes,
            source,
        })?;
        Ok(WriteSummary {
            data_bytes: self.data_bytes,
            file_bytes,
        })
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const MIB: u64 = 1 << 20;

    fn write(size: u64, areas: &[(u64, u64)], extents: Vec<Extent>) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut w: Box<dyn ExtentSink + '_> = Box::new(VhdStreamWriter::new(
            &mut out,
            size,
            None,
            areas,
            "t.vhd".into(),
        )?);
        for e in extents {
            w.put(e)?;
        }
        w.finish()?;
        Ok(out)
    }

    #[test]
    fn a_forward_only_dynamic_vhd_reads_back() {
        let size = 16 * MIB;
        let data = Bytes::from(vec![7u8; MIB as usize]);
        let out = write(
            size,
            &[(MIB, MIB), (9 * MIB, MIB)],
            vec![
                Extent::Unchanged {
                    offset: 0,
                    len: MIB,
                },
                Extent::Data {
                    offset: MIB,
                    data: data.clone(),
                },
                Extent::Unchanged {
                    offset: 2 * MIB,
                    len: 7 * MIB,
                },
                Extent::Data {
                    offset: 9 * MIB,
                    data: data.clone(),
                },
                Extent::Unchanged {
                    offset: 10 * MIB,
                    len: 6 * MIB,
                },
            ],
        )
        .expect("written");
        // Two 2 MiB blocks stored (blocks 0 and 4), nothing else.
        assert!(out.len() < 5 * MIB as usize);
        let image = crate::ImageFile::from_bytes("t.vhd", out);
        let layer = super::super::open(image).expect("opens");
        let mut buf = vec![0u8; size as usize];
        layer.read_at(&mut buf, 0).expect("reads");
        assert!(buf[..MIB as usize].iter().all(|&b| b == 0));
        assert!(buf[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 7));
        assert!(
            buf[9 * MIB as usize..10 * MIB as usize]
                .iter()
                .all(|&b| b == 7)
        );
        assert!(buf[10 * MIB as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn data_outside_the_plan_is_refused() {
        let err = write(
            4 * MIB,
            &[(0, MIB)],
            vec![
                Extent::Unchanged {
                    offset: 0,
                    len: 2 * MIB,
                },
                Extent::Data {
                    offset: 2 * MIB,
                    data: Bytes::from(vec![1u8; MIB as usize]),
                },
            ],
        )
        .expect_err("outside");
        assert!(
            err.to_string().contains("not in the planned areas"),
            "{err}"
        );
        assert!(write(4 * MIB, &[(2 * MIB, MIB), (0, MIB)], vec![]).is_err());
        assert!(write(4 * MIB, &[(3 * MIB, 2 * MIB)], vec![]).is_err());
    }
}
