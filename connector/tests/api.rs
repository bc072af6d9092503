//! `rehost serve` as a client sees it: the real binary on 127.0.0.1:0 with a temporary
//! config and store (servers added to the catalog with the hidden test command, no
//! vCenter or AWS), spoken to over plain HTTP/1.1 on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const TOKEN: &str = "test-token-0123456789abcdef0123456789";
const TOKEN_ENV: &str = "REHOST_TEST_API_TOKEN";

fn rehost() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rehost"));
    command.env_remove("REHOST_CONFIG").env_remove("RUST_LOG");
    command
}

/// A config in a temporary folder, with two catalogued test servers.
struct Setup {
    /// Kept for the folder's lifetime.
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(api_section: &str) -> Setup {
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
url = "https://127.0.0.1:9/sdk"
username = "unused"
password_env = "REHOST_TEST_UNUSED_PASSWORD"

{api_section}
"#
            ),
        )
        .unwrap();
        let setup = Setup { _dir: dir, config };
        for name in ["web01", "db01"] {
            setup.cli(&[
                "servers",
                "add-test-server",
                "--source",
                "vc1",
                "--name",
                name,
            ]);
        }
        setup
    }

    fn with_token() -> Setup {
        Setup::new(&format!(
            "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"{TOKEN_ENV}\"\n"
        ))
    }

    /// Runs `rehost ARGS --config CONFIG`, which must succeed; returns stdout.
    fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        assert!(
            output.status.success(),
            "rehost {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn cli_output(&self, args: &[&str]) -> Output {
        rehost()
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env(TOKEN_ENV, TOKEN)
            .output()
            .unwrap()
    }
}

/// A running `rehost serve`.
struct Connector {
    child: Child,
    address: String,
    log: Arc<Mutex<Vec<String>>>,
    setup: Setup,
}

impl Connector {
    fn start() -> Connector {
        Self::start_with(Setup::with_token())
    }

    fn start_with(setup: Setup) -> Connector {
        let mut child = rehost()
            .args(["serve", "--log", "info", "--config"])
            .arg(&setup.config)
            .env(TOKEN_ENV, TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        // Drains stderr for the server's whole life (a full pipe would block it).
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = line.strip_prefix("listening on http://") {
                    let _ = address_tx.send(address.trim().to_owned());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let address = match address_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(address) => address,
            Err(_) => {
                let _ = child.kill();
                panic!("rehost serve did not start: {:?}", log.lock().unwrap());
            }
        };
        Connector {
            child,
            address,
            log,
            setup,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// POST /v1/{operation} with the right token.
    fn call(&self, operation: &str, body: Value) -> (u16, Value) {
        let answer = self.request(
            "POST",
            &format!("/v1/{operation}"),
            Some(TOKEN),
            Some(&body.to_string()),
            "application/json",
        );
        (
            answer.status,
            serde_json::from_str(&answer.body).unwrap_or(Value::Null),
        )
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        content_type: &str,
    ) -> Answer {
        http(&self.address, method, path, token, body, content_type)
    }

    /// SIGTERM, then the exit status (within 20 s).
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "rehost serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`): enough of a client
/// for these checks, and no dependency.
fn http(
    address: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    content_type: &str,
) -> Answer {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("Content-Length: 0\r\n\r\n");
    }
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

fn create_body(server: &str) -> Value {
    json!({"serverId": server, "seedReplicationTime": "2030-01-01T00:00:00Z", "frequency": 12,
           "description": "nightly"})
}

#[test]
fn requests_without_the_right_token_are_refused() {
    let connector = Connector::start();
    for token in [None, Some("wrong-token-0123456789abcdef")] {
        let answer = connector.request(
            "POST",
            "/v1/GetReplicationJobs",
            token,
            Some("{}"),
            "application/json",
        );
        assert_eq!(answer.status, 401, "{token:?}: {}", answer.body);
        assert_eq!(answer.header("WWW-Authenticate"), Some("Bearer"));
        assert_eq!(answer.json()["code"], "UnauthorizedOperationException");
    }
    let health = connector.request("GET", "/healthz", None, None, "");
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"status": "ok"}))
    );
    let (status, _) = connector.call("GetReplicationJobs", json!({}));
    assert_eq!(status, 200);
    let log = connector.log.lock().unwrap().join("\n");
    assert!(!log.contains(TOKEN), "the token was logged:\n{log}");
}

#[test]
fn a_job_is_created_listed_run_and_deleted() {
    let connector = Connector::start();

    let (status, servers) = connector.call("GetServers", json!({}));
    assert_eq!(status, 200, "{servers}");
    assert_eq!(servers["serverCatalogStatus"], "AVAILABLE");
    let web01 = servers["serverList"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vmServer"]["vmName"] == "web01")
        .expect("web01 in the catalog")
        .clone();
    let server_id = web01["serverId"].as_str().unwrap();

    let (status, created) = connector.call("CreateReplicationJob", create_body(server_id));
    assert_eq!(status, 200, "{created}");
    let job_id = created["replicationJobId"].as_str().unwrap().to_owned();
    assert!(job_id.starts_with("sms-job-"), "{job_id}");

    let (status, jobs) = connector.call("GetReplicationJobs", json!({}));
    assert_eq!(status, 200, "{jobs}");
    let job = &jobs["replicationJobList"][0];
    assert_eq!(job["replicationJobId"], job_id.as_str());
    assert_eq!(job["state"], "PENDING");
    assert_eq!(job["serverId"], server_id);
    assert_eq!(job["frequency"], 12);
    assert_eq!(job["vmServer"]["vmName"], "web01");

    let (status, again) = connector.call("CreateReplicationJob", create_body(server_id));
    assert_eq!(
        (status, again["code"].as_str()),
        (409, Some("ReplicationJobAlreadyExistsException")),
        "{again}"
    );

    let mut too_rare = create_body("db01");
    too_rare["frequency"] = json!(25);
    let (status, error) = connector.call("CreateReplicationJob", too_rare);
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["code"], "InvalidParameterException");
    assert!(
        error["message"].as_str().unwrap().contains("frequency"),
        "{error}"
    );

    let (status, started) = connector.call(
        "StartOnDemandReplicationRun",
        json!({"replicationJobId": job_id, "description": "before the upgrade"}),
    );
    assert_eq!(status, 200, "{started}");
    let run_id = started["replicationRunId"].as_str().unwrap();

    let (status, runs) = connector.call("GetReplicationRuns", json!({"replicationJobId": job_id}));
    assert_eq!(status, 200, "{runs}");
    assert_eq!(runs["replicationJob"]["replicationJobId"], job_id.as_str());
    let run = runs["replicationRunList"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["replicationRunId"] == run_id)
        .expect("the on-demand run is listed");
    assert_eq!(run["type"], "ON_DEMAND");
    assert!(
        ["PENDING", "ACTIVE"].contains(&run["state"].as_str().unwrap()),
        "{run}"
    );
    assert_eq!(run["description"], "before the upgrade");

    let (status, deleted) =
        connector.call("DeleteReplicationJob", json!({"replicationJobId": job_id}));
    assert_eq!((status, deleted), (200, json!({})));
    let (status, after) = connector.call("GetReplicationJobs", json!({"replicationJobId": job_id}));
    assert_eq!(status, 200, "{after}");
    let state = after["replicationJobList"][0]["state"].as_str().unwrap();
    assert!(["DELETING", "DELETED"].contains(&state), "{after}");

    let (status, missing) = connector.call(
        "GetReplicationRuns",
        json!({"replicationJobId": "sms-job-00000000000000000"}),
    );
    assert_eq!(
        (status, missing["code"].as_str()),
        (404, Some("ReplicationJobNotFoundException")),
        "{missing}"
    );

    let metrics = connector.request("GET", "/metrics", None, None, "");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("Content-Type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    check_metrics_text(&metrics.body);
    assert!(
        metrics
            .body
            .contains("rehost_replication_runs{state=\"PENDING\"}"),
        "{}",
        metrics.body
    );
}

/// Every line is a comment or `name{labels} value` with a numeric value.
fn check_metrics_text(text: &str) {
    let mut samples = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            assert!(
                comment.starts_with("HELP ") || comment.starts_with("TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.starts_with("rehost_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
        samples += 1;
    }
    assert!(samples > 10, "{text}");
    for name in [
        "rehost_replication_jobs",
        "rehost_bytes_moved_total",
        "rehost_replication_run_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
}

#[test]
fn errors_are_json_with_the_status_that_fits() {
    let connector = Connector::start();
    let cases = [
        (
            "POST",
            "/v1/NoSuchOperation",
            "{}",
            "application/json",
            404,
            "UnknownOperationException",
        ),
        (
            "GET",
            "/v1/GetServers",
            "",
            "",
            405,
            "MethodNotAllowedException",
        ),
        (
            "POST",
            "/v1/GetServers",
            "{}",
            "application/x-www-form-urlencoded",
            415,
            "UnsupportedMediaTypeException",
        ),
        (
            "POST",
            "/v1/CreateReplicationJob",
            "{\"serverId\": ",
            "application/json",
            400,
            "InvalidParameterException",
        ),
        (
            "POST",
            "/v1/CreateReplicationJob",
            "{\"serverId\": \"web01\"}",
            "application/json",
            400,
            "MissingRequiredParameterException",
        ),
    ];
    for (method, path, body, content_type, status, code) in cases {
        let body = (!body.is_empty()).then_some(body);
        let answer = connector.request(method, path, Some(TOKEN), body, content_type);
        assert_eq!(answer.status, status, "{method} {path}: {}", answer.body);
        assert_eq!(answer.json()["code"], code, "{method} {path}");
    }
    let (status, error) = connector.call(
        "UpdateReplicationJob",
        json!({"replicationJobId": "sms-job-1", "frequency": "daily"}),
    );
    assert_eq!(status, 400);
    assert!(
        error["message"].as_str().unwrap().starts_with("frequency"),
        "{error}"
    );
}

#[test]
fn the_cli_shows_the_same_jobs_through_the_api_as_from_the_store() {
    let connector = Connector::start();
    let setup = &connector.setup;
    // One job through the API, one through the CLI on the store.
    let (status, created) = connector.call("CreateReplicationJob", create_body("web01"));
    assert_eq!(status, 200, "{created}");
    let created = setup.cli(&[
        "jobs",
        "create",
        "--server",
        "db01",
        "--frequency-hours",
        "6",
        "--output",
        "json",
    ]);
    let created: Value = serde_json::from_str(&created).unwrap();
    assert_eq!(created["state"], "PENDING");

    let from_store = setup.cli(&["jobs", "list", "--output", "json"]);
    let url = connector.url();
    let from_api = setup.cli(&[
        "jobs",
        "list",
        "--output",
        "json",
        "--api",
        &url,
        "--token-env",
        TOKEN_ENV,
    ]);
    assert_eq!(from_store, from_api);
    let jobs: Value = serde_json::from_str(&from_api).unwrap();
    assert_eq!(
        jobs["replicationJobList"].as_array().unwrap().len(),
        2,
        "{jobs}"
    );

    let table = setup.cli(&["jobs", "list", "--api", &url, "--token-env", TOKEN_ENV]);
    assert!(table.starts_with("JOB"), "{table}");
    assert!(table.contains("web01") && table.contains("db01"), "{table}");

    // Errors from the API come back with their code.
    let output = setup.cli_output(&[
        "jobs",
        "create",
        "--server",
        "db01",
        "--frequency-hours",
        "6",
        "--api",
        &url,
        "--token-env",
        TOKEN_ENV,
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ReplicationJobAlreadyExistsException"),
        "{stderr}"
    );

    let job_id = created["replicationJobId"].as_str().unwrap();
    let run = setup.cli(&[
        "jobs",
        "start",
        job_id,
        "--api",
        &url,
        "--token-env",
        TOKEN_ENV,
    ]);
    assert!(run.trim().starts_with("sms-run-"), "{run}");
    let runs = setup.cli(&["runs", "list", "--job", job_id, "--output", "json"]);
    let runs: Value = serde_json::from_str(&runs).unwrap();
    assert_eq!(
        runs["replicationRunList"][0]["replicationRunId"],
        run.trim()
    );
}

#[test]
fn serve_refuses_to_start_without_a_token() {
    let setup = Setup::new("[api]\nlisten = \"127.0.0.1:0\"\n");
    let output = setup.cli_output(&["serve"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("token_env") && stderr.contains("token_file"),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_the_connector_gracefully() {
    let connector = Connector::start();
    let (status, _) = connector.call("GetServers", json!({}));
    assert_eq!(status, 200);
    let log = connector.log.clone();
    let status = connector.terminate();
    assert!(status.success(), "{status}: {:?}", log.lock().unwrap());
    assert!(
        log.lock().unwrap().iter().any(|l| l.contains("stopped")),
        "{:?}",
        log.lock().unwrap()
    );
}
