//! Helpers shared by the integration tests that cross-check our formats with qemu-img.
//! qemu-img is required (CI installs qemu-utils): a missing one fails the test loudly
//! rather than skipping it, so a green run always means the cross-check ran.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use rehost_diskimage::Disk;
use sha2::{Digest, Sha256};

/// Runs `qemu-img` with `args`, panicking with its stderr on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-img` and returns whether it succeeded, with its combined output.
pub fn qemu_img_status(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (apt-get install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `qemu-io` with `args` (used to write into images qemu-img created).
pub fn qemu_io(args: &[&str]) {
    let out = Command::new("qemu-io")
        .args(args)
        .output()
        .expect("qemu-io must be installed (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-io {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A raw disk of `size` bytes with scattered data: some regions random-looking, some
/// repeated, most zero, and data touching the last sector, seeded so failures reproduce.
pub fn pattern_raw(dir: &Path, name: &str, size: u64, seed: u64) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = vec![0u8; usize::try_from(size).unwrap()];
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let regions = 8 + (next() % 24) as usize;
    for _ in 0..regions {
        let start = (next() % size) as usize;
        let len = (next() % 300_000) as usize + 1;
        let end = (start + len).min(bytes.len());
        let fill = next();
        for (i, b) in bytes[start..end].iter_mut().enumerate() {
            *b = if fill % 3 == 0 {
                (fill >> 8) as u8
            } else {
                ((fill >> (i % 57)) as u8) ^ (i as u8)
            };
        }
    }
    let n = bytes.len();
    bytes[n - 1] = 0xEE;
    bytes[0] = 0xAA;
    std::fs::write(&path, &bytes).unwrap();
    path
}

/// SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// SHA-256 of what qemu-img decodes `image` to (with `format` when probing is unsafe).
pub fn qemu_sha256(image: &Path, format: Option<&str>) -> String {
    let out = image.with_extension("qemu-raw");
    let mut args = vec!["convert"];
    if let Some(f) = format {
        args.extend(["-f", f]);
    }
    args.extend(["-O", "raw", image.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
    let sum = sha256_file(&out);
    std::fs::remove_file(out).unwrap();
    sum
}

/// SHA-256 of what our reader decodes `image` (and its parents) to.
pub fn our_sha256(image: &Path) -> String {
    let disk = Disk::open(image.to_str().unwrap()).unwrap();
    hex::encode(rehost_diskimage::checksum::sha256(&disk, 2, &mut |_| {}).unwrap())
}

/// Reads the whole virtual disk through our reader, comparing every `Data`/`Zero`/
/// `Unallocated` extent's bytes with what a random-access read returns, and returns it.
pub fn our_bytes(image: &Path) -> Vec<u8> {
    let disk = Disk::open(image.to_str().unwrap()).unwrap();
    let mut out = vec![0u8; usize::try_from(disk.virtual_size()).unwrap()];
    disk.read_at(&mut out, 0).unwrap();
    out
}
