//! VMDK readers cross-checked against qemu-img: every subformat qemu makes, zero grains,
//! redundant grain directories, split extents and delta chains (streams: vmdk_read_stream.rs).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
mod vmdk_common;

use common::{our_sha256, pattern_raw, qemu_img, qemu_io, qemu_sha256};
use rehost_diskimage::{Disk, Error, ExtentKind, ImageId, MemFs};
use vmdk_common::{MIB, check_map_agrees, check_matches_qemu, convert, header_u64, p};

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
    // qemu writes the CID as unpadded hex ("%x"), so its length varies with
    // the random value: change one digit in place, never the line's length.
    let cid_at = text_at + text.find("CID=").unwrap() + 4;
    let mut changed = good_base.clone();
    changed[cid_at] = if changed[cid_at] == b'1' { b'2' } else { b'1' };
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

#[test]
fn several_grain_tables_read_like_qemu() {
    // 70 MiB spans three 32 MiB grain tables; data at both ends and across a table boundary.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("sparse.raw");
    qemu_img(&["create", "-f", "raw", p(&raw), "70M"]);
    for cmd in [
        "write -P 0x61 0 100k",
        "write -P 0x62 32700k 200k",
        "write -P 0x63 71670k 10k",
    ] {
        qemu_io(&["-f", "raw", "-c", cmd, p(&raw)]);
    }
    for subformat in ["monolithicSparse", "streamOptimized"] {
        let image = convert(dir.path(), &raw, subformat);
        let disk = check_matches_qemu(&image);
        let data: Vec<_> = disk
            .map_range(0, 70 * MIB)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .collect();
        assert_eq!(data.len(), 3, "{subformat}: {data:?}");
        assert_eq!(
            (data[1].offset, data[1].len),
            (510 * 65_536, 5 * 65_536),
            "grains 510..=514"
        );
    }
}
