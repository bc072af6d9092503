//! Shared by the importer's integration tests: the strict, fault-injecting moto server of
//! `tests/emulators/moto/` (installed by `tests/emulators/install.sh`), started per test on
//! a free loopback port and stopped when the handle drops.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use rehost_importer::aws::aws_sdk_ebs::primitives::ByteStream;
use rehost_importer::aws::aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm};
use rehost_importer::aws::{AwsOptions, Clients};
use rehost_importer::blocks::{BLOCK_LEN, LinearChecksum, base64, block_sha256};
use rehost_importer::s3::S3Url;

/// A running emulator.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
}

/// Fault injection settings (see `tests/emulators/moto/strict_moto.py`).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Fraction of requests answered with throttling or a 5xx before taking effect.
    pub rate: f64,
    /// Seed, so a failure reproduces.
    pub seed: u64,
    /// Services faults apply to (`s3,ebs,ec2,kms`); empty = all.
    pub services: String,
    /// How long a new snapshot answers "does not exist" to PutSnapshotBlock.
    pub new_snapshot_invisible_ms: u64,
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn python() -> PathBuf {
    let home = std::env::var("REHOST_EMULATOR_HOME")
        .unwrap_or_else(|_| "/var/tmp/rehost-emulators".into());
    let python = PathBuf::from(home).join("moto-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run tests/emulators/install.sh (or tests/run, which does)",
        python.display()
    );
    python
}

impl Moto {
    /// Starts a strict emulator without faults.
    pub fn start() -> Self {
        Self::start_with(&Faults::default())
    }

    /// Starts a strict emulator with fault injection.
    pub fn start_with(faults: &Faults) -> Self {
        let script = repo_root().join("tests/emulators/moto/strict_moto.py");
        let mut child = Command::new(python())
            .arg(&script)
            .args(["--port", "0"])
            .env("REHOST_FAULT_RATE", faults.rate.to_string())
            .env("REHOST_FAULT_SEED", faults.seed.to_string())
            .env("REHOST_FAULT_SERVICES", &faults.services)
            .env(
                "REHOST_EBS_NEW_SNAPSHOT_INVISIBLE_MS",
                faults.new_snapshot_invisible_ms.to_string(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start strict_moto.py");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("strict_moto.py exited before READY")
                .unwrap();
            if let Some(port) = line.strip_prefix("READY ") {
                break port.trim().to_owned();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// AWS options pointing every service at this emulator.
    pub fn options(&self) -> AwsOptions {
        AwsOptions {
            region: Some("us-east-1".into()),
            profile: None,
            endpoint_url: Some(self.endpoint.clone()),
            static_credentials: Some(("testing".into(), "testing".into())),
        }
    }

    /// Clients for this emulator.
    pub async fn clients(&self) -> Clients {
        Clients::load(&self.options()).await
    }

    /// The emulator's request counters (`/_rehost/stats`).
    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-sf", &format!("{}/_rehost/stats", self.endpoint)])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// POSTs `json` to a control path (`/_rehost/config`, `/_rehost/stats/reset`).
    pub fn control(&self, path: &str, json: &str) {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
                json,
                &format!("{}{path}", self.endpoint),
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "POST {path} {json}: {out:?}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `image` (raw bytes) into a new 1 GiB snapshot with raw EBS calls, every block
/// that is not all zero, and waits until EC2 reports it completed: a snapshot made
/// independently of the importer's own upload code.
pub async fn put_snapshot(clients: &Clients, image: &[u8]) -> String {
    let started = clients
        .ebs
        .start_snapshot()
        .volume_size(1)
        .timeout(60)
        .send()
        .await
        .unwrap();
    let snapshot_id = started.snapshot_id().unwrap().to_owned();
    let mut linear = LinearChecksum::default();
    for (index, chunk) in image.chunks(BLOCK_LEN).enumerate() {
        let mut block = chunk.to_vec();
        block.resize(BLOCK_LEN, 0);
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let digest = block_sha256(&block);
        linear.add(index as u64, &digest).unwrap();
        clients
            .ebs
            .put_snapshot_block()
            .snapshot_id(&snapshot_id)
            .block_index(i32::try_from(index).unwrap())
            .data_length(i32::try_from(BLOCK_LEN).unwrap())
            .checksum(base64(&digest))
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(ByteStream::from(block))
            .send()
            .await
            .unwrap();
    }
    clients
        .ebs
        .complete_snapshot()
        .snapshot_id(&snapshot_id)
        .changed_blocks_count(i32::try_from(linear.blocks()).unwrap())
        .checksum(linear.finish())
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
        .send()
        .await
        .unwrap();
    for _ in 0..200 {
        let out = clients
            .ec2
            .describe_snapshots()
            .snapshot_ids(&snapshot_id)
            .send()
            .await
            .unwrap();
        if out
            .snapshots()
            .iter()
            .any(|s| s.state().map(|s| s.as_str()) == Some("completed"))
        {
            return snapshot_id;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("snapshot {snapshot_id} never completed");
}

/// Creates an S3 bucket on the emulator, retried by hand: with fault injection on, this
/// call may be answered with a 5xx.
pub async fn create_bucket(clients: &Clients, bucket: &str) {
    for _ in 0..20 {
        if clients
            .s3
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .is_ok()
        {
            return;
        }
    }
    panic!("cannot create bucket {bucket}");
}

/// Bytes that differ from part to part, so a part put in the wrong place shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// The whole object at `url`.
pub async fn object(clients: &Clients, url: &S3Url) -> Vec<u8> {
    let out = clients
        .s3
        .get_object()
        .bucket(&url.bucket)
        .key(&url.key)
        .send()
        .await
        .unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

/// How many multipart uploads of `bucket` are open.
pub async fn open_uploads(clients: &Clients, bucket: &str) -> usize {
    clients
        .s3
        .list_multipart_uploads()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .uploads()
        .len()
}
