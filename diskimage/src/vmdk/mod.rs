//! VMDK: hosted sparse extents (monolithicSparse, streamOptimized, twoGbMaxExtentSparse),
//! flat extents (monolithicFlat, twoGbMaxExtentFlat), text descriptors and delta chains.

mod reader;
mod writer;

pub use reader::{StreamReader, open};
pub use writer::{SparseWriter, StreamOptimizedWriter};
