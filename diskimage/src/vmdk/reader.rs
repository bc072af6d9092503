//! VMDK readers. STUB: to be replaced by the real implementation.

use std::io::Read;
use std::sync::Arc;

use rehost_core::Extent;

use crate::error::{Error, Result};
use crate::io::{FileSystem, ImageFile};
use crate::layer::{Layer, LayerInfo};

/// Opens a VMDK: a sparse extent with an embedded descriptor, or a text descriptor whose
/// extents are opened through `fs` (relative to the descriptor's folder).
pub fn open(_fs: &dyn FileSystem, file: ImageFile) -> Result<Arc<dyn Layer>> {
    Err(Error::unsupported(file.name(), "VMDK reader not yet built"))
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
        Err(Error::unsupported(
            &name,
            "streamOptimized stream reader not yet built",
        ))
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
