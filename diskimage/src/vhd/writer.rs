//! Writing fixed, dynamic and differencing VHDs from an ordered extent stream.
//!
//! Fixed: the data in place, holes where it is zero, the footer after it. Dynamic and
//! differencing: footer copy, dynamic header, BAT and parent locators first (written at
//! `finish`, their space reserved), then 2 MiB blocks appended as data reaches them, then
//! the footer. Memory: the BAT (at most 4 MiB at 2040 GiB) and one block's sector bitmap.

use std::io::{Seek, SeekFrom, Write};

use rehost_core::Extent;

use crate::error::{Error, Result};
use crate::layer::ImageId;
use crate::sink::{ExtentSink, ParentLink, SinkCursor, WriteSummary, is_zero};

use super::VhdKind;
use super::dynamic_header::{
    DEFAULT_BLOCK_SIZE, DynamicHeader, HEADER_SIZE, HEADER_VERSION, Locator, PARENT_NAME_SIZE,
    Platform, bitmap_size,
};
use super::footer::{DiskType, FOOTER_SIZE, Footer, Geometry, NO_DATA_OFFSET, vhd_timestamp};
use super::locator::encode_windows_utf16le;
use super::reader::{BAT_UNALLOCATED, MAX_SPARSE_DISK_BYTES};

/// The creator application we record. qemu (10.0 and later), Hyper-V and Azure size a disk
/// by `current_size` for every creator but Virtual PC's `vpc ` and old qemu's `qemu`.
pub const CREATOR_APP: &[u8; 4] = b"rhst";

const SECTOR: u64 = 512;
/// Where the dynamic header goes: right after the footer copy.
pub(super) const HEADER_AT: u64 = FOOTER_SIZE as u64;
/// Where the BAT goes: right after the header.
pub(super) const BAT_AT: u64 = HEADER_AT + HEADER_SIZE as u64;
/// Largest piece of a fixed disk's data checked for zeros at once: zero runs this long
/// are left as holes.
const FIXED_ZERO_CHECK: usize = 64 << 10;

/// Writes a VHD.
#[derive(Debug)]
pub struct VhdWriter<W: Write + Seek> {
    out: W,
    name: String,
    cursor: SinkCursor,
    footer: Footer,
    data_bytes: u64,
    /// `None` for a fixed disk.
    sparse: Option<SparseState>,
}

/// The state of a dynamic or differencing disk being written.
#[derive(Debug)]
pub(super) struct SparseState {
    pub(super) header: DynamicHeader,
    /// Parent locator paths, in the same order as `header.locators`.
    pub(super) locator_data: Vec<Vec<u8>>,
    pub(super) bat: Vec<u32>,
    /// Where the next block goes.
    pub(super) next_free: u64,
    /// Differencing: the block being written and its bitmap (bits set for the sectors
    /// written, Data or Zero), flushed when the stream leaves the block.
    delta: Option<(u64, Vec<u8>)>,
    differencing: bool,
}

impl<W: Write + Seek> VhdWriter<W> {
    /// A writer of a `virtual_size`-byte disk of the given kind into `out` (expected empty:
    /// holes are left unwritten). The size must be a whole number of sectors; dynamic and
    /// differencing disks are limited to 2040 GiB.
    pub fn new(out: W, virtual_size: u64, kind: VhdKind, name: String) -> Result<Self> {
        if virtual_size % SECTOR != 0 {
            return Err(Error::InvalidInput(format!(
                "{name}: a VHD holds whole 512-byte sectors; {virtual_size} bytes is not a multiple of 512"
            )));
        }
        let disk_type = match kind {
            VhdKind::Fixed => DiskType::Fixed,
            VhdKind::Dynamic => DiskType::Dynamic,
            VhdKind::Differencing(_) => DiskType::Differencing,
        };
        let sparse = match kind {
            VhdKind::Fixed => None,
            VhdKind::Dynamic => Some(SparseState::new(&name, virtual_size, None)?),
            VhdKind::Differencing(link) => {
                Some(SparseState::new(&name, virtual_size, Some(&link))?)
            }
        };
        let footer = Footer {
            data_offset: if sparse.is_some() {
                HEADER_AT
            } else {
                NO_DATA_OFFSET
            },
            timestamp: vhd_timestamp(std::time::SystemTime::now()),
            creator_app: *CREATOR_APP,
            current_size: virtual_size,
            geometry: Geometry::for_sectors(virtual_size / SECTOR),
            disk_type_code: disk_type.code(),
            unique_id: new_unique_id(),
            saved_state: false,
        };
        Ok(Self {
            out,
            name,
            cursor: SinkCursor::new(virtual_size, SECTOR),
            footer,
            data_bytes: 0,
            sparse,
        })
    }

    /// The unique id the footer records (what a child names as its parent).
    pub fn unique_id(&self) -> [u8; 16] {
        self.footer.unique_id
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8], structure: &'static str) -> Result<()> {
        let name = &self.name;
        let err = |source| Error::Io {
            file: name.clone(),
            op: "write",
            structure,
            offset,
            source,
        };
        self.out.seek(SeekFrom::Start(offset)).map_err(err)?;
        self.out.write_all(bytes).map_err(err)
    }

    /// Writes a fixed disk's data in place, skipping zero pieces (left as holes) and
    /// writing each run of non-zero pieces at once.
    fn put_fixed(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let mut run: Option<usize> = None;
        let mut pos = 0usize;
        for piece in data.chunks(FIXED_ZERO_CHECK) {
            match (is_zero(piece), run) {
                (false, None) => run = Some(pos),
                (true, Some(start)) => {
                    self.write_fixed_run(offset + start as u64, &data[start..pos])?;
                    run = None;
                }
                _ => {}
            }
            pos += piece.len();
        }
        match run {
            Some(start) => self.write_fixed_run(offset + start as u64, &data[start..]),
            None => Ok(()),
        }
    }

    fn write_fixed_run(&mut self, at: u64, run: &[u8]) -> Result<()> {
        self.data_bytes += run.len() as u64;
        self.write_at(at, run, "VHD data")
    }

    /// Stores `[offset, offset + len)` (within one block) in a sparse disk, allocating the
    /// block if needed: `data` is `None` for zeros. A delta also marks the sectors.
    fn put_sparse(&mut self, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        let block_size = u64::from(DEFAULT_BLOCK_SIZE);
        let index = offset / block_size;
        let Some(sparse) = self.sparse.as_mut() else {
            return Ok(());
        };
        let mut writes: Vec<(u64, Vec<u8>, &'static str)> = Vec::new();
        if sparse
            .delta
            .as_ref()
            .is_some_and(|(block, _)| *block != index)
        {
            if let Some(w) = sparse.take_delta_bitmap() {
                writes.push(w);
            }
        }
        let bat_index = usize::try_from(index)
            .map_err(|_| Error::InvalidInput("block index too large".into()))?;
        let entry = *sparse
            .bat
            .get(bat_index)
            .ok_or_else(|| Error::InvalidInput(format!("offset {offset} is past the BAT")))?;
        let block_at = if entry == BAT_UNALLOCATED {
            let at = sparse.next_free;
            let sector = u32::try_from(at / SECTOR).map_err(|_| {
                Error::InvalidInput(format!("{}: the VHD outgrew 2 TiB of blocks", self.name))
            })?;
            sparse.bat[bat_index] = sector;
            sparse.next_free = at + bitmap_size(DEFAULT_BLOCK_SIZE) + block_size;
            if !sparse.differencing {
                // A full disk's stored block is all data: its unwritten sectors are
                // holes, which read as zeros like the disk they stand for.
                let bitmap =
                    vec![0xFF; usize::try_from(bitmap_size(DEFAULT_BLOCK_SIZE)).unwrap_or(512)];
                writes.push((at, bitmap, "VHD sector bitmap"));
            }
            at
        } else {
            u64::from(entry) * SECTOR
        };
        if sparse.differencing {
            let bitmap_len = usize::try_from(bitmap_size(DEFAULT_BLOCK_SIZE)).unwrap_or(512);
            let (_, bitmap) = sparse
                .delta
                .get_or_insert_with(|| (index, vec![0u8; bitmap_len]));
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
        let data_at = block_at + bitmap_size(DEFAULT_BLOCK_SIZE) + offset % block_size;
        for (at, bytes, structure) in writes {
            self.write_at(at, &bytes, structure)?;
        }
        // Zeros need no write: the block's unwritten bytes are holes of a new file.
        if let Some(bytes) = data.filter(|d| !is_zero(d)) {
            self.write_at(data_at, bytes, "VHD block data")?;
        }
        Ok(())
    }
}

impl SparseState {
    pub(super) fn new(name: &str, virtual_size: u64, link: Option<&ParentLink>) -> Result<Self> {
        if virtual_size > MAX_SPARSE_DISK_BYTES {
            return Err(Error::InvalidInput(format!(
                "{name}: a dynamic VHD holds at most {MAX_SPARSE_DISK_BYTES} bytes, not {virtual_size}"
            )));
        }
        let blocks = virtual_size.div_ceil(u64::from(DEFAULT_BLOCK_SIZE));
        // At most 2040 GiB / 2 MiB = 1,044,480 entries.
        let max_table_entries =
            u32::try_from(blocks).map_err(|_| Error::InvalidInput("too many blocks".into()))?;
        let bat_bytes = (blocks * 4).div_ceil(SECTOR) * SECTOR;
        let mut next_free = BAT_AT + bat_bytes;
        let mut header = DynamicHeader {
            table_offset: BAT_AT,
            version: HEADER_VERSION,
            max_table_entries,
            block_size: DEFAULT_BLOCK_SIZE,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name: [0; PARENT_NAME_SIZE],
            locators: Vec::new(),
        };
        let mut locator_data = Vec::new();
        if let Some(link) = link {
            let ImageId::VhdUniqueId(parent_id) = link.id else {
                return Err(Error::InvalidInput(format!(
                    "{name}: a differencing VHD's parent must be a VHD (its parent id is {:?})",
                    link.id
                )));
            };
            header.parent_unique_id = parent_id;
            header.parent_timestamp = std::fs::metadata(&link.absolute_path)
                .and_then(|m| m.modified())
                .map_or(0, vhd_timestamp);
            header.parent_name = parent_name_field(name, &link.relative_path)?;
            let relative = if link.relative_path.starts_with('.') {
                link.relative_path.clone()
            } else {
                format!(".\\{}", link.relative_path)
            };
            for (platform, path) in [
                (Platform::W2ru, relative.as_str()),
                (Platform::W2ku, &link.absolute_path),
            ] {
                let bytes = encode_windows_utf16le(path);
                let data_length = u32::try_from(bytes.len())
                    .map_err(|_| Error::InvalidInput(format!("{name}: parent path too long")))?;
                let space = u64::from(data_length).div_ceil(SECTOR).max(1) * SECTOR;
                header.locators.push(Locator {
                    platform,
                    // Bytes, as Hyper-V writes it (the spec's text says sectors).
                    data_space: u32::try_from(space).unwrap_or(u32::MAX),
                    data_length,
                    data_offset: next_free,
                });
                next_free += space;
                locator_data.push(bytes);
            }
        }
        Ok(Self {
            header,
            locator_data,
            bat: vec![BAT_UNALLOCATED; usize::try_from(blocks).unwrap_or(0)],
            next_free,
            delta: None,
            differencing: link.is_some(),
        })
    }

    /// The pending differencing bitmap, as a write to make.
    fn take_delta_bitmap(&mut self) -> Option<(u64, Vec<u8>, &'static str)> {
        let (block, bitmap) = self.delta.take()?;
        let entry = self.bat.get(usize::try_from(block).ok()?)?;
        Some((u64::from(*entry) * SECTOR, bitmap, "VHD sector bitmap"))
    }
}

/// The parent unicode name field: the parent's file name, UTF-16BE.
fn parent_name_field(name: &str, relative_path: &str) -> Result<[u8; PARENT_NAME_SIZE]> {
    let file_name = relative_path
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(relative_path);
    let units: Vec<u16> = file_name.encode_utf16().collect();
    let mut field = [0u8; PARENT_NAME_SIZE];
    if units.len() * 2 > PARENT_NAME_SIZE {
        return Err(Error::InvalidInput(format!(
            "{name}: parent file name {file_name:?} is longer than the 256 UTF-16 units a VHD records"
        )));
    }
    for (slot, unit) in field.chunks_exact_mut(2).zip(units) {
        slot.copy_from_slice(&unit.to_be_bytes());
    }
    Ok(field)
}

/// A random version-4 UUID for the footer. No UUID crate is needed: std's `RandomState`
/// is seeded from the OS per process, and mixing in the time and a counter makes ids of
/// one process distinct.
pub(super) fn new_unique_id() -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let state = std::collections::hash_map::RandomState::new();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 16];
    for (half, salt) in id.chunks_exact_mut(8).zip([0x5248_5354u64, 0x5648_4420]) {
        let mut h = state.build_hasher();
        h.write_u128(nanos);
        h.write_u64(count);
        h.write_u64(salt);
        half.copy_from_slice(&h.finish().to_be_bytes());
    }
    id[6] = (id[6] & 0x0F) | 0x40;
    id[8] = (id[8] & 0x3F) | 0x80;
    id
}

impl<W: Write + Seek> ExtentSink for VhdWriter<W> {
    fn put(&mut self, extent: Extent) -> Result<()> {
        self.cursor.advance(&extent)?;
        let Some(sparse) = &self.sparse else {
            if let Extent::Data { offset, data } = &extent {
                self.put_fixed(*offset, data)?;
            }
            return Ok(());
        };
        let differencing = sparse.differencing;
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
                    // A full disk does not store zeros; a delta records them (they may
                    // differ from the parent).
                    if differencing || !is_zero(bytes) {
                        self.put_sparse(pos, piece_len, Some(bytes))?;
                        self.data_bytes += piece_len;
                    }
                }
                Extent::Zero { .. } if differencing => {
                    self.put_sparse(pos, piece_len, None)?;
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
        let footer = self.footer.to_bytes();
        let file_bytes = match self.sparse.take() {
            None => {
                let at = self.cursor.virtual_size();
                self.write_at(at, &footer, "VHD footer")?;
                at + FOOTER_SIZE as u64
            }
            Some(mut sparse) => {
                if let Some((at, bitmap, structure)) = sparse.take_delta_bitmap() {
                    self.write_at(at, &bitmap, structure)?;
                }
                self.write_at(0, &footer, "VHD footer copy")?;
                self.write_at(HEADER_AT, &sparse.header.to_bytes(), "VHD dynamic header")?;
                // The padding after the last entry is filled like unused entries.
                let mut bat: Vec<u8> = sparse.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
                bat.resize(bat.len().div_ceil(FOOTER_SIZE) * FOOTER_SIZE, 0xFF);
                self.write_at(BAT_AT, &bat, "VHD BAT")?;
                for (locator, bytes) in sparse.header.locators.iter().zip(&sparse.locator_data) {
                    self.write_at(locator.data_offset, bytes, "VHD parent locator")?;
                }
                self.write_at(sparse.next_free, &footer, "VHD footer")?;
                sparse.next_free + FOOTER_SIZE as u64
            }
        };
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
