//! VHDX (Hyper-V): fixed, dynamic and differencing images, with log replay.
//!
//! STUB: to be replaced by the real implementation.

use std::io::{Seek, Write};
use std::sync::Arc;

use rehost_core::Extent;

use crate::error::{Error, Result};
use crate::io::ImageFile;
use crate::layer::Layer;
use crate::sink::{ExtentSink, WriteSummary};

/// Opens a VHDX of any type.
pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported(file.name(), "VHDX reader not yet built"))
}

/// Writes a dynamic VHDX.
#[derive(Debug)]
pub struct VhdxWriter<W: Write + Seek> {
    _out: W,
}

impl<W: Write + Seek> VhdxWriter<W> {
    /// A writer of a `virtual_size`-byte disk with `block_size` (default 32 MiB).
    pub fn new(
        _out: W,
        _virtual_size: u64,
        _block_size: Option<u32>,
        name: String,
    ) -> Result<Self> {
        Err(Error::unsupported(&name, "VHDX writer not yet built"))
    }
}

impl<W: Write + Seek> ExtentSink for VhdxWriter<W> {
    fn put(&mut self, _extent: Extent) -> Result<()> {
        unreachable!()
    }
    fn finish(self: Box<Self>) -> Result<WriteSummary> {
        unreachable!()
    }
}
