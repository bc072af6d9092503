//! Readers and writers of the disk-image formats rehost moves: raw, VMDK (monolithicSparse,
//! streamOptimized, monolithicFlat, split extents, delta chains), VHD (fixed, dynamic,
//! differencing) and VHDX (fixed, dynamic, differencing).
//!
//! No maintained crate reads VMDK or streams any of these formats, so this one is ours. It
//! is pure code over [`ReadAt`] (a file, a byte slice, later S3 or SMB), with the format
//! detected from the bytes. Every reader exposes an allocation map so callers skip what is
//! not there without reading it; every writer is an [`ExtentSink`] fed in disk order, so
//! neither side ever holds a whole disk in memory.

pub mod checksum;
pub mod detect;
pub mod disk;
pub mod error;
pub mod fuzzing;
pub mod io;
pub mod layer;
pub mod map;
pub mod raw;
pub mod sink;
pub mod stream;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;
pub mod write;

use std::sync::Arc;

pub use detect::{DetectedFormat, detect};
pub use disk::Disk;
pub use error::{Error, Result};
pub use io::{FileSystem, ImageFile, LocalFs, MemFs, ReadAt};
pub use layer::{Format, ImageId, Layer, LayerInfo, ParentRef};
pub use rehost_core::{Extent, ExtentKind, MapExtent};
pub use sink::{ExtentSink, ParentLink, WriteSummary};

/// Opens one image file as a layer, choosing the reader from its first bytes. Other files
/// it names (VMDK extents) are opened through `fs`; parents are not (see [`Disk`]).
pub fn open_layer(fs: &dyn FileSystem, file: ImageFile) -> Result<Arc<dyn Layer>> {
    Ok(match detect(&file)? {
        DetectedFormat::Raw => Arc::new(raw::RawLayer::open(file)),
        DetectedFormat::Vmdk => vmdk::open(fs, file)?,
        DetectedFormat::Vhd => vhd::open(file)?,
        DetectedFormat::Vhdx => vhdx::open(file)?,
    })
}
