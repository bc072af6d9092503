//! The VHDX layer: opens the structures in spec order (headers, log replay, region
//! table, metadata, BAT) and maps and reads the virtual disk block by block.

use rehost_core::{ExtentKind, MapExtent};

use super::bat::{BITMAP_BLOCK_SIZE, Bat, Block, Geometry};
use super::region::Region;
use super::source::Source;
use super::{guid, header, log, metadata, region};
use crate::error::{Error, Result};
use crate::io::ImageFile;
use crate::layer::{Format, ImageId, Layer, LayerInfo, ParentRef};
use crate::map::MapBuilder;
use crate::raw::check_range;

/// Parent locator keys, in the order we try them (MS-VHDX 2.6.2.6.1).
const PATH_KEYS: [&str; 3] = ["relative_path", "absolute_win32_path", "volume_path"];

/// An opened VHDX image.
#[derive(Debug)]
pub struct VhdxLayer {
    src: Source,
    info: LayerInfo,
    geometry: Geometry,
    bat: Bat,
}

/// Where a piece of the virtual disk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Stored at this file offset.
    Data(u64),
    /// Recorded as zero.
    Zero,
    /// Not stored here.
    Unallocated,
}

impl VhdxLayer {
    /// Opens `file`, replaying its log in memory if it has one.
    pub fn open(file: ImageFile) -> Result<Self> {
        let mut warnings = Vec::new();
        let header = header::read_current(&file, &mut warnings)?;
        let src = log::replay(file, &header, &mut warnings)?;
        let regions = region::read(&src, &mut warnings)?;
        if regions
            .metadata
            .offset
            .saturating_add(regions.metadata.length)
            > src.len()
        {
            return Err(Error::Truncated {
                file: src.name().to_owned(),
                structure: "VHDX metadata region",
                offset: regions.metadata.offset,
                needed: regions.metadata.length,
                file_len: src.len(),
            });
        }
        let meta = metadata::read(&src, regions.metadata)?;
        let geometry = Geometry::of(&meta);
        let log_region = Region {
            offset: header.log_offset,
            length: u64::from(header.log_length),
        };
        let bat = Bat::open(&src, regions.bat, geometry, &[regions.metadata, log_region])?;
        let parent = meta
            .has_parent
            .then(|| parent_ref(src.name(), &meta.parent_locator))
            .transpose()?;
        let subformat = if meta.has_parent {
            "differencing"
        } else if meta.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        let info = LayerInfo {
            format: Format::Vhdx,
            subformat: subformat.into(),
            virtual_size_bytes: meta.virtual_size,
            cluster_size_bytes: Some(meta.block_size),
            parent,
            id: Some(ImageId::VhdxDataWriteGuid(header.data_write_guid)),
            warnings,
        };
        Ok(Self {
            src,
            info,
            geometry,
            bat,
        })
    }

    /// Calls `f(offset, len, piece)` for consecutive pieces covering `[offset, offset + len)`.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Piece) -> Result<()>,
    ) -> Result<()> {
        let g = self.geometry;
        let end = offset + len;
        let mut cursor = self
            .bat
            .cursor(&self.src, end.saturating_sub(1) / g.block_size);
        let mut pos = offset;
        while pos < end {
            let block = pos / g.block_size;
            let block_start = block * g.block_size;
            let piece_end = (block_start + g.block_size).min(end);
            let within = pos - block_start;
            match cursor.block(block)? {
                Block::Present(at) => f(pos, piece_end - pos, Piece::Data(at + within))?,
                Block::Zero => f(pos, piece_end - pos, Piece::Zero)?,
                Block::NotPresent => f(pos, piece_end - pos, Piece::Unallocated)?,
                Block::Partial(at) => {
                    let bitmap_at = cursor.bitmap_of(block)?;
                    self.walk_partial(block, bitmap_at, at, pos, piece_end, &mut f)?;
                }
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Walks `[pos, end)` of a partially present block sector by sector: a set bit in the
    /// chunk's sector bitmap means the sector is stored in this file.
    fn walk_partial(
        &self,
        block: u64,
        bitmap_at: u64,
        block_at: u64,
        pos: u64,
        end: u64,
        f: &mut impl FnMut(u64, u64, Piece) -> Result<()>,
    ) -> Result<()> {
        let g = self.geometry;
        let block_start = block * g.block_size;
        let sectors_per_block = g.block_size / g.sector_size;
        let chunk_sector = (block % g.chunk_ratio) * sectors_per_block;
        let first = chunk_sector + (pos - block_start) / g.sector_size;
        let last = chunk_sector + (end - block_start).div_ceil(g.sector_size);
        let (byte_from, byte_to) = (first / 8, last.div_ceil(8));
        if byte_to > BITMAP_BLOCK_SIZE {
            return Err(Error::corrupt(
                self.src.name(),
                "VHDX sector bitmap",
                bitmap_at,
                "sector past the bitmap",
            ));
        }
        let bits = self.src.read_vec(
            usize::try_from(byte_to - byte_from).unwrap_or(0),
            bitmap_at + byte_from,
            "VHDX sector bitmap",
        )?;
        let mut at = pos;
        for sector in first..last {
            let bit = sector - byte_from * 8;
            let byte = bits
                .get(usize::try_from(bit / 8).unwrap_or(usize::MAX))
                .copied()
                .unwrap_or(0);
            let sector_end = (block_start + (sector - chunk_sector + 1) * g.sector_size).min(end);
            let piece = if byte & (1 << (bit % 8)) != 0 {
                Piece::Data(block_at + (at - block_start))
            } else {
                Piece::Unallocated
            };
            f(at, sector_end - at, piece)?;
            at = sector_end;
        }
        Ok(())
    }
}

impl Layer for VhdxLayer {
    fn info(&self) -> &LayerInfo {
        &self.info
    }

    fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        check_range(&self.info, offset, len)?;
        let mut map = MapBuilder::new();
        self.walk(offset, len, |at, n, piece| {
            let kind = match piece {
                Piece::Data(_) => ExtentKind::Data,
                Piece::Zero => ExtentKind::Zero,
                Piece::Unallocated => ExtentKind::Unallocated,
            };
            map.push(at, n, kind);
            Ok(())
        })?;
        Ok(map.finish())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.info, offset, buf.len() as u64)?;
        let mut filled = 0usize;
        self.walk(offset, buf.len() as u64, |_, n, piece| {
            let n = usize::try_from(n).map_err(|_| Error::InvalidInput("read too large".into()))?;
            let dst = &mut buf[filled..filled + n];
            match piece {
                Piece::Data(at) => self.src.read(dst, at, "VHDX payload block")?,
                Piece::Zero | Piece::Unallocated => dst.fill(0),
            }
            filled += n;
            Ok(())
        })
    }
}

/// The parent reference of a differencing image from its locator's key/value pairs.
fn parent_ref(name: &str, pairs: &[(String, String)]) -> Result<ParentRef> {
    let value = |key: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let linkage = value("parent_linkage")
        .ok_or_else(|| Error::corrupt(name, "VHDX parent locator", 0, "no parent_linkage entry"))?;
    let expected = guid::parse(linkage).ok_or_else(|| {
        Error::corrupt(
            name,
            "VHDX parent locator",
            0,
            format!("parent_linkage {linkage:?} is not a GUID"),
        )
    })?;
    let mut candidates: Vec<String> = Vec::new();
    for key in PATH_KEYS {
        if let Some(path) = value(key).filter(|p| !p.is_empty()) {
            let path = path.replace('\\', "/");
            if !candidates.contains(&path) {
                candidates.push(path);
            }
        }
    }
    let base = candidates.iter().find_map(|p| {
        p.rsplit('/')
            .next()
            .filter(|b| !b.is_empty())
            .map(str::to_owned)
    });
    if let Some(base) = base {
        if !candidates.contains(&base) {
            candidates.push(base);
        }
    }
    if candidates.is_empty() {
        return Err(Error::corrupt(
            name,
            "VHDX parent locator",
            0,
            "no parent path entry",
        ));
    }
    Ok(ParentRef {
        candidates,
        expected_id: Some(ImageId::VhdxDataWriteGuid(expected)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::bat::{PAYLOAD_BLOCK_PARTIALLY_PRESENT, SB_BLOCK_PRESENT};
    use super::super::metadata::HAS_PARENT;
    use super::super::testimg::{PAYLOAD_AT, Spec, build};
    use super::super::{MIB, guid};
    use super::*;

    #[test]
    fn partial_blocks_with_4k_sectors() {
        // 4096-byte sectors, 1 MiB blocks: chunk ratio 2^23 * 4096 / 2^20 = 32768, so the
        // first sector bitmap entry is index 32768; block 1's bits start at 256.
        let mut spec = Spec::base(1 << 20, 3 * MIB);
        spec.sector = 4096;
        spec.flags = HAS_PARENT;
        spec.locator = Some(vec![
            ("parent_linkage", guid::format(&[4; 16])),
            ("relative_path", "p.vhdx".into()),
        ]);
        let bat = [
            (1, PAYLOAD_AT | PAYLOAD_BLOCK_PARTIALLY_PRESENT),
            (32768, (PAYLOAD_AT + MIB) | SB_BLOCK_PRESENT),
        ];
        let mut bitmap = vec![0u8; 33];
        bitmap[32] = 0b1001;
        let patches = [(PAYLOAD_AT, vec![0xCC; 16384]), (PAYLOAD_AT + MIB, bitmap)];
        let layer = VhdxLayer::open(ImageFile::from_bytes(
            "c.vhdx",
            build(&spec, &bat, &patches, PAYLOAD_AT + 2 * MIB),
        ))
        .unwrap();
        let parent = layer.info().parent.clone().unwrap();
        assert_eq!(parent.candidates, vec!["p.vhdx"]);
        assert_eq!(
            parent.expected_id,
            Some(ImageId::VhdxDataWriteGuid([4; 16]))
        );
        let map: Vec<_> = layer
            .map_range(0, 3 * MIB)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.kind))
            .collect();
        assert_eq!(
            map,
            vec![
                (0, ExtentKind::Unallocated),
                (MIB, ExtentKind::Data),
                (MIB + 4096, ExtentKind::Unallocated),
                (MIB + 12288, ExtentKind::Data),
                (MIB + 16384, ExtentKind::Unallocated),
            ]
        );
        let mut buf = vec![9u8; 16384];
        layer.read_at(&mut buf, MIB).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xCC) && buf[12288..].iter().all(|&b| b == 0xCC));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
    }

    #[test]
    fn parent_locator_needs_linkage_and_a_path() {
        let pairs = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<Vec<_>>()
        };
        assert!(parent_ref("c", &pairs(&[("relative_path", "p.vhdx")])).is_err());
        assert!(
            parent_ref(
                "c",
                &pairs(&[("parent_linkage", "nonsense"), ("relative_path", "p")])
            )
            .is_err()
        );
        assert!(
            parent_ref(
                "c",
                &pairs(&[("parent_linkage", "{00000000-0000-0000-0000-000000000001}")])
            )
            .is_err()
        );
        let r = parent_ref(
            "c",
            &pairs(&[
                ("parent_linkage", "{00000000-0000-0000-0000-000000000001}"),
                ("volume_path", "\\\\?\\Volume{x}\\d\\p.vhdx"),
                ("absolute_win32_path", "D:\\d\\p.vhdx"),
            ]),
        )
        .unwrap();
        assert_eq!(
            r.candidates,
            vec!["D:/d/p.vhdx", "//?/Volume{x}/d/p.vhdx", "p.vhdx"]
        );
    }
}
