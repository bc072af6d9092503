//! A virtual disk as its users see it: an image and, for a differencing image, its chain
//! of parents, resolved so that every byte comes from the nearest layer that holds it.

use std::collections::HashSet;
use std::sync::Arc;

use rehost_core::{ExtentKind, MapExtent};

use crate::error::{Error, Result};
use crate::io::{FileSystem, ImageFile, LocalFs};
use crate::layer::{Format, Layer};
use crate::map::MapBuilder;

/// The deepest parent chain we follow. Real chains are a handful deep (one per
/// incremental run until consolidation); a deeper one is far more likely a loop or garbage.
pub const MAX_CHAIN_DEPTH: usize = 256;

/// A disk image with its parents. Layer 0 is the image opened; each next one its parent.
#[derive(Debug, Clone)]
pub struct Disk {
    layers: Vec<Arc<dyn Layer>>,
    paths: Vec<String>,
}

/// A resolved piece of the disk: which layer holds it (`None` for zero or unallocated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resolved {
    extent: MapExtent,
    layer: Option<usize>,
}

impl Disk {
    /// Opens a local image file and its parents.
    pub fn open(path: &str) -> Result<Self> {
        Self::open_with(&LocalFs, path)
    }

    /// Opens an image and its parents through `fs`.
    pub fn open_with(fs: &dyn FileSystem, path: &str) -> Result<Self> {
        let file = fs.open(path)?;
        let top = crate::open_layer(fs, file)?;
        Self::with_parents(fs, path, top)
    }

    /// Opens an image through `fs` WITHOUT its parents: for a differencing image whose
    /// parent's contents are elsewhere (an incremental import onto the EBS snapshot of the
    /// parent, whose staged image may be gone). What the image does not hold maps as
    /// `Unallocated` and reads as zero; callers that need the whole disk use [`Disk::open_with`].
    pub fn top_only_with(fs: &dyn FileSystem, path: &str) -> Result<Self> {
        let file = fs.open(path)?;
        let top = crate::open_layer(fs, file)?;
        Ok(Self {
            layers: vec![top],
            paths: vec![path.to_owned()],
        })
    }

    /// Opens the parents of an already opened top layer.
    pub fn with_parents(fs: &dyn FileSystem, path: &str, top: Arc<dyn Layer>) -> Result<Self> {
        let mut layers = vec![top];
        let mut paths = vec![path.to_owned()];
        let mut seen = HashSet::from([fs.identity(path)]);
        loop {
            let (child, child_path) = (
                layers[layers.len() - 1].clone(),
                paths[paths.len() - 1].clone(),
            );
            let Some(parent_ref) = child.info().parent.clone() else {
                break;
            };
            if layers.len() > MAX_CHAIN_DEPTH {
                return Err(Error::ParentChain {
                    file: path.to_owned(),
                    reason: format!("is deeper than {MAX_CHAIN_DEPTH} images"),
                });
            }
            let mut tried = Vec::new();
            let mut opened = None;
            for candidate in &parent_ref.candidates {
                let parent_path = fs.resolve(&child_path, candidate);
                tried.push(parent_path.clone());
                match fs.open(&parent_path) {
                    Ok(file) => {
                        opened = Some((parent_path, file));
                        break;
                    }
                    Err(Error::Open { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let Some((parent_path, parent_file)) = opened else {
                return Err(Error::ParentNotFound {
                    file: child_path,
                    tried,
                });
            };
            if !seen.insert(fs.identity(&parent_path)) {
                return Err(Error::ParentChain {
                    file: child_path,
                    reason: format!("loops back to {parent_path}"),
                });
            }
            let parent = crate::open_layer(fs, parent_file)?;
            if let Some(expected) = &parent_ref.expected_id {
                if parent.info().id.as_ref() != Some(expected) {
                    return Err(Error::ParentMismatch {
                        file: child_path,
                        parent: parent_path,
                        reason: format!(
                            "the child expects {expected:?}, the parent is {:?} (was the parent modified after the child was made?)",
                            parent.info().id
                        ),
                    });
                }
            }
            layers.push(parent);
            paths.push(parent_path);
        }
        Ok(Self { layers, paths })
    }

    /// A disk of one in-memory image (tests, fuzzing). Parents are looked up in `fs`.
    pub fn from_bytes(
        fs: &dyn FileSystem,
        name: &str,
        bytes: impl Into<bytes::Bytes>,
    ) -> Result<Self> {
        let top = crate::open_layer(fs, ImageFile::from_bytes(name, bytes))?;
        Self::with_parents(fs, name, top)
    }

    /// The layers, the opened image first.
    pub fn layers(&self) -> &[Arc<dyn Layer>] {
        &self.layers
    }

    /// The layers' paths, in the same order.
    pub fn paths(&self) -> &[String] {
        &self.paths
    }

    /// The image that was opened.
    pub fn top(&self) -> &dyn Layer {
        self.layers[0].as_ref()
    }

    /// The format of the opened image.
    pub fn format(&self) -> Format {
        self.top().info().format
    }

    /// Size of the virtual disk (the opened image's).
    pub fn virtual_size(&self) -> u64 {
        self.top().info().virtual_size_bytes
    }

    /// The resolved map of `[offset, offset + len)`: `Data` where any layer holds data,
    /// `Zero` where the nearest layer records zeros, `Unallocated` where no layer has it.
    pub fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
        let mut map = MapBuilder::new();
        for r in self.resolve(offset, len)? {
            map.push(r.extent.offset, r.extent.len, r.extent.kind);
        }
        Ok(map.finish())
    }

    fn resolve(&self, offset: u64, len: u64) -> Result<Vec<Resolved>> {
        crate::raw::check_range(self.top().info(), offset, len)?;
        let mut out = Vec::new();
        self.resolve_level(0, offset, len, &mut out)?;
        Ok(out)
    }

    fn resolve_level(
        &self,
        level: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<Resolved>,
    ) -> Result<()> {
        let layer = &self.layers[level];
        let size = layer.info().virtual_size_bytes;
        // A child may be larger than its parent: what lies past the parent's end is zero.
        let inside = len.min(size.saturating_sub(offset));
        if inside > 0 {
            for e in layer.map_range(offset, inside)? {
                match e.kind {
                    ExtentKind::Data => out.push(Resolved {
                        extent: e,
                        layer: Some(level),
                    }),
                    ExtentKind::Zero => out.push(Resolved {
                        extent: e,
                        layer: None,
                    }),
                    ExtentKind::Unallocated if level + 1 < self.layers.len() => {
                        self.resolve_level(level + 1, e.offset, e.len, out)?;
                    }
                    ExtentKind::Unallocated => out.push(Resolved {
                        extent: e,
                        layer: None,
                    }),
                }
            }
        }
        if inside < len {
            out.push(Resolved {
                extent: MapExtent {
                    offset: offset + inside,
                    len: len - inside,
                    kind: ExtentKind::Unallocated,
                },
                layer: None,
            });
        }
        Ok(())
    }

    /// Reads the virtual disk at `offset`, taking each byte from the layer that holds it.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut filled = 0usize;
        for r in self.resolve(offset, buf.len() as u64)? {
            let len = usize::try_from(r.extent.len)
                .map_err(|_| Error::InvalidInput("read too large".into()))?;
            let piece = &mut buf[filled..filled + len];
            match r.layer {
                Some(level) => self.layers[level].read_at(piece, r.extent.offset)?,
                None => piece.fill(0),
            }
            filled += len;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::layer::{LayerInfo, ParentRef};
    use crate::raw::check_range;

    /// A layer over memory whose map is given sector by sector: b'D' data, b'Z' zero, b'.' unallocated.
    #[derive(Debug)]
    struct Fake {
        info: LayerInfo,
        map: &'static [u8],
        fill: u8,
    }

    impl Layer for Fake {
        fn info(&self) -> &LayerInfo {
            &self.info
        }
        fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>> {
            check_range(&self.info, offset, len)?;
            crate::map::map_by_units(offset, len, 512, |i| {
                Ok(match self.map[i as usize] {
                    b'D' => ExtentKind::Data,
                    b'Z' => ExtentKind::Zero,
                    _ => ExtentKind::Unallocated,
                })
            })
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let sector = (offset + i as u64) / 512;
                *b = if self.map[sector as usize] == b'D' {
                    self.fill
                } else {
                    0
                };
            }
            Ok(())
        }
    }

    fn fake(map: &'static [u8], fill: u8, has_parent: bool) -> Arc<dyn Layer> {
        Arc::new(Fake {
            info: LayerInfo {
                format: Format::Raw,
                subformat: "fake".into(),
                virtual_size_bytes: map.len() as u64 * 512,
                cluster_size_bytes: Some(512),
                parent: has_parent.then(|| ParentRef {
                    candidates: vec!["p".into()],
                    expected_id: None,
                }),
                id: None,
                warnings: vec![],
            },
            map,
            fill,
        })
    }

    /// The disk's map over its first `sectors` sectors: (first sector, kind) per extent.
    fn sector_kinds(disk: &Disk, sectors: u64) -> Vec<(u64, ExtentKind)> {
        disk.map_range(0, sectors * 512)
            .unwrap()
            .iter()
            .map(|e| (e.offset / 512, e.kind))
            .collect()
    }

    #[test]
    fn chain_takes_each_sector_from_the_nearest_layer() {
        let disk = Disk {
            layers: vec![
                fake(b"D.Z..", 1, true),
                fake(b"DDD.", 2, true),
                fake(b"..DD.", 3, false),
            ],
            paths: vec!["c".into(), "p".into(), "g".into()],
        };
        let mut buf = vec![9u8; 5 * 512];
        disk.read_at(&mut buf, 0).unwrap();
        let sectors: Vec<u8> = buf.chunks(512).map(|s| s[0]).collect();
        // sector 3: parent unallocated -> grandparent data; sector 4: beyond parent's size.
        assert_eq!(sectors, vec![1, 2, 0, 3, 0]);
        let kinds = sector_kinds(&disk, 5);
        assert_eq!(
            kinds,
            vec![
                (0, ExtentKind::Data),
                (2, ExtentKind::Zero),
                (3, ExtentKind::Data),
                (4, ExtentKind::Unallocated)
            ]
        );
        let mut odd = vec![0u8; 700];
        disk.read_at(&mut odd, 300).unwrap();
        assert_eq!(odd[211], 1);
        assert_eq!(odd[212], 2);
    }

    #[test]
    fn a_top_only_disk_keeps_its_parent_reference_and_maps_the_rest_unallocated() {
        let disk = Disk {
            layers: vec![fake(b"D.Z..", 1, true)],
            paths: vec!["c".into()],
        };
        assert!(disk.top().info().parent.is_some());
        let kinds = sector_kinds(&disk, 5);
        assert_eq!(
            kinds,
            vec![
                (0, ExtentKind::Data),
                (1, ExtentKind::Unallocated),
                (2, ExtentKind::Zero),
                (3, ExtentKind::Unallocated)
            ]
        );
    }
}
