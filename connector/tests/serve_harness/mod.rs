//! The harness of the `rehost serve` tests: a temporary config and store with catalogued
//! test servers, the real binary started on 127.0.0.1:0, a minimal HTTP/1.1 client and a
//! webhook receiver, all on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TOKEN: &str = "test-token-0123456789abcdef0123456789";
pub const TOKEN_ENV: &str = "REHOST_TEST_API_TOKEN";

pub fn rehost() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rehost"));
    command.env_remove("REHOST_CONFIG").env_remove("RUST_LOG");
    command
}

/// A config in a temporary folder, with two catalogued test servers.
pub struct Setup {
    /// Kept for the folder's lifetime.
    _dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Setup {
    pub fn new(api_section: &str) -> Setup {
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

    pub fn with_token() -> Setup {
        Setup::new(&format!(
            "[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"{TOKEN_ENV}\"\n"
        ))
    }

    /// Runs `rehost ARGS --config CONFIG`, which must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_output(args);
        assert!(
            output.status.success(),
            "rehost {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn cli_output(&self, args: &[&str]) -> Output {
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
pub struct Connector {
    pub child: Child,
    pub address: String,
    pub log: Arc<Mutex<Vec<String>>>,
    pub setup: Setup,
}

impl Connector {
    pub fn start() -> Connector {
        Self::start_with(Setup::with_token())
    }

    pub fn start_with(setup: Setup) -> Connector {
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

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// POST /v1/{operation} with the right token.
    pub fn call(&self, operation: &str, body: Value) -> (u16, Value) {
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

    pub fn request(
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
    pub fn terminate(mut self) -> std::process::ExitStatus {
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

pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`): enough of a client
/// for these checks, and no dependency.
pub fn http(
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

/// A webhook receiver on loopback: answers the first `refuse` POSTs with 503, then 200,
/// and records each one's `X-Rehost-Event-Id` and body.
/// What the webhook receiver saw: (status it answered, X-Rehost-Event-Id, body).
pub type Deliveries = Arc<Mutex<Vec<(u16, String, Value)>>>;

pub fn webhook_receiver(refuse: usize) -> (String, Deliveries) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received: Deliveries = Arc::new(Mutex::new(Vec::new()));
    let seen = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            let mut event_id = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap(),
                        "x-rehost-event-id" => event_id = value.trim().to_owned(),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut seen = seen.lock().unwrap();
            let status = if seen.len() < refuse { 503 } else { 200 };
            seen.push((
                status,
                event_id,
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            ));
            drop(seen);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (url, received)
}
