//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the regression tests that
//! replay their corpus of corrupt samples: open hostile bytes, walk the whole map, read
//! every extent. Any outcome but a panic, a hang or a runaway allocation is fine.

use crate::disk::Disk;
use crate::io::{ImageFile, MemFs};
use crate::layer::Layer;
use crate::map::MapWalker;

/// Largest read the exercisers make at once.
const READ_CHUNK: u64 = 1 << 20;
/// How much of a (possibly huge, claimed) virtual disk is read, so a fuzz run stays fast
/// while a small header can claim terabytes.
const READ_BUDGET: u64 = 64 << 20;

/// Opens `bytes` as any format (detected), with `fs` for the files it names, and reads it.
pub fn exercise_disk(fs: &MemFs, name: &str, bytes: &[u8]) {
    if let Ok(disk) = Disk::from_bytes(fs, name, bytes.to_vec()) {
        exercise_reads(
            disk.virtual_size(),
            |o, l| disk.map_range(o, l).map(|m| m.len()),
            |b, o| disk.read_at(b, o),
        );
    }
}

/// Opens `bytes` with one format's reader and reads it.
pub fn exercise_layer(layer: crate::error::Result<std::sync::Arc<dyn Layer>>) {
    if let Ok(layer) = layer {
        exercise_reads(
            layer.info().virtual_size_bytes,
            |o, l| layer.map_range(o, l).map(|m| m.len()),
            |b, o| layer.read_at(b, o),
        );
    }
}

/// An in-memory image file.
pub fn file(name: &str, bytes: &[u8]) -> ImageFile {
    ImageFile::from_bytes(name.to_owned(), bytes.to_vec())
}

fn exercise_reads(
    size: u64,
    map: impl Fn(u64, u64) -> crate::error::Result<usize>,
    read: impl Fn(&mut [u8], u64) -> crate::error::Result<()>,
) {
    let mut budget = READ_BUDGET;
    let mut buf = vec![0u8; usize::try_from(READ_CHUNK).unwrap_or(1 << 20)];
    for (offset, len) in MapWalker::new(size) {
        if map(offset, len).is_err() {
            return;
        }
        let mut pos = offset;
        while pos < offset + len && budget > 0 {
            let n = READ_CHUNK.min(offset + len - pos);
            let n_usize = usize::try_from(n).unwrap_or(buf.len());
            if read(&mut buf[..n_usize], pos).is_err() {
                return;
            }
            pos += n;
            budget = budget.saturating_sub(n);
        }
        if budget == 0 {
            // Probe the far end too: lying headers usually bite there.
            let tail = size.saturating_sub(4096);
            let _ = read(&mut buf[..usize::try_from(size - tail).unwrap_or(0)], tail);
            return;
        }
    }
}
