//! The README's quick start, run as a newcomer runs it: `scripts/quickstart.sh` (with this
//! build's binary) replicates a VM whose disk boots Linux from the vCenter emulator (or the
//! Azure or Hyper-V double) into the AWS emulator, verifies the AMI's snapshot against the disk, reads it
//! back and boots it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_quick_start_replicates_a_vm_whose_ami_verifies_and_boots() {
    quick_start(&[]);
}

#[test]
fn the_azure_quick_start_replicates_a_generation_2_vm_whose_ami_verifies_and_boots() {
    quick_start(&["azure"]);
}

#[test]
fn the_hyperv_quick_start_replicates_a_generation_2_vm_whose_ami_verifies_and_boots() {
    quick_start(&["hyperv"]);
}

fn quick_start(args: &[&str]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(root.join("scripts/quickstart.sh"))
        .args(args)
        .env("REHOST_BIN", env!("CARGO_BIN_EXE_rehost"))
        .env("QUICKSTART_DIR", work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "quickstart.sh failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("AMI: ami-"), "{stdout}");
    assert!(stdout.contains("identical"), "the verify result: {stdout}");
    assert!(
        stdout.contains("REHOST-BOOTED: Linux"),
        "the boot check: {stdout}\n{stderr}"
    );
}
