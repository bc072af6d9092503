//! VMDK: hosted sparse extents (monolithicSparse, streamOptimized, twoGbMaxExtentSparse),
//! flat extents (monolithicFlat, twoGbMaxExtentFlat), text descriptors and delta chains.

mod descriptor;
mod grain;
mod header;
mod reader;
mod sparse;
mod stream_reader;
mod writer;

pub use reader::{StreamReader, VmdkLayer, open};
pub use writer::{SparseWriter, StreamOptimizedWriter};
