//! AMIs from imported snapshots: registration (boot mode and architecture read from the
//! image unless the user says), and retention (`prune`: keep the newest N AMIs carrying a
//! tag, deregister the others and delete their snapshots unless another AMI still uses them).

mod prune;
mod register;

use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use crate::bootinfo::{self, DiskBytes};
use crate::{Error, Result};

pub use crate::bootinfo::{Architecture, BootMode};
pub use prune::{
    PruneAmi, PrunePlan, PruneReport, RetainedSnapshot, TagFilter, plan_prune, plan_prune_ranked,
    prune, prune_ranked,
};
pub use register::{AmiSpec, ROOT_DEVICE_NAME, SnapshotVolume, data_device_name, register};

/// What the user asked for; `None` means "auto": read it from the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootRequest {
    /// `--boot-mode`: `None` for auto.
    pub boot_mode: Option<BootMode>,
    /// `--architecture`: `None` for auto.
    pub architecture: Option<Architecture>,
}

impl BootRequest {
    /// Parses the CLI values: `--boot-mode auto|uefi|legacy-bios` and
    /// `--architecture auto|x86_64|arm64`.
    pub fn parse(boot_mode: &str, architecture: &str) -> Result<Self> {
        let boot_mode = match boot_mode {
            "auto" => None,
            "uefi" => Some(BootMode::Uefi),
            "legacy-bios" => Some(BootMode::LegacyBios),
            other => {
                return Err(Error::InvalidInput(format!(
                    "boot mode {other:?}: expected auto, uefi or legacy-bios"
                )));
            }
        };
        let architecture = match architecture {
            "auto" => None,
            "x86_64" => Some(Architecture::X86_64),
            "arm64" => Some(Architecture::Arm64),
            other => {
                return Err(Error::InvalidInput(format!(
                    "architecture {other:?}: expected auto, x86_64 or arm64"
                )));
            }
        };
        Ok(Self {
            boot_mode,
            architecture,
        })
    }
}

/// The boot mode and architecture to register `disk` with: what was asked, else what the
/// image shows (GPT with an ESP → uefi, else legacy-bios; the loader's architecture, else
/// x86_64). The disk is only read when something is left to auto.
pub fn resolve_boot(
    disk: &dyn DiskBytes,
    requested: BootRequest,
) -> Result<(BootMode, Architecture)> {
    let (boot_mode, architecture) = match requested {
        BootRequest {
            boot_mode: Some(mode),
            architecture: Some(arch),
        } => (mode, arch),
        _ => {
            let info = bootinfo::detect(disk)?;
            tracing::info!(
                partition_table = info.partition_table.name(),
                boot_mode = info.boot_mode.as_aws(),
                architecture = ?info.architecture,
                loader = ?info.loader,
                "boot facts read from the image"
            );
            (
                requested.boot_mode.unwrap_or(info.boot_mode),
                // An image without a removable-media loader (BIOS, or a loader only in
                // NVRAM entries) is x86_64 in practice: arm64 systems all boot through UEFI
                // and their images carry BOOTAA64.EFI.
                requested
                    .architecture
                    .or(info.architecture)
                    .unwrap_or(Architecture::X86_64),
            )
        }
    };
    // EC2's Graviton instances only boot UEFI; an AMI saying otherwise would never start.
    if architecture == Architecture::Arm64 && boot_mode == BootMode::LegacyBios {
        return Err(Error::InvalidInput(
            "an arm64 image cannot boot in legacy-bios mode on EC2 (Graviton instances are UEFI only); use --boot-mode uefi".into(),
        ));
    }
    Ok((boot_mode, architecture))
}

/// The snapshot behind an AMI's root device (what `snapshot verify ami-…` reads).
pub async fn root_snapshot(clients: &crate::aws::Clients, ami_id: &str) -> Result<String> {
    let images = clients
        .ec2
        .describe_images()
        .image_ids(ami_id)
        .send()
        .await
        .map_err(|e| ec2_error("DescribeImages", e))?;
    let image = images.images().first().ok_or_else(|| Error::Aws {
        operation: "DescribeImages",
        code: Some("InvalidAMIID.NotFound".into()),
        message: format!("AMI {ami_id} does not exist"),
        kind: rehost_core::ErrorKind::NotFound,
    })?;
    let root = image.root_device_name().unwrap_or(ROOT_DEVICE_NAME);
    image
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some(root))
        .and_then(|m| m.ebs())
        .and_then(|ebs| ebs.snapshot_id())
        .map(str::to_owned)
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "AMI {ami_id} maps no EBS snapshot at its root device {root}"
            ))
        })
}

/// Maps a failed EC2 call to the importer's error, classified like every other AWS call
/// (see [`crate::retry::classify`]). The SDK has already retried throttling and 5xx
/// answers (standard retry mode) by the time one reaches here.
pub(crate) fn ec2_error<E>(operation: &'static str, err: SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    crate::retry::classify(operation, "", &err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_values_skip_reading_the_image() {
        // An empty "disk" would say legacy-bios / no architecture.
        let disk = Vec::new();
        let asked = BootRequest {
            boot_mode: Some(BootMode::Uefi),
            architecture: Some(Architecture::Arm64),
        };
        assert_eq!(
            resolve_boot(&disk, asked).ok(),
            Some((BootMode::Uefi, Architecture::Arm64))
        );
    }

    #[test]
    fn auto_on_a_bare_disk_is_legacy_bios_x86_64() {
        let disk = vec![0u8; 1024];
        assert_eq!(
            resolve_boot(&disk, BootRequest::default()).ok(),
            Some((BootMode::LegacyBios, Architecture::X86_64))
        );
    }

    #[test]
    fn cli_values_parse() {
        assert_eq!(
            BootRequest::parse("auto", "auto").ok(),
            Some(BootRequest::default())
        );
        assert_eq!(
            BootRequest::parse("legacy-bios", "arm64").ok(),
            Some(BootRequest {
                boot_mode: Some(BootMode::LegacyBios),
                architecture: Some(Architecture::Arm64)
            })
        );
        assert!(BootRequest::parse("bios", "auto").is_err());
        assert!(BootRequest::parse("uefi", "aarch64").is_err());
    }

    #[test]
    fn arm64_with_legacy_bios_is_refused() {
        let disk = vec![0u8; 1024];
        let asked = BootRequest {
            boot_mode: None,
            architecture: Some(Architecture::Arm64),
        };
        assert!(matches!(
            resolve_boot(&disk, asked),
            Err(Error::InvalidInput(_))
        ));
    }
}
