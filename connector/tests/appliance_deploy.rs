//! `rehost appliance deploy` against the vCenter emulator of tests/emulators/vcsim
//! (CreateImportSpec, ImportVApp and the NFC upload, checked for size and stream format;
//! an aborted import's VM destroyed, a duplicate name refused, as vCenter does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/emulators/vcsim/harness.rs"]
mod vcsim;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rehost_appliance::{Manifest, ova, ovf};
use rehost_diskimage::Disk;
use rehost_diskimage::write::{OutputFormat, convert, create};
use serde_json::Value;
use vcsim::Vcsim;

const NAME: &str = "rehost-appliance-1";
const TOKEN: &str = "tok-0123456789abcdef";
/// The test disk's virtual size: small, a whole MiB (the OVF records MiB).
const DISK_BYTES: usize = 4 << 20;

struct World {
    vc: Vcsim,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl World {
    fn start() -> World {
        let vc = Vcsim::start().expect("the vCenter emulator (tests/emulators/install.sh)");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rehost.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[store]
path = "state/rehost.db"

[[sources]]
name = "vc1"
kind = "vsphere"
url = "{}"
username = "{}"
password_env = "REHOST_TEST_VC1_PASSWORD"
ca_file = {:?}
"#,
                vc.url,
                vc.username,
                vc.ca_pem.display().to_string()
            ),
        )
        .unwrap();
        World { vc, dir, config }
    }

    fn rehost(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_rehost"))
            .args(args)
            .env("REHOST_CONFIG", &self.config)
            .env("REHOST_TEST_VC1_PASSWORD", &self.vc.password)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    }

    fn deploy(&self, ova: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "appliance",
            "deploy",
            "--source",
            "vc1",
            "--ova",
            ova.to_str().unwrap(),
            "--name",
            NAME,
        ];
        args.extend_from_slice(extra);
        self.rehost(&args)
    }

    /// The emulator's VMs named `name`.
    fn vms_named(&self, name: &str) -> Vec<Value> {
        let vms: Vec<Value> = serde_json::from_str(&self.vc.vms_json().unwrap()).unwrap();
        vms.into_iter().filter(|v| v["name"] == name).collect()
    }

    /// The appliance's OVA with a small streamOptimized disk, built as
    /// `rehost appliance package` does (descriptor from appliance.toml, SHA-256 `.mf`).
    fn ova(&self) -> PathBuf {
        let dir = self.dir.path();
        let raw = dir.join("disk.raw");
        let mut bytes = vec![0u8; DISK_BYTES];
        for (i, b) in bytes.iter_mut().enumerate().take(DISK_BYTES / 2) {
            *b = u8::try_from(i % 251).unwrap();
        }
        std::fs::write(&raw, &bytes).unwrap();
        let vmdk_name = "rehost-appliance-disk1.vmdk".to_owned();
        let vmdk = dir.join(&vmdk_name);
        let source = Disk::open(raw.to_str().unwrap()).unwrap();
        let sink = create(&vmdk, OutputFormat::VmdkStream, DISK_BYTES as u64, None).unwrap();
        let written = convert(&source, sink, 2, &mut |_| {}).unwrap();
        let manifest = Manifest::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../appliance-image/appliance.toml"),
        )
        .unwrap();
        let descriptor = ovf::render(
            &manifest,
            &ovf::DiskFile {
                name: vmdk_name.clone(),
                file_bytes: std::fs::metadata(&vmdk).unwrap().len(),
                capacity_bytes: DISK_BYTES as u64,
                populated_bytes: written.data_bytes,
            },
        )
        .unwrap();
        let out = dir.join("appliance.ova");
        ova::write(
            &out,
            "rehost-appliance.ovf",
            &descriptor,
            &[(vmdk_name, vmdk)],
        )
        .unwrap();
        out
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn deploy_imports_powers_on_and_refuses_the_same_name_twice() {
    let world = World::start();
    let ova = world.ova();
    let hostname = "hostname=appliance-one";
    let token = format!("api_token={TOKEN}");
    let out = world.deploy(
        &ova,
        &["--prop", hostname, "--prop", &token, "--output", "json"],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), stdout(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["name"], NAME);
    assert_eq!(report["power_state"], "poweredOn");
    assert_eq!(report["datastore"], "LocalDS_0");
    assert_eq!(report["networks"][0]["network"], "VM Network");
    assert!(report["instance_uuid"].as_str().unwrap().len() >= 32);
    assert!(report["moref"].as_str().unwrap().starts_with("vm-"));
    // The password property's value is never printed.
    assert!(!stdout(&out).contains(TOKEN) && !stderr(&out).contains(TOKEN));

    let vms = world.vms_named(NAME);
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vms[0]["moref"], report["moref"]);
    assert_eq!(vms[0]["power_state"], "poweredOn");
    // vcsim keeps the propertyMapping in extraConfig (vCenter: vAppConfig.property).
    assert_eq!(vms[0]["extra_config"]["hostname"], "appliance-one");
    assert_eq!(vms[0]["extra_config"]["api_token"], TOKEN);

    let again = world.deploy(&ova, &["--no-power-on"]);
    assert!(!again.status.success(), "{}", stdout(&again));
    let err = stderr(&again);
    assert!(err.contains("already taken") && err.contains(NAME), "{err}");
    assert_eq!(world.vms_named(NAME).len(), 1);
}

#[test]
fn a_corrupt_disk_aborts_the_import_and_leaves_no_vm() {
    let world = World::start();
    let path = world.ova();
    let member = ova::Ova::open(&path).unwrap().members()[0].clone();
    let mut bytes = std::fs::read(&path).unwrap();
    let inside = usize::try_from(member.offset + member.size / 2).unwrap();
    bytes[inside] ^= 0x5A;
    std::fs::write(&path, bytes).unwrap();

    let out = world.deploy(&path, &["--output", "json"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("rehost-appliance-disk1.vmdk") && err.contains("corrupt"),
        "{err}"
    );
    assert!(
        world.vms_named(NAME).is_empty(),
        "the aborted import left its VM"
    );
}

#[test]
fn an_unknown_property_is_refused_before_anything_is_created() {
    let world = World::start();
    let ova = world.ova();
    let before = world.vc.vm_names().unwrap();
    let out = world.deploy(&ova, &["--prop", "colour=red"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("\"colour\"") && err.contains("hostname") && err.contains("api_token"),
        "{err}"
    );
    assert_eq!(world.vc.vm_names().unwrap(), before);
}

#[test]
fn an_unknown_datastore_lists_the_datastores() {
    let world = World::start();
    let ova = world.ova();
    let out = world.deploy(&ova, &["--datastore", "nope"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("\"nope\"") && err.contains("LocalDS_0"),
        "{err}"
    );
    let out = world.deploy(&ova, &["--network", "nope"]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("VM Network") && err.contains("DC0_DVPG0"),
        "{err}"
    );
    assert!(world.vms_named(NAME).is_empty());
}
