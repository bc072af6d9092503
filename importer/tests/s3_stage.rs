//! `stage` against the strict emulator: multipart uploads equal the file, leave no upload
//! open, survive injected S3 faults, and fail clearly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Faults, Moto};
use rehost_core::ErrorKind;
use rehost_importer::s3::{S3Url, StageOptions, stage};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

use common::{create_bucket, object, open_uploads, pattern};

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn small_parts() -> StageOptions {
    StageOptions {
        part_size_bytes: Some(5 * MIB as u64),
        concurrency: 3,
        ..StageOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_stage_equals_the_file_and_leaves_no_upload_open() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    create_bucket(&clients, "staging").await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = pattern(12 * MIB + 12_345, 1);
    let path = write_file(dir.path(), "disk.vmdk", &bytes);
    let url = S3Url::parse("s3://staging/vms/web/disk.vmdk").unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let report = stage(&clients, &path, &url, &small_parts(), &|done| {
        seen.lock().unwrap().push(done)
    })
    .await
    .unwrap();

    assert_eq!(report.parts, 3);
    assert_eq!(report.size_bytes, bytes.len() as u64);
    assert_eq!(report.sha256, sha256_hex(&bytes));
    assert!(report.etag.ends_with("-3"), "{}", report.etag);
    assert!(object(&clients, &url).await == bytes);
    assert_eq!(open_uploads(&clients, "staging").await, 0);
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.last(), Some(&(bytes.len() as u64)));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    assert_eq!(moto.stats()["requests"]["s3:UploadPart"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_smaller_than_a_part_goes_up_in_one_put() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    create_bucket(&clients, "staging").await;
    let dir = tempfile::tempdir().unwrap();
    let bytes = pattern(MIB + 7, 2);
    let path = write_file(dir.path(), "small.vhd", &bytes);
    let url = S3Url::parse("s3://staging/small.vhd").unwrap();
    let report = stage(&clients, &path, &url, &StageOptions::default(), &|_| {})
        .await
        .unwrap();
    assert_eq!(
        (report.parts, report.sha256.as_str()),
        (1, sha256_hex(&bytes).as_str())
    );
    assert!(object(&clients, &url).await == bytes);
    assert!(
        moto.stats()["requests"]
            .get("s3:CreateMultipartUpload")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_completes_with_five_percent_of_s3_calls_failing() {
    let moto = Moto::start_with(&Faults {
        rate: 0.05,
        seed: 3,
        services: "s3".into(),
        ..Faults::default()
    });
    let clients = moto.clients().await;
    create_bucket(&clients, "flaky").await;
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3u64 {
        let bytes = pattern(16 * MIB + 99, 10 + i);
        let path = write_file(dir.path(), &format!("d{i}.raw"), &bytes);
        let url = S3Url::parse(&format!("s3://flaky/d{i}.raw")).unwrap();
        let report = stage(&clients, &path, &url, &small_parts(), &|_| {})
            .await
            .unwrap();
        assert_eq!(report.sha256, sha256_hex(&bytes));
        let stored = loop {
            // Reading back may be faulted too.
            if let Ok(out) = clients
                .s3
                .get_object()
                .bucket("flaky")
                .key(&url.key)
                .send()
                .await
            {
                if let Ok(body) = out.body.collect().await {
                    break body.into_bytes().to_vec();
                }
            }
        };
        assert!(stored == bytes, "d{i} differs");
    }
    let mut open = None;
    while open.is_none() {
        open = clients
            .s3
            .list_multipart_uploads()
            .bucket("flaky")
            .send()
            .await
            .ok()
            .map(|o| o.uploads().len());
    }
    assert_eq!(open, Some(0));
    let stats = moto.stats();
    assert!(
        stats["faults_total"].as_u64().unwrap() > 0,
        "no fault was injected: the retry paths did not run: {stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_to_a_missing_bucket_fails_clearly() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "disk.raw", &pattern(11 * MIB, 4));
    let url = S3Url::parse("s3://no-such-bucket/disk.raw").unwrap();
    let err = stage(&clients, &path, &url, &small_parts(), &|_| {})
        .await
        .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{text}");
    assert!(
        text.contains("NoSuchBucket") && text.contains("s3://no-such-bucket/disk.raw"),
        "{text}"
    );
    assert!(moto.stats()["requests"].get("s3:UploadPart").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stage_aborts_its_upload() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    create_bucket(&clients, "staging").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "big.raw", &pattern(30 * MIB, 5));
    let url = S3Url::parse("s3://staging/big.raw").unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let options = StageOptions {
        concurrency: 1,
        cancel: Some(cancel.clone()),
        ..small_parts()
    };
    let err = stage(&clients, &path, &url, &options, &|_| {
        cancel.store(true, Ordering::Relaxed)
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(err.kind(), rehost_core::ErrorKind::Cancelled);
    assert!(moto.stats()["requests"]["s3:UploadPart"].as_u64().unwrap() < 6);
    assert_eq!(moto.stats()["requests"]["s3:AbortMultipartUpload"], 1);
    assert_eq!(open_uploads(&clients, "staging").await, 0);
    let missing = clients
        .s3
        .head_object()
        .bucket("staging")
        .key("big.raw")
        .send()
        .await;
    assert!(missing.is_err(), "a cancelled stage left an object");
}
