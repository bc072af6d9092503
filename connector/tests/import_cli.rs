//! The importer as a user runs it: a UEFI disk image converted to streamOptimized VMDK,
//! staged to S3, imported from S3 into an EBS snapshot with an AMI, then verified — all
//! through the `rehost` binary against the strict AWS emulator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../importer/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn rehost(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rehost"))
        .args(args)
        .args(["--endpoint-url", endpoint, "--region", "us-east-1"])
        // Dummy credentials for the emulator; never look for real ones or for instance metadata.
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap()
}

fn json_ok(endpoint: &str, args: &[&str]) -> Value {
    let out = rehost(endpoint, args);
    assert!(
        out.status.success(),
        "rehost {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn uefi_image_from_s3_becomes_a_verified_snapshot_and_a_uefi_ami() {
    let moto = common::Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("boot.raw");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-boot-image.sh");
    let made = Command::new("bash")
        .arg(&script)
        .args([p(&raw), "uefi"])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let vmdk = dir.path().join("boot.vmdk");
    let out = Command::new(env!("CARGO_BIN_EXE_rehost"))
        .args(["disk", "convert", p(&raw), p(&vmdk), "--to", "vmdk-stream"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = runtime.block_on(moto.clients());
    runtime
        .block_on(clients.s3.create_bucket().bucket("staging").send())
        .unwrap();

    let staged = json_ok(
        &moto.endpoint,
        &[
            "stage",
            p(&vmdk),
            "s3://staging/vm1/boot.vmdk",
            "--output",
            "json",
        ],
    );
    assert_eq!(staged["bucket"], "staging");

    let report = json_ok(
        &moto.endpoint,
        &[
            "import",
            "s3://staging/vm1/boot.vmdk",
            "--register-ami",
            "vm1-run1",
            "--tag",
            "rehost:job=vm1",
            "--output",
            "json",
        ],
    );
    let snapshot = report["snapshot_id"].as_str().unwrap().to_owned();
    let ami = report["ami_id"].as_str().expect("an AMI id").to_owned();
    assert!(report["blocks_written"].as_u64().unwrap() > 0);
    assert_eq!(report["volume_size_gib"], 1);

    let image = runtime
        .block_on(clients.ec2.describe_images().image_ids(&ami).send())
        .unwrap()
        .images
        .unwrap()
        .remove(0);
    assert_eq!(image.boot_mode.unwrap().as_str(), "uefi");
    assert_eq!(image.architecture.unwrap().as_str(), "x86_64");

    // Verified against the raw image and against the staged VMDK: same content.
    for against in [p(&raw), "s3://staging/vm1/boot.vmdk"] {
        let verify = json_ok(
            &moto.endpoint,
            &[
                "snapshot",
                "verify",
                &snapshot,
                "--against",
                against,
                "--output",
                "json",
            ],
        );
        assert_eq!(verify["identical"], true, "{verify}");
    }
    // A changed image is caught, with exit status 1.
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[40 << 20] ^= 0xff;
    std::fs::write(&raw, bytes).unwrap();
    let out = rehost(
        &moto.endpoint,
        &["snapshot", "verify", &snapshot, "--against", p(&raw)],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
