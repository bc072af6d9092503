//! `MultipartWriter` against the strict emulator: what is written arrives byte-exact, in
//! parts or in one put; a failing part, an abort or a drop leaves no upload open; parts in
//! memory stay within the bound; and a streamOptimized VMDK (full and delta) written
//! through it reads back through `S3Fs` as the disk it was made from.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Faults, Moto};
use rehost_diskimage::write::{self, OutputFormat};
use rehost_diskimage::{Disk, LocalFs, checksum};
use rehost_importer::aws::Clients;
use rehost_importer::retry::{RetryPolicy, is_retryable};
use rehost_importer::s3::{MultipartWriter, MultipartWriterOptions, S3Fs, S3Url};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

const MIB: usize = 1 << 20;

use common::{create_bucket, object, open_uploads, pattern};

fn requests(moto: &Moto, op: &str) -> u64 {
    moto.stats()["requests"][op].as_u64().unwrap_or(0)
}

/// Changes the emulator's fault settings at run time (this also zeroes its stats).
fn set_fault_rate(moto: &Moto, rate: f64) {
    let ok = Command::new("curl")
        .args([
            "-sf",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &format!("{{\"fault_rate\": {rate}}}"),
            &format!("{}/_rehost/config", moto.endpoint),
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "POST /_rehost/config failed");
}

fn options(part_mib: u64, in_flight: usize) -> MultipartWriterOptions {
    MultipartWriterOptions {
        part_size_bytes: Some(part_mib << 20),
        in_flight,
        ..MultipartWriterOptions::new(1 << 30)
    }
}

/// Writes `bytes` in uneven pieces (never aligned to a part) on a blocking thread, as the
/// image writers do, and returns the writer (not finished) or the first error.
async fn write_all(
    clients: &Clients,
    url: &S3Url,
    options: MultipartWriterOptions,
    bytes: Vec<u8>,
) -> Result<MultipartWriter, std::io::Error> {
    let mut w = MultipartWriter::create(clients, url, Handle::current(), options).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut at = 0;
        let mut step = 0;
        while at < bytes.len() {
            let n = (100_003 + 77_777 * (step % 13)).min(bytes.len() - at);
            w.write_all(&bytes[at..at + n])?;
            at += n;
            step += 1;
        }
        Ok(w)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_object_round_trips_byte_exactly_within_the_memory_bound() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    create_bucket(&clients, "exports").await;
    let url = S3Url::parse("s3://exports/vm1/disk.vmdk").unwrap();
    let bytes = pattern(27 * MIB + 12_345, 1);
    let w = write_all(&clients, &url, options(5, 2), bytes.clone())
        .await
        .unwrap();
    assert_eq!(w.part_size_bytes(), 5 << 20);
    assert_eq!(w.max_in_flight(), 2);
    let (report, peak) = tokio::task::spawn_blocking(move || {
        let peak = w.peak_parts_in_flight();
        (w.finish().unwrap(), peak)
    })
    .await
    .unwrap();
    // Six parts were handed over far faster than the emulator stores 5 MiB, so the
    // writer ran into the bound: never more than two parts (plus the one being filled)
    // were held.
    assert_eq!(peak, 2);
    assert_eq!(report.parts, 6);
    assert_eq!(report.size_bytes, bytes.len() as u64);
    assert_eq!(report.sha256, hex::encode(Sha256::digest(&bytes)));
    assert!(report.etag.ends_with("-6"), "{}", report.etag);
    assert_eq!(
        (report.bucket.as_str(), report.key.as_str()),
        ("exports", "vm1/disk.vmdk")
    );
    assert!(object(&clients, &url).await == bytes);
    assert_eq!(open_uploads(&clients, "exports").await, 0);
    assert_eq!(requests(&moto, "s3:UploadPart"), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_at_most_one_part_go_up_in_one_put() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    create_bucket(&clients, "exports").await;
    for (i, len) in [0, MIB + 7, 5 * MIB - 1].into_iter().enumerate() {
        let url = S3Url::parse(&format!("s3://exports/small{i}")).unwrap();
        let bytes = pattern(len, 2 + i as u64);
        let w = write_all(&clients, &url, options(5, 4), bytes.clone())
            .await
            .unwrap();
        let report = tokio::task::spawn_blocking(move || w.finish())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.parts, 1);
        assert_eq!(report.sha256, hex::encode(Sha256::digest(&bytes)));
        assert!(object(&clients, &url).await == bytes, "{len} bytes");
    }
    assert_eq!(requests(&moto, "s3:CreateMultipartUpload"), 0);
    assert_eq!(requests(&moto, "s3:PutObject"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_part_aborts_the_upload() {
    // Half the S3 calls fail. Part uploads get one attempt, so the first faulted part
    // fails the writer; creating, aborting and completing keep the importer's retries.
    let moto = Moto::start_with(&Faults {
        rate: 0.5,
        seed: 7,
        services: "s3".into(),
        ..Faults::default()
    });
    let clients = moto.clients().await;
    create_bucket(&clients, "exports").await;
    let url = S3Url::parse("s3://exports/failing.vmdk").unwrap();
    let options = MultipartWriterOptions {
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        ..options(5, 1)
    };
    let bytes = pattern(60 * MIB, 3);
    let inner: rehost_importer::Error = match write_all(&clients, &url, options, bytes).await {
        Err(err) => *err
            .into_inner()
            .and_then(|e| e.downcast::<rehost_importer::Error>().ok())
            .expect("the S3 error is kept inside the io::Error"),
        Ok(w) => match tokio::task::spawn_blocking(move || w.finish())
            .await
            .unwrap()
        {
            Ok(report) => panic!("twelve parts all passed a 50% fault rate: {report:?}"),
            Err(err) => err,
        },
    };
    let text = inner.to_string();
    assert!(is_retryable(inner.kind()), "{text}");
    assert!(
        text.contains("UploadPart") && text.contains("s3://exports/failing.vmdk part "),
        "{text}"
    );
    let stats = moto.stats();
    assert!(
        stats["requests"]["s3:AbortMultipartUpload"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{stats}"
    );
    set_fault_rate(&moto, 0.0);
    assert_eq!(open_uploads(&clients, "exports").await, 0);
    let head = clients
        .s3
        .head_object()
        .bucket("exports")
        .key("failing.vmdk")
        .send()
        .await;
    assert!(head.is_err(), "a failed upload left an object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_and_drop_without_finish_leave_no_upload_open() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    create_bucket(&clients, "exports").await;
    for explicit in [true, false] {
        let url = S3Url::parse(&format!("s3://exports/unfinished-{explicit}")).unwrap();
        let mut w = write_all(&clients, &url, options(5, 2), pattern(12 * MIB, 4))
            .await
            .unwrap();
        // Two parts stored, one partly filled: the upload is open.
        w = tokio::task::spawn_blocking(move || {
            w.flush().unwrap();
            w
        })
        .await
        .unwrap();
        assert_eq!(open_uploads(&clients, "exports").await, 1);
        if explicit {
            // abort() waits for S3 to confirm.
            tokio::task::spawn_blocking(move || w.abort())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(open_uploads(&clients, "exports").await, 0);
        } else {
            // A drop aborts in the background.
            tokio::task::spawn_blocking(move || drop(w)).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while open_uploads(&clients, "exports").await > 0 {
                assert!(Instant::now() < deadline, "the dropped upload stays open");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(requests(&moto, "s3:CompleteMultipartUpload"), 0);
    assert!(requests(&moto, "s3:AbortMultipartUpload") >= 2);
}

/// A raw disk with data and zeros, and a changed copy of it.
fn disks(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let size = 16 * MIB + 3 * 65536 + 512;
    let mut v0 = vec![0u8; size];
    // Incompressible data, so the VMDK needs more than one 5 MiB part.
    v0[..11 * MIB].copy_from_slice(&pattern(11 * MIB, 8));
    v0[12 * MIB..13 * MIB].fill(0x5a);
    v0[size - 512..].fill(0xee);
    let mut v1 = v0.clone();
    v1[65536..2 * 65536].fill(0); // zeroed: the delta must store it
    v1[14 * MIB..14 * MIB + 1000].fill(0x17);
    let (p0, p1) = (dir.join("v0.raw"), dir.join("v1.raw"));
    std::fs::write(&p0, v0).unwrap();
    std::fs::write(&p1, v1).unwrap();
    (p0, p1)
}

fn local_sha256(path: &Path) -> [u8; 32] {
    let disk = Disk::open_with(&LocalFs, path.to_str().unwrap()).unwrap();
    checksum::sha256(&disk, 2, &mut |_| {}).unwrap()
}

/// Streams `raw` as a streamOptimized VMDK to `url` (a delta of `parent`, read back from
/// S3, if given) with small parts, on a blocking thread.
async fn export(clients: &Clients, raw: &Path, url: &S3Url, parent: Option<&str>) {
    let disk = Disk::open(raw.to_str().unwrap()).unwrap();
    let size = disk.virtual_size();
    let max = write::max_stream_bytes(OutputFormat::VmdkStream, size).unwrap();
    assert!(max > size);
    let options = MultipartWriterOptions {
        part_size_bytes: Some(5 << 20),
        ..MultipartWriterOptions::new(max)
    };
    let mut upload = MultipartWriter::create(clients, url, Handle::current(), options).unwrap();
    let fs = S3Fs::new(clients.s3.clone(), &url.bucket, Handle::current());
    let (parent, name) = (parent.map(str::to_owned), url.to_string());
    let report = tokio::task::spawn_blocking(move || {
        match parent {
            None => {
                let sink =
                    write::create_stream(&mut upload, OutputFormat::VmdkStream, size, None, name)
                        .unwrap();
                write::convert(&disk, sink, 2, &mut |_| {}).unwrap();
            }
            Some(key) => {
                let parent = Disk::open_with(&fs, &key).unwrap();
                let info = parent.top().info();
                let link = rehost_diskimage::ParentLink {
                    relative_path: key.rsplit('/').next().unwrap().to_owned(),
                    absolute_path: key.clone(),
                    id: info.id.clone().unwrap(),
                    virtual_size_bytes: info.virtual_size_bytes,
                };
                let sink = write::create_stream(
                    &mut upload,
                    OutputFormat::VmdkStream,
                    size,
                    Some(link),
                    name,
                )
                .unwrap();
                write::convert_delta(&disk, &parent, sink, &mut |_| {}).unwrap();
            }
        }
        upload.finish().unwrap()
    })
    .await
    .unwrap();
    assert!(report.size_bytes <= max);
}

async fn s3_sha256(clients: &Clients, bucket: &str, key: &str) -> ([u8; 32], usize) {
    let fs = S3Fs::new(clients.s3.clone(), bucket, Handle::current());
    let key = key.to_owned();
    tokio::task::spawn_blocking(move || {
        let disk = Disk::open_with(&fs, &key).unwrap();
        (
            checksum::sha256(&disk, 2, &mut |_| {}).unwrap(),
            disk.layers().len(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_vmdk_exports_written_through_it_read_back_from_s3() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    create_bucket(&clients, "exports").await;
    let dir = tempfile::tempdir().unwrap();
    let (v0, v1) = disks(dir.path());

    let full = S3Url::parse("s3://exports/vm1/full.vmdk").unwrap();
    export(&clients, &v0, &full, None).await;
    let (sum, layers) = s3_sha256(&clients, "exports", "vm1/full.vmdk").await;
    assert_eq!((sum, layers), (local_sha256(&v0), 1));
    // The upload really went in parts (the image is larger than one 5 MiB part).
    assert!(requests(&moto, "s3:UploadPart") >= 2);

    let inc = S3Url::parse("s3://exports/vm1/inc1.vmdk").unwrap();
    export(&clients, &v1, &inc, Some("vm1/full.vmdk")).await;
    let (sum, layers) = s3_sha256(&clients, "exports", "vm1/inc1.vmdk").await;
    assert_eq!(
        layers, 2,
        "the delta resolves its parent in the same prefix"
    );
    assert_eq!(sum, local_sha256(&v1));
    assert_ne!(local_sha256(&v0), local_sha256(&v1));
    // The delta holds only what changed: far smaller than the full export.
    let size = |key: &'static str| {
        let clients = clients.s3.clone();
        async move {
            clients
                .head_object()
                .bucket("exports")
                .key(key)
                .send()
                .await
                .unwrap()
                .content_length()
                .unwrap()
        }
    };
    let (full_len, inc_len) = (size("vm1/full.vmdk").await, size("vm1/inc1.vmdk").await);
    assert!(inc_len * 10 < full_len, "{inc_len} vs {full_len}");
    assert_eq!(open_uploads(&clients, "exports").await, 0);
}
