//! Ranged reads of datastore files through vCenter's `/folder` HTTP interface, with the
//! session cookie.

use std::time::Duration;

use bytes::Bytes;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::Url;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, COOKIE, RANGE};
use tracing::debug;

use crate::client::{Client, snippet, transport};
use crate::error::{Error, Result};

/// Characters escaped in a path segment: everything but unreserved ones and `/` between
/// segments (we encode each segment, so `/` never appears inside one).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'[')
    .add(b']')
    .add(b'&')
    .add(b'+')
    .add(b';')
    .add(b'=')
    .add(b'\\')
    .add(b'^')
    .add(b'|');

/// Attempts of one ranged read: a datastore behind a busy host drops connections now
/// and then; three more tries with 1, 2, 4 s between ride that out, longer outages are
/// the scheduler's to retry.
const READ_ATTEMPTS: u32 = 4;

/// A file on a datastore, read with ranged GETs.
#[derive(Debug, Clone)]
pub struct DatastoreFile {
    client: Client,
    url: Url,
}

/// Splits `[ds] folder/file.vmdk` into the datastore name and the path.
pub fn parse_datastore_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.trim().strip_prefix('[')?;
    let (ds, file) = rest.split_once(']')?;
    Some((ds, file.trim_start()))
}

/// The data file of a flat VMDK: `disk.vmdk` → `disk-flat.vmdk`.
pub fn flat_extent_path(descriptor: &str) -> String {
    match descriptor.strip_suffix(".vmdk") {
        Some(stem) => format!("{stem}-flat.vmdk"),
        None => format!("{descriptor}-flat.vmdk"),
    }
}

/// The `/folder` URL of `path` on datastore `datastore` in datacenter `datacenter`.
pub fn folder_url(sdk: &Url, datacenter: &str, datastore: &str, path: &str) -> Result<Url> {
    let encoded: Vec<String> = path
        .split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect();
    let mut url = sdk.clone();
    url.set_path(&format!("/folder/{}", encoded.join("/")));
    url.set_query(None);
    url.query_pairs_mut()
        .append_pair("dcPath", datacenter)
        .append_pair("dsName", datastore);
    url.set_fragment(None);
    Ok(url)
}

impl DatastoreFile {
    /// The file at `[datastore] path` in `datacenter`.
    pub fn new(client: &Client, datacenter: &str, datastore: &str, path: &str) -> Result<Self> {
        Ok(DatastoreFile {
            client: client.clone(),
            url: folder_url(client.url(), datacenter, datastore, path)?,
        })
    }

    /// The URL read.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// The file's size in bytes.
    pub async fn size(&self) -> Result<u64> {
        // A one-byte range answers the total in Content-Range; a server that ignores
        // ranges answers 200 with the length (and we drop the body unread).
        let response = self.get(Some((0, 0))).await?;
        let status = response.status().as_u16();
        let headers = response.headers();
        let total = match status {
            206 => headers
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_content_range(v).map(|(_, _, total)| total)),
            200 => headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            _ => None,
        };
        total.ok_or_else(|| Error::Http {
            what: self.url.to_string(),
            status,
            body: "no size in Content-Range or Content-Length".into(),
        })
    }

    /// Reads `len` bytes at `offset`, checking the server sent exactly that range.
    pub async fn read_range(&self, offset: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let mut delay = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            match self.read_range_once(offset, len).await {
                Err(e) if attempt < READ_ATTEMPTS && retryable(&e) => {
                    debug!(url = %self.url, offset, len, attempt, error = %e, "retrying read");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn read_range_once(&self, offset: u64, len: u64) -> Result<Bytes> {
        let last = offset + len - 1;
        let response = self.get(Some((offset, last))).await?;
        let status = response.status().as_u16();
        if status != 206 {
            return Err(Error::RangeMismatch {
                url: self.url.to_string(),
                start: offset,
                end: last,
                got: format!("HTTP {status} instead of 206 Partial Content"),
            });
        }
        let range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_default();
        match parse_content_range(&range) {
            Some((start, end, _)) if start == offset && end == last => {}
            _ => {
                return Err(Error::RangeMismatch {
                    url: self.url.to_string(),
                    start: offset,
                    end: last,
                    got: format!("Content-Range {range:?}"),
                });
            }
        }
        let body = response
            .bytes()
            .await
            .map_err(|e| transport(&self.url, self.url.as_str(), e))?;
        if body.len() as u64 != len {
            return Err(Error::RangeMismatch {
                url: self.url.to_string(),
                start: offset,
                end: last,
                got: format!("{} bytes", body.len()),
            });
        }
        Ok(body)
    }

    async fn get(&self, range: Option<(u64, u64)>) -> Result<reqwest::Response> {
        let mut req = self.client.http().get(self.url.clone());
        if let Some(cookie) = self.client.cookie() {
            req = req.header(COOKIE, cookie);
        }
        if let Some((first, last)) = range {
            req = req.header(RANGE, format!("bytes={first}-{last}"));
        }
        let response = req
            .send()
            .await
            .map_err(|e| transport(&self.url, self.url.as_str(), e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(Error::Http {
            what: self.url.to_string(),
            status: status.as_u16(),
            body: snippet(&body),
        })
    }
}

fn retryable(e: &Error) -> bool {
    matches!(
        e.kind(),
        rehost_core::ErrorKind::Transient | rehost_core::ErrorKind::Throttled
    )
}

/// `bytes 0-99/1000` → `(0, 99, 1000)`.
pub fn parse_content_range(value: &str) -> Option<(u64, u64, u64)> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    Some((
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths() {
        assert_eq!(
            parse_datastore_path("[LocalDS_0] DC0_H0_VM0/disk1.vmdk"),
            Some(("LocalDS_0", "DC0_H0_VM0/disk1.vmdk"))
        );
        assert_eq!(
            parse_datastore_path("[ds 1]  a b/c.vmdk"),
            Some(("ds 1", "a b/c.vmdk"))
        );
        assert_eq!(parse_datastore_path("no brackets"), None);
        assert_eq!(flat_extent_path("vm/disk1.vmdk"), "vm/disk1-flat.vmdk");
    }

    #[test]
    fn folder_urls_are_percent_encoded() {
        let sdk = Url::parse("https://vc.example:8443/sdk").unwrap();
        let url = folder_url(&sdk, "Prod/DC 1", "ds#1", "my vm/disk&1.vmdk").unwrap();
        assert_eq!(
            url.as_str(),
            "https://vc.example:8443/folder/my%20vm/disk%261.vmdk?dcPath=Prod%2FDC+1&dsName=ds%231"
        );
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99, 1000)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
