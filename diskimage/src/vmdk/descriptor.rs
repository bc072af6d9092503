//! The VMDK text descriptor ("Virtual Disk Format 1.1", section "The Descriptor File"):
//! identity (`CID`, `parentCID`), `createType`, the parent hint and the extent lines.
//! The Disk Database (`ddb.*`) lines are ignored.

use crate::error::{Error, Result};

/// Largest descriptor we parse: real ones are well under 4 KiB.
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;
/// Most extent lines we accept (a 62 TiB disk in 2 GiB pieces has about 32,000, but
/// hosted split disks top out at 2 TiB, i.e. 1,024 extents).
pub const MAX_EXTENTS: usize = 10_000;
/// `parentCID` meaning "no parent".
pub const NO_PARENT_CID: u32 = 0xffff_ffff;

/// How an extent may be accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `RW`.
    ReadWrite,
    /// `RDONLY`.
    ReadOnly,
    /// `NOACCESS`.
    Denied,
}

/// What kind of extent a line describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentType {
    /// `SPARSE`: a hosted sparse extent (KDMV).
    Sparse,
    /// `FLAT` or `VMFS`: the sectors as they are, from an offset of a file.
    Flat,
    /// `ZERO`: reads as zeros, no file.
    Zero,
    /// Another type we recognise but do not read (`VMFSSPARSE`, `SESPARSE`, `VMFSRDM`, …).
    Other(&'static str),
}

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// Access mode.
    pub access: Access,
    /// Size in sectors.
    pub sectors: u64,
    /// Type.
    pub kind: ExtentType,
    /// File name, relative to the descriptor (none for `ZERO`).
    pub file: Option<String>,
    /// Offset in sectors within the file (flat extents).
    pub offset: u64,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `CID`: this image's content id.
    pub cid: Option<u32>,
    /// `parentCID`, `None` when absent or `ffffffff`.
    pub parent_cid: Option<u32>,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`.
    pub parent_hint: Option<String>,
    /// The extents, in disk order.
    pub extents: Vec<ExtentLine>,
}

impl Descriptor {
    /// Parses descriptor text (NUL padding already cut off). `file` and `offset` name it in errors.
    pub fn parse(text: &[u8], file: &str, offset: u64) -> Result<Self> {
        let bad = |reason: String| Error::corrupt(file, "VMDK descriptor", offset, reason);
        if text.len() as u64 > MAX_DESCRIPTOR_BYTES {
            return Err(bad(format!(
                "{} bytes is larger than the {MAX_DESCRIPTOR_BYTES} we accept",
                text.len()
            )));
        }
        let text = String::from_utf8_lossy(text);
        let mut d = Descriptor::default();
        for (number, raw_line) in text.lines().enumerate() {
            let line = raw_line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let first = line.split_whitespace().next().unwrap_or("");
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(bad(format!("more than {MAX_EXTENTS} extents")));
                }
                let extent = parse_extent(line)
                    .map_err(|why| bad(format!("line {}: {why}: {line:?}", number + 1)))?;
                d.extents.push(extent);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), unquote(value.trim()));
            match key {
                "CID" => {
                    d.cid = Some(
                        parse_cid(value)
                            .ok_or_else(|| bad(format!("CID {value:?} is not hexadecimal")))?,
                    )
                }
                "parentCID" => {
                    let cid = parse_cid(value)
                        .ok_or_else(|| bad(format!("parentCID {value:?} is not hexadecimal")))?;
                    d.parent_cid = (cid != NO_PARENT_CID).then_some(cid);
                }
                "createType" => d.create_type = value.to_owned(),
                "parentFileNameHint" => d.parent_hint = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(d)
    }

    /// The total size of the extents in sectors.
    #[cfg(test)]
    pub fn total_sectors(&self) -> Option<u64> {
        self.extents
            .iter()
            .try_fold(0u64, |acc, e| acc.checked_add(e.sectors))
    }
}

fn parse_cid(value: &str) -> Option<u32> {
    u32::from_str_radix(value, 16).ok()
}

fn unquote(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

/// Parses `ACCESS SECTORS TYPE ["file" [offset]]`. The file name is quoted and may hold spaces.
fn parse_extent(line: &str) -> std::result::Result<ExtentLine, String> {
    let (head, rest) = match line.find('"') {
        Some(q) => (&line[..q], Some(&line[q + 1..])),
        None => (line, None),
    };
    let mut fields = head.split_whitespace();
    let access = match fields.next() {
        Some("RW") => Access::ReadWrite,
        Some("RDONLY") => Access::ReadOnly,
        _ => Access::Denied,
    };
    let sectors = fields
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or("the size is not a number of sectors")?;
    let kind = match fields.next() {
        Some("SPARSE") => ExtentType::Sparse,
        Some("FLAT" | "VMFS") => ExtentType::Flat,
        Some("ZERO") => ExtentType::Zero,
        Some("VMFSSPARSE") => ExtentType::Other("VMFSSPARSE"),
        Some("SESPARSE") => ExtentType::Other("SESPARSE"),
        Some("VMFSRDM") => ExtentType::Other("VMFSRDM"),
        Some("VMFSRAW") => ExtentType::Other("VMFSRAW"),
        Some(_) => ExtentType::Other("unknown"),
        None => return Err("no extent type".into()),
    };
    let (file, offset) = match rest {
        Some(rest) => {
            let end = rest
                .find('"')
                .ok_or("the file name's quote is not closed")?;
            let offset = match rest[end + 1..].split_whitespace().next() {
                Some(o) => o
                    .parse::<u64>()
                    .map_err(|_| "the offset is not a number of sectors")?,
                None => 0,
            };
            (Some(rest[..end].to_owned()), offset)
        }
        None => (None, 0),
    };
    if file.is_none() && kind != ExtentType::Zero {
        return Err("no file name".into());
    }
    Ok(ExtentLine {
        access,
        sectors,
        kind,
        file,
        offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_qemu_and_vmware_write() {
        let text = b"# Disk DescriptorFile\nversion=1\nCID=33375bb3\nparentCID=ffffffff\n\
            createType=\"twoGbMaxExtentFlat\"\n\n# Extent description\n\
            RW 4192256 FLAT \"my disk-f001.vmdk\" 0\nRDONLY 100 VMFS \"b.vmdk\" 7\nRW 8 ZERO\n\
            \n# The Disk Data Base\nddb.adapterType = \"ide\"\n";
        let d = Descriptor::parse(text, "d", 0).unwrap();
        assert_eq!(d.cid, Some(0x3337_5bb3));
        assert_eq!(d.parent_cid, None);
        assert_eq!(d.create_type, "twoGbMaxExtentFlat");
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[0].file.as_deref(), Some("my disk-f001.vmdk"));
        assert_eq!(
            (d.extents[1].access, d.extents[1].kind, d.extents[1].offset),
            (Access::ReadOnly, ExtentType::Flat, 7)
        );
        assert_eq!(
            (d.extents[2].kind, d.extents[2].file.as_deref()),
            (ExtentType::Zero, None)
        );
        assert_eq!(d.total_sectors(), Some(4_192_364));

        let child = b"CID=0000000a\nparentCID=12345678\nparentFileNameHint=\"C:\\vms\\base.vmdk\"\ncreateType=\"monolithicSparse\"\nRW 10 SPARSE \"c.vmdk\"\n";
        let d = Descriptor::parse(child, "d", 0).unwrap();
        assert_eq!((d.cid, d.parent_cid), (Some(10), Some(0x1234_5678)));
        assert_eq!(d.parent_hint.as_deref(), Some("C:\\vms\\base.vmdk"));
    }

    #[test]
    fn rejects_bad_lines_and_bounds() {
        for bad in [
            &b"RW x SPARSE \"a\"\n"[..],
            b"RW 10 SPARSE \"a\n",
            b"RW 10 FLAT\n",
            b"RW 10 FLAT \"a\" -3\n",
            b"CID=zz\n",
        ] {
            assert!(
                Descriptor::parse(bad, "d", 0).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let many = "RW 1 ZERO\n".repeat(MAX_EXTENTS + 1);
        assert!(
            Descriptor::parse(many.as_bytes(), "d", 0)
                .unwrap_err()
                .to_string()
                .contains("extents")
        );
        let huge = vec![b'#'; 2 << 20];
        assert!(Descriptor::parse(&huge, "d", 0).is_err());
        let sum = "RW 18446744073709551615 ZERO\nRW 2 ZERO\n";
        assert_eq!(
            Descriptor::parse(sum.as_bytes(), "d", 0)
                .unwrap()
                .total_sectors(),
            None
        );
    }
}
