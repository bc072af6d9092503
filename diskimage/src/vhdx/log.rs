//! Log replay (MS-VHDX 2.3). A writer that crashed may leave metadata and BAT updates
//! only in the log; the file is consistent only once they are replayed. We open images
//! read-only, so the replayed writes become an in-memory overlay over every read.

use super::MIB;
use super::guid::{self, Guid};
use super::header::{CHECKSUM_AT, Header};
use super::source::{OverlayWrite, Source};
use crate::error::{Error, Result};
use crate::io::{ImageFile, le};

/// Log entry signature, "loge" (MS-VHDX 2.3.1.1).
pub(crate) const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
/// Zero descriptor signature (MS-VHDX 2.3.1.2).
pub(crate) const ZERO_SIGNATURE: &[u8; 4] = b"zero";
/// Data descriptor signature (MS-VHDX 2.3.1.3).
pub(crate) const DESC_SIGNATURE: &[u8; 4] = b"desc";
/// Data sector signature (MS-VHDX 2.3.1.4).
pub(crate) const DATA_SIGNATURE: &[u8; 4] = b"data";
/// Log sectors are 4 KiB.
pub(crate) const LOG_SECTOR: usize = 4096;
/// Descriptors are 32 bytes; the 64-byte entry header takes the room of two.
const DESCRIPTOR_SIZE: usize = 32;
/// The largest log we replay. Hyper-V and qemu make 1 MiB logs; a bigger one is read
/// whole into memory, so it is capped.
const MAX_LOG: u64 = 32 * MIB;
/// The message of a log we will not replay.
const REPLAY_HINT: &str = "open it once in Hyper-V or run `qemu-img check -r all`";

/// A valid entry's header fields.
#[derive(Debug, Clone, Copy)]
struct Entry {
    sequence: u64,
    length: usize,
    tail: usize,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// Replays the log named by `header`, returning the file as replayed.
pub(crate) fn replay(
    file: ImageFile,
    header: &Header,
    warnings: &mut Vec<String>,
) -> Result<Source> {
    if header.log_guid == guid::ZERO || header.log_length == 0 {
        return Ok(Source::plain(file));
    }
    let (offset, length) = (header.log_offset, u64::from(header.log_length));
    if offset < MIB || offset % MIB != 0 || length % MIB != 0 {
        return Err(Error::corrupt(
            file.name(),
            "VHDX header",
            super::header::HEADER_OFFSETS[0],
            format!("log at {offset} of {length} bytes is not 1 MiB-aligned past the headers"),
        ));
    }
    if length > MAX_LOG {
        return Err(Error::unsupported(
            file.name(),
            format!(
                "VHDX log of {length} bytes needs replay and is larger than we replay in memory: {REPLAY_HINT}"
            ),
        ));
    }
    let log = file.read_vec(usize::try_from(length).unwrap_or(0), offset, "VHDX log")?;
    let active = find_active(&log, &header.log_guid)
        .map_err(|reason| Error::corrupt(file.name(), "VHDX log", offset, reason))?;
    let Some(active) = active else {
        warnings.push(
            "the header names a log but it holds no valid entry sequence: nothing replayed".into(),
        );
        return Ok(Source::plain(file));
    };
    let mut writes = Vec::new();
    let mut last_file_offset = 0;
    for at in active {
        let entry = parse(&log, at, &header.log_guid).ok_or_else(|| {
            Error::corrupt(
                file.name(),
                "VHDX log entry",
                offset + at as u64,
                "entry changed while replaying",
            )
        })?;
        if entry.flushed_file_offset > file.len() {
            return Err(Error::corrupt(
                file.name(),
                "VHDX log entry",
                offset + at as u64,
                format!(
                    "the log says the file had {} bytes, it has {}",
                    entry.flushed_file_offset,
                    file.len()
                ),
            ));
        }
        last_file_offset = last_file_offset.max(entry.last_file_offset);
        collect_writes(&log, at, &mut writes);
    }
    warnings.push(format!(
        "replayed the VHDX log in memory ({} writes)",
        writes.len()
    ));
    Ok(Source::with_overlay(file, writes, last_file_offset))
}

/// The 4 KiB log sector `index` sectors after `at`, wrapping around the circular log.
fn sector(log: &[u8], at: usize, index: usize) -> &[u8] {
    let sectors = log.len() / LOG_SECTOR;
    let s = (at / LOG_SECTOR + index) % sectors.max(1);
    &log[s * LOG_SECTOR..(s + 1) * LOG_SECTOR]
}

/// Byte `n` of the entry's descriptor area (spanning its first sectors).
fn desc_bytes(log: &[u8], at: usize, n: usize, len: usize) -> Vec<u8> {
    (n..n + len)
        .map(|i| sector(log, at, i / LOG_SECTOR)[i % LOG_SECTOR])
        .collect()
}

/// Sectors the header and `count` descriptors take.
fn descriptor_sectors(count: usize) -> usize {
    (count + 2).div_ceil(LOG_SECTOR / DESCRIPTOR_SIZE)
}

/// Parses and fully validates the entry at byte `at` of the log: header fields, CRC-32C
/// over the whole entry, every descriptor and data sector. `None` if anything is off.
fn parse(log: &[u8], at: usize, log_guid: &Guid) -> Option<Entry> {
    let first = sector(log, at, 0);
    if &first[..4] != ENTRY_SIGNATURE || first[32..48] != log_guid[..] {
        return None;
    }
    let length = usize::try_from(le::u32(first, 8)).ok()?;
    let tail = usize::try_from(le::u32(first, 12)).ok()?;
    let sequence = le::u64(first, 16);
    let count = usize::try_from(le::u32(first, 24)).ok()?;
    if length == 0 || length % LOG_SECTOR != 0 || length > log.len() || sequence == 0 {
        return None;
    }
    if tail % LOG_SECTOR != 0 || tail >= log.len() {
        return None;
    }
    let sectors = length / LOG_SECTOR;
    let desc_sectors = descriptor_sectors(count);
    if desc_sectors > sectors {
        return None;
    }
    // CRC over the whole entry with its checksum field zero.
    let mut crc = crc32c::crc32c(&first[..CHECKSUM_AT]);
    crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc = crc32c::crc32c_append(crc, &first[CHECKSUM_AT + 4..]);
    for i in 1..sectors {
        crc = crc32c::crc32c_append(crc, sector(log, at, i));
    }
    if crc != le::u32(first, CHECKSUM_AT) {
        return None;
    }
    let mut data_index = desc_sectors;
    for k in 0..count {
        let d = desc_bytes(log, at, 64 + k * DESCRIPTOR_SIZE, DESCRIPTOR_SIZE);
        if le::u64(&d, 24) != sequence || le::u64(&d, 16) % LOG_SECTOR as u64 != 0 {
            return None;
        }
        match &d[..4] {
            s if s == ZERO_SIGNATURE => {
                if le::u64(&d, 8) % LOG_SECTOR as u64 != 0 {
                    return None;
                }
            }
            s if s == DESC_SIGNATURE => {
                if data_index >= sectors {
                    return None;
                }
                let data = sector(log, at, data_index);
                let seq = (u64::from(le::u32(data, 4)) << 32) | u64::from(le::u32(data, 4092));
                if &data[..4] != DATA_SIGNATURE || seq != sequence {
                    return None;
                }
                data_index += 1;
            }
            _ => return None,
        }
    }
    Some(Entry {
        sequence,
        length,
        tail,
        flushed_file_offset: le::u64(first, 48),
        last_file_offset: le::u64(first, 56),
    })
}

/// Adds the writes of the (validated) entry at `at`, in descriptor order.
fn collect_writes(log: &[u8], at: usize, writes: &mut Vec<OverlayWrite>) {
    let first = sector(log, at, 0);
    let count = usize::try_from(le::u32(first, 24)).unwrap_or(0);
    let mut data_index = descriptor_sectors(count);
    for k in 0..count {
        let d = desc_bytes(log, at, 64 + k * DESCRIPTOR_SIZE, DESCRIPTOR_SIZE);
        let offset = le::u64(&d, 16);
        if &d[..4] == ZERO_SIGNATURE {
            writes.push(OverlayWrite::Zeros {
                offset,
                len: le::u64(&d, 8),
            });
        } else {
            // A data sector carries 4084 bytes; its first 8 and last 4 bytes sit in the
            // descriptor (LeadingBytes, TrailingBytes), where the sector has signature and
            // sequence number halves.
            let s = sector(log, at, data_index);
            let mut data = Vec::with_capacity(LOG_SECTOR);
            data.extend_from_slice(&d[8..16]);
            data.extend_from_slice(&s[8..4092]);
            data.extend_from_slice(&d[4..8]);
            writes.push(OverlayWrite::Sector {
                offset,
                data: data.into_boxed_slice(),
            });
            data_index += 1;
        }
    }
}

/// Finds the active sequence (MS-VHDX 2.3.3): the chain of consecutive valid entries with
/// increasing sequence numbers whose last entry (the head) has the highest sequence
/// number and whose head's tail points into the chain. Returns the entries from the tail
/// to the head, in order.
fn find_active(log: &[u8], log_guid: &Guid) -> std::result::Result<Option<Vec<usize>>, String> {
    let sectors = log.len() / LOG_SECTOR;
    // Each sector offset is validated once. The CRC work is bounded: an entry is at most
    // the log's length, and we stop paying once more than a few logs' worth was summed
    // (real logs hold non-overlapping entries, so they never come close): past that the
    // log is refused rather than replayed from a guess.
    let mut budget = log.len().saturating_mul(8);
    let mut entries: Vec<Option<Entry>> = Vec::with_capacity(sectors);
    for s in 0..sectors {
        let at = s * LOG_SECTOR;
        let head = sector(log, at, 0);
        let plausible = &head[..4] == ENTRY_SIGNATURE && head[32..48] == log_guid[..];
        let claimed = usize::try_from(le::u32(head, 8))
            .unwrap_or(usize::MAX)
            .min(log.len());
        if !plausible {
            entries.push(None);
            continue;
        }
        if claimed > budget {
            return Err("more overlapping entry headers than a log can hold".into());
        }
        budget -= claimed;
        entries.push(parse(log, at, log_guid));
    }
    let mut best: Option<(u64, Vec<usize>)> = None;
    for start in 0..sectors {
        let Some(mut prev) = entries[start] else {
            continue;
        };
        let mut chain = vec![start * LOG_SECTOR];
        let mut at = start * LOG_SECTOR;
        while chain.len() < sectors {
            at = (at + prev.length) % log.len();
            match entries[at / LOG_SECTOR] {
                Some(e) if Some(e.sequence) == prev.sequence.checked_add(1) => {
                    chain.push(at);
                    prev = e;
                }
                _ => break,
            }
        }
        let Some(from) = chain.iter().position(|&a| a == prev.tail) else {
            continue;
        };
        if best.as_ref().is_none_or(|(seq, _)| prev.sequence > *seq) {
            best = Some((prev.sequence, chain.split_off(from)));
        }
    }
    Ok(best.map(|(_, chain)| chain))
}

/// Encodes one log entry (for tests and tools): `writes` of whole 4 KiB sectors or zero
/// ranges at file offsets, with `sequence` and `tail`.
#[cfg(test)]
pub(crate) fn encode_entry(
    log_guid: &Guid,
    sequence: u64,
    tail: u32,
    file_len: u64,
    writes: &[OverlayWrite],
) -> Vec<u8> {
    let count = writes.len();
    let desc_sectors = descriptor_sectors(count);
    let data_count = writes
        .iter()
        .filter(|w| matches!(w, OverlayWrite::Sector { .. }))
        .count();
    let mut b = vec![0u8; (desc_sectors + data_count) * LOG_SECTOR];
    b[..4].copy_from_slice(ENTRY_SIGNATURE);
    let len = u32::try_from(b.len()).unwrap_or(0);
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..16].copy_from_slice(&tail.to_le_bytes());
    b[16..24].copy_from_slice(&sequence.to_le_bytes());
    b[24..28].copy_from_slice(&u32::try_from(count).unwrap_or(0).to_le_bytes());
    b[32..48].copy_from_slice(log_guid);
    b[48..56].copy_from_slice(&file_len.to_le_bytes());
    b[56..64].copy_from_slice(&file_len.to_le_bytes());
    let mut data_at = desc_sectors * LOG_SECTOR;
    for (k, w) in writes.iter().enumerate() {
        let d = 64 + k * DESCRIPTOR_SIZE;
        match w {
            OverlayWrite::Zeros { offset, len } => {
                b[d..d + 4].copy_from_slice(ZERO_SIGNATURE);
                b[d + 8..d + 16].copy_from_slice(&len.to_le_bytes());
                b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
            }
            OverlayWrite::Sector { offset, data } => {
                b[d..d + 4].copy_from_slice(DESC_SIGNATURE);
                b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
                b[d + 8..d + 16].copy_from_slice(&data[..8]);
                b[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
                let s = &mut b[data_at..data_at + LOG_SECTOR];
                s[..4].copy_from_slice(DATA_SIGNATURE);
                s[4..8].copy_from_slice(&u32::try_from(sequence >> 32).unwrap_or(0).to_le_bytes());
                s[8..4092].copy_from_slice(&data[8..4092]);
                s[4092..].copy_from_slice(
                    &u32::try_from(sequence & 0xffff_ffff)
                        .unwrap_or(0)
                        .to_le_bytes(),
                );
                data_at += LOG_SECTOR;
            }
        }
        b[d + 24..d + 32].copy_from_slice(&sequence.to_le_bytes());
    }
    let crc = super::header::checksum(&b);
    b[CHECKSUM_AT..CHECKSUM_AT + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const G: Guid = [5; 16];

    fn sector_of(v: u8) -> OverlayWrite {
        let mut data = vec![v; LOG_SECTOR];
        data[0] = 0xA1;
        data[4095] = 0xB2;
        OverlayWrite::Sector {
            offset: 8192,
            data: data.into_boxed_slice(),
        }
    }

    fn log_with(entries: &[(usize, Vec<u8>)]) -> Vec<u8> {
        let mut log = vec![0u8; MIB as usize];
        for (at, e) in entries {
            log[*at..*at + e.len()].copy_from_slice(e);
        }
        log
    }

    #[test]
    fn finds_the_sequence_from_the_heads_tail() {
        // Entries at 0 (seq 4), 8 KiB (seq 5), 16 KiB (seq 6, tail at 8 KiB); a stale
        // entry with seq 2 further on.
        let e4 = encode_entry(&G, 4, 0, 0, &[sector_of(1)]);
        let e5 = encode_entry(&G, 5, 0, 0, &[sector_of(2)]);
        let e6 = encode_entry(
            &G,
            6,
            8192,
            0,
            &[OverlayWrite::Zeros {
                offset: 0,
                len: 4096,
            }],
        );
        let stale = encode_entry(&G, 2, 65536, 0, &[sector_of(9)]);
        let log = log_with(&[(0, e4), (8192, e5), (16384, e6), (65536, stale)]);
        assert_eq!(find_active(&log, &G), Ok(Some(vec![8192, 16384])));
        let mut writes = Vec::new();
        collect_writes(&log, 8192, &mut writes);
        let OverlayWrite::Sector { data, offset } = &writes[0] else {
            panic!()
        };
        assert_eq!(
            (*offset, data[0], data[1], data[4094], data[4095]),
            (8192, 0xA1, 2, 2, 0xB2)
        );
    }

    #[test]
    fn rejects_bad_crc_wrong_guid_and_broken_sequences() {
        let mut e = encode_entry(&G, 3, 0, 0, &[sector_of(1)]);
        assert!(
            find_active(&log_with(&[(0, e.clone())]), &G)
                .unwrap()
                .is_some()
        );
        assert!(
            find_active(&log_with(&[(0, e.clone())]), &[6; 16])
                .unwrap()
                .is_none()
        );
        e[5000] ^= 1;
        assert!(find_active(&log_with(&[(0, e)]), &G).unwrap().is_none());
        // The head's tail points outside its chain.
        let e = encode_entry(&G, 3, 65536, 0, &[sector_of(1)]);
        assert!(find_active(&log_with(&[(0, e)]), &G).unwrap().is_none());
    }

    #[test]
    fn entries_wrap_around_the_circular_log() {
        let e = encode_entry(&G, 7, (MIB as u32) - 4096, 0, &[sector_of(3)]);
        let mut log = vec![0u8; MIB as usize];
        let at = MIB as usize - 4096;
        log[at..].copy_from_slice(&e[..4096]);
        log[..4096].copy_from_slice(&e[4096..]);
        assert_eq!(find_active(&log, &G), Ok(Some(vec![at])));
    }

    #[test]
    fn a_log_of_overlapping_whole_log_entries_is_refused() {
        // Every sector claims to start a log-long entry: summing them all would cost
        // 256 MiB of CRC for a 1 MiB log.
        let mut log = vec![0u8; MIB as usize];
        for at in (0..log.len()).step_by(LOG_SECTOR) {
            log[at..at + 4].copy_from_slice(ENTRY_SIGNATURE);
            log[at + 8..at + 12].copy_from_slice(&(MIB as u32).to_le_bytes());
            log[at + 32..at + 48].copy_from_slice(&G);
        }
        assert!(find_active(&log, &G).is_err());
    }
}
