//! `import` against the strict, fault-injecting moto emulator: images made with qemu-img,
//! snapshots read back independently (ListSnapshotBlocks + GetSnapshotBlock) and compared
//! with the image's virtual contents.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Faults, Moto};
use rehost_core::ErrorKind;
use rehost_diskimage::Disk;
use rehost_importer::aws::Clients;
use rehost_importer::ebs::journal::{JournalLocation, SourceIdentity};
use rehost_importer::ebs::read;
use rehost_importer::ebs::retry::RetryPolicy;
use rehost_importer::ebs::uploader::Encryption;
use rehost_importer::import::{
    ImportMode, ImportOptions, ImportReport, ImportStatus, ProgressCallback, import,
};

const BLOCK: usize = 512 * 1024;
/// 16 blocks: small, yet several blocks per format cluster (VHD 2 MiB, VHDX 1-32 MiB).
const DISK_BYTES: usize = 16 * BLOCK;

/// A disk with data in blocks 0, 3 (a partial block), 4, 9 and 15; the rest zero.
fn base_content() -> Vec<u8> {
    let mut disk = vec![0u8; DISK_BYTES];
    for (block, byte) in [(0usize, 0x11u8), (4, 0x44), (9, 0x99), (15, 0xff)] {
        disk[block * BLOCK..(block + 1) * BLOCK].fill(byte);
    }
    disk[3 * BLOCK + 4096..3 * BLOCK + 8192].fill(0x33);
    disk[0] = 0xeb; // so block 0 is not one repeated byte
    disk
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `content` as raw and converts it with qemu-img to `format` (`raw`, `vmdk`, `vpc`, `vhdx`).
fn image(dir: &Path, name: &str, format: &str, content: &[u8]) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, content).unwrap();
    if format == "raw" {
        return raw;
    }
    let out = dir.join(format!("{name}.{format}"));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "raw", "-O", format]);
    if format == "vpc" {
        cmd.args(["-o", "subformat=dynamic"]);
    }
    run(cmd.arg(&raw).arg(&out));
    out
}

/// The image's virtual contents as qemu sees them.
fn qemu_raw(path: &Path) -> Vec<u8> {
    let out = path.with_extension("check.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&out));
    std::fs::read(out).unwrap()
}

fn options(path: &Path, journal_dir: &Path) -> ImportOptions {
    let source = SourceIdentity::local(path).unwrap();
    let mut o = ImportOptions::new(
        source,
        JournalLocation {
            dir: journal_dir.to_path_buf(),
            file: None,
        },
    );
    o.wait_timeout = Duration::from_secs(60);
    o
}

async fn import_file(clients: &Clients, path: &Path, o: &ImportOptions) -> ImportReport {
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    import(clients, &disk, o).await.unwrap()
}

/// The snapshot's first `len` bytes, read back block by block; unwritten blocks are zero.
async fn snapshot_bytes(clients: &Clients, snapshot_id: &str, len: usize) -> Vec<u8> {
    let retry = RetryPolicy::default();
    let mut out = vec![0u8; len.div_ceil(BLOCK) * BLOCK];
    for (index, token) in read::list_blocks(&clients.ebs, &retry, snapshot_id)
        .await
        .unwrap()
    {
        let at = index as usize * BLOCK;
        if at >= out.len() {
            continue;
        }
        let data = read::get_block(&clients.ebs, &retry, snapshot_id, index, &token)
            .await
            .unwrap();
        out[at..at + BLOCK].copy_from_slice(&data);
    }
    out.truncate(len);
    out
}

/// Compares contents without printing megabytes: the first differing byte, if any.
fn same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    if let Some(at) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: differs at byte {at} (block {}): {} != {}",
            at / BLOCK,
            actual[at],
            expected[at]
        );
    }
}

fn puts(moto: &Moto) -> u64 {
    moto.stats()["requests"]["ebs:PutSnapshotBlock"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn full_import_of_each_format_equals_the_image_and_skips_zero_blocks() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let content = base_content();
    for format in ["raw", "vmdk", "vpc", "vhdx"] {
        let path = image(dir.path(), &format!("disk-{format}"), format, &content);
        let report = import_file(&clients, &path, &options(&path, dir.path())).await;
        assert_eq!(report.status, ImportStatus::Completed, "{format}");
        assert_eq!(report.mode, ImportMode::Full);
        assert_eq!(report.volume_size_gib, 1);
        assert_eq!(
            report.blocks_written, 5,
            "{format}: the five non-zero blocks"
        );
        assert_eq!(report.blocks_skipped, 2048 - 5);
        // qemu sizes a VHD by CHS geometry: its virtual size is not exactly DISK_BYTES.
        let expected = qemu_raw(&path);
        same(
            &snapshot_bytes(&clients, &report.snapshot_id, expected.len()).await,
            &expected,
            format,
        );
        let info = read::describe(&clients.ec2, &RetryPolicy::default(), &report.snapshot_id)
            .await
            .unwrap();
        assert_eq!(info.state, "completed");
    }
}

/// Block 3 changed, block 9 zeroed, block 12 new: three blocks differ from the parent.
fn changed_content() -> Vec<u8> {
    let mut disk = base_content();
    disk[3 * BLOCK + 100] = 0x01;
    disk[9 * BLOCK..10 * BLOCK].fill(0);
    disk[12 * BLOCK..13 * BLOCK].fill(0xcc);
    disk
}

#[tokio::test(flavor = "multi_thread")]
async fn full_image_onto_a_parent_puts_only_changed_blocks() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path(), "base", "vmdk", &base_content());
    let parent = import_file(&clients, &base, &options(&base, dir.path())).await;

    let new = image(dir.path(), "new", "vhdx", &changed_content());
    // With the parent's journal (cheap) and without it (reading the parent back).
    for (journal_dir, from) in [
        (dir.path().to_path_buf(), "journal"),
        (dir.path().join("elsewhere"), "snapshot"),
    ] {
        let before = puts(&moto);
        let mut o = options(&new, &journal_dir);
        o.parent_snapshot_id = Some(parent.snapshot_id.clone());
        let child = import_file(&clients, &new, &o).await;
        assert_eq!(child.mode, ImportMode::FullAgainstParent);
        assert_eq!(child.parent_digests_from, Some(from));
        assert_eq!(
            child.blocks_written, 3,
            "blocks 3, 9 and 12 differ ({from})"
        );
        assert_eq!(puts(&moto) - before, 3);
        same(
            &snapshot_bytes(&clients, &child.snapshot_id, DISK_BYTES).await,
            &changed_content(),
            "child",
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delta_vmdk_is_imported_onto_its_parents_snapshot() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path(), "base", "vmdk", &base_content());
    let parent = import_file(&clients, &base, &options(&base, dir.path())).await;

    let delta = dir.path().join("delta.vmdk");
    run(Command::new("qemu-img")
        .args(["create", "-f", "vmdk", "-F", "vmdk", "-b"])
        .arg(&base)
        .arg(&delta));
    // 4 KiB into block 3 (a partial block: merged with the parent's), zeros over block 4, new data in block 7.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "vmdk",
            "-c",
            "write -P 0x5a 1576960 4096",
            "-c",
            "write -z 2097152 524288",
            "-c",
            "write -P 0x77 3670016 65536",
        ])
        .arg(&delta));

    let before = puts(&moto);
    let mut o = options(&delta, dir.path());
    o.parent_snapshot_id = Some(parent.snapshot_id.clone());
    let child = import_file(&clients, &delta, &o).await;
    assert_eq!(child.mode, ImportMode::Delta);
    assert_eq!(child.blocks_written, 3, "blocks 3, 4 and 7");
    assert_eq!(puts(&moto) - before, 3);
    same(
        &snapshot_bytes(&clients, &child.snapshot_id, DISK_BYTES).await,
        &qemu_raw(&delta),
        "child",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_import_writes_zero_blocks_too() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "disk", "raw", &base_content());
    let mut o = options(&path, dir.path());
    o.encryption = Encryption::Encrypted { kms_key_arn: None };
    let report = import_file(&clients, &path, &o).await;
    assert!(report.encrypted);
    // Every block of the volume, zeros included: unwritten encrypted blocks read as garbage.
    assert_eq!(report.blocks_written, 2048);
    assert_eq!(report.blocks_skipped, 0);
    same(
        &snapshot_bytes(&clients, &report.snapshot_id, 2 * DISK_BYTES).await,
        &[base_content(), vec![0; DISK_BYTES]].concat(),
        "report",
    );

    // A child inherits encryption; asking for it again is refused before any call.
    let mut child = options(&path, dir.path());
    child.parent_snapshot_id = Some(report.snapshot_id.clone());
    child.encryption = Encryption::Encrypted { kms_key_arn: None };
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    let err = import(&clients, &disk, &child).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput, "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn imports_complete_and_verify_with_five_percent_of_ebs_calls_failing() {
    let moto = Moto::start_with(&Faults {
        rate: 0.05,
        seed: 11,
        services: "ebs,ec2".into(),
        new_snapshot_invisible_ms: 300,
    });
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path(), "base", "vpc", &base_content());
    let parent = import_file(&clients, &base, &options(&base, dir.path())).await;
    let new = image(dir.path(), "new", "raw", &changed_content());
    let mut o = options(&new, &dir.path().join("no-journal"));
    o.parent_snapshot_id = Some(parent.snapshot_id.clone());
    let child = import_file(&clients, &new, &o).await;
    assert_eq!(child.blocks_written, 3);
    same(
        &snapshot_bytes(&clients, &parent.snapshot_id, DISK_BYTES).await,
        &base_content(),
        "parent",
    );
    same(
        &snapshot_bytes(&clients, &child.snapshot_id, DISK_BYTES).await,
        &changed_content(),
        "child",
    );
    assert!(
        moto.stats()["faults_total"].as_u64().unwrap() > 0,
        "faults were injected"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_import_resumes_without_resending_acknowledged_blocks() {
    let moto = Moto::start();
    let clients = moto.clients().await;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "disk", "vmdk", &base_content());
    let cancel = Arc::new(AtomicBool::new(false));
    let mut o = options(&path, dir.path());
    o.concurrency = 1;
    o.cancel = Some(cancel.clone());
    let flag = cancel.clone();
    o.progress = Some(ProgressCallback(Arc::new(move |p| {
        if p.blocks_written >= 2 {
            flag.store(true, Ordering::Relaxed);
        }
    })));
    let first = import_file(&clients, &path, &o).await;
    assert_eq!(first.status, ImportStatus::Interrupted);
    assert_eq!(first.blocks_written, 2);
    assert_eq!(puts(&moto), 2);

    let mut again = options(&path, dir.path());
    again.resume = true;
    let second = import_file(&clients, &path, &again).await;
    assert_eq!(second.status, ImportStatus::Completed);
    assert_eq!(
        second.snapshot_id, first.snapshot_id,
        "the same pending snapshot"
    );
    assert_eq!((second.blocks_written, second.blocks_resumed), (5, 2));
    assert_eq!(puts(&moto), 5, "acknowledged blocks were not sent again");
    same(
        &snapshot_bytes(&clients, &second.snapshot_id, DISK_BYTES).await,
        &base_content(),
        "second",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_credentials_fail_fast_with_a_clear_error() {
    // moto accepts any access key, so the failure tested is the SDK finding no credentials.
    let moto = Moto::start();
    let ebs = aws_sdk_ebs::Client::from_conf(
        aws_sdk_ebs::Config::builder()
            .behavior_version(aws_sdk_ebs::config::BehaviorVersion::latest())
            .region(aws_sdk_ebs::config::Region::new("us-east-1"))
            .endpoint_url(&moto.endpoint)
            .build(),
    );
    let ec2 = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .endpoint_url(&moto.endpoint)
            .build(),
    );
    let clients = Clients {
        ebs,
        ec2,
        s3: moto.clients().await.s3,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "disk", "raw", &base_content());
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    let started = Instant::now();
    let err = import(&clients, &disk, &options(&path, dir.path()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("StartSnapshot"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "not retried");
}

/// The strict emulator with moto's IAM checks on (`INITIAL_NO_AUTH_ACTION_COUNT=0`): only
/// known access keys are accepted. (By default moto accepts any key.)
struct AuthMoto(std::process::Child, String);

impl AuthMoto {
    fn start() -> Self {
        use std::io::{BufRead, BufReader};
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut child = Command::new("/var/tmp/rehost-emulators/moto-venv/bin/python")
            .arg(root.join("tests/emulators/moto/strict_moto.py"))
            .args(["--port", "0"])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines.next().unwrap().unwrap();
            if let Some(port) = line.strip_prefix("READY ") {
                break port.trim().to_owned();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self(child, format!("http://127.0.0.1:{port}"))
    }
}

impl Drop for AuthMoto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_fail_fast_with_a_clear_error() {
    let moto = AuthMoto::start();
    let clients = Clients::load(&rehost_importer::aws::AwsOptions {
        region: Some("us-east-1".into()),
        profile: None,
        endpoint_url: Some(moto.1.clone()),
        static_credentials: Some(("AKIAWRONGWRONGWRONG1".into(), "wrong".into())),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), "disk", "raw", &base_content());
    let disk = Disk::open(path.to_str().unwrap()).unwrap();
    let started = Instant::now();
    let err = import(&clients, &disk, &options(&path, dir.path()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("StartSnapshot") && text.contains("access denied"),
        "{text}"
    );
    assert!(text.len() < 300, "short: {text}");
    assert!(started.elapsed() < Duration::from_secs(5), "not retried");
}
