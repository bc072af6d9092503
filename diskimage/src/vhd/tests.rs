//! Reader and writer tests over tiny images built byte by byte from the specification's
//! tables (offsets written out here, not taken from the code under test).
#![allow(clippy::unwrap_used)]

use std::io::Cursor;
use std::sync::Arc;

use bytes::Bytes;
use rehost_core::{Extent, ExtentKind, MapExtent};

use super::{VhdKind, VhdWriter, open};
use crate::disk::Disk;
use crate::error::Error;
use crate::io::{ImageFile, MemFs};
use crate::layer::{ImageId, Layer};
use crate::sink::{ExtentSink, ParentLink, WriteSummary};

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// One's complement of the byte sum, the checksum field (4 bytes at `at`) zero.
fn seal(buf: &mut [u8], at: usize) {
    put(buf, at, &[0; 4]);
    let sum = buf.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
    put(buf, at, &(!sum).to_be_bytes());
}

/// A footer: cookie, features 2, version 1.0, data offset, creator, sizes, CHS, type, id.
fn footer(disk_type: u32, data_offset: u64, size: u64, creator: &[u8; 4], id: [u8; 16]) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    put(&mut f, 0, b"conectix");
    put(&mut f, 8, &2u32.to_be_bytes());
    put(&mut f, 12, &0x0001_0000u32.to_be_bytes());
    put(&mut f, 16, &data_offset.to_be_bytes());
    put(&mut f, 28, creator);
    put(&mut f, 36, b"Wi2k");
    put(&mut f, 40, &size.to_be_bytes());
    put(&mut f, 48, &size.to_be_bytes());
    put(&mut f, 56, &[0x01, 0x00, 4, 17]); // 256 * 4 * 17 sectors: not the size
    put(&mut f, 60, &disk_type.to_be_bytes());
    put(&mut f, 68, &id);
    seal(&mut f, 64);
    f
}

/// A dynamic or differencing image description.
struct Sparse {
    size: u64,
    block_size: u32,
    disk_type: u32,
    max_entries: Option<u32>,
    parent_id: [u8; 16],
    parent_name: &'static str,
    /// (platform code, path bytes)
    locators: Vec<(&'static [u8; 4], Vec<u8>)>,
    /// (block index, first bitmap byte, data byte for each sector k: k + fill)
    blocks: Vec<(u32, u8, u8)>,
}

impl Sparse {
    fn new(size: u64, disk_type: u32) -> Self {
        Self {
            size,
            block_size: 4096,
            disk_type,
            max_entries: None,
            parent_id: [0xBB; 16],
            parent_name: "",
            locators: vec![],
            blocks: vec![],
        }
    }

    /// Footer copy, header at 512, BAT at 1536, locators, blocks, footer.
    fn build(&self) -> Vec<u8> {
        let blocks = self.size.div_ceil(u64::from(self.block_size.max(512)));
        let entries = self
            .max_entries
            .unwrap_or(u32::try_from(blocks).unwrap_or(u32::MAX));
        let bat_len = (usize::try_from(entries).unwrap().min(1 << 16) * 4).div_ceil(512) * 512;
        let mut img = vec![0u8; 1536 + bat_len];
        let mut header = vec![0u8; 1024];
        put(&mut header, 0, b"cxsparse");
        put(&mut header, 8, &u64::MAX.to_be_bytes());
        put(&mut header, 16, &1536u64.to_be_bytes());
        put(&mut header, 24, &0x0001_0000u32.to_be_bytes());
        put(&mut header, 28, &entries.to_be_bytes());
        put(&mut header, 32, &self.block_size.to_be_bytes());
        put(&mut header, 40, &self.parent_id);
        for (i, u) in self.parent_name.encode_utf16().enumerate() {
            put(&mut header, 64 + 2 * i, &u.to_be_bytes());
        }
        for (i, (code, path)) in self.locators.iter().enumerate() {
            let e = 576 + 24 * i;
            put(&mut header, e, *code);
            put(&mut header, e + 4, &512u32.to_be_bytes());
            put(
                &mut header,
                e + 8,
                &u32::try_from(path.len()).unwrap().to_be_bytes(),
            );
            put(&mut header, e + 16, &(img.len() as u64).to_be_bytes());
            let mut space = path.clone();
            space.resize(path.len().div_ceil(512).max(1) * 512, 0);
            img.extend_from_slice(&space);
        }
        seal(&mut header, 36);
        put(&mut img, 512, &header);
        img[1536..1536 + bat_len].fill(0xFF);
        let bitmap_len = (usize::try_from(self.block_size.max(512)).unwrap() / 512)
            .div_ceil(8)
            .div_ceil(512)
            * 512;
        for &(index, bits, fill) in &self.blocks {
            let sector = u32::try_from(img.len() / 512).unwrap();
            put(
                &mut img,
                1536 + 4 * usize::try_from(index).unwrap(),
                &sector.to_be_bytes(),
            );
            let mut bitmap = vec![0u8; bitmap_len];
            bitmap[0] = bits;
            img.extend_from_slice(&bitmap);
            for k in 0..self.block_size / 512 {
                img.extend_from_slice(&[u8::try_from(k).unwrap().wrapping_add(fill); 512]);
            }
        }
        let f = footer(self.disk_type, 512, self.size, b"win ", [0xCC; 16]);
        put(&mut img, 0, &f);
        img.extend_from_slice(&f);
        img
    }
}

fn layer(bytes: Vec<u8>) -> crate::error::Result<Arc<dyn Layer>> {
    open(ImageFile::from_bytes("t.vhd", bytes))
}

fn kinds(map: &[MapExtent]) -> Vec<(u64, u64, ExtentKind)> {
    map.iter().map(|e| (e.offset, e.len, e.kind)).collect()
}

/// 10 sectors in blocks of 8: block 0 stores sectors 0, 2 and 7 (bits MSB first), block 1 none.
fn hand_built_child() -> Sparse {
    let w2ru: Vec<u8> = ".\\base.vhd"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    Sparse {
        parent_name: "base.vhd",
        locators: vec![(b"W2ru", w2ru)],
        blocks: vec![(0, 0b1010_0001, 0x10)],
        ..Sparse::new(5120, 4)
    }
}

#[test]
fn differencing_maps_and_reads_sector_by_sector() {
    use ExtentKind::{Data, Unallocated};
    let child = layer(hand_built_child().build()).unwrap();
    let info = child.info();
    assert_eq!(info.subformat, "differencing");
    assert_eq!(info.virtual_size_bytes, 5120);
    assert_eq!(info.cluster_size_bytes, Some(4096));
    assert_eq!(info.id, Some(ImageId::VhdUniqueId([0xCC; 16])));
    let parent = info.parent.clone().unwrap();
    assert_eq!(parent.candidates, vec!["base.vhd"]);
    assert_eq!(parent.expected_id, Some(ImageId::VhdUniqueId([0xBB; 16])));
    assert_eq!(
        kinds(&child.map_range(0, 5120).unwrap()),
        vec![
            (0, 512, Data),
            (512, 512, Unallocated),
            (1024, 512, Data),
            (1536, 2048, Unallocated),
            (3584, 512, Data),
            (4096, 1024, Unallocated)
        ]
    );
    assert_eq!(
        kinds(&child.map_range(1000, 100).unwrap()),
        vec![(1000, 24, Unallocated), (1024, 76, Data)]
    );
    let mut buf = vec![0xEEu8; 1200];
    child.read_at(&mut buf, 400).unwrap();
    assert!(buf[..112].iter().all(|&b| b == 0x10));
    assert!(buf[112..624].iter().all(|&b| b == 0));
    assert!(buf[624..1136].iter().all(|&b| b == 0x12));
    assert!(buf[1136..].iter().all(|&b| b == 0));

    // Through a chain, unset sectors come from the parent (a fixed VHD of 0x99).
    let mut base = vec![0x99u8; 5120];
    base.extend_from_slice(&footer(2, u64::MAX, 5120, b"win ", [0xBB; 16]));
    let mut fs = MemFs::new();
    fs.insert("base.vhd", base);
    let disk = Disk::from_bytes(&fs, "child.vhd", hand_built_child().build()).unwrap();
    let mut all = vec![0u8; 5120];
    disk.read_at(&mut all, 0).unwrap();
    let sectors: Vec<u8> = all.chunks(512).map(|s| s[0]).collect();
    assert_eq!(
        sectors,
        vec![0x10, 0x99, 0x12, 0x99, 0x99, 0x99, 0x99, 0x17, 0x99, 0x99]
    );
}

#[test]
fn chain_refuses_a_missing_or_different_parent() {
    let fs = MemFs::new();
    let err = Disk::from_bytes(&fs, "child.vhd", hand_built_child().build()).unwrap_err();
    assert!(matches!(err, Error::ParentNotFound { .. }), "{err}");
    let mut fs = MemFs::new();
    let mut base = vec![0u8; 5120];
    base.extend_from_slice(&footer(2, u64::MAX, 5120, b"win ", [0xAB; 16]));
    fs.insert("base.vhd", base);
    let err = Disk::from_bytes(&fs, "child.vhd", hand_built_child().build()).unwrap_err();
    assert!(matches!(err, Error::ParentMismatch { .. }), "{err}");
}

#[test]
fn dynamic_sectors_with_clear_bits_read_as_zero() {
    let img = Sparse {
        blocks: vec![(1, 0xF0, 1)],
        ..Sparse::new(8192, 3)
    }
    .build();
    let l = layer(img).unwrap();
    assert!(l.info().parent.is_none());
    let map = kinds(&l.map_range(0, 8192).unwrap());
    assert_eq!(
        map,
        vec![
            (0, 4096, ExtentKind::Unallocated),
            (4096, 2048, ExtentKind::Data),
            (6144, 2048, ExtentKind::Unallocated)
        ]
    );
    let mut buf = vec![0xEEu8; 8192];
    l.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf[4096], 1);
    assert_eq!(buf[5632], 4);
    assert!(
        buf[6144..].iter().all(|&b| b == 0),
        "clear sectors hold data in the file but are zero"
    );
}

#[test]
fn fixed_disks_and_the_511_byte_footer() {
    let mut img = vec![7u8; 1024];
    img.extend_from_slice(&footer(2, u64::MAX, 1024, b"win ", [1; 16]));
    let l = layer(img.clone()).unwrap();
    assert_eq!(
        (l.info().subformat.as_str(), l.info().virtual_size_bytes),
        ("fixed", 1024)
    );
    assert_eq!(
        kinds(&l.map_range(0, 1024).unwrap()),
        vec![(0, 1024, ExtentKind::Data)]
    );
    img.pop();
    let l = layer(img).unwrap();
    assert_eq!(l.info().virtual_size_bytes, 1024);
    // Virtual PC sizes by geometry: 256 * 4 * 17 sectors, more than the file holds.
    let mut vpc = vec![0u8; 1024];
    vpc.extend_from_slice(&footer(2, u64::MAX, 1024, b"vpc ", [1; 16]));
    assert!(matches!(layer(vpc).unwrap_err(), Error::Corrupt { .. }));
}

#[test]
fn a_damaged_footer_falls_back_to_the_copy_with_a_warning() {
    let mut img = Sparse::new(8192, 3).build();
    let n = img.len();
    img[n - 100] ^= 0xFF;
    let l = layer(img.clone()).unwrap();
    assert_eq!(l.info().warnings.len(), 1, "{:?}", l.info().warnings);
    img[100] ^= 0xFF;
    let err = layer(img).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}

fn assert_corrupt(bytes: Vec<u8>, needle: &str) {
    match layer(bytes) {
        Err(e @ (Error::Corrupt { .. } | Error::Truncated { .. })) => {
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}")
        }
        other => panic!("expected a corrupt image ({needle}), got {other:?}"),
    }
}

#[test]
fn hostile_images_are_refused_cleanly() {
    assert_corrupt(vec![0u8; 100], "truncated");
    let mut wrong_cookie = Sparse::new(8192, 3).build();
    let n = wrong_cookie.len();
    wrong_cookie[n - 512] = b'k';
    wrong_cookie[0] = b'k';
    assert_corrupt(wrong_cookie, "cookie");
    let mut bad_header = Sparse::new(8192, 3).build();
    bad_header[600] ^= 1;
    assert_corrupt(bad_header, "VHD dynamic header");
    // Cut inside the BAT: the footer copy still leads to the header, then the BAT is short.
    let mut cut = Sparse::new(8192, 3).build();
    cut.truncate(1536 + 4);
    assert_corrupt(cut, "truncated: VHD BAT");
    // Cut inside a block.
    let mut cut = Sparse {
        blocks: vec![(0, 0xFF, 0)],
        ..Sparse::new(8192, 3)
    }
    .build();
    cut.truncate(cut.len() - 1024);
    assert_corrupt(cut, "block 0");
    assert_corrupt(
        Sparse {
            block_size: 0,
            ..Sparse::new(8192, 3)
        }
        .build(),
        "block size",
    );
    assert_corrupt(
        Sparse {
            block_size: 3 * 512,
            ..Sparse::new(8192, 3)
        }
        .build(),
        "block size",
    );
    assert_corrupt(
        Sparse {
            max_entries: Some(u32::MAX),
            ..Sparse::new(8192, 3)
        }
        .build(),
        "max table entries",
    );
    assert_corrupt(
        Sparse {
            max_entries: Some(1),
            ..Sparse::new(8192, 3)
        }
        .build(),
        "cannot cover",
    );
    assert_corrupt(Sparse::new(1 << 60, 3).build(), "limit");
    // A BAT entry past the end of the file.
    let mut past = Sparse {
        blocks: vec![(1, 0xFF, 0)],
        ..Sparse::new(8192, 3)
    }
    .build();
    put(&mut past, 1536 + 4, &0x0100_0000u32.to_be_bytes());
    assert_corrupt(past, "block 1");
    // A locator pointing past the end of the file.
    let mut far = hand_built_child();
    far.locators = vec![(b"W2ku", vec![b'x'; 4])];
    let mut bytes = far.build();
    let e = 512 + 576;
    put(&mut bytes, e + 16, &(1u64 << 40).to_be_bytes());
    let mut header = bytes[512..1536].to_vec();
    seal(&mut header, 36);
    put(&mut bytes, 512, &header);
    assert_corrupt(bytes, "parent locator");
    // An unknown disk type is unsupported, a fixed disk larger than its file corrupt.
    let mut odd = vec![0u8; 512];
    odd.extend_from_slice(&footer(5, u64::MAX, 512, b"win ", [1; 16]));
    assert!(matches!(layer(odd).unwrap_err(), Error::Unsupported { .. }));
    let mut lying = vec![0u8; 512];
    lying.extend_from_slice(&footer(2, u64::MAX, 1 << 60, b"win ", [1; 16]));
    assert_corrupt(lying, "precede the footer");
}

fn link(id: ImageId) -> ParentLink {
    ParentLink {
        relative_path: "base.vhd".into(),
        absolute_path: "/nonexistent/base.vhd".into(),
        id,
        virtual_size_bytes: 8 << 20,
    }
}

fn write(kind: VhdKind, size: u64, extents: Vec<Extent>) -> (Vec<u8>, WriteSummary) {
    let mut out = Vec::new();
    let mut w =
        Box::new(VhdWriter::new(Cursor::new(&mut out), size, kind, "out.vhd".into()).unwrap());
    for e in extents {
        w.put(e).unwrap();
    }
    let summary = w.finish().unwrap();
    assert_eq!(summary.file_bytes, out.len() as u64);
    (out, summary)
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn fixed_writer_puts_the_footer_after_the_data() {
    let data = Bytes::from(vec![0x42u8; 1024]);
    let (out, summary) = write(
        VhdKind::Fixed,
        4096,
        vec![
            Extent::Data { offset: 0, data },
            Extent::Zero {
                offset: 1024,
                len: 3072,
            },
        ],
    );
    assert_eq!(out.len(), 4096 + 512);
    assert_eq!(summary.data_bytes, 1024);
    assert_eq!(&out[4096..4104], b"conectix");
    assert_eq!(be32(&out, 4096 + 60), 2);
    assert_eq!(&out[4096 + 28..4096 + 32], b"rhst");
    let l = layer(out).unwrap();
    assert_eq!(
        (l.info().subformat.as_str(), l.info().virtual_size_bytes),
        ("fixed", 4096)
    );
    let mut buf = vec![0u8; 4096];
    l.read_at(&mut buf, 0).unwrap();
    assert!(buf[..1024].iter().all(|&b| b == 0x42) && buf[1024..].iter().all(|&b| b == 0));
}

#[test]
fn fixed_writer_leaves_zero_pieces_as_holes() {
    const K64: usize = 64 << 10;
    let mut bytes = vec![0x21u8; 4 * K64];
    bytes[K64..2 * K64].fill(0);
    bytes[4 * K64 - 1] = 0;
    let (out, summary) = write(
        VhdKind::Fixed,
        4 * K64 as u64,
        vec![Extent::Data {
            offset: 0,
            data: Bytes::from(bytes.clone()),
        }],
    );
    assert_eq!(summary.data_bytes, 3 * K64 as u64);
    assert_eq!(out[..4 * K64], bytes[..]);
}

#[test]
fn dynamic_writer_stores_only_blocks_with_data() {
    const MIB: u64 = 1 << 20;
    let size = 4 * MIB + 4096;
    let zeros = Bytes::from(vec![0u8; 1 << 20]);
    let data = Bytes::from(vec![0x33u8; 512]);
    let (out, summary) = write(
        VhdKind::Dynamic,
        size,
        vec![
            Extent::Data {
                offset: 0,
                data: zeros,
            },
            Extent::Unchanged {
                offset: MIB,
                len: MIB,
            },
            Extent::Data {
                offset: 2 * MIB,
                data,
            },
            Extent::Zero {
                offset: 2 * MIB + 512,
                len: size - 2 * MIB - 512,
            },
        ],
    );
    assert_eq!(summary.data_bytes, 512);
    // Footer copy, header, one sector of BAT, one block (bitmap + 2 MiB), footer.
    assert_eq!(out.len() as u64, 512 + 1024 + 512 + 512 + 2 * MIB + 512);
    assert_eq!(be32(&out, 1536), u32::MAX);
    assert_eq!(be32(&out, 1536 + 4), 2048 / 512);
    assert_eq!(be32(&out, 1536 + 8), u32::MAX);
    assert_eq!(be32(&out, 512 + 32), 2 << 20, "2 MiB blocks");
    assert_eq!(out[..512], out[out.len() - 512..], "footer copy");
    let l = layer(out).unwrap();
    assert_eq!(
        kinds(&l.map_range(0, size).unwrap()),
        vec![
            (0, 2 * MIB, ExtentKind::Unallocated),
            (2 * MIB, 2 * MIB, ExtentKind::Data),
            (4 * MIB, 4096, ExtentKind::Unallocated)
        ]
    );
    let mut buf = vec![0u8; 1024];
    l.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0x33) && buf[512..].iter().all(|&b| b == 0));
}

#[test]
fn differencing_writer_marks_exactly_the_sectors_written() {
    let data = Bytes::from(vec![0x44u8; 512]);
    let (out, summary) = write(
        VhdKind::Differencing(link(ImageId::VhdUniqueId([5; 16]))),
        8192,
        vec![
            Extent::Unchanged {
                offset: 0,
                len: 512,
            },
            Extent::Data { offset: 512, data },
            Extent::Zero {
                offset: 1024,
                len: 1024,
            },
            Extent::Unchanged {
                offset: 2048,
                len: 6144,
            },
        ],
    );
    assert_eq!(summary.data_bytes, 1536);
    assert_eq!(be32(&out, 60), 4, "footer disk type: differencing");
    assert_eq!(out[512 + 40..512 + 56], [5; 16], "parent unique id");
    let name: Vec<u8> = "base.vhd"
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    assert_eq!(out[512 + 64..512 + 64 + name.len()], name[..]);
    assert_eq!(&out[512 + 576..512 + 580], b"W2ru");
    let w2ru_at = usize::try_from(u64::from_be_bytes(
        out[512 + 592..512 + 600].try_into().unwrap(),
    ))
    .unwrap();
    let w2ru: Vec<u8> = ".\\base.vhd"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    assert_eq!(usize::try_from(be32(&out, 512 + 584)).unwrap(), w2ru.len());
    assert_eq!(out[w2ru_at..w2ru_at + w2ru.len()], w2ru[..]);
    assert_eq!(&out[512 + 600..512 + 604], b"W2ku");
    // Sectors 1, 2 and 3 of block 0, most significant bit first.
    let bitmap_at = usize::try_from(be32(&out, 1536)).unwrap() * 512;
    assert_eq!(out[bitmap_at..bitmap_at + 2], [0b0111_0000, 0]);
    let l = layer(out).unwrap();
    assert_eq!(
        kinds(&l.map_range(0, 8192).unwrap()),
        vec![
            (0, 512, ExtentKind::Unallocated),
            (512, 1536, ExtentKind::Data),
            (2048, 6144, ExtentKind::Unallocated)
        ]
    );
    let parent = l.info().parent.clone().unwrap();
    assert_eq!(parent.candidates, vec!["base.vhd", "/nonexistent/base.vhd"]);
    assert_eq!(parent.expected_id, Some(ImageId::VhdUniqueId([5; 16])));
}

#[test]
fn writer_refuses_what_a_vhd_cannot_hold() {
    let new = |size, kind| VhdWriter::new(Cursor::new(Vec::new()), size, kind, "o".into());
    assert!(matches!(
        new(1000, VhdKind::Fixed).unwrap_err(),
        Error::InvalidInput(_)
    ));
    assert!(matches!(
        new(3 << 40, VhdKind::Dynamic).unwrap_err(),
        Error::InvalidInput(_)
    ));
    let vmdk = VhdKind::Differencing(link(ImageId::VmdkCid(7)));
    assert!(matches!(
        new(4096, vmdk).unwrap_err(),
        Error::InvalidInput(_)
    ));
    let mut w = Box::new(new(4096, VhdKind::Dynamic).unwrap());
    assert!(
        w.put(Extent::Zero {
            offset: 512,
            len: 512
        })
        .is_err()
    );
    w.put(Extent::Zero {
        offset: 0,
        len: 512,
    })
    .unwrap();
    assert!(w.finish().is_err());
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Opens, maps and reads a whole image; only clean errors are allowed.
    fn exercise(bytes: Vec<u8>) {
        let Ok(l) = layer(bytes) else { return };
        let size = l.info().virtual_size_bytes.min(1 << 20);
        if let Ok(map) = l.map_range(0, size) {
            assert_eq!(map.iter().map(|e| e.len).sum::<u64>(), size);
        }
        let mut buf = vec![0u8; usize::try_from(size).unwrap()];
        let _ = l.read_at(&mut buf, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Random bytes changed, checksums then fixed so the damage gets past them.
        #[test]
        fn mutated_images_never_panic(edits in proptest::collection::vec((0usize..8192, any::<u8>()), 1..6), cut in 0usize..200) {
            let mut img = hand_built_child().build();
            for (at, value) in edits {
                let at = at % img.len();
                img[at] = value;
            }
            let n = img.len();
            let mut header = img[512..1536].to_vec();
            seal(&mut header, 36);
            put(&mut img, 512, &header);
            for at in [0, n - 512] {
                let mut f = img[at..at + 512].to_vec();
                seal(&mut f, 64);
                put(&mut img, at, &f);
            }
            let keep = n - cut * 7;
            img.truncate(keep);
            exercise(img);
        }
    }
}
