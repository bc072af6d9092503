//! Format detection from the bytes, never the file name: users rename files, and a
//! `.vhd` may well be a VHDX.

use crate::error::{Error, Result};
use crate::io::ImageFile;

/// What the first bytes say a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectedFormat {
    /// No known signature.
    Raw,
    /// A VMDK sparse extent (`KDMV`) or a VMDK text descriptor.
    Vmdk,
    /// A VHD: `conectix` at the start (dynamic) or in the last 512 bytes (fixed).
    Vhd,
    /// A VHDX (`vhdxfile`).
    Vhdx,
}

/// VMDK hosted sparse extent magic, "KDMV" as little-endian 'VMDK'.
pub const VMDK_SPARSE_MAGIC: &[u8; 4] = b"KDMV";
/// ESX's older sparse format ("COWD"), which we refuse by name rather than read as raw.
pub const VMDK_COWD_MAGIC: &[u8; 4] = b"COWD";
/// VHD footer cookie.
pub const VHD_COOKIE: &[u8; 8] = b"conectix";
/// VHDX file type identifier signature.
pub const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// QEMU copy-on-write v2/v3, refused by name.
pub const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Identifies the format of `file`.
pub fn detect(file: &ImageFile) -> Result<DetectedFormat> {
    let len = file.len();
    let mut head = [0u8; 512];
    let head_len = usize::try_from(len.min(512)).unwrap_or(512);
    file.read(&mut head[..head_len], 0, "format signature")?;
    let head = &head[..head_len];

    if head.starts_with(VHDX_SIGNATURE) {
        return Ok(DetectedFormat::Vhdx);
    }
    if head.starts_with(VMDK_SPARSE_MAGIC) {
        return Ok(DetectedFormat::Vmdk);
    }
    if head.starts_with(VHD_COOKIE) {
        return Ok(DetectedFormat::Vhd);
    }
    if head.starts_with(VMDK_COWD_MAGIC) {
        return Err(Error::unsupported(
            file.name(),
            "ESX COWD sparse disks (convert them with vmkfstools first)",
        ));
    }
    if head.starts_with(QCOW_MAGIC) {
        return Err(Error::unsupported(
            file.name(),
            "qcow2 images (convert with `qemu-img convert -O vmdk`)",
        ));
    }
    if looks_like_vmdk_descriptor(head) {
        return Ok(DetectedFormat::Vmdk);
    }
    if len >= 512 && len % 512 == 0 {
        let tail: [u8; 8] = file.read_array(len - 512, "VHD footer")?;
        if &tail == VHD_COOKIE {
            return Ok(DetectedFormat::Vhd);
        }
    }
    Ok(DetectedFormat::Raw)
}

/// A VMDK descriptor is a small text file naming its create type. We require the
/// conventional first line or a `createType=` line within the first bytes, and text only.
fn looks_like_vmdk_descriptor(head: &[u8]) -> bool {
    let text_len = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    let Ok(text) = std::str::from_utf8(&head[..text_len]) else {
        return false;
    };
    text.trim_start().starts_with("# Disk DescriptorFile")
        || text
            .lines()
            .any(|l| l.trim_start().starts_with("createType"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_bytes(bytes: Vec<u8>) -> Result<DetectedFormat> {
        detect(&ImageFile::from_bytes("t", bytes))
    }

    #[test]
    fn detects_by_signature() {
        assert_eq!(
            detect_bytes(b"vhdxfile....".to_vec()).unwrap(),
            DetectedFormat::Vhdx
        );
        assert_eq!(
            detect_bytes(b"KDMV\x01\0\0\0".to_vec()).unwrap(),
            DetectedFormat::Vmdk
        );
        assert_eq!(
            detect_bytes(b"# Disk DescriptorFile\nversion=1\n".to_vec()).unwrap(),
            DetectedFormat::Vmdk
        );
        let mut fixed = vec![0u8; 2048];
        fixed[1536..1544].copy_from_slice(VHD_COOKIE);
        assert_eq!(detect_bytes(fixed).unwrap(), DetectedFormat::Vhd);
        assert_eq!(detect_bytes(vec![0u8; 1000]).unwrap(), DetectedFormat::Raw);
        assert_eq!(detect_bytes(Vec::new()).unwrap(), DetectedFormat::Raw);
        assert!(detect_bytes(b"QFI\xfb\0\0\0\x03".to_vec()).is_err());
    }
}
