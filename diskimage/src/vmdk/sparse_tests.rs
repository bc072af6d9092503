//! Unit tests of sparse extents over tiny images built from the spec: 4 KiB grains and
//! 4 entries per grain table, so a few grains already span several tables.
// The builders cast sizes of a few kilobytes into on-disk u32 fields.
#![allow(clippy::cast_possible_truncation)]

use flate2::{Compress, Compression, FlushCompress};
use rehost_core::ExtentKind;

use super::SparseExtent;
use crate::error::Error;
use crate::io::ImageFile;
use crate::map::MapBuilder;
use crate::vmdk::header::tests::header_bytes;
use crate::vmdk::header::{FLAG_COMPRESSED, FLAG_MARKERS, FLAG_REDUNDANT_GT, FLAG_VALID_NEWLINE};

const GRAIN: usize = 4096;
const GTES: usize = 4;
/// 8 grains and 3 sectors: the last grain is partial; 3 grain tables.
const CAPACITY: u64 = 8 * 8 + 3;
const RGD: usize = 1;
const RGTS: usize = 2;
const GD: usize = 5;
const GTS: usize = 6;
const GRAINS: usize = 16;

#[derive(Clone, Copy)]
enum G {
    Data(u8),
    Zero,
}

fn sector(n: usize) -> usize {
    n * 512
}

/// A sparse extent holding `grains`, with primary and redundant directories; grains are
/// stored in order, plain or compressed with markers. Returns the file and the disk.
fn image(grains: &[(usize, G)], compressed: bool) -> (Vec<u8>, Vec<u8>) {
    let mut flags = FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT;
    if compressed {
        flags |= FLAG_COMPRESSED | FLAG_MARKERS;
    }
    let mut h = header_bytes(CAPACITY, 8, flags, GD as u64, RGD as u64, GRAINS as u64);
    h[44..48].copy_from_slice(&(GTES as u32).to_le_bytes());
    let mut file = h.to_vec();
    file.resize(sector(GRAINS), 0);
    let capacity = usize::try_from(CAPACITY).unwrap() * 512;
    let mut raw = vec![0u8; capacity];
    for t in 0..3 {
        file[sector(RGD) + t * 4..sector(RGD) + t * 4 + 4]
            .copy_from_slice(&((RGTS + t) as u32).to_le_bytes());
        file[sector(GD) + t * 4..sector(GD) + t * 4 + 4]
            .copy_from_slice(&((GTS + t) as u32).to_le_bytes());
    }
    for &(g, kind) in grains {
        let gte: u32 = match kind {
            G::Zero => 1,
            G::Data(fill) => {
                let start = g * GRAIN;
                let len = GRAIN.min(capacity - start);
                let content: Vec<u8> = (0..len).map(|i| fill ^ (i as u8)).collect();
                raw[start..start + len].copy_from_slice(&content);
                let at = file.len() / 512;
                if compressed {
                    let mut c = Compress::new(Compression::fast(), true);
                    let mut z = Vec::with_capacity(GRAIN * 2);
                    c.compress_vec(&content, &mut z, FlushCompress::Finish)
                        .unwrap();
                    file.extend(((g * 8) as u64).to_le_bytes());
                    file.extend((z.len() as u32).to_le_bytes());
                    file.extend(z);
                } else {
                    file.extend(&content);
                }
                file.resize(file.len().div_ceil(512) * 512, 0);
                at as u32
            }
        };
        for table in [RGTS, GTS] {
            let at = sector(table + g / GTES) + (g % GTES) * 4;
            file[at..at + 4].copy_from_slice(&gte.to_le_bytes());
        }
    }
    (file, raw)
}

fn open(file: Vec<u8>) -> crate::error::Result<SparseExtent> {
    SparseExtent::open(ImageFile::from_bytes("t.vmdk", file))
}

fn kinds(ext: &SparseExtent, offset: u64, len: u64) -> Vec<(u64, ExtentKind)> {
    let mut map = MapBuilder::new();
    ext.map(offset, len, 0, &mut map).unwrap();
    map.finish().iter().map(|e| (e.offset, e.kind)).collect()
}

const SAMPLE: &[(usize, G)] = &[
    (0, G::Data(1)),
    (1, G::Data(2)),
    (3, G::Zero),
    (4, G::Data(3)),
    (8, G::Data(4)),
];

#[test]
fn reads_and_maps_plain_and_compressed_grains() {
    for compressed in [false, true] {
        let (file, raw) = image(SAMPLE, compressed);
        let ext = open(file).unwrap();
        assert!(ext.warnings.is_empty(), "{:?}", ext.warnings);
        let g = GRAIN as u64;
        assert_eq!(
            kinds(&ext, 0, CAPACITY * 512),
            vec![
                (0, ExtentKind::Data),
                (2 * g, ExtentKind::Unallocated),
                (3 * g, ExtentKind::Zero),
                (4 * g, ExtentKind::Data),
                (5 * g, ExtentKind::Unallocated),
                (8 * g, ExtentKind::Data),
            ]
        );
        // Past the capacity (a descriptor line larger than the file) is unallocated.
        assert_eq!(
            kinds(&ext, CAPACITY * 512 - 1, 100),
            vec![
                (CAPACITY * 512 - 1, ExtentKind::Data),
                (CAPACITY * 512, ExtentKind::Unallocated)
            ]
        );
        let mut all = vec![0xffu8; raw.len()];
        ext.read(&mut all, 0).unwrap();
        assert!(all == raw, "compressed: {compressed}");
        for (off, len) in [
            (1usize, 5000usize),
            (4095, 2),
            (GRAIN * 8 + 1, 3 * 512 - 1),
            (100, raw.len() - 100),
        ] {
            let mut b = vec![0xffu8; len];
            ext.read(&mut b, off as u64).unwrap();
            assert!(
                b == raw[off..off + len],
                "{off}+{len} compressed: {compressed}"
            );
        }
        let mut past = vec![0xffu8; 1000];
        ext.read(&mut past, CAPACITY * 512 - 10).unwrap();
        assert!(past[..10] == raw[raw.len() - 10..] && past[10..].iter().all(|&b| b == 0));
    }
}

#[test]
fn damaged_primary_directory_falls_back_to_the_redundant_one() {
    let (good, raw) = image(SAMPLE, false);
    // Entry 0 of the primary directory points past the end of the file.
    let mut bad = good.clone();
    bad[sector(GD)..sector(GD) + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    let ext = open(bad).unwrap();
    assert!(
        ext.warnings.iter().any(|w| w.contains("redundant")),
        "{:?}",
        ext.warnings
    );
    let mut all = vec![0u8; raw.len()];
    ext.read(&mut all, 0).unwrap();
    assert!(all == raw);
    // Entry 1 of the primary directory lost (zero): the redundant table is used.
    let mut lost = good.clone();
    lost[sector(GD) + 4..sector(GD) + 8].fill(0);
    let ext = open(lost).unwrap();
    assert_eq!(
        kinds(&ext, 4 * GRAIN as u64, 1),
        vec![(4 * GRAIN as u64, ExtentKind::Data)]
    );
    // A primary table whose entries point outside the file, a sound redundant copy.
    let mut garbage = good.clone();
    garbage[sector(GTS)..sector(GTS) + 16].fill(0xee);
    let ext = open(garbage).unwrap();
    ext.read(&mut all, 0).unwrap();
    assert!(all == raw);
    // Tables that differ but both look sound: read the primary, warn.
    let mut differ = good.clone();
    differ[sector(GTS) + 4..sector(GTS) + 8].fill(0);
    let ext = open(differ).unwrap();
    assert!(
        ext.warnings.iter().any(|w| w.contains("disagree")),
        "{:?}",
        ext.warnings
    );
    assert_eq!(
        kinds(&ext, GRAIN as u64, 1),
        vec![(GRAIN as u64, ExtentKind::Unallocated)]
    );
    // Both directories damaged.
    let mut both = good;
    for gd in [RGD, GD] {
        both[sector(gd)..sector(gd) + 4].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
    }
    assert!(matches!(
        open(both),
        Err(Error::Corrupt {
            structure: "VMDK grain directory",
            ..
        })
    ));
}

#[test]
fn lying_entries_and_grains_give_clean_errors() {
    // A grain table entry past the end: mapped as data, reading it is Truncated.
    let (mut file, _) = image(SAMPLE, false);
    for table in [RGTS, GTS] {
        file[sector(table)..sector(table) + 4].copy_from_slice(&0x0fff_ffffu32.to_le_bytes());
    }
    let ext = open(file).unwrap();
    let mut b = vec![0u8; GRAIN];
    assert!(matches!(ext.read(&mut b, 0), Err(Error::Truncated { .. })));

    let (good, _) = image(SAMPLE, true);
    let first = sector(GRAINS);
    // The marker's LBA disagrees with the table.
    let mut lba = good.clone();
    lba[first] = 8;
    let err = open(lba).unwrap().read(&mut b, 0).unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { offset, .. } if *offset == first as u64),
        "{err}"
    );
    // A compressed size beyond any deflate output of a grain.
    let mut size = good.clone();
    size[first + 8..first + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        open(size)
            .unwrap()
            .read(&mut b, 0)
            .unwrap_err()
            .to_string()
            .contains("compressed size")
    );
    // Damaged deflate data, read whole and in part.
    let mut bits = good.clone();
    for x in &mut bits[first + 14..first + 30] {
        *x ^= 0xa5;
    }
    let ext = open(bits).unwrap();
    assert!(matches!(ext.read(&mut b, 0), Err(Error::Corrupt { .. })));
    assert!(matches!(
        ext.read(&mut b[..10], 5),
        Err(Error::Corrupt { .. })
    ));
    // A grain that decompresses to less than a grain.
    let (short, _) = image(&[(0, G::Data(1))], true);
    let mut c = Compress::new(Compression::fast(), true);
    let mut z = Vec::with_capacity(1024);
    c.compress_vec(&[7u8; 100], &mut z, FlushCompress::Finish)
        .unwrap();
    let mut short = short;
    short.truncate(first);
    short.extend(0u64.to_le_bytes());
    short.extend((z.len() as u32).to_le_bytes());
    short.extend(z);
    short.resize(short.len().div_ceil(512) * 512, 0);
    let err = open(short).unwrap().read(&mut b, 0).unwrap_err();
    assert!(
        err.to_string().contains("decompresses to 100 bytes"),
        "{err}"
    );
}

#[test]
fn stream_footer_must_be_where_the_header_says() {
    let (mut file, _) = image(SAMPLE, true);
    file[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    // GD_AT_END, but no footer marker at the end.
    let err = open(file.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Corrupt {
                structure: "VMDK footer marker",
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        open(file[..1024].to_vec()).unwrap_err(),
        Error::Truncated { .. }
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Whatever bytes are damaged, opening, mapping and reading (random access and as a
    /// stream) end in a value or an error, never a panic or a hang.
    #[test]
    fn damaged_images_never_panic(
        compressed in proptest::bool::ANY,
        flips in proptest::collection::vec((0usize..sector(GRAINS) + 4 * GRAIN, proptest::num::u8::ANY), 1..8),
    ) {
        let (mut file, _) = image(SAMPLE, compressed);
        for (at, x) in flips {
            if let Some(b) = file.get_mut(at) {
                *b ^= x.max(1);
            }
        }
        if let Ok(ext) = open(file.clone()) {
            let mut map = MapBuilder::new();
            let _ = ext.map(0, CAPACITY * 512, 0, &mut map);
            let mut all = vec![0u8; usize::try_from(CAPACITY).unwrap() * 512];
            let _ = ext.read(&mut all, 0);
            let _ = ext.read(&mut all[..777], 3000);
        }
        if let Ok(reader) = crate::vmdk::StreamReader::new(&file[..], "f".into()) {
            for e in reader.take(10_000) {
                if e.is_err() {
                    break;
                }
            }
        }
    }
}
