//! VHDX cross-checked with qemu-img: images qemu makes decode through our reader to what
//! qemu decodes them to, and images we write pass `qemu-img check` and compare equal.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::fs::File;
use std::path::Path;

use bytes::Bytes;
use common::{our_sha256, pattern_raw, qemu_img, qemu_img_status, qemu_io, qemu_sha256};
use rehost_diskimage::vhdx::VhdxWriter;
use rehost_diskimage::write::{OutputFormat, convert, create};
use rehost_diskimage::{Disk, Extent, ExtentKind, ExtentSink};

const MIB: u64 = 1 << 20;
/// An odd size: 7 MiB and three sectors, so the last block is partial.
const ODD_SIZE: u64 = 7 * MIB + 3 * 512;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Checks that every `Zero`/`Unallocated` extent of the map reads as zeros and returns
/// how many bytes of each kind the map has.
fn check_map_against_bytes(disk: &Disk) -> (u64, u64) {
    let size = disk.virtual_size();
    let (mut data, mut holes) = (0, 0);
    for e in disk.map_range(0, size).unwrap() {
        if e.kind == ExtentKind::Data {
            data += e.len;
            continue;
        }
        holes += e.len;
        let mut buf = vec![1u8; usize::try_from(e.len).unwrap()];
        disk.read_at(&mut buf, e.offset).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "{:?} extent at {} does not read as zero",
            e.kind,
            e.offset
        );
    }
    (data, holes)
}

#[test]
fn qemu_made_images_decode_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("dynamic", "1M"),
        ("dynamic", "8M"),
        ("dynamic", "32M"),
        ("fixed", "1M"),
        ("fixed", "8M"),
    ];
    for (i, (subformat, block)) in cases.into_iter().enumerate() {
        let raw = pattern_raw(dir.path(), &format!("in{i}.raw"), ODD_SIZE, 11 + i as u64);
        let image = dir.path().join(format!("q{i}.vhdx"));
        let opts = format!("subformat={subformat},block_size={block}");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            &opts,
            s(&raw),
            s(&image),
        ]);
        assert_eq!(
            our_sha256(&image),
            qemu_sha256(&image, Some("vhdx")),
            "{opts}"
        );
        let disk = Disk::open(s(&image)).unwrap();
        let info = disk.top().info();
        assert_eq!(info.virtual_size_bytes, ODD_SIZE, "{opts}");
        assert_eq!(info.subformat, subformat, "{opts}");
        let (data, holes) = check_map_against_bytes(&disk);
        assert!(data > 0, "{opts}: no data mapped");
        if subformat == "dynamic" && block == "1M" {
            assert!(holes > 0, "{opts}: scattered data but no hole mapped");
        }
    }
}

/// Past 4 GiB a sector bitmap entry sits between payload entries (chunk ratio 4096 for
/// 1 MiB blocks of 512-byte sectors): data written there by qemu must be found.
#[test]
fn qemu_data_past_the_first_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.vhdx");
    qemu_img(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&image),
        "4200M",
    ]);
    qemu_io(&[
        "-f",
        "vhdx",
        "-c",
        "write -P 0x5c 4100M 1M",
        "-c",
        "write -P 0x11 1M 512",
        s(&image),
    ]);
    let disk = Disk::open(s(&image)).unwrap();
    let mut buf = vec![0u8; 2 * MIB as usize];
    disk.read_at(&mut buf, 4099 * MIB).unwrap();
    assert!(buf[..MIB as usize].iter().all(|&b| b == 0));
    assert!(buf[MIB as usize..].iter().all(|&b| b == 0x5c));
    let map = disk.map_range(4096 * MIB, 8 * MIB).unwrap();
    let data: Vec<_> = map
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| (e.offset, e.len))
        .collect();
    assert_eq!(data, vec![(4100 * MIB, MIB)]);
    let mut sector = [0u8; 512];
    disk.read_at(&mut sector, MIB).unwrap();
    assert_eq!(sector, [0x11; 512]);
}

fn check_with_qemu(image: &Path, raw: &Path, size: u64) {
    let (ok, out) = qemu_img_status(&["check", "-f", "vhdx", s(image)]);
    assert!(ok, "qemu-img check failed: {out}");
    let (ok, out) = qemu_img_status(&["compare", "-f", "vhdx", "-F", "raw", s(image), s(raw)]);
    assert!(ok, "qemu-img compare failed: {out}");
    let info = qemu_img(&["info", "--output=json", "-f", "vhdx", s(image)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {size}")),
        "{info}"
    );
}

#[test]
fn images_we_write_pass_qemu_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for (i, block) in [None, Some(1u32 << 20), Some(32 << 20)]
        .into_iter()
        .enumerate()
    {
        let raw = pattern_raw(dir.path(), &format!("w{i}.raw"), ODD_SIZE, 77 + i as u64);
        let image = dir.path().join(format!("w{i}.vhdx"));
        let source = Disk::open(s(&raw)).unwrap();
        let sink: Box<dyn ExtentSink> = match block {
            None => create(&image, OutputFormat::Vhdx, ODD_SIZE, None).unwrap(),
            Some(b) => Box::new(
                VhdxWriter::new(File::create(&image).unwrap(), ODD_SIZE, Some(b), "w".into())
                    .unwrap(),
            ),
        };
        let summary = convert(&source, sink, 2, &mut |_| {}).unwrap();
        assert_eq!(summary.file_bytes, std::fs::metadata(&image).unwrap().len());
        check_with_qemu(&image, &raw, ODD_SIZE);
        assert_eq!(our_sha256(&image), qemu_sha256(&raw, Some("raw")));
    }
}

/// Our writer past the first 4 GiB chunk, fed directly (no 4 GiB input file): qemu must
/// find the block where we put it.
#[test]
fn written_data_past_the_first_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("big.vhdx");
    let size = 4200 * MIB;
    let mut w = Box::new(
        VhdxWriter::new(
            File::create(&image).unwrap(),
            size,
            Some(1 << 20),
            "big".into(),
        )
        .unwrap(),
    );
    w.put(Extent::Zero {
        offset: 0,
        len: 4100 * MIB,
    })
    .unwrap();
    w.put(Extent::Data {
        offset: 4100 * MIB,
        data: Bytes::from(vec![0x5c; MIB as usize]),
    })
    .unwrap();
    w.put(Extent::Unchanged {
        offset: 4101 * MIB,
        len: size - 4101 * MIB,
    })
    .unwrap();
    ExtentSink::finish(w).unwrap();
    let (ok, out) = qemu_img_status(&["check", "-f", "vhdx", s(&image)]);
    assert!(ok, "qemu-img check failed: {out}");
    qemu_io(&[
        "-f",
        "vhdx",
        "-r",
        "-c",
        "read -P 0x5c 4100M 1M",
        "-c",
        "read -P 0 4099M 1M",
        s(&image),
    ]);
    // qemu reports no allocation map for VHDX; check through our reader that only that
    // block is allocated.
    let disk = Disk::open(s(&image)).unwrap();
    let data: Vec<_> = disk
        .map_range(0, size)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .collect();
    assert_eq!(
        data.iter().map(|e| (e.offset, e.len)).collect::<Vec<_>>(),
        vec![(4100 * MIB, MIB)]
    );
    assert_eq!(
        std::fs::metadata(&image).unwrap().len(),
        4 * MIB + MIB,
        "BAT (1 MiB from 3 MiB) + one block"
    );
}
