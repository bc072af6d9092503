//! streamOptimized VMDKs: a hand-built file in ESXi's ExportVm layout read through `open`
//! and the forward-only `StreamReader`, qemu's streams read forward-only, corrupt streams.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;
mod vmdk_common;

use std::io::Read;

use common::{pattern_raw, qemu_sha256};
use flate2::{Compress, Compression, FlushCompress};
use rehost_diskimage::vmdk::StreamReader;
use rehost_diskimage::{Disk, Error, Extent, ImageId, MemFs};
use vmdk_common::{MIB, check_matches_qemu, convert, header_u64, p};

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
