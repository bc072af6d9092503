//! RegisterImage from imported snapshots, idempotent by AMI name.

use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, Image,
    ResourceType, Tag, TagSpecification, VolumeType,
};

use super::ec2_error;
use crate::aws::Clients;
use crate::bootinfo::{Architecture, BootMode};
use crate::{Error, Result};

/// The root device. `/dev/sda1` rather than `/dev/xvda`: EC2 accepts both for HVM Linux,
/// but Windows AMIs need `/dev/sda1`, it is what VM Import (and so SMS) registered, and on
/// Nitro instances every EBS volume is NVMe whatever its name, so nothing is lost.
pub const ROOT_DEVICE_NAME: &str = "/dev/sda1";

/// The most data disks we map: `/dev/sdb` … `/dev/sdz`, EC2's recommended range.
const MAX_DATA_DISKS: usize = 25;

/// A snapshot to map as one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotVolume {
    /// `snap-…`, completed.
    pub snapshot_id: String,
    /// Volume size; `None` lets EC2 use the snapshot's.
    pub volume_size_gib: Option<u32>,
}

/// Everything an AMI is registered with.
#[derive(Debug, Clone)]
pub struct AmiSpec {
    /// AMI name, unique per account and region (the idempotency key).
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// The boot volume.
    pub root: SnapshotVolume,
    /// More volumes, mapped as `/dev/sdb`, `/dev/sdc`, … in this order.
    pub data: Vec<SnapshotVolume>,
    /// `uefi` or `legacy-bios`.
    pub boot_mode: BootMode,
    /// `x86_64` or `arm64`.
    pub architecture: Architecture,
    /// Tags for the AMI and for every snapshot it maps.
    pub tags: Vec<(String, String)>,
}

/// The device name of data disk `index` (0 → `/dev/sdb`).
pub fn data_device_name(index: usize) -> Option<String> {
    let letter = u8::try_from(index)
        .ok()
        .filter(|&i| usize::from(i) < MAX_DATA_DISKS)?;
    Some(format!("/dev/sd{}", char::from(b'b' + letter)))
}

/// Registers the AMI and tags its snapshots; returns its id. If an AMI of this name is
/// already ours, its id is returned when it maps the same root snapshot (a re-run), and
/// an error otherwise (the name belongs to something else).
pub async fn register(clients: &Clients, spec: AmiSpec) -> Result<String> {
    if spec.data.len() > MAX_DATA_DISKS {
        return Err(Error::InvalidInput(format!(
            "{} data disks: an AMI maps at most {MAX_DATA_DISKS} (/dev/sdb to /dev/sdz)",
            spec.data.len()
        )));
    }
    if let Some(existing) = find_by_name(clients, &spec.name).await? {
        return same_root_or_error(&spec, &existing);
    }
    let request = clients
        .ec2
        .register_image()
        .name(&spec.name)
        .set_description(spec.description.clone())
        .root_device_name(ROOT_DEVICE_NAME)
        .set_block_device_mappings(Some(mappings(&spec)))
        .boot_mode(BootModeValues::from(spec.boot_mode.as_aws()))
        .architecture(ArchitectureValues::from(spec.architecture.as_aws()))
        .ena_support(true)
        .virtualization_type("hvm");
    // RegisterImage only tags the image itself ("image" is the one resource type it takes);
    // the snapshots are tagged below with CreateTags.
    let request = if spec.tags.is_empty() {
        request
    } else {
        request.tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(tags(&spec.tags)))
                .build(),
        )
    };
    let image_id = match request.send().await {
        Ok(out) => out.image_id.ok_or_else(|| Error::Aws {
            operation: "RegisterImage",
            code: None,
            message: format!("no image id in the answer for {}", spec.name),
            kind: rehost_core::ErrorKind::Transient,
        })?,
        Err(err) => {
            let err = ec2_error("RegisterImage", err);
            // A retried RegisterImage whose first attempt went through answers Duplicate:
            // that AMI is ours if it maps our root snapshot.
            if matches!(&err, Error::Aws { code: Some(c), .. } if c == "InvalidAMIName.Duplicate") {
                if let Some(existing) = find_by_name(clients, &spec.name).await? {
                    return same_root_or_error(&spec, &existing);
                }
            }
            return Err(with_snapshots(err, &spec));
        }
    };
    tracing::info!(%image_id, name = %spec.name, boot_mode = spec.boot_mode.as_aws(), architecture = spec.architecture.as_aws(), "registered AMI");
    if !spec.tags.is_empty() {
        let snapshot_ids: Vec<String> = std::iter::once(&spec.root)
            .chain(&spec.data)
            .map(|v| v.snapshot_id.clone())
            .collect();
        clients
            .ec2
            .create_tags()
            .set_resources(Some(snapshot_ids))
            .set_tags(Some(tags(&spec.tags)))
            .send()
            .await
            .map_err(|e| ec2_error("CreateTags", e))?;
    }
    Ok(image_id)
}

/// Root first, then the data disks; never deleted with an instance (as SMS did: the
/// volumes are the migrated server's disks).
fn mappings(spec: &AmiSpec) -> Vec<BlockDeviceMapping> {
    let devices = std::iter::once(ROOT_DEVICE_NAME.to_owned())
        .chain((0..spec.data.len()).filter_map(data_device_name));
    devices
        .zip(std::iter::once(&spec.root).chain(&spec.data))
        .map(|(device, volume)| {
            let ebs = EbsBlockDevice::builder()
                .snapshot_id(&volume.snapshot_id)
                .delete_on_termination(false)
                .volume_type(VolumeType::Gp3)
                .set_volume_size(volume.volume_size_gib.and_then(|g| i32::try_from(g).ok()))
                .build();
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(ebs)
                .build()
        })
        .collect()
}

fn tags(pairs: &[(String, String)]) -> Vec<Tag> {
    pairs
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Our AMI named `name`, if any.
async fn find_by_name(clients: &Clients, name: &str) -> Result<Option<Image>> {
    let out = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await
        .map_err(|e| ec2_error("DescribeImages", e))?;
    Ok(out
        .images
        .unwrap_or_default()
        .into_iter()
        .find(|i| i.name() == Some(name)))
}

/// The root snapshot an AMI maps.
pub(super) fn root_snapshot(image: &Image) -> Option<&str> {
    let root = image.root_device_name()?;
    image
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some(root))
        .and_then(|m| m.ebs())
        .and_then(|e| e.snapshot_id())
}

fn same_root_or_error(spec: &AmiSpec, existing: &Image) -> Result<String> {
    let id = existing.image_id().unwrap_or_default().to_owned();
    match root_snapshot(existing) {
        Some(snapshot) if snapshot == spec.root.snapshot_id => {
            tracing::info!(image_id = %id, name = %spec.name, "AMI already registered with this root snapshot");
            Ok(id)
        }
        other => Err(Error::InvalidInput(format!(
            "an AMI named {:?} already exists ({id}) with root snapshot {}, not {}: choose another --register-ami name or deregister {id}",
            spec.name,
            other.unwrap_or("(none)"),
            spec.root.snapshot_id
        ))),
    }
}

/// EC2's messages about a bad mapping name the snapshot, but not always which of ours
/// (root or a data disk) it was: add the list.
fn with_snapshots(err: Error, spec: &AmiSpec) -> Error {
    match err {
        Error::Aws {
            operation,
            code,
            message,
            kind,
        } => {
            let ids: Vec<&str> = std::iter::once(&spec.root)
                .chain(&spec.data)
                .map(|v| v.snapshot_id.as_str())
                .collect();
            Error::Aws {
                operation,
                code,
                message: format!(
                    "{message} (AMI {:?}, snapshots {})",
                    spec.name,
                    ids.join(", ")
                ),
                kind,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_disks_are_sdb_to_sdz() {
        assert_eq!(data_device_name(0).as_deref(), Some("/dev/sdb"));
        assert_eq!(data_device_name(24).as_deref(), Some("/dev/sdz"));
        assert_eq!(data_device_name(25), None);
    }

    #[test]
    fn mappings_keep_volumes_and_never_delete_them() {
        let spec = AmiSpec {
            name: "n".into(),
            description: None,
            root: SnapshotVolume {
                snapshot_id: "snap-root".into(),
                volume_size_gib: Some(8),
            },
            data: vec![SnapshotVolume {
                snapshot_id: "snap-data".into(),
                volume_size_gib: None,
            }],
            boot_mode: BootMode::Uefi,
            architecture: Architecture::X86_64,
            tags: vec![],
        };
        let m = mappings(&spec);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].device_name(), Some(ROOT_DEVICE_NAME));
        assert_eq!(m[1].device_name(), Some("/dev/sdb"));
        let root = m[0].ebs().unwrap();
        assert_eq!(
            (
                root.snapshot_id(),
                root.volume_size(),
                root.delete_on_termination()
            ),
            (Some("snap-root"), Some(8), Some(false))
        );
        assert_eq!(root.volume_type(), Some(&VolumeType::Gp3));
        assert_eq!(m[1].ebs().unwrap().volume_size(), None);
    }
}
