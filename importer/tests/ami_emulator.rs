//! AMIs against the strict emulator: images made by `scripts/make-boot-image.sh`, boot
//! facts read from them, snapshots made with raw EBS calls, registered and pruned.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aws_sdk_ec2::types::{ArchitectureValues, BootModeValues, Image, VolumeType};
use common::Moto;
use rehost_diskimage::Disk;
use rehost_importer::Error;
use rehost_importer::ami::{
    self, AmiSpec, Architecture, BootMode, BootRequest, ROOT_DEVICE_NAME, SnapshotVolume, TagFilter,
};
use rehost_importer::aws::Clients;
use rehost_importer::blocks::BLOCK_LEN;
use rehost_importer::bootinfo::{self, PartitionTable};

/// Builds a boot image with the repository's script (`uefi`, `uefi-arm64` or `bios`).
fn boot_image(dir: &Path, mode: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-boot-image.sh");
    let out = dir.join(format!("{mode}.raw"));
    let status = Command::new("bash")
        .arg(script)
        .arg(&out)
        .arg(mode)
        .status()
        .expect("run make-boot-image.sh");
    assert!(status.success(), "make-boot-image.sh {mode} failed");
    out
}

/// A completed 1 GiB snapshot holding `first_block` at index 0.
async fn snapshot(clients: &Clients, first_block: &[u8]) -> String {
    let block = &first_block[..first_block.len().min(BLOCK_LEN)];
    common::put_snapshot(clients, block).await
}

async fn describe(clients: &Clients, image_id: &str) -> Image {
    let out = clients
        .ec2
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .unwrap();
    out.images()
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{image_id} not described"))
}

async fn snapshot_exists(clients: &Clients, id: &str) -> bool {
    match clients
        .ec2
        .describe_snapshots()
        .snapshot_ids(id)
        .send()
        .await
    {
        Ok(out) => !out.snapshots().is_empty(),
        Err(_) => false,
    }
}

fn spec(
    name: &str,
    root: &str,
    data: &[&str],
    boot_mode: BootMode,
    tags: &[(&str, &str)],
) -> AmiSpec {
    AmiSpec {
        name: name.into(),
        description: Some(format!("{name} by the AMI tests")),
        root: SnapshotVolume {
            snapshot_id: root.into(),
            volume_size_gib: Some(2),
        },
        data: data
            .iter()
            .map(|s| SnapshotVolume {
                snapshot_id: (*s).into(),
                volume_size_gib: None,
            })
            .collect(),
        boot_mode,
        architecture: Architecture::X86_64,
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

#[tokio::test]
async fn a_gpt_esp_image_registers_as_uefi_x86_64_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = boot_image(dir.path(), "uefi");
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    let info = bootinfo::detect(&disk).unwrap();
    assert!(matches!(info.partition_table, PartitionTable::Gpt(_)));
    assert_eq!(info.loader.as_deref(), Some("EFI/BOOT/BOOTX64.EFI"));
    let (boot_mode, architecture) = ami::resolve_boot(&disk, BootRequest::default()).unwrap();
    assert_eq!(
        (boot_mode, architecture),
        (BootMode::Uefi, Architecture::X86_64)
    );

    let moto = Moto::start();
    let clients = moto.clients().await;
    let root = snapshot(&clients, &std::fs::read(&path).unwrap()).await;
    let mut wanted = spec(
        "uefi-server",
        &root,
        &[],
        boot_mode,
        &[("rehost:server", "web1")],
    );
    wanted.architecture = architecture;
    let ami_id = ami::register(&clients, wanted.clone()).await.unwrap();

    let image = describe(&clients, &ami_id).await;
    assert_eq!(image.boot_mode(), Some(&BootModeValues::Uefi));
    assert_eq!(image.architecture(), Some(&ArchitectureValues::X8664));
    assert_eq!(image.ena_support(), Some(true));
    assert_eq!(image.root_device_name(), Some(ROOT_DEVICE_NAME));
    let mappings = image.block_device_mappings();
    assert_eq!(mappings.len(), 1);
    assert_eq!(mappings[0].device_name(), Some(ROOT_DEVICE_NAME));
    let ebs = mappings[0].ebs().unwrap();
    assert_eq!(ebs.snapshot_id(), Some(root.as_str()));
    assert_eq!(ebs.delete_on_termination(), Some(false));
    assert_eq!(ebs.volume_type(), Some(&VolumeType::Gp3));
    assert_eq!(ebs.volume_size(), Some(2));
    assert!(
        image
            .tags()
            .iter()
            .any(|t| t.key() == Some("rehost:server") && t.value() == Some("web1"))
    );
    let snap = clients
        .ec2
        .describe_snapshots()
        .snapshot_ids(&root)
        .send()
        .await
        .unwrap();
    assert!(
        snap.snapshots()[0]
            .tags()
            .iter()
            .any(|t| t.key() == Some("rehost:server"))
    );

    // A re-run with the same root snapshot finds the AMI instead of failing on its name.
    assert_eq!(
        ami::register(&clients, wanted.clone()).await.unwrap(),
        ami_id
    );
    // The same name over another snapshot is somebody else's AMI: refused, saying why.
    let other = snapshot(&clients, b"other").await;
    let err = ami::register(&clients, spec("uefi-server", &other, &[], boot_mode, &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput(ref m) if m.contains(&ami_id) && m.contains(&other)),
        "{err}"
    );
}

#[tokio::test]
async fn an_mbr_image_registers_as_legacy_bios_with_its_data_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = boot_image(dir.path(), "bios");
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    let info = bootinfo::detect(&disk).unwrap();
    assert!(matches!(info.partition_table, PartitionTable::Mbr(_)));
    let (boot_mode, architecture) = ami::resolve_boot(&disk, BootRequest::default()).unwrap();
    assert_eq!(
        (boot_mode, architecture),
        (BootMode::LegacyBios, Architecture::X86_64)
    );

    let moto = Moto::start();
    let clients = moto.clients().await;
    let root = snapshot(&clients, &std::fs::read(&path).unwrap()).await;
    let data = snapshot(&clients, b"data disk").await;
    let ami_id = ami::register(
        &clients,
        spec("bios-server", &root, &[&data], boot_mode, &[]),
    )
    .await
    .unwrap();

    let image = describe(&clients, &ami_id).await;
    assert_eq!(image.boot_mode(), Some(&BootModeValues::LegacyBios));
    assert_eq!(image.ena_support(), Some(true));
    let mappings: Vec<_> = image
        .block_device_mappings()
        .iter()
        .map(|m| {
            let ebs = m.ebs().unwrap();
            (
                m.device_name().unwrap(),
                ebs.snapshot_id().unwrap(),
                ebs.delete_on_termination(),
            )
        })
        .collect();
    assert_eq!(
        mappings,
        [
            (ROOT_DEVICE_NAME, root.as_str(), Some(false)),
            ("/dev/sdb", data.as_str(), Some(false))
        ]
    );
}

#[test]
fn an_arm64_loader_gives_an_arm64_uefi_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = boot_image(dir.path(), "uefi-arm64");
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    assert_eq!(
        ami::resolve_boot(&disk, BootRequest::default()).unwrap(),
        (BootMode::Uefi, Architecture::Arm64)
    );
    // What the user says wins over the image.
    let asked = BootRequest {
        boot_mode: Some(BootMode::Uefi),
        architecture: Some(Architecture::X86_64),
    };
    assert_eq!(
        ami::resolve_boot(&disk, asked).unwrap(),
        (BootMode::Uefi, Architecture::X86_64)
    );
}

#[tokio::test]
async fn an_unknown_snapshot_is_a_clear_error() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let missing = "snap-0123456789abcdef0";
    let err = ami::register(&clients, spec("ghost", missing, &[], BootMode::Uefi, &[]))
        .await
        .unwrap_err();
    match &err {
        Error::Aws {
            operation,
            code,
            message,
            ..
        } => {
            assert_eq!(*operation, "RegisterImage");
            assert_eq!(code.as_deref(), Some("InvalidSnapshot.NotFound"));
            assert!(message.contains(missing), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.kind(), rehost_core::ErrorKind::NotFound);
}

#[tokio::test]
async fn prune_keeps_the_newest_and_never_a_snapshot_still_mapped() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let tag = [("rehost:server", "db1")];
    let (s1, s2, s3, shared, untagged_root) = (
        snapshot(&clients, b"1").await,
        snapshot(&clients, b"2").await,
        snapshot(&clients, b"3").await,
        snapshot(&clients, b"shared").await,
        snapshot(&clients, b"untagged").await,
    );
    let mut amis = Vec::new();
    for (name, root, data) in [
        ("db1-a", &s1, Some(&shared)),
        ("db1-b", &s2, None),
        ("db1-c", &s3, Some(&shared)),
    ] {
        let data: Vec<&str> = data.map(|d| d.as_str()).into_iter().collect();
        amis.push(
            ami::register(&clients, spec(name, root, &data, BootMode::Uefi, &tag))
                .await
                .unwrap(),
        );
        // Creation dates must differ for "newest" to mean something, and the emulator's
        // may be whole seconds (AWS's carry milliseconds).
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let untagged = ami::register(
        &clients,
        spec("other", &untagged_root, &[&s2], BootMode::Uefi, &[]),
    )
    .await
    .unwrap();
    let filter: TagFilter = "rehost:server=db1".parse().unwrap();

    let dry = ami::prune(&clients, &filter, 1, true).await.unwrap();
    assert!(dry.dry_run);
    assert_eq!(
        dry.plan
            .keep
            .iter()
            .map(|a| a.image_id.as_str())
            .collect::<Vec<_>>(),
        [amis[2].as_str()]
    );
    assert_eq!(dry.plan.deregister.len(), 2);
    assert!(
        describe_ids(&clients).await.contains(&amis[0]),
        "a dry run changes nothing"
    );

    let report = ami::prune(&clients, &filter, 1, false).await.unwrap();
    assert_eq!(report.plan, dry.plan);
    // s1 goes; s2 stays for the untagged AMI, `shared` for the kept one.
    assert_eq!(report.plan.delete_snapshots, std::slice::from_ref(&s1));
    let mut retained: Vec<_> = report
        .plan
        .retained_snapshots
        .iter()
        .map(|r| (r.snapshot_id.clone(), r.used_by.clone()))
        .collect();
    retained.sort();
    let mut expected = vec![
        (s2.clone(), vec![untagged.clone()]),
        (shared.clone(), vec![amis[2].clone()]),
    ];
    expected.sort();
    assert_eq!(retained, expected);

    let left = describe_ids(&clients).await;
    assert!(left.contains(&amis[2]) && left.contains(&untagged));
    assert!(!left.contains(&amis[0]) && !left.contains(&amis[1]));
    assert!(!snapshot_exists(&clients, &s1).await);
    for kept in [&s2, &s3, &shared, &untagged_root] {
        assert!(snapshot_exists(&clients, kept).await, "{kept} was deleted");
    }
    // Pruning again finds nothing more to do.
    let again = ami::prune(&clients, &filter, 1, false).await.unwrap();
    assert!(again.plan.deregister.is_empty() && again.plan.delete_snapshots.is_empty());
}

async fn describe_ids(clients: &Clients) -> Vec<String> {
    let out = clients
        .ec2
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap();
    out.images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_owned))
        .collect()
}
