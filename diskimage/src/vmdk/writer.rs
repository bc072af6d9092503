//! VMDK writers. STUB: to be replaced by the real implementation.

use std::io::{Seek, Write};

use rehost_core::Extent;

use crate::error::{Error, Result};
use crate::sink::{ExtentSink, ParentLink, WriteSummary};

/// Writes a streamOptimized VMDK to a forward-only output.
#[derive(Debug)]
pub struct StreamOptimizedWriter<W: Write> {
    _out: W,
}

impl<W: Write> StreamOptimizedWriter<W> {
    /// A writer of a `virtual_size`-byte disk; `name` is used in errors.
    pub fn new(_out: W, _virtual_size: u64, name: String) -> Result<Self> {
        Err(Error::unsupported(
            &name,
            "streamOptimized writer not yet built",
        ))
    }
}

impl<W: Write> ExtentSink for StreamOptimizedWriter<W> {
    fn put(&mut self, _extent: Extent) -> Result<()> {
        unreachable!()
    }
    fn finish(self: Box<Self>) -> Result<WriteSummary> {
        unreachable!()
    }
}

/// Writes a monolithicSparse VMDK; with a parent, a delta child holding only changed grains.
#[derive(Debug)]
pub struct SparseWriter<W: Write + Seek> {
    _out: W,
}

impl<W: Write + Seek> SparseWriter<W> {
    /// A writer of a `virtual_size`-byte disk, a child of `parent` if given.
    pub fn new(
        _out: W,
        _virtual_size: u64,
        _parent: Option<ParentLink>,
        name: String,
    ) -> Result<Self> {
        Err(Error::unsupported(
            &name,
            "monolithicSparse writer not yet built",
        ))
    }
}

impl<W: Write + Seek> ExtentSink for SparseWriter<W> {
    fn put(&mut self, _extent: Extent) -> Result<()> {
        unreachable!()
    }
    fn finish(self: Box<Self>) -> Result<WriteSummary> {
        unreachable!()
    }
}
