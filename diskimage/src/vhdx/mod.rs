//! VHDX (Hyper-V): fixed, dynamic and differencing images, with log replay.
//!
//! Layout per Microsoft's "[MS-VHDX] Virtual Hard Disk v2 (VHDX) File Format"
//! (little-endian): a file type identifier at 0, two headers at 64 and 128 KiB, two region
//! tables at 192 and 256 KiB naming the BAT and metadata regions, a log, and payload
//! blocks placed anywhere at 1 MiB boundaries.

mod bat;
mod guid;
mod header;
mod log;
mod metadata;
mod reader;
mod region;
#[cfg(test)]
mod robustness;
mod source;
#[cfg(test)]
mod testimg;
mod writer;

use std::sync::Arc;

use crate::error::Result;
use crate::io::ImageFile;
use crate::layer::Layer;

pub use writer::VhdxWriter;

/// 1 MiB: the alignment of regions, the log and payload blocks (MS-VHDX 2.2, 2.3.1).
pub(crate) const MIB: u64 = 1 << 20;
/// 1 KiB.
pub(crate) const KIB: u64 = 1 << 10;
/// Largest virtual disk the format allows: 64 TiB (MS-VHDX 2.6.2.2).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

/// Opens a VHDX of any type.
pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Ok(Arc::new(reader::VhdxLayer::open(file)?))
}
