//! VHD (Virtual PC / Azure): fixed, dynamic and differencing images.
//!
//! STUB: to be replaced by the real implementation.

use std::io::{Seek, Write};
use std::sync::Arc;

use rehost_core::Extent;

use crate::error::{Error, Result};
use crate::io::ImageFile;
use crate::layer::Layer;
use crate::sink::{ExtentSink, ParentLink, WriteSummary};

/// Opens a VHD of any type.
pub fn open(file: ImageFile) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported(file.name(), "VHD reader not yet built"))
}

/// Which VHD to write.
#[derive(Debug, Clone)]
pub enum VhdKind {
    /// The disk bytes plus a footer.
    Fixed,
    /// Blocks allocated on demand.
    Dynamic,
    /// Only what differs from the parent.
    Differencing(ParentLink),
}

/// Writes a VHD.
#[derive(Debug)]
pub struct VhdWriter<W: Write + Seek> {
    _out: W,
}

impl<W: Write + Seek> VhdWriter<W> {
    /// A writer of a `virtual_size`-byte disk of the given kind.
    pub fn new(_out: W, _virtual_size: u64, _kind: VhdKind, name: String) -> Result<Self> {
        Err(Error::unsupported(&name, "VHD writer not yet built"))
    }
}

impl<W: Write + Seek> ExtentSink for VhdWriter<W> {
    fn put(&mut self, _extent: Extent) -> Result<()> {
        unreachable!()
    }
    fn finish(self: Box<Self>) -> Result<WriteSummary> {
        unreachable!()
    }
}
