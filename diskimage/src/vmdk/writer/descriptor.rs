//! The text descriptor embedded after the header of the sparse extents we write.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;

use crate::error::{Error, Result};
use crate::layer::ImageId;
use crate::sink::ParentLink;

/// `parentCID` of a disk without a parent (spec: `CID_NOPARENT`).
pub(crate) const CID_NO_PARENT: u32 = 0xffff_ffff;
/// Cylinders are capped here, as in the ATA CHS geometry VMware and qemu record.
const MAX_CYLINDERS: u64 = 16383;
/// Heads and sectors per track of the IDE geometry qemu writes.
const HEADS: u64 = 16;
const SECTORS_PER_TRACK: u64 = 63;

/// What goes into a descriptor.
#[derive(Debug, Clone)]
pub(crate) struct Descriptor<'a> {
    /// This disk's content id.
    pub cid: u32,
    /// The parent's content id, [`CID_NO_PARENT`] for a base disk.
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: &'a str,
    /// `parentFileNameHint`, for a delta.
    pub parent_hint: Option<&'a str>,
    /// Virtual size in sectors.
    pub sectors: u64,
    /// The extent's file name (the file itself, as the extent line names it).
    pub extent_file: &'a str,
    /// Whether to record `ddb.toolsInstallType`, which vSphere's own exports carry.
    pub tools_install_type: bool,
}

impl Descriptor<'_> {
    /// The descriptor text, laid out as qemu and VMware write it.
    pub(crate) fn render(&self) -> String {
        let cylinders = self
            .sectors
            .div_ceil(HEADS * SECTORS_PER_TRACK)
            .min(MAX_CYLINDERS);
        let mut s = String::new();
        // File names are written as UTF-8, which VMware's own descriptors declare.
        s.push_str("# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\n");
        s.push_str(&format!(
            "CID={:08x}\nparentCID={:08x}\n",
            self.cid, self.parent_cid
        ));
        s.push_str(&format!("createType=\"{}\"\n", self.create_type));
        if let Some(hint) = self.parent_hint {
            s.push_str(&format!("parentFileNameHint=\"{hint}\"\n"));
        }
        s.push_str("\n# Extent description\n");
        s.push_str(&format!(
            "RW {} SPARSE \"{}\"\n",
            self.sectors, self.extent_file
        ));
        s.push_str("\n# The Disk Data Base\n#DDB\n\n");
        s.push_str("ddb.virtualHWVersion = \"4\"\n");
        s.push_str(&format!("ddb.geometry.cylinders = \"{cylinders}\"\n"));
        s.push_str(&format!("ddb.geometry.heads = \"{HEADS}\"\n"));
        s.push_str(&format!("ddb.geometry.sectors = \"{SECTORS_PER_TRACK}\"\n"));
        s.push_str("ddb.adapterType = \"ide\"\n");
        // 2147483647 (MAXINT) marks the guest tools as managed by the guest (open-vm-tools),
        // which is what qemu records; install type 4 says the same in vSphere's terms.
        s.push_str("ddb.toolsVersion = \"2147483647\"\n");
        if self.tools_install_type {
            s.push_str("ddb.toolsInstallType = \"4\"\n");
        }
        s
    }
}

/// A fresh content id: random, never the "no parent" value. Std's `RandomState` is seeded
/// from the OS per process and varies per instance, which is random enough for an id that
/// only has to differ from its parent's.
pub(crate) fn random_cid() -> u32 {
    let mut h = RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    let v = h.finish();
    let cid = u32::try_from(v & 0xffff_ffff).unwrap_or(0) ^ u32::try_from(v >> 32).unwrap_or(0);
    if cid == CID_NO_PARENT {
        0x1234_5678
    } else {
        cid
    }
}

/// The `parentCID` and a fresh `CID` for a disk of `virtual_size` bytes written as a
/// delta of `parent` (or a base disk without one), after checking the parent can be one:
/// a VMDK (only a CID can be recorded) of the same size, whose path fits in the descriptor.
pub(crate) fn cids_for(
    name: &str,
    parent: Option<&ParentLink>,
    virtual_size: u64,
) -> Result<(u32, u32)> {
    let parent_cid = match parent {
        None => CID_NO_PARENT,
        Some(link) => {
            let ImageId::VmdkCid(cid) = link.id else {
                return Err(Error::InvalidInput(format!(
                    "{name}: a VMDK delta needs a VMDK parent (with a CID); {} is not one",
                    link.relative_path
                )));
            };
            if link.virtual_size_bytes != virtual_size {
                return Err(Error::InvalidInput(format!(
                    "{name}: a VMDK delta must have its parent's size ({} bytes), not {virtual_size}",
                    link.virtual_size_bytes
                )));
            }
            check_quotable(name, "parent path", &link.relative_path)?;
            cid
        }
    };
    let mut cid = random_cid();
    if cid == parent_cid {
        cid ^= 1; // A child sharing its parent's CID would look unmodified to VMware.
    }
    Ok((cid, parent_cid))
}

/// The extent file name recorded for an output named `name` (a path): its last component.
pub(crate) fn extent_file_name(name: &str) -> Result<String> {
    let file = Path::new(name)
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "{name}: a VMDK needs a file name for its extent line"
            ))
        })?;
    check_quotable(name, "file name", &file)?;
    Ok(file)
}

/// Rejects text that cannot sit between double quotes on one descriptor line.
pub(crate) fn check_quotable(name: &str, what: &str, text: &str) -> Result<()> {
    if text.is_empty() || text.chars().any(|c| c == '"' || c.is_control()) {
        return Err(Error::InvalidInput(format!(
            "{name}: the {what} {text:?} cannot be recorded in a VMDK descriptor (empty, or with a quote or control character)"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_qemu() {
        let d = Descriptor {
            cid: 0xaa6b57e5,
            parent_cid: CID_NO_PARENT,
            create_type: "monolithicSparse",
            parent_hint: None,
            sectors: 9766,
            extent_file: "m.vmdk",
            tools_install_type: false,
        };
        let text = d.render();
        assert!(
            text.contains("CID=aa6b57e5\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n")
        );
        assert!(text.contains("RW 9766 SPARSE \"m.vmdk\"\n"));
        assert!(text.contains("ddb.geometry.cylinders = \"10\"\n"));
        assert!(!text.contains("parentFileNameHint"));
        assert!(!text.contains("toolsInstallType"));
        let child = Descriptor {
            parent_cid: 7,
            parent_hint: Some("../b.vmdk"),
            tools_install_type: true,
            ..d
        };
        let text = child.render();
        assert!(text.contains("parentCID=00000007\n"));
        assert!(text.contains("parentFileNameHint=\"../b.vmdk\"\n"));
        assert!(text.contains("ddb.toolsInstallType = \"4\"\n"));
    }

    #[test]
    fn cylinders_are_capped() {
        let d = Descriptor {
            cid: 1,
            parent_cid: CID_NO_PARENT,
            create_type: "streamOptimized",
            parent_hint: None,
            sectors: 1 << 32,
            extent_file: "x.vmdk",
            tools_install_type: false,
        };
        assert!(d.render().contains("cylinders = \"16383\""));
    }

    #[test]
    fn cids_are_never_no_parent_and_vary() {
        let a: Vec<u32> = (0..8).map(|_| random_cid()).collect();
        assert!(a.iter().all(|&c| c != CID_NO_PARENT));
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn cids_of_a_delta_come_from_a_same_sized_vmdk_parent() {
        let link = |id, size| ParentLink {
            relative_path: "p.vmdk".into(),
            absolute_path: "/d/p.vmdk".into(),
            id,
            virtual_size_bytes: size,
        };
        let (cid, parent) = cids_for("c", None, 512).unwrap();
        assert_eq!(parent, CID_NO_PARENT);
        assert_ne!(cid, CID_NO_PARENT);
        let (cid, parent) = cids_for("c", Some(&link(ImageId::VmdkCid(7), 512)), 512).unwrap();
        assert_eq!(parent, 7);
        assert_ne!(cid, 7);
        assert!(cids_for("c", Some(&link(ImageId::VmdkCid(7), 1024)), 512).is_err());
        assert!(cids_for("c", Some(&link(ImageId::VhdUniqueId([0; 16]), 512)), 512).is_err());
    }

    #[test]
    fn file_names() {
        assert_eq!(extent_file_name("/tmp/dir/disk.vmdk").unwrap(), "disk.vmdk");
        assert!(extent_file_name("/tmp/a\"b.vmdk").is_err());
        assert!(extent_file_name("/").is_err());
        assert!(check_quotable("x", "hint", "a\nb").is_err());
    }
}
