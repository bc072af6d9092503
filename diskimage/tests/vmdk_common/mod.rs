//! Helpers shared by the VMDK reader tests.
#![allow(dead_code, clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::Path;

use rehost_diskimage::{Disk, ExtentKind};

use crate::common::{our_sha256, qemu_img, qemu_sha256};

pub const MIB: u64 = 1 << 20;

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Checks our decoding against qemu's, and that the map agrees with the bytes: every
/// Zero/Unallocated range reads as zero.
pub fn check_matches_qemu(image: &Path) -> Disk {
    assert_eq!(
        our_sha256(image),
        qemu_sha256(image, Some("vmdk")),
        "{}",
        image.display()
    );
    check_map_agrees(image)
}

/// Checks the map against the bytes and unaligned reads against a whole read.
pub fn check_map_agrees(image: &Path) -> Disk {
    let disk = Disk::open(p(image)).unwrap();
    let size = disk.virtual_size();
    let mut bytes = vec![0u8; size as usize];
    disk.read_at(&mut bytes, 0).unwrap();
    let map = disk.map_range(0, size).unwrap();
    let mut pos = 0;
    for e in &map {
        assert_eq!(e.offset, pos);
        pos = e.end();
        if e.kind != ExtentKind::Data {
            let piece = &bytes[e.offset as usize..e.end() as usize];
            assert!(
                piece.iter().all(|&b| b == 0),
                "{e:?} of {} is not zero",
                image.display()
            );
        }
    }
    assert_eq!(pos, size);
    // Odd, unaligned reads agree with the whole read.
    for (off, len) in [(1u64, 1000usize), (65_535, 70_000), (size - 777, 777)] {
        let mut b = vec![0u8; len];
        disk.read_at(&mut b, off).unwrap();
        assert_eq!(&b[..], &bytes[off as usize..off as usize + len]);
    }
    disk
}

pub fn convert(dir: &Path, raw: &Path, subformat: &str) -> std::path::PathBuf {
    let out = dir.join(format!("{subformat}.vmdk"));
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        &format!("subformat={subformat}"),
        p(raw),
        p(&out),
    ]);
    out
}

/// Reads `u32`/`u64` fields of a file's header.
pub fn header_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}
