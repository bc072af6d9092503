//! `*.manifest.json`: what an export wrote, enough to check it and to export
//! incrementally from it (`--base`).

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The manifest format's name and version; readers refuse others.
pub const FORMAT: &str = "rehost-export/1";

/// One export of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub export_id: String,
    pub created_at: String,
    pub source: SourceEntry,
    pub vm: VmEntry,
    /// The snapshot the disks were read from (removed when the export ended).
    pub snapshot_name: String,
    /// `full` or `incremental`.
    pub kind: ExportKind,
    /// The manifest this one is incremental on (its file name, in the same folder).
    pub parent_manifest: Option<String>,
    pub disks: Vec<DiskEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    Full,
    Incremental,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    pub name: String,
    pub kind: String,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    pub id: String,
    pub name: String,
    pub path: String,
    pub firmware: rehost_core::Firmware,
    pub guest_os: String,
    pub cpus: u32,
    pub memory_mib: u64,
}

/// One disk's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// The device key (`2000`).
    pub key: String,
    pub label: String,
    pub capacity_bytes: u64,
    /// The CBT changeId of the disk in the state read: `--base` asks for changes since it.
    /// None when CBT was off (an ExportVm of a VM without CBT): no incremental can follow.
    pub change_id: Option<String>,
    /// The changeId changes were asked since (incremental only).
    pub since_change_id: Option<String>,
    /// The image file, in the manifest's folder.
    pub image: String,
    /// `vmdk-stream` (vSphere) or `vhd-dynamic` (Azure; a differencing VHD for a delta).
    pub image_format: String,
    pub image_bytes: u64,
    pub image_sha256: String,
    /// The VMDK content id of the image (a child image names it as `parentCID`); 0 for a VHD.
    pub image_cid: u32,
    /// The VHD unique id of the image, hex (a differencing child names it as its parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_unique_id: Option<String>,
    /// The image this one is a delta of (incremental only), in the same folder.
    pub parent_image: Option<String>,
    /// Disk bytes read from the source and stored in the image.
    pub data_bytes: u64,
    /// Bytes read from the parent image (incremental only, never from the source): the
    /// unchanged rest of 512 KiB blocks the source changed only in part, to digest them.
    #[serde(default)]
    pub base_bytes_read: u64,
    /// Per-512 KiB-block SHA-256 digests of the whole disk, 32 bytes each, in order.
    pub block_list: String,
    /// SHA-256 of the block list file: the disk's content digest, what
    /// `rehost disk checksum --blocks` prints for the image (chain).
    pub content_sha256: String,
    /// SHA-256 of the whole disk (full exports only: an incremental does not read it all);
    /// what `qemu-img convert -O raw` + `sha256sum` prints.
    pub disk_sha256: Option<String>,
}

impl Manifest {
    /// Parses and checks a manifest read from `location`.
    pub fn parse(bytes: &[u8], location: &str) -> Result<Manifest> {
        let manifest: Manifest = serde_json::from_slice(bytes)
            .with_context(|| format!("{location} is not a rehost export manifest"))?;
        if manifest.format != FORMAT {
            bail!(
                "{location}: manifest format {:?}, this rehost reads {FORMAT:?}",
                manifest.format
            );
        }
        for disk in &manifest.disks {
            for name in [&disk.image, &disk.block_list] {
                if name.is_empty()
                    || name.contains('/')
                    || name.contains('\\')
                    || name.starts_with('.')
                {
                    bail!(
                        "{location}: disk {}: file name {name:?} is not a plain file name",
                        disk.key
                    );
                }
            }
        }
        Ok(manifest)
    }

    /// The entry of disk `key`.
    pub fn disk(&self, key: &str) -> Option<&DiskEntry> {
        self.disks.iter().find(|d| d.key == key)
    }
}

/// Encodes a block list as stored.
pub fn encode_block_list(digests: &[[u8; 32]]) -> Vec<u8> {
    digests.concat()
}

/// Decodes a stored block list, checking its digest against the manifest's.
pub fn decode_block_list(
    bytes: &[u8],
    expected_sha256: &str,
    location: &str,
) -> Result<Vec<[u8; 32]>> {
    use sha2::{Digest, Sha256};
    let actual = hex::encode(Sha256::digest(bytes));
    if actual != expected_sha256 {
        bail!(
            "{location}: SHA-256 {actual} differs from the manifest's {expected_sha256}; the block list is damaged"
        );
    }
    if bytes.len() % 32 != 0 {
        bail!(
            "{location}: {} bytes is not a whole number of 32-byte digests",
            bytes.len()
        );
    }
    Ok(bytes
        .chunks_exact(32)
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            d
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lists_round_trip_and_are_checked() {
        use sha2::{Digest, Sha256};
        let list = vec![[1u8; 32], [2u8; 32]];
        let bytes = encode_block_list(&list);
        let sha = hex::encode(Sha256::digest(&bytes));
        assert_eq!(decode_block_list(&bytes, &sha, "x").unwrap(), list);
        assert!(decode_block_list(&bytes[..40], &sha, "x").is_err());
    }

    #[test]
    fn a_foreign_json_is_refused_with_its_location() {
        let err = format!(
            "{:#}",
            Manifest::parse(b"{\"a\":1}", "/tmp/m.json").unwrap_err()
        );
        assert!(err.contains("/tmp/m.json"), "{err}");
    }
}
