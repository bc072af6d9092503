//! Reading fixed, dynamic and differencing VHDs.
//!
//! Only the BAT is kept in memory (at most [`MAX_TABLE_ENTRIES`] × 4 bytes); sector
//! bitmaps are read for the blocks each call touches, so nothing grows with use and
//! concurrent callers share nothing mutable.

use std::sync::Arc;

use rehost_core::{ExtentKind, MapExtent};

use crate::error::{Error, Result};
use crate::io::ImageFile;
use crate::layer::{Format, ImageId, Layer, LayerInfo, ParentRef};
use crate::map::MapBuilder;
use crate::raw::check_range;

use super::dynamic_header::{DynamicHeader, HEADER_SIZE, HEADER_VERSION, bitmap_size};
use super::footer::{DiskType, FOOTER_SIZE, Footer, FooterError};
use super::locator::parent_candidates;

/// A BAT entry for a block not stored in the file.
pub const BAT_UNALLOCATED: u32 = u32::MAX;
/// The largest BAT we accept: 2^22 entries (16 MiB) covers the format's 2040 GiB limit
/// with blocks down to 512 KiB; more is a lying header.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 22;
/// The spec's limit on the size of dynamic and differencing disks, 2040 GiB.
pub const MAX_SPARSE_DISK_BYTES: u64 = 2040 << 30;
/// The largest block size we accept. Real files use 2 MiB (512 KiB at the smallest);
/// the bound keeps a bitmap read per call small.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

const SECTOR: u64 = 512;

/// Opens a VHD of any type.
pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Ok(Arc::new(VhdLayer::open(file)?))
}

/// An opened VHD.
#[derive(Debug)]
pub struct VhdLayer {
    file: ImageFile,
    info: LayerInfo,
    /// `None` for a fixed disk.
    sparse: Option<Sparse>,
}

/// The block layout of a dynamic or differencing disk.
#[derive(Debug)]
struct Sparse {
    block_size: u64,
    bitmap_size: u64,
    /// One entry per block of the virtual size (the header may declare more).
    bat: Vec<u32>,
}

impl VhdLayer {
    /// Reads and checks the footer, and for sparse disks the header and BAT.
    pub fn open(file: ImageFile) -> Result<Self> {
        let mut warnings = Vec::new();
        let (footer, footer_at) = read_footer(&file, &mut warnings)?;
        let disk_type = DiskType::from_code(footer.disk_type_code).ok_or_else(|| {
            Error::unsupported(
                file.name(),
                format!("VHD disk type {}", footer.disk_type_code),
            )
        })?;
        let size = footer.disk_size();
        if footer.current_size % SECTOR != 0 {
            warnings.push(format!(
                "footer current size {} is not a whole number of sectors; using {size}",
                footer.current_size
            ));
        }
        if footer.saved_state {
            warnings.push("the footer says the disk belongs to a VM in a saved state".into());
        }
        let mut parent = None;
        let sparse = if disk_type == DiskType::Fixed {
            if size > footer_at {
                return Err(Error::corrupt(
                    file.name(),
                    "VHD footer",
                    footer_at,
                    format!(
                        "the disk size is {size} bytes but only {footer_at} bytes precede the footer"
                    ),
                ));
            }
            None
        } else {
            let header_at = footer.data_offset;
            let buf: [u8; HEADER_SIZE] = file.read_array(header_at, "VHD dynamic header")?;
            let header = DynamicHeader::parse(&buf).map_err(|e| {
                Error::corrupt(file.name(), "VHD dynamic header", header_at, e.to_string())
            })?;
            if header.version != HEADER_VERSION {
                warnings.push(format!(
                    "dynamic header version {:#010x}, expected 1.0",
                    header.version
                ));
            }
            let sparse = Sparse::read(&file, header_at, &header, size)?;
            if disk_type == DiskType::Differencing {
                let candidates = parent_candidates(&file, &header)?;
                if candidates.is_empty() {
                    warnings.push("the differencing disk names no parent".into());
                }
                parent = Some(ParentRef {
                    candidates,
                    expected_id: Some(ImageId::VhdUniqueId(header.parent_unique_id)),
                });
            }
            Some(sparse)
        };
        let info = LayerInfo {
            format: Format::Vhd,
            subformat: disk_type.name().into(),
            virtual_size_bytes: size,
            cluster_size_bytes: sparse.as_ref().map(|s| s.block_size),
            parent,
            id: Some(ImageId::VhdUniqueId(footer.unique_id)),
            warnings,
        };
        Ok(Self { file, info, sparse })
    }

    /// Calls `f(offset, len, stored_at)` for consecutive runs covering `[offset, end)`:
    /// `stored_at` is where the run's bytes are in the file, `None` where it is not stored.
    fn for_each_run(
        &self,
        offset: u64,
        end: u64,
        f: &mut dyn FnMut(u64, u64, Option<u64>) -> Result<()>,
    ) -> Result<()> {
        let Some(sparse) = &self.sparse else {
            return if end > offset {
                f(offset, end - offset, Some(offset))
            } else {
                Ok(())
            };
        };
        let bs = sparse.block_size;
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let block_start = index * bs;
            let seg_end = end.min(block_start + bs);
            let entry = usize::try_from(index)
                .ok()
                .and_then(|i| sparse.bat.get(i).copied())
                .ok_or_else(|| Error::InvalidInput(format!("offset {pos} is past the BAT")))?;
            if entry == BAT_UNALLOCATED {
                f(pos, seg_end - pos, None)?;
            } else {
                let bitmap_at = u64::from(entry) * SECTOR;
                self.block_runs(sparse, bitmap_at, block_start, pos, seg_end, f)?;
            }
            pos = seg_end;
        }
        Ok(())
    }

    /// The runs of `[from, to)` inside the allocated block at `block_start`, per its bitmap.
    fn block_runs(
        &self,
        sparse: &Sparse,
        bitmap_at: u64,
        block_start: u64,
        from: u64,
        to: u64,
        f: &mut dyn FnMut(u64, u64, Option<u64>) -> Result<()>,
    ) -> Result<()> {
        let data_at = bitmap_at + sparse.bitmap_size;
        let first_sector = (from - block_start) / SECTOR;
        let end_sector = (to - block_start).div_ceil(SECTOR);
        let first_byte = first_sector / 8;
        // At most bitmap_size bytes (64 KiB for the largest block size we accept).
        let bitmap_len = usize::try_from((end_sector - 1) / 8 - first_byte + 1).unwrap_or(0);
        let bitmap = self
            .file
            .read_vec(bitmap_len, bitmap_at + first_byte, "VHD sector bitmap")?;
        let is_set = |sector: u64| {
            let byte = usize::try_from(sector / 8 - first_byte)
                .ok()
                .and_then(|i| bitmap.get(i));
            // Sector 0 of a block is the most significant bit of byte 0.
            byte.is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
        };
        let mut run_start = from;
        let mut run_set = is_set(first_sector);
        for sector in first_sector + 1..end_sector {
            let set = is_set(sector);
            if set != run_set {
                let boundary = block_start + sector * SECTOR;
                f(
                    run_start,
                    boundary - run_start,
                    run_set.then(|| data_at + (run_start - block_start)),
                )?;
                run_start = boundary;
                run_set = set;
            }
        }
        f(
            run_start,
            to - run_start,
            run_set.then(|| data_at + (run_start - block_start)),
        )
    }
}

impl Sparse {
    /// Checks the header's layout against the file and reads the BAT.
    fn read(file: &ImageFile, header_at: u64, header: &DynamicHeader, size: u64) -> Result<Self> {
        let corrupt =
            |reason: String| Error::corrupt(file.name(), "VHD dynamic header", header_at, reason);
        let block_size = header.block_size;
        if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(corrupt(format!(
                "block size {block_size} is not a power of two between 512 and {MAX_BLOCK_SIZE}"
            )));
        }
        if size > MAX_SPARSE_DISK_BYTES {
            return Err(corrupt(format!(
                "the disk size {size} exceeds the format's limit of {MAX_SPARSE_DISK_BYTES} bytes"
            )));
        }
        if header.max_table_entries > MAX_TABLE_ENTRIES {
            return Err(corrupt(format!(
                "max table entries {} exceeds {MAX_TABLE_ENTRIES}",
                header.max_table_entries
            )));
        }
        let block_size = u64::from(block_size);
        let blocks = size.div_ceil(block_size);
        if blocks > u64::from(header.max_table_entries) {
            return Err(corrupt(format!(
                "{} BAT entries cannot cover {size} bytes in blocks of {block_size}",
                header.max_table_entries
            )));
        }
        // blocks <= MAX_TABLE_ENTRIES, so the BAT is at most 16 MiB.
        let bat_len = usize::try_from(blocks * 4).map_err(|_| corrupt("BAT too large".into()))?;
        let raw = file.read_vec(bat_len, header.table_offset, "VHD BAT")?;
        let bitmap_size = bitmap_size(header.block_size);
        let mut bat = Vec::with_capacity(bat_len / 4);
        for (index, chunk) in (0u64..).zip(raw.chunks_exact(4)) {
            let entry = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            if entry != BAT_UNALLOCATED {
                // Only the part of the last block inside the disk must be present.
                let used = block_size.min(size - index * block_size).div_ceil(SECTOR) * SECTOR;
                let start = u64::from(entry) * SECTOR;
                let end = start + bitmap_size + used;
                if end > file.len() {
                    return Err(Error::corrupt(
                        file.name(),
                        "VHD BAT",
                        header.table_offset + index * 4,
                        format!(
                            "block {index} at offset {start} runs past the end of the file ({} bytes)",
                            file.len()
                        ),
                    ));
                }
            }
            bat.push(entry);
        }
        Ok(Self {
            block_size,
            bitmap_size,
            bat,
        })
    }
}

/// Finds the footer: the last 512 bytes (511 for pre-2004 fixed disks), or, if that one
/// is damaged, the copy dynamic and differencing disks keep at offset 0. Returns it with
/// its offset (where a fixed disk's data ends).
fn read_footer(file: &ImageFile, warnings: &mut Vec<String>) -> Result<(Footer, u64)> {
    let len = file.len();
    let footer_size = FOOTER_SIZE as u64;
    let at = len
        .checked_sub(footer_size)
        .ok_or_else(|| Error::Truncated {
            file: file.name().to_owned(),
            structure: "VHD footer",
            offset: 0,
            needed: footer_size,
            file_len: len,
        })?;
    let tail: [u8; FOOTER_SIZE] = file.read_array(at, "VHD footer")?;
    let mut end = Footer::parse(&tail).map(|f| (f, at));
    if end == Err(FooterError::Cookie) && len % footer_size == footer_size - 1 {
        // A 511-byte footer: the missing last byte is reserved (zero), so it sums alike.
        let mut short = [0u8; FOOTER_SIZE];
        file.read(&mut short[..FOOTER_SIZE - 1], at + 1, "VHD footer")?;
        if let Ok(f) = Footer::parse(&short) {
            end = Ok((f, at + 1));
        }
    }
    let head: [u8; FOOTER_SIZE] = file.read_array(0, "VHD footer copy")?;
    let copy = Footer::parse(&head);
    match (end, copy) {
        (Ok((footer, at)), copy) => {
            if at > 0
                && footer.disk_type_code != DiskType::Fixed.code()
                && copy.as_ref() != Ok(&footer)
            {
                warnings.push(
                    "the footer copy at the start of the file differs from the footer".into(),
                );
            }
            Ok((footer, at))
        }
        (Err(e), Ok(copy)) if copy.disk_type_code != DiskType::Fixed.code() => {
            warnings.push(format!(
                "the footer at offset {at} is damaged ({e}); using the copy at offset 0"
            ));
            Ok((copy, at))
        }
        (Err(e), _) => Err(Error::corrupt(file.name(), "VHD footer", at, e.to_string())),
    }
}

impl Layer for VhdLayer {
    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        check_range(&self.info, offset, len)?;
        let mut map = MapBuilder::new();
        self.for_each_run(offset, offset + len, &mut |at, n, stored| {
            map.push(
                at,
                n,
                if stored.is_some() {
                    ExtentKind::Data
                } else {
                    ExtentKind::Unallocated
                },
            );
            Ok(())
        })?;
        Ok(map.finish())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.info, offset, buf.len() as u64)?;
        let file = &self.file;
        self.for_each_run(offset, offset + buf.len() as u64, &mut |at, n, stored| {
            let start = usize::try_from(at - offset).unwrap_or(usize::MAX);
            let piece = start
                .checked_add(usize::try_from(n).unwrap_or(usize::MAX))
                .and_then(|end| buf.get_mut(start..end))
                .ok_or_else(|| Error::InvalidInput("read run outside the buffer".into()))?;
            match stored {
                Some(file_at) => file.read(piece, file_at, "VHD block data"),
                None => {
                    piece.fill(0);
                    Ok(())
                }
            }
        })
    }
}
