//! Boot detection over tiny disks built byte by byte: tables, FAT12 file systems, loaders.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use proptest::prelude::*;

use super::table::{GPT_TYPE_BIOS_BOOT, GPT_TYPE_ESP, Guid, crc32};
use super::*;

const SECTOR: usize = 512;
/// A Linux file system partition type, for partitions that are not the ESP.
const GPT_TYPE_LINUX: Guid =
    Guid::from_fields(0x0FC6_3DAF, 0x8483, 0x4772, 0x8E79, 0x3D69_D847_7DE4);

fn put16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// An MBR with `(type, first_lba, sectors)` entries on a disk of `sectors` sectors.
fn mbr_disk(sectors: usize, parts: &[(u8, u32, u32)]) -> Vec<u8> {
    let mut disk = vec![0u8; sectors * SECTOR];
    for (i, &(kind, first, count)) in parts.iter().enumerate() {
        let e = 446 + i * 16;
        disk[e] = if i == 0 { 0x80 } else { 0 };
        disk[e + 4] = kind;
        put32(&mut disk, e + 8, first);
        put32(&mut disk, e + 12, count);
    }
    disk[510] = 0x55;
    disk[511] = 0xAA;
    disk
}

/// Writes a GPT header at `lba` with its entries at `entries_lba`.
fn gpt_header(disk: &mut [u8], lba: u64, alternate: u64, entries_lba: u64, entries_crc: u32) {
    let h = lba as usize * SECTOR;
    disk[h..h + 8].copy_from_slice(b"EFI PART");
    put32(disk, h + 8, 0x0001_0000);
    put32(disk, h + 12, 92);
    put64(disk, h + 24, lba);
    put64(disk, h + 32, alternate);
    put64(disk, h + 40, 34);
    put64(disk, h + 72, entries_lba);
    put32(disk, h + 80, 128);
    put32(disk, h + 84, 128);
    put32(disk, h + 88, entries_crc);
    let crc = crc32(&disk[h..h + 92]);
    put32(disk, h + 16, crc);
}

/// A GPT disk (protective MBR, primary and backup headers) with `(type, first, last)` entries.
fn gpt_disk(sectors: usize, parts: &[(Guid, u64, u64)]) -> Vec<u8> {
    let mut disk = mbr_disk(sectors, &[(0xEE, 1, (sectors - 1) as u32)]);
    let mut entries = vec![0u8; 128 * 128];
    for (i, &(kind, first, last)) in parts.iter().enumerate() {
        entries[i * 128..i * 128 + 16].copy_from_slice(&kind.0);
        put64(&mut entries, i * 128 + 32, first);
        put64(&mut entries, i * 128 + 40, last);
    }
    let crc = crc32(&entries);
    let last = (sectors - 1) as u64;
    disk[2 * SECTOR..34 * SECTOR].copy_from_slice(&entries);
    disk[(sectors - 33) * SECTOR..(sectors - 1) * SECTOR].copy_from_slice(&entries);
    gpt_header(&mut disk, 1, last, 2, crc);
    gpt_header(&mut disk, last, 1, last - 32, crc);
    disk
}

/// Sectors of the FAT12 volume `fat12` builds.
const FAT_SECTORS: usize = 64;

/// A FAT12 volume (512-byte clusters) holding `EFI/BOOT/<loader>`, whose first bytes are a
/// PE header for `machine`. Clusters: 2 = EFI, 3 = BOOT, 4 = the loader.
fn fat12(loader: &[u8; 11], machine: u16) -> Vec<u8> {
    let mut v = vec![0u8; FAT_SECTORS * SECTOR];
    v[..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
    put16(&mut v, 11, 512); // bytes per sector
    v[13] = 1; // sectors per cluster
    put16(&mut v, 14, 1); // reserved sectors
    v[16] = 1; // FATs
    put16(&mut v, 17, 16); // root entries: one sector
    put16(&mut v, 19, FAT_SECTORS as u16);
    v[21] = 0xF8;
    put16(&mut v, 22, 1); // sectors per FAT
    v[510] = 0x55;
    v[511] = 0xAA;
    for cluster in 2..=4 {
        set_fat12(&mut v, cluster, 0xFFF);
    }
    let dir_entry =
        |v: &mut [u8], at: usize, name: &[u8; 11], attr: u8, cluster: u16, size: u32| {
            v[at..at + 11].copy_from_slice(name);
            v[at + 11] = attr;
            put16(v, at + 26, cluster);
            put32(v, at + 28, size);
        };
    let root = 2 * SECTOR;
    dir_entry(&mut v, root, b"ESP        ", 0x08, 0, 0);
    dir_entry(&mut v, root + 32, b"EFI        ", 0x10, 2, 0);
    let efi = 3 * SECTOR;
    dir_entry(&mut v, efi, b".          ", 0x10, 2, 0);
    dir_entry(&mut v, efi + 32, b"..         ", 0x10, 0, 0);
    dir_entry(&mut v, efi + 64, b"BOOT       ", 0x10, 3, 0);
    let boot = 4 * SECTOR;
    dir_entry(&mut v, boot, b"README  TXT", 0x20, 0, 0);
    dir_entry(&mut v, boot + 32, loader, 0x20, 4, 512);
    let file = 5 * SECTOR;
    v[file..file + 2].copy_from_slice(b"MZ");
    put32(&mut v, file + 0x3C, 0x80);
    v[file + 0x80..file + 0x84].copy_from_slice(b"PE\0\0");
    put16(&mut v, file + 0x84, machine);
    v
}

fn set_fat12(volume: &mut [u8], cluster: usize, value: u16) {
    let at = SECTOR + cluster + cluster / 2;
    let old = u16::from_le_bytes([volume[at], volume[at + 1]]);
    let new = if cluster % 2 == 1 {
        (old & 0x000F) | (value << 4)
    } else {
        (old & 0xF000) | value
    };
    put16(volume, at, new);
}

/// A 1 MiB GPT disk whose ESP (LBA 64..) holds `volume`, plus a Linux partition.
fn gpt_with_esp(volume: &[u8]) -> Vec<u8> {
    let mut disk = gpt_disk(
        2048,
        &[
            (GPT_TYPE_ESP, 64, 64 + FAT_SECTORS as u64 - 1),
            (GPT_TYPE_LINUX, 256, 2000),
        ],
    );
    disk[64 * SECTOR..64 * SECTOR + volume.len()].copy_from_slice(volume);
    disk
}

#[test]
fn gpt_with_an_esp_is_uefi_and_its_loader_names_the_architecture() {
    let disk = gpt_with_esp(&fat12(b"BOOTX64 EFI", 0x8664));
    let info = detect(&disk).unwrap();
    assert!(matches!(info.partition_table, PartitionTable::Gpt(ref p) if p.len() == 2));
    assert_eq!(info.boot_mode, BootMode::Uefi);
    assert_eq!(info.architecture, Some(Architecture::X86_64));
    assert_eq!(info.esp, Some(64 * 512..128 * 512));
    assert_eq!(info.loader.as_deref(), Some("EFI/BOOT/BOOTX64.EFI"));
}

#[test]
fn an_arm64_loader_makes_an_arm64_image() {
    let disk = gpt_with_esp(&fat12(b"BOOTAA64EFI", 0xAA64));
    let info = detect(&disk).unwrap();
    assert_eq!(
        (info.boot_mode, info.architecture),
        (BootMode::Uefi, Some(Architecture::Arm64))
    );
}

#[test]
fn the_pe_header_wins_over_the_loader_name() {
    let disk = gpt_with_esp(&fat12(b"BOOTX64 EFI", 0xAA64));
    assert_eq!(
        detect(&disk).unwrap().architecture,
        Some(Architecture::Arm64)
    );
}

#[test]
fn a_loader_without_a_pe_header_is_named_by_its_file_name() {
    let mut volume = fat12(b"BOOTAA64EFI", 0);
    volume[5 * SECTOR..6 * SECTOR].fill(0);
    assert_eq!(
        detect(&gpt_with_esp(&volume)).unwrap().architecture,
        Some(Architecture::Arm64)
    );
}

#[test]
fn an_mbr_disk_is_legacy_bios() {
    let disk = mbr_disk(2048, &[(0x83, 2048 - 1024, 1024)]);
    let info = detect(&disk).unwrap();
    assert!(matches!(info.partition_table, PartitionTable::Mbr(ref p) if p.len() == 1));
    assert_eq!(
        (info.boot_mode, info.architecture, info.esp),
        (BootMode::LegacyBios, None, None)
    );
}

#[test]
fn an_mbr_esp_is_found_but_the_disk_stays_legacy_bios() {
    let mut disk = mbr_disk(2048, &[(0xEF, 64, FAT_SECTORS as u32)]);
    let volume = fat12(b"BOOTX64 EFI", 0x8664);
    disk[64 * SECTOR..64 * SECTOR + volume.len()].copy_from_slice(&volume);
    let info = detect(&disk).unwrap();
    assert_eq!(info.boot_mode, BootMode::LegacyBios);
    assert_eq!(info.architecture, Some(Architecture::X86_64));
}

#[test]
fn a_gpt_disk_with_a_bios_boot_partition_and_no_esp_is_legacy_bios() {
    let disk = gpt_disk(
        2048,
        &[
            (GPT_TYPE_BIOS_BOOT, 34, 2047 - 40),
            (GPT_TYPE_LINUX, 2047 - 39, 2047 - 34),
        ],
    );
    let info = detect(&disk).unwrap();
    assert!(
        info.partition_table
            .partitions()
            .iter()
            .any(|p| p.is_bios_boot())
    );
    assert_eq!((info.boot_mode, info.esp), (BootMode::LegacyBios, None));
}

#[test]
fn a_damaged_primary_gpt_header_falls_back_to_the_backup() {
    let mut disk = gpt_with_esp(&fat12(b"BOOTX64 EFI", 0x8664));
    disk[SECTOR + 40] ^= 1; // first usable LBA: the header's CRC no longer matches
    let info = detect(&disk).unwrap();
    assert_eq!(
        (info.boot_mode, info.architecture),
        (BootMode::Uefi, Some(Architecture::X86_64))
    );
}

#[test]
fn damaged_gpt_entries_in_both_copies_leave_no_table() {
    let mut disk = gpt_with_esp(&fat12(b"BOOTX64 EFI", 0x8664));
    disk[2 * SECTOR + 33] ^= 1;
    disk[(2048 - 33) * SECTOR + 33] ^= 1;
    let info = detect(&disk).unwrap();
    assert_eq!(info.partition_table, PartitionTable::None);
    assert_eq!((info.boot_mode, info.esp), (BootMode::LegacyBios, None));
}

#[test]
fn a_looping_fat_chain_ends_the_search() {
    let mut volume = fat12(b"BOOTX64 EFI", 0x8664);
    // EFI's directory: every entry deleted, and its chain loops back on itself.
    for entry in volume[3 * SECTOR..4 * SECTOR].chunks_exact_mut(32) {
        entry[0] = 0xE5;
    }
    set_fat12(&mut volume, 2, 2);
    let info = detect(&gpt_with_esp(&volume)).unwrap();
    assert_eq!(
        (info.boot_mode, info.architecture, info.loader),
        (BootMode::Uefi, None, None)
    );
}

#[test]
fn a_blank_or_tiny_disk_has_no_table() {
    for disk in [vec![0u8; 4096], vec![0u8; 100], Vec::new()] {
        let info = detect(&disk).unwrap();
        assert_eq!(
            (info.partition_table, info.boot_mode),
            (PartitionTable::None, BootMode::LegacyBios)
        );
    }
}

#[test]
fn an_esp_past_the_disk_end_is_ignored() {
    let mut disk = mbr_disk(256, &[(0xEF, 200, 4096)]);
    disk.truncate(256 * SECTOR);
    let info = detect(&disk).unwrap();
    assert_eq!((info.architecture, info.loader), (None, None));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any few bytes changed anywhere in the tables or the FAT: an answer, never a panic.
    #[test]
    fn mutated_disks_never_panic(edits in proptest::collection::vec((0usize..140 * SECTOR, any::<u8>()), 1..16)) {
        let mut disk = gpt_with_esp(&fat12(b"BOOTX64 EFI", 0x8664));
        for (at, byte) in edits {
            disk[at] = byte;
        }
        let _ = detect(&disk).unwrap();
    }
}
