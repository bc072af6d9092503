//! Hostile-input checks: damaged images must fail cleanly, never panic or hang.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::Cursor;

use bytes::Bytes;
use rehost_core::Extent;

use super::{MIB, VhdxWriter, open};
use crate::io::ImageFile;
use crate::sink::ExtentSink;

/// A small valid image from our writer: 3 MiB + 512 bytes, 1 MiB blocks, two allocated.
fn image() -> Vec<u8> {
    let size = 3 * MIB + 512;
    let mut out = Cursor::new(Vec::new());
    let mut w = Box::new(VhdxWriter::new(&mut out, size, Some(1 << 20), "r".into()).unwrap());
    w.put(Extent::Data {
        offset: 0,
        data: Bytes::from(vec![1u8; 4096]),
    })
    .unwrap();
    w.put(Extent::Zero {
        offset: 4096,
        len: 2 * MIB,
    })
    .unwrap();
    let rest = usize::try_from(size - 2 * MIB - 4096).unwrap();
    w.put(Extent::Data {
        offset: 2 * MIB + 4096,
        data: Bytes::from(vec![2u8; rest]),
    })
    .unwrap();
    ExtentSink::finish(w).unwrap();
    out.into_inner()
}

#[test]
fn damaged_metadata_and_bat_never_panic() {
    let good = image();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    // The metadata table and items (2 MiB..2 MiB + 68 KiB) and the BAT's first entries
    // (3 MiB..) carry no checksum, so damage there reaches the parsers.
    let targets = [(2 * MIB, 64 * 1024 + 64), (3 * MIB, 64)];
    for round in 0..400 {
        let mut bytes = good.clone();
        for _ in 0..1 + next() % 4 {
            let (start, len) = targets[(next() % 2) as usize];
            let at = usize::try_from(start + next() % len).unwrap();
            bytes[at] = match next() % 3 {
                0 => bytes[at] ^ (1 << (next() % 8)),
                1 => 0xFF,
                _ => next() as u8,
            };
        }
        let Ok(layer) = open(ImageFile::from_bytes("r.vhdx", bytes)) else {
            continue;
        };
        let size = layer.info().virtual_size_bytes.min(8 * MIB);
        if let Ok(map) = layer.map_range(0, size) {
            assert_eq!(
                map.iter().map(|e| e.len).sum::<u64>(),
                size,
                "round {round}"
            );
        }
        let mut buf = vec![0u8; usize::try_from(size).unwrap()];
        let _ = layer.read_at(&mut buf, 0);
    }
}

#[test]
fn truncated_anywhere_fails_cleanly() {
    let good = image();
    for cut in (0..good.len()).step_by(65536 + 4096) {
        assert!(
            open(ImageFile::from_bytes("r.vhdx", good[..cut].to_vec())).is_err(),
            "cut at {cut}"
        );
    }
}
