//! Where a differencing VHD says its parent is: the parent locators' paths and the parent
//! unicode name, decoded into the candidate paths a [`crate::Disk`] tries in order.

use crate::error::{Error, Result};
use crate::io::ImageFile;

use super::dynamic_header::{DynamicHeader, Locator, Platform};

/// The longest locator path we read. Windows paths are at most 32 Ki UTF-16 units; a
/// larger length is a lie that would otherwise make us allocate what the file says.
pub const MAX_LOCATOR_BYTES: u32 = 64 << 10;

/// The order the platforms are tried in: relative before absolute (a chain copied
/// elsewhere keeps its relative paths valid), Unicode before the deprecated ASCII forms.
const PREFERENCE: [Platform; 5] = [
    Platform::W2ru,
    Platform::W2ku,
    Platform::Wi2r,
    Platform::Wi2k,
    Platform::MacX,
];

/// The candidate parent paths of a differencing disk: locator paths in [`PREFERENCE`]
/// order, then the parent unicode name, then the bare file names of all of them.
pub fn parent_candidates(file: &ImageFile, header: &DynamicHeader) -> Result<Vec<String>> {
    let mut candidates = Vec::new();
    for platform in PREFERENCE {
        for locator in header.locators.iter().filter(|l| l.platform == platform) {
            if let Some(path) = read_locator(file, locator)? {
                push_unique(&mut candidates, path);
            }
        }
    }
    if let Some(name) = decode_utf16(&header.parent_name, u16::from_be_bytes) {
        push_unique(&mut candidates, normalise_windows(&name));
    }
    let names: Vec<String> = candidates.iter().filter_map(|c| base_name(c)).collect();
    for name in names {
        push_unique(&mut candidates, name);
    }
    Ok(candidates)
}

fn push_unique(list: &mut Vec<String>, item: String) {
    if !item.is_empty() && !list.contains(&item) {
        list.push(item);
    }
}

/// Reads and decodes one locator's path; `None` for an empty or undecodable one.
fn read_locator(file: &ImageFile, locator: &Locator) -> Result<Option<String>> {
    if locator.data_length == 0 {
        return Ok(None);
    }
    let entry = "VHD parent locator";
    if locator.data_length > MAX_LOCATOR_BYTES {
        return Err(Error::corrupt(
            file.name(),
            entry,
            locator.data_offset,
            format!(
                "path length {} exceeds {MAX_LOCATOR_BYTES} bytes",
                locator.data_length
            ),
        ));
    }
    let len = usize::try_from(locator.data_length).unwrap_or(usize::MAX);
    let end = locator
        .data_offset
        .checked_add(u64::from(locator.data_length));
    if end.is_none_or(|end| end > file.len()) {
        return Err(Error::corrupt(
            file.name(),
            entry,
            locator.data_offset,
            format!(
                "{} bytes of path run past the end of the file ({} bytes)",
                locator.data_length,
                file.len()
            ),
        ));
    }
    let bytes = file.read_vec(len, locator.data_offset, entry)?;
    let text = match locator.platform {
        Platform::W2ru | Platform::W2ku => decode_utf16(&bytes, u16::from_le_bytes),
        Platform::Wi2r | Platform::Wi2k => trim_nuls(&String::from_utf8_lossy(&bytes)),
        Platform::MacX => {
            trim_nuls(&String::from_utf8_lossy(&bytes)).map(|url| file_url_path(&url))
        }
        Platform::Mac => None,
    };
    Ok(text.map(|t| match locator.platform {
        Platform::MacX => t,
        _ => normalise_windows(&t),
    }))
}

/// Decodes UTF-16 up to the first NUL; `None` if empty.
fn decode_utf16(bytes: &[u8], unit: fn([u8; 2]) -> u16) -> Option<String> {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| unit([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    trim_nuls(&String::from_utf16_lossy(&units))
}

fn trim_nuls(s: &str) -> Option<String> {
    let s = s.split('\0').next().unwrap_or("").trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// `.\x.vhd` → `x.vhd`, `..\a\x.vhd` → `../a/x.vhd`, `C:\a\x.vhd` → `C:/a/x.vhd`.
pub fn normalise_windows(path: &str) -> String {
    let slashed = path.replace('\\', "/");
    let mut rest = slashed.as_str();
    while let Some(stripped) = rest.strip_prefix("./") {
        rest = stripped;
    }
    rest.to_owned()
}

/// The path of a `file://` URL (`file://localhost/a%20b/x.vhd` → `/a b/x.vhd`).
fn file_url_path(url: &str) -> String {
    let Some(rest) = url.strip_prefix("file://") else {
        return url.to_owned();
    };
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    percent_decode(path)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last component of a `/`-separated path, if it is not the path itself.
fn base_name(path: &str) -> Option<String> {
    let name = path.rsplit('/').next()?;
    (!name.is_empty() && name != path).then(|| name.to_owned())
}

/// Encodes a path for a `W2ru`/`W2ku` locator: `\` separators, UTF-16LE, no terminator.
pub fn encode_windows_utf16le(path: &str) -> Vec<u8> {
    path.replace('/', "\\")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhd::dynamic_header::PARENT_NAME_SIZE;

    fn header_with(locators: Vec<Locator>, name: &str) -> DynamicHeader {
        let mut parent_name = [0u8; PARENT_NAME_SIZE];
        for (i, u) in name.encode_utf16().enumerate() {
            parent_name[2 * i..2 * i + 2].copy_from_slice(&u.to_be_bytes());
        }
        DynamicHeader {
            table_offset: 0,
            version: 0,
            max_table_entries: 0,
            block_size: 0,
            parent_unique_id: [0; 16],
            parent_timestamp: 0,
            parent_name,
            locators,
        }
    }

    fn loc(platform: Platform, data_offset: u64, data_length: u32) -> Locator {
        Locator {
            platform,
            data_space: 512,
            data_length,
            data_offset,
        }
    }

    #[test]
    fn candidates_follow_the_preferred_order() {
        let mut bytes = vec![0u8; 4096];
        let abs = encode_windows_utf16le("C:/vms/base.vhd");
        bytes[512..512 + abs.len()].copy_from_slice(&abs);
        let rel = encode_windows_utf16le(".\\base.vhd");
        bytes[1024..1024 + rel.len()].copy_from_slice(&rel);
        let mac = b"file://localhost/Users/me/My%20VMs/base.vhd";
        bytes[1536..1536 + mac.len()].copy_from_slice(mac);
        let ascii = b"..\\old\\base.vhd\0\0";
        bytes[2048..2048 + ascii.len()].copy_from_slice(ascii);
        let file = ImageFile::from_bytes("child.vhd", bytes);
        let header = header_with(
            vec![
                loc(Platform::MacX, 1536, u32::try_from(mac.len()).unwrap()),
                loc(Platform::W2ku, 512, u32::try_from(abs.len()).unwrap()),
                loc(Platform::Wi2r, 2048, 17),
                loc(Platform::W2ru, 1024, u32::try_from(rel.len()).unwrap()),
                loc(Platform::Mac, 3000, 10),
            ],
            "base.vhd",
        );
        assert_eq!(
            parent_candidates(&file, &header).unwrap(),
            vec![
                "base.vhd",
                "C:/vms/base.vhd",
                "../old/base.vhd",
                "/Users/me/My VMs/base.vhd"
            ]
        );
    }

    #[test]
    fn lying_locators_are_refused() {
        let file = ImageFile::from_bytes("child.vhd", vec![0u8; 1024]);
        let past_end = header_with(vec![loc(Platform::W2ku, 1000, 100)], "");
        let err = parent_candidates(&file, &past_end).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        let huge = header_with(vec![loc(Platform::W2ku, 0, u32::MAX)], "");
        assert!(
            parent_candidates(&file, &huge)
                .unwrap_err()
                .to_string()
                .contains("exceeds")
        );
        let wrapping = header_with(vec![loc(Platform::W2ku, u64::MAX - 2, 10)], "");
        assert!(parent_candidates(&file, &wrapping).is_err());
    }

    #[test]
    fn name_only_parent_and_base_names() {
        let file = ImageFile::from_bytes("child.vhd", vec![0u8; 1024]);
        let header = header_with(vec![], "dir\\p.vhd");
        assert_eq!(
            parent_candidates(&file, &header).unwrap(),
            vec!["dir/p.vhd", "p.vhd"]
        );
        assert!(
            parent_candidates(&file, &header_with(vec![], ""))
                .unwrap()
                .is_empty()
        );
    }
}
