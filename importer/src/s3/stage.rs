//! `stage`: a local file to S3. Multipart upload with parts sized for the file, sent
//! concurrently, each with a SHA-256 checksum S3 verifies; any failure or cancellation
//! aborts the upload so that no parts are left stored (and billed). Files smaller than one
//! part go up in a single PutObject.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use rehost_core::ErrorKind;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::url::S3Url;
use crate::aws::Clients;
use crate::blocks::base64;
use crate::error::{Error, Result};
use crate::retry::{NotFound, RetryPolicy, classify as aws_error, is_retryable, retry, with_retry};

const MIB: u64 = 1 << 20;
/// S3's smallest part (all but the last).
pub const S3_MIN_PART_BYTES: u64 = 5 * MIB;
/// S3's largest part.
pub const S3_MAX_PART_BYTES: u64 = 5 << 30;
/// S3's most parts in one upload.
pub const S3_MAX_PARTS: u64 = 10_000;
/// Our smallest part: the AWS CLI's default (8 MiB), so small images take few requests
/// and a retried part costs little.
pub(super) const MIN_PART_BYTES: u64 = 8 * MIB;
/// Parts in flight by default: enough to fill a gigabit link at S3's ~20–50 ms per
/// request (the AWS CLI sends 10), while memory stays at `concurrency × part size`.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Parts held in memory at once are capped to this many bytes: very large files get
/// large parts (10,000 parts at most), and 8 × 500 MiB would not fit a small VM.
pub(super) const MEMORY_BUDGET_BYTES: u64 = 256 * MIB;

/// How to stage.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// Parts uploaded at once (capped so parts in memory stay under 256 MiB).
    pub concurrency: usize,
    /// Part size; `None` chooses it from the file's size ([`choose_part_size`]). Tests
    /// set it small to get several parts from a small file.
    pub part_size_bytes: Option<u64>,
    /// Set to stop: no new part is started, the upload is aborted.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for StageOptions {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            part_size_bytes: None,
            cancel: None,
        }
    }
}

/// What was staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageReport {
    /// Destination bucket.
    pub bucket: String,
    /// Destination key.
    pub key: String,
    /// Bytes uploaded (the file's size).
    pub size_bytes: u64,
    /// The object's ETag (without quotes).
    pub etag: String,
    /// Parts uploaded (1 for a single PutObject).
    pub parts: u32,
    /// Part size used.
    pub part_size_bytes: u64,
    /// SHA-256 of the whole file, hex, computed while reading it.
    pub sha256: String,
}

/// The part size for an object of `size_bytes`: at least 8 MiB, large enough to stay
/// within 10,000 parts, rounded up to a MiB.
pub fn choose_part_size(size_bytes: u64) -> Result<u64> {
    let needed = size_bytes.div_ceil(S3_MAX_PARTS).div_ceil(MIB) * MIB;
    let part = needed.max(MIN_PART_BYTES);
    if part > S3_MAX_PART_BYTES {
        return Err(Error::InvalidInput(format!(
            "a {size_bytes}-byte file does not fit in S3's 10,000 parts of at most 5 GiB"
        )));
    }
    Ok(part)
}

pub(super) fn check_part_size(part: u64, size_bytes: u64) -> Result<()> {
    if !(S3_MIN_PART_BYTES..=S3_MAX_PART_BYTES).contains(&part) {
        return Err(Error::InvalidInput(format!(
            "part size {part} is outside S3's 5 MiB to 5 GiB"
        )));
    }
    if size_bytes.div_ceil(part) > S3_MAX_PARTS {
        return Err(Error::InvalidInput(format!(
            "part size {part} makes more than 10,000 parts of {size_bytes} bytes"
        )));
    }
    Ok(())
}

/// Starts a multipart upload of `url` with SHA-256 part checksums; returns its id.
pub(super) async fn create_upload(client: &Client, url: &S3Url) -> Result<String> {
    let target = url.to_string();
    let created = retry(|| async {
        client
            .create_multipart_upload()
            .bucket(&url.bucket)
            .key(&url.key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|e| aws_error("CreateMultipartUpload", &target, &e))
    })
    .await?;
    created
        .upload_id()
        .map(str::to_owned)
        .ok_or_else(|| Error::Aws {
            operation: "CreateMultipartUpload",
            code: None,
            message: format!("{target}: no upload id in the answer"),
            kind: ErrorKind::Transient,
        })
}

/// Uploads `local_path` to `url`. `progress` gets the bytes acknowledged by S3 so far.
pub async fn stage(
    clients: &Clients,
    local_path: &Path,
    url: &S3Url,
    options: &StageOptions,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<StageReport> {
    let path_text = local_path.display().to_string();
    let io_error = |op: &'static str| {
        let path = path_text.clone();
        move |source| Error::Io { path, op, source }
    };
    let file = File::open(local_path).map_err(io_error("open"))?;
    let size_bytes = file.metadata().map_err(io_error("measure"))?.len();
    let part_size = match options.part_size_bytes {
        Some(part) => part,
        None => choose_part_size(size_bytes)?,
    };
    check_part_size(part_size, size_bytes)?;
    let source = Source {
        file: Arc::new(file),
        path: path_text,
        size_bytes,
        part_size,
        whole: Arc::default(),
    };
    let client = &clients.s3;
    let (etag, parts) = if size_bytes < part_size {
        (put_single(client, url, &source, options).await?, 1)
    } else {
        put_multipart(client, url, &source, options, progress).await?
    };
    progress(size_bytes);
    let whole = source
        .whole
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(StageReport {
        bucket: url.bucket.clone(),
        key: url.key.clone(),
        size_bytes,
        etag: etag.trim_matches('"').to_owned(),
        parts,
        part_size_bytes: part_size,
        sha256: to_hex(&whole.finalize()),
    })
}

/// The file being staged, read part by part in order.
struct Source {
    file: Arc<File>,
    path: String,
    size_bytes: u64,
    part_size: u64,
    /// The whole file's hash, fed in part order.
    whole: Arc<Mutex<Sha256>>,
}

/// One part: its number, bytes and their SHA-256 (base64, as S3 checks it).
pub(super) struct Part {
    pub(super) number: i32,
    pub(super) data: Bytes,
    pub(super) sha256_base64: String,
}

impl Source {
    fn part_count(&self) -> u64 {
        self.size_bytes.div_ceil(self.part_size).max(1)
    }

    /// Reads part `number` (from 1) on a blocking thread, hashing it and feeding the
    /// whole-file hash. Parts must be read in order.
    async fn read_part(&self, number: u64, cancel: Option<&AtomicBool>) -> Result<Part> {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(cancelled(&self.path));
        }
        let offset = (number - 1) * self.part_size;
        let len = usize::try_from(self.part_size.min(self.size_bytes - offset)).map_err(|_| {
            Error::InvalidInput(format!(
                "part size {} does not fit in memory",
                self.part_size
            ))
        })?;
        let (file, whole, path) = (self.file.clone(), self.whole.clone(), self.path.clone());
        let read = tokio::task::spawn_blocking(move || {
            let mut data = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut data, offset).map_err(
                |source| Error::Io {
                    path,
                    op: "read",
                    source,
                },
            )?;
            whole
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .update(&data);
            let sha256_base64 = base64(&Sha256::digest(&data));
            Ok::<_, Error>((Bytes::from(data), sha256_base64))
        });
        let (data, sha256_base64) = read
            .await
            .map_err(|e| Error::InvalidInput(format!("reading a part: {e}")))??;
        let number =
            i32::try_from(number).map_err(|_| Error::InvalidInput("too many parts".into()))?;
        Ok(Part {
            number,
            data,
            sha256_base64,
        })
    }
}

fn cancelled(path: &str) -> Error {
    Error::Cancelled {
        what: format!("staging {path}"),
    }
}

async fn put_single(
    client: &Client,
    url: &S3Url,
    source: &Source,
    options: &StageOptions,
) -> Result<String> {
    let part = source.read_part(1, options.cancel.as_deref()).await?;
    let target = url.to_string();
    let output = retry(|| async {
        client
            .put_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .content_length(content_length(&part.data))
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(&part.sha256_base64)
            .body(ByteStream::from(part.data.clone()))
            .send()
            .await
            .map_err(|e| aws_error("PutObject", &target, &e))
    })
    .await?;
    Ok(output.e_tag().unwrap_or_default().to_owned())
}

async fn put_multipart(
    client: &Client,
    url: &S3Url,
    source: &Source,
    options: &StageOptions,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(String, u32)> {
    let target = url.to_string();
    let upload_id = create_upload(client, url).await?;
    let mut guard = AbortGuard {
        client: client.clone(),
        url: url.clone(),
        upload_id: upload_id.clone(),
        armed: true,
    };
    let result = upload_and_complete(client, url, &upload_id, source, options, progress).await;
    guard.armed = false;
    if let Err(err) = &result {
        tracing::warn!(%target, %upload_id, error = %err, "staging failed: aborting the multipart upload");
        if let Err(abort_err) = abort(client, url, &upload_id).await {
            tracing::error!(%target, %upload_id, error = %abort_err, "could not abort: parts stay stored until a lifecycle rule or `aws s3api abort-multipart-upload` removes them");
        }
    }
    result
}

async fn upload_and_complete(
    client: &Client,
    url: &S3Url,
    upload_id: &str,
    source: &Source,
    options: &StageOptions,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(String, u32)> {
    let concurrency = options.concurrency.clamp(
        1,
        usize::try_from(MEMORY_BUDGET_BYTES / source.part_size)
            .unwrap_or(1)
            .max(1),
    );
    let done_bytes = AtomicU64::new(0);
    let cancel = options.cancel.as_deref();
    let mut parts: Vec<CompletedPart> = stream::iter(1..=source.part_count())
        .then(|number| source.read_part(number, cancel))
        .map(|part| async {
            let part = part?;
            let completed =
                upload_part(client, url, upload_id, &part, &RetryPolicy::default()).await?;
            let done = done_bytes.fetch_add(part.data.len() as u64, Ordering::Relaxed)
                + part.data.len() as u64;
            progress(done);
            Ok::<_, Error>(completed)
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    parts.sort_by_key(|p| p.part_number());
    let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    let etag = complete(client, url, upload_id, parts, source.size_bytes).await?;
    Ok((etag, count))
}

/// UploadPart with its SHA-256, retried under `policy`; checks the checksum S3 stored.
pub(super) async fn upload_part(
    client: &Client,
    url: &S3Url,
    upload_id: &str,
    part: &Part,
    policy: &RetryPolicy,
) -> Result<CompletedPart> {
    let what = format!("{url} part {}", part.number);
    let output = with_retry(policy, NotFound::Fail, || async {
        client
            .upload_part()
            .bucket(&url.bucket)
            .key(&url.key)
            .upload_id(upload_id)
            .part_number(part.number)
            .content_length(content_length(&part.data))
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(&part.sha256_base64)
            .body(ByteStream::from(part.data.clone()))
            .send()
            .await
            .map_err(|e| aws_error("UploadPart", &what, &e))
    })
    .await?;
    // A missing ETag is a malformed answer (a proxy, a truncated body), not our mistake.
    let etag = output.e_tag().ok_or_else(|| Error::Aws {
        operation: "UploadPart",
        code: None,
        message: format!("{what}: no ETag in the answer"),
        kind: ErrorKind::Transient,
    })?;
    if let Some(theirs) = output.checksum_sha256() {
        if theirs != part.sha256_base64 {
            return Err(Error::Aws {
                operation: "UploadPart",
                code: None,
                message: format!(
                    "{what}: S3 stored SHA-256 {theirs}, we sent {}",
                    part.sha256_base64
                ),
                kind: ErrorKind::Transient,
            });
        }
    }
    Ok(CompletedPart::builder()
        .part_number(part.number)
        .e_tag(etag)
        .checksum_sha256(&part.sha256_base64)
        .build())
}

/// CompleteMultipartUpload, retried. If an attempt failed ambiguously (a 5xx or a timeout
/// after S3 may have completed it) and a retry then finds the upload gone, the object is
/// checked instead: there with the expected size and a multipart ETag of as many parts,
/// it is ours.
pub(super) async fn complete(
    client: &Client,
    url: &S3Url,
    upload_id: &str,
    parts: Vec<CompletedPart>,
    size_bytes: u64,
) -> Result<String> {
    let target = url.to_string();
    let part_count = parts.len();
    let upload = CompletedMultipartUpload::builder()
        .set_parts(Some(parts))
        .build();
    let ambiguous = AtomicBool::new(false);
    let result = retry(|| async {
        let attempt = client
            .complete_multipart_upload()
            .bucket(&url.bucket)
            .key(&url.key)
            .upload_id(upload_id)
            .multipart_upload(upload.clone())
            .send()
            .await
            .map_err(|e| aws_error("CompleteMultipartUpload", &target, &e));
        if let Err(err) = &attempt {
            if is_retryable(err.kind()) {
                ambiguous.store(true, Ordering::Relaxed);
            }
        }
        attempt
    })
    .await;
    match result {
        Ok(output) => Ok(output.e_tag().unwrap_or_default().to_owned()),
        Err(err) if err.kind() == ErrorKind::NotFound && ambiguous.load(Ordering::Relaxed) => {
            let head = client
                .head_object()
                .bucket(&url.bucket)
                .key(&url.key)
                .send()
                .await
                .map_err(|e| aws_error("HeadObject", &target, &e))?;
            let etag = head.e_tag().unwrap_or_default().to_owned();
            let size_ok =
                head.content_length().and_then(|l| u64::try_from(l).ok()) == Some(size_bytes);
            if size_ok && etag.trim_matches('"').ends_with(&format!("-{part_count}")) {
                Ok(etag)
            } else {
                Err(err)
            }
        }
        Err(err) => Err(err),
    }
}

/// AbortMultipartUpload until ListParts says the upload is gone: parts still in flight
/// when the first abort lands may be stored after it (S3 documents this).
pub(super) async fn abort(client: &Client, url: &S3Url, upload_id: &str) -> Result<()> {
    let target = format!("{url} upload {upload_id}");
    for _ in 0..3 {
        let aborted = retry(|| async {
            client
                .abort_multipart_upload()
                .bucket(&url.bucket)
                .key(&url.key)
                .upload_id(upload_id)
                .send()
                .await
                .map_err(|e| aws_error("AbortMultipartUpload", &target, &e))
        })
        .await;
        match aborted {
            Ok(_) => {}
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        }
        let listed = client
            .list_parts()
            .bucket(&url.bucket)
            .key(&url.key)
            .upload_id(upload_id)
            .send()
            .await;
        match listed.map_err(|e| aws_error("ListParts", &target, &e)) {
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
            Ok(list) if list.parts().is_empty() => return Ok(()),
            _ => {}
        }
    }
    Err(Error::Aws {
        operation: "AbortMultipartUpload",
        code: None,
        message: format!("{target}: parts are still listed after three aborts"),
        kind: ErrorKind::Transient,
    })
}

/// Aborts the upload if the staging future is dropped before it finished (the caller
/// gave up on it): the abort is spawned on the current runtime, if there is one.
struct AbortGuard {
    client: Client,
    url: S3Url,
    upload_id: String,
    armed: bool,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (client, url, upload_id) = (
                self.client.clone(),
                self.url.clone(),
                std::mem::take(&mut self.upload_id),
            );
            runtime.spawn(async move {
                if let Err(err) = abort(&client, &url, &upload_id).await {
                    tracing::error!(%url, %upload_id, error = %err, "could not abort a dropped upload");
                }
            });
        } else {
            tracing::error!(url = %self.url, upload_id = %self.upload_id, "staging dropped outside a runtime: the multipart upload stays open");
        }
    }
}

/// A part's length as the SDK takes it (parts are at most 5 GiB, so it always fits).
pub(super) fn content_length(data: &Bytes) -> i64 {
    i64::try_from(data.len()).unwrap_or(i64::MAX)
}

pub(super) fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_size_grows_with_the_object_to_stay_within_10000_parts() {
        assert_eq!(choose_part_size(0).unwrap(), 8 * MIB);
        assert_eq!(choose_part_size(10 << 30).unwrap(), 8 * MIB);
        // 100 GiB / 10,000 = 10.24 MiB, rounded up to 11 MiB.
        assert_eq!(choose_part_size(100 << 30).unwrap(), 11 * MIB);
        for size in [1u64 << 40, 5 << 40, (1 << 40) + 1] {
            let part = choose_part_size(size).unwrap();
            assert!(
                size.div_ceil(part) <= S3_MAX_PARTS && part <= S3_MAX_PART_BYTES,
                "{size}: {part}"
            );
        }
        assert!(choose_part_size(60 << 40).is_err());
    }

    #[test]
    fn configured_part_sizes_are_checked_against_s3_limits() {
        assert!(check_part_size(5 * MIB, 100 * MIB).is_ok());
        assert!(check_part_size(MIB, 100 * MIB).is_err());
        assert!(check_part_size(6 << 30, 100 * MIB).is_err());
        assert!(check_part_size(5 * MIB, 10_001 * 5 * MIB).is_err());
    }
}
