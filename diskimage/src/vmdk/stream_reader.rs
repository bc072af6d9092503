//! Reading a streamOptimized VMDK from a forward-only stream (an HTTP body, a pipe):
//! header, embedded descriptor, then the markers in file order (grains, grain tables,
//! directory, footer, end of stream). Grains must come in LBA order, as VMware and qemu
//! write them: a stream reader cannot go back.

use std::collections::VecDeque;
use std::io::{self, Read};

use bytes::BytesMut;
use flate2::Decompress;
use rehost_core::Extent;

use super::descriptor::{Descriptor, MAX_DESCRIPTOR_BYTES};
use super::grain::inflate;
use super::header::{
    GRAIN_MARKER_SIZE, HEADER_SIZE, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT,
    MAX_GD_ENTRIES, Marker, SECTOR, SECTOR_BYTES, SparseHeader, max_compressed_size,
};
use super::reader::layer_info;
use crate::error::{Error, Result};
use crate::layer::LayerInfo;

/// Largest `Data` extent handed out: consecutive grains are merged up to this.
const MAX_DATA_EXTENT: usize = 1 << 20;
/// Largest metadata (grain table, directory, footer) a marker may announce, in sectors:
/// the biggest directory we accept plus one sector.
const MAX_METADATA_SECTORS: u64 = MAX_GD_ENTRIES * 4 / SECTOR + 1;

/// The input and how far into it we are.
#[derive(Debug)]
struct Input<R> {
    inner: R,
    name: String,
    /// Bytes consumed.
    pos: u64,
}

impl<R: Read> Input<R> {
    fn read_exact(&mut self, buf: &mut [u8], structure: &'static str) -> Result<()> {
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(Error::Truncated {
                file: self.name.clone(),
                structure,
                offset: self.pos,
                needed: buf.len() as u64,
                file_len: self.pos,
            }),
            Err(source) => Err(Error::Io {
                file: self.name.clone(),
                op: "read",
                structure,
                offset: self.pos,
                source,
            }),
        }
    }

    /// Discards input up to `target`, which must not be behind us.
    fn skip_to(&mut self, target: u64, structure: &'static str) -> Result<()> {
        if target < self.pos {
            return Err(Error::corrupt(
                &self.name,
                structure,
                target,
                format!("lies before offset {} already read", self.pos),
            ));
        }
        let want = target - self.pos;
        let copied =
            io::copy(&mut (&mut self.inner).take(want), &mut io::sink()).map_err(|source| {
                Error::Io {
                    file: self.name.clone(),
                    op: "read",
                    structure,
                    offset: self.pos,
                    source,
                }
            })?;
        self.pos += copied;
        if copied < want {
            return Err(Error::Truncated {
                file: self.name.clone(),
                structure,
                offset: target,
                needed: 0,
                file_len: self.pos,
            });
        }
        Ok(())
    }
}

/// Reads a streamOptimized VMDK from a forward-only stream (an HTTP body, a pipe),
/// yielding its extents in order.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    input: Input<R>,
    info: LayerInfo,
    /// Grain size in sectors and bytes.
    grain_sectors: u64,
    grain_bytes: u64,
    /// The virtual offset the next extent starts at.
    next_virtual: u64,
    /// Decompressed grains not yet handed out, starting at `pending_offset`.
    pending: BytesMut,
    pending_offset: u64,
    out: VecDeque<Extent>,
    finished: bool,
    dec: Decompress,
    comp: Vec<u8>,
}

impl<R: Read> StreamReader<R> {
    /// Reads the header; `name` is used in errors.
    pub fn new(input: R, name: String) -> Result<Self> {
        let mut input = Input {
            inner: input,
            name,
            pos: 0,
        };
        let mut head = [0u8; HEADER_SIZE];
        input.read_exact(&mut head, "VMDK sparse header")?;
        let h = SparseHeader::parse(&head, &input.name, 0)?;
        if !h.compressed() {
            return Err(Error::unsupported(
                &input.name,
                "reading a sparse VMDK that is not streamOptimized from a stream",
            ));
        }
        let mut descriptor = Descriptor::default();
        if h.descriptor_offset != 0 && h.descriptor_size != 0 {
            let at = h.descriptor_offset.saturating_mul(SECTOR);
            let size = h.descriptor_size.saturating_mul(SECTOR);
            if size > MAX_DESCRIPTOR_BYTES {
                return Err(Error::corrupt(
                    &input.name,
                    "VMDK embedded descriptor",
                    at,
                    "larger than 1 MiB",
                ));
            }
            input.skip_to(at, "VMDK embedded descriptor")?;
            let mut text = vec![0u8; usize::try_from(size).unwrap_or(0)];
            input.read_exact(&mut text, "VMDK embedded descriptor")?;
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            descriptor = Descriptor::parse(&text[..end], &input.name, at)?;
        }
        input.skip_to(h.overhead.saturating_mul(SECTOR), "VMDK grains")?;
        let capacity = h.capacity * SECTOR;
        let info = layer_info(
            &input.name,
            &descriptor,
            "streamOptimized",
            capacity,
            Some(h.grain_bytes()),
            Vec::new(),
        )?;
        Ok(Self {
            input,
            info,
            grain_sectors: h.grain_size,
            grain_bytes: h.grain_bytes(),
            next_virtual: 0,
            pending: BytesMut::new(),
            pending_offset: 0,
            out: VecDeque::new(),
            finished: false,
            dec: Decompress::new(true),
            comp: Vec::new(),
        })
    }

    /// What the header said.
    pub fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn flush_pending(&mut self) {
        if !self.pending.is_empty() {
            let data = self.pending.split().freeze();
            self.out.push_back(Extent::Data {
                offset: self.pending_offset,
                data,
            });
        }
    }

    /// Reads one marker and queues what it yields.
    fn step(&mut self) -> Result<()> {
        let at = self.input.pos;
        let mut sector = [0u8; SECTOR_BYTES];
        self.input.read_exact(
            &mut sector,
            "VMDK marker (the stream ends without an end-of-stream marker)",
        )?;
        let mut first = [0u8; 16];
        first.copy_from_slice(&sector[..16]);
        let marker = Marker::parse(&first);
        if marker.size == 0 {
            if marker.kind == MARKER_EOS {
                self.flush_pending();
                let capacity = self.info.virtual_size_bytes;
                if self.next_virtual < capacity {
                    self.out.push_back(Extent::Unchanged {
                        offset: self.next_virtual,
                        len: capacity - self.next_virtual,
                    });
                }
                self.finished = true;
                return Ok(());
            }
            // Grain table, directory, footer: the random-access reader's business; a stream
            // only skips them.
            if !matches!(marker.kind, MARKER_GT | MARKER_GD | MARKER_FOOTER) {
                return Err(Error::corrupt(
                    &self.input.name,
                    "VMDK marker",
                    at,
                    format!("unknown marker type {}", marker.kind),
                ));
            }
            if marker.val > MAX_METADATA_SECTORS {
                return Err(Error::corrupt(
                    &self.input.name,
                    "VMDK marker",
                    at,
                    format!("announces {} sectors of metadata", marker.val),
                ));
            }
            return self
                .input
                .skip_to(at + SECTOR + marker.val * SECTOR, "VMDK metadata");
        }
        self.grain(at, marker, &sector)
    }

    fn grain(&mut self, at: u64, marker: Marker, sector: &[u8]) -> Result<()> {
        let gb = self.grain_bytes;
        let capacity = self.info.virtual_size_bytes;
        let name = self.input.name.clone();
        let bad = |reason: String| Error::corrupt(&name, "VMDK compressed grain", at, reason);
        let size = u64::from(marker.size);
        if size > max_compressed_size(gb) {
            return Err(bad(format!(
                "compressed size {size} exceeds {}",
                max_compressed_size(gb)
            )));
        }
        let start = marker
            .val
            .checked_mul(SECTOR)
            .filter(|&s| s < capacity)
            .ok_or_else(|| bad(format!("LBA {} is past the capacity", marker.val)))?;
        if marker.val % self.grain_sectors != 0 {
            return Err(bad(format!(
                "LBA {} is not at a grain boundary",
                marker.val
            )));
        }
        if start < self.next_virtual {
            return Err(bad(format!(
                "grain at LBA {} comes after data up to byte {}: grains out of order cannot be read from a stream",
                marker.val, self.next_virtual
            )));
        }
        let valid = gb.min(capacity - start);
        // The compressed bytes: the rest of the first sector, then whole sectors.
        let size = usize::try_from(size).map_err(|_| bad("too large".into()))?;
        let total = (GRAIN_MARKER_SIZE + size).div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        self.comp.clear();
        self.comp.extend_from_slice(sector);
        self.comp.resize(total, 0);
        self.input
            .read_exact(&mut self.comp[SECTOR_BYTES..], "VMDK compressed grain")?;
        let gb_usize = usize::try_from(gb).map_err(|_| bad("grain too large".into()))?;
        if start > self.next_virtual || self.pending.len() + gb_usize > MAX_DATA_EXTENT {
            self.flush_pending();
        }
        if start > self.next_virtual {
            self.out.push_back(Extent::Unchanged {
                offset: self.next_virtual,
                len: start - self.next_virtual,
            });
        }
        if self.pending.is_empty() {
            self.pending_offset = start;
            self.pending.reserve(MAX_DATA_EXTENT.max(gb_usize));
        }
        let base = self.pending.len();
        self.pending.resize(base + gb_usize, 0);
        let input = &self.comp[GRAIN_MARKER_SIZE..GRAIN_MARKER_SIZE + size];
        let n = inflate(&mut self.dec, input, &mut self.pending[base..]).map_err(&bad)? as u64;
        if n != gb && n != valid {
            return Err(bad(format!(
                "decompresses to {n} bytes, not the grain's {gb}"
            )));
        }
        self.pending
            .truncate(base + usize::try_from(valid).unwrap_or(0));
        self.next_virtual = start + valid;
        Ok(())
    }
}

impl<R: Read> Iterator for StreamReader<R> {
    type Item = Result<Extent>;
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.out.pop_front() {
                return Some(Ok(e));
            }
            if self.finished {
                return None;
            }
            if let Err(e) = self.step() {
                self.finished = true;
                self.out.clear();
                return Some(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmdk::header::tests::header_bytes;
    use crate::vmdk::header::{FLAG_COMPRESSED, FLAG_MARKERS, FLAG_VALID_NEWLINE};

    const FLAGS: u32 = FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS;

    /// A header with grains from sector 2, then `body`.
    fn stream(capacity: u64, body: &[u8]) -> Vec<u8> {
        let mut s = header_bytes(capacity, 8, FLAGS, 1, 0, 2).to_vec();
        s.resize(1024, 0);
        s.extend(body);
        s
    }

    fn marker(val: u64, size: u32, kind: u32) -> Vec<u8> {
        let mut m = vec![0u8; 512];
        m[0..8].copy_from_slice(&val.to_le_bytes());
        m[8..12].copy_from_slice(&size.to_le_bytes());
        m[12..16].copy_from_slice(&kind.to_le_bytes());
        m
    }

    fn first_error(bytes: &[u8]) -> Error {
        match StreamReader::new(bytes, "s".into()) {
            Err(e) => e,
            Ok(mut r) => r.find_map(Result::err).expect("an error"),
        }
    }

    #[test]
    fn an_empty_stream_is_one_unchanged_extent() {
        let mut body = marker(4, 0, MARKER_GD);
        body.extend(vec![0u8; 4 * 512]);
        body.extend(marker(0, 0, MARKER_EOS));
        let bytes = stream(100, &body);
        let r = StreamReader::new(&bytes[..], "s".into()).unwrap();
        assert_eq!(
            (r.info().virtual_size_bytes, r.info().cluster_size_bytes),
            (51_200, Some(4096))
        );
        let all: Vec<_> = r.collect::<Result<_>>().unwrap();
        assert_eq!(
            all,
            vec![Extent::Unchanged {
                offset: 0,
                len: 51_200
            }]
        );
    }

    #[test]
    fn bad_markers_and_inputs_are_errors() {
        let plain = header_bytes(100, 8, FLAG_VALID_NEWLINE, 1, 0, 2);
        assert!(matches!(
            StreamReader::new(&plain[..], "s".into()),
            Err(Error::Unsupported { .. })
        ));
        assert!(
            first_error(&stream(100, &marker(1, 0, 9)))
                .to_string()
                .contains("unknown marker type 9")
        );
        assert!(
            first_error(&stream(100, &marker(u64::MAX, 0, MARKER_GT)))
                .to_string()
                .contains("metadata")
        );
        assert!(
            first_error(&stream(100, &marker(3, 20, 0)))
                .to_string()
                .contains("grain boundary")
        );
        assert!(
            first_error(&stream(100, &marker(800, 20, 0)))
                .to_string()
                .contains("past the capacity")
        );
        assert!(
            first_error(&stream(100, &marker(0, u32::MAX, 0)))
                .to_string()
                .contains("exceeds")
        );
        assert!(matches!(
            first_error(&stream(100, &marker(0, 2000, 0))),
            Error::Truncated { .. }
        ));
        assert!(matches!(
            first_error(&stream(100, &[])),
            Error::Truncated { .. }
        ));
        // A grain whose data is not deflate.
        let mut garbage = marker(0, 20, 0);
        garbage[12..32].fill(0x77);
        assert!(matches!(
            first_error(&stream(100, &garbage)),
            Error::Corrupt { offset: 1024, .. }
        ));
    }

    /// A reader that fails with an I/O error after the header.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let header = header_bytes(100, 8, FLAGS, 1, 0, 1);
            if self.0 >= header.len() {
                return Err(io::Error::other("connection reset"));
            }
            let n = buf.len().min(header.len() - self.0);
            buf[..n].copy_from_slice(&header[self.0..self.0 + n]);
            self.0 += n;
            Ok(n)
        }
    }

    #[test]
    fn io_errors_end_the_iteration() {
        let mut r = StreamReader::new(Failing(0), "s".into()).unwrap();
        assert!(matches!(r.next(), Some(Err(Error::Io { .. }))));
        assert!(r.next().is_none());
    }
}
