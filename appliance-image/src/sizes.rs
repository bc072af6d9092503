//! The size rules of the appliance's disk formats.

use crate::error::{Error, Result};

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// The disk's capacity in MiB, as the OVF's `byte * 2^20` allocation unit states it: the raw
/// disk must be a whole number of MiB (the manifest's `size_mib` makes it so).
pub fn capacity_mib(disk_bytes: u64) -> Result<u64> {
    if disk_bytes == 0 || disk_bytes % MIB != 0 {
        return Err(Error::Size(format!(
            "the disk is {disk_bytes} bytes, not a whole (non-zero) number of MiB"
        )));
    }
    Ok(disk_bytes / MIB)
}

/// The virtual size of the Azure VHD for a disk of `disk_bytes`: Azure takes only fixed
/// VHDs whose virtual size is a whole number of MiB, so the disk is rounded up (the added
/// bytes are zeros past the last partition).
pub fn azure_vhd_bytes(disk_bytes: u64) -> Result<u64> {
    if disk_bytes == 0 {
        return Err(Error::Size("an empty disk cannot be an Azure VHD".into()));
    }
    disk_bytes
        .checked_next_multiple_of(MIB)
        .ok_or_else(|| Error::Size(format!("{disk_bytes} bytes cannot be rounded to MiB")))
}

/// The file size of a fixed VHD of `virtual_bytes`: the disk and its 512-byte footer.
pub fn fixed_vhd_file_bytes(virtual_bytes: u64) -> u64 {
    virtual_bytes + 512
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_are_whole_mib() {
        assert_eq!(capacity_mib(2048 * MIB).expect("whole"), 2048);
        assert!(capacity_mib(2048 * MIB + 512).is_err());
        assert!(capacity_mib(0).is_err());
    }

    #[test]
    fn azure_sizes_round_up_to_mib() {
        assert_eq!(azure_vhd_bytes(2048 * MIB).expect("size"), 2048 * MIB);
        assert_eq!(azure_vhd_bytes(2048 * MIB + 1).expect("size"), 2049 * MIB);
        assert_eq!(azure_vhd_bytes(1).expect("size"), MIB);
        assert!(azure_vhd_bytes(0).is_err());
        assert!(azure_vhd_bytes(u64::MAX).is_err());
        assert_eq!(fixed_vhd_file_bytes(MIB), MIB + 512);
    }
}
