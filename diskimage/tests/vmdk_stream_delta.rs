//! streamOptimized deltas: a VMDK child written forward-only (as an incremental export
//! streams into S3) that qemu-img and our own reader resolve through its parent to exactly
//! the expected disk.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use bytes::Bytes;
use common::{our_sha256, pattern_raw, qemu_img, qemu_img_status, qemu_sha256, sha256_file};
use rehost_diskimage::vmdk::StreamOptimizedWriter;
use rehost_diskimage::write::{
    OutputFormat, convert, convert_delta, create, create_stream, parent_link,
};
use rehost_diskimage::{Disk, Extent, ExtentKind, ExtentSink, ImageId, ParentLink};

const MIB: u64 = 1 << 20;
const GRAIN: u64 = 65536;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The CID in a VMDK's embedded descriptor.
fn cid_of(vmdk: &Path) -> u32 {
    let bytes = std::fs::read(vmdk).unwrap();
    let text = String::from_utf8_lossy(&bytes[512..512 * 21]);
    let line = text.lines().find(|l| l.starts_with("CID=")).unwrap();
    u32::from_str_radix(&line[4..], 16).unwrap()
}

fn grain(g: u64) -> std::ops::Range<usize> {
    (g * GRAIN) as usize..((g + 1) * GRAIN) as usize
}

/// Feeds `sink` the grain-by-grain difference between `old` and `new` (both a whole
/// number of grains): `Unchanged`, `Zero` when the new grain is all zero, else `Data`.
fn feed_delta(old: &[u8], new: &[u8], mut sink: Box<dyn ExtentSink>) {
    assert_eq!(sink.alignment(), GRAIN);
    for g in 0..new.len() as u64 / GRAIN {
        let (offset, len) = (g * GRAIN, GRAIN);
        let (a, b) = (&old[grain(g)], &new[grain(g)]);
        let e = if a == b {
            Extent::Unchanged { offset, len }
        } else if b.iter().all(|&x| x == 0) {
            Extent::Zero { offset, len }
        } else {
            Extent::Data {
                offset,
                data: Bytes::copy_from_slice(b),
            }
        };
        sink.put(e).unwrap();
    }
    sink.finish().unwrap();
}

/// qemu-img must decode `image` (and its chain) to exactly `expected`.
fn assert_qemu_reads(image: &Path, expected: &Path) {
    let (ok, text) = qemu_img_status(&["check", s(image)]);
    assert!(ok && text.contains("No errors were found"), "check: {text}");
    let (ok, text) = qemu_img_status(&["compare", "-F", "raw", s(image), s(expected)]);
    assert!(
        ok && text.contains("Images are identical"),
        "compare: {text}"
    );
    assert_eq!(qemu_sha256(image, Some("vmdk")), sha256_file(expected));
}

/// A child whose grains 0 (data in the parent, now zero), 1 (partly changed), 40 and the
/// last changed, the rest as in the parent.
fn changed(old: &[u8]) -> Vec<u8> {
    let mut new = old.to_vec();
    new[grain(1)][100..200].fill(0x42);
    new[grain(40)].fill(0x17);
    new[grain(0)].fill(0);
    let last = new.len() as u64 / GRAIN - 1;
    new[grain(last)][GRAIN as usize - 1] ^= 0xff;
    assert_ne!(old[grain(0)], new[grain(0)]);
    new
}

fn link_to(parent: &Path, relative: &str, cid: u32, size: u64) -> ParentLink {
    ParentLink {
        relative_path: relative.into(),
        absolute_path: s(parent).into(),
        id: ImageId::VmdkCid(cid),
        virtual_size_bytes: size,
    }
}

/// Grain-aligned ranges our reader maps as `Data` in the child layer alone.
fn child_data_grains(child: &Path) -> Vec<u64> {
    let disk = Disk::open(s(child)).unwrap();
    let top = &disk.layers()[0];
    let mut grains = Vec::new();
    for e in top.map_range(0, disk.virtual_size()).unwrap() {
        if e.kind == ExtentKind::Data {
            grains.extend(e.offset / GRAIN..(e.offset + e.len).div_ceil(GRAIN));
        }
    }
    grains
}

#[test]
fn stream_delta_over_a_qemu_stream_parent() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB + 3 * GRAIN; // not a multiple of a grain table's span
    let base_raw = pattern_raw(dir.path(), "base.raw", size, 3);
    let base = dir.path().join("base.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&base_raw),
        s(&base),
    ]);
    let old = std::fs::read(&base_raw).unwrap();
    let new = changed(&old);
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &new).unwrap();

    let child = dir.path().join("child.vmdk");
    let w = StreamOptimizedWriter::with_parent(
        BufWriter::new(File::create(&child).unwrap()),
        size,
        Some(link_to(&base, "base.vmdk", cid_of(&base), size)),
        s(&child).into(),
    )
    .unwrap();
    feed_delta(&old, &new, Box::new(w));

    assert_qemu_reads(&child, &expected);
    let chain = qemu_img(&["info", "--backing-chain", s(&child)]);
    assert!(chain.contains("backing file: base.vmdk"), "{chain}");
    assert!(chain.contains(&format!("image: {}", s(&base))), "{chain}");
    assert!(chain.contains("create type: streamOptimized"), "{chain}");
    // The child holds the changed grains only, the zeroed one included (as stored zeros).
    let last = size / GRAIN - 1;
    assert_eq!(child_data_grains(&child), vec![0, 1, 40, last]);
    assert_ne!(cid_of(&child), cid_of(&base));
    // Our reader resolves the chain by CID to the same disk.
    assert_eq!(our_sha256(&child), sha256_file(&expected));
    assert_eq!(Disk::open(s(&child)).unwrap().layers().len(), 2);
    // Without its parent the child cannot be read.
    std::fs::rename(&base, dir.path().join("moved.vmdk")).unwrap();
    let (ok, _) = qemu_img_status(&["convert", "-O", "raw", s(&child), s(&dir.path().join("x"))]);
    assert!(!ok, "the child must depend on its parent");
    assert!(Disk::open(s(&child)).is_err());
}

/// A full export and two incrementals, each written by `convert_delta` against the chain
/// before it, the way the vSphere export chains them.
#[test]
fn chain_of_stream_exports_through_convert_delta() {
    let dir = tempfile::tempdir().unwrap();
    let size = 6 * MIB + 5 * GRAIN + 512; // the last grain is short
    let raw0 = pattern_raw(dir.path(), "v0.raw", size, 17);
    let full = dir.path().join("full.vmdk");
    let disk0 = Disk::open(s(&raw0)).unwrap();
    convert(
        &disk0,
        create(&full, OutputFormat::VmdkStream, size, None).unwrap(),
        2,
        &mut |_| {},
    )
    .unwrap();

    let v0 = std::fs::read(&raw0).unwrap();
    let mut v1 = v0.clone();
    v1[grain(3)][7..9000].fill(0x33);
    v1[grain(9)].fill(0);
    v1[size as usize - 1] = 0x71;
    let raw1 = dir.path().join("v1.raw");
    std::fs::write(&raw1, &v1).unwrap();
    let mut v2 = v1.clone();
    v2[grain(3)].fill(0);
    v2[grain(50)][..10].fill(0x99);
    let raw2 = dir.path().join("v2.raw");
    std::fs::write(&raw2, &v2).unwrap();

    let mut previous = full.clone();
    for (i, raw) in [&raw1, &raw2].into_iter().enumerate() {
        let out = dir.path().join(format!("inc{}.vmdk", i + 1));
        let parent = Disk::open(s(&previous)).unwrap();
        let link = parent_link(&out, &previous, &parent).unwrap();
        let sink = create(&out, OutputFormat::VmdkStream, size, Some(link)).unwrap();
        let disk = Disk::open(s(raw)).unwrap();
        convert_delta(&disk, &parent, sink, &mut |_| {}).unwrap();
        let padded = dir.path().join(format!("v{}.padded", i + 1));
        let mut bytes = std::fs::read(raw).unwrap();
        bytes.resize(bytes.len().div_ceil(512) * 512, 0);
        std::fs::write(&padded, &bytes).unwrap();
        assert_qemu_reads(&out, &padded);
        assert_eq!(our_sha256(&out), sha256_file(&padded));
        previous = out;
    }
    let chain = qemu_img(&["info", "--backing-chain", s(&previous)]);
    assert_eq!(
        chain.matches("create type: streamOptimized").count(),
        3,
        "{chain}"
    );
    assert_eq!(Disk::open(s(&previous)).unwrap().layers().len(), 3);
    // inc2 changed grain 3 (zeroed) and grain 50 only.
    assert_eq!(child_data_grains(&previous), vec![3, 50]);
}

#[test]
fn a_wrong_parent_cid_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB;
    let base_raw = pattern_raw(dir.path(), "base.raw", size, 8);
    let base = dir.path().join("base.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&base_raw),
        s(&base),
    ]);
    let old = std::fs::read(&base_raw).unwrap();
    let new = changed(&old);
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, &new).unwrap();
    let write_child = |name: &str, cid: u32| {
        let child = dir.path().join(name);
        let w = StreamOptimizedWriter::with_parent(
            File::create(&child).unwrap(),
            size,
            Some(link_to(&base, "base.vmdk", cid, size)),
            s(&child).into(),
        )
        .unwrap();
        feed_delta(&old, &new, Box::new(w));
        child
    };
    // The same child with the right CID reads fine: only the CID makes the difference.
    let good = write_child("good.vmdk", cid_of(&base));
    assert_qemu_reads(&good, &expected);
    let bad = write_child("bad.vmdk", cid_of(&base) ^ 0x5555);
    let err = Disk::open(s(&bad)).unwrap_err().to_string();
    assert!(err.contains("expects"), "{err}");
    let out = dir.path().join("bad.raw");
    let (ok, text) = qemu_img_status(&["convert", "-O", "raw", s(&bad), s(&out)]);
    assert!(
        !ok,
        "qemu-img must refuse a child whose parentCID is wrong: {text}"
    );
}

/// An output that can only be appended to, like a pipe or an upload.
struct ForwardOnly(Vec<u8>);

impl Write for ForwardOnly {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes through `create_stream` into an output that cannot seek, then saves it.
fn stream_to_file(parent: Option<ParentLink>, old: &[u8], new: &[u8], out: &Path) {
    let shared = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = create_stream(
        Shared(shared.clone()),
        OutputFormat::VmdkStream,
        new.len() as u64,
        parent,
        "s3://bucket/vm/disk.vmdk".into(),
    )
    .unwrap();
    feed_delta(old, new, sink);
    std::fs::write(out, &*shared.lock().unwrap()).unwrap();
}

#[test]
fn create_stream_writes_forward_only_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB;
    let raw = pattern_raw(dir.path(), "in.raw", size, 21);
    let new = std::fs::read(&raw).unwrap();
    // A full image, with the sector alignment of a full image.
    let full = dir.path().join("full.vmdk");
    let sink = create_stream(
        ForwardOnly(Vec::new()),
        OutputFormat::VmdkStream,
        size,
        None,
        "disk.vmdk".into(),
    )
    .unwrap();
    assert_eq!(sink.alignment(), 512);
    drop(sink);
    let mut w: Box<dyn ExtentSink + Send> = create_stream(
        BufWriter::new(File::create(&full).unwrap()),
        OutputFormat::VmdkStream,
        size,
        None,
        s(&full).into(),
    )
    .unwrap();
    w.put(Extent::Data {
        offset: 0,
        data: Bytes::from(new.clone()),
    })
    .unwrap();
    w.finish().unwrap();
    assert_qemu_reads(&full, &raw);

    // A delta of it, written into a non-seekable output.
    let mut next = new.clone();
    next[grain(5)].fill(0xab);
    next[grain(6)].fill(0);
    let next_raw = dir.path().join("next.raw");
    std::fs::write(&next_raw, &next).unwrap();
    let child = dir.path().join("disk.vmdk");
    let link = link_to(&full, "full.vmdk", cid_of(&full), size);
    stream_to_file(Some(link), &new, &next, &child);
    assert_qemu_reads(&child, &next_raw);
    assert_eq!(our_sha256(&child), sha256_file(&next_raw));
    assert_eq!(child_data_grains(&child), vec![5, 6]);

    // Formats that need to seek are refused.
    for format in [
        OutputFormat::VmdkSparse,
        OutputFormat::Vhdx,
        OutputFormat::Raw,
    ] {
        let err = create_stream(ForwardOnly(Vec::new()), format, size, None, "x".into())
            .err()
            .unwrap();
        assert!(err.to_string().contains("forward-only"), "{err}");
    }
}

#[test]
fn stream_delta_misuse_is_rejected() {
    let size = MIB;
    let link = |id, size| ParentLink {
        relative_path: "p.vmdk".into(),
        absolute_path: "/x/p.vmdk".into(),
        id,
        virtual_size_bytes: size,
    };
    let open = |l: ParentLink| {
        StreamOptimizedWriter::with_parent(Vec::new(), size, Some(l), "c.vmdk".into())
    };
    let err = open(link(ImageId::VhdUniqueId([0; 16]), size)).unwrap_err();
    assert!(err.to_string().contains("needs a VMDK parent"), "{err}");
    let err = open(link(ImageId::VmdkCid(1), 2 * size)).unwrap_err();
    assert!(err.to_string().contains("parent's size"), "{err}");
    // A grain is all or nothing in a delta: a sector-aligned extent is refused.
    let mut w = open(link(ImageId::VmdkCid(1), size)).unwrap();
    let err = w
        .put(Extent::Data {
            offset: 0,
            data: Bytes::from(vec![1u8; 512]),
        })
        .unwrap_err();
    assert!(err.to_string().contains("not aligned"), "{err}");
}
