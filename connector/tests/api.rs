//! `rehost serve` as a client sees it: the real binary on 127.0.0.1:0 with a temporary
//! config and store (servers added to the catalog with the hidden test command, no
//! vCenter or AWS), spoken to over plain HTTP/1.1 on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod serve_harness;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use serve_harness::{Connector, Setup, TOKEN, TOKEN_ENV, webhook_receiver};

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
    let (status, error) = connector.call("CreateReplicationJob", create_body("no-such-vm"));
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("InvalidParameterException"))
    );
    assert!(
        error["message"].as_str().unwrap().starts_with("serverId: "),
        "{error}"
    );
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

#[test]
fn job_events_reach_the_webhook_after_it_recovers() {
    let (url, received) = webhook_receiver(1);
    let setup = Setup::new(&format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"{TOKEN_ENV}\"\nwebhook_url = \"{url}\"\n"
    ));
    let connector = Connector::start_with(setup);
    let (status, created) = connector.call("CreateReplicationJob", create_body("web01"));
    assert_eq!(status, 200, "{created}");

    // Refused once, then delivered after the first backoff (1 s) and never again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while received
        .lock()
        .unwrap()
        .iter()
        .all(|(status, ..)| *status != 200)
    {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:?}",
            received.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let received = received.lock().unwrap();
    assert_eq!(received.len(), 2, "{received:?}");
    let (first, second) = (&received[0], &received[1]);
    assert_eq!((first.0, second.0), (503, 200));
    assert_eq!(first.1, second.1, "the same event is retried");
    let event = &second.2;
    assert_eq!(event["type"], "ReplicationJobStateChanged");
    assert_eq!(event["replicationJobId"], created["replicationJobId"]);
    assert_eq!(event["state"], "PENDING");
}
