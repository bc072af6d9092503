//! `rehost disk …` as a user runs it, on images qemu-img makes, checked against qemu-img.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

fn rehost(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rehost"))
        .args(args)
        .output()
        .unwrap()
}

fn rehost_ok(args: &[&str]) -> String {
    let out = rehost(args);
    assert!(
        out.status.success(),
        "rehost {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A raw disk of `size` bytes with data scattered over it (seeded, so failures reproduce).
fn raw_disk(dir: &Path, name: &str, size: usize, seed: u64) -> PathBuf {
    let mut bytes = vec![0u8; size];
    let mut state = seed | 1;
    for _ in 0..20 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let start = (state >> 16) as usize % size;
        let len = ((state >> 40) as usize % 200_000).min(size - start);
        for (i, b) in bytes[start..start + len].iter_mut().enumerate() {
            *b = (i as u64 ^ state >> (i % 29)) as u8;
        }
    }
    bytes[size - 1] = 0x55;
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn checksum_equals_qemu_raw_output_for_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "disk.raw", 9 << 20, 1);
    let expected = sha256_file(&raw);
    let images = [
        (
            "s.vmdk",
            vec!["-O", "vmdk", "-o", "subformat=streamOptimized"],
        ),
        (
            "m.vmdk",
            vec!["-O", "vmdk", "-o", "subformat=monolithicSparse"],
        ),
        (
            "d.vhd",
            vec!["-O", "vpc", "-o", "subformat=dynamic,force_size=on"],
        ),
        (
            "f.vhd",
            vec!["-O", "vpc", "-o", "subformat=fixed,force_size=on"],
        ),
        ("d.vhdx", vec!["-O", "vhdx", "-o", "subformat=dynamic"]),
    ];
    for (name, args) in images {
        let image = dir.path().join(name);
        let mut full = vec!["convert", "-f", "raw"];
        full.extend(args);
        full.extend([p(&raw), p(&image)]);
        qemu_img(&full);
        let first_line = rehost_ok(&["disk", "checksum", p(&image)])
            .lines()
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(first_line, expected, "{name}");
    }
}

#[test]
fn inspect_reports_format_sizes_and_no_inconsistency() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "disk.raw", 5 << 20, 2);
    let image = dir.path().join("disk.bin"); // the name says nothing: detection reads bytes
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        p(&raw),
        p(&image),
    ]);
    let report: Value = serde_json::from_str(&rehost_ok(&[
        "disk",
        "inspect",
        p(&image),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(report["format"], "vmdk");
    assert_eq!(report["subformat"], "streamOptimized");
    assert_eq!(report["virtual_size_bytes"], 5 << 20);
    assert_eq!(report["cluster_size_bytes"], 65536);
    let allocated = report["allocated_bytes"].as_u64().unwrap();
    assert!(
        allocated > 0 && allocated < 5 << 20,
        "allocated {allocated}"
    );
    assert_eq!(report["inconsistencies"], Value::Array(vec![]));
    assert!(report["parent"].is_null());
}

#[test]
fn map_covers_the_disk_and_skips_holes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "disk.raw", 6 << 20, 3);
    let image = dir.path().join("disk.vhdx");
    qemu_img(&[
        "convert",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        p(&raw),
        p(&image),
    ]);
    let map: Vec<Value> =
        serde_json::from_str(&rehost_ok(&["disk", "map", p(&image), "--output", "json"])).unwrap();
    let mut pos = 0;
    for e in &map {
        assert_eq!(e["offset"].as_u64().unwrap(), pos);
        pos += e["len"].as_u64().unwrap();
    }
    assert_eq!(pos, 6 << 20);
    assert!(map.iter().any(|e| e["kind"] == "data"));
}

#[test]
fn convert_to_every_format_equals_the_input_per_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "disk.raw", (7 << 20) + 3 * 512, 4);
    let source = dir.path().join("source.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        p(&raw),
        p(&source),
    ]);
    for (to, qemu_format) in [
        ("raw", "raw"),
        ("vmdk-stream", "vmdk"),
        ("vmdk-sparse", "vmdk"),
        ("vhd-fixed", "vpc"),
        ("vhd-dynamic", "vpc"),
        ("vhdx", "vhdx"),
    ] {
        let out = dir.path().join(format!("out-{to}"));
        let report: Value = serde_json::from_str(&rehost_ok(&[
            "disk",
            "convert",
            p(&source),
            p(&out),
            "--to",
            to,
            "--output",
            "json",
        ]))
        .unwrap();
        assert_eq!(report["format"], to);
        qemu_img(&["compare", "-f", qemu_format, "-F", "raw", p(&out), p(&raw)]);
        assert_eq!(
            rehost_ok(&["disk", "checksum", p(&out)]).trim(),
            sha256_file(&raw),
            "{to}"
        );
    }
}

#[test]
fn convert_with_parent_writes_only_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let base_raw = raw_disk(dir.path(), "base.raw", 8 << 20, 5);
    let mut changed = std::fs::read(&base_raw).unwrap();
    changed[100_000..100_100].fill(0xC3); // a few bytes in one grain
    changed[(6 << 20)..(6 << 20) + 65536].fill(0); // a grain zeroed
    changed[(7 << 20) + 7..(7 << 20) + 9].fill(0x11);
    let new_raw = dir.path().join("new.raw");
    std::fs::write(&new_raw, &changed).unwrap();
    let expected = sha256_file(&new_raw);

    for (to, ext) in [("vmdk-sparse", "vmdk"), ("vhd-dynamic", "vhd")] {
        let base = dir.path().join(format!("base.{ext}"));
        let child = dir.path().join(format!("child.{ext}"));
        rehost_ok(&["disk", "convert", p(&base_raw), p(&base), "--to", to]);
        let report: Value = serde_json::from_str(&rehost_ok(&[
            "disk",
            "convert",
            p(&new_raw),
            p(&child),
            "--to",
            to,
            "--parent",
            p(&base),
            "--output",
            "json",
        ]))
        .unwrap();
        assert!(
            report["data_bytes"].as_u64().unwrap() <= 3 * 65536,
            "{to}: {report}"
        );
        assert_eq!(
            rehost_ok(&["disk", "checksum", p(&child)]).trim(),
            expected,
            "{to}"
        );
        let inspect: Value = serde_json::from_str(&rehost_ok(&[
            "disk",
            "inspect",
            p(&child),
            "--output",
            "json",
        ]))
        .unwrap();
        assert_eq!(
            inspect["subformat"],
            if ext == "vhd" {
                "differencing"
            } else {
                "monolithicSparse"
            }
        );
        assert_eq!(inspect["chain"].as_array().unwrap().len(), 2, "{inspect}");
    }
    // qemu reads VMDK delta chains (not differencing VHDs): it must agree.
    qemu_img(&[
        "compare",
        "-f",
        "vmdk",
        "-F",
        "raw",
        p(&dir.path().join("child.vmdk")),
        p(&new_raw),
    ]);
}

#[test]
fn corrupt_and_missing_inputs_fail_cleanly_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_disk(dir.path(), "disk.raw", 4 << 20, 6);
    let vhdx = dir.path().join("disk.vhdx");
    qemu_img(&["convert", "-O", "vhdx", p(&raw), p(&vhdx)]);
    let truncated = dir.path().join("truncated.vhdx");
    std::fs::write(&truncated, &std::fs::read(&vhdx).unwrap()[..300 * 1024]).unwrap();
    let missing = dir.path().join("nope.vmdk");
    for (path, what) in [(&truncated, "truncated.vhdx"), (&missing, "nope.vmdk")] {
        for cmd in ["inspect", "checksum", "map"] {
            let out = rehost(&["disk", cmd, p(path)]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{cmd} {what} succeeded");
            assert!(stderr.contains(what), "{cmd} {what}: {stderr}");
            assert!(!stderr.contains("panicked"), "{cmd} {what}: {stderr}");
        }
    }
    let out = rehost(&[
        "disk",
        "convert",
        p(&raw),
        p(&dir.path().join("x")),
        "--to",
        "qcow2",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmdk-stream"));
}
