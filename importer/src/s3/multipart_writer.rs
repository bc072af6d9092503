//! [`MultipartWriter`]: a synchronous `std::io::Write` into an S3 object, so the image
//! writers (synchronous, forward-only, run on a blocking thread) can stream an export
//! straight into S3 without a local copy.
//!
//! Bytes are gathered into one part; each full part is handed to an upload task on the
//! tokio runtime, at most `in_flight` at once. When that many are pending the writer
//! blocks until one is stored, so memory stays at `(in_flight + 1) × part size` however
//! fast the producer is. The multipart upload is created with the first full part; an
//! object smaller than one part goes up in a single PutObject at [`MultipartWriter::finish`].
//! Any failure, [`MultipartWriter::abort`], or a drop before `finish` aborts the upload so
//! no parts stay stored (and billed).
//!
//! The writer waits for the runtime with plain blocking calls: it must not be used from
//! async code (run it in `spawn_blocking` or on a thread of its own), where it would
//! block, or on a current-thread runtime deadlock, the runtime it waits for.

use std::future::Future;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedPart};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::stage::{
    MEMORY_BUDGET_BYTES, StageReport, abort, check_part_size, choose_part_size, complete,
    content_length, to_hex,
};
use super::url::S3Url;
use crate::aws::Clients;
use crate::blocks::base64;
use crate::error::{Error, Result};
use crate::retry::{RetryPolicy, classify as aws_error, retry};

/// Parts uploading at once by default: four 8 MiB parts keep a gigabit link busy at S3's
/// usual 20–50 ms per request while the writer holds at most 40 MiB.
pub const DEFAULT_IN_FLIGHT: usize = 4;
/// How often a waiting writer checks that its upload tasks still exist: a task only
/// disappears without reporting when the runtime shuts down, so this is only a backstop.
const TASK_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// How to upload.
#[derive(Debug, Clone)]
pub struct MultipartWriterOptions {
    /// The most bytes the object may reach (for a streamOptimized VMDK, see
    /// `StreamOptimizedWriter::max_file_bytes`): parts are sized so 10,000 of them cover
    /// it ([`choose_part_size`]). Writing more than 10,000 parts fails.
    pub max_object_bytes: u64,
    /// Part size instead of the chosen one (at least S3's 5 MiB); tests set it small to
    /// get several parts from a small object.
    pub part_size_bytes: Option<u64>,
    /// Parts uploaded at once; the writer blocks while this many are pending. Capped so
    /// parts in flight stay within 256 MiB, at least 1.
    pub in_flight: usize,
    /// Retries of each part upload (throttling and 5xx are retried, other errors fail
    /// at once).
    pub retry: RetryPolicy,
}

impl MultipartWriterOptions {
    /// Defaults for an object of at most `max_object_bytes`.
    pub fn new(max_object_bytes: u64) -> Self {
        Self {
            max_object_bytes,
            part_size_bytes: None,
            in_flight: DEFAULT_IN_FLIGHT,
            retry: RetryPolicy::default(),
        }
    }
}

/// A synchronous writer into an S3 object through a multipart upload; see the module
/// documentation.
#[derive(Debug)]
pub struct MultipartWriter {
    client: Client,
    url: S3Url,
    handle: Handle,
    retry: RetryPolicy,
    part_size: usize,
    in_flight: usize,
    /// The part being filled; allocated when the first byte of a part arrives, so a
    /// part handed to an upload task is not doubled by an idle empty buffer.
    buffer: Vec<u8>,
    hasher: Sha256,
    size_bytes: u64,
    /// Parts handed to upload tasks so far (the next part's number minus one).
    parts_sent: i32,
    upload_id: Option<String>,
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Failed or aborted: the upload is gone, every call fails.
    Closed,
    Finished,
}

/// What the upload tasks report back to the writer.
#[derive(Debug, Default)]
struct Shared {
    progress: Mutex<Progress>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct Progress {
    in_flight: usize,
    peak_in_flight: usize,
    completed: Vec<CompletedPart>,
    /// The first part failure; the writer aborts the upload when it sees it.
    failure: Option<Error>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MultipartWriter {
    /// A writer of the object at `url`, uploading on `handle`'s runtime with `clients.s3`.
    /// Nothing is sent until a part is full (or [`Self::finish`] for a small object).
    pub fn create(
        clients: &Clients,
        url: &S3Url,
        handle: Handle,
        options: MultipartWriterOptions,
    ) -> Result<Self> {
        let part_size = match options.part_size_bytes {
            Some(part) => part,
            None => choose_part_size(options.max_object_bytes)?,
        };
        check_part_size(part_size, options.max_object_bytes)?;
        let in_flight = options.in_flight.clamp(
            1,
            usize::try_from(MEMORY_BUDGET_BYTES / part_size)
                .unwrap_or(1)
                .max(1),
        );
        Ok(Self {
            client: clients.s3.clone(),
            url: url.clone(),
            handle,
            retry: options.retry,
            part_size: usize::try_from(part_size).map_err(|_| {
                Error::InvalidInput(format!("part size {part_size} does not fit in memory"))
            })?,
            in_flight,
            buffer: Vec::new(),
            hasher: Sha256::new(),
            size_bytes: 0,
            parts_sent: 0,
            upload_id: None,
            tasks: Vec::new(),
            shared: Arc::default(),
            state: State::Open,
        })
    }

    /// The part size in use.
    pub fn part_size_bytes(&self) -> u64 {
        self.part_size as u64
    }

    /// Parts uploading at once at most (the option, capped).
    pub fn max_in_flight(&self) -> usize {
        self.in_flight
    }

    /// The most parts that were uploading at once so far: never above
    /// [`Self::max_in_flight`], which is what bounds memory.
    pub fn peak_parts_in_flight(&self) -> usize {
        self.shared.lock().peak_in_flight
    }

    /// Bytes written so far.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Uploads what is left, completes the upload (or puts a small object in one
    /// request) and reports the object. On failure the upload is aborted.
    pub fn finish(mut self) -> Result<StageReport> {
        self.check_open()?;
        let result = self.finish_inner();
        match result {
            Ok(report) => {
                self.state = State::Finished;
                Ok(report)
            }
            Err(err) => Err(self.fail(err)),
        }
    }

    fn finish_inner(&mut self) -> Result<StageReport> {
        let sha256 = to_hex(&self.hasher.clone().finalize());
        let (etag, parts) = if self.upload_id.is_none() {
            (self.put_single()?, 1)
        } else {
            if !self.buffer.is_empty() {
                self.dispatch()?;
            }
            let parts = self.wait_for_parts()?;
            let count = u32::try_from(parts.len()).unwrap_or(u32::MAX);
            let (client, url, size) = (self.client.clone(), self.url.clone(), self.size_bytes);
            let upload_id = self.upload_id.clone().unwrap_or_default();
            let etag =
                self.run(async move { complete(&client, &url, &upload_id, parts, size).await })?;
            (etag, count)
        };
        tracing::debug!(url = %self.url, size_bytes = self.size_bytes, parts, "object written");
        Ok(StageReport {
            bucket: self.url.bucket.clone(),
            key: self.url.key.clone(),
            size_bytes: self.size_bytes,
            etag: etag.trim_matches('"').to_owned(),
            parts,
            part_size_bytes: self.part_size as u64,
            sha256,
        })
    }

    /// Stops: parts in flight are cancelled and the multipart upload, if one was
    /// started, is aborted (waiting for S3 to confirm).
    pub fn abort(mut self) -> Result<()> {
        if self.state != State::Open {
            return Ok(());
        }
        self.state = State::Closed;
        self.cancel_tasks();
        match self.upload_id.take() {
            Some(upload_id) => self.abort_upload(upload_id),
            None => Ok(()),
        }
    }

    fn check_open(&self) -> Result<()> {
        match self.state {
            State::Open => Ok(()),
            State::Closed => Err(Error::InvalidInput(format!(
                "{}: the upload failed or was aborted; nothing more can be written",
                self.url
            ))),
            State::Finished => Err(Error::InvalidInput(format!(
                "{}: the upload is already finished",
                self.url
            ))),
        }
    }

    /// Runs `future` on the runtime and waits for it from this (non-async) thread.
    fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            // The receiver only goes away if this thread stopped waiting, which it doesn't.
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| Error::Cancelled {
            what: format!("{}: the runtime shut down during an S3 call", self.url),
        })?
    }

    /// Hands the full buffer to an upload task, creating the upload first if needed and
    /// waiting for a free slot.
    fn dispatch(&mut self) -> Result<()> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self.create_upload()?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        self.wait_for_slot()?;
        let number = self
            .parts_sent
            .checked_add(1)
            .filter(|&n| n <= 10_000)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "{}: more than 10,000 parts of {} bytes; raise max_object_bytes",
                    self.url, self.part_size
                ))
            })?;
        self.parts_sent = number;
        let data = Bytes::from(std::mem::take(&mut self.buffer));
        let sha256_base64 = base64(&Sha256::digest(&data));
        {
            let mut progress = self.shared.lock();
            progress.in_flight += 1;
            progress.peak_in_flight = progress.peak_in_flight.max(progress.in_flight);
        }
        let part = PartUpload {
            client: self.client.clone(),
            url: self.url.clone(),
            upload_id,
            part: super::stage::Part {
                number,
                data,
                sha256_base64,
            },
            retry: self.retry,
        };
        let shared = self.shared.clone();
        self.tasks.retain(|t| !t.is_finished());
        self.tasks.push(self.handle.spawn(async move {
            let result = part.send().await;
            let mut progress = shared.lock();
            progress.in_flight -= 1;
            match result {
                Ok(done) => progress.completed.push(done),
                Err(err) => {
                    progress.failure.get_or_insert(err);
                }
            }
            shared.changed.notify_all();
        }));
        Ok(())
    }

    fn create_upload(&self) -> Result<String> {
        let (client, url) = (self.client.clone(), self.url.clone());
        self.run(async move { super::stage::create_upload(&client, &url).await })
    }

    /// Blocks while `in_flight` parts are pending; fails with the first part failure.
    fn wait_for_slot(&self) -> Result<()> {
        self.wait_until(|in_flight| in_flight < self.in_flight)
    }

    /// Blocks until every part handed off is stored; fails with the first part failure.
    fn wait_idle(&self) -> Result<()> {
        self.wait_until(|in_flight| in_flight == 0)
    }

    /// Blocks until `ready(parts in flight)`, or a part failed, or the upload tasks are
    /// gone without a word (the runtime shut down), which would otherwise hang forever.
    fn wait_until(&self, ready: impl Fn(usize) -> bool) -> Result<()> {
        let mut progress = self.shared.lock();
        loop {
            if let Some(err) = progress.failure.take() {
                return Err(err);
            }
            if ready(progress.in_flight) {
                return Ok(());
            }
            if self.tasks.iter().all(JoinHandle::is_finished) {
                // Every task reports under this lock before it ends: one ended silently.
                return Err(Error::Cancelled {
                    what: format!("{}: the upload tasks stopped (runtime shut down)", self.url),
                });
            }
            progress = self
                .shared
                .changed
                .wait_timeout(progress, TASK_CHECK_INTERVAL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits for every part and returns them in order, checking none is missing.
    fn wait_for_parts(&self) -> Result<Vec<CompletedPart>> {
        self.wait_idle()?;
        let mut parts = std::mem::take(&mut self.shared.lock().completed);
        parts.sort_by_key(|p| p.part_number());
        let numbered = parts
            .iter()
            .zip(1..)
            .all(|(p, n)| p.part_number() == Some(n));
        if !numbered || parts.len() != usize::try_from(self.parts_sent).unwrap_or(0) {
            return Err(Error::InvalidInput(format!(
                "{}: {} of {} parts acknowledged",
                self.url,
                parts.len(),
                self.parts_sent
            )));
        }
        Ok(parts)
    }

    fn put_single(&mut self) -> Result<String> {
        let data = Bytes::from(std::mem::take(&mut self.buffer));
        let sha256_base64 = base64(&Sha256::digest(&data));
        let (client, url) = (self.client.clone(), self.url.clone());
        self.run(async move {
            let target = url.to_string();
            let output = retry(|| async {
                client
                    .put_object()
                    .bucket(&url.bucket)
                    .key(&url.key)
                    .content_length(content_length(&data))
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .checksum_sha256(&sha256_base64)
                    .body(ByteStream::from(data.clone()))
                    .send()
                    .await
                    .map_err(|e| aws_error("PutObject", &target, &e))
            })
            .await?;
            Ok(output.e_tag().unwrap_or_default().to_owned())
        })
    }

    /// Closes the writer after `err`: cancels the parts in flight, aborts the upload and
    /// returns `err` (an abort failure is logged, the original error matters more).
    fn fail(&mut self, err: Error) -> Error {
        self.state = State::Closed;
        self.cancel_tasks();
        if let Some(upload_id) = self.upload_id.take() {
            tracing::warn!(url = %self.url, %upload_id, error = %err, "upload failed: aborting the multipart upload");
            if let Err(abort_err) = self.abort_upload(upload_id) {
                tracing::error!(url = %self.url, error = %abort_err, "could not abort: parts stay stored until a lifecycle rule or `aws s3api abort-multipart-upload` removes them");
            }
        }
        err
    }

    fn cancel_tasks(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }

    fn abort_upload(&self, upload_id: String) -> Result<()> {
        let (client, url) = (self.client.clone(), self.url.clone());
        self.run(async move { abort(&client, &url, &upload_id).await })
    }
}

impl io::Write for MultipartWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check_open().map_err(io::Error::other)?;
        if buf.is_empty() {
            return Ok(0);
        }
        if self.buffer.capacity() == 0 {
            self.buffer.reserve_exact(self.part_size);
        }
        let n = (self.part_size - self.buffer.len()).min(buf.len());
        let accepted = &buf[..n];
        self.buffer.extend_from_slice(accepted);
        self.hasher.update(accepted);
        self.size_bytes += n as u64;
        if self.buffer.len() == self.part_size {
            if let Err(err) = self.dispatch() {
                return Err(io::Error::other(self.fail(err)));
            }
        }
        Ok(n)
    }

    /// Waits until every full part written so far is stored. The part being filled stays
    /// buffered: S3 takes a part under 5 MiB only as the last one, so it goes at `finish`.
    fn flush(&mut self) -> io::Result<()> {
        self.check_open().map_err(io::Error::other)?;
        if let Err(err) = self.wait_idle() {
            return Err(io::Error::other(self.fail(err)));
        }
        Ok(())
    }
}

impl Drop for MultipartWriter {
    /// Dropped before `finish` (an error in the producer, a panic): cancel the parts and
    /// abort the upload in the background. Not waited for, since a drop may happen where
    /// blocking is not allowed; call [`MultipartWriter::abort`] to wait.
    fn drop(&mut self) {
        if self.state != State::Open {
            return;
        }
        self.cancel_tasks();
        if let Some(upload_id) = self.upload_id.take() {
            tracing::warn!(url = %self.url, %upload_id, "upload dropped before finish: aborting it");
            let (client, url) = (self.client.clone(), self.url.clone());
            self.handle.spawn(async move {
                if let Err(err) = abort(&client, &url, &upload_id).await {
                    tracing::error!(%url, %upload_id, error = %err, "could not abort a dropped upload");
                }
            });
        }
    }
}

/// One part on its way.
struct PartUpload {
    client: Client,
    url: S3Url,
    upload_id: String,
    part: super::stage::Part,
    retry: RetryPolicy,
}

impl PartUpload {
    async fn send(&self) -> Result<CompletedPart> {
        let stored = super::stage::upload_part(
            &self.client,
            &self.url,
            &self.upload_id,
            &self.part,
            &self.retry,
        )
        .await?;
        tracing::debug!(part = self.part.number, bytes = self.part.data.len(), url = %self.url, "part stored");
        Ok(stored)
    }
}
