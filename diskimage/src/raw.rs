//! Raw images: the file is the disk.

use std::io::{Seek, SeekFrom, Write};

use rehost_core::{Extent, ExtentKind, MapExtent};

use crate::error::{Error, Result};
use crate::io::ImageFile;
use crate::layer::{Format, Layer, LayerInfo};
use crate::sink::{ExtentSink, SinkCursor, WriteSummary};

/// A raw image. Its map is one `Data` extent: a raw file says nothing about allocation
/// (zero detection happens when its bytes are read, see [`crate::stream`]).
#[derive(Debug)]
pub struct RawLayer {
    file: ImageFile,
    info: LayerInfo,
}

impl RawLayer {
    /// Opens `file` as a raw disk of its own length.
    pub fn open(file: ImageFile) -> Self {
        let info = LayerInfo {
            format: Format::Raw,
            subformat: "raw".into(),
            virtual_size_bytes: file.len(),
            cluster_size_bytes: None,
            parent: None,
            id: None,
            warnings: Vec::new(),
        };
        Self { file, info }
    }
}

impl Layer for RawLayer {
    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        check_range(&self.info, offset, len)?;
        Ok(if len == 0 {
            Vec::new()
        } else {
            vec![MapExtent {
                offset,
                len,
                kind: ExtentKind::Data,
            }]
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.info, offset, buf.len() as u64)?;
        self.file.read(buf, offset, "data")
    }
}

/// Rejects a range that is not inside the virtual disk.
pub(crate) fn check_range(info: &LayerInfo, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= info.virtual_size_bytes => Ok(()),
        _ => Err(Error::InvalidInput(format!(
            "range [{offset}, +{len}) is outside the virtual disk of {} bytes",
            info.virtual_size_bytes
        ))),
    }
}

/// Writes a raw image, leaving holes (sparse on file systems that support them) for
/// zero and unchanged extents.
#[derive(Debug)]
pub struct RawWriter<W: Write + Seek> {
    out: W,
    cursor: SinkCursor,
    data_bytes: u64,
    last_was_data: bool,
    name: String,
}

impl<W: Write + Seek> RawWriter<W> {
    /// A writer of a `virtual_size`-byte raw image to `out` (expected empty).
    pub fn new(out: W, virtual_size: u64, name: impl Into<String>) -> Self {
        Self {
            out,
            cursor: SinkCursor::new(virtual_size, 1),
            data_bytes: 0,
            last_was_data: false,
            name: name.into(),
        }
    }

    fn io_err(&self, offset: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            file: self.name.clone(),
            op: "write",
            structure: "data",
            offset,
            source,
        }
    }
}

impl<W: Write + Seek> ExtentSink for RawWriter<W> {
    fn alignment(&self) -> u64 {
        1
    }

    fn put(&mut self, extent: Extent) -> Result<()> {
        self.cursor.advance(&extent)?;
        if let Extent::Data { offset, data } = &extent {
            let offset = *offset;
            self.out
                .seek(SeekFrom::Start(offset))
                .map_err(self.io_err(offset))?;
            self.out.write_all(data).map_err(self.io_err(offset))?;
            self.data_bytes += data.len() as u64;
            self.last_was_data = true;
        } else if !extent.is_empty() {
            self.last_was_data = false;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<WriteSummary> {
        self.cursor.finish()?;
        let size = self.cursor.virtual_size();
        if !self.last_was_data && size > 0 {
            // The file must reach the virtual size even when it ends in a hole.
            self.out
                .seek(SeekFrom::Start(size - 1))
                .map_err(self.io_err(size - 1))?;
            self.out.write_all(&[0]).map_err(self.io_err(size - 1))?;
        }
        self.out.flush().map_err(self.io_err(size))?;
        Ok(WriteSummary {
            data_bytes: self.data_bytes,
            file_bytes: size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::io::Cursor;

    #[test]
    fn raw_layer_reads_and_maps() {
        let layer = RawLayer::open(ImageFile::from_bytes("r", (0..=255u8).collect::<Vec<_>>()));
        let mut b = [0u8; 4];
        layer.read_at(&mut b, 10).unwrap();
        assert_eq!(b, [10, 11, 12, 13]);
        assert!(layer.read_at(&mut b, 254).is_err());
        assert_eq!(layer.map_range(0, 256).unwrap().len(), 1);
    }

    #[test]
    fn raw_writer_fills_holes_to_the_virtual_size() {
        let mut w = Box::new(RawWriter::new(Cursor::new(Vec::new()), 10, "out"));
        w.put(Extent::Data {
            offset: 0,
            data: Bytes::from_static(b"ab"),
        })
        .unwrap();
        w.put(Extent::Zero { offset: 2, len: 8 }).unwrap();
        let summary = (w as Box<dyn ExtentSink>).finish().unwrap();
        assert_eq!(summary.data_bytes, 2);
    }
}
