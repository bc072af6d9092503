//! How a source reads a disk: the areas it must copy (read, or known to be zero) turned
//! into ordered pieces covering the whole disk — ranged reads of at most a chunk, zeros,
//! and the unchanged gaps between. Shared by every source that reads over HTTP ranges.

/// What a planned area of the disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AreaKind {
    /// Its bytes must be read.
    Read,
    /// Known to be zero (e.g. pages cleared since the previous snapshot): nothing to read.
    Zero,
}

/// An area of the disk to copy; what lies between areas is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Area {
    pub offset: u64,
    pub len: u64,
    pub kind: AreaKind,
}

/// One step of a disk read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Not read: unchanged since the source's token (or unallocated).
    Unchanged { offset: u64, len: u64 },
    /// Zeros, not read.
    Zero { offset: u64, len: u64 },
    /// Read with one ranged request.
    Read { offset: u64, len: u64 },
}

/// The ordered pieces covering `[0, capacity)`: `areas` (sorted, disjoint) with read areas
/// cut into reads of at most `chunk` bytes, zero areas as they are, the gaps unchanged.
pub fn plan_pieces(areas: &[Area], capacity: u64, chunk: u64) -> Vec<Piece> {
    let chunk = chunk.max(1);
    let mut pieces = Vec::new();
    let mut at = 0;
    for area in areas {
        if area.offset > at {
            pieces.push(Piece::Unchanged {
                offset: at,
                len: area.offset - at,
            });
        }
        let end = area.offset + area.len;
        match area.kind {
            AreaKind::Zero => pieces.push(Piece::Zero {
                offset: area.offset,
                len: area.len,
            }),
            AreaKind::Read => {
                let mut offset = area.offset;
                while offset < end {
                    let len = chunk.min(end - offset);
                    pieces.push(Piece::Read { offset, len });
                    offset += len;
                }
            }
        }
        at = end;
    }
    if at < capacity {
        pieces.push(Piece::Unchanged {
            offset: at,
            len: capacity - at,
        });
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_disk_in_order() {
        let mib = 1 << 20;
        let areas = [
            Area {
                offset: mib,
                len: 9 * mib,
                kind: AreaKind::Read,
            },
            Area {
                offset: 12 * mib,
                len: mib,
                kind: AreaKind::Zero,
            },
        ];
        assert_eq!(
            plan_pieces(&areas, 16 * mib, 4 * mib),
            vec![
                Piece::Unchanged {
                    offset: 0,
                    len: mib
                },
                Piece::Read {
                    offset: mib,
                    len: 4 * mib
                },
                Piece::Read {
                    offset: 5 * mib,
                    len: 4 * mib
                },
                Piece::Read {
                    offset: 9 * mib,
                    len: mib
                },
                Piece::Unchanged {
                    offset: 10 * mib,
                    len: 2 * mib
                },
                Piece::Zero {
                    offset: 12 * mib,
                    len: mib
                },
                Piece::Unchanged {
                    offset: 13 * mib,
                    len: 3 * mib
                },
            ]
        );
        // The same areas, all to read (vSphere's CBT areas): the last is one read.
        let all_read: Vec<Area> = areas
            .iter()
            .map(|a| Area {
                kind: AreaKind::Read,
                ..*a
            })
            .collect();
        assert_eq!(
            plan_pieces(&all_read, 16 * mib, 4 * mib)[5..],
            [
                Piece::Read {
                    offset: 12 * mib,
                    len: mib
                },
                Piece::Unchanged {
                    offset: 13 * mib,
                    len: 3 * mib
                },
            ]
        );
        assert_eq!(
            plan_pieces(&[], 5, 4),
            vec![Piece::Unchanged { offset: 0, len: 5 }]
        );
        assert_eq!(plan_pieces(&[], 0, 4), vec![]);
    }
}
