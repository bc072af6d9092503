//! Test harness for rehost-vcsim, the vCenter emulator (std only, no dependencies).
//!
//! Include it from a test with
//! `#[path = "../../tests/emulators/vcsim/harness.rs"] mod vcsim;`
//! (adjust the path to the test file's depth). Build the emulator first with
//! `tests/emulators/install.sh` (or `tests/emulators/vcsim/build.sh`).
//!
//! API (kept stable; see tests/emulators/vcsim/README.md for what the emulator does):
//! ```text
//! Vcsim::start() -> Result<Vcsim, String>             4 powered-on VMs, user/pass
//! Vcsim::start_with(&["--vms", "3"]) -> Result<..>    extra rehost-vcsim flags
//! vc.url            String   https://127.0.0.1:P/sdk
//! vc.base_url       String   https://127.0.0.1:P (for /folder and /nfc URLs)
//! vc.control_url    String   http://127.0.0.1:Q (plain-HTTP control API)
//! vc.username, vc.password   String
//! vc.ca_pem         PathBuf  CA that signed the server certificate (PEM)
//! vc.thumbprint     String   SHA-256 of the server certificate, "AB:CD:..."
//! vc.datastore_dir  PathBuf  directory backing datastore LocalDS_0 ("[LocalDS_0] x" = dir/x)
//! vc.dir            PathBuf  the temp dir holding it all (removed on Drop)
//! vc.vm_names() -> Result<Vec<String>, String>
//! vc.vms_json() -> Result<String, String>             GET /_rehost/vms (raw JSON)
//! vc.disk_info_json(vm, key) -> Result<String, String>
//! vc.flat_path(vm) -> PathBuf                         path of `<vm>/disk1-flat.vmdk` (the base)
//! vc.disk_load(vm, key, &Path) -> Result<(), String>  set size and content from a file
//! vc.disk_write(vm, key, offset, &[u8]) -> Result<(), String>   a guest write
//! vc.disk_read(vm, key) -> Result<Vec<u8>, String>    the disk as the guest sees it now
//! vc.set_power(vm, PowerState::Off) -> Result<(), String>
//! vc.snapshots(vm) -> Result<Vec<String>, String>     snapshot names (leftover checks)
//! vc.set_cbt_window(bytes) -> Result<(), String>      QueryChangedDiskAreas chunk size
//! vc.set_lease_timeout(secs) -> Result<(), String>    HttpNfcLease expiry without progress
//! vc.set_retrieve_page(objects) -> Result<(), String> page RetrievePropertiesEx at N (0: off)
//! vc.set_export_layout(ExportLayout::Qemu) -> Result<(), String>  ESXi (default) or qemu-img stream
//! vc.set_star_host(true) -> Result<(), String>       deviceUrl hosts become "*" (https://*/nfc/...)
//! vc.fail_folder_after(path, bytes, count) -> Result<(), String>  abort GET after N bytes
//! vc.fail_folder_status(path, status, count) -> Result<(), String> answer an HTTP error
//! vc.slow_folder(path, delay_ms, count) -> Result<(), String>  delay each GET by delay_ms
//! vc.fail_soap(method, fault, count) -> Result<(), String>  e.g. ("RemoveSnapshot_Task", "SystemError", 1)
//! vc.clear_faults() -> Result<(), String>
//! vc.deny_privileges(&["VirtualMachine.State.CreateSnapshot"]) -> Result<(), String>  (&[] = all granted)
//! vc.control(method, path_and_query, body) -> Result<(u16, Vec<u8>), String>  any control call
//! ```
//! `key` is the disk's device key (2000 for the first SCSI disk of the default VMs).
//! `path` for the folder faults is datastore-relative, e.g. "DC0_H0_VM0/disk1-flat.vmdk".

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the emulator may take to print READY (it needs ~0.1 s; CI machines are slow).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The power states the control API can set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    On,
    Off,
    Suspended,
}

/// The streamOptimized layout ExportVm serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportLayout {
    /// ESXi's: GD at the end (`gdOffset` = GD_AT_END), footer and end-of-stream marker.
    Esxi,
    /// qemu-img's: GD offset in the header, no footer.
    Qemu,
}

/// A running rehost-vcsim; killed and its directory removed on Drop.
#[derive(Debug)]
pub struct Vcsim {
    pub url: String,
    pub base_url: String,
    pub control_url: String,
    pub username: String,
    pub password: String,
    pub ca_pem: PathBuf,
    pub thumbprint: String,
    pub datastore_dir: PathBuf,
    pub dir: PathBuf,
    control_addr: String,
    child: Child,
}

/// Where the binary is: $REHOST_VCSIM_BIN, else the install location.
pub fn binary_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REHOST_VCSIM_BIN") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("REHOST_EMULATOR_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/rehost-emulators"));
    home.join("vcsim").join("rehost-vcsim")
}

fn unique_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "rehost-vcsim-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    ))
}

impl Vcsim {
    /// Starts the default model (4 powered-on VMs with one 64 MiB disk each).
    pub fn start() -> Result<Vcsim, String> {
        Self::start_with(&[])
    }

    /// Starts with extra rehost-vcsim flags (e.g. `--vms 3`, `--username admin`).
    pub fn start_with(extra: &[&str]) -> Result<Vcsim, String> {
        let bin = binary_path();
        if !bin.exists() {
            return Err(format!(
                "rehost-vcsim not found at {}: run tests/emulators/install.sh \
                 (or tests/emulators/vcsim/build.sh) first",
                bin.display()
            ));
        }
        let dir = unique_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let datastore_dir = dir.join("ds");
        let cert_dir = dir.join("certs");
        let log_path = dir.join("vcsim.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let mut username = "user".to_string();
        let mut password = "pass".to_string();
        for pair in extra.windows(2) {
            match pair[0] {
                "--username" => username = pair[1].to_string(),
                "--password" => password = pair[1].to_string(),
                _ => {}
            }
        }
        let mut child = Command::new(&bin)
            .arg("--datastore-dir")
            .arg(&datastore_dir)
            .arg("--cert-dir")
            .arg(&cert_dir)
            .arg("--verbose")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(line) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the emulator never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(READY_TIMEOUT) {
            Ok(Ok(line)) => line,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "rehost-vcsim did not print READY within {READY_TIMEOUT:?} ({other:?}); log:\n{log}"
                ));
            }
        };
        let parsed = parse_ready(&line);
        let Some((url, control_url)) = parsed else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("unexpected first line from rehost-vcsim: {line:?}"));
        };
        let thumbprint = std::fs::read_to_string(cert_dir.join("thumbprint"))
            .map_err(|e| format!("reading thumbprint: {e}"))?
            .trim()
            .to_string();
        let base_url = url.trim_end_matches("/sdk").to_string();
        let control_addr = control_url.trim_start_matches("http://").to_string();
        Ok(Vcsim {
            url,
            base_url,
            control_url,
            username,
            password,
            ca_pem: cert_dir.join("ca.pem"),
            thumbprint,
            datastore_dir,
            dir,
            control_addr,
            child,
        })
    }

    /// The base flat file of a VM's first disk (what `/folder/<vm>/disk1-flat.vmdk` serves).
    pub fn flat_path(&self, vm: &str) -> PathBuf {
        self.datastore_dir.join(vm).join("disk1-flat.vmdk")
    }

    /// Sends one request to the control API; answers (status, body).
    pub fn control(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<(u16, Vec<u8>), String> {
        http_request(&self.control_addr, method, path_and_query, body)
    }

    fn control_ok(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Vec<u8>, String> {
        let (status, out) = self.control(method, path_and_query, body)?;
        if status != 200 && status != 206 {
            return Err(format!(
                "control {method} {path_and_query}: HTTP {status}: {}",
                String::from_utf8_lossy(&out)
            ));
        }
        Ok(out)
    }

    pub fn vms_json(&self) -> Result<String, String> {
        let out = self.control_ok("GET", "/_rehost/vms", b"")?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// The VM names, in the emulator's order.
    pub fn vm_names(&self) -> Result<Vec<String>, String> {
        let json = self.vms_json()?;
        // Each VM object starts with "name"; disks carry no "name" field.
        let mut names = Vec::new();
        let mut rest = json.as_str();
        while let Some(i) = rest.find("\"name\":") {
            rest = &rest[i + 7..];
            let (items, _) = parse_string_array(&format!("[{}]", leading_string(rest)?))?;
            names.extend(items);
        }
        Ok(names)
    }

    pub fn disk_info_json(&self, vm: &str, key: i32) -> Result<String, String> {
        let q = format!("/_rehost/disk/info?vm={}&key={key}", enc(vm));
        Ok(String::from_utf8_lossy(&self.control_ok("GET", &q, b"")?).into_owned())
    }

    pub fn disk_load(&self, vm: &str, key: i32, path: &Path) -> Result<(), String> {
        let p = path.to_str().ok_or("path is not UTF-8")?;
        let q = format!(
            "/_rehost/disk/load?vm={}&key={key}&path={}",
            enc(vm),
            enc(p)
        );
        self.control_ok("POST", &q, b"").map(|_| ())
    }

    pub fn disk_write(&self, vm: &str, key: i32, offset: u64, data: &[u8]) -> Result<(), String> {
        let q = format!(
            "/_rehost/disk/write?vm={}&key={key}&offset={offset}",
            enc(vm)
        );
        self.control_ok("POST", &q, data).map(|_| ())
    }

    pub fn disk_read(&self, vm: &str, key: i32) -> Result<Vec<u8>, String> {
        let q = format!("/_rehost/disk?vm={}&key={key}", enc(vm));
        self.control_ok("GET", &q, b"")
    }

    pub fn set_power(&self, vm: &str, state: PowerState) -> Result<(), String> {
        let s = match state {
            PowerState::On => "on",
            PowerState::Off => "off",
            PowerState::Suspended => "suspended",
        };
        let q = format!("/_rehost/power?vm={}&state={s}", enc(vm));
        self.control_ok("POST", &q, b"").map(|_| ())
    }

    pub fn snapshots(&self, vm: &str) -> Result<Vec<String>, String> {
        let q = format!("/_rehost/snapshots?vm={}", enc(vm));
        let out = self.control_ok("GET", &q, b"")?;
        parse_string_array(String::from_utf8_lossy(&out).trim()).map(|(v, _)| v)
    }

    pub fn set_cbt_window(&self, bytes: u64) -> Result<(), String> {
        self.control_ok("POST", &format!("/_rehost/cbt/window?bytes={bytes}"), b"")
            .map(|_| ())
    }

    pub fn set_lease_timeout(&self, secs: f64) -> Result<(), String> {
        self.control_ok(
            "POST",
            &format!("/_rehost/lease/timeout?seconds={secs}"),
            b"",
        )
        .map(|_| ())
    }

    /// Pages RetrievePropertiesEx answers at `objects` even without maxObjects (0: off).
    pub fn set_retrieve_page(&self, objects: u32) -> Result<(), String> {
        self.control_ok(
            "POST",
            &format!("/_rehost/retrieve/page?objects={objects}"),
            b"",
        )
        .map(|_| ())
    }

    /// Sets the layout of the streamOptimized VMDKs later exports serve.
    pub fn set_export_layout(&self, layout: ExportLayout) -> Result<(), String> {
        let l = match layout {
            ExportLayout::Esxi => "esxi",
            ExportLayout::Qemu => "qemu",
        };
        self.control_ok("POST", &format!("/_rehost/export/layout?layout={l}"), b"")
            .map(|_| ())
    }

    /// Makes later leases' deviceUrl URLs name the host `*`, as vCenter may.
    pub fn set_star_host(&self, enabled: bool) -> Result<(), String> {
        let q = format!("/_rehost/export/star-host?enabled={}", u8::from(enabled));
        self.control_ok("POST", &q, b"").map(|_| ())
    }

    /// The next `count` GETs of `path` (-1: all) abort the connection after `bytes` body bytes.
    pub fn fail_folder_after(&self, path: &str, bytes: u64, count: i32) -> Result<(), String> {
        let q = format!(
            "/_rehost/fault/folder?path={}&after={bytes}&count={count}",
            enc(path)
        );
        self.control_ok("POST", &q, b"").map(|_| ())
    }

    /// The next `count` GETs of `path` (-1: all) answer HTTP `status`.
    pub fn fail_folder_status(&self, path: &str, status: u16, count: i32) -> Result<(), String> {
        let q = format!(
            "/_rehost/fault/folder?path={}&status={status}&count={count}",
            enc(path)
        );
        self.control_ok("POST", &q, b"").map(|_| ())
    }

    /// The next `count` GETs of datastore `path` (-1: all) wait `delay_ms` before answering.
    pub fn slow_folder(&self, path: &str, delay_ms: u32, count: i32) -> Result<(), String> {
        let q = format!(
            "/_rehost/fault/folder?path={}&delay_ms={delay_ms}&count={count}",
            enc(path)
        );
        self.control_ok("POST", &q, b"").map(|_| ())
    }

    /// The next `count` calls of SOAP `method` (-1: all) answer `fault` (SystemError,
    /// NotAuthenticated, InvalidState, TaskInProgress, FileFault).
    pub fn fail_soap(&self, method: &str, fault: &str, count: i32) -> Result<(), String> {
        let q = format!(
            "/_rehost/fault/soap?method={}&fault={}&count={count}",
            enc(method),
            enc(fault)
        );
        self.control_ok("POST", &q, b"").map(|_| ())
    }

    pub fn clear_faults(&self) -> Result<(), String> {
        self.control_ok("POST", "/_rehost/fault/clear", b"")
            .map(|_| ())
    }

    /// Runs as a user lacking these privileges (an empty list grants everything again).
    pub fn deny_privileges(&self, ids: &[&str]) -> Result<(), String> {
        let q = format!("/_rehost/privileges?deny={}", enc(&ids.join(",")));
        self.control_ok("POST", &q, b"").map(|_| ())
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("REHOST_KEEP_EMULATOR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `READY https://127.0.0.1:P/sdk control=http://127.0.0.1:Q` -> (sdk url, control url).
fn parse_ready(line: &str) -> Option<(String, String)> {
    let mut parts = line.split_whitespace();
    if parts.next()? != "READY" {
        return None;
    }
    let url = parts.next()?.to_string();
    let control = parts.next()?.strip_prefix("control=")?.to_string();
    Some((url, control))
}

/// Percent-encodes a query value (keeps unreserved characters and '/').
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The JSON string literal at the start of `s` (after optional spaces), quotes included.
fn leading_string(s: &str) -> Result<&str, String> {
    let t = s.trim_start();
    let bytes = t.as_bytes();
    if bytes.first() != Some(&b'"') {
        return Err(format!(
            "expected a JSON string at {:?}",
            &t[..t.len().min(20)]
        ));
    }
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Ok(&t[..=i]),
            _ => i += 1,
        }
    }
    Err("unterminated JSON string".into())
}

/// Parses a JSON array of strings; answers the items and the rest of the input.
fn parse_string_array(s: &str) -> Result<(Vec<String>, &str), String> {
    let mut rest = s.trim_start().strip_prefix('[').ok_or("expected '['")?;
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(']') {
            return Ok((out, r));
        }
        let lit = leading_string(rest)?;
        rest = &rest.trim_start()[lit.len()..];
        let mut item = String::new();
        let mut chars = lit[1..lit.len() - 1].chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                item.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => item.push('\n'),
                Some('t') => item.push('\t'),
                Some('u') => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let code = u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?;
                    item.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
                Some(other) => item.push(other),
                None => return Err("dangling escape".into()),
            }
        }
        out.push(item);
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        }
    }
}

/// A minimal HTTP/1.1 client (one request per connection; Content-Length or chunked).
fn http_request(
    addr: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let err =
        |what: &str, e: std::io::Error| format!("{what} {method} {path_and_query} at {addr}: {e}");
    let mut stream = TcpStream::connect(addr).map_err(|e| err("connecting for", e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| err("configuring", e))?;
    let head = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|_| stream.write_all(body))
        .map_err(|e| err("sending", e))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| err("reading the answer to", e))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{method} {path_and_query}: no HTTP header in the answer"))?;
    let header = String::from_utf8_lossy(&raw[..split]).into_owned();
    let payload = &raw[split + 4..];
    let status: u16 = header
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path_and_query}: bad status line in {header:?}"))?;
    let chunked = header.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(payload)?
    } else {
        payload.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
