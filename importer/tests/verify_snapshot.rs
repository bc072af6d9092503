//! `verify` and `download` against the strict emulator, on snapshots written here with raw
//! EBS calls (so these tests do not depend on the importer's own upload).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap
)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::{Faults, Moto};
use rehost_diskimage::Disk;
use rehost_diskimage::write::{self, OutputFormat};
use rehost_importer::blocks::BLOCK_LEN;
use rehost_importer::s3::{S3Fs, S3Url, StageOptions, stage};
use rehost_importer::verify::{self, BlockDifference, DifferenceKind, ReadOptions};

const MIB: usize = 1 << 20;

/// 5 MiB: blocks 0–3 data, 4–5 zero, 6 data, 7 partly data, 8–9 zero.
fn image_bytes() -> Vec<u8> {
    let mut bytes = vec![0u8; 5 * MIB];
    for (i, b) in bytes.iter_mut().enumerate() {
        let block = i / BLOCK_LEN;
        if block < 4 || block == 6 || (block == 7 && i % BLOCK_LEN < 1000) {
            *b = (i % 253) as u8 + 1;
        }
    }
    bytes
}

/// Writes `bytes` as a dynamic VHDX (so verification reads through a format, not raw).
fn vhdx(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, bytes).unwrap();
    let disk = Disk::open(raw.to_str().unwrap()).unwrap();
    let out = dir.join(name);
    let sink = write::create(&out, OutputFormat::Vhdx, disk.virtual_size(), None).unwrap();
    write::convert(&disk, sink, 2, &mut |_| {}).unwrap();
    out
}

fn open(path: &Path) -> Disk {
    Disk::open(path.to_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_identical_then_names_the_changed_blocks() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = image_bytes();
    let snapshot_id = common::put_snapshot(&clients, &bytes).await;

    let image = vhdx(dir.path(), "same.vhdx", &bytes);
    let report = verify::verify(&clients, &snapshot_id, &open(&image), |_| {})
        .await
        .unwrap();
    assert!(report.identical, "{report:?}");
    assert_eq!(
        (
            report.snapshot_blocks,
            report.image_data_blocks,
            report.differing_blocks
        ),
        (6, 6, 0)
    );
    assert_eq!(
        (report.volume_size_bytes, report.image_size_bytes),
        (1 << 30, bytes.len() as u64)
    );

    // One byte changed in block 2, block 5 (zero in the snapshot) gets data, block 6 is
    // zeroed (the snapshot still has it).
    let mut changed = bytes.clone();
    changed[2 * BLOCK_LEN + 77] ^= 0xff;
    changed[5 * BLOCK_LEN + 3] = 9;
    changed[6 * BLOCK_LEN..7 * BLOCK_LEN].fill(0);
    let image = vhdx(dir.path(), "changed.vhdx", &changed);
    let report = verify::verify(&clients, &snapshot_id, &open(&image), |_| {})
        .await
        .unwrap();
    assert!(!report.identical);
    assert_eq!(report.differing_blocks, 3);
    assert_eq!(
        report.first_differences,
        vec![
            BlockDifference {
                block_index: 2,
                kind: DifferenceKind::ContentDiffers
            },
            BlockDifference {
                block_index: 5,
                kind: DifferenceKind::MissingFromSnapshot
            },
            BlockDifference {
                block_index: 6,
                kind: DifferenceKind::ExtraInSnapshot
            },
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reads_an_image_from_s3_and_follows_list_pages() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    common::create_bucket(&clients, "images").await;
    let dir = tempfile::tempdir().unwrap();
    // 101 blocks with a little data each: more than one page of 100.
    let mut bytes = vec![0u8; 101 * BLOCK_LEN];
    for block in 0..101 {
        bytes[block * BLOCK_LEN + block] = block as u8 + 1;
    }
    let snapshot_id = common::put_snapshot(&clients, &bytes).await;
    let image = vhdx(dir.path(), "many.vhdx", &bytes);
    let url = S3Url::parse("s3://images/many.vhdx").unwrap();
    stage(&clients, &image, &url, &StageOptions::default(), &|_| {})
        .await
        .unwrap();
    let fs = S3Fs::new(
        clients.s3.clone(),
        "images",
        tokio::runtime::Handle::current(),
    );
    let disk = tokio::task::spawn_blocking(move || Disk::open_with(&fs, "many.vhdx").unwrap())
        .await
        .unwrap();
    let options = ReadOptions {
        list_page_size: 100,
        ..ReadOptions::default()
    };
    let report = verify::verify_with(&clients, &snapshot_id, &disk, &options, |_| {})
        .await
        .unwrap();
    assert!(report.identical, "{report:?}");
    assert_eq!(report.snapshot_blocks, 101);
    assert_eq!(moto.stats()["requests"]["ebs:ListSnapshotBlocks"], 2);
}

/// Turns fault injection on at run time for one service (`POST /_rehost/config`).
fn inject_faults(moto: &Moto, rate: f64, seed: u64, services: &str) {
    let body = format!(
        r#"{{"fault_rate": {rate}, "fault_seed": {seed}, "fault_services": ["{services}"]}}"#
    );
    let status = std::process::Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &body,
        ])
        .arg(format!("{}/_rehost/config", moto.endpoint))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_download_ride_out_ebs_faults() {
    let moto = Moto::start_with(&Faults::default());
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = image_bytes();
    // Written with faults off (the helper does not retry), read back with them on.
    let snapshot_id = common::put_snapshot(&clients, &bytes).await;
    inject_faults(&moto, 0.05, 11, "ebs");
    let image = vhdx(dir.path(), "same.vhdx", &bytes);
    let report = verify::verify(&clients, &snapshot_id, &open(&image), |_| {})
        .await
        .unwrap();
    assert!(report.identical, "{report:?}");
    let out = dir.path().join("snap.raw");
    verify::download(
        &clients,
        &snapshot_id,
        &out,
        &ReadOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    let downloaded = std::fs::read(&out).unwrap();
    assert!(downloaded[..bytes.len()] == bytes[..]);
    assert!(
        moto.stats()["faults_total"].as_u64().unwrap() > 0,
        "no fault injected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_writes_the_volume_as_a_sparse_raw_file() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = image_bytes();
    let snapshot_id = common::put_snapshot(&clients, &bytes).await;
    let out = dir.path().join("snap.raw");
    std::fs::write(&out, b"old contents").unwrap();
    let report = verify::download(
        &clients,
        &snapshot_id,
        &out,
        &ReadOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((report.snapshot_blocks, report.blocks_written), (6, 6));
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.len(), 1 << 30);
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "not sparse: {} bytes allocated",
        meta.blocks() * 512
    );
    let downloaded = std::fs::read(&out).unwrap();
    assert!(downloaded[..bytes.len()] == bytes[..]);
    assert!(downloaded[bytes.len()..].iter().all(|&b| b == 0));
    assert!(!dir.path().join("snap.raw.part").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_snapshot_is_a_clear_error() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let err = verify::download(
        &clients,
        "snap-0123456789abcdef0",
        &dir.path().join("x"),
        &ReadOptions::default(),
        |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("snap-0123456789abcdef0"), "{err}");
    assert_eq!(err.kind(), rehost_core::ErrorKind::NotFound, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_replaced_in_s3_during_verify_fails_it() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    common::create_bucket(&clients, "images").await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = image_bytes();
    let snapshot_id = common::put_snapshot(&clients, &bytes).await;
    let image = vhdx(dir.path(), "d.vhdx", &bytes);
    assert!(
        std::fs::metadata(&image).unwrap().len() > 4 << 20,
        "the image must span several read windows"
    );
    let url = S3Url::parse("s3://images/d.vhdx").unwrap();
    stage(&clients, &image, &url, &StageOptions::default(), &|_| {})
        .await
        .unwrap();
    let fs = S3Fs::new(
        clients.s3.clone(),
        "images",
        tokio::runtime::Handle::current(),
    );
    let disk = tokio::task::spawn_blocking(move || Disk::open_with(&fs, "d.vhdx").unwrap())
        .await
        .unwrap();
    // Replaced after open: the reads past the first window are refused by If-Match.
    clients
        .s3
        .put_object()
        .bucket("images")
        .key("d.vhdx")
        .body(vec![0u8; 1024].into())
        .send()
        .await
        .unwrap();
    let err = verify::verify(&clients, &snapshot_id, &disk, |_| {})
        .await
        .unwrap_err();
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        chain.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    assert!(
        chain.contains("s3://images/d.vhdx") && chain.contains("replaced while being read"),
        "{chain}"
    );
}
