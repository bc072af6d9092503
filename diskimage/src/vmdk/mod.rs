//! VMDK: hosted sparse extents (monolithicSparse, streamOptimized, twoGbMaxExtentSparse),
//! flat extents (monolithicFlat, twoGbMaxExtentFlat), text descriptors and delta chains.
//!
//! STUB: to be replaced by the real implementation.

use std::io::{Read, Seek, Write};
use std::sync::Arc;

use rehost_core::Extent;

use crate::error::{Error, Result};
use crate::io::{FileSystem, ImageFile};
use crate::layer::{Layer, LayerInfo};
use crate::sink::{ExtentSink, ParentLink, WriteSummary};

/// Opens a VMDK: a sparse extent with an embedded descriptor, or a text descriptor whose
/// extents are opened through `fs` (relative to the descriptor's folder).
pub fn open(_fs: &dyn FileSystem, file: ImageFile) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported(file.name(), "VMDK reader not yet built"))
}

/// Writes a streamOptimized VMDK to a forward-only output.
#[derive(Debug)]
pub struct StreamOptimizedWriter<W: Write> {
    _out: W,
}

impl<W: Write> StreamOptimizedWriter<W> {
    /// A writer of a `virtual_size`-byte disk; `name` is used in errors.
    pub fn new(_out: W, _virtual_size: u64, name: String) -> Result<Self> {
        Err(Error::unsupported(&name, "streamOptimized writer not yet built"))
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
    pub fn new(_out: W, _virtual_size: u64, _parent: Option<ParentLink>, name: String) -> Result<Self> {
        Err(Error::unsupported(&name, "monolithicSparse writer not yet built"))
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

/// Reads a streamOptimized VMDK from a forward-only stream (an HTTP body, a pipe),
/// yielding its extents in order.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    _input: R,
}

impl<R: Read> StreamReader<R> {
    /// Reads the header; `name` is used in errors.
    pub fn new(_input: R, name: String) -> Result<Self> {
        Err(Error::unsupported(&name, "streamOptimized stream reader not yet built"))
    }

    /// What the header said.
    pub fn info(&self) -> &LayerInfo {
        unreachable!()
    }
}

impl<R: Read> Iterator for StreamReader<R> {
    type Item = Result<Extent>;
    fn next(&mut self) -> Option<Self::Item> {
        None
    }
}
