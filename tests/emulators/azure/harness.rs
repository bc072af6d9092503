//! Test harness for the Azure test double (`double.py`, Python standard library only).
//!
//! Include it from a test with
//! `#[path = "../../tests/emulators/azure/harness.rs"] mod azure_double;`
//! (the test crate needs `serde_json`). See tests/emulators/azure/README.md for what the
//! double emulates and its control API.
//!
//! ```text
//! AzureDouble::start(&["--retry-after", "0"]) -> Result<AzureDouble, String>
//! d.url                                  http://127.0.0.1:P (authority, ARM and blobs)
//! d.tenant, d.client_id, d.secret, d.subscription   the default identity
//! d.control(method, path, &json) -> Result<(u16, Value), String>
//! d.create_vm(json) -> Value             POST /_double/vms
//! d.write(disk_id, offset, &[u8])        a guest write (512-aligned)
//! d.clear(disk_id, offset, len)          pages cleared (TRIM)
//! d.read(disk_id, offset, len) -> Vec<u8>   the live disk
//! d.requests() / d.clear_requests()      the request log
//! d.state() -> Value                     disks, snapshots, SAS
//! d.faults(json) / d.clear_faults(); d.settings(json); d.identities(json)
//! ```

#![allow(dead_code)]

#[path = "../http.rs"]
mod http;
#[path = "../ready.rs"]
mod ready;

use std::path::PathBuf;
use std::process::{Child, Command};

use serde_json::{Value, json};

/// The double's default identity (see README.md).
pub const TENANT: &str = "00000000-0000-0000-0000-0000000000aa";
pub const CLIENT_ID: &str = "11111111-1111-1111-1111-111111111111";
pub const SECRET: &str = "double-secret";
pub const SUBSCRIPTION: &str = "22222222-2222-2222-2222-222222222222";

/// A running double; killed and its state directory removed on Drop.
#[derive(Debug)]
pub struct AzureDouble {
    pub url: String,
    pub tenant: String,
    pub client_id: String,
    pub secret: String,
    pub subscription: String,
    pub dir: PathBuf,
    addr: String,
    child: Child,
}

/// Where double.py is.
pub fn script_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/emulators/azure/double.py")
}

impl AzureDouble {
    /// Starts the double with extra flags (`--retry-after 0`, `--page-size 2`…).
    pub fn start(extra: &[&str]) -> Result<AzureDouble, String> {
        let dir = std::env::temp_dir().join(format!(
            "rehost-azure-double-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (child, url) = ready::spawn_until_ready(
            Command::new("python3")
                .arg(script_path())
                .arg("--state-dir")
                .arg(&dir)
                .args(["--port", "0", "--quiet"])
                .args(extra),
            "the Azure double",
        )?;
        let addr = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_owned();
        Ok(AzureDouble {
            url,
            tenant: TENANT.into(),
            client_id: CLIENT_ID.into(),
            secret: SECRET.into(),
            subscription: SUBSCRIPTION.into(),
            dir,
            addr,
            child,
        })
    }

    /// Any control (or other plain) call: status and JSON body (`null` when empty).
    pub fn control(&self, method: &str, path: &str, body: &Value) -> Result<(u16, Value), String> {
        http::json_call(&self.addr, method, path, body)
    }

    fn ok(&self, method: &str, path: &str, body: &Value) -> Value {
        let (status, value) = self
            .control(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {value}"
        );
        value
    }

    /// Creates a VM and its disks (`POST /_double/vms`); answers the VM's JSON.
    pub fn create_vm(&self, spec: &Value) -> Value {
        self.ok("POST", "/_double/vms", spec)
    }

    /// A guest write to the live disk.
    pub fn write(&self, disk_id: &str, offset: u64, data: &[u8]) {
        use base64::Engine;
        let data_b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.ok(
            "POST",
            "/_double/disks/write",
            &json!({"disk_id": disk_id, "offset": offset, "data_b64": data_b64}),
        );
    }

    /// Pages cleared on the live disk (a TRIM).
    pub fn clear(&self, disk_id: &str, offset: u64, length: u64) {
        self.ok(
            "POST",
            "/_double/disks/clear",
            &json!({"disk_id": disk_id, "offset": offset, "length": length}),
        );
    }

    /// The live disk's bytes.
    pub fn read(&self, disk_id: &str, offset: u64, length: u64) -> Vec<u8> {
        let path = format!(
            "/_double/disks/read?disk_id={}&offset={offset}&length={length}",
            enc(disk_id)
        );
        let (status, bytes) = http::http_request(&self.addr, "GET", &path, &[]).expect("read");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
        bytes
    }

    /// The request log.
    pub fn requests(&self) -> Vec<Value> {
        match self.ok("GET", "/_double/requests", &Value::Null) {
            Value::Array(items) => items,
            other => panic!("request log: {other}"),
        }
    }

    pub fn clear_requests(&self) {
        self.ok("DELETE", "/_double/requests", &Value::Null);
    }

    /// Disks, snapshots and SAS state.
    pub fn state(&self) -> Value {
        self.ok("GET", "/_double/state", &Value::Null)
    }

    pub fn faults(&self, faults: &Value) {
        self.ok("POST", "/_double/faults", faults);
    }

    pub fn clear_faults(&self) {
        self.ok("DELETE", "/_double/faults", &Value::Null);
    }

    pub fn settings(&self, settings: &Value) {
        self.ok("POST", "/_double/settings", settings);
    }

    pub fn identities(&self, identities: &Value) {
        self.ok("POST", "/_double/identities", identities);
    }
}

impl Drop for AzureDouble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
