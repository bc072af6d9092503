//! Just enough FAT12/16/32 to find the ESP's removable-media loader: the BPB, directories
//! (the fixed root of FAT12/16, cluster chains elsewhere) and 8.3 names, read through
//! bounded cluster chains so a looping or endless FAT ends the search instead of hanging it.

use std::ops::Range;

use super::table::{le_u16, le_u32};
use super::{Architecture, DiskBytes, read_exact};
use crate::Result;

/// A FAT directory holds at most 65,536 entries of 32 bytes (the spec's limit); reading
/// more of a chain than that means the chain is garbage.
const MAX_DIRECTORY_BYTES: u64 = 65_536 * 32;
/// Bytes of the loader read for its PE header: the DOS stub's `e_lfanew` points within
/// the first few hundred bytes in every real loader.
const PE_PROBE_BYTES: u64 = 4096;
/// DOS image signature "MZ".
const DOS_MAGIC: &[u8; 2] = b"MZ";
/// PE signature "PE\0\0".
const PE_MAGIC: &[u8; 4] = b"PE\0\0";
/// PE `Machine` values.
const PE_MACHINE_AMD64: u16 = 0x8664;
const PE_MACHINE_ARM64: u16 = 0xAA64;
/// Directory entry attributes.
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_LONG_NAME: u8 = 0x0F;

/// The boot loader found in an ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loader {
    /// Its path, e.g. `EFI/BOOT/BOOTX64.EFI`.
    pub path: String,
    /// Its architecture: the PE header's machine if readable, else the name's.
    pub architecture: Architecture,
}

/// The removable-media loaders UEFI looks for (UEFI spec 3.5.1.1), by architecture.
const LOADERS: [(&[u8; 11], &str, Architecture); 2] = [
    (b"BOOTX64 EFI", "BOOTX64.EFI", Architecture::X86_64),
    (b"BOOTAA64EFI", "BOOTAA64.EFI", Architecture::Arm64),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

/// The geometry a boot sector describes, checked for sanity.
#[derive(Debug)]
struct Volume {
    fat_type: FatType,
    /// Partition start on the disk.
    base: u64,
    /// Partition end on the disk.
    end: u64,
    cluster_bytes: u64,
    fat_offset: u64,
    fat_bytes: u64,
    /// FAT12/16 fixed root directory: byte offset and length within the partition.
    root_dir: Option<(u64, u64)>,
    root_cluster: u32,
    data_offset: u64,
    cluster_count: u32,
}

/// Finds `EFI/BOOT/BOOTX64.EFI` or `BOOTAA64.EFI` in the FAT file system at `range`.
pub fn find_loader(disk: &dyn DiskBytes, range: Range<u64>) -> Result<Option<Loader>> {
    let Some(volume) = Volume::read(disk, range)? else {
        return Ok(None);
    };
    let Some(efi) = volume.find(disk, volume.root(), b"EFI        ", true)? else {
        return Ok(None);
    };
    let Some(boot) = volume.find(disk, Dir::Chain(efi.cluster), b"BOOT       ", true)? else {
        return Ok(None);
    };
    for (short, long, by_name) in LOADERS {
        if let Some(file) = volume.find(disk, Dir::Chain(boot.cluster), short, false)? {
            let by_machine = volume.pe_machine(disk, &file)?;
            if by_machine.is_some_and(|m| m != by_name) {
                tracing::warn!(
                    "EFI/BOOT/{long} is a PE image for {by_machine:?}; trusting its header over its name"
                );
            }
            return Ok(Some(Loader {
                path: format!("EFI/BOOT/{long}"),
                architecture: by_machine.unwrap_or(by_name),
            }));
        }
    }
    Ok(None)
}

/// Where a directory's entries are.
#[derive(Debug, Clone, Copy)]
enum Dir {
    /// The fixed FAT12/16 root: offset and length within the partition.
    Fixed(u64, u64),
    /// A cluster chain starting at this cluster.
    Chain(u32),
}

/// A directory entry.
#[derive(Debug)]
struct Entry {
    cluster: u32,
    size_bytes: u32,
}

impl Volume {
    /// Parses and checks the boot sector at `range.start`, or `None` if it is no FAT.
    fn read(disk: &dyn DiskBytes, range: Range<u64>) -> Result<Option<Self>> {
        let Some(bs) = read_exact(disk, range.start, 512)? else {
            return Ok(None);
        };
        let bytes_per_sector = u64::from(le_u16(&bs, 11));
        let sectors_per_cluster = u64::from(bs[13]);
        let reserved_sectors = u64::from(le_u16(&bs, 14));
        let fat_count = u64::from(bs[16]);
        let root_entries = u64::from(le_u16(&bs, 17));
        let total_sectors = match le_u16(&bs, 19) {
            0 => u64::from(le_u32(&bs, 32)),
            n => u64::from(n),
        };
        let fat_sectors = match le_u16(&bs, 22) {
            0 => u64::from(le_u32(&bs, 36)),
            n => u64::from(n),
        };
        if ![512, 1024, 2048, 4096].contains(&bytes_per_sector)
            || !sectors_per_cluster.is_power_of_two()
            || reserved_sectors == 0
            || fat_count == 0
            || fat_sectors == 0
        {
            return Ok(None);
        }
        let root_dir_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
        let data_start = reserved_sectors + fat_count * fat_sectors + root_dir_sectors;
        let Some(data_sectors) = total_sectors.checked_sub(data_start) else {
            return Ok(None);
        };
        let cluster_count = data_sectors / sectors_per_cluster;
        // The FAT type follows from the cluster count alone (Microsoft's FAT spec).
        let fat_type = match cluster_count {
            0..4085 => FatType::Fat12,
            4085..65525 => FatType::Fat16,
            _ => FatType::Fat32,
        };
        let (root_dir, root_cluster) = match fat_type {
            FatType::Fat32 => (None, le_u32(&bs, 44)),
            _ => (
                Some((
                    (reserved_sectors + fat_count * fat_sectors) * bytes_per_sector,
                    root_entries * 32,
                )),
                0,
            ),
        };
        let volume = Volume {
            fat_type,
            base: range.start,
            end: range.end,
            cluster_bytes: sectors_per_cluster * bytes_per_sector,
            fat_offset: reserved_sectors * bytes_per_sector,
            fat_bytes: fat_sectors * bytes_per_sector,
            root_dir,
            root_cluster,
            data_offset: data_start * bytes_per_sector,
            // FAT32 has 28-bit cluster numbers, so any real count fits.
            cluster_count: u32::try_from(cluster_count).unwrap_or(u32::MAX),
        };
        let in_partition =
            total_sectors.saturating_mul(bytes_per_sector) <= range.end - range.start;
        Ok(in_partition.then_some(volume))
    }

    fn root(&self) -> Dir {
        match self.root_dir {
            Some((offset, len)) => Dir::Fixed(offset, len),
            None => Dir::Chain(self.root_cluster),
        }
    }

    /// Reads `len` bytes at `offset` within the partition (`None` if outside it).
    fn read_bytes(&self, disk: &dyn DiskBytes, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
        let start = self.base.saturating_add(offset);
        if start.saturating_add(len) > self.end {
            return Ok(None);
        }
        read_exact(disk, start, len)
    }

    fn valid_cluster(&self, cluster: u32) -> bool {
        cluster >= 2 && cluster - 2 < self.cluster_count
    }

    /// The cluster after `cluster` in its chain, `None` at the end or on a bad entry.
    fn next_cluster(&self, disk: &dyn DiskBytes, cluster: u32) -> Result<Option<u32>> {
        let n = u64::from(cluster);
        let (offset, width) = match self.fat_type {
            FatType::Fat12 => (n + n / 2, 2),
            FatType::Fat16 => (n * 2, 2),
            FatType::Fat32 => (n * 4, 4),
        };
        if offset + width > self.fat_bytes {
            return Ok(None);
        }
        let Some(raw) = self.read_bytes(disk, self.fat_offset + offset, width)? else {
            return Ok(None);
        };
        let next = match self.fat_type {
            FatType::Fat12 if cluster % 2 == 1 => u32::from(le_u16(&raw, 0)) >> 4,
            FatType::Fat12 => u32::from(le_u16(&raw, 0)) & 0xFFF,
            FatType::Fat16 => u32::from(le_u16(&raw, 0)),
            FatType::Fat32 => le_u32(&raw, 0) & 0x0FFF_FFFF,
        };
        // End-of-chain and bad-cluster markers are all above the last valid cluster.
        Ok(self.valid_cluster(next).then_some(next))
    }

    /// The clusters of the chain at `first`, cut at `max_bytes` so loops end.
    fn chain(&self, disk: &dyn DiskBytes, first: u32, max_bytes: u64) -> Result<Vec<u32>> {
        let max_clusters = max_bytes
            .div_ceil(self.cluster_bytes)
            .min(u64::from(self.cluster_count));
        let mut clusters = Vec::new();
        let mut next = self.valid_cluster(first).then_some(first);
        while let Some(cluster) = next {
            if clusters.len() as u64 >= max_clusters {
                break;
            }
            clusters.push(cluster);
            next = self.next_cluster(disk, cluster)?;
        }
        Ok(clusters)
    }

    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset + u64::from(cluster - 2) * self.cluster_bytes
    }

    /// Looks `name` (8.3, space padded, upper case) up in `dir`.
    fn find(
        &self,
        disk: &dyn DiskBytes,
        dir: Dir,
        name: &[u8; 11],
        directory: bool,
    ) -> Result<Option<Entry>> {
        let pieces: Vec<(u64, u64)> = match dir {
            Dir::Fixed(offset, len) => vec![(offset, len)],
            Dir::Chain(first) => self
                .chain(disk, first, MAX_DIRECTORY_BYTES)?
                .into_iter()
                .map(|c| (self.cluster_offset(c), self.cluster_bytes))
                .collect(),
        };
        for (offset, len) in pieces {
            let Some(bytes) = self.read_bytes(disk, offset, len)? else {
                return Ok(None);
            };
            for entry in bytes.chunks_exact(32) {
                match entry[0] {
                    0x00 => return Ok(None), // no entries after this one
                    0xE5 => continue,        // deleted
                    _ => {}
                }
                let attr = entry[11];
                if attr & ATTR_LONG_NAME == ATTR_LONG_NAME || attr & ATTR_VOLUME_ID != 0 {
                    continue;
                }
                if entry[..11].eq_ignore_ascii_case(name)
                    && (attr & ATTR_DIRECTORY != 0) == directory
                {
                    let high = if self.fat_type == FatType::Fat32 {
                        u32::from(le_u16(entry, 20))
                    } else {
                        0
                    };
                    return Ok(Some(Entry {
                        cluster: (high << 16) | u32::from(le_u16(entry, 26)),
                        size_bytes: le_u32(entry, 28),
                    }));
                }
            }
        }
        Ok(None)
    }

    /// The architecture a file's PE header names, if it has a readable one we know.
    fn pe_machine(&self, disk: &dyn DiskBytes, file: &Entry) -> Result<Option<Architecture>> {
        let want = PE_PROBE_BYTES.min(u64::from(file.size_bytes));
        let mut head = Vec::new();
        for cluster in self.chain(disk, file.cluster, want)? {
            let Some(bytes) =
                self.read_bytes(disk, self.cluster_offset(cluster), self.cluster_bytes)?
            else {
                break;
            };
            head.extend_from_slice(&bytes);
        }
        head.truncate(usize::try_from(want).unwrap_or(usize::MAX));
        if head.len() < 64 || &head[..2] != DOS_MAGIC {
            return Ok(None);
        }
        let pe = le_u32(&head, 0x3C) as usize;
        let Some(header) = head.get(pe..pe.saturating_add(6)) else {
            return Ok(None);
        };
        if &header[..4] != PE_MAGIC {
            return Ok(None);
        }
        Ok(match le_u16(header, 4) {
            PE_MACHINE_AMD64 => Some(Architecture::X86_64),
            PE_MACHINE_ARM64 => Some(Architecture::Arm64),
            _ => None,
        })
    }
}
