//! VHD cross-checks with qemu-img: images qemu makes decode through our reader to exactly
//! qemu's raw output, and images we write are read by qemu as the disk we were given.
// The shared tests/common helpers truncate on purpose (seeded byte patterns).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::Path;

use common::{our_sha256, pattern_raw, qemu_img, qemu_sha256};
use rehost_diskimage::write::{OutputFormat, convert, convert_delta, create, parent_link};
use rehost_diskimage::{Disk, Error, ExtentKind, Format};

/// The virtual size `qemu-img info` reports.
fn qemu_virtual_size(image: &Path) -> u64 {
    // "virtual size: 4.78 MiB (5013504 bytes)"
    let out = qemu_img(&["info", "-f", "vpc", image.to_str().unwrap()]);
    let line = out
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .unwrap();
    let bytes = line.rsplit('(').next().unwrap().trim_end_matches(" bytes)");
    bytes.parse().unwrap()
}

/// Checks the map agrees with the bytes: everything not `Data` reads as zero. Returns the
/// number of `Unallocated` bytes of the top layer.
fn check_map_against_bytes(disk: &Disk) -> u64 {
    let size = disk.virtual_size();
    let mut bytes = vec![0u8; usize::try_from(size).unwrap()];
    disk.read_at(&mut bytes, 0).unwrap();
    let map = disk.map_range(0, size).unwrap();
    assert_eq!(map.first().unwrap().offset, 0);
    assert_eq!(map.last().unwrap().end(), size);
    for e in &map {
        if e.kind != ExtentKind::Data {
            let range = usize::try_from(e.offset).unwrap()..usize::try_from(e.end()).unwrap();
            assert!(bytes[range].iter().all(|&b| b == 0), "{e:?} is not zero");
        }
    }
    disk.top()
        .map_range(0, size)
        .unwrap()
        .iter()
        .filter(|e| e.kind == ExtentKind::Unallocated)
        .map(|e| e.len)
        .sum()
}

/// `pattern_raw` with its second 2 MiB block zeroed, so a dynamic VHD of it must leave
/// at least one block out (pattern_raw alone may touch every block of a small disk).
fn sparse_pattern_raw(dir: &Path, name: &str, size: u64, seed: u64) -> std::path::PathBuf {
    let path = pattern_raw(dir, name, size, seed);
    let mut bytes = std::fs::read(&path).unwrap();
    let end = bytes.len().min(4 << 20);
    bytes[2 << 20..end].fill(0);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn qemu_made_vhds_decode_exactly_as_qemu_decodes_them() {
    let dir = tempfile::tempdir().unwrap();
    // Odd sizes: not whole blocks, not whole CHS geometries, one not even whole sectors.
    let cases = [
        ("subformat=dynamic", 5_000_003u64, "dynamic"),
        (
            "subformat=dynamic,force_size=on",
            6_291_456 + 512 * 3,
            "dynamic",
        ),
        ("subformat=fixed", 3_000_000, "fixed"),
        (
            "subformat=fixed,force_size=on",
            4_194_304 + 512 * 7,
            "fixed",
        ),
    ];
    for (i, (options, size, subformat)) in cases.into_iter().enumerate() {
        let raw = sparse_pattern_raw(dir.path(), &format!("in{i}.raw"), size, 0x5EED + i as u64);
        let vhd = dir.path().join(format!("q{i}.vhd"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            options,
            raw.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ]);
        let disk = Disk::open(vhd.to_str().unwrap()).unwrap();
        let info = disk.top().info();
        assert_eq!(info.format, Format::Vhd);
        assert_eq!(info.subformat, subformat, "{options}");
        assert!(info.warnings.is_empty(), "{options}: {:?}", info.warnings);
        assert_eq!(disk.virtual_size(), qemu_virtual_size(&vhd), "{options}");
        assert_eq!(
            our_sha256(&vhd),
            qemu_sha256(&vhd, Some("vpc")),
            "{options}"
        );
        let unallocated = check_map_against_bytes(&disk);
        if subformat == "dynamic" {
            assert!(
                unallocated >= 2 << 20,
                "{options}: a dynamic VHD with every block allocated"
            );
        }
    }
}

#[test]
fn qemu_reads_our_fixed_and_dynamic_vhds_as_the_source_disk() {
    let dir = tempfile::tempdir().unwrap();
    let size = 5 * 1024 * 1024 + 512 * 9;
    let raw = sparse_pattern_raw(dir.path(), "src.raw", size, 77);
    let source = Disk::open(raw.to_str().unwrap()).unwrap();
    for (format, name) in [
        (OutputFormat::VhdFixed, "fixed.vhd"),
        (OutputFormat::VhdDynamic, "dynamic.vhd"),
    ] {
        let out = dir.path().join(name);
        let sink = create(&out, format, size, None).unwrap();
        let summary = convert(&source, sink, 2, &mut |_| {}).unwrap();
        let file_len = std::fs::metadata(&out).unwrap().len();
        assert_eq!(summary.file_bytes, file_len);
        if format == OutputFormat::VhdFixed {
            assert_eq!(file_len, size + 512);
        } else {
            assert!(
                file_len < size - (1 << 20),
                "zero blocks must not be stored ({file_len} bytes)"
            );
        }
        assert_eq!(qemu_virtual_size(&out), size, "{name}");
        let (ok, text) = common::qemu_img_status(&[
            "compare",
            "-f",
            "vpc",
            "-F",
            "raw",
            out.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
        assert!(ok, "{name}: {text}");
        assert!(text.contains("identical"), "{name}: {text}");
        assert_eq!(our_sha256(&out), common::sha256_file(&raw), "{name}");
    }
}

/// Writes `bytes` as a raw file and opens it.
fn raw_disk(path: &Path, bytes: &[u8]) -> Disk {
    std::fs::write(path, bytes).unwrap();
    Disk::open(path.to_str().unwrap()).unwrap()
}

#[test]
fn differencing_chain_we_write_reads_back_through_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 5 * 1024 * 1024;
    let base_raw = pattern_raw(dir.path(), "base.raw", size, 4242);
    let base_bytes = std::fs::read(&base_raw).unwrap();
    let base_vhd = dir.path().join("base.vhd");
    let sink = create(&base_vhd, OutputFormat::VhdDynamic, size, None).unwrap();
    convert(
        &Disk::open(base_raw.to_str().unwrap()).unwrap(),
        sink,
        2,
        &mut |_| {},
    )
    .unwrap();
    let parent = Disk::open(base_vhd.to_str().unwrap()).unwrap();

    // The child: a few changed sectors, a zeroed range over base data, a new data range
    // crossing a block boundary, a child one block larger than its parent.
    let child_size = size + 2 * 1024 * 1024;
    let mut child_bytes = base_bytes.clone();
    child_bytes.resize(usize::try_from(child_size).unwrap(), 0);
    child_bytes[512..1024].fill(0x11);
    child_bytes[0] = 0; // base has 0xAA here
    let data_start = base_bytes
        .iter()
        .position(|&b| b != 0 && b != 0xAA)
        .unwrap();
    let zero_at = data_start / 512 * 512;
    child_bytes[zero_at..zero_at + 4096].fill(0);
    let cross = 2 * 1024 * 1024 - 1024;
    child_bytes[cross..cross + 3000].fill(0x5A);
    let last = child_bytes.len();
    child_bytes[last - 700..].fill(0x77);
    let child_disk = raw_disk(&dir.path().join("child.raw"), &child_bytes);

    let child_vhd = dir.path().join("child.vhd");
    let link = parent_link(&child_vhd, &base_vhd, &parent).unwrap();
    let sink = create(&child_vhd, OutputFormat::VhdDynamic, child_size, Some(link)).unwrap();
    convert_delta(&child_disk, &parent, sink, &mut |_| {}).unwrap();

    let chain = Disk::open(child_vhd.to_str().unwrap()).unwrap();
    assert_eq!(chain.layers().len(), 2);
    assert_eq!(chain.top().info().subformat, "differencing");
    let mut read = vec![0u8; child_bytes.len()];
    chain.read_at(&mut read, 0).unwrap();
    assert!(
        read == child_bytes,
        "the chain does not read as the child disk"
    );
    assert_eq!(
        our_sha256(&child_vhd),
        common::sha256_file(&dir.path().join("child.raw"))
    );
    // The delta stores only what changed: most of its map defers to the parent.
    let top = chain.top();
    let stored: u64 = top
        .map_range(0, child_size)
        .unwrap()
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.len)
        .sum();
    assert!(
        stored > 0 && stored < 64 * 1024,
        "delta stores {stored} bytes"
    );
    check_map_against_bytes(&chain);

    // A chain copied elsewhere still opens through the bare file name.
    let moved = tempfile::tempdir().unwrap();
    std::fs::copy(&child_vhd, moved.path().join("child.vhd")).unwrap();
    std::fs::copy(&base_vhd, moved.path().join("base.vhd")).unwrap();
    let moved_chain = Disk::open(moved.path().join("child.vhd").to_str().unwrap()).unwrap();
    assert_eq!(moved_chain.layers().len(), 2);

    // A parent rewritten since (new unique id) is refused; a missing one is reported
    // (the absolute locator still names the original, so that goes too).
    let sink = create(
        &moved.path().join("base.vhd"),
        OutputFormat::VhdDynamic,
        size,
        None,
    )
    .unwrap();
    convert(
        &Disk::open(base_raw.to_str().unwrap()).unwrap(),
        sink,
        1,
        &mut |_| {},
    )
    .unwrap();
    let err = Disk::open(moved.path().join("child.vhd").to_str().unwrap()).unwrap_err();
    assert!(matches!(err, Error::ParentMismatch { .. }), "{err}");
    std::fs::remove_file(moved.path().join("base.vhd")).unwrap();
    std::fs::remove_file(&base_vhd).unwrap();
    let err = Disk::open(moved.path().join("child.vhd").to_str().unwrap()).unwrap_err();
    assert!(matches!(err, Error::ParentNotFound { .. }), "{err}");
}

/// Rewrites both footers of a dynamic VHD with another creator and current size.
fn patch_footers(path: &Path, creator: &[u8; 4], current_size: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    for at in [0, n - 512] {
        let f = &mut bytes[at..at + 512];
        f[28..32].copy_from_slice(creator);
        f[48..56].copy_from_slice(&current_size.to_be_bytes());
        f[64..68].fill(0);
        let sum = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn size_comes_from_geometry_or_current_size_as_qemu_decides() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sparse_pattern_raw(dir.path(), "in.raw", 5_000_000, 99);
    // CHS of what qemu writes for 5,000,000 bytes: 144 * 4 * 17 sectors.
    let chs_size = 144 * 4 * 17 * 512;
    for (creator, expected) in [
        (b"qemu", chs_size),
        (b"vpc ", chs_size),
        (b"win ", 4 << 20),
        (b"wa\0\0", 4 << 20),
    ] {
        let vhd = dir.path().join("patched.vhd");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            raw.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ]);
        patch_footers(&vhd, creator, 4 << 20);
        let disk = Disk::open(vhd.to_str().unwrap()).unwrap();
        assert_eq!(disk.virtual_size(), expected, "{creator:?}");
        assert_eq!(qemu_virtual_size(&vhd), expected, "{creator:?}");
        assert_eq!(
            our_sha256(&vhd),
            qemu_sha256(&vhd, Some("vpc")),
            "{creator:?}"
        );
    }
}

#[test]
fn blocks_qemu_io_allocates_out_of_order_decode_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let vhd = dir.path().join("io.vhd");
    let path = vhd.to_str().unwrap();
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic",
        path,
        "7000000",
    ]);
    // Later blocks first, so the file's block order differs from the disk's.
    common::qemu_io(&["-f", "vpc", "-c", "write -P 0x5a 6000000 70000", path]);
    common::qemu_io(&["-f", "vpc", "-c", "write -P 0x11 512 1536", path]);
    common::qemu_io(&["-f", "vpc", "-c", "write -P 0x22 2096640 1024", path]);
    let disk = Disk::open(path).unwrap();
    assert_eq!(disk.virtual_size(), qemu_virtual_size(&vhd));
    assert_eq!(our_sha256(&vhd), qemu_sha256(&vhd, Some("vpc")));
    let mut probe = [0u8; 4];
    disk.read_at(&mut probe, 2_097_150).unwrap();
    assert_eq!(probe, [0x22; 4], "a write across a block boundary");
    assert!(check_map_against_bytes(&disk) > 0);
}

/// The extents of `bytes` in 1 MiB pieces: the pieces in `areas` as data (or zeros, when
/// `zero` says so), the rest unchanged; as a source with a change map hands them out.
fn planned_extents(
    bytes: &[u8],
    areas: &[(u64, u64)],
    zero: &dyn Fn(u64) -> bool,
) -> Vec<rehost_diskimage::Extent> {
    use rehost_diskimage::Extent;
    let mib = 1u64 << 20;
    let mut out = Vec::new();
    for offset in (0..bytes.len() as u64).step_by(mib as usize) {
        let len = mib.min(bytes.len() as u64 - offset);
        let planned = areas.iter().any(|&(o, l)| offset >= o && offset < o + l);
        out.push(if !planned {
            Extent::Unchanged { offset, len }
        } else if zero(offset) {
            Extent::Zero { offset, len }
        } else {
            let range = offset as usize..(offset + len) as usize;
            Extent::Data {
                offset,
                data: bytes::Bytes::copy_from_slice(&bytes[range]),
            }
        });
    }
    out
}

#[test]
fn forward_only_vhds_read_as_their_disk_in_qemu_and_in_a_chain() {
    use rehost_diskimage::ExtentSink;
    use rehost_diskimage::vhd::VhdStreamWriter;
    let dir = tempfile::tempdir().unwrap();
    let mib = 1u64 << 20;
    let size = 12 * mib;
    let raw = sparse_pattern_raw(dir.path(), "base.raw", size, 99);
    let base_bytes = std::fs::read(&raw).unwrap();
    // Every MiB but the 3rd and 4th (zeroed by sparse_pattern_raw) and the last four.
    let base_areas = [(0, 2 * mib), (4 * mib, 4 * mib)];
    let mut expected = base_bytes.clone();
    expected[8 * mib as usize..].fill(0);
    std::fs::write(&raw, &expected).unwrap();

    // A full image, written to a plain `Write` (a Vec, as an upload would be).
    let mut out = Vec::new();
    let mut writer: Box<dyn ExtentSink + '_> = Box::new(
        VhdStreamWriter::new(&mut out, size, None, &base_areas, "base.vhd".into()).unwrap(),
    );
    for e in planned_extents(&expected, &base_areas, &|_| false) {
        writer.put(e).unwrap();
    }
    writer.finish().unwrap();
    let base_vhd = dir.path().join("base.vhd");
    std::fs::write(&base_vhd, &out).unwrap();
    // qemu-img check has no VHD checker; its reader opening the image and comparing it
    // byte for byte with the disk is the check.
    assert_eq!(qemu_virtual_size(&base_vhd), size);
    let (ok, text) = common::qemu_img_status(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        base_vhd.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(ok && text.contains("identical"), "{text}");

    // A differencing child: one MiB rewritten, one cleared over base data, one new.
    let mut child_bytes = expected.clone();
    child_bytes[mib as usize..2 * mib as usize].fill(0x42);
    child_bytes[5 * mib as usize..6 * mib as usize].fill(0);
    child_bytes[10 * mib as usize..11 * mib as usize].fill(0x17);
    let child_areas = [(mib, mib), (5 * mib, mib), (10 * mib, mib)];
    let parent = Disk::open(base_vhd.to_str().unwrap()).unwrap();
    let child_vhd = dir.path().join("child.vhd");
    let link = parent_link(&child_vhd, &base_vhd, &parent).unwrap();
    let mut out = Vec::new();
    let mut writer: Box<dyn ExtentSink + '_> = Box::new(
        VhdStreamWriter::new(&mut out, size, Some(link), &child_areas, "child.vhd".into()).unwrap(),
    );
    for e in planned_extents(&child_bytes, &child_areas, &|o| o == 5 * mib) {
        writer.put(e).unwrap();
    }
    writer.finish().unwrap();
    std::fs::write(&child_vhd, &out).unwrap();
    let chain = Disk::open(child_vhd.to_str().unwrap()).unwrap();
    assert_eq!(chain.layers().len(), 2);
    let mut read = vec![0u8; size as usize];
    chain.read_at(&mut read, 0).unwrap();
    assert!(
        read == child_bytes,
        "the chain does not read as the child disk"
    );
    check_map_against_bytes(&chain);
}
