//! The streamOptimized writer: header and descriptor, compressed grains in LBA order, each
//! finished grain table behind a GT marker, then the grain directory, a footer carrying
//! its offset and an end-of-stream marker. Nothing is ever sought back to, so the output
//! can be a pipe or an upload.
//!
//! With a parent it is a delta: the descriptor names the parent (`parentCID`,
//! `parentFileNameHint`), grains are all or nothing, unchanged grains are left out and
//! zeroed ones are stored as compressed zero grains. A zeroed-grain table entry would be
//! smaller, but the streamOptimized spec does not define one and compressed zeros read
//! correctly in every streamOptimized reader; they cost one sector per 64 KiB grain.

use std::io::Write;

use flate2::{Compress, Compression, FlushCompress, Status};
use rehost_core::{Extent, SECTOR_SIZE};

use super::descriptor::{Descriptor, cids_for, extent_file_name};
use super::grains::{Grain, GrainAssembler, GrainTable};
use super::header::{
    COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_VALID_NEWLINE, GD_AT_END, GRAIN_BYTES,
    GRAIN_LEN, GRAIN_MARKER_LEN, GRAIN_SECTORS, GT_SECTORS, GTES_PER_GT, MarkerType, SparseHeader,
    VERSION_STREAM, encode_grain_marker, encode_marker,
};
use super::{Geometry, entry, grain_len, padded_descriptor, write_err};
use crate::error::{Error, Result};
use crate::sink::{ExtentSink, ParentLink, SinkCursor, WriteSummary, is_zero};

/// Largest disk we stream: 64 TiB (VMware's 62 TB limit, rounded), so the grain
/// directory held in memory stays under 8 MiB. The file itself must still fit in the
/// 2 TiB that 32-bit sector offsets address, which compression usually allows.
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// Deflate level. On 8 MiB of half text-like, half random grains (the ignored
/// `compression_level_speed` test) level 1 ran 4.6 times faster than the default 6 (about
/// 85 MB/s against 18 MB/s on one core) for output 25% larger. This writer compresses on
/// the feeding thread, so level 6 would cap the whole conversion below a typical upload
/// rate: speed wins.
const COMPRESSION_LEVEL: u32 = 1;

/// Room reserved for one grain's frame: the largest it can be, plus some slack for the
/// fast level's attempt before an incompressible grain falls back to stored blocks.
const COMPRESSED_CAPACITY: usize = GRAIN_LEN + 1024;

/// How much of a grain is deflated to probe whether it compresses (see `compress_frame`).
const PROBE_LEN: usize = 4096;

/// The largest frame of one grain: its marker and the grain in deflate's stored blocks
/// (5 bytes per 65,535, zlib's 6), padded to a sector: 129 sectors.
const MAX_FRAME_BYTES: u64 =
    (GRAIN_MARKER_LEN as u64 + GRAIN_BYTES + 5 * GRAIN_BYTES.div_ceil(65_535) + 6)
        .next_multiple_of(SECTOR_SIZE);

/// Writes a streamOptimized VMDK, full or as a delta child, to a forward-only output
/// (a file, a pipe, an S3 multipart upload: any `Write`).
#[derive(Debug)]
pub struct StreamOptimizedWriter<W: Write> {
    cursor: SinkCursor,
    delta: bool,
    assembler: GrainAssembler,
    out: Output<W>,
}

/// Everything but the grain assembler, so the assembler can call into it.
#[derive(Debug)]
struct Output<W: Write> {
    out: W,
    name: String,
    virtual_size: u64,
    /// Bytes written so far: where the next structure goes.
    position: u64,
    header: SparseHeader,
    /// Sector of each grain table written, 0 for a table with no grain.
    gd: Vec<u32>,
    gt: GrainTable,
    compress: Compress,
    /// Deflate's stored (level 0) blocks, for grains the fast level would expand: zlib's
    /// level 1 emits only static-Huffman blocks, 5–6% larger than random input, where
    /// stored blocks cost 11 bytes a grain.
    store: Compress,
    /// The last grain did not compress: probe the next one's head before deflating it all.
    last_stored: bool,
    /// Marker, compressed grain and padding of the grain being written.
    frame: Vec<u8>,
    /// The frame of an all-zero grain, compressed once when a delta first needs it (only
    /// the LBA in its marker changes from one zero grain to the next).
    zero_frame: Vec<u8>,
    /// Whether zero grains are stored (a delta) or left out (a full image).
    store_zeros: bool,
    data_bytes: u64,
}

impl<W: Write> StreamOptimizedWriter<W> {
    /// A writer of a `virtual_size`-byte disk; `name` (the output path) is used in errors
    /// and its file name in the descriptor. A size that is not a whole number of sectors is
    /// rounded up: VMDK counts sectors, and the padding reads as zeros.
    pub fn new(out: W, virtual_size: u64, name: String) -> Result<Self> {
        Self::with_parent(out, virtual_size, None, name)
    }

    /// The largest file this writer can produce for a `virtual_size`-byte disk (all of it
    /// incompressible data, delta or not): what an upload must be sized for.
    pub fn max_file_bytes(virtual_size: u64) -> u64 {
        max_file_bytes(virtual_size)
    }

    /// A writer of a `virtual_size`-byte disk, a delta child of `parent` if given (a VMDK
    /// of the same size; the child gets a fresh CID). `name` as in [`Self::new`]: for an
    /// upload, a path or URL whose last component is the object's file name.
    pub fn with_parent(
        out: W,
        virtual_size: u64,
        parent: Option<ParentLink>,
        name: String,
    ) -> Result<Self> {
        let geometry = Geometry::new(&name, virtual_size, MAX_VIRTUAL_SIZE)?;
        let (cid, parent_cid) = cids_for(&name, parent.as_ref(), virtual_size)?;
        let delta = parent.is_some();
        let descriptor = padded_descriptor(
            &Descriptor {
                cid,
                parent_cid,
                create_type: "streamOptimized",
                parent_hint: parent.as_ref().map(|l| l.relative_path.as_str()),
                sectors: geometry.capacity_sectors,
                extent_file: &extent_file_name(&name)?,
                tools_install_type: true,
            }
            .render(),
        );
        let descriptor_size = descriptor.len() as u64 / SECTOR_SIZE;
        let header = SparseHeader {
            version: VERSION_STREAM,
            flags: FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: geometry.capacity_sectors,
            descriptor_offset: 1,
            descriptor_size,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            // Grains start on a grain boundary, as in VMware's and qemu's files.
            overhead: (1 + descriptor_size).next_multiple_of(GRAIN_SECTORS),
            compress_algorithm: COMPRESSION_DEFLATE,
        };
        let gd_len = usize::try_from(geometry.gt_count)
            .map_err(|_| Error::InvalidInput("disk too large".into()))?;
        let mut output = Output {
            out,
            name,
            virtual_size,
            position: 0,
            header,
            gd: vec![0; gd_len],
            gt: GrainTable::new(),
            compress: Compress::new(Compression::new(COMPRESSION_LEVEL), true),
            store: Compress::new(Compression::none(), true),
            last_stored: false,
            frame: Vec::with_capacity(COMPRESSED_CAPACITY),
            zero_frame: Vec::new(),
            store_zeros: delta,
            data_bytes: 0,
        };
        let header_bytes = output.header.encode();
        output.write(&header_bytes, "header")?;
        output.write(&descriptor, "descriptor")?;
        let padding = (output.header.overhead * SECTOR_SIZE).saturating_sub(output.position);
        output.write_zeros(padding, "descriptor padding")?;
        let alignment = if delta { GRAIN_BYTES } else { SECTOR_SIZE };
        Ok(Self {
            cursor: SinkCursor::new(virtual_size, alignment),
            delta,
            assembler: GrainAssembler::new(virtual_size),
            out: output,
        })
    }
}

/// The largest file a streamOptimized VMDK of `virtual_size` bytes can take: every grain
/// stored and incompressible (a frame of at most 129 sectors), every grain table, the
/// directory and the trailing structures. An upload sized for this never runs out of parts.
fn max_file_bytes(virtual_size: u64) -> u64 {
    let grains = virtual_size.div_ceil(GRAIN_BYTES);
    let tables = grains.div_ceil(GTES_PER_GT);
    let frame = MAX_FRAME_BYTES;
    let gd = (tables * 4).div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
    // Header and descriptor within one grain, a GT marker per table, the GD marker, the
    // footer marker, footer and end-of-stream marker.
    GRAIN_BYTES
        .saturating_add(grains.saturating_mul(frame))
        .saturating_add(tables.saturating_mul(GT_SECTORS * SECTOR_SIZE + SECTOR_SIZE))
        .saturating_add(gd + 4 * SECTOR_SIZE)
}

impl<W: Write> Output<W> {
    fn write(&mut self, bytes: &[u8], structure: &'static str) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(write_err(&self.name, structure, self.position))?;
        self.position += bytes.len() as u64;
        Ok(())
    }

    fn write_zeros(&mut self, mut len: u64, structure: &'static str) -> Result<()> {
        const ZEROS: [u8; 4096] = [0; 4096];
        while len > 0 {
            let n = len.min(ZEROS.len() as u64);
            self.write(&ZEROS[..usize::try_from(n).unwrap_or(0)], structure)?;
            len -= n;
        }
        Ok(())
    }

    fn sector(&self) -> Result<u32> {
        entry(&self.name, self.position / SECTOR_SIZE)
    }

    /// Compresses and appends one grain, recording it in the current grain table.
    fn store(&mut self, grain: u64, content: Grain<'_>) -> Result<()> {
        let data = match content {
            Grain::Unchanged => return Ok(()),
            Grain::Zero => None,
            Grain::Data(data) => Some(data).filter(|d| !is_zero(d)),
        };
        match data {
            Some(data) => {
                self.compress_frame(grain, data)?;
                self.data_bytes += grain_len(grain, self.virtual_size);
            }
            // A full image leaves zeros out; a delta must store them to hide the parent.
            None if !self.store_zeros => return Ok(()),
            None => self.zero_grain_frame(grain)?,
        }
        let sector = self.sector()?;
        let frame = std::mem::take(&mut self.frame);
        let written = self.write(&frame, "grain");
        self.frame = frame;
        written?;
        let Self {
            gt,
            gd,
            out,
            name,
            position,
            ..
        } = self;
        gt.set(grain, sector, &mut |index, table| {
            write_table(out, name, position, gd, index, table)
        })
    }

    /// Fills `frame` with an all-zero grain for `grain`, compressing zeros only once.
    fn zero_grain_frame(&mut self, grain: u64) -> Result<()> {
        if self.zero_frame.is_empty() {
            // Compressed once, so the best level costs nothing: it fits zeros in one
            // sector where level 1 needs two.
            let fast =
                std::mem::replace(&mut self.compress, Compress::new(Compression::best(), true));
            let framed = self.compress_frame(grain, &vec![0; GRAIN_LEN]);
            self.compress = fast;
            framed?;
            self.zero_frame.clone_from(&self.frame);
        }
        self.frame.clear();
        self.frame.extend_from_slice(&self.zero_frame);
        let lba = (grain * GRAIN_SECTORS).to_le_bytes();
        if let Some(marker_lba) = self.frame.get_mut(..lba.len()) {
            marker_lba.copy_from_slice(&lba);
        }
        Ok(())
    }

    /// Fills `frame` with the grain marker, the zlib stream and padding to a sector.
    fn compress_frame(&mut self, grain: u64, data: &[u8]) -> Result<()> {
        // After an incompressible grain (encrypted or already compressed data comes in
        // runs), deflate only the head of the next one first: if that does not shrink,
        // store the grain without spending a whole deflate on it.
        let probe_failed = self.last_stored && data.len() > PROBE_LEN && {
            let head = &data[..PROBE_LEN];
            deflate_after_marker(&mut self.compress, head, &mut self.frame, &self.name)?;
            self.frame.len() - GRAIN_MARKER_LEN >= PROBE_LEN
        };
        // Stored blocks: 5 bytes per 65,535 bytes, plus zlib's 2-byte header and 4-byte
        // checksum. More than that means the data did not compress: store it instead.
        // (The frame a stored grain makes is what MAX_FRAME_BYTES bounds.)
        let stored_len = data.len() + 5 * data.len().div_ceil(65_535).max(1) + 6;
        let store = probe_failed || {
            deflate_after_marker(&mut self.compress, data, &mut self.frame, &self.name)?;
            self.frame.len() - GRAIN_MARKER_LEN > stored_len
        };
        if store {
            deflate_after_marker(&mut self.store, data, &mut self.frame, &self.name)?;
        }
        self.last_stored = store;
        let compressed = u32::try_from(self.frame.len() - GRAIN_MARKER_LEN).unwrap_or(u32::MAX);
        self.frame[..GRAIN_MARKER_LEN]
            .copy_from_slice(&encode_grain_marker(grain * GRAIN_SECTORS, compressed));
        let padded = (self.frame.len() as u64).next_multiple_of(SECTOR_SIZE);
        self.frame
            .resize(usize::try_from(padded).unwrap_or(self.frame.len()), 0);
        Ok(())
    }
}

/// Fills `frame` with room for a grain marker and then `data` deflated (zlib format) by
/// `compress`.
fn deflate_after_marker(
    compress: &mut Compress,
    data: &[u8],
    frame: &mut Vec<u8>,
    name: &str,
) -> Result<()> {
    frame.clear();
    frame.extend_from_slice(&[0; GRAIN_MARKER_LEN]);
    compress.reset();
    loop {
        let consumed = usize::try_from(compress.total_in()).unwrap_or(usize::MAX);
        let rest = data.get(consumed..).unwrap_or_default();
        let status = compress
            .compress_vec(rest, frame, FlushCompress::Finish)
            .map_err(|e| Error::InvalidInput(format!("{name}: deflate failed: {e}")))?;
        if status == Status::StreamEnd {
            return Ok(());
        }
        // Output space ran out (incompressible data beyond the bound): grow and go on.
        frame.reserve(4096);
    }
}

/// Appends a GT marker and grain table `index`, pointing the directory at it.
fn write_table<W: Write>(
    out: &mut W,
    name: &str,
    position: &mut u64,
    gd: &mut [u32],
    index: u64,
    table: &[u8],
) -> Result<()> {
    let marker = encode_marker(GT_SECTORS, MarkerType::GrainTable);
    out.write_all(&marker)
        .map_err(write_err(name, "grain table marker", *position))?;
    *position += SECTOR_SIZE;
    let slot = usize::try_from(index).ok().and_then(|i| gd.get_mut(i));
    if let Some(slot) = slot {
        *slot = entry(name, *position / SECTOR_SIZE)?;
    }
    out.write_all(table)
        .map_err(write_err(name, "grain table", *position))?;
    *position += table.len() as u64;
    Ok(())
}

impl<W: Write> ExtentSink for StreamOptimizedWriter<W> {
    fn alignment(&self) -> u64 {
        // A delta grain is all or nothing: it cannot say "half of it is as in the parent".
        if self.delta { GRAIN_BYTES } else { SECTOR_SIZE }
    }

    fn put(&mut self, extent: Extent) -> Result<()> {
        self.cursor.advance(&extent)?;
        let out = &mut self.out;
        self.assembler
            .push(&extent, &mut |grain, content| out.store(grain, content))
    }

    fn finish(self: Box<Self>) -> Result<WriteSummary> {
        self.cursor.finish()?;
        let mut o = self.out;
        {
            let Output {
                gt,
                gd,
                out,
                name,
                position,
                ..
            } = &mut o;
            gt.flush(&mut |index, table| write_table(out, name, position, gd, index, table))?;
        }
        let gd_sectors = (o.gd.len() as u64 * 4).div_ceil(SECTOR_SIZE);
        o.write(
            &encode_marker(gd_sectors, MarkerType::GrainDirectory),
            "grain directory marker",
        )?;
        let gd_offset = o.position / SECTOR_SIZE;
        let mut gd_bytes: Vec<u8> = o.gd.iter().flat_map(|e| e.to_le_bytes()).collect();
        gd_bytes.resize(
            usize::try_from(gd_sectors * SECTOR_SIZE).unwrap_or(gd_bytes.len()),
            0,
        );
        o.write(&gd_bytes, "grain directory")?;
        o.write(&encode_marker(1, MarkerType::Footer), "footer marker")?;
        let footer = SparseHeader {
            gd_offset,
            ..o.header.clone()
        }
        .encode();
        o.write(&footer, "footer")?;
        o.write(&encode_marker(0, MarkerType::Eos), "end-of-stream marker")?;
        o.out
            .flush()
            .map_err(write_err(&o.name, "file", o.position))?;
        Ok(WriteSummary {
            data_bytes: o.data_bytes,
            file_bytes: o.position,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn write(size: u64, extents: Vec<Extent>) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let mut w = Box::new(StreamOptimizedWriter::new(
            &mut buf,
            size,
            "/x/d.vmdk".into(),
        )?);
        for e in extents {
            w.put(e)?;
        }
        (w as Box<dyn ExtentSink>).finish()?;
        Ok(buf)
    }

    #[test]
    fn layout_of_a_one_grain_disk() {
        let size = 3 * GRAIN_BYTES + 1000; // odd: capacity rounds up to a sector
        let data = Bytes::from(vec![0x5a; 4096]);
        let file = write(
            size,
            vec![
                Extent::Zero {
                    offset: 0,
                    len: GRAIN_BYTES,
                },
                Extent::Data {
                    offset: GRAIN_BYTES,
                    data,
                },
                Extent::Zero {
                    offset: GRAIN_BYTES + 4096,
                    len: size - GRAIN_BYTES - 4096,
                },
            ],
        )
        .unwrap();
        assert_eq!(file.len() % 512, 0);
        assert_eq!(u32_at(&file, 4), 3);
        assert_eq!(u32_at(&file, 8), 0x30001);
        assert_eq!(u64_at(&file, 12), size.div_ceil(512));
        assert_eq!(u64_at(&file, 56), GD_AT_END);
        let text = String::from_utf8_lossy(&file[512..2048]);
        assert!(text.contains("createType=\"streamOptimized\""));
        assert!(text.contains(&format!("RW {} SPARSE \"d.vmdk\"", size.div_ceil(512))));
        // The one grain right after the overhead: marker with its LBA, zlib data.
        let g = 128 * 512;
        assert_eq!(u64_at(&file, g), 128);
        let clen = u32_at(&file, g + 8) as usize;
        let mut inflated = Vec::with_capacity(GRAIN_LEN);
        let mut d = flate2::Decompress::new(true);
        d.decompress_vec(
            &file[g + 12..g + 12 + clen],
            &mut inflated,
            flate2::FlushDecompress::Finish,
        )
        .unwrap();
        assert_eq!(inflated.len() as u64, GRAIN_BYTES);
        assert!(inflated[..4096].iter().all(|&b| b == 0x5a));
        assert!(inflated[4096..].iter().all(|&b| b == 0));
        // Then GT marker + GT, GD marker + GD, footer marker + footer, EOS.
        let n = file.len();
        let eos = &file[n - 512..];
        assert!(eos.iter().all(|&b| b == 0));
        assert_eq!(u32_at(&file, n - 1536 + 12), 3);
        let footer = &file[n - 1024..n - 512];
        assert_eq!(&footer[..4], b"KDMV");
        let gd_offset = u64_at(footer, 56) as usize * 512;
        assert_eq!(u32_at(&file, gd_offset - 512 + 12), 2);
        let gt_offset = u32_at(&file, gd_offset) as usize * 512;
        assert_eq!(u32_at(&file, gt_offset - 512 + 12), 1);
        assert_eq!(u64_at(&file, gt_offset - 512), 4);
        assert_eq!(u32_at(&file, gt_offset), 0);
        assert_eq!(u32_at(&file, gt_offset + 4), 128);
        assert_eq!(u32_at(&file, gt_offset + 8), 0);
    }

    #[test]
    fn incompressible_grains_are_stored_not_expanded() {
        // xorshift bytes: nothing for deflate to find.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data: Vec<u8> = (0..8 * GRAIN_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[0]
            })
            .collect();
        // Then a grain that compresses well: the probe after stored grains must not
        // store it too.
        data.extend(b"rehost ".iter().cycle().take(GRAIN_LEN));
        let mut buf = Vec::new();
        let mut w = Box::new(
            StreamOptimizedWriter::with_parent(&mut buf, 9 * GRAIN_BYTES, None, "r.vmdk".into())
                .unwrap(),
        );
        w.put(Extent::Data {
            offset: 0,
            data: Bytes::from(data.clone()),
        })
        .unwrap();
        (w as Box<dyn ExtentSink>).finish().unwrap();
        // Each grain: a 12-byte marker and 11 bytes of stored-block framing, padded to
        // 129 sectors; the fast level's static Huffman codes would need 135 or more.
        let g = 128 * 512;
        for i in 0..8 {
            let at = g + i * 129 * 512;
            assert_eq!(u64_at(&buf, at), i as u64 * 128, "grain {i}'s marker");
            let clen = u32_at(&buf, at + 8) as usize;
            assert!(clen <= GRAIN_LEN + 16, "grain {i}: {clen} bytes");
            let mut inflated = Vec::with_capacity(GRAIN_LEN);
            flate2::Decompress::new(true)
                .decompress_vec(
                    &buf[at + 12..at + 12 + clen],
                    &mut inflated,
                    flate2::FlushDecompress::Finish,
                )
                .unwrap();
            assert!(inflated == data[i * GRAIN_LEN..(i + 1) * GRAIN_LEN]);
        }
        let last = g + 8 * 129 * 512;
        assert_eq!(u64_at(&buf, last), 8 * 128);
        assert!(
            u32_at(&buf, last + 8) < 1024,
            "the text grain was compressed"
        );
    }

    #[test]
    fn a_delta_stores_zeros_and_skips_unchanged_grains() {
        let link = ParentLink {
            relative_path: "../p.vmdk".into(),
            absolute_path: "/p.vmdk".into(),
            id: crate::layer::ImageId::VmdkCid(0xabc),
            virtual_size_bytes: 3 * GRAIN_BYTES,
        };
        let mut buf = Vec::new();
        let mut w = Box::new(
            StreamOptimizedWriter::with_parent(
                &mut buf,
                3 * GRAIN_BYTES,
                Some(link),
                "/x/c.vmdk".into(),
            )
            .unwrap(),
        );
        assert_eq!(w.alignment(), GRAIN_BYTES);
        w.put(Extent::Zero {
            offset: 0,
            len: GRAIN_BYTES,
        })
        .unwrap();
        w.put(Extent::Unchanged {
            offset: GRAIN_BYTES,
            len: GRAIN_BYTES,
        })
        .unwrap();
        w.put(Extent::Data {
            offset: 2 * GRAIN_BYTES,
            data: Bytes::from(vec![0; GRAIN_LEN]),
        })
        .unwrap();
        let summary = (w as Box<dyn ExtentSink>).finish().unwrap();
        assert_eq!(summary.data_bytes, 0);
        let text = String::from_utf8_lossy(&buf[512..2048]);
        assert!(text.contains("parentCID=00000abc\n"), "{text}");
        assert!(
            text.contains("parentFileNameHint=\"../p.vmdk\"\n"),
            "{text}"
        );
        assert!(!text.contains("CID=00000abc\nparentCID"), "{text}");
        // Two one-sector zero grains, each marker with its own LBA, then the GT marker.
        let g = 128 * 512;
        assert_eq!(u64_at(&buf, g), 0);
        let first_len = u32_at(&buf, g + 8);
        assert!(first_len > 0 && first_len < 500, "{first_len}");
        assert_eq!(u64_at(&buf, g + 512), 256);
        assert_eq!(u32_at(&buf, g + 512 + 8), first_len);
        assert_eq!(u32_at(&buf, g + 1024 + 12), 1);
        let gt = g + 1536;
        assert_eq!(
            (u32_at(&buf, gt), u32_at(&buf, gt + 4), u32_at(&buf, gt + 8)),
            (128, 0, 129)
        );
    }

    #[test]
    fn incompressible_data_stays_within_max_file_bytes() {
        let size = 3 * GRAIN_BYTES + 512;
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let random: Vec<u8> = (0..size)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect();
        let file = write(
            size,
            vec![Extent::Data {
                offset: 0,
                data: Bytes::from(random),
            }],
        )
        .unwrap();
        let bound = max_file_bytes(size);
        assert!(file.len() as u64 <= bound, "{} > {bound}", file.len());
        // Tight: within a grain of it, so uploads are not sized far too large.
        assert!(
            bound - (file.len() as u64) < GRAIN_BYTES,
            "{} vs {bound}",
            file.len()
        );
    }

    #[test]
    fn empty_disk_has_no_grain_table() {
        let file = write(
            1 << 20,
            vec![Extent::Zero {
                offset: 0,
                len: 1 << 20,
            }],
        )
        .unwrap();
        // header + descriptor up to the overhead, GD marker + GD, footer marker, footer, EOS.
        assert_eq!(file.len(), 128 * 512 + 5 * 512);
        assert_eq!(u32_at(&file, 128 * 512 + 512), 0);
    }

    #[test]
    fn all_zero_data_is_not_stored() {
        let file = write(
            1 << 20,
            vec![Extent::Data {
                offset: 0,
                data: Bytes::from(vec![0; 1 << 20]),
            }],
        )
        .unwrap();
        assert_eq!(file.len(), 128 * 512 + 5 * 512);
    }

    #[test]
    fn order_violations_and_early_finish_are_rejected() {
        let mut buf = Vec::new();
        let mut w =
            Box::new(StreamOptimizedWriter::new(&mut buf, 1 << 20, "d.vmdk".into()).unwrap());
        assert!(
            w.put(Extent::Zero {
                offset: 512,
                len: 512
            })
            .is_err()
        );
        assert!(
            w.put(Extent::Zero {
                offset: 0,
                len: 100
            })
            .is_err()
        );
        w.put(Extent::Zero {
            offset: 0,
            len: 4096,
        })
        .unwrap();
        let err = (w as Box<dyn ExtentSink>).finish().unwrap_err();
        assert!(err.to_string().contains("stopped at 4096"), "{err}");
        assert!(StreamOptimizedWriter::new(Vec::new(), 0, "d.vmdk".into()).is_err());
        assert!(
            StreamOptimizedWriter::new(Vec::new(), MAX_VIRTUAL_SIZE + 1, "d.vmdk".into()).is_err()
        );
        assert!(StreamOptimizedWriter::new(Vec::new(), 1 << 20, "bad\".vmdk".into()).is_err());
    }

    /// Rough speed comparison behind [`COMPRESSION_LEVEL`]; run with `--ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn compression_level_speed() {
        let mut data = vec![0u8; 8 << 20];
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for (i, b) in data.iter_mut().enumerate() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            // Half text-like (compressible), half random.
            *b = if (i / 65536) % 2 == 0 {
                b"the quick brown fox "[i % 20] ^ (s as u8 & 1)
            } else {
                s as u8
            };
        }
        for level in [1, 6] {
            let start = std::time::Instant::now();
            let mut c = Compress::new(Compression::new(level), true);
            let mut out = Vec::with_capacity(COMPRESSED_CAPACITY);
            let mut total = 0;
            for chunk in data.chunks(65536) {
                c.reset();
                out.clear();
                c.compress_vec(chunk, &mut out, FlushCompress::Finish)
                    .unwrap();
                total += out.len();
            }
            println!("level {level}: {:?}, {total} bytes", start.elapsed());
        }
    }
}
