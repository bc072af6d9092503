//! The monolithicSparse writer, full or as a delta child. Laid out as qemu does it: header,
//! descriptor, redundant grain directory and tables, primary directory and tables, then
//! grains. Both directories are written up front (every entry points at its preallocated
//! table); a table is written to both copies once the stream has moved past it, and only
//! if it has entries, so unused tables stay holes that read as zeros.

use std::io::{Seek, SeekFrom, Write};

use rehost_core::{Extent, SECTOR_SIZE};

use super::descriptor::{Descriptor, cids_for, extent_file_name};
use super::grains::{Grain, GrainAssembler, GrainTable};
use super::header::{
    FLAG_REDUNDANT_GT, FLAG_VALID_NEWLINE, FLAG_ZERO_GRAIN, GRAIN_BYTES, GRAIN_SECTORS, GT_SECTORS,
    GTE_ZERO, SparseHeader, VERSION_SPARSE, VERSION_ZERO_GRAIN, ZERO_SECTOR,
};
use super::{Geometry, entry, grain_len, padded_descriptor, write_err};
use crate::error::Result;
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
        let (cid, parent_cid) = cids_for(&name, parent.as_ref(), virtual_size)?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::layer::ImageId;
    use bytes::Bytes;
    use std::io::Cursor;

    fn u32_at(b: &[u8], at: u64) -> u32 {
        let at = at as usize;
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn write(
        size: u64,
        parent: Option<ParentLink>,
        extents: Vec<Extent>,
    ) -> Result<(Vec<u8>, WriteSummary)> {
        let mut buf = Cursor::new(Vec::new());
        let mut w = Box::new(SparseWriter::new(
            &mut buf,
            size,
            parent,
            "/d/m.vmdk".into(),
        )?);
        for e in extents {
            w.put(e)?;
        }
        let summary = (w as Box<dyn ExtentSink>).finish()?;
        Ok((buf.into_inner(), summary))
    }

    #[test]
    fn layout_matches_qemu_and_grains_follow_the_overhead() {
        // 5000000 bytes: qemu puts the RGD at 21, the GD at 26 and grains at sector 128.
        let size = 5_000_000;
        let data = Bytes::from(vec![3u8; 1024]);
        let (file, summary) = write(
            size,
            None,
            vec![
                Extent::Zero {
                    offset: 0,
                    len: 2 * GRAIN_BYTES + 512,
                },
                Extent::Data {
                    offset: 2 * GRAIN_BYTES + 512,
                    data,
                },
                Extent::Unchanged {
                    offset: 2 * GRAIN_BYTES + 1536,
                    len: size - 2 * GRAIN_BYTES - 1536,
                },
            ],
        )
        .unwrap();
        assert_eq!(u32_at(&file, 4), 1);
        assert_eq!(u32_at(&file, 8), 3);
        assert_eq!(u64_at(&file, 12), 9766);
        assert_eq!(
            (u64_at(&file, 48), u64_at(&file, 56), u64_at(&file, 64)),
            (21, 26, 128)
        );
        // Both directories point at their tables (22 and 27), both tables at the grain.
        assert_eq!(u32_at(&file, 21 * 512), 22);
        assert_eq!(u32_at(&file, 26 * 512), 27);
        assert_eq!(u32_at(&file, 22 * 512 + 8), 128);
        assert_eq!(u32_at(&file, 27 * 512 + 8), 128);
        assert_eq!(u32_at(&file, 27 * 512 + 4), 0);
        let grain = &file[128 * 512..129 * 512 + 65024];
        assert!(grain[..512].iter().all(|&b| b == 0));
        assert!(grain[512..1536].iter().all(|&b| b == 3));
        assert!(grain[1536..].iter().all(|&b| b == 0));
        assert_eq!(file.len() as u64, 129 * 512 + 65024);
        assert_eq!(
            summary,
            WriteSummary {
                data_bytes: GRAIN_BYTES,
                file_bytes: file.len() as u64
            }
        );
        assert!(
            String::from_utf8_lossy(&file[512..1024]).contains("createType=\"monolithicSparse\"")
        );
    }

    #[test]
    fn an_empty_disk_still_reaches_the_end_of_its_tables() {
        let size = 3 * 512 * 512 * 128 + 512; // four grain tables
        let (file, summary) = write(
            size,
            None,
            vec![Extent::Zero {
                offset: 0,
                len: size,
            }],
        )
        .unwrap();
        assert_eq!(summary.data_bytes, 0);
        assert_eq!(file.len() as u64, u64_at(&file, 64) * 512);
        assert!(
            file[u64_at(&file, 56) as usize * 512 + 16..]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn zero_grains_in_a_delta_use_the_zero_grain_entry() {
        let link = ParentLink {
            relative_path: "p.vmdk".into(),
            absolute_path: "/d/p.vmdk".into(),
            id: ImageId::VmdkCid(5),
            virtual_size_bytes: 2 * GRAIN_BYTES,
        };
        let (file, summary) = write(
            2 * GRAIN_BYTES,
            Some(link),
            vec![
                Extent::Zero {
                    offset: 0,
                    len: GRAIN_BYTES,
                },
                Extent::Data {
                    offset: GRAIN_BYTES,
                    data: Bytes::from(vec![0u8; GRAIN_BYTES as usize]),
                },
            ],
        )
        .unwrap();
        assert_eq!((u32_at(&file, 4), u32_at(&file, 8)), (2, 7));
        let gt = u64::from(u32_at(&file, u64_at(&file, 56) * 512)) * 512;
        assert_eq!(
            (u32_at(&file, gt), u32_at(&file, gt + 4)),
            (GTE_ZERO, GTE_ZERO)
        );
        assert_eq!(summary.data_bytes, 0);
    }

    #[test]
    fn misordered_streams_and_early_finish_are_rejected() {
        let mut buf = Cursor::new(Vec::new());
        let mut w = SparseWriter::new(&mut buf, 1 << 20, None, "m.vmdk".into()).unwrap();
        assert_eq!(w.alignment(), 512);
        assert!(
            w.put(Extent::Zero {
                offset: 512,
                len: 512
            })
            .is_err()
        );
        w.put(Extent::Zero {
            offset: 0,
            len: 512,
        })
        .unwrap();
        assert!(
            w.put(Extent::Zero {
                offset: 512,
                len: 1 << 20
            })
            .is_err()
        );
        assert!((Box::new(w) as Box<dyn ExtentSink>).finish().is_err());
        assert!(write(0, None, vec![]).is_err());
        assert!(write(MAX_VIRTUAL_SIZE + 1, None, vec![]).is_err());
    }

    #[test]
    fn odd_sizes_round_up_to_a_sector() {
        let data = Bytes::from(vec![9u8; 1000]);
        let (file, _) = write(1000, None, vec![Extent::Data { offset: 0, data }]).unwrap();
        assert_eq!(u64_at(&file, 12), 2);
        let grain = u64_at(&file, 64) as usize * 512;
        assert!(file[grain..grain + 1000].iter().all(|&b| b == 9));
        assert!(file[grain + 1000..].iter().all(|&b| b == 0));
        assert_eq!(file.len() - grain, GRAIN_BYTES as usize);
    }
}
