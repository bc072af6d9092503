//! What an image says about how it boots: its partition table, whether it carries an EFI
//! System Partition (ESP) and, from the loader the firmware would start
//! (`EFI/BOOT/BOOTX64.EFI` or `BOOTAA64.EFI`), its architecture. The AMI needs both
//! (`BootMode`, `Architecture`), and reading them from the image beats asking the user.
//!
//! Pure code over reads of the virtual disk: every structure is bounded (partition entries,
//! directory sizes, cluster chains) and checked before use, so hostile bytes give "not
//! found", never a panic or a hang.

mod fat;
mod table;

use std::ops::Range;

use rehost_diskimage::Disk;

use crate::Result;

pub use table::{Guid, Partition, PartitionTable};

/// The firmware interface an image expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    /// UEFI firmware starting a loader from the ESP.
    Uefi,
    /// BIOS starting the MBR's boot code.
    LegacyBios,
}

impl BootMode {
    /// The value EC2's `BootMode` takes.
    pub fn as_aws(self) -> &'static str {
        match self {
            BootMode::Uefi => "uefi",
            BootMode::LegacyBios => "legacy-bios",
        }
    }
}

/// The CPU architecture of the image's boot loader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Architecture {
    /// `x86_64` (AMD64).
    X86_64,
    /// `arm64` (AArch64, Graviton).
    Arm64,
}

impl Architecture {
    /// The value EC2's `Architecture` takes.
    pub fn as_aws(self) -> &'static str {
        match self {
            Architecture::X86_64 => "x86_64",
            Architecture::Arm64 => "arm64",
        }
    }
}

/// What the image's first structures say about booting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootInfo {
    /// The partition table found, if any.
    pub partition_table: PartitionTable,
    /// `Uefi` for a GPT disk with an ESP, else `LegacyBios`.
    pub boot_mode: BootMode,
    /// From the ESP's removable-media loader name (`None`: no such loader; callers
    /// default to x86_64, the architecture of nearly every image without one).
    pub architecture: Option<Architecture>,
    /// Byte range of the EFI System Partition on the disk.
    pub esp: Option<Range<u64>>,
    /// The loader file found in the ESP (`EFI/BOOT/BOOTX64.EFI`), for reports.
    pub loader: Option<String>,
}

/// Random access to the bytes of a virtual disk; the disk library's [`Disk`] in real use,
/// bytes in memory in tests.
pub trait DiskBytes {
    /// Virtual size in bytes.
    fn size_bytes(&self) -> u64;
    /// Fills `buf` from `offset`, which the callers keep within `size_bytes`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
}

impl DiskBytes for Disk {
    fn size_bytes(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(Disk::read_at(self, buf, offset)?)
    }
}

impl DiskBytes for Vec<u8> {
    fn size_bytes(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Callers only read within size_bytes (see `read_exact`), so this always converts.
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let end = start.saturating_add(buf.len()).min(self.len());
        buf[..end - start].copy_from_slice(&self[start..end]);
        buf[end - start..].fill(0);
        Ok(())
    }
}

/// Reads `len` bytes at `offset`, or `None` if that range is not inside the disk (a
/// structure pointing outside the disk is treated as absent, not as an error).
pub(crate) fn read_exact(disk: &dyn DiskBytes, offset: u64, len: u64) -> Result<Option<Vec<u8>>> {
    let Some(end) = offset.checked_add(len) else {
        return Ok(None);
    };
    let Ok(len) = usize::try_from(len) else {
        return Ok(None);
    };
    if end > disk.size_bytes() {
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset)?;
    Ok(Some(buf))
}

/// Reads the boot facts of `disk`. Only read errors are errors: missing or damaged
/// structures give a `BootInfo` that says less (no table, no ESP, legacy BIOS).
pub fn detect(disk: &dyn DiskBytes) -> Result<BootInfo> {
    let partition_table = table::read(disk)?;
    let esp = partition_table.esp().map(|p| p.byte_range());
    let loader = match &esp {
        Some(range) => fat::find_loader(disk, range.clone())?,
        None => None,
    };
    // UEFI on MBR disks exists, but the rule and EC2 practice pair uefi with GPT:
    // an MBR disk carrying an 0xEF partition is nearly always a BIOS system with a spare
    // ESP, and its MBR boot code is what actually starts it.
    let boot_mode = match (&partition_table, &esp) {
        (PartitionTable::Gpt(_), Some(_)) => BootMode::Uefi,
        _ => BootMode::LegacyBios,
    };
    let architecture = loader.as_ref().map(|l| l.architecture);
    Ok(BootInfo {
        partition_table,
        boot_mode,
        architecture,
        esp,
        loader: loader.map(|l| l.path),
    })
}

#[cfg(test)]
mod tests;
