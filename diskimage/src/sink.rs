//! Where extents go: every image writer is an [`ExtentSink`], fed in disk order, so a
//! writer never needs the whole disk in memory.

use rehost_core::{Extent, SECTOR_SIZE};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::layer::ImageId;

/// A consumer of an ordered extent stream (an image writer, a hasher, an uploader).
///
/// Extents arrive in order, contiguous from 0 to the virtual size. Boundaries between
/// extents of different kinds fall on multiples of [`ExtentSink::alignment`], except at
/// the end of the disk.
pub trait ExtentSink {
    /// The unit `Data`/`Zero` runs must be aligned to: 512 for most writers; a delta
    /// format that allocates whole grains asks for its grain size, since it cannot
    /// record "half of this grain is as in the parent".
    fn alignment(&self) -> u64 {
        SECTOR_SIZE
    }

    /// Takes the next extent.
    fn put(&mut self, extent: Extent) -> Result<()>;

    /// Writes trailing structures and flushes. Fails if the stream stopped short.
    fn finish(self: Box<Self>) -> Result<WriteSummary>;
}

/// What a writer wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WriteSummary {
    /// Bytes of the virtual disk stored as data.
    pub data_bytes: u64,
    /// Size of the output file.
    pub file_bytes: u64,
}

/// A differencing image's link to its parent, as the writer records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's path relative to the child's folder (what VMDK's parentFileNameHint
    /// and VHD/VHDX relative locators hold).
    pub relative_path: String,
    /// The parent's absolute path (VHD/VHDX absolute locators).
    pub absolute_path: String,
    /// The parent's identity (CID, unique id, DataWriteGuid), read from the parent.
    pub id: ImageId,
    /// The parent's virtual size.
    pub virtual_size_bytes: u64,
}

/// Tracks the position of an extent stream and rejects one that is out of order, has
/// gaps, runs past the virtual size or breaks the sink's alignment.
#[derive(Debug, Clone)]
pub struct SinkCursor {
    position: u64,
    virtual_size: u64,
    alignment: u64,
}

impl SinkCursor {
    /// A cursor at 0 for a disk of `virtual_size` bytes.
    pub fn new(virtual_size: u64, alignment: u64) -> Self {
        Self {
            position: 0,
            virtual_size,
            alignment: alignment.max(1),
        }
    }

    /// Where the next extent must start.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// The disk's size.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Checks `extent` continues the stream and moves past it.
    pub fn advance(&mut self, extent: &Extent) -> Result<()> {
        let (offset, end) = (extent.offset(), extent.end());
        if offset != self.position {
            return Err(Error::InvalidInput(format!(
                "extent at offset {offset} does not continue the stream at {}",
                self.position
            )));
        }
        if end > self.virtual_size {
            return Err(Error::InvalidInput(format!(
                "extent [{offset}, {end}) runs past the virtual size {}",
                self.virtual_size
            )));
        }
        if end % self.alignment != 0 && end != self.virtual_size {
            return Err(Error::InvalidInput(format!(
                "extent [{offset}, {end}) is not aligned to {} bytes",
                self.alignment
            )));
        }
        self.position = end;
        Ok(())
    }

    /// Checks the stream reached the end of the disk.
    pub fn finish(&self) -> Result<()> {
        if self.position != self.virtual_size {
            return Err(Error::InvalidInput(format!(
                "extent stream stopped at {} of {} bytes",
                self.position, self.virtual_size
            )));
        }
        Ok(())
    }
}

/// True if every byte is zero. Folds 4 KiB at a time so the compiler vectorises it.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|chunk| chunk.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn cursor_rejects_gaps_overruns_and_misalignment() {
        let mut c = SinkCursor::new(4096, 1024);
        c.advance(&Extent::Zero {
            offset: 0,
            len: 1024,
        })
        .unwrap();
        assert!(
            c.advance(&Extent::Zero {
                offset: 2048,
                len: 1024
            })
            .is_err()
        );
        assert!(
            c.advance(&Extent::Zero {
                offset: 1024,
                len: 512
            })
            .is_err()
        );
        assert!(
            c.advance(&Extent::Unchanged {
                offset: 1024,
                len: 4096
            })
            .is_err()
        );
        c.advance(&Extent::Data {
            offset: 1024,
            data: Bytes::from(vec![1; 3072]),
        })
        .unwrap();
        c.finish().unwrap();
        assert!(SinkCursor::new(10, 1).finish().is_err());
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[0; 10000]));
        let mut b = vec![0; 10000];
        b[9999] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
