//! One image file's view of a virtual disk, as every format reader exposes it.

use rehost_core::{ExtentKind, MapExtent};
use serde::Serialize;

use crate::error::Result;

/// The container format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A plain copy of the disk.
    Raw,
    /// VMware virtual disk.
    Vmdk,
    /// Microsoft Virtual Hard Disk (VPC).
    Vhd,
    /// Microsoft Hyper-V VHDX.
    Vhdx,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Vmdk => "vmdk",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
        })
    }
}

/// What identifies an image to its children, so a chain is checked, not assumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum ImageId {
    /// A VMDK content id (`CID` in the descriptor; children name it as `parentCID`).
    VmdkCid(u32),
    /// A VHD footer's unique id (children name it in their header's parent unique id).
    VhdUniqueId([u8; 16]),
    /// A VHDX DataWriteGuid (children name it as `parent_linkage`).
    VhdxDataWriteGuid([u8; 16]),
}

/// Where a differencing image says its parent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ParentRef {
    /// Paths to try, in the order the format says to (relative ones from the child's folder).
    pub candidates: Vec<String>,
    /// The identity the parent must have.
    pub expected_id: Option<ImageId>,
}

/// What a reader learnt from an image's headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// Container format.
    pub format: Format,
    /// Variant within the format: `monolithicSparse`, `streamOptimized`, `fixed`, `dynamic`, …
    pub subformat: String,
    /// Size of the virtual disk.
    pub virtual_size_bytes: u64,
    /// Allocation unit (VMDK grain, VHD/VHDX block), if the format has one.
    pub cluster_size_bytes: Option<u64>,
    /// The parent of a differencing image.
    pub parent: Option<ParentRef>,
    /// This image's identity, as its children would name it.
    pub id: Option<ImageId>,
    /// Inconsistencies found that did not stop reading (e.g. a redundant grain directory
    /// that disagrees with the primary one).
    pub warnings: Vec<String>,
}

/// One image file's view of the disk.
///
/// `map_range` and `read_at` take `&self` and may be called from several threads at once:
/// readers keep no mutable cursor.
pub trait Layer: Send + Sync + std::fmt::Debug {
    /// What the headers said.
    fn info(&self) -> &LayerInfo;

    /// The extents covering exactly `[offset, offset + len)`, in order, adjacent ones of the
    /// same kind merged. The range must lie within the virtual size. Callers walk large
    /// disks in windows (see [`crate::map::MapWalker`]) so memory stays bounded.
    fn map_range(&self, offset: u64, len: u64) -> Result<Vec<MapExtent>>;

    /// Reads this layer's content at `offset`; `Unallocated` areas read as zero (a
    /// [`crate::Disk`] sends them to the parent instead).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

/// Sums the bytes of `Data` extents in a layer, walking its map in windows.
pub fn allocated_bytes(layer: &dyn Layer) -> Result<u64> {
    let mut total = 0u64;
    for extents in crate::map::MapWalker::new(layer.info().virtual_size_bytes) {
        for e in layer.map_range(extents.0, extents.1)? {
            if e.kind == ExtentKind::Data {
                total += e.len;
            }
        }
    }
    Ok(total)
}
