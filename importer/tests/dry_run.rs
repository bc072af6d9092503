//! `dry_run`: the import's reading half into a null sink plans exactly the blocks, and the
//! linear checksum, an independent computation over the image gives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use rehost_core::ErrorKind;
use rehost_diskimage::Disk;
use rehost_importer::blocks::{BLOCK_LEN, LinearChecksum, block_sha256};
use rehost_importer::ebs::journal::{JournalLocation, SourceIdentity};
use rehost_importer::ebs::uploader::Encryption;
use rehost_importer::import::{ImportOptions, dry_run};

/// 40 blocks: data in a few blocks (one partly), the rest zero, so the plan has to skip.
fn content() -> Vec<u8> {
    let mut disk = vec![0u8; 40 * BLOCK_LEN];
    for (block, byte) in [(0usize, 0x11u8), (7, 0x77), (8, 0x88), (39, 0xff)] {
        disk[block * BLOCK_LEN..(block + 1) * BLOCK_LEN].fill(byte);
    }
    disk[20 * BLOCK_LEN + 4096..20 * BLOCK_LEN + 4608].fill(0x20);
    disk
}

/// The blocks an import must write (the non-zero ones) and their linear checksum, computed
/// straight from the bytes.
fn expected(content: &[u8]) -> (u64, String) {
    let mut linear = LinearChecksum::default();
    for (index, block) in content.chunks(BLOCK_LEN).enumerate() {
        if block.iter().any(|&b| b != 0) {
            linear
                .add(u64::try_from(index).unwrap(), &block_sha256(block))
                .unwrap();
        }
    }
    (linear.blocks(), linear.finish())
}

fn options(path: &Path) -> ImportOptions {
    ImportOptions::new(
        SourceIdentity::local(path).unwrap(),
        JournalLocation {
            dir: path.parent().unwrap().to_path_buf(),
            file: None,
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_plans_the_non_zero_blocks_of_every_format_with_their_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, content()).unwrap();
    let (blocks, checksum) = expected(&content());
    assert_eq!(blocks, 5);
    for (format, options_flag) in [
        ("raw", None),
        ("vmdk", Some("subformat=streamOptimized")),
        ("vhdx", None),
    ] {
        let path = if format == "raw" {
            raw.clone()
        } else {
            let out = dir.path().join(format!("disk.{format}"));
            let mut cmd = Command::new("qemu-img");
            cmd.args(["convert", "-f", "raw", "-O", format]);
            if let Some(o) = options_flag {
                cmd.args(["-o", o]);
            }
            let status = cmd.arg(&raw).arg(&out).status().expect("qemu-img");
            assert!(status.success(), "qemu-img convert to {format}");
            out
        };
        let disk = Disk::open(path.to_str().unwrap()).unwrap();
        let report = dry_run(&disk, &options(&path)).await.unwrap();
        assert_eq!(report.blocks_written, blocks, "{format}");
        assert_eq!(report.linear_checksum, checksum, "{format}");
        assert_eq!(report.volume_size_gib, 1, "{format}");
        assert_eq!(report.blocks_skipped, 2048 - blocks, "{format}");
        assert_eq!(report.virtual_size_bytes, 40 * BLOCK_LEN as u64, "{format}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_dry_run_plans_every_block_and_a_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, content()).unwrap();
    let disk = Disk::open(raw.to_str().unwrap()).unwrap();
    let mut o = options(&raw);
    o.encryption = Encryption::Encrypted { kms_key_arn: None };
    let report = dry_run(&disk, &o).await.unwrap();
    assert!(report.encrypted);
    assert_eq!(report.blocks_written, 2048);
    assert_eq!(report.blocks_skipped, 0);

    let mut o = options(&raw);
    o.parent_snapshot_id = Some("snap-0123456789abcdef0".into());
    let err = dry_run(&disk, &o).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}
