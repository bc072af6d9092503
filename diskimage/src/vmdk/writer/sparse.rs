//! The monolithicSparse writer, full or as a delta child. Laid out as qemu does it: header,
//! descriptor, redundant grain directory and tables, primary directory and tables, then
//! grains. Both directories are written up front (every entry points at its preallocated
//! table); a table is written to both copies once the stream has moved past it, and only
//! if it has entries, so unused tables stay holes that read as zeros.

use std::io::{Seek, SeekFrom, Write};

use rehost_core::{Extent, SECTOR_SIZE};

use super::descriptor::{CID_NO_PARENT, Descriptor, check_quotable, extent_file_name, random_cid};
use super::grains::{Grain, GrainAssembler, GrainTable};
use super::header::{
    FLAG_REDUNDANT_GT, FLAG_VALID_NEWLINE, FLAG_ZERO_GRAIN, GRAIN_BYTES, GRAIN_SECTORS, GT_SECTORS,
    GTE_ZERO, SparseHeader, VERSION_SPARSE, VERSION_ZERO_GRAIN, ZERO_SECTOR,
};
use super::{Geometry, entry, grain_len, padded_descriptor, write_err};
use crate::error::{Error, Result};
use crate::layer::ImageId;
use crate::sink::{ExtentSink, ParentLink, SinkCursor, WriteSummary, is_zero};

/// Largest disk we write: 2 TiB, VMware's limit for hosted sparse extents, whose 32-bit
/// sector offsets cannot address a larger file anyway.
const MAX_VIRTUAL_SIZE: u64 = 2 << 40;

/// Writes a monolithicSparse VMDK; with a parent, a delta child holding only changed grains.
#[derive(Debug)]
pub struct SparseWriter<W: Write + Seek> {
    cursor: SinkCursor,
    assembler: GrainAssembler,
    delta: bool,
    out: Output<W>,
}

/// Everything but the grain assembler, so the assembler can call into it.
#[derive(Debug)]
struct Output<W: Write + Seek> {
    out: W,
    name: String,
    virtual_size: u64,
    /// Where `out` is positioned, to avoid seeking for consecutive grains.
    position: u64,
    /// One past the last byte written.
    end: u64,
    header: SparseHeader,
    /// First sector of the redundant grain tables.
    rgt_start: u64,
    /// First sector of the primary grain tables.
    gt_start: u64,
    /// Sector the next grain goes to.
    next_grain: u64,
    gt: GrainTable,
    used_zero_grain: bool,
    data_bytes: u64,
}

impl<W: Write + Seek> SparseWriter<W> {
    /// A writer of a `virtual_size`-byte disk (rounded up to a sector: VMDK counts sectors),
    /// a delta child of `parent` if given; `name` (the output path) is used in errors and
    /// its file name in the descriptor. `out` is expected empty.
    pub fn new(
        out: W,
        virtual_size: u64,
        parent: Option<ParentLink>,
        name: String,
    ) -> Result<Self> {
        let geometry = Geometry::new(&name, virtual_size, MAX_VIRTUAL_SIZE)?;
        let parent_cid = match &parent {
            None => CID_NO_PARENT,
            Some(link) => {
                let ImageId::VmdkCid(cid) = link.id else {
                    return Err(Error::InvalidInput(format!(
                        "{name}: a VMDK delta needs a VMDK parent (with a CID); {} is not one",
                        link.relative_path
                    )));
                };
                if link.virtual_size_bytes != virtual_size {
                    return Err(Error::InvalidInput(format!(
                        "{name}: a VMDK delta must have its parent's size ({} bytes), not {virtual_size}",
                        link.virtual_size_bytes
                    )));
                }
                check_quotable(&name, "parent path", &link.relative_path)?;
                cid
            }
        };
        let mut cid = random_cid();
        if cid == parent_cid {
            cid ^= 1; // A child sharing its parent's CID would look unmodified to VMware.
        }
        let descriptor = padded_descriptor(
            &Descriptor {
                cid,
                parent_cid,
                create_type: "monolithicSparse",
                parent_hint: parent.as_ref().map(|l| l.relative_path.as_str()),
                sectors: geometry.capacity_sectors,
                extent_file: &extent_file_name(&name)?,
                tools_install_type: false,
            }
            .render(),
        );
        let descriptor_size = descriptor.len() as u64 / SECTOR_SIZE;
        let tables = geometry.gt_count * GT_SECTORS;
        let rgd_offset = 1 + descriptor_size;
        let rgt_start = rgd_offset + geometry.gd_sectors;
        let gd_offset = rgt_start + tables;
        let gt_start = gd_offset + geometry.gd_sectors;
        let overhead = (gt_start + tables).next_multiple_of(GRAIN_SECTORS);
        let header = SparseHeader {
            version: VERSION_SPARSE,
            flags: FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT,
            capacity: geometry.capacity_sectors,
            descriptor_offset: 1,
            descriptor_size,
            rgd_offset,
            gd_offset,
            overhead,
            compress_algorithm: 0,
        };
        let mut output = Output {
            out,
            name,
            virtual_size,
            position: 0,
            end: 0,
            header,
            rgt_start,
            gt_start,
            next_grain: overhead,
            gt: GrainTable::new(),
            used_zero_grain: false,
            data_bytes: 0,
        };
        output.write_at(0, &output.header.encode(), "header")?;
        output.write_at(SECTOR_SIZE, &descriptor, "descriptor")?;
        output.write_directory(
            rgd_offset,
            rgt_start,
            geometry.gt_count,
            "redundant grain directory",
        )?;
        output.write_directory(gd_offset, gt_start, geometry.gt_count, "grain directory")?;
        let delta = parent.is_some();
        let alignment = if delta { GRAIN_BYTES } else { SECTOR_SIZE };
        Ok(Self {
            cursor: SinkCursor::new(virtual_size, alignment),
            assembler: GrainAssembler::new(virtual_size),
            delta,
            out: output,
        })
    }
}

impl<W: Write + Seek> Output<W> {
    fn write_at(&mut self, offset: u64, bytes: &[u8], structure: &'static str) -> Result<()> {
        if self.position != offset {
            self.out
                .seek(SeekFrom::Start(offset))
                .map_err(write_err(&self.name, structure, offset))?;
        }
        self.out
            .write_all(bytes)
            .map_err(write_err(&self.name, structure, offset))?;
        self.position = offset + bytes.len() as u64;
        self.end = self.end.max(self.position);
        Ok(())
    }

    /// Writes a grain directory at sector `at` whose entries point at `count` consecutive
    /// tables from sector `first_table`, in pieces so a large one is never held whole.
    fn write_directory(
        &mut self,
        at: u64,
        first_table: u64,
        count: u64,
        structure: &'static str,
    ) -> Result<()> {
        const PER_PIECE: u64 = 16 * 1024;
        let mut piece = Vec::with_capacity(usize::try_from(PER_PIECE * 4).unwrap_or(0));
        let mut done = 0;
        while done < count {
            let n = PER_PIECE.min(count - done);
            piece.clear();
            for i in done..done + n {
                piece.extend_from_slice(
                    &entry(&self.name, first_table + i * GT_SECTORS)?.to_le_bytes(),
                );
            }
            self.write_at((at * SECTOR_SIZE) + done * 4, &piece, structure)?;
            done += n;
        }
        Ok(())
    }

    fn store(&mut self, grain: u64, content: Grain<'_>, delta: bool) -> Result<()> {
        let value = match content {
            Grain::Unchanged => return Ok(()),
            Grain::Zero if !delta => return Ok(()),
            Grain::Data(data) if !is_zero(data) => {
                let sector = self.next_grain;
                let value = entry(&self.name, sector)?;
                self.write_at(sector * SECTOR_SIZE, data, "grain")?;
                self.next_grain += GRAIN_SECTORS;
                self.data_bytes += grain_len(grain, self.virtual_size);
                value
            }
            // Zeros in a delta must hide the parent: a zeroed-grain entry says so without
            // storing the grain. All-zero data in a full image is simply not stored.
            Grain::Zero | Grain::Data(_) if delta => {
                self.used_zero_grain = true;
                GTE_ZERO
            }
            Grain::Zero | Grain::Data(_) => return Ok(()),
        };
        let mut gt = std::mem::replace(&mut self.gt, GrainTable::new());
        let result = gt.set(grain, value, &mut |index, table| {
            self.write_table(index, table)
        });
        self.gt = gt;
        result
    }

    /// Writes grain table `index` to its primary and redundant places.
    fn write_table(&mut self, index: u64, table: &[u8]) -> Result<()> {
        let primary = (self.gt_start + index * GT_SECTORS) * SECTOR_SIZE;
        let redundant = (self.rgt_start + index * GT_SECTORS) * SECTOR_SIZE;
        self.write_at(redundant, table, "redundant grain table")?;
        self.write_at(primary, table, "grain table")
    }
}

impl<W: Write + Seek> ExtentSink for SparseWriter<W> {
    fn alignment(&self) -> u64 {
        // A delta grain is all or nothing: it cannot say "half of it is as in the parent".
        if self.delta { GRAIN_BYTES } else { SECTOR_SIZE }
    }

    fn put(&mut self, extent: Extent) -> Result<()> {
        self.cursor.advance(&extent)?;
        let (out, delta) = (&mut self.out, self.delta);
        self.assembler.push(&extent, &mut |grain, content| {
            out.store(grain, content, delta)
        })
    }

    fn finish(self: Box<Self>) -> Result<WriteSummary> {
        self.cursor.finish()?;
        let mut o = self.out;
        let mut gt = std::mem::replace(&mut o.gt, GrainTable::new());
        gt.flush(&mut |index, table| o.write_table(index, table))?;
        if o.used_zero_grain {
            o.header.version = VERSION_ZERO_GRAIN;
            o.header.flags |= FLAG_ZERO_GRAIN;
            o.write_at(0, &o.header.encode(), "header")?;
        }
        // The file must reach the end of the preallocated tables even if the last ones
        // were never written, or readers would find them past the end of file.
        let min_end = o.header.overhead * SECTOR_SIZE;
        if o.end < min_end {
            o.write_at(min_end - SECTOR_SIZE, &ZERO_SECTOR, "grain table padding")?;
        }
        o.out.flush().map_err(write_err(&o.name, "file", o.end))?;
        Ok(WriteSummary {
            data_bytes: o.data_bytes,
            file_bytes: o.end,
        })
    }
}
