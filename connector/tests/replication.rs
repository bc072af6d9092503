//! Replication jobs end to end, as a user runs them: `rehost serve` (the scheduler and the
//! API) against the vCenter emulator and the strict AWS emulator of tests/emulators/.
//! Each test starts its own emulators, config and store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../importer/tests/common/mod.rs"]
mod moto;
#[path = "../../tests/emulators/vcsim/harness.rs"]
mod vcsim;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rehost_importer::aws::Clients;
use serde_json::Value;
use vcsim::Vcsim;

const VM: &str = "DC0_H0_VM0";
const KEY: i32 = 2000;
const MIB: usize = 1 << 20;
const TOKEN: &str = "test-token-0123456789abcdef";

struct World {
    vc: Vcsim,
    aws: moto::Moto,
    dir: tempfile::TempDir,
    config: PathBuf,
    runtime: tokio::runtime::Runtime,
    clients: Clients,
}

/// Scheduler settings of a test's config.
struct Settings {
    max_consecutive_failures: u32,
    retry_backoff_secs: u64,
    seconds: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_consecutive_failures: 3,
            retry_backoff_secs: 1,
            seconds: false,
        }
    }
}

impl World {
    fn start() -> World {
        Self::start_with(&Settings::default())
    }

    fn start_with(settings: &Settings) -> World {
        let vc = Vcsim::start().expect("the vCenter emulator (tests/emulators/install.sh)");
        let aws = moto::Moto::start();
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
url = "{url}"
username = "{user}"
password_env = "REHOST_TEST_VC1_PASSWORD"
ca_file = {ca:?}

[aws]
region = "us-east-1"
endpoint_url = "{endpoint}"
staging_bucket = "staging"

[api]
listen = "127.0.0.1:0"
token_env = "REHOST_TEST_API_TOKEN"

[scheduler]
max_consecutive_failures = {failures}
retry_backoff_secs = {backoff}
test_frequency_unit_secs = {seconds}
"#,
                url = vc.url,
                user = vc.username,
                ca = vc.ca_pem.display().to_string(),
                endpoint = aws.endpoint,
                failures = settings.max_consecutive_failures,
                backoff = settings.retry_backoff_secs,
                seconds = settings.seconds,
            ),
        )
        .unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let clients = runtime.block_on(aws.clients());
        runtime.block_on(moto::create_bucket(&clients, "staging"));
        World {
            vc,
            aws,
            dir,
            config,
            runtime,
            clients,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rehost"));
        cmd.args(args)
            .env("REHOST_CONFIG", &self.config)
            .env("REHOST_TEST_VC1_PASSWORD", &self.vc.password)
            .env("REHOST_TEST_API_TOKEN", TOKEN)
            .env("REHOST_API_TOKEN", TOKEN)
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

    /// Gives the VM's disk `size` bytes of patterned data in a few regions; returns them.
    fn load_disk(&self, size: usize) -> Vec<u8> {
        let mut disk = vec![0u8; size];
        for (start, len, seed) in [
            (0, 3 * MIB, 1u8),
            (size / 2 + 12345, 2 * MIB, 7),
            (size - MIB, MIB, 42),
        ] {
            fill(&mut disk[start..start + len], seed);
        }
        let file = self.dir.path().join("disk.raw");
        std::fs::write(&file, &disk).unwrap();
        self.vc.disk_load(VM, KEY, &file).unwrap();
        disk
    }

    /// Writes the guest's view of the disk to a file, for `snapshot verify`.
    fn disk_file(&self, name: &str) -> PathBuf {
        let bytes = self.vc.disk_read(VM, KEY).unwrap();
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn catalog(&self) {
        self.json_ok(&[
            "servers",
            "import-catalog",
            "--source",
            "vc1",
            "--output",
            "json",
        ]);
    }

    /// Creates a job for the test VM; returns its id.
    fn create_job(&self, extra: &[&str]) -> String {
        let mut args = vec!["jobs", "create", "--server", VM, "--output", "json"];
        args.extend_from_slice(extra);
        let job = self.json_ok(&args);
        job_id(&job)
    }

    /// A job whose schedule never comes due in a test (seeded in 2099): its runs are the
    /// on-demand ones the test starts.
    fn create_on_demand_job(&self, extra: &[&str]) -> String {
        let mut args = vec![
            "--frequency-hours",
            "24",
            "--seed-time",
            "2099-01-01T00:00:00Z",
        ];
        args.extend_from_slice(extra);
        self.create_job(&args)
    }

    /// `rehost serve`, started and its API address read.
    fn serve(&self) -> Serve {
        // Owned by `Serve` at once, whose Drop kills and waits for it on every path.
        let mut serve = Serve {
            child: self
                .command(&["serve"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            url: String::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        for stream in [
            Box::new(serve.child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(serve.child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if let Some(at) = line.find("http://") {
                    serve.url = line[at..].split_whitespace().next().unwrap().to_owned();
                    // Keep draining the connector's output so it never blocks writing it.
                    std::thread::spawn(move || while rx.recv().is_ok() {});
                    return serve;
                }
                seen.push(line);
            }
        }
        panic!("rehost serve did not say where it listens: {seen:#?}");
    }

    /// Polls the job's runs until `done` says so; returns the runs.
    fn wait_runs(&self, job: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let runs = runs_of(&self.json_ok(&["runs", "list", "--job", job, "--output", "json"]));
            if done(&runs) {
                return runs;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {runs:#?}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn job(&self, job: &str) -> Value {
        let shown = self.json_ok(&["jobs", "show", job, "--output", "json"]);
        shown["replicationJob"].clone()
    }

    fn verify(&self, ami: &str, against: &Path) {
        let endpoint = self.aws.endpoint.clone();
        let v = self.json_ok(&[
            "snapshot",
            "verify",
            ami,
            "--against",
            p(against),
            "--endpoint-url",
            &endpoint,
            "--output",
            "json",
        ]);
        assert_eq!(v["identical"], true, "{v}");
    }

    /// The AMIs tagged with the job.
    fn amis_of(&self, job: &str) -> Vec<String> {
        use rehost_importer::aws::aws_sdk_ec2::types::Filter;
        self.runtime.block_on(async {
            let out = self
                .clients
                .ec2
                .describe_images()
                .owners("self")
                .filters(
                    Filter::builder()
                        .name("tag:rehost:replication-job-id")
                        .values(job)
                        .build(),
                )
                .send()
                .await
                .unwrap();
            out.images()
                .iter()
                .filter_map(|i| i.image_id().map(str::to_owned))
                .collect()
        })
    }

    /// The snapshot behind an AMI's root device.
    fn root_snapshot(&self, ami: &str) -> String {
        self.runtime.block_on(async {
            let out = self
                .clients
                .ec2
                .describe_images()
                .image_ids(ami)
                .send()
                .await
                .unwrap();
            out.images()[0].block_device_mappings()[0]
                .ebs()
                .unwrap()
                .snapshot_id()
                .unwrap()
                .to_owned()
        })
    }

    fn snapshot_exists(&self, snapshot: &str) -> bool {
        self.runtime.block_on(async {
            self.clients
                .ec2
                .describe_snapshots()
                .snapshot_ids(snapshot)
                .send()
                .await
                .is_ok_and(|out| !out.snapshots().is_empty())
        })
    }

    fn put_block_count(&self) -> u64 {
        let stats = self.aws.stats();
        stats["requests"]["ebs:PutSnapshotBlock"]
            .as_u64()
            .unwrap_or(0)
    }
}

struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn job_id(job: &Value) -> String {
    job["replicationJobId"]
        .as_str()
        .unwrap_or_else(|| panic!("no job id in {job}"))
        .to_owned()
}

fn runs_of(listing: &Value) -> Vec<Value> {
    listing["replicationRunList"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no runs in {listing}"))
}

fn state(run: &Value) -> &str {
    run["state"].as_str().unwrap_or_default()
}

fn ami(run: &Value) -> &str {
    run["amiId"].as_str().unwrap_or_default()
}

fn stage(run: &Value) -> &str {
    run["stageDetails"]["stage"].as_str().unwrap_or_default()
}

fn completed(runs: &[Value]) -> usize {
    runs.iter().filter(|r| state(r) == "COMPLETED").count()
}

fn assert_no_rehost_snapshot(world: &World) {
    let left = world.vc.snapshots(VM).unwrap();
    assert!(
        left.iter().all(|s| !s.starts_with("rehost-")),
        "snapshots left: {left:?}"
    );
}

#[test]
fn on_demand_runs_go_full_then_incremental_and_keep_the_newest_ami() {
    let world = World::start();
    world.load_disk(32 * MIB);
    world.catalog();
    let job = world.create_on_demand_job(&["--keep-amis", "1"]);
    let serve = world.serve();

    // The first run: a full export, a new snapshot chain, an AMI that holds the disk.
    let first = world.json_ok(&[
        "jobs", "start", &job, "--wait", "--api", &serve.url, "--output", "json",
    ]);
    let ami1 = ami(&first).to_owned();
    assert!(ami1.starts_with("ami-"), "{first}");
    world.verify(&ami1, &world.disk_file("v1.raw"));
    assert_no_rehost_snapshot(&world);
    let snapshot1 = world.root_snapshot(&ami1);

    // Three 512 KiB blocks change (the first of them held data, the others zeros); the
    // second run writes exactly those.
    for (offset, seed) in [(MIB + 4096, 3u8), (9 * MIB + 100, 4), (20 * MIB, 5)] {
        let mut bytes = vec![0u8; 4096];
        fill(&mut bytes, seed);
        world.vc.disk_write(VM, KEY, offset as u64, &bytes).unwrap();
    }
    world.aws.control("/_rehost/stats/reset", "{}");
    let second = world.json_ok(&[
        "jobs", "start", &job, "--wait", "--api", &serve.url, "--output", "json",
    ]);
    let ami2 = ami(&second).to_owned();
    assert_ne!(ami1, ami2);
    assert_eq!(
        world.put_block_count(),
        3,
        "only the changed blocks are written"
    );
    // Only the three changed 64 KiB grains were read from the VM. The rest of their
    // blocks came from the first run's snapshot (its staged image is gone): the one that
    // held data read once by the export to digest it and once by the import to merge it;
    // the two the first run never wrote are zeros, known from the block list.
    let stats = world.aws.stats();
    assert_eq!(
        stats["requests"]["ebs:GetSnapshotBlock"].as_u64(),
        Some(2),
        "{stats}"
    );
    world.verify(&ami2, &world.disk_file("v2.raw"));
    assert_no_rehost_snapshot(&world);

    // Three blocks were sent, yet the snapshot holds the whole new disk: the rest came
    // from its parent, the first run's snapshot (the emulator keeps EBS's parent rule).

    // Keep 1: the first AMI is deregistered and its snapshot deleted, its run marked DELETED.
    assert_eq!(world.amis_of(&job), vec![ami2.clone()]);
    assert!(
        !world.snapshot_exists(&snapshot1),
        "{snapshot1} should be deleted"
    );
    let runs = world.wait_runs(&job, "two runs", |runs| runs.len() == 2);
    let states: Vec<&str> = runs.iter().map(state).collect();
    assert!(
        states.contains(&"DELETED") && states.contains(&"COMPLETED"),
        "{runs:#?}"
    );
    // Nothing staged is left but manifests and block lists.
    let staged = world.runtime.block_on(async {
        let out = world
            .clients
            .s3
            .list_objects_v2()
            .bucket("staging")
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect::<Vec<_>>()
    });
    assert!(
        staged
            .iter()
            .all(|k| k.ends_with(".manifest.json") || k.ends_with(".blocks")),
        "{staged:#?}"
    );
    assert_eq!(
        world
            .runtime
            .block_on(moto::open_uploads(&world.clients, "staging")),
        0
    );
    drop(serve);
}

#[test]
fn a_scheduled_run_starts_by_itself() {
    let world = World::start_with(&Settings {
        seconds: true,
        ..Settings::default()
    });
    world.load_disk(8 * MIB);
    world.catalog();
    // Seconds instead of hours (tests only): due now, then every 3600 s.
    let job = world.create_job(&["--frequency-hours", "24", "--seed-time", "now"]);
    let _serve = world.serve();
    let runs = world.wait_runs(&job, "the automatic run", |runs| {
        runs.iter().any(|r| state(r) == "COMPLETED")
    });
    let run = runs.iter().find(|r| state(r) == "COMPLETED").unwrap();
    assert_eq!(run["type"], "AUTOMATIC", "{run}");
    world.verify(ami(run), &world.disk_file("v1.raw"));
}

#[test]
fn a_connector_killed_mid_run_resumes_it_and_leaves_nothing_behind() {
    let world = World::start();
    world.load_disk(32 * MIB);
    world.catalog();
    let job = world.create_on_demand_job(&[]);

    // Killed while the export reads the disk (reads slowed down): the snapshot is on the VM.
    world
        .vc
        .slow_folder(&format!("{VM}/disk1-flat.vmdk"), 400, 1000)
        .unwrap();
    let serve = world.serve();
    world.json_ok(&[
        "jobs", "start", &job, "--api", &serve.url, "--output", "json",
    ]);
    world.wait_runs(&job, "the export to read", |runs| {
        runs.first().is_some_and(|r| stage(r) == "export")
    });
    std::thread::sleep(Duration::from_millis(500));
    serve.kill9();
    assert!(
        world
            .vc
            .snapshots(VM)
            .unwrap()
            .iter()
            .any(|s| s.starts_with("rehost-")),
        "the export's snapshot should be there"
    );

    // Restarted: the leftover snapshot goes, the export is taken again; killed once more
    // while importing (EBS throttled to a crawl).
    world.vc.clear_faults().unwrap();
    world
        .aws
        .control("/_rehost/config", r#"{"ebs_put_blocks_per_second": 4}"#);
    let serve = world.serve();
    world.wait_runs(&job, "the import", |runs| {
        runs.first().is_some_and(|r| stage(r) == "import")
    });
    std::thread::sleep(Duration::from_millis(1500));
    serve.kill9();
    assert_no_rehost_snapshot(&world);

    // Restarted again, at full speed: the run completes, once.
    world
        .aws
        .control("/_rehost/config", r#"{"ebs_put_blocks_per_second": 1000}"#);
    let _serve = world.serve();
    let runs = world.wait_runs(&job, "the run to complete", |runs| completed(runs) == 1);
    assert_eq!(runs.len(), 1, "one run, resumed: {runs:#?}");
    let ami1 = ami(&runs[0]).to_owned();
    assert_eq!(world.amis_of(&job), vec![ami1.clone()], "exactly one AMI");
    world.verify(&ami1, &world.disk_file("v1.raw"));
    assert_no_rehost_snapshot(&world);
    assert_eq!(
        world
            .runtime
            .block_on(moto::open_uploads(&world.clients, "staging")),
        0
    );
}

#[test]
fn a_failing_source_pauses_the_job_until_resumed() {
    let world = World::start_with(&Settings {
        max_consecutive_failures: 2,
        retry_backoff_secs: 1,
        ..Settings::default()
    });
    world.load_disk(8 * MIB);
    world.catalog();
    let job = world.create_on_demand_job(&[]);
    world
        .vc
        .fail_soap("CreateSnapshot_Task", "SystemError", 100)
        .unwrap();
    let serve = world.serve();
    world.json_ok(&[
        "jobs", "start", &job, "--api", &serve.url, "--output", "json",
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while world.job(&job)["state"] != "PAUSED_ON_FAILURE" {
        assert!(Instant::now() < deadline, "not paused: {}", world.job(&job));
        std::thread::sleep(Duration::from_millis(250));
    }
    let runs = world.wait_runs(&job, "two failed runs", |runs| runs.len() == 2);
    assert!(runs.iter().all(|r| state(r) == "FAILED"), "{runs:#?}");
    assert_no_rehost_snapshot(&world);

    // Fixed and resumed: the next run is due at once and completes.
    world.vc.clear_faults().unwrap();
    world.json_ok(&[
        "jobs", "resume", &job, "--api", &serve.url, "--output", "json",
    ]);
    world.wait_runs(&job, "a run after resume", |runs| completed(runs) == 1);
    assert_eq!(world.job(&job)["state"], "ACTIVE");
}

#[test]
fn a_job_with_a_kms_key_encrypts_its_chain_and_an_unknown_key_is_refused() {
    use rehost_importer::aws::{aws_sdk_kms, sdk_config};
    let world = World::start();
    world.load_disk(8 * MIB);
    world.catalog();

    let refused = world.rehost(&[
        "jobs",
        "create",
        "--server",
        VM,
        "--run-once",
        "--seed-time",
        "now",
        "--kms-key-id",
        "alias/does-not-exist",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a job with an unknown key was created"
    );
    assert!(stderr.contains("alias/does-not-exist"), "{stderr}");

    let key_arn = world.runtime.block_on(async {
        let kms = aws_sdk_kms::Client::new(&sdk_config(&world.aws.options()).await);
        let meta = kms.create_key().send().await.unwrap().key_metadata.unwrap();
        kms.create_alias()
            .alias_name("alias/migration")
            .target_key_id(&meta.key_id)
            .send()
            .await
            .unwrap();
        meta.arn.unwrap()
    });
    let job = world.create_on_demand_job(&["--kms-key-id", "alias/migration"]);
    // In-process this time: no connector is serving the store.
    let run = world.json_ok(&["jobs", "start", &job, "--wait", "--output", "json"]);
    let ami = ami(&run).to_owned();
    world.verify(&ami, &world.disk_file("v1.raw"));
    let snapshot = world.runtime.block_on(async {
        let image = world
            .clients
            .ec2
            .describe_images()
            .image_ids(&ami)
            .send()
            .await
            .unwrap();
        let snapshot_id = image.images()[0].block_device_mappings()[0]
            .ebs()
            .unwrap()
            .snapshot_id()
            .unwrap()
            .to_owned();
        let out = world
            .clients
            .ec2
            .describe_snapshots()
            .snapshot_ids(snapshot_id)
            .send()
            .await
            .unwrap();
        out.snapshots()[0].clone()
    });
    assert_eq!(snapshot.encrypted(), Some(true));
    assert_eq!(snapshot.kms_key_id(), Some(key_arn.as_str()));
}
