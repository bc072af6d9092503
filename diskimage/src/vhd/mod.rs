//! VHD (Virtual PC / Hyper-V / Azure): fixed, dynamic and differencing images, after
//! Microsoft's "Virtual Hard Disk Image Format Specification" (October 2006).
//!
//! A VHD ends with a 512-byte footer. A fixed disk is the disk's bytes followed by it; a
//! dynamic or differencing disk starts with a copy of it, then a dynamic header, a block
//! allocation table (BAT) and blocks, each a sector bitmap followed by the block's data.

mod dynamic_header;
mod footer;
mod locator;
mod reader;
mod stream_writer;
#[cfg(test)]
mod tests;
mod writer;

use crate::sink::ParentLink;

pub use reader::{VhdLayer, open};
pub use stream_writer::VhdStreamWriter;
pub use writer::VhdWriter;

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
