//! The image file as seen after log replay: the file's bytes with the replayed log
//! sectors laid over them, read without ever writing the file.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::io::ImageFile;

/// One write the log replay would have made.
#[derive(Debug, Clone)]
pub(crate) enum OverlayWrite {
    /// A 4 KiB sector of data at a file offset.
    Sector { offset: u64, data: Box<[u8]> },
    /// `len` zero bytes at a file offset.
    Zeros { offset: u64, len: u64 },
}

/// A replayed range of the file: its bytes, or zeros when `data` is `None`.
#[derive(Debug, Clone)]
struct Segment {
    end: u64,
    data: Option<Box<[u8]>>,
}

/// The file plus the replayed log writes. The writes are folded at open into
/// non-overlapping segments (a later write replaces what it covers of earlier ones), so a
/// read looks up only the segments it touches.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    file: ImageFile,
    segments: BTreeMap<u64, Segment>,
    /// The file's length once replayed (the log may extend it, see `LastFileOffset`).
    len: u64,
}

impl Source {
    /// The file as it is.
    pub(crate) fn plain(file: ImageFile) -> Self {
        let len = file.len();
        Self {
            file,
            segments: BTreeMap::new(),
            len,
        }
    }

    /// The file with `writes` replayed in order; `min_len` is the length the log says the
    /// file has.
    pub(crate) fn with_overlay(file: ImageFile, writes: Vec<OverlayWrite>, min_len: u64) -> Self {
        let len = file.len().max(min_len);
        let mut source = Self {
            file,
            segments: BTreeMap::new(),
            len,
        };
        for w in writes {
            match w {
                OverlayWrite::Sector { offset, data } => {
                    let end = offset.saturating_add(data.len() as u64);
                    source.insert(offset, end, Some(data));
                }
                OverlayWrite::Zeros { offset, len } => {
                    source.insert(offset, offset.saturating_add(len), None)
                }
            }
        }
        source
    }

    /// Lays `[start, end)` over the segments, trimming those it covers.
    fn insert(&mut self, start: u64, end: u64, data: Option<Box<[u8]>>) {
        if start >= end {
            return;
        }
        let overlapping: Vec<u64> = self
            .segments
            .range(..end)
            .rev()
            .take_while(|(_, seg)| seg.end > start)
            .map(|(&k, _)| k)
            .collect();
        for k in overlapping {
            let Some(seg) = self.segments.remove(&k) else {
                continue;
            };
            let part = |from: u64, to: u64| Segment {
                end: to,
                data: seg
                    .data
                    .as_ref()
                    .map(|d| d[idx(from - k)..idx(to - k)].into()),
            };
            if k < start {
                self.segments.insert(k, part(k, start));
            }
            if seg.end > end {
                self.segments.insert(end, part(end, seg.end));
            }
        }
        self.segments.insert(start, Segment { end, data });
    }

    /// The file's name for errors.
    pub(crate) fn name(&self) -> &str {
        self.file.name()
    }

    /// Length after replay.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Reads `structure` at `offset`, with the log replayed.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64, structure: &'static str) -> Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        let Some(end) = end.filter(|&e| e <= self.len) else {
            return Err(Error::Truncated {
                file: self.file.name().to_owned(),
                structure,
                offset,
                needed: buf.len() as u64,
                file_len: self.len,
            });
        };
        let in_file = usize::try_from(self.file.len().saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (head, tail) = buf.split_at_mut(in_file);
        self.file.read(head, offset, structure)?;
        tail.fill(0);
        for (&ws, seg) in self
            .segments
            .range(..end)
            .rev()
            .take_while(|(_, seg)| seg.end > offset)
        {
            let (from, to) = (ws.max(offset), seg.end.min(end));
            let dst = &mut buf[idx(from - offset)..idx(to - offset)];
            match &seg.data {
                Some(data) => dst.copy_from_slice(&data[idx(from - ws)..idx(to - ws)]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    /// Reads a structure into a new vector; `len` must be bounded by the caller.
    pub(crate) fn read_vec(
        &self,
        len: usize,
        offset: u64,
        structure: &'static str,
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read(&mut buf, offset, structure)?;
        Ok(buf)
    }
}

/// A difference of two offsets inside one read buffer, which fits in `usize` by
/// construction (the buffer exists).
fn idx(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn overlay_applies_in_order_and_extends_the_file() {
        let file = ImageFile::from_bytes("f", vec![1u8; 8192]);
        let writes = vec![
            OverlayWrite::Sector {
                offset: 4096,
                data: vec![7u8; 4096].into_boxed_slice(),
            },
            OverlayWrite::Zeros {
                offset: 6000,
                len: 100,
            },
            OverlayWrite::Sector {
                offset: 8192,
                data: vec![9u8; 4096].into_boxed_slice(),
            },
        ];
        let s = Source::with_overlay(file, writes, 16384);
        let b = s.read_vec(16384, 0, "x").unwrap();
        assert_eq!(b[4095], 1);
        assert_eq!(b[4096], 7);
        assert_eq!(b[6000], 0);
        assert_eq!(b[6100], 7);
        assert_eq!(b[8192], 9);
        assert_eq!(b[12288], 0);
        assert!(s.read_vec(1, 16384, "x").is_err());
        // A zero range cut into by later sectors, then a sector partly zeroed again.
        let file = ImageFile::from_bytes("f", vec![1u8; 32768]);
        let writes = vec![
            OverlayWrite::Zeros {
                offset: 0,
                len: 32768,
            },
            OverlayWrite::Sector {
                offset: 8192,
                data: vec![3u8; 4096].into_boxed_slice(),
            },
            OverlayWrite::Zeros {
                offset: 10000,
                len: 100,
            },
        ];
        let s = Source::with_overlay(file, writes, 0);
        let b = s.read_vec(32768, 0, "x").unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0) && b[12288..].iter().all(|&x| x == 0));
        assert_eq!(
            (b[8192], b[9999], b[10000], b[10099], b[10100], b[12287]),
            (3, 3, 0, 0, 3, 3)
        );
    }
}
