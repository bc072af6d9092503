//! Reading images from S3 through `S3Fs`/`S3ReadAt` against the strict emulator: every
//! format reads the same as from the local file, multi-file VMDKs find their extents, few
//! requests are made, and an object replaced mid-read is an error.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::Moto;
use rehost_diskimage::write::{self, OutputFormat};
use rehost_diskimage::{Disk, LocalFs, ReadAt, checksum};
use rehost_importer::aws::Clients;
use rehost_importer::s3::{S3Fs, S3ReadAt, S3Url, StageOptions, stage};

const MIB: usize = 1 << 20;

/// A 6 MiB raw disk: data, a zero MiB, a sparse stretch, data to the end.
fn raw_image(dir: &Path) -> PathBuf {
    let mut bytes = vec![0u8; 6 * MIB];
    for (i, b) in bytes.iter_mut().enumerate() {
        let in_data =
            i < 2 * MIB || (3 * MIB + 4096..3 * MIB + 8192).contains(&i) || i >= 5 * MIB - 512;
        if in_data {
            *b = (i % 251) as u8 ^ (i / 65536) as u8;
        }
    }
    let path = dir.join("disk.raw");
    std::fs::write(&path, bytes).unwrap();
    path
}

fn convert(raw: &Path, out: &Path, format: OutputFormat) {
    let disk = Disk::open(raw.to_str().unwrap()).unwrap();
    let sink = write::create(out, format, disk.virtual_size(), None).unwrap();
    write::convert(&disk, sink, 2, &mut |_| {}).unwrap();
}

fn local_sha256(path: &Path) -> [u8; 32] {
    let disk = Disk::open_with(&LocalFs, path.to_str().unwrap()).unwrap();
    checksum::sha256(&disk, 2, &mut |_| {}).unwrap()
}

/// Opens `key` through `S3Fs` and hashes it, on a blocking thread as the reader requires.
async fn s3_sha256(clients: &Clients, bucket: &str, key: &str) -> ([u8; 32], String) {
    let fs = S3Fs::new(
        clients.s3.clone(),
        bucket,
        tokio::runtime::Handle::current(),
    );
    let key = key.to_owned();
    tokio::task::spawn_blocking(move || {
        let disk = Disk::open_with(&fs, &key).unwrap();
        let format = format!("{} {}", disk.format(), disk.top().info().subformat);
        (checksum::sha256(&disk, 3, &mut |_| {}).unwrap(), format)
    })
    .await
    .unwrap()
}

async fn put(clients: &Clients, bucket: &str, key: &str, bytes: Vec<u8>) {
    clients
        .s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(bytes.into())
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_staged_to_s3_read_back_with_the_local_checksum() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    common::create_bucket(&clients, "images").await;
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_image(dir.path());
    let expected = local_sha256(&raw);
    let mut staged_bytes = 0;
    for (name, format) in [
        ("d.vmdk", OutputFormat::VmdkSparse),
        ("s.vmdk", OutputFormat::VmdkStream),
        ("d.vhdx", OutputFormat::Vhdx),
        ("d.vhd", OutputFormat::VhdDynamic),
    ] {
        let image = dir.path().join(name);
        convert(&raw, &image, format);
        assert_eq!(local_sha256(&image), expected, "{name} locally");
        let url = S3Url::parse(&format!("s3://images/vm/{name}")).unwrap();
        stage(&clients, &image, &url, &StageOptions::default(), &|_| {})
            .await
            .unwrap();
        staged_bytes += std::fs::metadata(&image).unwrap().len();
        let (from_s3, detected) = s3_sha256(&clients, "images", &url.key).await;
        assert_eq!(from_s3, expected, "{name} ({detected}) from S3");
    }
    // The read-ahead at work: each image is a few MiB, so a handful of 4 MiB GETs each,
    // not one per header, table or chunk.
    let gets = moto.stats()["requests"]["s3:GetObject"].as_u64().unwrap();
    assert!(
        gets <= 4 * (staged_bytes / (4 << 20) + 4),
        "{gets} GETs for {staged_bytes} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_vmdk_finds_its_extents_next_to_its_descriptor() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    common::create_bucket(&clients, "images").await;
    let dir = tempfile::tempdir().unwrap();
    let raw = std::fs::read(raw_image(dir.path())).unwrap();
    // Three flat extents (the third read from an offset of its file) and a sparse one,
    // tied by a descriptor; one extent lives in a sibling folder reached with `..`.
    let sparse_src = dir.path().join("tail.raw");
    std::fs::write(&sparse_src, &raw[4 * MIB..]).unwrap();
    let sparse = dir.path().join("tail.vmdk");
    convert(&sparse_src, &sparse, OutputFormat::VmdkSparse);
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=0badcafe\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentFlat\"\n\n\
         # Extent description\nRW {s1} FLAT \"disk-f001.vmdk\" 0\nRW {s1} FLAT \"../shared/disk-f002.vmdk\" 0\n\
         RW {s1} FLAT \"disk-f003.vmdk\" 8\nRW {s2} SPARSE \"tail.vmdk\"\n",
        s1 = MIB / 512,
        s2 = 2 * MIB / 512,
    );
    let mut third = vec![0xeeu8; 8 * 512];
    third.extend_from_slice(&raw[2 * MIB..3 * MIB]);
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("vms/a/disk.vmdk", descriptor.into_bytes()),
        ("vms/a/disk-f001.vmdk", raw[..MIB].to_vec()),
        ("vms/shared/disk-f002.vmdk", raw[MIB..2 * MIB].to_vec()),
        ("vms/a/disk-f003.vmdk", third),
        ("vms/a/tail.vmdk", std::fs::read(&sparse).unwrap()),
    ];
    for (key, bytes) in &files {
        put(&clients, "images", key, bytes.clone()).await;
    }
    let local = dir.path().join("local");
    for (key, bytes) in &files {
        let path = local.join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let mut expected = raw[..3 * MIB].to_vec();
    expected.extend_from_slice(&raw[4 * MIB..]);
    let expected_sha: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        sha2::Sha256::default(),
        &expected,
    ))
    .into();
    assert_eq!(
        local_sha256(&local.join("vms/a/disk.vmdk")),
        expected_sha,
        "the local split image"
    );
    let (from_s3, detected) = s3_sha256(&clients, "images", "vms/a/disk.vmdk").await;
    assert_eq!(from_s3, expected_sha, "{detected}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_replaced_while_read_is_an_error() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    common::create_bucket(&clients, "images").await;
    put(&clients, "images", "d.raw", vec![1u8; 9 * MIB]).await;
    let url = S3Url::parse("s3://images/d.raw").unwrap();
    let reader = Arc::new(
        S3ReadAt::open(clients.s3.clone(), url, tokio::runtime::Handle::current())
            .await
            .unwrap(),
    );
    let first = reader.clone();
    let head = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 512];
        first.read_exact_at(&mut buf, 0).map(|()| buf[0])
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(head, 1);
    put(&clients, "images", "d.raw", vec![2u8; 9 * MIB]).await;
    let err = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 512];
        reader.read_exact_at(&mut buf, 8 * MIB as u64)
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        format!("{err}").contains("replaced while being read"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_key_is_a_clear_open_error() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    common::create_bucket(&clients, "images").await;
    let fs = S3Fs::new(
        clients.s3.clone(),
        "images",
        tokio::runtime::Handle::current(),
    );
    let err =
        tokio::task::spawn_blocking(move || Disk::open_with(&fs, "nope/disk.vmdk").unwrap_err())
            .await
            .unwrap();
    let text = format!("{err:#}");
    assert!(text.contains("s3://images/nope/disk.vmdk"), "{text}");
    assert_eq!(err.kind(), rehost_core::ErrorKind::NotFound, "{text}");
}
