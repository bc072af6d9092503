//! Test images built by hand from the specification (differencing images, logs, lies),
//! which no tool we have can make, and the tests that read them.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use super::MIB;
use super::guid::{self, Guid};
use super::header::{HEADER_OFFSETS, Header, file_identifier};
use super::metadata::{self, IS_REQUIRED, IS_VIRTUAL_DISK};
use super::region::{self, BAT_GUID, METADATA_GUID, REGION_TABLE_OFFSETS, Region};

/// Where the builder puts things: the writer's layout, log at 1 MiB, metadata at 2 MiB,
/// BAT at 3 MiB (1 MiB long), payload from 4 MiB.
pub(crate) const LOG_AT: u64 = MIB;
pub(crate) const BAT_AT: u64 = 3 * MIB;
pub(crate) const PAYLOAD_AT: u64 = 4 * MIB;

/// What to build.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub block_size: u32,
    pub virtual_size: u64,
    pub flags: u32,
    pub locator: Option<Vec<(&'static str, String)>>,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub bat_len: u64,
    pub sector: u32,
}

impl Spec {
    pub(crate) fn base(block_size: u32, virtual_size: u64) -> Self {
        Self {
            block_size,
            virtual_size,
            flags: 0,
            locator: None,
            data_write_guid: [0xD1; 16],
            log_guid: guid::ZERO,
            bat_len: MIB,
            sector: 512,
        }
    }
}

/// Builds an image of `file_len` bytes with raw BAT entries `(index, entry)` and byte
/// `patches` laid over it.
pub(crate) fn build(
    spec: &Spec,
    bat: &[(u64, u64)],
    patches: &[(u64, Vec<u8>)],
    file_len: u64,
) -> Vec<u8> {
    let mut b = vec![0u8; usize::try_from(file_len).unwrap()];
    let mut put = |at: u64, bytes: &[u8]| {
        let at = usize::try_from(at).unwrap();
        b[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &file_identifier("test"));
    for (i, at) in HEADER_OFFSETS.into_iter().enumerate() {
        let h = Header {
            sequence: 10 + i as u64,
            file_write_guid: [0xF1; 16],
            data_write_guid: spec.data_write_guid,
            log_guid: spec.log_guid,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: LOG_AT,
        };
        put(at, &h.encode());
    }
    let table = region::encode(&[
        (
            BAT_GUID,
            Region {
                offset: BAT_AT,
                length: spec.bat_len,
            },
        ),
        (
            METADATA_GUID,
            Region {
                offset: 2 * MIB,
                length: MIB,
            },
        ),
    ]);
    for at in REGION_TABLE_OFFSETS {
        put(at, &table);
    }
    let vd = IS_REQUIRED | IS_VIRTUAL_DISK;
    let mut items: Vec<metadata::Item> = vec![
        (
            metadata::FILE_PARAMETERS,
            IS_REQUIRED,
            [spec.block_size.to_le_bytes(), spec.flags.to_le_bytes()].concat(),
        ),
        (
            metadata::VIRTUAL_DISK_SIZE,
            vd,
            spec.virtual_size.to_le_bytes().to_vec(),
        ),
        (metadata::PAGE_83_DATA, vd, vec![8; 16]),
        (
            metadata::LOGICAL_SECTOR_SIZE,
            vd,
            spec.sector.to_le_bytes().to_vec(),
        ),
        (
            metadata::PHYSICAL_SECTOR_SIZE,
            vd,
            4096u32.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(pairs) = &spec.locator {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        items.push((
            metadata::PARENT_LOCATOR,
            IS_REQUIRED,
            metadata::encode_parent_locator(&pairs),
        ));
    }
    put(
        2 * MIB,
        &metadata::encode(&items, metadata::TABLE_SIZE + 8192),
    );
    for (index, entry) in bat {
        put(BAT_AT + index * 8, &entry.to_le_bytes());
    }
    for (at, bytes) in patches {
        put(*at, bytes);
    }
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use std::io::Cursor;
    use std::sync::Arc;

    use bytes::Bytes;
    use rehost_core::{Extent, ExtentKind};

    use super::super::bat::{
        PAYLOAD_BLOCK_FULLY_PRESENT as FULL, PAYLOAD_BLOCK_PARTIALLY_PRESENT as PARTIAL,
    };
    use super::super::bat::{PAYLOAD_BLOCK_ZERO as ZERO, SB_BLOCK_PRESENT};
    use super::super::log::encode_entry;
    use super::super::metadata::HAS_PARENT;
    use super::super::source::OverlayWrite;
    use super::super::{VhdxWriter, open};
    use super::*;
    use crate::disk::Disk;
    use crate::error::Error;
    use crate::io::{ImageFile, MemFs};
    use crate::layer::{ImageId, Layer};
    use crate::sink::ExtentSink;

    fn layer(bytes: Vec<u8>) -> crate::error::Result<Arc<dyn Layer>> {
        open(ImageFile::from_bytes("t.vhdx", bytes))
    }

    fn kinds(l: &dyn Layer) -> Vec<(u64, ExtentKind)> {
        let size = l.info().virtual_size_bytes;
        l.map_range(0, size)
            .unwrap()
            .iter()
            .map(|e| (e.offset, e.kind))
            .collect()
    }

    #[test]
    fn base_image_maps_each_block_state() {
        let spec = Spec::base(1 << 20, 3 * MIB + 1024);
        let bat = [
            (0, PAYLOAD_AT | FULL),
            (1, ZERO),
            (3, (PAYLOAD_AT + MIB) | FULL),
        ];
        let patches = [
            (PAYLOAD_AT, vec![7u8; 4096]),
            (PAYLOAD_AT + MIB, vec![9u8; 1024]),
        ];
        let l = layer(build(&spec, &bat, &patches, PAYLOAD_AT + 2 * MIB)).unwrap();
        assert_eq!(l.info().subformat, "dynamic");
        assert_eq!(l.info().id, Some(ImageId::VhdxDataWriteGuid([0xD1; 16])));
        assert_eq!(
            kinds(l.as_ref()),
            vec![
                (0, ExtentKind::Data),
                (MIB, ExtentKind::Zero),
                (2 * MIB, ExtentKind::Unallocated),
                (3 * MIB, ExtentKind::Data)
            ]
        );
        let mut buf = vec![1u8; 8192];
        l.read_at(&mut buf, MIB - 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0) && buf[4096..].iter().all(|&b| b == 0));
        l.read_at(&mut buf[..2048], 3 * MIB - 1024).unwrap();
        assert_eq!((buf[1023], buf[1024], buf[2047]), (0, 9, 9));
        let mut head = [0u8; 10];
        l.read_at(&mut head, 4090).unwrap();
        assert_eq!(head, [7, 7, 7, 7, 7, 7, 0, 0, 0, 0]);
    }

    /// Writes `extents` with our writer into memory.
    fn write_image(
        size: u64,
        block: u32,
        extents: Vec<Extent>,
    ) -> (Vec<u8>, crate::sink::WriteSummary) {
        let mut out = Cursor::new(Vec::new());
        let mut w = Box::new(VhdxWriter::new(&mut out, size, Some(block), "o".into()).unwrap());
        for e in extents {
            w.put(e).unwrap();
        }
        let summary = ExtentSink::finish(w).unwrap();
        (out.into_inner(), summary)
    }

    /// A 4 MiB parent written by our writer: byte value (sector index % 250) + 1 everywhere.
    fn parent() -> (Vec<u8>, Vec<u8>, Guid) {
        let size = 4 * MIB;
        let content: Vec<u8> = (0..size)
            .map(|i| u8::try_from((i / 512) % 250).unwrap() + 1)
            .collect();
        let (out, _) = write_image(
            size,
            1 << 20,
            vec![Extent::Data {
                offset: 0,
                data: Bytes::from(content.clone()),
            }],
        );
        let l = layer(out.clone()).unwrap();
        let Some(ImageId::VhdxDataWriteGuid(g)) = l.info().id else {
            panic!()
        };
        (out, content, g)
    }

    /// A differencing child over [`parent`]: block 0 partially present (sectors 0-3 and 10
    /// from the child), block 1 fully present, block 2 not present, block 3 zero.
    fn child(linkage: &Guid) -> Vec<u8> {
        let mut spec = Spec::base(1 << 20, 4 * MIB);
        spec.flags = HAS_PARENT;
        spec.data_write_guid = [0xC1; 16];
        spec.locator = Some(vec![
            ("parent_linkage", guid::format(linkage)),
            ("relative_path", "..\\elsewhere\\parent.vhdx".into()),
            ("absolute_win32_path", "C:\\VMs\\parent.vhdx".into()),
        ]);
        // chunk ratio 2^23 * 512 / 1 MiB = 4096: the sector bitmap entry is index 4096.
        let bat = [
            (0, PAYLOAD_AT | PARTIAL),
            (1, (PAYLOAD_AT + MIB) | FULL),
            (3, ZERO),
            (4096, (PAYLOAD_AT + 2 * MIB) | SB_BLOCK_PRESENT),
        ];
        let mut bitmap = vec![0u8; 2];
        bitmap[0] = 0b0000_1111;
        bitmap[1] = 0b0000_0100;
        let patches = [
            (PAYLOAD_AT, vec![0xAA; MIB as usize]),
            (PAYLOAD_AT + MIB, vec![0xBB; MIB as usize]),
            (PAYLOAD_AT + 2 * MIB, bitmap),
        ];
        build(&spec, &bat, &patches, PAYLOAD_AT + 3 * MIB)
    }

    #[test]
    fn differencing_chain_reads_through_to_the_parent() {
        let (parent_bytes, content, parent_id) = parent();
        let mut fs = MemFs::new();
        fs.insert("dir/parent.vhdx", parent_bytes);
        fs.insert("dir/child.vhdx", child(&parent_id));
        let disk = Disk::open_with(&fs, "dir/child.vhdx").unwrap();
        let top = disk.top().info();
        assert_eq!(top.subformat, "differencing");
        let candidates = &top.parent.as_ref().unwrap().candidates;
        assert_eq!(
            candidates,
            &[
                "../elsewhere/parent.vhdx",
                "C:/VMs/parent.vhdx",
                "parent.vhdx"
            ]
        );
        let mut expected = content;
        let m = MIB as usize;
        for s in [0usize, 1, 2, 3, 10] {
            expected[s * 512..(s + 1) * 512].fill(0xAA);
        }
        expected[m..2 * m].fill(0xBB);
        expected[3 * m..].fill(0);
        let mut got = vec![0u8; 4 * m];
        disk.read_at(&mut got, 0).unwrap();
        assert!(got == expected, "chain content differs");
        let child_map = kinds(disk.top());
        assert_eq!(
            child_map[..4],
            [
                (0, ExtentKind::Data),
                (2048, ExtentKind::Unallocated),
                (5120, ExtentKind::Data),
                (5632, ExtentKind::Unallocated)
            ]
        );
        assert_eq!(
            child_map[4..],
            [
                (MIB, ExtentKind::Data),
                (2 * MIB, ExtentKind::Unallocated),
                (3 * MIB, ExtentKind::Zero)
            ]
        );
        // Reads not aligned to sectors across the partial block's runs.
        let mut odd = vec![0u8; 3000];
        disk.read_at(&mut odd, 1500).unwrap();
        assert!(odd[..] == expected[1500..4500]);
    }

    #[test]
    fn wrong_parent_linkage_is_a_mismatch() {
        let (parent_bytes, _, mut id) = parent();
        id[0] ^= 1;
        let mut fs = MemFs::new();
        fs.insert("dir/parent.vhdx", parent_bytes);
        fs.insert("dir/child.vhdx", child(&id));
        let err = Disk::open_with(&fs, "dir/child.vhdx").unwrap_err();
        assert!(matches!(err, Error::ParentMismatch { .. }), "{err}");
    }

    #[test]
    fn lying_images_are_refused_cleanly() {
        let spec = Spec::base(1 << 20, 2 * MIB);
        // A BAT entry pointing past the end of the file.
        let err = layer(build(&spec, &[(1, (64 * MIB) | FULL)], &[], PAYLOAD_AT)).unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { structure: "VHDX BAT entry", offset, .. } if offset == BAT_AT + 8),
            "{err}"
        );
        // An invalid state, and a partially present block in a base image.
        for raw in [4u64, PAYLOAD_AT | PARTIAL] {
            let err = layer(build(&spec, &[(0, raw)], &[], PAYLOAD_AT + MIB)).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        }
        // A block placed over the metadata region (2 MiB).
        let err = layer(build(&spec, &[(0, (2 * MIB) | FULL)], &[], PAYLOAD_AT)).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
        // Block size 3 MiB; virtual size 2^60.
        for (bs, size) in [(3u32 << 20, 2 * MIB), (1 << 20, 1 << 60)] {
            let err = layer(build(&Spec::base(bs, size), &[], &[], PAYLOAD_AT)).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::Corrupt {
                        structure: "VHDX metadata table",
                        ..
                    }
                ),
                "{err}"
            );
        }
        // 64 TiB with 1 MiB blocks needs a 512 MiB BAT: the 1 MiB region is too small.
        let err = layer(build(&Spec::base(1 << 20, 64 << 40), &[], &[], PAYLOAD_AT)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    structure: "VHDX BAT",
                    ..
                }
            ),
            "{err}"
        );
        // Truncated: anywhere before the BAT ends.
        let full = build(&spec, &[(0, PAYLOAD_AT | FULL)], &[], PAYLOAD_AT + MIB);
        for cut in [
            100usize,
            70_000,
            200_000,
            2 * 1024 * 1024 + 10,
            3 * 1024 * 1024 + 4,
        ] {
            let err = layer(full[..cut].to_vec()).unwrap_err();
            assert!(
                matches!(err, Error::Truncated { .. } | Error::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
        // Garbage everywhere past the signature must not panic.
        let mut junk = full.clone();
        for (i, b) in junk.iter_mut().enumerate().skip(8) {
            *b = u8::try_from((i * 7919) % 251).unwrap();
        }
        assert!(layer(junk).is_err());
    }

    #[test]
    fn large_bat_is_read_lazily_and_checked_where_used() {
        // 2 TiB in 1 MiB blocks: 2 Mi entries + 511 bitmap entries, a 16 MiB BAT, more
        // than is read whole at open.
        let size = 2u64 << 40;
        let mut spec = Spec::base(1 << 20, size);
        spec.bat_len = 17 * MIB;
        let payload = 20 * MIB;
        let last_block = size / MIB - 1;
        let last_index = last_block + last_block / 4096;
        let bat = [
            (0, payload | FULL),
            (last_index, (payload + MIB) | FULL),
            (5000, (400 * MIB) | FULL),
        ];
        let patches = [
            (payload, vec![1u8; 512]),
            (payload + 2 * MIB - 512, vec![2u8; 512]),
        ];
        let l = layer(build(&spec, &bat, &patches, payload + 2 * MIB)).unwrap();
        let mut b = [0u8; 512];
        l.read_at(&mut b, size - 512).unwrap();
        assert_eq!(b, [2; 512]);
        l.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1; 512]);
        let map = l.map_range(size - 8 * MIB, 8 * MIB).unwrap();
        assert_eq!(
            map.iter().map(|e| (e.offset, e.kind)).collect::<Vec<_>>(),
            vec![
                (size - 8 * MIB, ExtentKind::Unallocated),
                (size - MIB, ExtentKind::Data)
            ]
        );
        // Entry 5000 (block 4999, past the first bitmap entry at 4096) lies past the
        // end of the file: found when that block is used, not at open.
        let err = l.map_range(4999 * MIB, MIB).unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { structure: "VHDX BAT entry", offset, .. } if offset == BAT_AT + 5000 * 8),
            "{err}"
        );
        assert!(l.map_range(4998 * MIB, MIB).is_ok());
    }

    /// An image whose BAT says block 0 is not present, with a log that allocates it and
    /// writes one of its sectors.
    fn logged(corrupt_crc: bool) -> Vec<u8> {
        let mut spec = Spec::base(1 << 20, 2 * MIB);
        spec.log_guid = [0x10; 16];
        let mut bat_sector = vec![0u8; 4096];
        bat_sector[..8].copy_from_slice(&(PAYLOAD_AT | FULL).to_le_bytes());
        let mut data = vec![0u8; 4096];
        data[..8].copy_from_slice(b"LEADING!");
        data[8..4092].fill(0x5A);
        data[4092..].copy_from_slice(b"TAIL");
        let writes = [
            OverlayWrite::Sector {
                offset: BAT_AT,
                data: bat_sector.into_boxed_slice(),
            },
            OverlayWrite::Sector {
                offset: PAYLOAD_AT + 8192,
                data: data.into_boxed_slice(),
            },
            OverlayWrite::Zeros {
                offset: PAYLOAD_AT + 4096,
                len: 4096,
            },
        ];
        let mut entry = encode_entry(&spec.log_guid, 1, 0, PAYLOAD_AT + MIB, &writes);
        if corrupt_crc {
            entry[9000] ^= 0xFF;
        }
        // Stale payload bytes that the zero descriptor must clear.
        build(
            &spec,
            &[],
            &[(LOG_AT, entry), (PAYLOAD_AT + 4096, vec![0x77; 4096])],
            PAYLOAD_AT + MIB,
        )
    }

    #[test]
    fn log_replay_changes_the_bat_and_a_data_sector() {
        let l = layer(logged(false)).unwrap();
        assert_eq!(
            kinds(l.as_ref()),
            vec![(0, ExtentKind::Data), (MIB, ExtentKind::Unallocated)]
        );
        let mut buf = vec![0u8; 12288];
        l.read_at(&mut buf, 4096).unwrap();
        assert!(
            buf[..4096].iter().all(|&b| b == 0),
            "zero descriptor not applied"
        );
        assert_eq!(&buf[4096..4104], b"LEADING!");
        assert_eq!(buf[4104], 0x5A);
        assert_eq!(&buf[8188..8192], b"TAIL");
        assert!(l.info().warnings.iter().any(|w| w.contains("replayed")));
    }

    #[test]
    fn log_with_a_bad_crc_is_not_replayed() {
        let l = layer(logged(true)).unwrap();
        assert_eq!(kinds(l.as_ref()), vec![(0, ExtentKind::Unallocated)]);
        assert!(
            l.info()
                .warnings
                .iter()
                .any(|w| w.contains("nothing replayed"))
        );
    }

    #[test]
    fn writer_round_trips_and_leaves_zero_blocks_out() {
        let size = 5 * MIB + 1536;
        let mut content = vec![0u8; usize::try_from(size).unwrap()];
        content[10..20].fill(3);
        content[3 * 1024 * 1024 + 5..3 * 1024 * 1024 + 70_000].fill(4);
        let last = content.len() - 1;
        content[last] = 9;
        let (out, summary) = write_image(
            size,
            1 << 20,
            vec![
                Extent::Data {
                    offset: 0,
                    data: Bytes::from(content[..2 * 1024 * 1024].to_vec()),
                },
                Extent::Zero {
                    offset: 2 * MIB,
                    len: MIB,
                },
                Extent::Data {
                    offset: 3 * MIB,
                    data: Bytes::from(content[3 * 1024 * 1024..].to_vec()),
                },
            ],
        );
        assert_eq!(out.len() as u64, summary.file_bytes);
        let l = layer(out).unwrap();
        let mut back = vec![0u8; content.len()];
        l.read_at(&mut back, 0).unwrap();
        assert!(back == content, "written image reads back differently");
        let data_blocks: Vec<u64> = l
            .map_range(0, size)
            .unwrap()
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| e.offset / MIB)
            .collect();
        assert_eq!(data_blocks, vec![0, 3, 5]);
        // Non-zero 64 KiB pieces: one in block 0, two in block 3, the 1536-byte tail.
        assert_eq!(summary.data_bytes, 65536 + 2 * 65536 + 1536);
        // Blocks 0, 3, 5 allocated: BAT (1 MiB from 3 MiB) + three blocks.
        assert_eq!(summary.file_bytes, 7 * MIB);
    }
}
