//! OVA archives: a POSIX tar whose first member is the OVF descriptor, then its manifest
//! (`.mf`, the SHA-256 of every other member), then the files in the order the
//! descriptor's References list them — the order OVF 1.1 (DSP0243 §5.3) requires so a
//! deployment can stream the archive once, front to back.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What was packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The archive's size.
    pub bytes: u64,
    /// `(member, SHA-256 hex)` of the descriptor and each file, as the `.mf` lists them.
    pub digests: Vec<(String, String)>,
}

/// Writes the OVA `out`: the descriptor (named `descriptor_name`), its `.mf`, then `files`
/// (`(name in the archive, local path)`, in the descriptor's References order). Members
/// carry a fixed time and owner so the same inputs give the same archive.
pub fn write(
    out: &Path,
    descriptor_name: &str,
    descriptor: &str,
    files: &[(String, PathBuf)],
) -> Result<Packed> {
    let write_err = |source| Error::Write {
        path: out.display().to_string(),
        source,
    };
    if !descriptor_name.ends_with(".ovf") {
        return Err(Error::Ova {
            path: out.display().to_string(),
            detail: format!("the descriptor's name {descriptor_name:?} must end in .ovf"),
        });
    }
    let mut digests = vec![(
        descriptor_name.to_owned(),
        hex::encode(Sha256::digest(descriptor.as_bytes())),
    )];
    for (name, path) in files {
        digests.push((name.clone(), sha256_file(path)?));
    }
    let mf: String = digests
        .iter()
        .map(|(name, digest)| format!("SHA256({name})= {digest}\n"))
        .collect();
    let mf_name = format!("{}.mf", descriptor_name.trim_end_matches(".ovf"));

    let file = File::create(out).map_err(write_err)?;
    let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    tar.mode(tar::HeaderMode::Deterministic);
    append(
        &mut tar,
        descriptor_name,
        descriptor.len() as u64,
        descriptor.as_bytes(),
    )
    .map_err(write_err)?;
    append(&mut tar, &mf_name, mf.len() as u64, mf.as_bytes()).map_err(write_err)?;
    for (name, path) in files {
        let member = File::open(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        let len = member
            .metadata()
            .map_err(|source| Error::Read {
                path: path.display().to_string(),
                source,
            })?
            .len();
        append(&mut tar, name, len, member).map_err(write_err)?;
    }
    let mut inner = tar.into_inner().map_err(write_err)?;
    inner.flush().map_err(write_err)?;
    let bytes = inner.get_ref().metadata().map_err(write_err)?.len();
    Ok(Packed { bytes, digests })
}

fn append<W: Write, R: Read>(
    tar: &mut tar::Builder<W>,
    name: &str,
    len: u64,
    data: R,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(len);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(0);
    tar.append_data(&mut header, name, data)
}

/// The SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let read_err = |source| Error::Read {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// One member of an OVA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Where its bytes start in the archive.
    pub offset: u64,
    pub size: u64,
}

/// An OVA opened for reading: its descriptor, its manifest's digests and where each
/// member's bytes are, so a deployment streams them without unpacking.
#[derive(Debug)]
pub struct Ova {
    path: PathBuf,
    descriptor_name: String,
    descriptor: String,
    digests: BTreeMap<String, String>,
    members: Vec<Member>,
}

/// The largest descriptor or manifest read into memory.
const MAX_TEXT_MEMBER: u64 = 16 << 20;

impl Ova {
    /// Reads the archive's table: the descriptor (first member), the `.mf` if any, and the
    /// other members' positions.
    pub fn open(path: &Path) -> Result<Ova> {
        let bad = |detail: String| Error::Ova {
            path: path.display().to_string(),
            detail,
        };
        let file = File::open(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut archive = tar::Archive::new(file);
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("not a tar archive: {e}")))?;
        let mut descriptor: Option<(String, String)> = None;
        let mut manifest_text = None;
        let mut members = Vec::new();
        for (index, entry) in entries.enumerate() {
            let mut entry = entry.map_err(|e| bad(format!("member {index}: {e}")))?;
            let name = entry
                .path()
                .map_err(|e| bad(format!("member {index}: {e}")))?
                .to_string_lossy()
                .into_owned();
            if name.contains('/') || name.starts_with('.') {
                return Err(bad(format!("member {name:?} is not a plain file name")));
            }
            let size = entry.size();
            let offset = entry.raw_file_position();
            let read_text = |entry: &mut tar::Entry<'_, File>, what: &str| {
                if size > MAX_TEXT_MEMBER {
                    return Err(bad(format!("the {what} {name} is {size} bytes")));
                }
                let mut text = String::new();
                entry
                    .read_to_string(&mut text)
                    .map_err(|e| bad(format!("the {what} {name}: {e}")))?;
                Ok(text)
            };
            if index == 0 {
                if !name.ends_with(".ovf") {
                    return Err(bad(format!(
                        "the first member is {name:?}; an OVA starts with its .ovf descriptor"
                    )));
                }
                descriptor = Some((name.clone(), read_text(&mut entry, "descriptor")?));
                continue;
            }
            if name.ends_with(".mf") {
                manifest_text = Some(read_text(&mut entry, "manifest")?);
                continue;
            }
            members.push(Member { name, offset, size });
        }
        let Some((descriptor_name, descriptor)) = descriptor else {
            return Err(bad("the archive is empty".into()));
        };
        let digests = match manifest_text {
            Some(text) => parse_manifest(&text).map_err(bad)?,
            None => BTreeMap::new(),
        };
        check_descriptor_digest(&descriptor_name, &descriptor, &digests).map_err(bad)?;
        Ok(Ova {
            path: path.to_owned(),
            descriptor_name,
            descriptor,
            digests,
            members,
        })
    }

    /// The OVF descriptor's text.
    pub fn descriptor(&self) -> &str {
        &self.descriptor
    }

    /// The descriptor's member name.
    pub fn descriptor_name(&self) -> &str {
        &self.descriptor_name
    }

    /// The members after the descriptor and manifest, in archive order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The SHA-256 (hex) the `.mf` gives for `name`, if the OVA has a manifest.
    pub fn expected_sha256(&self, name: &str) -> Option<&str> {
        self.digests.get(name).map(String::as_str)
    }

    /// Whether the archive carries a manifest.
    pub fn has_manifest(&self) -> bool {
        !self.digests.is_empty()
    }

    /// A reader of the member `name`'s bytes.
    pub fn open_member(&self, name: &str) -> Result<(u64, impl Read + use<>)> {
        let member = self
            .members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| Error::Ova {
                path: self.path.display().to_string(),
                detail: format!("no member {name:?}"),
            })?;
        let read_err = |source| Error::Read {
            path: self.path.display().to_string(),
            source,
        };
        let mut file = File::open(&self.path).map_err(read_err)?;
        file.seek(SeekFrom::Start(member.offset))
            .map_err(read_err)?;
        Ok((member.size, file.take(member.size)))
    }

    /// Checks every member the manifest lists against its digest.
    pub fn verify(&self) -> Result<()> {
        for member in &self.members {
            let Some(expected) = self.expected_sha256(&member.name) else {
                continue;
            };
            let (_, mut reader) = self.open_member(&member.name)?;
            let mut hasher = Sha256::new();
            std::io::copy(&mut reader, &mut hasher).map_err(|source| Error::Read {
                path: format!("{} ({})", self.path.display(), member.name),
                source,
            })?;
            let actual = hex::encode(hasher.finalize());
            if actual != expected {
                return Err(Error::Ova {
                    path: self.path.display().to_string(),
                    detail: format!(
                        "{} has SHA-256 {actual}, its manifest says {expected}: the archive is corrupt",
                        member.name
                    ),
                });
            }
        }
        Ok(())
    }
}

fn check_descriptor_digest(
    name: &str,
    descriptor: &str,
    digests: &BTreeMap<String, String>,
) -> std::result::Result<(), String> {
    match digests.get(name) {
        Some(expected) => {
            let actual = hex::encode(Sha256::digest(descriptor.as_bytes()));
            if &actual == expected {
                Ok(())
            } else {
                Err(format!(
                    "the descriptor {name} has SHA-256 {actual}, its manifest says {expected}"
                ))
            }
        }
        None => Ok(()),
    }
}

/// Parses `SHA256(name)= hex` lines (SHA-1 lines, which ovftool once wrote, are refused:
/// rehost verifies with SHA-256 only).
pub fn parse_manifest(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let parsed = line.strip_prefix("SHA256(").and_then(|rest| {
            let (name, digest) = rest.split_once(")=")?;
            Some((name.to_owned(), digest.trim().to_ascii_lowercase()))
        });
        match parsed {
            Some((name, digest))
                if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                out.insert(name, digest);
            }
            _ => {
                return Err(format!(
                    "manifest line {}: {line:?} is not `SHA256(name)= <64 hex digits>`",
                    i + 1
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(dir: &Path) -> (PathBuf, Vec<u8>) {
        let disk = dir.join("disk.vmdk");
        let bytes: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&disk, &bytes).expect("disk");
        let out = dir.join("a.ova");
        let packed = write(
            &out,
            "a.ovf",
            "<Envelope/>",
            &[("a-disk1.vmdk".to_owned(), disk)],
        )
        .expect("packs");
        assert_eq!(packed.digests.len(), 2);
        (out, bytes)
    }

    #[test]
    fn an_ova_round_trips_in_ovf_order() {
        let dir = tempfile::tempdir().expect("dir");
        let (out, bytes) = pack(dir.path());
        let names: Vec<String> = tar::Archive::new(File::open(&out).expect("open"))
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["a.ovf", "a.mf", "a-disk1.vmdk"]);
        let ova = Ova::open(&out).expect("opens");
        assert_eq!(ova.descriptor(), "<Envelope/>");
        assert!(ova.has_manifest());
        ova.verify().expect("digests match");
        let (size, mut reader) = ova.open_member("a-disk1.vmdk").expect("member");
        let mut read = Vec::new();
        reader.read_to_end(&mut read).expect("read");
        assert_eq!(size, 70_000);
        assert!(read == bytes);
        // The same inputs make the same archive.
        let again = dir.path().join("b.ova");
        write(
            &again,
            "a.ovf",
            "<Envelope/>",
            &[("a-disk1.vmdk".to_owned(), dir.path().join("disk.vmdk"))],
        )
        .expect("packs");
        assert_eq!(
            sha256_file(&out).expect("hash"),
            sha256_file(&again).expect("hash")
        );
    }

    #[test]
    fn a_corrupt_member_is_caught() {
        let dir = tempfile::tempdir().expect("dir");
        let (out, _) = pack(dir.path());
        let ova = Ova::open(&out).expect("opens");
        let offset = ova.members()[0].offset;
        let mut archive = std::fs::read(&out).expect("read");
        archive[usize::try_from(offset).expect("offset") + 10] ^= 0xFF;
        std::fs::write(&out, archive).expect("write");
        let err = Ova::open(&out)
            .expect("opens")
            .verify()
            .expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn malformed_archives_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let not_tar = dir.path().join("x.ova");
        std::fs::write(&not_tar, b"hello").expect("write");
        assert!(Ova::open(&not_tar).is_err());
        let disk = dir.path().join("d");
        std::fs::write(&disk, b"x").expect("write");
        assert!(write(&dir.path().join("y.ova"), "y.xml", "<E/>", &[]).is_err());
        assert!(parse_manifest("SHA1(a)= 00").is_err());
        assert!(parse_manifest("SHA256(a)= zz").is_err());
        assert_eq!(
            parse_manifest(&format!("SHA256(a.vmdk)= {}\n", "A".repeat(64)))
                .expect("parses")
                .get("a.vmdk")
                .map(String::len),
            Some(64)
        );
    }
}
