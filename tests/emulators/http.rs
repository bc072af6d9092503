//! A minimal HTTP/1.1 client for the test doubles' control APIs (loopback JSON calls),
//! shared by their Rust harnesses: `#[path = "../http.rs"] mod http;`.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A minimal HTTP/1.1 client (one request per connection, `Connection: close`).
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), String> {
    let err = |what: &str, e: std::io::Error| format!("{what} {method} {path} at {addr}: {e}");
    let mut stream = TcpStream::connect(addr).map_err(|e| err("connecting for", e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| err("configuring", e))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\
         Content-Type: application/json\r\nConnection: close\r\n\r\n",
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
        .ok_or_else(|| format!("{method} {path}: no HTTP header in the answer"))?;
    let header = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status: u16 = header
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: bad status line in {header:?}"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// A JSON call: `body` sent unless null; the answer's status and JSON body (`null` when
/// empty, a string when it is not JSON).
pub fn json_call(
    addr: &str,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> Result<(u16, serde_json::Value), String> {
    let text = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, bytes) = http_request(addr, method, path, &text)?;
    let value = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        })
    };
    Ok((status, value))
}
