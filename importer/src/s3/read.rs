//! Random reads of an S3 object for the disk-image library: [`S3ReadAt`] answers
//! `read_exact_at` with ranged GETs, [`S3Fs`] opens the other files a multi-file image
//! names (VMDK extents, parents) as keys of the same bucket.
//!
//! The disk-image library reads from plain threads (its readers are synchronous), so these
//! types block on a Tokio runtime [`Handle`]. They must be called from a thread that is
//! not driving async tasks — a `spawn_blocking` thread or a thread of one's own — and the
//! runtime must be multi-threaded; calling them from inside an async task panics
//! (`Handle::block_on` inside a runtime).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use aws_sdk_s3::Client;
use bytes::Bytes;
use rehost_core::ErrorKind;
use rehost_diskimage::{FileSystem, ImageFile, ReadAt};
use tokio::runtime::Handle;

use super::url::S3Url;
use crate::error::{Error, Result};
use crate::retry::{classify as aws_error, retry};

/// Bytes fetched per GET at least. A 512-byte header read or a 64 KiB grain would each
/// cost a request (~20–50 ms) otherwise; 4 MiB is where S3's per-request latency stops
/// dominating its per-connection throughput, and it holds several 1 MiB chunks the
/// reader threads ask for one after another.
const WINDOW_BYTES: u64 = 4 << 20;
/// Windows kept. Reader threads work on neighbouring chunks at once (about twice their
/// number are in flight), so a handful of recent windows serve them all; 16 × 4 MiB = 64
/// MiB bounds the memory whatever the access pattern.
const CACHED_WINDOWS: usize = 16;

/// An S3 object read with ranged GETs, pinned to the version seen at open: every read
/// sends `If-Match` with the ETag from `HeadObject`, so an object replaced mid-import fails
/// the import instead of mixing two versions. See the module comment for threading.
pub struct S3ReadAt {
    client: Client,
    url: S3Url,
    etag: String,
    len: u64,
    runtime: Handle,
    /// Most recently used first. The lock is held only to look up or insert a window,
    /// never during a GET; each window has its own lock so that threads wanting the same
    /// window wait for one GET rather than sending several.
    windows: Mutex<VecDeque<(u64, Arc<Window>)>>,
}

#[derive(Debug, Default)]
struct Window {
    bytes: Mutex<Option<Bytes>>,
}

impl std::fmt::Debug for S3ReadAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3ReadAt")
            .field("url", &self.url)
            .field("etag", &self.etag)
            .field("len", &self.len)
            .finish()
    }
}

impl S3ReadAt {
    /// Opens `url` (HeadObject: its length and ETag). Async; reads block (see the module).
    pub async fn open(client: Client, url: S3Url, runtime: Handle) -> Result<Self> {
        let head = retry(|| async {
            client
                .head_object()
                .bucket(&url.bucket)
                .key(&url.key)
                .send()
                .await
                .map_err(|e| aws_error("HeadObject", &url.to_string(), &e))
        })
        .await?;
        let etag = head
            .e_tag()
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{url}: HeadObject returned no ETag to pin the object's version"
                ))
            })?
            .to_owned();
        let len = head
            .content_length()
            .and_then(|l| u64::try_from(l).ok())
            .ok_or_else(|| Error::InvalidInput(format!("{url}: HeadObject returned no length")))?;
        Ok(Self {
            client,
            url,
            etag,
            len,
            runtime,
            windows: Mutex::new(VecDeque::new()),
        })
    }

    /// The object read.
    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// The ETag every read is pinned to.
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// The window holding `index`, from the cache or fetched now.
    fn window(&self, index: u64) -> Result<Bytes> {
        let window = {
            let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
            let found = windows.iter().position(|(i, _)| *i == index);
            let window = match found.and_then(|at| windows.remove(at)) {
                Some((_, window)) => window,
                None => Arc::default(),
            };
            windows.push_front((index, window.clone()));
            windows.truncate(CACHED_WINDOWS);
            window
        };
        let mut bytes = window.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bytes) = bytes.as_ref() {
            return Ok(bytes.clone());
        }
        let start = index * WINDOW_BYTES;
        let end = (start + WINDOW_BYTES).min(self.len);
        let fetched = self.runtime.block_on(self.get_range(start, end))?;
        *bytes = Some(fetched.clone());
        Ok(fetched)
    }

    /// GETs `[start, end)` of the pinned version.
    async fn get_range(&self, start: u64, end: u64) -> Result<Bytes> {
        let what = format!("{} bytes {start}-{}", self.url, end - 1);
        retry(|| async {
            let response = self
                .client
                .get_object()
                .bucket(&self.url.bucket)
                .key(&self.url.key)
                .range(format!("bytes={start}-{}", end - 1))
                .if_match(&self.etag)
                .send()
                .await
                .map_err(|e| self.get_error(&what, &e))?;
            // A body cut short is a network failure: worth another GET.
            let body = response.body.collect().await.map_err(|e| Error::Aws {
                operation: "GetObject",
                code: None,
                message: format!("{what}: reading the body: {e}"),
                kind: ErrorKind::Transient,
            })?;
            let bytes = body.into_bytes();
            if bytes.len() as u64 != end - start {
                return Err(Error::Aws {
                    operation: "GetObject",
                    code: None,
                    message: format!("{what}: got {} bytes", bytes.len()),
                    kind: ErrorKind::Transient,
                });
            }
            Ok(bytes)
        })
        .await
    }

    fn get_error(
        &self,
        what: &str,
        err: &aws_sdk_s3::error::SdkError<
            aws_sdk_s3::operation::get_object::GetObjectError,
            aws_sdk_s3::config::http::HttpResponse,
        >,
    ) -> Error {
        let error = aws_error("GetObject", what, err);
        match error {
            Error::Aws { code, .. } if code.as_deref() == Some("PreconditionFailed") => {
                Error::Aws {
                    operation: "GetObject",
                    code,
                    message: format!(
                        "{what}: the object was replaced while being read (its ETag is no longer {}); start again",
                        self.etag
                    ),
                    kind: ErrorKind::InvalidInput,
                }
            }
            other => other,
        }
    }
}

impl ReadAt for S3ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "read past the end of the object",
                )
            })?;
        let mut position = offset;
        while position < end {
            let index = position / WINDOW_BYTES;
            let window = self.window(index).map_err(to_io)?;
            let from = usize::try_from(position - index * WINDOW_BYTES).map_err(|_| too_far())?;
            let take = usize::try_from((end - position).min(window.len() as u64 - from as u64))
                .map_err(|_| too_far())?;
            let at = usize::try_from(position - offset).map_err(|_| too_far())?;
            buf[at..at + take].copy_from_slice(&window[from..from + take]);
            position += take as u64;
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
}

fn too_far() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "offset does not fit in memory")
}

/// Keeps the whole error chain for the disk-image library, which wraps it with the file
/// name, and maps the kind onto the `io::ErrorKind` it classifies by.
fn to_io(err: Error) -> io::Error {
    let kind = match err.kind() {
        ErrorKind::NotFound => io::ErrorKind::NotFound,
        ErrorKind::PermissionDenied => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, err)
}

/// The keys of one bucket as a [`FileSystem`]: paths are keys, and a file named inside an
/// image (a VMDK extent, a parent) is looked up relative to the referrer's prefix.
/// Blocking, like [`S3ReadAt`].
#[derive(Debug, Clone)]
pub struct S3Fs {
    client: Client,
    bucket: String,
    runtime: Handle,
}

impl S3Fs {
    /// A file system over `bucket`.
    pub fn new(client: Client, bucket: impl Into<String>, runtime: Handle) -> Self {
        Self {
            client,
            bucket: bucket.into(),
            runtime,
        }
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Opens a key as a pinned [`S3ReadAt`].
    pub fn open_object(&self, key: &str) -> Result<S3ReadAt> {
        self.runtime.block_on(S3ReadAt::open(
            self.client.clone(),
            self.url(key),
            self.runtime.clone(),
        ))
    }

    /// `path` as an object: a key of this bucket, or a whole `s3://` URL (the names files
    /// are opened under, and so what the image's references are resolved against).
    fn url(&self, path: &str) -> S3Url {
        match S3Url::parse(path) {
            Ok(url) => url,
            Err(_) => S3Url {
                bucket: self.bucket.clone(),
                key: path.to_owned(),
            },
        }
    }
}

impl FileSystem for S3Fs {
    fn open(&self, path: &str) -> rehost_diskimage::Result<ImageFile> {
        let url = self.url(path);
        let name = url.to_string();
        let object = self
            .runtime
            .block_on(S3ReadAt::open(
                self.client.clone(),
                url,
                self.runtime.clone(),
            ))
            .map_err(|e| rehost_diskimage::Error::Open {
                file: name.clone(),
                source: to_io(e),
            })?;
        ImageFile::new(name, Arc::new(object))
    }

    fn resolve(&self, referrer: &str, reference: &str) -> String {
        let referrer = self.url(referrer);
        let key = resolve_key(&referrer.key, reference);
        if key.starts_with('/') || key.as_bytes().get(1) == Some(&b':') {
            return key;
        }
        S3Url {
            bucket: referrer.bucket,
            key,
        }
        .to_string()
    }

    fn identity(&self, path: &str) -> String {
        self.url(path).to_string()
    }
}

/// The key `reference` names when written inside the object at `referrer`: relative to the
/// referrer's prefix, with `.` and `..` applied (S3 keys do not interpret them) and
/// Windows separators read as `/`. An absolute path cannot name a key: it is returned as is
/// and fails to open, so the image's next candidate (often the bare file name) is tried.
pub(crate) fn resolve_key(referrer: &str, reference: &str) -> String {
    let reference = reference.replace('\\', "/");
    if reference.starts_with('/') || reference.as_bytes().get(1) == Some(&b':') {
        return reference;
    }
    let mut parts: Vec<&str> = referrer.split('/').collect();
    parts.pop();
    for part in reference.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    parts.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_from_the_referrer_prefix() {
        assert_eq!(
            resolve_key("vms/a/disk.vmdk", "disk-s001.vmdk"),
            "vms/a/disk-s001.vmdk"
        );
        assert_eq!(resolve_key("disk.vmdk", "disk-flat.vmdk"), "disk-flat.vmdk");
        assert_eq!(
            resolve_key("vms/a/child.vhdx", ".\\parent.vhdx"),
            "vms/a/parent.vhdx"
        );
        assert_eq!(
            resolve_key("vms/a/child.vmdk", "../base/p.vmdk"),
            "vms/base/p.vmdk"
        );
        assert_eq!(
            resolve_key("vms/a/child.vmdk", "/vmfs/volumes/ds/p.vmdk"),
            "/vmfs/volumes/ds/p.vmdk"
        );
        assert_eq!(resolve_key("c.vhdx", "C:\\VMs\\p.vhdx"), "C:/VMs/p.vhdx");
    }
}
