//! The Azure source end to end, as a user runs it: `rehost servers`, `rehost export` and
//! replication jobs against the project's Azure test double (tests/emulators/azure/) and,
//! for jobs, the strict AWS emulator. Each test starts its own double, config and store.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

#[path = "../../tests/emulators/azure/harness.rs"]
mod azure_double;
#[path = "../../importer/tests/common/mod.rs"]
mod moto;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use azure_double::AzureDouble;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;
const RG: &str = "prod-rg";

struct World {
    az: AzureDouble,
    aws: Option<moto::Moto>,
    dir: tempfile::TempDir,
    config: PathBuf,
    secret: String,
}

impl World {
    fn start(double_flags: &[&str], with_aws: bool) -> World {
        let az = AzureDouble::start(double_flags).expect("the Azure double (python3)");
        let aws = with_aws.then(moto::Moto::start);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("rehost.toml");
        let mut text = format!(
            r#"
[store]
path = "state/rehost.db"

[[sources]]
name = "az1"
kind = "azure"
tenant_id = "{tenant}"
client_id = "{client}"
client_secret_env = "REHOST_TEST_AZ1_SECRET"
subscription_id = "{sub}"
authority_url = "{url}"
resource_manager_url = "{url}"
"#,
            tenant = az.tenant,
            client = az.client_id,
            sub = az.subscription,
            url = az.url,
        );
        if let Some(aws) = &aws {
            text.push_str(&format!(
                "\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nstaging_bucket = \"staging\"\n\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"REHOST_TEST_API_TOKEN\"\n",
                aws.endpoint
            ));
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async {
                let clients = aws.clients().await;
                moto::create_bucket(&clients, "staging").await;
            });
        }
        std::fs::write(&config, text).unwrap();
        let secret = az.secret.clone();
        World {
            az,
            aws,
            dir,
            config,
            secret,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rehost"));
        cmd.args(args)
            .env("REHOST_CONFIG", &self.config)
            .env("REHOST_TEST_AZ1_SECRET", &self.secret)
            .env("REHOST_TEST_API_TOKEN", "test-token-0123456789abcdef")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("XDG_STATE_HOME", self.dir.path().join("xdg"));
        cmd
    }

    fn rehost(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn json_ok(&self, args: &[&str]) -> Value {
        let out = self.rehost(args);
        assert!(
            out.status.success(),
            "rehost {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "rehost {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Creates VM `name` with an OS disk of `size` bytes seeded with patterned regions;
    /// answers the disk's id and the bytes.
    fn vm(&self, name: &str, size: u64, generation: &str) -> (String, Vec<u8>) {
        let mut bytes = vec![0u8; usize::try_from(size).unwrap()];
        let s = bytes.len();
        for (start, len, seed) in [
            (0, 3 * MIB as usize, 1u8),
            (4 * MIB as usize, 6 * MIB as usize, 5),
            (16 * MIB as usize, 4 * MIB as usize, 9),
            (s - MIB as usize, MIB as usize, 42),
        ] {
            fill(&mut bytes[start..start + len], seed);
        }
        let seed = self.dir.path().join(format!("{name}.raw"));
        std::fs::write(&seed, &bytes).unwrap();
        let vm = self.az.create_vm(&json!({
            "subscription": self.az.subscription,
            "resource_group": RG,
            "name": name,
            "location": "westeurope",
            "vm_size": "Standard_D2s_v3",
            "os_type": "Linux",
            "hyper_v_generation": generation,
            "power_state": "running",
            "disks": [{"name": format!("{name}-os"), "lun": null, "size_bytes": size,
                       "sku": "Premium_LRS", "seed_file": seed.to_str().unwrap()}]
        }));
        let disk_id = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no OS disk id in {vm}"))
            .to_owned();
        (disk_id, bytes)
    }

    fn export(&self, vm: &str, base: Option<&str>) -> Value {
        let to = self.dir.path().join("exports");
        let mut args = vec![
            "export",
            "--source",
            "az1",
            "--vm",
            vm,
            "--to",
            to.to_str().unwrap(),
            "--output",
            "json",
        ];
        if let Some(base) = base {
            args.extend(["--base", base]);
        }
        self.json_ok(&args)
    }

    /// Snapshots the double holds, as (name, active SAS).
    fn snapshots(&self) -> Vec<(String, bool)> {
        self.az.state()["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_owned(),
                    s["active_sas"].as_bool().unwrap(),
                )
            })
            .collect()
    }
}

fn fill(bytes: &mut [u8], seed: u8) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::try_from(i % 251)
            .unwrap()
            .wrapping_mul(31)
            .wrapping_add(seed)
            | 1;
    }
}

/// The disk an exported image (chain) decodes to.
fn decode(image: &str) -> Vec<u8> {
    let disk = rehost_diskimage::Disk::open(image).unwrap();
    let mut bytes = vec![0u8; usize::try_from(disk.virtual_size()).unwrap()];
    disk.read_at(&mut bytes, 0).unwrap();
    bytes
}

fn image_of(report: &Value) -> String {
    report["disks"][0]["image"].as_str().unwrap().to_owned()
}

/// Bytes of disk data the double served in ranged GETs (the footer check excluded).
fn blob_bytes_read(requests: &[Value], capacity: u64) -> u64 {
    requests
        .iter()
        .filter(|r| r["kind"] == "blob" && r["method"] == "GET")
        .filter_map(|r| r["range"].as_str())
        .filter_map(|range| {
            let (a, b) = range.strip_prefix("bytes=")?.split_once('-')?;
            let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
            (a < capacity).then_some(b - a + 1)
        })
        .sum()
}

#[test]
fn the_catalog_pages_through_every_vm() {
    let world = World::start(&["--retry-after", "0", "--page-size", "2"], false);
    world.vm("web1", 64 * MIB, "V2");
    world.vm("db1", 32 * MIB, "V1");
    world.vm("app1", 32 * MIB, "V2");
    let report = world.json_ok(&[
        "servers",
        "import-catalog",
        "--source",
        "az1",
        "--output",
        "json",
    ]);
    assert_eq!(report["servers"], 3, "{report}");
    let listing = world.json_ok(&["servers", "list", "--output", "json"]);
    let text = listing.to_string();
    for name in ["web1", "db1", "app1"] {
        assert!(text.contains(name), "{name} missing: {text}");
    }
    // Three VMs on pages of two: the second page was asked for through nextLink.
    let paged = world
        .az
        .requests()
        .iter()
        .filter(|r| {
            r["path"]
                .as_str()
                .unwrap_or("")
                .ends_with("/virtualMachines")
                && r["query"].as_str().unwrap_or("").contains("skiptoken")
        })
        .count();
    assert!(paged >= 1, "nextLink was not followed");
    let check = world.json_ok(&["config", "check", "--output", "json"]);
    assert_eq!(check["ok"], true, "{check}");
    assert_eq!(check["sources"][0]["authenticated"], true);
}

#[test]
fn full_and_incremental_exports_decode_to_the_disk_at_snapshot_time() {
    let world = World::start(&["--retry-after", "0"], false);
    let size = 64 * MIB;
    let (disk, seeded) = world.vm("web1", size, "V2");

    // The guest keeps writing after the snapshot: the first page list is throttled for a
    // second, and the test writes into the live disk meanwhile.
    world.az.faults(&json!([{
        "match": {"method": "GET", "query_contains": "comp=pagelist"},
        "status": 503, "times": 1, "retry_after": 1,
        "body": null
    }]));
    let full = std::thread::scope(|scope| {
        let exporting = scope.spawn(|| world.export("web1", None));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = world.az.requests().iter().any(|r| r["kind"] == "pagelist");
            if seen {
                world.az.write(&disk, 4 * MIB, &vec![0xEE; MIB as usize]);
                break;
            }
            assert!(Instant::now() < deadline, "the export never listed pages");
            std::thread::sleep(Duration::from_millis(20));
        }
        exporting.join().unwrap()
    });
    assert_eq!(full["kind"], "full", "{full}");
    let full_image = image_of(&full);
    assert!(full_image.ends_with(".vhd"), "{full_image}");
    assert!(
        decode(&full_image) == seeded,
        "the full export is not the disk at snapshot time"
    );
    // Only the allocated areas were read.
    let read_full = blob_bytes_read(&world.az.requests(), size);
    assert!(
        read_full <= 15 * MIB,
        "read {read_full} bytes of a 14 MiB allocation"
    );

    // Between runs: the write above, one MiB rewritten with the same bytes, two MiB
    // cleared (TRIM) over data, one new MiB.
    let same = world.az.read(&disk, 8 * MIB, MIB);
    world.az.write(&disk, 8 * MIB, &same);
    world.az.clear(&disk, 16 * MIB, 2 * MIB);
    world.az.write(&disk, 40 * MIB, &vec![0x3C; MIB as usize]);
    let now = world.az.read(&disk, 0, size);
    world.az.clear_requests();
    let incremental = world.export("web1", Some(full["manifest"].as_str().unwrap()));
    assert_eq!(incremental["kind"], "incremental", "{incremental}");
    assert!(
        decode(&image_of(&incremental)) == now,
        "the incremental chain is not the disk at its snapshot"
    );
    let requests = world.az.requests();
    let changed = 3 * MIB; // the write, the rewrite, the new MiB; the cleared MiBs are zeros
    let read = blob_bytes_read(&requests, size);
    assert!(
        read <= changed * 11 / 10,
        "the incremental read {read} bytes for {changed} changed"
    );
    for r in requests.iter().filter(|r| r["kind"] == "pagelist") {
        assert!(
            r["prev_snapshot_url"].is_string(),
            "a full list was asked: {r}"
        );
        assert!(
            r["x_ms_version"].as_str().unwrap_or("") >= "2019-07-07",
            "the diff header needs x-ms-version 2019-07-07 or later: {r}"
        );
    }
    // The incremental's snapshot is kept as the next base, the full's is gone, and no SAS
    // is left active.
    let snapshots = world.snapshots();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert!(snapshots.iter().all(|(_, sas)| !sas), "{snapshots:?}");
}

#[test]
fn a_failure_mid_read_revokes_access_and_deletes_the_new_snapshots() {
    let world = World::start(&["--retry-after", "0"], false);
    let (disk, _) = world.vm("web1", 32 * MIB, "V2");
    let full = world.export("web1", None);
    world.az.write(&disk, 2 * MIB, &vec![7u8; MIB as usize]);
    world.az.faults(&json!([{
        "match": {"method": "GET", "path_regex": "^/_blob/"},
        "status": 200, "times": 1000, "abort_after_bytes": 65536,
        "query_contains": null, "retry_after": null, "body": null
    }]));
    let to = world.dir.path().join("exports");
    let out = world.rehost(&[
        "export",
        "--source",
        "az1",
        "--vm",
        "web1",
        "--to",
        to.to_str().unwrap(),
        "--base",
        full["manifest"].as_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reading"), "{stderr}");
    world.az.clear_faults();
    // Only the base's snapshot is left, without a SAS; nothing for --cleanup to do.
    let snapshots = world.snapshots();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert!(!snapshots[0].1, "a SAS was left active: {snapshots:?}");
    let cleanup = world.json_ok(&["export", "--source", "az1", "--cleanup", "--output", "json"]);
    assert_eq!(cleanup["removed"], json!([]), "{cleanup}");
    // The base still serves the next incremental.
    let next = world.export("web1", Some(full["manifest"].as_str().unwrap()));
    assert_eq!(next["kind"], "incremental");
}

#[test]
fn cleanup_removes_what_an_export_killed_mid_read_left() {
    let world = World::start(&["--retry-after", "0"], false);
    world.vm("web1", 32 * MIB, "V2");
    // The first ranged GET of disk data is answered "busy, retry in 30 s": the export sits
    // there, its snapshot made and its SAS active, when it is killed.
    world.az.faults(&json!([{
        "match": {"method": "GET", "path_regex": "^/_blob/", "query_contains": null},
        "status": 503, "times": 1, "retry_after": 30,
        "body": null
    }]));
    let to = world.dir.path().join("exports");
    let mut child = world
        .command(&[
            "export",
            "--source",
            "az1",
            "--vm",
            "web1",
            "--to",
            to.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !world
        .az
        .requests()
        .iter()
        .any(|r| r["kind"] == "blob" && r["status"] == 503)
    {
        assert!(Instant::now() < deadline, "the export never read the disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: nothing of rehost's runs after this
    child.wait().unwrap();
    let left = world.snapshots();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].1,
        "the killed export's SAS should still be active: {left:?}"
    );

    world.az.clear_faults();
    let cleanup = world.json_ok(&["export", "--source", "az1", "--cleanup", "--output", "json"]);
    assert_eq!(
        cleanup["removed"].as_array().map(Vec::len),
        Some(1),
        "{cleanup}"
    );
    assert!(world.snapshots().is_empty(), "{:?}", world.snapshots());
    // Nothing left for a second pass.
    let again = world.json_ok(&["export", "--source", "az1", "--cleanup", "--output", "json"]);
    assert_eq!(again["removed"], json!([]), "{again}");
}

#[test]
fn a_wrong_secret_a_missing_permission_and_throttling() {
    let mut world = World::start(&["--retry-after", "0"], false);
    world.vm("web1", 32 * MIB, "V2");

    world.secret = "not-the-secret".into();
    let out = world.rehost(&[
        "export", "--source", "az1", "--vm", "web1", "--to", "/tmp/x",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AADSTS7000215"), "{stderr}");
    assert!(
        !stderr.contains("not-the-secret"),
        "the secret was printed: {stderr}"
    );
    let check = world.rehost(&["config", "check", "--output", "json"]);
    let check: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(check["sources"][0]["authenticated"], false, "{check}");

    // A role without snapshot write.
    world.secret = world.az.secret.clone();
    world.az.identities(&json!({
        "tenants": {world.az.tenant.clone(): {"clients": {world.az.client_id.clone(): {
            "secret": world.az.secret,
            "actions": ["Microsoft.Compute/*/read", "Microsoft.Resources/subscriptions/read"],
            "not_actions": []
        }}}},
        "subscriptions": {world.az.subscription.clone(): {"display_name": "test sub", "tenant": world.az.tenant}}
    }));
    let check = world.rehost(&["config", "check", "--output", "json"]);
    let check: Value = serde_json::from_slice(&check.stdout).unwrap();
    let missing = check["sources"][0]["missing_privileges"].to_string();
    assert!(
        missing.contains("Microsoft.Compute/snapshots/write"),
        "{check}"
    );
    let out = world.rehost(&[
        "export", "--source", "az1", "--vm", "web1", "--to", "/tmp/x",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("AuthorizationFailed") && stderr.contains("snapshots/write"),
        "{stderr}"
    );

    // Throttled twice, then served: the export goes through.
    world.az.identities(&json!({
        "tenants": {world.az.tenant.clone(): {"clients": {world.az.client_id.clone(): {
            "secret": world.az.secret, "actions": ["*"], "not_actions": []
        }}}},
        "subscriptions": {world.az.subscription.clone(): {"display_name": "test sub", "tenant": world.az.tenant}}
    }));
    world.az.faults(&json!([{
        "match": {"method": "PUT", "path_regex": "/snapshots/"},
        "status": 429, "times": 2, "retry_after": 1,
        "body": {"error": {"code": "TooManyRequests", "message": "throttled"}}
    }]));
    world.az.clear_requests();
    let report = world.export("web1", None);
    assert_eq!(report["kind"], "full");
    let puts = world
        .az
        .requests()
        .iter()
        .filter(|r| r["method"] == "PUT")
        .count();
    assert_eq!(puts, 3, "two throttled PUTs and the one served");
}

#[test]
fn a_managed_identity_gets_its_token_from_the_metadata_service() {
    let world = World::start(&["--retry-after", "0"], false);
    world.vm("web1", 32 * MIB, "V2");
    let text = std::fs::read_to_string(&world.config).unwrap();
    let text = text
        .lines()
        .filter(|l| !l.starts_with("tenant_id") && !l.starts_with("client_id"))
        .map(|l| {
            if l.starts_with("client_secret_env") {
                format!("managed_identity = true\nimds_url = \"{}\"", world.az.url)
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&world.config, text).unwrap();
    let report = world.json_ok(&[
        "servers",
        "import-catalog",
        "--source",
        "az1",
        "--output",
        "json",
    ]);
    assert_eq!(report["servers"], 1, "{report}");
    let requests = world.az.requests();
    assert!(
        requests.iter().any(|r| r["kind"] == "imds"),
        "no IMDS request"
    );
    assert!(
        !requests.iter().any(|r| r["kind"] == "token"),
        "asked Entra ID"
    );
}

#[test]
fn a_job_runs_twice_to_two_verified_amis() {
    let world = World::start(&["--retry-after", "0"], true);
    let aws = world.aws.as_ref().unwrap();
    let size = 64 * MIB;
    let (disk, _) = world.vm("web1", size, "V2");
    world.json_ok(&[
        "servers",
        "import-catalog",
        "--source",
        "az1",
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
        std::fs::write(&file, world.az.read(&disk, 0, size)).unwrap();
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
    // A generation 2 VM boots with UEFI on EC2 too.
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
    assert_eq!(boot_mode.as_deref(), Some("uefi"));

    // Cleared pages must arrive as zeros; new data as itself.
    world.az.clear(&disk, 16 * MIB, 2 * MIB);
    world.az.write(&disk, 30 * MIB, &vec![0x5A; MIB as usize]);
    let run = world.json_ok(&["jobs", "start", &job, "--wait", "--output", "json"]);
    let second = run["amiId"].as_str().unwrap_or_default().to_owned();
    assert!(second.starts_with("ami-") && second != first, "{run}");
    verify(&second, "v2.raw");
    // The second run's snapshot is the only one left: the first's was retired.
    let snapshots = world.snapshots();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert!(!snapshots[0].1);

    // Deleting the job (carried out by the connector) deletes the base it kept, too.
    world.json_ok(&["jobs", "delete", &job, "--keep-amis", "--output", "json"]);
    let mut serve = world
        .command(&["serve"])
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
    assert!(world.snapshots().is_empty(), "{:?}", world.snapshots());
}
