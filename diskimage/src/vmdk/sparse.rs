//! A hosted sparse extent (KDMV): header, grain directory (primary and redundant), grain
//! tables read lazily per call, and grains, plain or compressed (streamOptimized).

use flate2::Decompress;
use rehost_core::ExtentKind;

use super::descriptor::{Descriptor, MAX_DESCRIPTOR_BYTES};
use super::grain::inflate;
use super::header::{
    FLAG_REDUNDANT_GT, GD_AT_END, GRAIN_MARKER_SIZE, GTE_UNALLOCATED, GTE_ZERO, HEADER_SIZE,
    MARKER_EOS, MARKER_FOOTER, MAX_GD_ENTRIES, MAX_GTES_PER_GT, Marker, SECTOR, SparseHeader,
    max_compressed_size,
};
use crate::error::{Error, Result};
use crate::io::{ImageFile, le};
use crate::map::MapBuilder;

/// How many grain tables are compared with their redundant copies when opening: enough to
/// catch a damaged directory in small images, bounded so opening a 2 TiB disk stays cheap.
const GT_CROSS_CHECKS: usize = 64;

/// One opened sparse extent.
#[derive(Debug)]
pub struct SparseExtent {
    file: ImageFile,
    header: SparseHeader,
    /// Sector offset of each grain table (0: none, all its grains unallocated).
    gd: Vec<u32>,
    /// The embedded descriptor, if any.
    pub descriptor: Option<Descriptor>,
    /// Inconsistencies found while opening.
    pub warnings: Vec<String>,
}

impl SparseExtent {
    /// Opens a sparse extent: header (or the footer of a stream whose directory is at its
    /// end), embedded descriptor and grain directory.
    pub fn open(file: ImageFile) -> Result<Self> {
        let name = file.name().to_owned();
        let head: [u8; HEADER_SIZE] = file.read_array(0, "VMDK sparse header")?;
        let mut header = SparseHeader::parse(&head, &name, 0)?;
        if header.gd_offset == GD_AT_END {
            header = read_footer(&file, &header)?;
        }
        let descriptor = read_embedded_descriptor(&file, &header)?;
        let mut extent = Self {
            file,
            header,
            gd: Vec::new(),
            descriptor,
            warnings: Vec::new(),
        };
        extent.load_gd()?;
        Ok(extent)
    }

    /// The parsed header (the footer's, for streams with the directory at the end).
    pub fn header(&self) -> &SparseHeader {
        &self.header
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    fn gt_bytes(&self) -> u64 {
        u64::from(self.header.gtes_per_gt) * 4
    }

    /// Reads one grain directory; `None` when it does not fit in the file.
    fn read_gd(&self, sector: u64, what: &'static str) -> Result<Option<Vec<u32>>> {
        let entries = self.header.gd_entries();
        let bytes = entries * 4;
        let offset = sector.checked_mul(SECTOR);
        match offset {
            Some(off)
                if sector != 0
                    && off
                        .checked_add(bytes)
                        .is_some_and(|end| end <= self.file.len()) =>
            {
                let len = usize::try_from(bytes).map_err(|_| {
                    Error::unsupported(self.file.name(), "grain directory too large")
                })?;
                let raw = self.file.read_vec(len, off, what)?;
                Ok(Some(raw.chunks_exact(4).map(|c| le::u32(c, 0)).collect()))
            }
            _ => Ok(None),
        }
    }

    /// True when a grain table at `sector` lies inside the file, past the header.
    fn gt_fits(&self, sector: u32) -> bool {
        let start = u64::from(sector) * SECTOR;
        sector != 0 && start + self.gt_bytes() <= self.file.len()
    }

    /// Loads the grain directory, taking each entry from the primary directory when it is
    /// sound and from the redundant one otherwise; disagreements become warnings.
    fn load_gd(&mut self) -> Result<()> {
        let name = self.file.name().to_owned();
        let entries = self.header.gd_entries();
        if entries > MAX_GD_ENTRIES {
            return Err(Error::unsupported(
                &name,
                format!("a grain directory of {entries} entries (at most {MAX_GD_ENTRIES})"),
            ));
        }
        let primary = self.read_gd(self.header.gd_offset, "VMDK grain directory")?;
        let redundant = if self.header.flags & FLAG_REDUNDANT_GT != 0 && self.header.rgd_offset != 0
        {
            self.read_gd(self.header.rgd_offset, "VMDK redundant grain directory")?
        } else {
            None
        };
        let gd_pos = self.header.gd_offset.saturating_mul(SECTOR);
        let (primary, redundant) = match (primary, redundant) {
            (Some(p), r) => (p, r),
            (None, Some(r)) => {
                self.warnings.push(format!(
                    "the grain directory at sector {} lies outside the file; using the redundant one",
                    self.header.gd_offset
                ));
                self.gd = r;
                return self.check_entries(gd_pos);
            }
            (None, None) => {
                return Err(Error::corrupt(
                    &name,
                    "VMDK grain directory",
                    gd_pos,
                    format!(
                        "{entries} entries at sector {} do not fit in the file of {} bytes",
                        self.header.gd_offset,
                        self.file.len()
                    ),
                ));
            }
        };
        let Some(redundant) = redundant else {
            self.gd = primary;
            return self.check_entries(gd_pos);
        };
        let mut merged = Vec::with_capacity(primary.len());
        let (mut fixed, mut disagree, mut checked) = (0usize, 0usize, 0usize);
        for (&p, &r) in primary.iter().zip(&redundant) {
            let (p_ok, r_ok) = (p == 0 || self.gt_fits(p), r == 0 || self.gt_fits(r));
            let pick = if p != 0 && p_ok {
                if r == 0 {
                    disagree += 1;
                } else if r_ok && checked < GT_CROSS_CHECKS {
                    checked += 1;
                    if self.read_gt(p)? != self.read_gt(r)? {
                        disagree += 1;
                        if !self.gt_plausible(p)? && self.gt_plausible(r)? {
                            fixed += 1;
                            merged.push(r);
                            continue;
                        }
                    }
                }
                p
            } else if r != 0 && r_ok {
                fixed += 1;
                r
            } else if p_ok {
                if r != 0 {
                    disagree += 1;
                }
                p
            } else if r_ok {
                // The primary entry is damaged; the redundant one says "no table".
                fixed += 1;
                r
            } else {
                p // reported by check_entries
            };
            merged.push(pick);
        }
        if fixed > 0 {
            self.warnings.push(format!("{fixed} grain directory entries were damaged and taken from the redundant directory"));
        }
        if disagree > 0 {
            self.warnings.push(format!(
                "{disagree} grain tables disagree with the redundant grain directory"
            ));
        }
        self.gd = merged;
        self.check_entries(gd_pos)
    }

    fn check_entries(&self, gd_pos: u64) -> Result<()> {
        for (i, &e) in self.gd.iter().enumerate() {
            if e != 0 && !self.gt_fits(e) {
                return Err(Error::corrupt(
                    self.file.name(),
                    "VMDK grain directory",
                    gd_pos.saturating_add(i as u64 * 4),
                    format!(
                        "entry {i} points to a grain table at sector {e}, outside the file of {} bytes",
                        self.file.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn read_gt(&self, sector: u32) -> Result<Vec<u8>> {
        let len = usize::try_from(self.gt_bytes()).unwrap_or(0); // at most 2 KiB
        self.file
            .read_vec(len, u64::from(sector) * SECTOR, "VMDK grain table")
    }

    /// A grain table whose entries all point inside the file (or are 0/1).
    fn gt_plausible(&self, sector: u32) -> Result<bool> {
        let gt = self.read_gt(sector)?;
        Ok(gt.chunks_exact(4).all(|c| {
            let e = le::u32(c, 0);
            e <= GTE_ZERO || u64::from(e) * SECTOR < self.file.len()
        }))
    }

    /// Calls `f(grain, entry)` for `count` grains from `first`, reading each grain table's
    /// needed slice once (never the whole set of tables).
    fn for_each_gte(
        &self,
        first: u64,
        count: u64,
        mut f: impl FnMut(u64, u32) -> Result<()>,
    ) -> Result<()> {
        let per_gt = u64::from(self.header.gtes_per_gt);
        let mut buf = [0u8; MAX_GTES_PER_GT as usize * 4];
        let end = first + count;
        let mut g = first;
        while g < end {
            let gt_index = g / per_gt;
            let in_gt = g % per_gt;
            let n = (per_gt - in_gt).min(end - g);
            let gt_sector = usize::try_from(gt_index)
                .ok()
                .and_then(|i| self.gd.get(i))
                .copied()
                .unwrap_or(0);
            if gt_sector == 0 {
                for i in 0..n {
                    f(g + i, GTE_UNALLOCATED)?;
                }
            } else {
                let slice = &mut buf[..usize::try_from(n * 4).unwrap_or(0)];
                self.file.read(
                    slice,
                    u64::from(gt_sector) * SECTOR + in_gt * 4,
                    "VMDK grain table",
                )?;
                for (i, c) in slice.chunks_exact(4).enumerate() {
                    f(g + i as u64, le::u32(c, 0))?;
                }
            }
            g += n;
        }
        Ok(())
    }

    /// Appends the map of `[offset, offset + len)` of this extent to `map`, shifted by `base`.
    /// Past the capacity (a descriptor extent larger than its file) is unallocated.
    pub fn map(&self, offset: u64, len: u64, base: u64, map: &mut MapBuilder) -> Result<()> {
        let cap = self.capacity_bytes();
        let inside = len.min(cap.saturating_sub(offset));
        if inside > 0 {
            let gb = self.header.grain_bytes();
            let first = offset / gb;
            let last = (offset + inside - 1) / gb;
            self.for_each_gte(first, last - first + 1, |g, gte| {
                let start = (g * gb).max(offset);
                let stop = ((g + 1) * gb).min(offset + inside);
                map.push(base + start, stop - start, kind_of(gte));
                Ok(())
            })?;
        }
        map.push(
            base + offset + inside,
            len - inside,
            ExtentKind::Unallocated,
        );
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of this extent; unallocated grains read as zero.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let cap = self.capacity_bytes();
        let inside =
            usize::try_from((buf.len() as u64).min(cap.saturating_sub(offset))).unwrap_or(0);
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        let gb = self.header.grain_bytes();
        let first = offset / gb;
        let last = (offset + inside as u64 - 1) / gb;
        let mut ctx = ReadCtx {
            ext: self,
            pending: None,
            dec: None,
            comp: Vec::new(),
            grain: Vec::new(),
        };
        self.for_each_gte(first, last - first + 1, |g, gte| {
            let start = (g * gb).max(offset);
            let stop = ((g + 1) * gb).min(offset + inside as u64);
            let at = usize::try_from(start - offset).unwrap_or(0);
            let piece_len = usize::try_from(stop - start).unwrap_or(0);
            let in_grain = start - g * gb;
            ctx.grain(head, at, piece_len, g, gte, in_grain)
        })?;
        ctx.flush(head)
    }
}

fn kind_of(gte: u32) -> ExtentKind {
    match gte {
        GTE_UNALLOCATED => ExtentKind::Unallocated,
        GTE_ZERO => ExtentKind::Zero,
        _ => ExtentKind::Data,
    }
}

/// State of one `read` call: a pending coalesced plain read, and the buffers of compressed
/// grains (allocated once per call, only if a compressed grain is met).
struct ReadCtx<'a> {
    ext: &'a SparseExtent,
    /// (position in buf, file offset, length) of plain grain bytes not yet read.
    pending: Option<(usize, u64, usize)>,
    dec: Option<Decompress>,
    comp: Vec<u8>,
    grain: Vec<u8>,
}

impl ReadCtx<'_> {
    fn grain(
        &mut self,
        buf: &mut [u8],
        at: usize,
        len: usize,
        g: u64,
        gte: u32,
        in_grain: u64,
    ) -> Result<()> {
        let piece = &mut buf[at..at + len];
        if gte <= GTE_ZERO {
            piece.fill(0);
            return Ok(());
        }
        let file_off = u64::from(gte) * SECTOR;
        if !self.ext.header.compressed() {
            let off = file_off + in_grain;
            // Grains written one after another are read in one call.
            if let Some((p_at, p_off, p_len)) = &mut self.pending {
                if *p_at + *p_len == at && *p_off + *p_len as u64 == off {
                    *p_len += len;
                    return Ok(());
                }
            }
            self.flush(buf)?;
            self.pending = Some((at, off, len));
            return Ok(());
        }
        self.compressed(&mut buf[at..at + len], g, file_off, in_grain)
    }

    fn flush(&mut self, buf: &mut [u8]) -> Result<()> {
        if let Some((at, off, len)) = self.pending.take() {
            self.ext
                .file
                .read(&mut buf[at..at + len], off, "VMDK grain")?;
        }
        Ok(())
    }

    fn compressed(&mut self, piece: &mut [u8], g: u64, file_off: u64, in_grain: u64) -> Result<()> {
        let ext = self.ext;
        let h = &ext.header;
        let name = ext.file.name();
        let bad = |reason: String| Error::corrupt(name, "VMDK compressed grain", file_off, reason);
        let mut m = [0u8; GRAIN_MARKER_SIZE];
        ext.file.read(&mut m, file_off, "VMDK compressed grain")?;
        let (lba, size) = (le::u64(&m, 0), u64::from(le::u32(&m, 8)));
        let gb = h.grain_bytes();
        if lba != g * h.grain_size {
            return Err(bad(format!(
                "its marker says LBA {lba}, the grain table says {}",
                g * h.grain_size
            )));
        }
        if size == 0 || size > max_compressed_size(gb) {
            return Err(bad(format!(
                "compressed size {size} is not in 1..={}",
                max_compressed_size(gb)
            )));
        }
        let size = usize::try_from(size).map_err(|_| bad("size overflows".into()))?;
        self.comp.resize(size, 0);
        ext.file.read(
            &mut self.comp,
            file_off + GRAIN_MARKER_SIZE as u64,
            "VMDK compressed grain",
        )?;
        // The last grain of a disk whose size is not a multiple of the grain may hold only
        // the bytes up to the capacity (qemu writes it so) or a whole grain.
        let valid = gb.min(ext.capacity_bytes() - g * gb);
        let dec = self.dec.get_or_insert_with(|| Decompress::new(true));
        if in_grain == 0 && piece.len() as u64 == gb {
            let n = inflate(dec, &self.comp, piece).map_err(&bad)?;
            if n != piece.len() {
                return Err(bad(format!(
                    "decompresses to {n} bytes, not the grain's {gb}"
                )));
            }
            return Ok(());
        }
        let gb_usize = usize::try_from(gb).map_err(|_| bad("grain too large".into()))?;
        self.grain.resize(gb_usize, 0);
        let n = inflate(dec, &self.comp, &mut self.grain).map_err(&bad)?;
        if n as u64 != gb && n as u64 != valid {
            return Err(bad(format!(
                "decompresses to {n} bytes, not the grain's {gb}"
            )));
        }
        let start = usize::try_from(in_grain).map_err(|_| bad("offset overflows".into()))?;
        let src = self
            .grain
            .get(start..start + piece.len())
            .ok_or_else(|| bad("grain too short".into()))?;
        piece.copy_from_slice(src);
        Ok(())
    }
}

/// Reads the footer of a stream whose header says [`GD_AT_END`]: the last three sectors
/// are a footer marker, the footer (a header with the real `gdOffset`) and an EOS marker.
fn read_footer(file: &ImageFile, header: &SparseHeader) -> Result<SparseHeader> {
    let name = file.name();
    let len = file.len();
    if len < 4 * SECTOR {
        return Err(Error::Truncated {
            file: name.to_owned(),
            structure: "VMDK footer",
            offset: 0,
            needed: 4 * SECTOR,
            file_len: len,
        });
    }
    let marker_at = len - 3 * SECTOR;
    let footer_at = len - 2 * SECTOR;
    let eos_at = len - SECTOR;
    let marker = Marker::parse(&file.read_array(marker_at, "VMDK footer marker")?);
    if marker.size != 0 || marker.kind != MARKER_FOOTER {
        return Err(Error::corrupt(
            name,
            "VMDK footer marker",
            marker_at,
            "the header's gdOffset says the directory is at the end, but there is no footer marker three sectors before the end",
        ));
    }
    let eos = Marker::parse(&file.read_array(eos_at, "VMDK end-of-stream marker")?);
    if eos.size != 0 || eos.kind != MARKER_EOS || eos.val != 0 {
        return Err(Error::corrupt(
            name,
            "VMDK end-of-stream marker",
            eos_at,
            "the last sector is not an end-of-stream marker",
        ));
    }
    let footer = SparseHeader::parse(&file.read_array(footer_at, "VMDK footer")?, name, footer_at)?;
    if footer.gd_offset == GD_AT_END {
        return Err(Error::corrupt(
            name,
            "VMDK footer",
            footer_at,
            "the footer's gdOffset is also GD_AT_END",
        ));
    }
    if (footer.capacity, footer.grain_size, footer.gtes_per_gt)
        != (header.capacity, header.grain_size, header.gtes_per_gt)
    {
        return Err(Error::corrupt(
            name,
            "VMDK footer",
            footer_at,
            "the footer's geometry differs from the header's",
        ));
    }
    Ok(footer)
}

/// Reads the descriptor embedded in a sparse extent, if it has one.
fn read_embedded_descriptor(file: &ImageFile, h: &SparseHeader) -> Result<Option<Descriptor>> {
    if h.descriptor_offset == 0 || h.descriptor_size == 0 {
        return Ok(None);
    }
    let name = file.name();
    let offset = h.descriptor_offset.saturating_mul(SECTOR);
    let size = h.descriptor_size.saturating_mul(SECTOR);
    if size > MAX_DESCRIPTOR_BYTES {
        return Err(Error::corrupt(
            name,
            "VMDK embedded descriptor",
            offset,
            format!("{size} bytes is larger than the {MAX_DESCRIPTOR_BYTES} we accept"),
        ));
    }
    let text = file.read_vec(
        usize::try_from(size).unwrap_or(0),
        offset,
        "VMDK embedded descriptor",
    )?;
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    Descriptor::parse(&text[..end], name, offset).map(Some)
}

#[cfg(test)]
#[path = "sparse_tests.rs"]
mod tests;
