//! `rehost serve` over HTTPS, as the appliance runs it: a self-signed certificate made with
//! openssl, the thumbprint the connector prints, `/healthz` through a client trusting only
//! that certificate, and `rehost jobs --api https://…` pinning the thumbprint (and failing
//! with a wrong one).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "tls-test-token-0123456789abcdef";

/// `openssl x509 -fingerprint -sha256` of `cert`, as `AB:CD:…`.
fn openssl_thumbprint(cert: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.trim().rsplit('=').next().unwrap().to_owned()
}

#[test]
fn the_api_serves_https_with_a_pinnable_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=rehost-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let config = dir.path().join("rehost.toml");
    std::fs::write(
        &config,
        "[store]\npath = \"rehost.db\"\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"REHOST_TEST_TOKEN\"\ntls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"\n",
    )
    .unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_rehost"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("REHOST_TEST_TOKEN", TOKEN)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        if line.contains("listening on") {
            break line;
        }
        assert!(Instant::now() < deadline, "no listening line");
    };
    let address = line
        .split("https://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("not https: {line}"))
        .to_owned();
    let printed = line
        .split("SHA-256 ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .to_owned();
    let thumbprint = openssl_thumbprint(&cert);
    assert_eq!(
        printed, thumbprint,
        "the printed thumbprint is the certificate's"
    );

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pem = std::fs::read(&cert).unwrap();
    let status = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
            .build()
            .unwrap();
        client
            .get(format!("https://{address}/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 200);
    // Plain HTTP to the HTTPS port gets no API.
    let plain = runtime.block_on(async {
        reqwest::get(format!("http://{address}/healthz"))
            .await
            .map(|r| r.status().as_u16())
    });
    assert!(
        plain.is_err() || plain.as_ref().is_ok_and(|s| *s != 200),
        "{plain:?}"
    );

    let jobs = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rehost"))
            .args(["jobs", "list", "--output", "json", "--api"])
            .arg(format!("https://{address}"))
            .args(extra)
            .env("REHOST_API_TOKEN", TOKEN)
            .output()
            .unwrap()
    };
    let pinned = jobs(&["--api-thumbprint", &thumbprint]);
    assert!(
        pinned.status.success(),
        "{}",
        String::from_utf8_lossy(&pinned.stderr)
    );
    let by_ca = jobs(&["--api-ca-file", cert.to_str().unwrap()]);
    assert!(
        by_ca.status.success(),
        "{}",
        String::from_utf8_lossy(&by_ca.stderr)
    );
    let wrong_thumbprint = vec!["AB"; 32].join(":");
    let wrong = jobs(&["--api-thumbprint", &wrong_thumbprint]);
    assert!(!wrong.status.success(), "a wrong thumbprint was trusted");
    let system = jobs(&[]);
    assert!(
        !system.status.success(),
        "a self-signed certificate was trusted by default"
    );
    let _ = serve.kill();
    let _ = serve.wait();
}
