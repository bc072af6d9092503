//! The file type identifier and the two headers (MS-VHDX 2.2.1, 2.2.2).

use super::KIB;
use super::guid::Guid;
use crate::error::{Error, Result};
use crate::io::{ImageFile, le};

/// File type identifier signature at offset 0 (MS-VHDX 2.2.1).
pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Header signature, "head" (MS-VHDX 2.2.2).
pub(crate) const HEADER_SIGNATURE: &[u8; 4] = b"head";
/// The two header copies, at 64 KiB and 128 KiB.
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// Each header's checksummed size: 4 KiB.
pub(crate) const HEADER_SIZE: usize = 4096;
/// The only header version defined (MS-VHDX 2.2.2, `Version`).
pub(crate) const HEADER_VERSION: u16 = 1;
/// The only log version defined (MS-VHDX 2.2.2, `LogVersion`).
pub(crate) const LOG_VERSION: u16 = 0;
/// Offset of the CRC-32C field in headers, region tables and log entries.
pub(crate) const CHECKSUM_AT: usize = 4;

/// One header's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    /// Higher is newer; the reader uses the valid header with the highest.
    pub sequence: u64,
    /// Changes whenever the file is opened for writing.
    pub file_write_guid: Guid,
    /// Changes whenever the virtual disk's content changes: what children link to.
    pub data_write_guid: Guid,
    /// Non-zero when the log holds entries to replay.
    pub log_guid: Guid,
    /// Log format version (0).
    pub log_version: u16,
    /// Header version (1).
    pub version: u16,
    /// Log size in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Log file offset (a multiple of 1 MiB).
    pub log_offset: u64,
}

/// CRC-32C of `buf` with its 4-byte checksum field at [`CHECKSUM_AT`] taken as zero.
pub(crate) fn checksum(buf: &[u8]) -> u32 {
    let Some((head, rest)) = buf.split_at_checked(CHECKSUM_AT) else {
        return crc32c::crc32c(buf);
    };
    let Some((_, rest)) = rest.split_at_checked(4) else {
        return crc32c::crc32c(buf);
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(head), &[0; 4]);
    crc32c::crc32c_append(crc, rest)
}

/// Writes `checksum(buf)` into its field.
pub(crate) fn seal(buf: &mut [u8]) {
    let crc = checksum(buf);
    if let Some(field) = buf.get_mut(CHECKSUM_AT..CHECKSUM_AT + 4) {
        field.copy_from_slice(&crc.to_le_bytes());
    }
}

fn guid_at(buf: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&buf[at..at + 16]);
    g
}

impl Header {
    /// Parses one header copy, or says why it is not valid.
    pub(crate) fn parse(buf: &[u8; HEADER_SIZE]) -> std::result::Result<Self, String> {
        if &buf[..4] != HEADER_SIGNATURE {
            return Err("no \"head\" signature".into());
        }
        let stored = le::u32(buf, CHECKSUM_AT);
        let computed = checksum(buf);
        if stored != computed {
            return Err(format!(
                "checksum {stored:#010x}, computed {computed:#010x}"
            ));
        }
        Ok(Self {
            sequence: le::u64(buf, 8),
            file_write_guid: guid_at(buf, 16),
            data_write_guid: guid_at(buf, 32),
            log_guid: guid_at(buf, 48),
            log_version: le::u16(buf, 64),
            version: le::u16(buf, 66),
            log_length: le::u32(buf, 68),
            log_offset: le::u64(buf, 72),
        })
    }

    /// The 4 KiB on-disk form, checksummed.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[..4].copy_from_slice(HEADER_SIGNATURE);
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        b[64..66].copy_from_slice(&self.log_version.to_le_bytes());
        b[66..68].copy_from_slice(&self.version.to_le_bytes());
        b[68..72].copy_from_slice(&self.log_length.to_le_bytes());
        b[72..80].copy_from_slice(&self.log_offset.to_le_bytes());
        seal(&mut b);
        b
    }
}

/// The file type identifier: signature and a UTF-16LE creator string (MS-VHDX 2.2.1).
pub(crate) fn file_identifier(creator: &str) -> Vec<u8> {
    let mut b = vec![0u8; 64 * 1024];
    b[..8].copy_from_slice(FILE_SIGNATURE);
    for (i, unit) in creator.encode_utf16().take(255).enumerate() {
        b[8 + 2 * i..10 + 2 * i].copy_from_slice(&unit.to_le_bytes());
    }
    b
}

/// Checks the signature and returns the current header: the valid copy with the highest
/// sequence number. A bad copy beside a good one is only a warning (a torn header update).
pub(crate) fn read_current(file: &ImageFile, warnings: &mut Vec<String>) -> Result<Header> {
    let sig: [u8; 8] = file.read_array(0, "VHDX file type identifier")?;
    if &sig != FILE_SIGNATURE {
        return Err(Error::corrupt(
            file.name(),
            "VHDX file type identifier",
            0,
            "no \"vhdxfile\" signature",
        ));
    }
    let mut best: Option<Header> = None;
    let mut reasons = Vec::new();
    for at in HEADER_OFFSETS {
        let buf: [u8; HEADER_SIZE] = file.read_array(at, "VHDX header")?;
        match Header::parse(&buf) {
            Ok(h) => {
                if best.as_ref().is_none_or(|b| h.sequence > b.sequence) {
                    best = Some(h);
                }
            }
            Err(reason) => reasons.push(format!("header at {at}: {reason}")),
        }
    }
    let Some(header) = best else {
        return Err(Error::corrupt(
            file.name(),
            "VHDX header",
            HEADER_OFFSETS[0],
            format!("neither header copy is valid ({})", reasons.join("; ")),
        ));
    };
    warnings.extend(reasons.into_iter().map(|r| format!("ignored invalid {r}")));
    if header.version != HEADER_VERSION {
        return Err(Error::unsupported(
            file.name(),
            format!("VHDX header version {}", header.version),
        ));
    }
    if header.log_version != LOG_VERSION {
        return Err(Error::unsupported(
            file.name(),
            format!("VHDX log version {}", header.log_version),
        ));
    }
    Ok(header)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn header(seq: u64) -> Header {
        Header {
            sequence: seq,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        }
    }

    fn image(h1: Vec<u8>, h2: Vec<u8>) -> ImageFile {
        let mut b = file_identifier("t");
        b.resize(192 * 1024, 0);
        b[64 * 1024..68 * 1024].copy_from_slice(&h1);
        b[128 * 1024..132 * 1024].copy_from_slice(&h2);
        ImageFile::from_bytes("t.vhdx", b)
    }

    #[test]
    fn picks_the_valid_header_with_the_highest_sequence() {
        let mut w = Vec::new();
        let h = read_current(&image(header(5).encode(), header(4).encode()), &mut w).unwrap();
        assert_eq!(h.sequence, 5);
        let mut torn = header(9).encode();
        torn[100] ^= 1;
        let h = read_current(&image(header(5).encode(), torn), &mut w).unwrap();
        assert_eq!(h.sequence, 5);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn refuses_two_bad_headers_and_bad_signature() {
        let mut a = header(1).encode();
        a[8] ^= 1;
        let mut b = header(2).encode();
        b[0] = b'x';
        let err = read_current(&image(a, b), &mut Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Corrupt {
                    structure: "VHDX header",
                    ..
                }
            ),
            "{err}"
        );
        let err = read_current(
            &ImageFile::from_bytes("t", vec![0u8; 300_000]),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        let err = read_current(
            &ImageFile::from_bytes("t", b"vhdxfile".to_vec()),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }), "{err}");
    }

    #[test]
    fn refuses_unknown_versions() {
        let mut h = header(1);
        h.version = 2;
        let err = read_current(&image(h.encode(), h.encode()), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    }
}
