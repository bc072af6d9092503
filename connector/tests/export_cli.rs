//! `rehost config check`, `servers` and `export` as a user runs them, against the vCenter
//! emulator of tests/emulators/vcsim (real disk files, CBT with changeIds answered in
//! chunks, a base frozen while a snapshot exists, ExportVm, fault injection).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../importer/tests/common/mod.rs"]
mod moto;
#[path = "../../tests/emulators/vcsim/harness.rs"]
mod vcsim;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sha2::{Digest, Sha256};
use vcsim::{PowerState, Vcsim};

const VM: &str = "DC0_H0_VM0";
const KEY: i32 = 2000;
const MIB: usize = 1 << 20;
const BLOCK: u64 = 512 * 1024;

struct World {
    vc: Vcsim,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl World {
    fn start() -> World {
        Self::start_with_tls(None)
    }

    /// A config for the emulator; `tls` gives the line that replaces the CA file line.
    fn start_with_tls(tls: Option<&dyn Fn(&Vcsim) -> String>) -> World {
        let vc = Vcsim::start().expect("the vCenter emulator (tests/emulators/install.sh)");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rehost.toml");
        let tls_line = match tls {
            Some(line) => line(&vc),
            None => format!("ca_file = {:?}", vc.ca_pem.display().to_string()),
        };
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
{tls_line}
"#,
                vc.url, vc.username
            ),
        )
        .unwrap();
        World { vc, dir, config }
    }

    fn rehost(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rehost"));
        cmd.args(args)
            .env("REHOST_CONFIG", &self.config)
            .env("REHOST_TEST_VC1_PASSWORD", &self.vc.password)
            .env("AWS_EC2_METADATA_DISABLED", "true");
        cmd
    }

    fn json_ok(&self, args: &[&str]) -> Value {
        let out = self.rehost(args);
        assert!(
            out.status.success(),
            "rehost {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn stderr_of_failure(&self, args: &[&str]) -> String {
        let out = self.rehost(args);
        assert!(!out.status.success(), "rehost {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("exports")
    }

    /// `rehost export` of the test VM to `to`, then `extra`.
    fn export_args<'a>(to: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["export", "--source", "vc1", "--vm", VM, "--to", to];
        args.extend_from_slice(extra);
        args
    }

    fn export(&self, extra: &[&str]) -> Value {
        let to = self.out();
        let mut args = World::export_args(p(&to), &["--output", "json"]);
        args.extend_from_slice(extra);
        self.json_ok(&args)
    }

    /// Gives the VM's disk `size` bytes: patterned data in a few regions, zeros elsewhere.
    fn load_disk(&self, size: usize) -> Vec<u8> {
        let mut disk = vec![0u8; size];
        for (start, len, seed) in [
            (0, 3 * MIB, 1u8),
            (size / 2 + 12345, 2 * MIB, 7),
            (size - MIB, MIB, 42),
        ] {
            for (i, b) in disk[start..start + len].iter_mut().enumerate() {
                *b = u8::try_from(i % 251)
                    .unwrap()
                    .wrapping_mul(31)
                    .wrapping_add(seed)
                    | 1;
            }
        }
        let file = self.dir.path().join("disk.raw");
        std::fs::write(&file, &disk).unwrap();
        self.vc.disk_load(VM, KEY, &file).unwrap();
        disk
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The raw bytes of an image (chain), decoded by qemu-img.
fn qemu_raw(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("qemu.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw", p(image), p(&raw)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    bytes
}

fn block_list_sha256(world: &World, image: &Path) -> String {
    let v = world.json_ok(&["disk", "checksum", "--blocks", p(image), "--output", "json"]);
    v["block_list_sha256"].as_str().unwrap().to_owned()
}

fn manifest(report: &Value) -> Value {
    serde_json::from_slice(&std::fs::read(report["manifest"].as_str().unwrap()).unwrap()).unwrap()
}

fn assert_no_rehost_snapshot(world: &World) {
    let left = world.vc.snapshots(VM).unwrap();
    assert!(
        left.iter().all(|s| !s.starts_with("rehost-")),
        "snapshots left: {left:?}"
    );
}

/// A snapshot taken by someone else, through the vSphere API.
fn foreign_snapshot(vc: &Vcsim, name: &str, description: &str) {
    use rehost_vsphere::{Client, ConnectOptions, Password, Tls};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut options = ConnectOptions::new(
            vc.url.clone(),
            vc.username.clone(),
            Password::new(vc.password.clone()),
        );
        options.tls = Tls::CaFile(vc.ca_pem.clone());
        let client = Client::connect(options).await.unwrap();
        let vm = client.find_vm(VM).await.unwrap();
        client
            .create_snapshot(&vm.moref, name, description, false, false)
            .await
            .unwrap();
    });
}

#[test]
fn config_check_reports_version_and_missing_privileges() {
    let world = World::start();
    let v = world.json_ok(&["config", "check", "--output", "json"]);
    assert_eq!(v["ok"], true, "{v}");
    let source = &v["sources"][0];
    assert_eq!(source["reachable"], true);
    assert_eq!(source["authenticated"], true);
    assert!(
        source["version"].as_str().unwrap().contains("VMware"),
        "{v}"
    );

    world
        .vc
        .deny_privileges(&["VirtualMachine.State.CreateSnapshot"])
        .unwrap();
    let out = world.rehost(&["config", "check", "--output", "json"]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["sources"][0]["missing_privileges"],
        serde_json::json!(["VirtualMachine.State.CreateSnapshot"])
    );
}

#[test]
fn wrong_password_wrong_thumbprint_and_unknown_vm_are_clear_errors() {
    let world = World::start();
    let mut cmd = world.command(&["servers", "import-catalog", "--source", "vc1"]);
    cmd.env("REHOST_TEST_VC1_PASSWORD", "not-the-password");
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.to_lowercase().contains("login") || err.contains("password"),
        "{err}"
    );
    assert!(
        !err.contains("not-the-password"),
        "the password was printed: {err}"
    );

    // Pinned to another server's certificate (each emulator start makes a new one).
    let other = world.vc.thumbprint.clone();
    let pinned = World::start_with_tls(Some(&move |_: &Vcsim| format!("thumbprint = {other:?}")));
    let err = pinned.stderr_of_failure(&["servers", "import-catalog", "--source", "vc1"]);
    assert!(err.contains("does not match the pinned"), "{err}");
    // Pinned to its own: accepted.
    let own = World::start_with_tls(Some(&|vc: &Vcsim| {
        format!("thumbprint = {:?}", vc.thumbprint)
    }));
    own.json_ok(&[
        "servers",
        "import-catalog",
        "--source",
        "vc1",
        "--output",
        "json",
    ]);
    // No trust configured: the system's roots do not know the emulator's CA.
    let system = World::start_with_tls(Some(&|_: &Vcsim| String::new()));
    let err = system.stderr_of_failure(&["servers", "import-catalog", "--source", "vc1"]);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    let err = world.stderr_of_failure(&[
        "export",
        "--source",
        "vc1",
        "--vm",
        "no-such-vm",
        "--to",
        "/tmp/x",
    ]);
    assert!(err.contains("no-such-vm"), "{err}");
    assert_no_rehost_snapshot(&world);
}

#[test]
fn catalog_import_stores_every_vm_with_its_disks() {
    let world = World::start();
    world.load_disk(16 * MIB);
    let v = world.json_ok(&[
        "servers",
        "import-catalog",
        "--source",
        "vc1",
        "--output",
        "json",
    ]);
    assert_eq!(v["servers"], 4);
    let list = world.json_ok(&["servers", "list", "--output", "json"]);
    let servers = list.as_array().unwrap();
    assert_eq!(servers.len(), 4);
    let vm0 = servers.iter().find(|s| s["name"] == VM).unwrap();
    assert_eq!(vm0["source"], "vc1");
    assert_eq!(vm0["power_state"], "powered_on");
    assert!(vm0["id"].as_str().unwrap().len() >= 32, "{vm0}");
    let server_id = vm0["server_id"].as_str().unwrap();
    assert!(
        server_id.starts_with("s-") && server_id.len() == 19,
        "{vm0}"
    );
    assert_eq!(vm0["disks"][0]["id"], "2000");
    assert_eq!(vm0["disks"][0]["capacity_bytes"], 16 * MIB as u64);
    assert!(
        vm0["disks"][0]["location"]
            .as_str()
            .unwrap()
            .contains("[LocalDS_0]"),
        "{vm0}"
    );
    assert!(world.dir.path().join("state/rehost.db").exists());
    // The table form too.
    let out = world.rehost(&["servers", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(VM));
}

#[test]
fn full_then_incremental_export_decode_to_the_vm_disk() {
    let world = World::start();
    // Small CBT answers, so the full export's QueryChangedDiskAreas loop takes many calls.
    world.vc.set_cbt_window(4 * MIB as u64).unwrap();
    let size = 64 * MIB;
    let disk = world.load_disk(size);

    let full = world.export(&[]);
    assert_eq!(full["kind"], "full");
    assert_no_rehost_snapshot(&world);
    let m1 = manifest(&full);
    let d1 = &m1["disks"][0];
    let image1 = world.out().join(d1["image"].as_str().unwrap());
    assert_eq!(
        qemu_raw(&image1),
        disk,
        "full export differs from the VM disk"
    );
    assert_eq!(d1["disk_sha256"], hex::encode(Sha256::digest(&disk)));
    assert_eq!(
        d1["content_sha256"].as_str().unwrap(),
        block_list_sha256(&world, &image1)
    );
    assert_eq!(
        d1["image_sha256"],
        hex::encode(Sha256::digest(std::fs::read(&image1).unwrap()))
    );
    // Only the allocated areas were read: 6 MiB of data, widened to 64 KiB grains.
    let data = d1["data_bytes"].as_u64().unwrap();
    assert!(
        (6 * MIB as u64..=8 * MIB as u64).contains(&data),
        "read {data} bytes"
    );

    // The guest changes a few places.
    let mut new_disk = disk.clone();
    for (offset, len, byte) in [
        (100_000usize, 5000usize, 0xAAu8),
        (size / 3, 70_000, 0xBB),
        (size - 10, 10, 0xCC),
    ] {
        let bytes = vec![byte; len];
        world.vc.disk_write(VM, KEY, offset as u64, &bytes).unwrap();
        new_disk[offset..offset + len].copy_from_slice(&bytes);
    }
    assert_eq!(world.vc.disk_read(VM, KEY).unwrap(), new_disk);

    let base = full["manifest"].as_str().unwrap();
    let inc = world.export(&["--base", base]);
    assert_eq!(inc["kind"], "incremental");
    assert_no_rehost_snapshot(&world);
    let m2 = manifest(&inc);
    let d2 = &m2["disks"][0];
    assert_eq!(d2["parent_image"], d1["image"]);
    assert_eq!(d2["since_change_id"], d1["change_id"]);
    assert_ne!(d2["change_id"], d1["change_id"]);
    // Three changes, each within one or two 64 KiB grains: only those are read from the
    // VM; the rest of the three 512 KiB blocks they touch comes from the full export's
    // image, to digest the blocks (checked below against the chain's block list).
    let changed = d2["data_bytes"].as_u64().unwrap();
    assert!(
        changed <= 4 * 65_536,
        "the incremental read {changed} bytes"
    );
    let from_base = d2["base_bytes_read"].as_u64().unwrap();
    assert_eq!(from_base, 3 * BLOCK, "three partly changed blocks");
    assert_eq!(inc["disks"][0]["base_bytes_read"].as_u64(), Some(from_base));
    let image2 = world.out().join(d2["image"].as_str().unwrap());
    assert!(std::fs::metadata(&image2).unwrap().len() < 2 * MIB as u64);
    let chain = Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output", "json", p(&image2)])
        .output()
        .unwrap();
    assert!(
        chain.status.success(),
        "{}",
        String::from_utf8_lossy(&chain.stderr)
    );
    let chain: Value = serde_json::from_slice(&chain.stdout).unwrap();
    assert_eq!(chain.as_array().unwrap().len(), 2, "{chain}");
    assert_eq!(
        qemu_raw(&image2),
        new_disk,
        "the incremental chain differs from the new disk"
    );
    assert_eq!(
        d2["content_sha256"].as_str().unwrap(),
        block_list_sha256(&world, &image2)
    );
    assert_eq!(d2["disk_sha256"], Value::Null);
}

#[test]
fn a_powered_off_vm_exports_through_export_vm() {
    let world = World::start();
    let disk = world.load_disk(32 * MIB);
    let err = world.stderr_of_failure(&World::export_args(
        p(&world.out()),
        &["--via", "export-vm"],
    ));
    assert!(err.contains("powered-off"), "{err}");
    world.vc.set_power(VM, PowerState::Off).unwrap();
    let v = world.export(&["--via", "export-vm"]);
    let m = manifest(&v);
    let image = world.out().join(m["disks"][0]["image"].as_str().unwrap());
    assert_eq!(qemu_raw(&image), disk);
    assert_no_rehost_snapshot(&world);
}

#[test]
fn a_read_failure_mid_export_still_removes_the_snapshot() {
    let world = World::start();
    world.load_disk(64 * MIB);
    world
        .vc
        .fail_folder_after(&format!("{VM}/disk1-flat.vmdk"), 2 * MIB as u64, 1000)
        .unwrap();
    let err = world.stderr_of_failure(&World::export_args(p(&world.out()), &[]));
    assert!(err.contains("disk 2000"), "{err}");
    assert_no_rehost_snapshot(&world);
    // Nothing that looks like a finished image or manifest was left.
    let left: Vec<_> = std::fs::read_dir(world.out())
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|n| n.ends_with(".blocks") || n.starts_with('.'))
            && left.iter().all(|n| !n.ends_with(".vmdk")),
        "{left:?}"
    );
}

#[test]
fn a_killed_export_is_cleaned_up_without_touching_other_snapshots() {
    let world = World::start();
    world.load_disk(64 * MIB);
    // Slow the reads down so the kill lands mid-export.
    world
        .vc
        .slow_folder(&format!("{VM}/disk1-flat.vmdk"), 3000, -1)
        .unwrap();

    let mut child = world
        .command(&World::export_args(p(&world.out()), &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let snaps = world.vc.snapshots(VM).unwrap();
        if snaps.len() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the export never took its snapshot"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL: no cleanup of its own
    child.wait().unwrap();
    assert_eq!(
        world.vc.snapshots(VM).unwrap().len(),
        1,
        "the killed export cannot have removed its snapshot"
    );
    // Someone else's snapshots since, one named like ours but without rehost's marker.
    foreign_snapshot(&world.vc, "rehost-export-not-ours", "taken by an admin");
    foreign_snapshot(&world.vc, "before-patching", "");

    let v = world.json_ok(&["export", "--cleanup", "--source", "vc1", "--output", "json"]);
    assert_eq!(v["removed"].as_array().unwrap().len(), 1, "{v}");
    let mut left = world.vc.snapshots(VM).unwrap();
    left.sort();
    assert_eq!(left, ["before-patching", "rehost-export-not-ours"]);
    // A second cleanup finds nothing.
    let v = world.json_ok(&["export", "--cleanup", "--source", "vc1", "--output", "json"]);
    assert_eq!(v["removed"].as_array().unwrap().len(), 0, "{v}");
}

/// Downloads every object under `prefix` of `bucket` into `dir`, by file name.
async fn download_prefix(
    clients: &rehost_importer::aws::Clients,
    bucket: &str,
    prefix: &str,
    dir: &Path,
) -> Vec<String> {
    let listed = clients
        .s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap();
    let mut names = Vec::new();
    for object in listed.contents() {
        let key = object.key().unwrap();
        let body = clients
            .s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        let bytes = body.body.collect().await.unwrap().into_bytes();
        let name = key.rsplit('/').next().unwrap().to_owned();
        std::fs::write(dir.join(&name), &bytes).unwrap();
        names.push(name);
    }
    names
}

#[test]
fn exports_stream_into_s3_and_chain_there() {
    let world = World::start();
    let aws = moto::Moto::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let clients = rt.block_on(aws.clients());
    rt.block_on(moto::create_bucket(&clients, "exports"));
    let size = 48 * MIB;
    let disk = world.load_disk(size);
    let aws_args = [
        "--endpoint-url",
        aws.endpoint.as_str(),
        "--region",
        "us-east-1",
    ];
    let export = |extra: &[&str]| {
        let mut args = World::export_args("s3://exports/vms/vm0", &["--output", "json"]);
        args.extend_from_slice(&aws_args);
        args.extend_from_slice(extra);
        let out = world
            .command(&args)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rehost {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let full = export(&[]);
    let base = full["manifest"].as_str().unwrap().to_owned();
    assert!(base.starts_with("s3://exports/vms/vm0/"), "{base}");
    let mut new_disk = disk.clone();
    let change = vec![0x5Au8; 300_000];
    world
        .vc
        .disk_write(VM, KEY, 20 * MIB as u64, &change)
        .unwrap();
    new_disk[20 * MIB..20 * MIB + change.len()].copy_from_slice(&change);
    let inc = export(&["--base", &base]);
    // 300,000 bytes: five 64 KiB grains read from the VM, the rest of their 512 KiB block
    // read back from the full export's image in S3 (ranged GETs) to digest the block.
    assert_eq!(inc["disks"][0]["data_bytes"].as_u64(), Some(5 * 65_536));
    assert_eq!(inc["disks"][0]["base_bytes_read"].as_u64(), Some(BLOCK));
    assert_no_rehost_snapshot(&world);

    let local = tempfile::tempdir().unwrap();
    let names = rt.block_on(download_prefix(
        &clients,
        "exports",
        "vms/vm0/",
        local.path(),
    ));
    assert_eq!(
        names.len(),
        6,
        "two images, two block lists, two manifests: {names:?}"
    );
    let m2: Value = serde_json::from_slice(
        &std::fs::read(
            local.path().join(
                inc["manifest"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap(),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    let child = local.path().join(m2["disks"][0]["image"].as_str().unwrap());
    assert_eq!(qemu_raw(&child), new_disk);
    assert_eq!(
        m2["disks"][0]["image_sha256"],
        hex::encode(Sha256::digest(std::fs::read(&child).unwrap()))
    );
    // No multipart upload was left open.
    let open = rt
        .block_on(clients.s3.list_multipart_uploads().bucket("exports").send())
        .unwrap();
    assert!(open.uploads().is_empty());
}
