//! The Hyper-V source end to end, as a user runs it: `rehost config check`, `rehost
//! servers`, `rehost export` (full, incremental, cleanup) against the project's Hyper-V
//! double (WS-Management with NTLM sealed over HTTP) and Samba serving its disk files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/emulators/hyperv/harness.rs"]
mod hyperv_double;
#[path = "../../importer/tests/common/mod.rs"]
mod moto;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hyperv_double::HypervHost;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

struct World {
    host: HypervHost,
    aws: Option<moto::Moto>,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl World {
    fn start() -> World {
        World::with(hyperv_double::SMB_USER, hyperv_double::SMB_PASSWORD)
    }

    /// The double's WS-Management user, and `smb_user` for the files: the double takes
    /// any of its users, Samba only its own (a real host has one account for both).
    fn with(smb_user: &str, smb_password: &str) -> World {
        World::build(smb_user, smb_password, false)
    }

    fn build(smb_user: &str, smb_password: &str, with_aws: bool) -> World {
        let host = HypervHost::start(&["--job-polls", "1", "--changes-max", "3"])
            .expect("the Hyper-V double and Samba (run tests/emulators/install.sh)");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rehost.toml");
        let text = format!(
            r#"
[store]
path = "state/rehost.db"

[[sources]]
name = "hv1"
kind = "hyperv"
url = "{url}"
username = "{user}"
password_env = "REHOST_TEST_HV1_PASSWORD"
smb_address = "{smb}"
"#,
            url = host.url,
            user = smb_user,
            smb = host.smb_address,
        );
        let aws = with_aws.then(moto::Moto::start);
        let mut text = text;
        if let Some(aws) = &aws {
            text.push_str(&format!(
                "\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nstaging_bucket = \"staging\"\n\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"REHOST_TEST_API_TOKEN\"\n",
                aws.endpoint
            ));
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let clients = aws.clients().await;
                moto::create_bucket(&clients, "staging").await;
            });
        }
        std::fs::write(&config, text).unwrap();
        let _ = smb_password;
        World {
            host,
            aws,
            dir,
            config,
        }
    }

    fn command(&self, password: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rehost"));
        cmd.args(args)
            .env("REHOST_CONFIG", &self.config)
            .env("REHOST_TEST_HV1_PASSWORD", password)
            .env("REHOST_TEST_API_TOKEN", "test-token-0123456789abcdef")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("XDG_STATE_HOME", self.dir.path().join("xdg"));
        cmd
    }

    fn rehost_with_password(&self, password: &str, args: &[&str]) -> Output {
        self.command(password, args).output().unwrap()
    }

    fn rehost(&self, args: &[&str]) -> Output {
        self.rehost_with_password(hyperv_double::SMB_PASSWORD, args)
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

    /// A generation-2 VM with one disk of `size` bytes, some of it written.
    fn vm(&self, name: &str, size: u64) -> String {
        let vm = self.host.create_vm(&json!({
            "name": name, "generation": 2, "version": "9.0", "state": "running",
            "cpus": 2, "memory_mib": 2048,
            "disks": [{"size_bytes": size, "format": "vhdx", "controller": "scsi"}]
        }));
        let id = vm["id"].as_str().unwrap().to_owned();
        for (offset, len, seed) in [(0, 3 * MIB, 1), (8 * MIB, 5 * MIB, 2), (size - MIB, MIB, 3)] {
            self.host.write_seeded(&id, 0, offset, len, seed);
        }
        id
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// `rehost export` of `vm` into `out()` (an incremental over `base`), its JSON report.
    fn export(&self, vm: &str, base: Option<&str>) -> Value {
        let out = self.out();
        let mut args = vec![
            "export",
            "--source",
            "hv1",
            "--vm",
            vm,
            "--to",
            out.to_str().unwrap(),
            "--output",
            "json",
        ];
        if let Some(base) = base {
            args.extend(["--base", base]);
        }
        self.json_ok(&args)
    }
}

fn checksum(path: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_rehost"))
        .args(["disk", "checksum"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn checkpoints(world: &World, vm: &str) -> Vec<Value> {
    world.host.vm(vm)["checkpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn config_check_and_catalog() {
    let world = World::start();
    world.vm("web01", 64 * MIB);
    let check = world.json_ok(&["config", "check", "--output", "json"]);
    let source = &check["sources"][0];
    assert_eq!(source["reachable"], true, "{check}");
    assert_eq!(source["authenticated"], true, "{check}");
    assert_eq!(source["rct_available"], true, "{check}");
    assert_eq!(source["smb_reachable"], true, "{check}");
    assert_eq!(check["ok"], true, "{check}");

    let imported = world.json_ok(&[
        "servers",
        "import-catalog",
        "--source",
        "hv1",
        "--output",
        "json",
    ]);
    assert_eq!(imported["servers"], 1, "{imported}");
    let list = world.json_ok(&["servers", "list", "--output", "json"]);
    let vm = &list.as_array().unwrap()[0];
    let text = vm.to_string();
    assert!(text.contains("web01"), "{text}");
    assert!(text.contains("\"efi\""), "generation 2 is UEFI: {text}");
    assert!(text.contains("scsi0-0"), "{text}");
    assert!(text.contains(&(64 * MIB).to_string()), "{text}");
}

#[test]
fn full_then_incremental_exports_decode_to_the_disk_at_checkpoint_time() {
    let world = World::start();
    let vm = world.vm("db01", 96 * MIB);
    let at_full = world.host.sha256(&vm, 0);
    // The VM keeps writing while it is exported: the checkpoint must hide this.
    world.host.write_on_checkpoint(
        &vm,
        &json!({"disk": 0, "offset": 2 * MIB, "len": MIB, "fill": 255}),
    );
    let full = world.export("db01", None);
    let image = PathBuf::from(full["disks"][0]["image"].as_str().unwrap());
    assert_eq!(
        checksum(&image),
        at_full,
        "the full image is the disk at checkpoint time"
    );
    assert!(checkpoints(&world, &vm).is_empty(), "no checkpoint left");
    let points = world.host.vm(&vm)["reference_points"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        points.len(),
        1,
        "the checkpoint became the next run's reference point"
    );
    let qemu = Command::new("qemu-img")
        .args(["compare", "-f", "vpc"])
        .arg(&image)
        .arg(&image)
        .status()
        .unwrap();
    assert!(qemu.success());

    // A few changes, then an incremental export that reads only them.
    world.host.write_seeded(&vm, 0, 40 * MIB, 64 * 1024, 7);
    world.host.write_seeded(&vm, 0, 70 * MIB + 4096, 4096, 8);
    let at_incremental = world.host.sha256(&vm, 0);
    let manifest = full["manifest"].as_str().unwrap();
    let incremental = world.export("db01", Some(manifest));
    assert_eq!(incremental["kind"], "incremental", "{incremental}");
    // Changed since the full export's checkpoint: the two writes above (one 64 KiB grain
    // each) and the 1 MiB the VM wrote while that export ran (two whole 512 KiB blocks).
    let read = incremental["disks"][0]["data_bytes"].as_u64().unwrap();
    assert_eq!(
        read,
        MIB + 2 * 64 * 1024,
        "only the changed grains are read"
    );
    // The rest of the two blocks changed in part comes from the full export's image.
    let from_base = incremental["disks"][0]["base_bytes_read"].as_u64().unwrap();
    assert_eq!(from_base, 2 * 512 * 1024, "{incremental}");
    let delta = PathBuf::from(incremental["disks"][0]["image"].as_str().unwrap());
    assert_eq!(
        checksum(&delta),
        at_incremental,
        "the chain decodes to the new disk"
    );
    let points = world.host.vm(&vm)["reference_points"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        points.len(),
        1,
        "the base's reference point was replaced: {points:?}"
    );
    assert!(checkpoints(&world, &vm).is_empty());

    // The host forgets the RCT ids (e.g. the VM moved): a full copy written as a delta.
    world.host.invalidate_rct(&vm);
    world.host.write_seeded(&vm, 0, 20 * MIB, 4096, 9);
    let at_fallback = world.host.sha256(&vm, 0);
    let manifest = incremental["manifest"].as_str().unwrap();
    let fallback = world.export("db01", Some(manifest));
    let image = PathBuf::from(fallback["disks"][0]["image"].as_str().unwrap());
    assert_eq!(checksum(&image), at_fallback);
    assert!(fallback["disks"][0]["data_bytes"].as_u64().unwrap() >= 9 * MIB);
}

#[test]
fn a_failure_mid_export_removes_the_checkpoint() {
    let world = World::start();
    let vm = world.vm("app01", 64 * MIB);
    world
        .host
        .faults(&json!([{"method": "ConvertToReferencePoint", "job_error": "The operation failed (injected).", "times": 1}]));
    let out = world.out();
    let failed = world.rehost(&[
        "export",
        "--source",
        "hv1",
        "--vm",
        "app01",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("injected"), "{stderr}");
    assert!(
        checkpoints(&world, &vm).is_empty(),
        "the checkpoint was removed"
    );
    let cleanup = world.json_ok(&["export", "--cleanup", "--source", "hv1", "--output", "json"]);
    assert_eq!(cleanup["failed"].as_array().unwrap().len(), 0, "{cleanup}");
}

#[test]
fn wrong_credentials_are_named() {
    let world = World::start();
    world.vm("vm1", 32 * MIB);
    let out = world.rehost_with_password(
        "Not-The-Passw0rd",
        &["servers", "import-catalog", "--source", "hv1"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the credentials"), "{stderr}");
    assert!(
        !stderr.contains("Not-The-Passw0rd"),
        "the password is never printed: {stderr}"
    );
}

#[test]
fn an_smb_share_that_refuses_the_login_is_named() {
    let world = World::with(
        hyperv_double::SMB_REFUSED_USER,
        hyperv_double::SMB_REFUSED_PASSWORD,
    );
    let vm = world.vm("vm1", 32 * MIB);
    let out = world.out();
    let failed = world.rehost_with_password(
        hyperv_double::SMB_REFUSED_PASSWORD,
        &[
            "export",
            "--source",
            "hv1",
            "--vm",
            "vm1",
            "--to",
            out.to_str().unwrap(),
        ],
    );
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("C$"), "{stderr}");
    assert!(
        checkpoints(&world, &vm).is_empty(),
        "the checkpoint was removed"
    );
}

#[test]
fn cleanup_removes_the_checkpoint_of_an_export_killed_mid_job() {
    let world = World::start();
    let vm = world.vm("web1", 32 * MIB);
    // The conversion to a reference point never ends: the export sits there, its images
    // written and its checkpoint on the VM, when it is killed.
    world
        .host
        .faults(&json!([{"method": "ConvertToReferencePoint", "polls": 100000, "times": 1}]));
    let out = world.out();
    let mut child = world
        .command(
            hyperv_double::SMB_PASSWORD,
            &[
                "export",
                "--source",
                "hv1",
                "--vm",
                "web1",
                "--to",
                out.to_str().unwrap(),
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !world.host.requests()["requests"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["method"] == "ConvertToReferencePoint")
    {
        assert!(
            Instant::now() < deadline,
            "the export never got to its conversion"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: nothing of rehost's runs after this
    child.wait().unwrap();
    let left = checkpoints(&world, &vm);
    assert_eq!(left.len(), 1, "{left:?}");

    let cleanup = world.json_ok(&["export", "--source", "hv1", "--cleanup", "--output", "json"]);
    assert_eq!(
        cleanup["removed"].as_array().map(Vec::len),
        Some(1),
        "{cleanup}"
    );
    assert!(checkpoints(&world, &vm).is_empty());
    let again = world.json_ok(&["export", "--source", "hv1", "--cleanup", "--output", "json"]);
    assert_eq!(again["removed"], json!([]), "{again}");
}

#[test]
fn a_job_runs_twice_to_two_verified_amis() {
    let world = World::build(hyperv_double::SMB_USER, hyperv_double::SMB_PASSWORD, true);
    let aws = world.aws.as_ref().unwrap();
    let size = 64 * MIB;
    let vm = world.vm("web1", size);
    world.json_ok(&[
        "servers",
        "import-catalog",
        "--source",
        "hv1",
        "--output",
        "json",
    ]);
    let job = world.json_ok(&[
        "jobs",
        "create",
        "--server",
        "web1",
        "--frequency-hours",
        "24",
        "--seed-time",
        "2099-01-01T00:00:00Z",
        "--output",
        "json",
    ]);
    let job = job["replicationJobId"].as_str().unwrap().to_owned();
    let verify = |ami: &str, name: &str| {
        let file = world.dir.path().join(name);
        std::fs::write(&file, world.host.read(&vm, 0, 0, size)).unwrap();
        let v = world.json_ok(&[
            "snapshot",
            "verify",
            ami,
            "--against",
            file.to_str().unwrap(),
            "--endpoint-url",
            &aws.endpoint,
            "--output",
            "json",
        ]);
        assert_eq!(v["identical"], true, "{v}");
    };
    let run = world.json_ok(&["jobs", "start", &job, "--wait", "--output", "json"]);
    let first = run["amiId"].as_str().unwrap_or_default().to_owned();
    assert!(first.starts_with("ami-"), "{run}");
    verify(&first, "v1.raw");
    let boot_mode = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let clients = aws.clients().await;
        let out = clients
            .ec2
            .describe_images()
            .image_ids(&first)
            .send()
            .await
            .unwrap();
        out.images()[0].boot_mode().map(|m| m.as_str().to_owned())
    });
    assert_eq!(
        boot_mode.as_deref(),
        Some("uefi"),
        "generation 2 boots with UEFI"
    );

    world.host.write_seeded(&vm, 0, 30 * MIB, MIB, 77);
    world.host.write(&vm, 0, 5 * MIB, &vec![0u8; 512 * 1024]);
    let run = world.json_ok(&["jobs", "start", &job, "--wait", "--output", "json"]);
    let second = run["amiId"].as_str().unwrap_or_default().to_owned();
    assert!(second.starts_with("ami-") && second != first, "{run}");
    verify(&second, "v2.raw");
    assert!(checkpoints(&world, &vm).is_empty());
    let points = world.host.vm(&vm)["reference_points"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        points.len(),
        1,
        "the first run's reference point was retired: {points:?}"
    );

    // Deleting the job (carried out by the connector) deletes the reference point it kept.
    world.json_ok(&["jobs", "delete", &job, "--keep-amis", "--output", "json"]);
    let mut serve = world
        .command(hyperv_double::SMB_PASSWORD, &["serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let shown = world.json_ok(&["jobs", "show", &job, "--output", "json"]);
        if shown["replicationJob"]["state"] == "DELETED" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job was never deleted: {shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = serve.kill();
    let _ = serve.wait();
    let points = world.host.vm(&vm)["reference_points"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        points.is_empty(),
        "the job's reference point went with it: {points:?}"
    );
}
