//! Cutting an extent stream into grains, and the one grain table a writer fills at a time.

use rehost_core::Extent;

use super::header::{GRAIN_BYTES, GRAIN_LEN, GT_LEN, GTES_PER_GT};
use crate::error::{Error, Result};

/// What one whole grain of the stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grain<'a> {
    /// Bytes, always a full grain (a last grain past the end of the disk is zero-padded).
    Data(&'a [u8]),
    /// Recorded as zeros (and no data in it).
    Zero,
    /// Same as the parent (no data nor zero extent in it).
    Unchanged,
}

/// Regroups ordered extents into whole grains. Holds one grain buffer; grains covered
/// entirely by one `Data` extent are passed through without a copy.
#[derive(Debug)]
pub(crate) struct GrainAssembler {
    virtual_size: u64,
    buf: Vec<u8>,
    /// `buf` holds bytes of a `Data` extent (and must be cleared after use).
    has_data: bool,
    has_zero: bool,
}

impl GrainAssembler {
    /// An assembler for a disk of `virtual_size` bytes.
    pub(crate) fn new(virtual_size: u64) -> Self {
        Self {
            virtual_size,
            buf: vec![0; GRAIN_LEN],
            has_data: false,
            has_zero: false,
        }
    }

    /// Feeds `extent` (already checked to continue the stream) and calls `emit` with the
    /// index and content of every grain it completes.
    pub(crate) fn push(
        &mut self,
        extent: &Extent,
        emit: &mut dyn FnMut(u64, Grain<'_>) -> Result<()>,
    ) -> Result<()> {
        let (start, end) = (extent.offset(), extent.end());
        let mut offset = start;
        while offset < end {
            let grain = offset / GRAIN_BYTES;
            let in_grain = offset % GRAIN_BYTES;
            let grain_start = grain * GRAIN_BYTES;
            let grain_end = grain_start
                .saturating_add(GRAIN_BYTES)
                .min(self.virtual_size);
            let piece_end = end.min(grain_end);
            match extent {
                Extent::Data { data, .. } => {
                    let piece = slice(data, offset - start, piece_end - start)?;
                    if in_grain == 0 && piece.len() as u64 == GRAIN_BYTES {
                        emit(grain, Grain::Data(piece))?;
                        offset = piece_end;
                        continue;
                    }
                    let at = usize::try_from(in_grain).map_err(|_| too_big())?;
                    let dst = self.buf.get_mut(at..at + piece.len()).ok_or_else(too_big)?;
                    dst.copy_from_slice(piece);
                    self.has_data = true;
                }
                Extent::Zero { .. } => self.has_zero = true,
                Extent::Unchanged { .. } => {}
            }
            if piece_end == grain_end {
                let content = if self.has_data {
                    Grain::Data(&self.buf)
                } else if self.has_zero {
                    Grain::Zero
                } else {
                    Grain::Unchanged
                };
                emit(grain, content)?;
                if self.has_data {
                    self.buf.fill(0);
                }
                self.has_data = false;
                self.has_zero = false;
            }
            offset = piece_end;
        }
        Ok(())
    }
}

fn slice(data: &[u8], from: u64, to: u64) -> Result<&[u8]> {
    let from = usize::try_from(from).map_err(|_| too_big())?;
    let to = usize::try_from(to).map_err(|_| too_big())?;
    data.get(from..to).ok_or_else(too_big)
}

fn too_big() -> Error {
    Error::InvalidInput("extent does not fit in memory".into())
}

/// The grain table being filled: tables are written once the stream has moved past them,
/// so only one is ever held.
#[derive(Debug)]
pub(crate) struct GrainTable {
    index: Option<u64>,
    bytes: Vec<u8>,
}

impl GrainTable {
    /// An empty table.
    pub(crate) fn new() -> Self {
        Self {
            index: None,
            bytes: vec![0; GT_LEN],
        }
    }

    /// Records `value` for `grain`. If the grain belongs to another table, the held one is
    /// first passed to `flush` with its index.
    pub(crate) fn set(
        &mut self,
        grain: u64,
        value: u32,
        flush: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let table = grain / GTES_PER_GT;
        if self.index != Some(table) {
            self.flush(flush)?;
            self.index = Some(table);
        }
        let at = usize::try_from(grain % GTES_PER_GT).map_err(|_| too_big())? * 4;
        if let Some(entry) = self.bytes.get_mut(at..at + 4) {
            entry.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }

    /// Passes the held table, if any, to `flush` and empties it.
    pub(crate) fn flush(&mut self, flush: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        if let Some(index) = self.index.take() {
            flush(index, &self.bytes)?;
            self.bytes.fill(0);
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn collect(size: u64, extents: &[Extent]) -> Vec<(u64, String)> {
        let mut a = GrainAssembler::new(size);
        let mut out = Vec::new();
        for e in extents {
            a.push(e, &mut |g, grain| {
                out.push((
                    g,
                    match grain {
                        Grain::Data(d) => {
                            assert_eq!(d.len() as u64, GRAIN_BYTES);
                            format!("data:{}:{}", d[0], d[d.len() - 1])
                        }
                        Grain::Zero => "zero".into(),
                        Grain::Unchanged => "same".into(),
                    },
                ));
                Ok(())
            })
            .unwrap();
        }
        out
    }

    #[test]
    fn grains_mix_extents_and_pad_the_last_one() {
        let g = GRAIN_BYTES;
        let size = 3 * g + 512;
        let out = collect(
            size,
            &[
                Extent::Data {
                    offset: 0,
                    data: Bytes::from(vec![7; (g + 512) as usize]),
                },
                Extent::Zero {
                    offset: g + 512,
                    len: g - 512,
                },
                Extent::Unchanged {
                    offset: 2 * g,
                    len: g,
                },
                Extent::Data {
                    offset: 3 * g,
                    data: Bytes::from(vec![9; 512]),
                },
            ],
        );
        assert_eq!(
            out,
            vec![
                (0, "data:7:7".to_string()),
                (1, "data:7:0".to_string()),
                (2, "same".to_string()),
                (3, "data:9:0".to_string()),
            ]
        );
    }

    #[test]
    fn buffer_is_cleared_between_grains() {
        let g = GRAIN_BYTES;
        let out = collect(
            2 * g,
            &[
                Extent::Zero {
                    offset: 0,
                    len: g - 512,
                },
                Extent::Data {
                    offset: g - 512,
                    data: Bytes::from(vec![5; 1024]),
                },
                Extent::Zero {
                    offset: g + 512,
                    len: g - 512,
                },
            ],
        );
        assert_eq!(
            out,
            vec![(0, "data:0:5".to_string()), (1, "data:5:0".to_string())]
        );
    }

    #[test]
    fn tables_flush_when_the_stream_moves_on() {
        let mut t = GrainTable::new();
        let mut flushed = Vec::new();
        let mut f = |i: u64, b: &[u8]| {
            flushed.push((i, b.to_vec()));
            Ok(())
        };
        t.set(1, 0x80, &mut f).unwrap();
        t.set(513, 0x100, &mut f).unwrap();
        t.flush(&mut f).unwrap();
        t.flush(&mut f).unwrap();
        assert_eq!(flushed.len(), 2);
        assert_eq!(flushed[0].0, 0);
        assert_eq!(&flushed[0].1[4..8], &[0x80, 0, 0, 0]);
        assert_eq!(flushed[1].0, 1);
        assert_eq!(&flushed[1].1[4..8], &[0, 1, 0, 0]);
        assert!(flushed[1].1[..4].iter().all(|&b| b == 0));
    }
}
