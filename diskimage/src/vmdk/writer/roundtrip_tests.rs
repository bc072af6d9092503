//! Round trips through a minimal decoder written from the spec: random extent streams with
//! random boundaries must come back byte for byte, grain tables must agree with their
//! redundant copies, and a delta must record exactly its Data and Zero grains.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use std::io::Cursor;

use bytes::Bytes;
use proptest::prelude::*;
use rehost_core::Extent;

use super::header::{GD_AT_END, GRAIN_BYTES, GTE_ZERO};
use super::{SparseWriter, StreamOptimizedWriter};
use crate::layer::ImageId;
use crate::sink::{ExtentSink, ParentLink};

fn u32_at(b: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// What a grain table entry says of a grain, and the grain's bytes if stored.
#[derive(Debug, PartialEq)]
enum Decoded {
    Unallocated,
    Zero,
    Data(Vec<u8>),
}

/// Decodes every grain of a sparse or streamOptimized file, following the spec.
fn decode(file: &[u8]) -> Vec<Decoded> {
    assert_eq!(&file[..4], b"KDMV");
    let capacity = u64_at(file, 12);
    let mut gd = u64_at(file, 56);
    let stream = gd == GD_AT_END;
    if stream {
        let footer = file.len() as u64 - 1024;
        assert_eq!(&file[footer as usize..footer as usize + 4], b"KDMV");
        gd = u64_at(file, footer + 56);
    }
    let rgd = u64_at(file, 48);
    let grains = capacity.div_ceil(128);
    (0..grains)
        .map(|g| {
            let gde = u64::from(u32_at(file, gd * 512 + (g / 512) * 4));
            if !stream {
                // The redundant copy must say the same.
                let rgde = u64::from(u32_at(file, rgd * 512 + (g / 512) * 4));
                assert_eq!(
                    u32_at(file, rgde * 512 + (g % 512) * 4),
                    u32_at(file, gde * 512 + (g % 512) * 4)
                );
            }
            if gde == 0 {
                return Decoded::Unallocated;
            }
            let gte = u32_at(file, gde * 512 + (g % 512) * 4);
            match gte {
                0 => Decoded::Unallocated,
                GTE_ZERO => Decoded::Zero,
                _ => {
                    let at = u64::from(gte) * 512;
                    if stream {
                        assert_eq!(u64_at(file, at), g * 128, "grain marker LBA");
                        let len = u64::from(u32_at(file, at + 8));
                        let data = &file[(at + 12) as usize..(at + 12 + len) as usize];
                        let mut out = Vec::with_capacity(GRAIN_BYTES as usize);
                        flate2::Decompress::new(true)
                            .decompress_vec(data, &mut out, flate2::FlushDecompress::Finish)
                            .unwrap();
                        Decoded::Data(out)
                    } else {
                        Decoded::Data(file[at as usize..(at + GRAIN_BYTES) as usize].to_vec())
                    }
                }
            }
        })
        .collect()
}

/// A random extent stream over `size` bytes cut at multiples of `unit`: kinds 0 Data,
/// 1 Data of zeros, 2 Zero, 3 Unchanged.
fn extents(size: u64, unit: u64, cuts: &[(u64, u8)]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(len_units, kind) in cuts.iter().chain(std::iter::once(&(u64::MAX / unit, 0))) {
        if pos >= size {
            break;
        }
        let len = (len_units.max(1) * unit).min(size - pos);
        out.push(match kind % 4 {
            0 => Extent::Data {
                offset: pos,
                data: Bytes::from(
                    (0..len)
                        .map(|i| ((pos + i) % 251) as u8 | 1)
                        .collect::<Vec<u8>>(),
                ),
            },
            1 => Extent::Data {
                offset: pos,
                data: Bytes::from(vec![0; len as usize]),
            },
            2 => Extent::Zero { offset: pos, len },
            _ => Extent::Unchanged { offset: pos, len },
        });
        pos += len;
    }
    out
}

/// The disk the extents describe (Zero and Unchanged as zeros).
fn flatten(size: u64, extents: &[Extent]) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    for e in extents {
        if let Extent::Data { offset, data } = e {
            disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
        }
    }
    disk
}

fn run(mut sink: Box<dyn ExtentSink + '_>, extents: Vec<Extent>) {
    for e in extents {
        sink.put(e).unwrap();
    }
    sink.finish().unwrap();
}

/// Checks decoded grains equal `disk`, and that no all-zero grain was stored.
fn check_full(decoded: &[Decoded], disk: &[u8]) -> Result<(), TestCaseError> {
    for (g, grain) in decoded.iter().enumerate() {
        let start = g * GRAIN_BYTES as usize;
        let mut expected = disk[start..(start + GRAIN_BYTES as usize).min(disk.len())].to_vec();
        expected.resize(GRAIN_BYTES as usize, 0);
        match grain {
            Decoded::Data(d) => {
                prop_assert_eq!(d, &expected, "grain {}", g);
                prop_assert!(d.iter().any(|&b| b != 0), "grain {} stored zeros", g);
            }
            Decoded::Unallocated => {
                prop_assert!(expected.iter().all(|&b| b == 0), "grain {} lost", g)
            }
            Decoded::Zero => prop_assert!(false, "full image used a zero grain"),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn full_images_round_trip(
        size in 1u64..1_200_000,
        cuts in prop::collection::vec((1u64..400, any::<u8>()), 1..40),
    ) {
        let extents = extents(size, 512, &cuts);
        let disk = flatten(size, &extents);
        let mut sparse = Cursor::new(Vec::new());
        run(Box::new(SparseWriter::new(&mut sparse, size, None, "a.vmdk".into()).unwrap()), extents.clone());
        check_full(&decode(sparse.get_ref()), &disk)?;
        let mut stream = Vec::new();
        run(Box::new(StreamOptimizedWriter::new(&mut stream, size, "b.vmdk".into()).unwrap()), extents);
        check_full(&decode(&stream), &disk)?;
    }

    #[test]
    fn deltas_record_exactly_data_and_zero_grains(
        grains in 1u64..40,
        tail in 0u64..128,
        cuts in prop::collection::vec((1u64..6, any::<u8>()), 1..20),
    ) {
        let size = (grains * 128 + tail) * 512;
        let extents = extents(size, GRAIN_BYTES, &cuts);
        let link = ParentLink {
            relative_path: "p.vmdk".into(),
            absolute_path: "/p.vmdk".into(),
            id: ImageId::VmdkCid(9),
            virtual_size_bytes: size,
        };
        let mut out = Cursor::new(Vec::new());
        run(Box::new(SparseWriter::new(&mut out, size, Some(link), "c.vmdk".into()).unwrap()), extents.clone());
        let decoded = decode(out.get_ref());
        for e in &extents {
            for g in e.offset() / GRAIN_BYTES..e.end().div_ceil(GRAIN_BYTES) {
                let got = &decoded[g as usize];
                match e {
                    Extent::Unchanged { .. } => prop_assert_eq!(got, &Decoded::Unallocated),
                    Extent::Zero { .. } => prop_assert_eq!(got, &Decoded::Zero),
                    Extent::Data { offset, data } => {
                        let from = (g * GRAIN_BYTES - offset) as usize;
                        let mut expected = data[from..(from + GRAIN_BYTES as usize).min(data.len())].to_vec();
                        expected.resize(GRAIN_BYTES as usize, 0);
                        if expected.iter().all(|&b| b == 0) {
                            prop_assert_eq!(got, &Decoded::Zero);
                        } else {
                            prop_assert_eq!(got, &Decoded::Data(expected));
                        }
                    }
                }
            }
        }
    }
}
