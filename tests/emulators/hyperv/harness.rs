//! Test harness for the Hyper-V double (`double.py`) and the Samba that serves its disk
//! files as the administrative share `C$` (tests/emulators/samba/start.sh).
//!
//! Include it from a test with
//! `#[path = "../../tests/emulators/hyperv/harness.rs"] mod hyperv_double;`
//! (the test crate needs `serde_json` and `base64`). The double's control API is in
//! tests/emulators/hyperv/README.md.
//!
//! ```text
//! HypervHost::start(&["--job-polls", "1"]) -> Result<HypervHost, String>
//! h.url            http://127.0.0.1:P/wsman          h.smb_address   127.0.0.1:Q
//! h.create_vm(json) -> Value                         POST /_double/vms
//! h.write(vm, disk, offset, &[u8]); h.fill(vm, disk, offset, len, byte)
//! h.write_on_checkpoint(vm, json); h.sha256(vm, disk); h.vm(vm) -> Value
//! h.control(method, path, &json) -> Result<(u16, Value), String>
//! ```

#![allow(dead_code)]

#[path = "../http.rs"]
mod http;
#[path = "../ready.rs"]
mod ready;

use std::path::PathBuf;
use std::process::{Child, Command};

use serde_json::{Value, json};

/// The double's default administrator and the Samba users (see the READMEs).
pub const USER: &str = "Administrator";
pub const PASSWORD: &str = "Hv-Passw0rd!";
pub const SMB_USER: &str = "hvadmin";
pub const SMB_PASSWORD: &str = "Hv-Passw0rd!";
pub const SMB_REFUSED_USER: &str = "nosmb";
pub const SMB_REFUSED_PASSWORD: &str = "NoSmb-Passw0rd!";

/// A running double and Samba; both stopped and the state removed on Drop.
#[derive(Debug)]
pub struct HypervHost {
    pub url: String,
    pub smb_address: String,
    pub dir: PathBuf,
    addr: String,
    child: Child,
}

fn emulators() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/emulators")
}

fn python() -> PathBuf {
    let home = std::env::var("REHOST_EMULATOR_HOME")
        .unwrap_or_else(|_| "/var/tmp/rehost-emulators".to_owned());
    PathBuf::from(home).join("hyperv-venv/bin/python")
}

impl HypervHost {
    /// Starts Samba and the double with extra flags.
    pub fn start(extra: &[&str]) -> Result<HypervHost, String> {
        let dir = std::env::temp_dir().join(format!(
            "rehost-hyperv-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let state = dir.join("state");
        let share = state.join("C");
        std::fs::create_dir_all(&share).map_err(|e| e.to_string())?;
        let samba = Command::new(emulators().join("samba/start.sh"))
            .arg(dir.join("samba"))
            .arg(&share)
            .output()
            .map_err(|e| format!("starting Samba: {e}"))?;
        let line = String::from_utf8_lossy(&samba.stdout).into_owned();
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "READY")
            .nth(1)
            .ok_or_else(|| {
                format!(
                    "Samba did not start: {line} {}",
                    String::from_utf8_lossy(&samba.stderr)
                )
            })?
            .to_owned();
        // A real host has one account for WinRM and SMB: the double knows Samba's users too.
        let users = dir.join("users.json");
        let list = json!({"users": [
            {"name": SMB_USER, "password": SMB_PASSWORD, "admin": true},
            {"name": SMB_REFUSED_USER, "password": SMB_REFUSED_PASSWORD, "admin": true},
        ]});
        std::fs::write(&users, list.to_string()).map_err(|e| e.to_string())?;
        let (child, url) = ready::spawn_until_ready(
            Command::new(python())
                .arg(emulators().join("hyperv/double.py"))
                .arg("--state-dir")
                .arg(&state)
                .arg("--users")
                .arg(&users)
                .args(["--port", "0", "--quiet"])
                .args(extra),
            "the Hyper-V double",
        )?;
        let addr = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(HypervHost {
            url,
            smb_address: format!("127.0.0.1:{port}"),
            dir,
            addr,
            child,
        })
    }

    /// A control API call; answers (status, JSON or string).
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

    /// `POST /_double/vms`; answers the VM's JSON (`id`, `disks`).
    pub fn create_vm(&self, spec: &Value) -> Value {
        self.ok("POST", "/_double/vms", spec)
    }

    /// A guest write to disk `disk` (index) of VM `vm`.
    pub fn write(&self, vm: &str, disk: usize, offset: u64, data: &[u8]) {
        use base64::Engine;
        let data_b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.ok(
            "POST",
            &format!("/_double/vms/{vm}/write"),
            &json!({"disk": disk, "offset": offset, "data_b64": data_b64}),
        );
    }

    /// A guest write of deterministic pseudo-random bytes.
    pub fn write_seeded(&self, vm: &str, disk: usize, offset: u64, len: u64, seed: u64) {
        self.ok(
            "POST",
            &format!("/_double/vms/{vm}/write"),
            &json!({"disk": disk, "offset": offset, "len": len, "seed": seed}),
        );
    }

    /// A write the double makes right after the next checkpoint (the VM keeps running).
    pub fn write_on_checkpoint(&self, vm: &str, body: &Value) {
        self.ok(
            "POST",
            &format!("/_double/vms/{vm}/write_on_checkpoint"),
            body,
        );
    }

    /// SHA-256 (hex) of the VM's current disk contents.
    pub fn sha256(&self, vm: &str, disk: usize) -> String {
        let v = self.ok(
            "GET",
            &format!("/_double/vms/{vm}/disks/{disk}/sha256"),
            &Value::Null,
        );
        v.get("sha256")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| v.as_str().unwrap_or_default().trim().to_owned())
    }

    /// Bytes of the VM's current disk.
    pub fn read(&self, vm: &str, disk: usize, offset: u64, len: u64) -> Vec<u8> {
        use base64::Engine;
        let v = self.ok(
            "GET",
            &format!("/_double/vms/{vm}/disks/{disk}/read?offset={offset}&len={len}"),
            &Value::Null,
        );
        base64::engine::general_purpose::STANDARD
            .decode(v["data_b64"].as_str().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The WS-Management requests so far (`[{action, class, method…}]`).
    pub fn requests(&self) -> Value {
        self.ok("GET", "/_double/requests", &Value::Null)
    }

    /// The VM's state: checkpoints, reference points, files.
    pub fn vm(&self, vm: &str) -> Value {
        self.ok("GET", &format!("/_double/vms/{vm}"), &Value::Null)
    }

    /// Injects faults (`[{method, return_value|job_error, times}]`).
    pub fn faults(&self, body: &Value) {
        self.ok("POST", "/_double/faults", body);
    }

    /// Invalidates the VM's RCT ids.
    pub fn invalidate_rct(&self, vm: &str) {
        self.ok(
            "POST",
            &format!("/_double/vms/{vm}/invalidate_rct"),
            &Value::Null,
        );
    }
}

impl Drop for HypervHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new(emulators().join("samba/start.sh"))
            .arg("stop")
            .arg(self.dir.join("samba"))
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
