//! The VMDK layer: a virtual disk made of the extents a descriptor lists (embedded in a
//! sparse extent, or a separate text file), concatenated in order.

use std::sync::Arc;

use rehost_core::{ExtentKind, MapExtent};

use super::descriptor::{Access, Descriptor, ExtentType, MAX_DESCRIPTOR_BYTES};
use super::header::{MAGIC, MAX_CAPACITY_SECTORS, SECTOR};
use super::sparse::SparseExtent;
use crate::error::{Error, Result};
use crate::io::{FileSystem, ImageFile};
use crate::layer::{Format, ImageId, Layer, LayerInfo, ParentRef};
use crate::map::MapBuilder;
use crate::raw::check_range;

pub use super::stream_reader::StreamReader;

/// Where one extent's bytes come from.
#[derive(Debug)]
enum Source {
    Sparse(SparseExtent),
    /// A flat file, from a byte offset.
    Flat {
        file: ImageFile,
        offset: u64,
    },
    Zero,
}

/// One extent placed on the virtual disk.
#[derive(Debug)]
struct Piece {
    /// Byte offset on the virtual disk.
    start: u64,
    /// Length in bytes.
    len: u64,
    source: Source,
}

/// An opened VMDK.
#[derive(Debug)]
pub struct VmdkLayer {
    info: LayerInfo,
    pieces: Vec<Piece>,
}

/// Opens a VMDK: a sparse extent with an embedded descriptor, or a text descriptor whose
/// extents are opened through `fs` (relative to the descriptor's folder).
pub fn open(fs: &dyn FileSystem, file: ImageFile) -> Result<Arc<dyn Layer>> {
    Ok(Arc::new(VmdkLayer::open(fs, file)?))
}

impl VmdkLayer {
    /// Opens `file`, a sparse extent or a descriptor.
    pub fn open(fs: &dyn FileSystem, file: ImageFile) -> Result<Self> {
        let magic: [u8; 4] = if file.len() >= 4 {
            file.read_array(0, "VMDK magic")?
        } else {
            [0; 4]
        };
        if &magic == MAGIC {
            Self::open_sparse(file)
        } else {
            Self::open_descriptor(fs, file)
        }
    }

    /// A sparse extent opened on its own: its embedded descriptor (if any) gives the
    /// identity; the extent itself is the whole disk whatever file name the descriptor says
    /// (files get renamed).
    fn open_sparse(file: ImageFile) -> Result<Self> {
        let name = file.name().to_owned();
        let mut extent = SparseExtent::open(file)?;
        let descriptor = extent.descriptor.take().unwrap_or_default();
        let mut warnings = std::mem::take(&mut extent.warnings);
        if descriptor.extents.len() > 1 {
            return Err(Error::unsupported(
                &name,
                "a sparse extent whose embedded descriptor lists several extents",
            ));
        }
        let capacity = extent.capacity_bytes();
        if let Some(line) = descriptor.extents.first() {
            if line.sectors.saturating_mul(SECTOR) != capacity {
                warnings.push(format!(
                    "the descriptor says {} sectors, the sparse header {}; using the header",
                    line.sectors,
                    extent.header().capacity
                ));
            }
        }
        let default_type = if extent.header().compressed() {
            "streamOptimized"
        } else {
            "monolithicSparse"
        };
        let grain = extent.header().grain_bytes();
        let pieces = vec![Piece {
            start: 0,
            len: capacity,
            source: Source::Sparse(extent),
        }];
        let info = layer_info(
            &name,
            &descriptor,
            default_type,
            capacity,
            Some(grain),
            warnings,
        )?;
        Ok(Self { info, pieces })
    }

    fn open_descriptor(fs: &dyn FileSystem, file: ImageFile) -> Result<Self> {
        let name = file.name().to_owned();
        if file.len() > MAX_DESCRIPTOR_BYTES {
            return Err(Error::corrupt(
                &name,
                "VMDK descriptor",
                0,
                format!(
                    "a {}-byte file is neither a sparse extent nor a descriptor (at most {MAX_DESCRIPTOR_BYTES} bytes)",
                    file.len()
                ),
            ));
        }
        let text = file.read_vec(
            usize::try_from(file.len()).unwrap_or(0),
            0,
            "VMDK descriptor",
        )?;
        let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
        let descriptor = Descriptor::parse(&text[..end], &name, 0)?;
        if descriptor.extents.is_empty() {
            return Err(Error::corrupt(
                &name,
                "VMDK descriptor",
                0,
                "no extent lines",
            ));
        }
        let mut pieces = Vec::with_capacity(descriptor.extents.len());
        let mut warnings = Vec::new();
        let mut start = 0u64;
        let mut grain = None;
        for line in &descriptor.extents {
            let len = line
                .sectors
                .checked_mul(SECTOR)
                .filter(|_| line.sectors <= MAX_CAPACITY_SECTORS)
                .ok_or_else(|| {
                    Error::corrupt(
                        &name,
                        "VMDK descriptor",
                        0,
                        format!("an extent of {} sectors", line.sectors),
                    )
                })?;
            if line.access == Access::Denied {
                return Err(Error::unsupported(&name, "NOACCESS extents"));
            }
            let source = match line.kind {
                ExtentType::Zero => Source::Zero,
                ExtentType::Other(kind) => {
                    return Err(Error::unsupported(&name, format!("{kind} extents")));
                }
                ExtentType::Sparse | ExtentType::Flat => {
                    let reference = line.file.as_deref().unwrap_or_default();
                    let path = fs.resolve(&name, reference);
                    if fs.identity(&path) == fs.identity(&name) {
                        return Err(Error::corrupt(
                            &name,
                            "VMDK descriptor",
                            0,
                            format!("extent {reference:?} is the descriptor itself"),
                        ));
                    }
                    let extent_file = fs.open(&path)?;
                    if line.kind == ExtentType::Sparse {
                        let extent = SparseExtent::open(extent_file)?;
                        warnings.extend(extent.warnings.iter().cloned());
                        if extent.capacity_bytes() < len {
                            warnings.push(format!("{path}: the sparse extent holds fewer sectors than its descriptor line says; the rest reads as zero"));
                        }
                        grain.get_or_insert(extent.header().grain_bytes());
                        Source::Sparse(extent)
                    } else {
                        let offset = line.offset.saturating_mul(SECTOR);
                        if offset
                            .checked_add(len)
                            .is_none_or(|end| end > extent_file.len())
                        {
                            return Err(Error::Truncated {
                                file: path,
                                structure: "VMDK flat extent",
                                offset,
                                needed: len,
                                file_len: extent_file.len(),
                            });
                        }
                        Source::Flat {
                            file: extent_file,
                            offset,
                        }
                    }
                }
            };
            if len > 0 {
                pieces.push(Piece { start, len, source });
            }
            start = start
                .checked_add(len)
                .filter(|&s| s <= MAX_CAPACITY_SECTORS * SECTOR)
                .ok_or_else(|| {
                    Error::corrupt(
                        &name,
                        "VMDK descriptor",
                        0,
                        "the extents add up to more than 64 TiB",
                    )
                })?;
        }
        let info = layer_info(&name, &descriptor, "monolithicFlat", start, grain, warnings)?;
        Ok(Self { info, pieces })
    }

    /// Index of the first piece that ends after `offset`.
    fn first_piece(&self, offset: u64) -> usize {
        self.pieces.partition_point(|p| p.start + p.len <= offset)
    }
}

/// Builds the layer info from a descriptor.
pub(super) fn layer_info(
    name: &str,
    d: &Descriptor,
    default_type: &str,
    size: u64,
    grain: Option<u64>,
    warnings: Vec<String>,
) -> Result<LayerInfo> {
    let parent = match d.parent_cid {
        None => None,
        Some(cid) => {
            let hint = d
                .parent_hint
                .as_deref()
                .filter(|h| !h.is_empty())
                .ok_or_else(|| {
                    Error::corrupt(
                        name,
                        "VMDK descriptor",
                        0,
                        "parentCID names a parent but there is no parentFileNameHint",
                    )
                })?;
            let hint = hint.replace('\\', "/");
            let mut candidates = vec![hint.clone()];
            if let Some(base) = hint
                .rsplit('/')
                .next()
                .filter(|b| !b.is_empty() && *b != hint)
            {
                candidates.push(base.to_owned());
            }
            Some(ParentRef {
                candidates,
                expected_id: Some(ImageId::VmdkCid(cid)),
            })
        }
    };
    Ok(LayerInfo {
        format: Format::Vmdk,
        subformat: if d.create_type.is_empty() {
            default_type.to_owned()
        } else {
            d.create_type.clone()
        },
        virtual_size_bytes: size,
        cluster_size_bytes: grain,
        parent,
        id: d.cid.map(ImageId::VmdkCid),
        warnings,
    })
}

impl Layer for VmdkLayer {
    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        check_range(&self.info, offset, len)?;
        let end = offset + len;
        let mut map = MapBuilder::new();
        for piece in self.pieces.iter().skip(self.first_piece(offset)) {
            if piece.start >= end {
                break;
            }
            let from = offset.max(piece.start);
            let to = end.min(piece.start + piece.len);
            match &piece.source {
                Source::Sparse(s) => s.map(from - piece.start, to - from, piece.start, &mut map)?,
                Source::Flat { .. } => map.push(from, to - from, ExtentKind::Data),
                Source::Zero => map.push(from, to - from, ExtentKind::Zero),
            }
        }
        Ok(map.finish())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.info, offset, buf.len() as u64)?;
        let end = offset + buf.len() as u64;
        for piece in self.pieces.iter().skip(self.first_piece(offset)) {
            if piece.start >= end {
                break;
            }
            let from = offset.max(piece.start);
            let to = end.min(piece.start + piece.len);
            let at = usize::try_from(from - offset)
                .map_err(|_| Error::InvalidInput("read too large".into()))?;
            let n = usize::try_from(to - from)
                .map_err(|_| Error::InvalidInput("read too large".into()))?;
            let dst = &mut buf[at..at + n];
            match &piece.source {
                Source::Sparse(s) => s.read(dst, from - piece.start)?,
                Source::Flat { file, offset: base } => {
                    file.read(dst, base + (from - piece.start), "VMDK flat extent")?
                }
                Source::Zero => dst.fill(0),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFs;

    fn open_text(fs: &MemFs, text: &str) -> Result<VmdkLayer> {
        VmdkLayer::open(fs, ImageFile::from_bytes("dir/d.vmdk", text.to_owned()))
    }

    #[test]
    fn parent_candidates_use_forward_slashes_then_the_bare_name() {
        let fs = MemFs::new();
        let layer = open_text(
            &fs,
            "CID=00000002\nparentCID=0000000a\nparentFileNameHint=\"C:\\vms\\b.vmdk\"\nRW 8 ZERO\n",
        )
        .unwrap();
        let parent = layer.info().parent.clone().unwrap();
        assert_eq!(
            parent.candidates,
            vec!["C:/vms/b.vmdk".to_owned(), "b.vmdk".to_owned()]
        );
        assert_eq!(parent.expected_id, Some(ImageId::VmdkCid(10)));
        assert_eq!(layer.info().id, Some(ImageId::VmdkCid(2)));
        assert_eq!(
            layer.map_range(0, 4096).unwrap(),
            vec![MapExtent {
                offset: 0,
                len: 4096,
                kind: ExtentKind::Zero
            }]
        );
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let mut fs = MemFs::new();
        fs.insert("dir/flat.bin", vec![7u8; 4096]);
        assert!(matches!(
            open_text(&fs, "# nothing\n"),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            open_text(&fs, "NOACCESS 8 FLAT \"flat.bin\" 0\n"),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            open_text(&fs, "RW 8 VMFSSPARSE \"flat.bin\"\n"),
            Err(Error::Unsupported { .. })
        ));
        assert!(matches!(
            open_text(&fs, "RW 8 FLAT \"d.vmdk\" 0\n"),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            open_text(&fs, "RW 8 FLAT \"missing.bin\" 0\n"),
            Err(Error::Open { .. })
        ));
        assert!(matches!(
            open_text(&fs, "RW 8 FLAT \"flat.bin\" 1\n"),
            Err(Error::Truncated { .. })
        ));
        assert!(matches!(
            open_text(&fs, "RW 8 SPARSE \"flat.bin\"\n"),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            open_text(&fs, "RW 1152921504606846976 ZERO\n"),
            Err(Error::Corrupt { .. })
        ));
        // A flat extent from an offset reads the right bytes; reads outside the disk are refused.
        let layer = open_text(&fs, "RW 4 ZERO\nRW 7 FLAT \"flat.bin\" 1\n").unwrap();
        let mut b = [1u8; 4];
        layer.read_at(&mut b, 2046).unwrap();
        assert_eq!(b, [0, 0, 7, 7]);
        assert!(layer.read_at(&mut b, 11 * 512 - 2).is_err());
    }
}
