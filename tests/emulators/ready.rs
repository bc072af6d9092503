//! Starting a test double that announces itself with a `READY …` first line on stdout,
//! shared by the Rust harnesses of the Python doubles: `#[path = "../ready.rs"] mod ready;`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a double may take to print its first line (CI machines are slow).
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Spawns `command` (stdout piped, stderr inherited) and waits for its first line, which
/// must be `READY <rest>`; answers the child and `<rest>`, trimmed. The rest of stdout is
/// drained on a thread so the double never blocks on a full pipe. On a timeout or any
/// other first line the child is killed. `what` names the double in errors.
pub fn spawn_until_ready(command: &mut Command, what: &str) -> Result<(Child, String), String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {what} ({:?}): {e}", command.get_program()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let _ = tx.send(first);
        for _ in lines {}
    });
    let line = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{what} did not print READY within {READY_TIMEOUT:?}"
            ));
        }
    };
    match line.strip_prefix("READY ") {
        Some(rest) => Ok((child, rest.trim().to_owned())),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("unexpected first line from {what}: {line:?}"))
        }
    }
}
