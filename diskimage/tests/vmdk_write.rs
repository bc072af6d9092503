//! Cross-checks of our VMDK writers with qemu-img: what we write must pass `qemu-img check`
//! and decode, through qemu, to exactly the bytes we were fed.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use common::{pattern_raw, qemu_img, qemu_img_status, qemu_sha256, sha256_file};
use rehost_diskimage::vmdk::{SparseWriter, StreamOptimizedWriter};
use rehost_diskimage::write::{OutputFormat, convert, create};
use rehost_diskimage::{Disk, Extent, ExtentSink, ImageId, ParentLink, WriteSummary};

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 65536;

/// Feeds `raw` to `sink` as Data/Zero extents of uneven, sector-aligned lengths around
/// 1 MiB, so grains are regularly assembled from several extents.
fn feed(raw: &[u8], mut sink: Box<dyn ExtentSink>) -> WriteSummary {
    let mut offset = 0usize;
    let mut step = 0usize;
    while offset < raw.len() {
        let len = (MIB as usize - 512 * (step % 7) * 13).min(raw.len() - offset);
        let piece = &raw[offset..offset + len];
        let o = offset as u64;
        if piece.iter().all(|&b| b == 0) {
            sink.put(Extent::Zero {
                offset: o,
                len: len as u64,
            })
            .unwrap();
        } else {
            sink.put(Extent::Data {
                offset: o,
                data: Bytes::copy_from_slice(piece),
            })
            .unwrap();
        }
        offset += len;
        step += 1;
    }
    sink.finish().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` must report no errors nor leaks.
fn assert_check_clean(image: &Path) {
    let (ok, text) = qemu_img_status(&["check", s(image)]);
    assert!(
        ok && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        image.display()
    );
}

/// The raw disk padded to whole sectors, as VMDK stores it.
fn padded(raw: &Path) -> PathBuf {
    let bytes = std::fs::read(raw).unwrap();
    let out = raw.with_extension("padded");
    let mut padded = bytes.clone();
    padded.resize(bytes.len().div_ceil(512) * 512, 0);
    std::fs::write(&out, padded).unwrap();
    out
}

/// `qemu-img compare` must find `image` identical to the raw `expected`, sizes included
/// (its strict mode would also compare allocation, which differs by design).
fn assert_compare(expected: &Path, image: &Path) {
    let (ok, text) =
        qemu_img_status(&["compare", "-f", "raw", "-F", "vmdk", s(expected), s(image)]);
    assert!(
        ok && text.contains("Images are identical"),
        "qemu-img compare {}: {text}",
        image.display()
    );
    let size = std::fs::metadata(expected).unwrap().len();
    let info = info_json(image);
    assert!(
        info.contains(&format!("\"virtual-size\": {size},")),
        "{info}"
    );
}

fn info_json(image: &Path) -> String {
    qemu_img(&["info", "--output", "json", s(image)])
}

/// Checks `image` is a valid VMDK whose content is exactly `raw` (padded to a sector).
fn assert_same_as_raw(image: &Path, raw: &Path) {
    assert_check_clean(image);
    let expected = padded(raw);
    assert_compare(&expected, image);
    assert_eq!(
        qemu_sha256(image, Some("vmdk")),
        sha256_file(&expected),
        "{}",
        image.display()
    );
}

#[test]
fn stream_optimized_decodes_to_its_input_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // Sizes: not a multiple of a grain nor of a grain table; not even a whole sector.
    for (i, size) in [5 * MIB + 7 * 512, 33 * MIB + 3 * GRAIN + 100]
        .into_iter()
        .enumerate()
    {
        let raw = pattern_raw(dir.path(), &format!("in{i}.raw"), size, 11 + i as u64);
        let bytes = std::fs::read(&raw).unwrap();
        let out = dir.path().join(format!("out{i}.vmdk"));
        let w = StreamOptimizedWriter::new(
            BufWriter::new(File::create(&out).unwrap()),
            size,
            s(&out).into(),
        )
        .unwrap();
        let summary = feed(&bytes, Box::new(w));
        assert_eq!(summary.file_bytes, std::fs::metadata(&out).unwrap().len());
        assert!(
            summary.data_bytes > 0 && summary.data_bytes < size,
            "{summary:?}"
        );
        assert_same_as_raw(&out, &raw);
        let info = info_json(&out);
        assert!(
            info.contains("\"create-type\": \"streamOptimized\""),
            "{info}"
        );
        assert!(info.contains("\"compressed\": true"), "{info}");
        assert!(
            info.contains(&format!("\"virtual-size\": {}", size.div_ceil(512) * 512)),
            "{info}"
        );
    }
}

#[test]
fn monolithic_sparse_decodes_to_its_input_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (i, size) in [3 * MIB + 5 * 512, 40 * MIB + 123].into_iter().enumerate() {
        let raw = pattern_raw(dir.path(), &format!("in{i}.raw"), size, 29 + i as u64);
        let bytes = std::fs::read(&raw).unwrap();
        let out = dir.path().join(format!("out{i}.vmdk"));
        let w = SparseWriter::new(File::create(&out).unwrap(), size, None, s(&out).into()).unwrap();
        let summary = feed(&bytes, Box::new(w));
        assert_eq!(summary.file_bytes, std::fs::metadata(&out).unwrap().len());
        // Sparse: zero grains take no space.
        assert!(summary.file_bytes < size, "{summary:?}");
        assert_same_as_raw(&out, &raw);
        let info = info_json(&out);
        assert!(
            info.contains("\"create-type\": \"monolithicSparse\""),
            "{info}"
        );
        assert!(info.contains("\"parent-cid\": 4294967295"), "{info}");
    }
}

#[test]
fn empty_disks_are_valid() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * MIB;
    let zeros = dir.path().join("zeros.raw");
    std::fs::write(&zeros, vec![0u8; size as usize]).unwrap();
    let a = dir.path().join("a.vmdk");
    let w = SparseWriter::new(File::create(&a).unwrap(), size, None, s(&a).into()).unwrap();
    assert_eq!(feed(&vec![0u8; size as usize], Box::new(w)).data_bytes, 0);
    assert_same_as_raw(&a, &zeros);
    let b = dir.path().join("b.vmdk");
    let w = StreamOptimizedWriter::new(File::create(&b).unwrap(), size, s(&b).into()).unwrap();
    assert_eq!(feed(&vec![0u8; size as usize], Box::new(w)).data_bytes, 0);
    assert_same_as_raw(&b, &zeros);
}

#[test]
fn convert_from_a_raw_disk_through_the_framework() {
    let dir = tempfile::tempdir().unwrap();
    let size = 6 * MIB + 512;
    let raw = pattern_raw(dir.path(), "in.raw", size, 5);
    let disk = Disk::open(s(&raw)).unwrap();
    for (format, name) in [
        (OutputFormat::VmdkStream, "s.vmdk"),
        (OutputFormat::VmdkSparse, "m.vmdk"),
    ] {
        let out = dir.path().join(name);
        let sink = create(&out, format, size, None).unwrap();
        convert(&disk, sink, 2, &mut |_| {}).unwrap();
        assert_same_as_raw(&out, &raw);
    }
}

/// The CID in a VMDK's embedded descriptor.
fn cid_of(vmdk: &Path) -> u32 {
    let bytes = std::fs::read(vmdk).unwrap();
    let text = String::from_utf8_lossy(&bytes[512..512 * 21]);
    let line = text.lines().find(|l| l.starts_with("CID=")).unwrap();
    u32::from_str_radix(&line[4..], 16).unwrap()
}

#[test]
fn delta_child_over_a_qemu_parent() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB + 3 * GRAIN; // not a multiple of a grain table's span
    let base_raw = pattern_raw(dir.path(), "base.raw", size, 3);
    let base = dir.path().join("base.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&base_raw), s(&base)]);
    let old = std::fs::read(&base_raw).unwrap();

    // Change grains 1 and 40 (partly), zero grain 0 (which holds data in the base), write
    // new data into the last grain and leave everything else unchanged.
    let mut new = old.clone();
    let grain = |g: u64| (g * GRAIN) as usize..((g + 1) * GRAIN) as usize;
    new[grain(1)][100..200].fill(0x42);
    new[grain(40)].fill(0x17);
    new[grain(0)].fill(0);
    let last = size / GRAIN - 1;
    new[grain(last)][GRAIN as usize - 1] ^= 0xff;
    assert_ne!(old[grain(0)], new[grain(0)]);
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &new).unwrap();

    let child = dir.path().join("child.vmdk");
    let link = ParentLink {
        relative_path: "base.vmdk".into(),
        absolute_path: s(&base).into(),
        id: ImageId::VmdkCid(cid_of(&base)),
        virtual_size_bytes: size,
    };
    let mut w: Box<dyn ExtentSink> = Box::new(
        SparseWriter::new(
            File::create(&child).unwrap(),
            size,
            Some(link),
            s(&child).into(),
        )
        .unwrap(),
    );
    assert_eq!(w.alignment(), GRAIN);
    for g in 0..size / GRAIN {
        let (o, n) = (g * GRAIN, GRAIN);
        let range = grain(g);
        let e = if old[range.clone()] == new[range.clone()] {
            Extent::Unchanged { offset: o, len: n }
        } else if new[range.clone()].iter().all(|&b| b == 0) {
            Extent::Zero { offset: o, len: n }
        } else {
            Extent::Data {
                offset: o,
                data: Bytes::copy_from_slice(&new[range]),
            }
        };
        w.put(e).unwrap();
    }
    let summary = w.finish().unwrap();
    assert_eq!(
        summary.data_bytes,
        3 * GRAIN,
        "grains 1, 40 and the last are stored"
    );

    assert_check_clean(&child);
    assert_compare(&expected, &child);
    assert_eq!(qemu_sha256(&child, Some("vmdk")), sha256_file(&expected));
    let chain = qemu_img(&["info", "--backing-chain", s(&child)]);
    assert!(chain.contains("backing file: base.vmdk"), "{chain}");
    assert!(chain.contains(&format!("image: {}", s(&base))), "{chain}");
    // The zeroed grain is a zero-grain entry, which needs the version-2 header.
    let header = std::fs::read(&child).unwrap();
    assert_eq!(&header[4..12], &[2, 0, 0, 0, 7, 0, 0, 0]);
    // Our child alone (no parent data) holds only what changed: unchanged grains read as
    // the parent's, so moving the parent away must fail to open.
    std::fs::rename(&base, dir.path().join("moved.vmdk")).unwrap();
    let (ok, _) = qemu_img_status(&[
        "convert",
        "-O",
        "raw",
        s(&child),
        s(&dir.path().join("x.raw")),
    ]);
    assert!(!ok, "the child must depend on its parent");
}

#[test]
fn delta_without_zero_grains_keeps_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 * MIB;
    let child = dir.path().join("c.vmdk");
    let link = ParentLink {
        relative_path: "p.vmdk".into(),
        absolute_path: "/nowhere/p.vmdk".into(),
        id: ImageId::VmdkCid(0x1234),
        virtual_size_bytes: size,
    };
    let mut w: Box<dyn ExtentSink> = Box::new(
        SparseWriter::new(
            File::create(&child).unwrap(),
            size,
            Some(link),
            s(&child).into(),
        )
        .unwrap(),
    );
    w.put(Extent::Data {
        offset: 0,
        data: Bytes::from(vec![1u8; GRAIN as usize]),
    })
    .unwrap();
    w.put(Extent::Unchanged {
        offset: GRAIN,
        len: size - GRAIN,
    })
    .unwrap();
    w.finish().unwrap();
    let bytes = std::fs::read(&child).unwrap();
    assert_eq!(&bytes[4..12], &[1, 0, 0, 0, 3, 0, 0, 0]);
    let text = String::from_utf8_lossy(&bytes[512..4096]);
    assert!(text.contains("parentCID=00001234\n"), "{text}");
    assert!(text.contains("parentFileNameHint=\"p.vmdk\"\n"), "{text}");
}

#[test]
fn delta_misuse_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.vmdk");
    let link = |id, size| ParentLink {
        relative_path: "p.vhd".into(),
        absolute_path: "/x/p.vhd".into(),
        id,
        virtual_size_bytes: size,
    };
    let open = |l: ParentLink, size| {
        SparseWriter::new(File::create(&out).unwrap(), size, Some(l), s(&out).into())
    };
    let err = open(link(ImageId::VhdUniqueId([0; 16]), MIB), MIB).unwrap_err();
    assert!(err.to_string().contains("needs a VMDK parent"), "{err}");
    let err = open(link(ImageId::VmdkCid(1), 2 * MIB), MIB).unwrap_err();
    assert!(err.to_string().contains("parent's size"), "{err}");
    // A grain is all or nothing in a delta: a sector-aligned extent is refused.
    let mut w = open(link(ImageId::VmdkCid(1), MIB), MIB).unwrap();
    let err = w
        .put(Extent::Data {
            offset: 0,
            data: Bytes::from(vec![1u8; 512]),
        })
        .unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
    // Finishing early is refused too.
    let mut w = open(link(ImageId::VmdkCid(1), MIB), MIB).unwrap();
    w.put(Extent::Unchanged {
        offset: 0,
        len: GRAIN,
    })
    .unwrap();
    assert!((Box::new(w) as Box<dyn ExtentSink>).finish().is_err());
}

/// A large, nearly empty disk: both writers must stay fast and small, and qemu must find
/// the data at both ends (grain table indexes far from 0, a short last grain).
#[test]
fn large_sparse_disks() {
    let dir = tempfile::tempdir().unwrap();
    let size = (100u64 << 30) + 512; // 100 GiB and a sector: its last grain is short
    let last = size / GRAIN * GRAIN;
    for (i, stream) in [false, true].into_iter().enumerate() {
        let out = dir.path().join(format!("big{i}.vmdk"));
        let file = File::create(&out).unwrap();
        let mut w: Box<dyn ExtentSink> = if stream {
            Box::new(
                StreamOptimizedWriter::new(BufWriter::new(file), size, s(&out).into()).unwrap(),
            )
        } else {
            Box::new(SparseWriter::new(file, size, None, s(&out).into()).unwrap())
        };
        w.put(Extent::Data {
            offset: 0,
            data: Bytes::from(vec![0x5a; 4096]),
        })
        .unwrap();
        w.put(Extent::Zero {
            offset: 4096,
            len: last - 4096,
        })
        .unwrap();
        w.put(Extent::Data {
            offset: last,
            data: Bytes::from(vec![0xa5; 512]),
        })
        .unwrap();
        let summary = w.finish().unwrap();
        assert_eq!(summary.data_bytes, GRAIN + 512);
        assert_check_clean(&out);
        common::qemu_io(&[
            "-f",
            "vmdk",
            "-c",
            "read -P 0x5a 0 4096",
            "-c",
            "read -P 0 4096 61440",
            s(&out),
        ]);
        common::qemu_io(&[
            "-f",
            "vmdk",
            "-c",
            &format!("read -P 0xa5 {last} 512"),
            s(&out),
        ]);
        let (_, text) = qemu_img_status(&["map", "--output", "json", "-f", "vmdk", s(&out)]);
        assert_eq!(text.matches("\"data\": true").count(), 2, "{text}");
    }
}
