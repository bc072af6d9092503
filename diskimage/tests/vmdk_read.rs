//! VMDK readers cross-checked against qemu-img: every subformat qemu makes, delta chains,
//! a hand-built ESXi-layout stream, the forward-only stream reader and corrupt samples.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::io::Read;
use std::path::Path;

use common::{our_sha256, pattern_raw, qemu_img, qemu_io, qemu_sha256};
use flate2::{Compress, Compression, FlushCompress};
use rehost_diskimage::vmdk::StreamReader;
use rehost_diskimage::{Disk, Error, Extent, ExtentKind, ImageId, MemFs};

const MIB: u64 = 1 << 20;

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Checks our decoding against qemu's, and that the map agrees with the bytes: every
/// Zero/Unallocated range reads as zero, and nothing non-zero lies outside Data.
fn check_matches_qemu(image: &Path) -> Disk {
    assert_eq!(
        our_sha256(image),
        qemu_sha256(image, Some("vmdk")),
        "{}",
        image.display()
    );
    check_map_agrees(image)
}

/// Checks the map against the bytes and unaligned reads against a whole read.
fn check_map_agrees(image: &Path) -> Disk {
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

fn convert(dir: &Path, raw: &Path, subformat: &str) -> std::path::PathBuf {
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

#[test]
fn every_subformat_qemu_makes_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (size, seed) in [(5 * MIB + 512 * 3, 1u64), (3 * MIB + 64 * 1024, 7)] {
        let raw = pattern_raw(dir.path(), "in.raw", size, seed);
        let raw_bytes = std::fs::read(&raw).unwrap();
        for subformat in [
            "monolithicSparse",
            "streamOptimized",
            "monolithicFlat",
            "twoGbMaxExtentSparse",
            "twoGbMaxExtentFlat",
        ] {
            let image = convert(dir.path(), &raw, subformat);
            let disk = check_matches_qemu(&image);
            let info = disk.top().info();
            assert_eq!(info.subformat, subformat);
            assert_eq!(info.virtual_size_bytes, size);
            assert!(info.warnings.is_empty(), "{:?}", info.warnings);
            assert!(matches!(info.id, Some(ImageId::VmdkCid(_))));
            assert_eq!(info.parent, None);
            if subformat.contains("Sparse") || subformat == "streamOptimized" {
                assert_eq!(info.cluster_size_bytes, Some(65536));
                // Sparse formats say where data is: qemu stores exactly the grains that are not all zero.
                let data: u64 = disk
                    .map_range(0, size)
                    .unwrap()
                    .iter()
                    .filter(|e| e.kind == ExtentKind::Data)
                    .map(|e| e.len)
                    .sum();
                let nonzero: u64 = raw_bytes
                    .chunks(65536)
                    .filter(|c| c.iter().any(|&b| b != 0))
                    .map(|c| c.len() as u64)
                    .sum();
                assert_eq!(data, nonzero, "{subformat}");
            }
            std::fs::remove_file(&image).unwrap();
        }
    }
}

#[test]
fn zero_grains_map_as_zero() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("z.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-o",
        "zeroed_grain=on",
        p(&image),
        "4M",
    ]);
    qemu_io(&["-f", "vmdk", "-c", "write -P 0x11 0 1M", p(&image)]);
    qemu_io(&["-f", "vmdk", "-c", "write -z 256k 128k", p(&image)]);
    let disk = check_matches_qemu(&image);
    let map = disk.map_range(0, 4 * MIB).unwrap();
    let kinds: Vec<_> = map.iter().map(|e| (e.offset, e.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (0, ExtentKind::Data),
            (256 << 10, ExtentKind::Zero),
            (384 << 10, ExtentKind::Data),
            (MIB, ExtentKind::Unallocated)
        ]
    );
}

/// Reads `u32`/`u64` fields of a file's header.
fn header_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn redundant_grain_directory_is_optional_and_a_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_raw(dir.path(), "in.raw", 5 * MIB, 3);
    let image = convert(dir.path(), &raw, "monolithicSparse");
    let expected = qemu_sha256(&image, Some("vmdk"));
    let good = std::fs::read(&image).unwrap();
    assert_eq!(good[8] & 2, 2, "qemu writes a redundant directory");
    let gd = header_u64(&good, 56) as usize * 512;

    // Without the redundant directory (flag cleared, offset zeroed): same content.
    let mut no_rgd = good.clone();
    no_rgd[8] &= !2;
    no_rgd[48..56].fill(0);
    std::fs::write(&image, &no_rgd).unwrap();
    assert_eq!(our_sha256(&image), expected);
    assert_eq!(qemu_sha256(&image, Some("vmdk")), expected);

    // A damaged primary directory: read through the redundant one, with a warning.
    let mut damaged = good.clone();
    damaged[gd..gd + 4].fill(0xff);
    std::fs::write(&image, &damaged).unwrap();
    assert_eq!(our_sha256(&image), expected);
    let disk = Disk::open(p(&image)).unwrap();
    assert!(
        disk.top()
            .info()
            .warnings
            .iter()
            .any(|w| w.contains("redundant")),
        "{:?}",
        disk.top().info().warnings
    );

    // The header's gdOffset past the end: the redundant directory still reads.
    let mut moved = good.clone();
    moved[56..64].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&image, &moved).unwrap();
    assert_eq!(our_sha256(&image), expected);

    // Both gone: a clean error naming the directory.
    let mut both = no_rgd;
    both[gd..gd + 4].fill(0xff);
    std::fs::write(&image, &both).unwrap();
    let err = Disk::open(p(&image)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Corrupt {
                structure: "VMDK grain directory",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn split_extents_concatenate_sparse_flat_and_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Three sparse extents without descriptors of their own (qemu's -s001 files), a flat
    // file read from an odd offset, and a ZERO extent, tied together by our own descriptor.
    let mut expected = Vec::new();
    let part_sizes = [MIB, 2 * MIB + 65536, MIB];
    for (i, size) in part_sizes.into_iter().enumerate() {
        let raw = pattern_raw(d, &format!("p{i}.raw"), size, 10 + i as u64);
        let image = d.join(format!("part{i}.vmdk"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=twoGbMaxExtentSparse",
            p(&raw),
            p(&image),
        ]);
        std::fs::rename(
            d.join(format!("part{i}-s001.vmdk")),
            d.join(format!("part {i}-s001.vmdk")),
        )
        .unwrap();
        expected.extend(std::fs::read(&raw).unwrap());
    }
    let flat = pattern_raw(d, "flat.bin", 3 * MIB, 99);
    let flat_bytes = std::fs::read(&flat).unwrap();
    let (flat_from, flat_sectors) = (2043usize, 2053usize);
    expected.extend(&flat_bytes[flat_from * 512..(flat_from + flat_sectors) * 512]);
    let descriptor = |second_access: &str, zero: &str| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=0badcafe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\n\
             # Extent description\nRW {} SPARSE \"part 0-s001.vmdk\"\n{second_access} {} SPARSE \"part 1-s001.vmdk\"\n\
             RW {} SPARSE \"part 2-s001.vmdk\"\nRW {flat_sectors} FLAT \"flat.bin\" {flat_from}\n{zero}\n\
             ddb.adapterType = \"lsilogic\"\n",
            part_sizes[0] / 512,
            part_sizes[1] / 512,
            part_sizes[2] / 512,
        )
    };
    // What qemu reads too (it skips RDONLY and ZERO lines, so those are checked below).
    let image = d.join("split.vmdk");
    std::fs::write(&image, descriptor("RW", "")).unwrap();
    let disk = check_matches_qemu(&image);
    assert_eq!(disk.top().info().id, Some(ImageId::VmdkCid(0x0bad_cafe)));
    assert_eq!(disk.top().info().subformat, "twoGbMaxExtentSparse");
    let mut ours = vec![0u8; expected.len()];
    disk.read_at(&mut ours, 0).unwrap();
    assert!(ours == expected);

    expected.extend(vec![0u8; 4096]);
    std::fs::write(&image, descriptor("RDONLY", "RW 8 ZERO\n")).unwrap();
    let disk = check_map_agrees(&image);
    assert_eq!(disk.virtual_size(), expected.len() as u64);
    let mut ours = vec![0u8; expected.len()];
    disk.read_at(&mut ours, 0).unwrap();
    assert!(ours == expected);
    let map = disk.map_range(0, expected.len() as u64).unwrap();
    assert_eq!(map.last().unwrap().kind, ExtentKind::Zero);
    assert_eq!(map[map.len() - 2].kind, ExtentKind::Data);

    // A flat extent whose file is too short is refused at open.
    std::fs::write(&flat, &flat_bytes[..MIB as usize]).unwrap();
    assert!(matches!(
        Disk::open(p(&image)).unwrap_err(),
        Error::Truncated { .. }
    ));
}

#[test]
fn delta_chains_read_like_qemu_and_bad_chains_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = pattern_raw(d, "in.raw", 4 * MIB + 512, 5);
    let base = d.join("base.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", p(&raw), p(&base)]);
    let child = d.join("child.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-b",
        p(&base),
        "-F",
        "vmdk",
        p(&child),
    ]);
    qemu_io(&["-f", "vmdk", "-c", "write -P 0x5a 1M 64k", p(&child)]);
    qemu_io(&["-f", "vmdk", "-c", "write -P 0x33 3000k 100k", p(&child)]);
    let disk = check_matches_qemu(&child);
    assert_eq!(disk.layers().len(), 2);
    let info = disk.top().info();
    let parent = info.parent.clone().unwrap();
    let Some(ImageId::VmdkCid(parent_cid)) = parent.expected_id else {
        panic!("{parent:?}")
    };
    assert_eq!(
        disk.layers()[1].info().id,
        Some(ImageId::VmdkCid(parent_cid))
    );
    assert_eq!(
        parent.candidates.last().map(String::as_str),
        Some("base.vmdk")
    );
    // The child holds only what was written.
    let data: u64 = disk
        .top()
        .map_range(0, 4 * MIB + 512)
        .unwrap()
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.len)
        .sum();
    assert_eq!(
        data,
        64 * 1024 + 192 * 1024,
        "grain-aligned: 1 grain + 3 grains"
    );

    // The parent changed after the child was made: its CID no longer matches.
    let good_base = std::fs::read(&base).unwrap();
    let text_at = 512;
    let text = String::from_utf8_lossy(&good_base[text_at..text_at + 1024]).into_owned();
    let cid_at = text_at + text.find("CID=").unwrap() + 4;
    let mut changed = good_base.clone();
    let other: &[u8; 8] = if &changed[cid_at..cid_at + 8] == b"00000001" {
        b"00000002"
    } else {
        b"00000001"
    };
    changed[cid_at..cid_at + 8].copy_from_slice(other);
    std::fs::write(&base, &changed).unwrap();
    let err = Disk::open(p(&child)).unwrap_err();
    assert!(matches!(err, Error::ParentMismatch { .. }), "{err}");

    // The parent is missing.
    std::fs::remove_file(&base).unwrap();
    let err = Disk::open(p(&child)).unwrap_err();
    assert!(matches!(err, Error::ParentNotFound { .. }), "{err}");
}

#[test]
fn parent_loops_are_refused() {
    let desc = |cid: &str, parent_cid: &str, hint: &str| {
        format!(
            "CID={cid}\nparentCID={parent_cid}\nparentFileNameHint=\"{hint}\"\ncreateType=\"monolithicFlat\"\nRW 2048 ZERO\n"
        )
    };
    let mut fs = MemFs::new();
    fs.insert("self.vmdk", desc("00000001", "00000001", "self.vmdk"));
    fs.insert("a.vmdk", desc("0000000a", "0000000b", "C:\\vms\\b.vmdk"));
    fs.insert("b.vmdk", desc("0000000b", "0000000a", "a.vmdk"));
    let err = Disk::open_with(&fs, "self.vmdk").unwrap_err();
    assert!(matches!(err, Error::ParentChain { .. }), "{err}");
    let err = Disk::open_with(&fs, "a.vmdk").unwrap_err();
    assert!(matches!(err, Error::ParentChain { .. }), "{err}");
    // A parent CID without a hint is corrupt, not "no parent".
    fs.insert(
        "nohint.vmdk",
        "CID=00000001\nparentCID=00000002\ncreateType=\"monolithicFlat\"\nRW 8 ZERO\n",
    );
    assert!(matches!(
        Disk::open_with(&fs, "nohint.vmdk").unwrap_err(),
        Error::Corrupt { .. }
    ));
}

// ---------------------------------------------------------------------------------------
// A streamOptimized file in ESXi's ExportVm layout, built from the spec.

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), true);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, FlushCompress::Finish)
        .unwrap();
    out
}

fn header(capacity: u64, gd_offset: u64, overhead: u64) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0..4].copy_from_slice(b"KDMV");
    b[4..8].copy_from_slice(&3u32.to_le_bytes());
    b[8..12].copy_from_slice(&0x3_0001u32.to_le_bytes());
    b[12..20].copy_from_slice(&capacity.to_le_bytes());
    b[20..28].copy_from_slice(&128u64.to_le_bytes());
    b[28..36].copy_from_slice(&1u64.to_le_bytes());
    b[36..44].copy_from_slice(&1u64.to_le_bytes());
    b[44..48].copy_from_slice(&512u32.to_le_bytes());
    b[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    b[64..72].copy_from_slice(&overhead.to_le_bytes());
    b[73..77].copy_from_slice(b"\n \r\n");
    b[77..79].copy_from_slice(&1u16.to_le_bytes());
    b
}

fn marker(val: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; 512];
    m[0..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

fn pad(file: &mut Vec<u8>) {
    file.resize(file.len().div_ceil(512) * 512, 0);
}

/// Builds an ESXi-style stream of a disk of `capacity` sectors with the given grains
/// (grain index, content) in order; returns the file and the raw disk it holds.
fn esxi_stream(capacity: u64, grains: &[(u64, Vec<u8>)]) -> (Vec<u8>, Vec<u8>) {
    const GRAIN: u64 = 65536;
    let mut raw = vec![0u8; (capacity * 512) as usize];
    let mut file = header(capacity, u64::MAX, 128);
    let mut desc = b"# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n".to_vec();
    desc.extend(format!("RW {capacity} SPARSE \"esxi.vmdk\"\n").as_bytes());
    desc.resize(512, 0);
    file.extend(&desc);
    file.resize(128 * 512, 0);
    let gts = capacity.div_ceil(128 * 512) as usize;
    let mut gd = vec![0u32; gts];
    let mut gt = vec![0u32; 512];
    let mut current_gt = 0usize;
    let flush_gt = |file: &mut Vec<u8>, gt: &mut Vec<u32>, gd: &mut Vec<u32>, index: usize| {
        file.extend(marker(4, 1));
        gd[index] = (file.len() / 512) as u32;
        for e in gt.iter() {
            file.extend(e.to_le_bytes());
        }
        gt.fill(0);
    };
    for (g, content) in grains {
        let gt_index = (*g / 512) as usize;
        if gt_index != current_gt {
            flush_gt(&mut file, &mut gt, &mut gd, current_gt);
            current_gt = gt_index;
        }
        let start = (*g * GRAIN) as usize;
        let end = (start + content.len()).min(raw.len());
        raw[start..end].copy_from_slice(&content[..end - start]);
        gt[(*g % 512) as usize] = (file.len() / 512) as u32;
        let z = zlib(content);
        file.extend((*g * 128).to_le_bytes());
        file.extend((z.len() as u32).to_le_bytes());
        file.extend(&z);
        pad(&mut file);
    }
    flush_gt(&mut file, &mut gt, &mut gd, current_gt);
    file.extend(marker(1, 2));
    let gd_at = file.len() / 512;
    for e in &gd {
        file.extend(e.to_le_bytes());
    }
    pad(&mut file);
    file.extend(marker(1, 3));
    file.extend(header(capacity, gd_at as u64, 128));
    file.extend(marker(0, 0));
    (file, raw)
}

fn sample_grains() -> Vec<(u64, Vec<u8>)> {
    let grain = |seed: u8| {
        (0..65536u32)
            .map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 9) as u8)
            .collect::<Vec<u8>>()
    };
    // Grains in GT 0 and GT 1; two adjacent ones (merged by the stream reader); the last grain
    // of a disk that ends mid-grain, compressed in full.
    vec![
        (0, grain(3)),
        (1, grain(5)),
        (7, vec![0x42; 65536]),
        (515, grain(11)),
        (520, grain(13)),
    ]
}

/// Collects a stream reader's extents into a disk image, checking they tile the disk.
fn collect<R: Read>(reader: StreamReader<R>, size: u64) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let mut pos = 0u64;
    for e in reader {
        let e = e.unwrap();
        assert_eq!(e.offset(), pos, "extents in order without gaps");
        if let Extent::Data { offset, data } = &e {
            assert!(data.len() as u64 <= MIB);
            out[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
        pos = e.end();
    }
    assert_eq!(pos, size);
    out
}

/// A `Read` that only reads forward, in small odd pieces.
struct Forward<R>(R);
impl<R: Read> Read for Forward<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(777);
        self.0.read(&mut buf[..n])
    }
}

#[test]
fn esxi_layout_stream_reads_through_open_and_stream_reader() {
    let capacity = 520 * 128 + 100; // ends 100 sectors into grain 520
    let (file, raw) = esxi_stream(capacity, &sample_grains());
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("esxi.vmdk");
    std::fs::write(&image, &file).unwrap();
    // qemu agrees the hand-built file is what we meant.
    let expected = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&raw));
    assert_eq!(qemu_sha256(&image, Some("vmdk")), expected);
    check_matches_qemu(&image);
    let disk = Disk::open(p(&image)).unwrap();
    assert_eq!(disk.top().info().subformat, "streamOptimized");
    assert_eq!(disk.top().info().id, Some(ImageId::VmdkCid(0x1234_5678)));

    let reader = StreamReader::new(Forward(&file[..]), "esxi.vmdk".into()).unwrap();
    assert_eq!(reader.info().virtual_size_bytes, capacity * 512);
    let extents: Vec<_> = StreamReader::new(&file[..], "e".into())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        matches!(&extents[0], Extent::Data { offset: 0, data } if data.len() == 2 * 65536),
        "{:?}",
        extents[0].offset()
    );
    assert!(collect(reader, capacity * 512) == raw);
}

#[test]
fn qemu_stream_optimized_reads_from_a_forward_only_stream() {
    let dir = tempfile::tempdir().unwrap();
    let size = 5 * MIB + 512 * 3;
    let raw = pattern_raw(dir.path(), "in.raw", size, 21);
    let image = convert(dir.path(), &raw, "streamOptimized");
    let reader = StreamReader::new(
        Forward(std::fs::File::open(&image).unwrap()),
        "so.vmdk".into(),
    )
    .unwrap();
    assert_eq!(reader.info().subformat, "streamOptimized");
    assert!(collect(reader, size) == std::fs::read(&raw).unwrap());
}

// ---------------------------------------------------------------------------------------
// Corrupt samples.

fn stream_error(bytes: &[u8]) -> Error {
    match StreamReader::new(bytes, "bad".into()) {
        Err(e) => e,
        Ok(mut r) => r
            .find_map(Result::err)
            .expect("the stream reader must fail"),
    }
}

#[test]
fn corrupt_streams_fail_cleanly() {
    let capacity = 1024 * 128;
    let (good, _) = esxi_stream(capacity, &sample_grains());
    let grain0 = 128 * 512;

    // A flipped byte in a compressed grain: a Corrupt error naming the grain's offset.
    let mut flipped = good.clone();
    for b in &mut flipped[grain0 + 40..grain0 + 48] {
        *b ^= 0x5a;
    }
    let mut fs = MemFs::new();
    fs.insert("f.vmdk", flipped.clone());
    let disk = Disk::open_with(&fs, "f.vmdk").unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let err = disk.read_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { offset, .. } if offset == grain0 as u64),
        "{err}"
    );
    assert!(
        matches!(stream_error(&flipped), Error::Corrupt { offset, .. } if offset == grain0 as u64)
    );

    // A grain whose marker LBA disagrees with its grain table entry.
    let mut lba = good.clone();
    lba[grain0] = 1;
    fs.insert("l.vmdk", lba);
    let err = Disk::open_with(&fs, "l.vmdk")
        .unwrap()
        .read_at(&mut buf, 0)
        .unwrap_err();
    assert!(err.to_string().contains("LBA"), "{err}");

    // Truncated: the random-access reader loses its footer, the stream reader its end.
    for cut in [good.len() - 512, good.len() / 2, 700, 100] {
        fs.insert("t.vmdk", good[..cut].to_vec());
        assert!(Disk::open_with(&fs, "t.vmdk").is_err());
        let err = stream_error(&good[..cut]);
        assert!(
            matches!(err, Error::Truncated { .. } | Error::Corrupt { .. }),
            "{cut}: {err}"
        );
    }
    assert!(matches!(
        stream_error(&good[..good.len() - 512]),
        Error::Truncated { .. }
    ));

    // Grains out of LBA order: the stream reader says so.
    let (out_of_order, _) = esxi_stream(capacity, &[(5, vec![1; 65536]), (2, vec![2; 65536])]);
    assert!(
        stream_error(&out_of_order)
            .to_string()
            .contains("out of order")
    );

    // A capacity of 2^60 sectors.
    let mut lie = good.clone();
    lie[12..20].copy_from_slice(&(1u64 << 60).to_le_bytes());
    fs.insert("c.vmdk", lie.clone());
    assert!(matches!(
        Disk::open_with(&fs, "c.vmdk").unwrap_err(),
        Error::Corrupt { .. }
    ));
    assert!(matches!(stream_error(&lie), Error::Corrupt { .. }));

    // The footer's directory past the end of the file.
    let mut far = good.clone();
    let footer = far.len() - 1024;
    far[footer + 56..footer + 64].copy_from_slice(&(1u64 << 30).to_le_bytes());
    fs.insert("g.vmdk", far);
    let err = Disk::open_with(&fs, "g.vmdk").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Corrupt {
                structure: "VMDK grain directory",
                ..
            }
        ),
        "{err}"
    );

    // A grain table entry pointing past the end: reading it fails, mapping still works.
    let mut gte = good.clone();
    let gd_sector = u64::from_le_bytes(good[footer + 56..footer + 64].try_into().unwrap()) as usize;
    let gt0 = u32::from_le_bytes(
        good[gd_sector * 512..gd_sector * 512 + 4]
            .try_into()
            .unwrap(),
    ) as usize
        * 512;
    gte[gt0..gt0 + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    fs.insert("e.vmdk", gte);
    let disk = Disk::open_with(&fs, "e.vmdk").unwrap();
    assert!(disk.map_range(0, capacity * 512).is_ok());
    assert!(matches!(
        disk.read_at(&mut buf, 0).unwrap_err(),
        Error::Truncated { .. }
    ));
}

#[test]
fn qemu_stream_optimized_with_damage_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let raw = pattern_raw(dir.path(), "in.raw", 3 * MIB, 4);
    let image = convert(dir.path(), &raw, "streamOptimized");
    let good = std::fs::read(&image).unwrap();
    let first_grain = header_u64(&good, 64) as usize * 512;
    let mut flipped = good.clone();
    for b in &mut flipped[first_grain + 30..first_grain + 60] {
        *b = !*b;
    }
    std::fs::write(&image, &flipped).unwrap();
    let disk = Disk::open(p(&image)).unwrap();
    let mut buf = vec![0u8; 3 * MIB as usize];
    let err = disk.read_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { offset, .. } if offset == first_grain as u64),
        "{err}"
    );
    assert!(matches!(stream_error(&flipped), Error::Corrupt { .. }));
    // Cut in the middle of the grains.
    std::fs::write(&image, &good[..first_grain + 5000]).unwrap();
    assert!(
        Disk::open(p(&image))
            .and_then(|d| d.read_at(&mut buf, 0))
            .is_err()
    );
    assert!(matches!(
        stream_error(&good[..first_grain + 5000]),
        Error::Truncated { .. }
    ));
}
