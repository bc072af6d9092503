//! Building and walking allocation maps.

use rehost_core::{ExtentKind, MapExtent};

/// How much of the virtual disk one `map_range` call covers when walking a whole disk:
/// big enough that per-call overhead vanishes, small enough that even a map alternating
/// at every 512-byte sector stays a few megabytes.
pub const MAP_WINDOW_BYTES: u64 = 1 << 30;

/// Iterates `(offset, len)` windows covering `[0, size)`.
#[derive(Debug, Clone)]
pub struct MapWalker {
    next: u64,
    size: u64,
    window: u64,
}

impl MapWalker {
    /// Windows of [`MAP_WINDOW_BYTES`] over a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self::with_window(size, MAP_WINDOW_BYTES)
    }

    /// Windows of `window` bytes (at least one byte).
    pub fn with_window(size: u64, window: u64) -> Self {
        Self {
            next: 0,
            size,
            window: window.max(1),
        }
    }
}

impl Iterator for MapWalker {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        if self.next >= self.size {
            return None;
        }
        let len = self.window.min(self.size - self.next);
        let item = (self.next, len);
        self.next += len;
        Some(item)
    }
}

/// Collects extents in order, merging neighbours of the same kind.
#[derive(Debug, Default)]
pub struct MapBuilder {
    extents: Vec<MapExtent>,
}

impl MapBuilder {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `[offset, offset + len)`; it must start where the previous one ended.
    pub fn push(&mut self, offset: u64, len: u64, kind: ExtentKind) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.extents.last_mut() {
            debug_assert_eq!(last.end(), offset, "map extents must be contiguous");
            if last.kind == kind && last.end() == offset {
                last.len += len;
                return;
            }
        }
        self.extents.push(MapExtent { offset, len, kind });
    }

    /// The merged extents.
    pub fn finish(self) -> Vec<MapExtent> {
        self.extents
    }
}

/// Maps a range of a disk whose allocation unit is `unit` bytes, asking `kind_of(index)`
/// for each unit the range touches. The common shape of every block-based format.
pub fn map_by_units<E>(
    offset: u64,
    len: u64,
    unit: u64,
    mut kind_of: impl FnMut(u64) -> Result<ExtentKind, E>,
) -> Result<Vec<MapExtent>, E> {
    let mut map = MapBuilder::new();
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let index = pos / unit;
        let unit_end = ((index + 1) * unit).min(end);
        map.push(pos, unit_end - pos, kind_of(index)?);
        pos = unit_end;
    }
    Ok(map.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn walker_covers_the_disk() {
        let w: Vec<_> = MapWalker::with_window(10, 4).collect();
        assert_eq!(w, vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(MapWalker::new(0).count(), 0);
    }

    proptest! {
        #[test]
        fn map_by_units_covers_the_range_exactly(
            offset in 0u64..10_000, len in 0u64..10_000, unit in 1u64..700, seed in any::<u64>()
        ) {
            let kinds = [ExtentKind::Data, ExtentKind::Zero, ExtentKind::Unallocated];
            let map = map_by_units::<()>(offset, len, unit, |i| {
                Ok(kinds[((i.wrapping_mul(seed | 1) >> 7) % 3) as usize])
            }).unwrap();
            let mut pos = offset;
            for (i, e) in map.iter().enumerate() {
                prop_assert_eq!(e.offset, pos);
                prop_assert!(e.len > 0);
                if i > 0 { prop_assert_ne!(map[i - 1].kind, e.kind); }
                pos = e.end();
            }
            prop_assert_eq!(pos, offset + len);
        }
    }
}
