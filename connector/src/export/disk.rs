//! One disk of an export: the source's extent stream, pumped on the async side, written on
//! a blocking thread into a streamOptimized VMDK (a delta of the parent's image for an
//! incremental) while the block digests, and for a full export the whole-disk SHA-256,
//! are computed from the same bytes. Memory stays bounded by the channel and the writer's
//! grain table: nothing is staged.

use std::io::Write;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use rehost_core::{ChangeToken, DiskRead, Extent, SourceError};
use rehost_diskimage::checksum::BlockDigests;
use rehost_diskimage::{ImageId, ParentLink};
use sha2::{Digest, Sha256};

use super::manifest::DiskEntry;
use super::target::{Target, TargetWriter, Written};
use crate::progress::bytes_bar;

/// The previous export of the disk, for an incremental.
#[derive(Debug, Clone)]
pub struct Parent {
    pub entry: DiskEntry,
    /// Where the parent's image is.
    pub location: String,
    pub digests: Vec<[u8; 32]>,
    /// Where the unchanged rest of a block the source changed only in part is read.
    pub bytes_from: ParentBytesFrom,
}

/// Where the parent's bytes of a partly changed block are read: never the source, which
/// is read only for what changed.
#[derive(Debug, Clone)]
pub enum ParentBytesFrom {
    /// The base export's image chain, in a folder or S3 (`rehost export --base`).
    Image {
        location: String,
        clients: Option<rehost_importer::aws::Clients>,
    },
    /// The EBS snapshot the base export was imported into (a replication run, whose
    /// staged images are deleted once imported): GetSnapshotBlock.
    Snapshot {
        snapshot_id: String,
        clients: rehost_importer::aws::Clients,
    },
}

/// The image format an export writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// streamOptimized VMDK; a delta names its parent by CID (vSphere).
    VmdkStream,
    /// Dynamic VHD; a delta is a differencing VHD naming its parent's unique id (Azure,
    /// whose disks are VHDs). Written forward-only from the read's planned areas.
    VhdDynamic,
}

impl ImageFormat {
    /// The manifest's name of the format (as `rehost disk convert --to` names it).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::VmdkStream => "vmdk-stream",
            ImageFormat::VhdDynamic => "vhd-dynamic",
        }
    }
}

/// What to write.
pub struct DiskJob {
    pub target: Target,
    pub image: String,
    pub format: ImageFormat,
    pub label: String,
    pub parent: Option<Parent>,
    pub quiet: bool,
    /// Told the bytes of each data extent as it is read (a run's progress).
    pub on_data: Option<Arc<dyn Fn(u64) + Send + Sync>>,
    pub handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for DiskJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskJob")
            .field("image", &self.image)
            .field("label", &self.label)
            .field("parent", &self.parent.as_ref().map(|p| &p.location))
            .finish_non_exhaustive()
    }
}

/// What was written.
#[derive(Debug)]
pub struct DiskWritten {
    pub capacity_bytes: u64,
    pub token: ChangeToken,
    pub data_bytes: u64,
    pub image: Written,
    /// The image's identity (VMDK CID, VHD unique id), which a child names.
    pub id: ImageId,
    pub digests: Vec<[u8; 32]>,
    pub disk_sha256: Option<String>,
    /// Bytes read from the parent (its image, or the snapshot it became) to digest blocks
    /// the source changed only in part: the rest of such a block is not read from the source.
    pub parent_bytes_read: u64,
}

/// Extents in flight between the reader and the writer: with 4 MiB reads, 32 MiB.
const CHANNEL_DEPTH: usize = 8;

/// Writes the disk `read` describes.
pub async fn write<E: SourceError>(job: DiskJob, read: DiskRead<E>) -> Result<DiskWritten> {
    let capacity = read.capacity_bytes;
    let token = read.token.clone();
    let planned = read.planned.clone();
    let bar = bytes_bar(read.data_bytes, &job.label, job.quiet);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Extent>(CHANNEL_DEPTH);
    let worker_bar = bar.clone();
    let on_data = job.on_data.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let extents = std::iter::from_fn(move || rx.blocking_recv().map(Ok));
        write_blocking(job, capacity, planned.as_deref(), extents, &|e| {
            if let Extent::Data { data, .. } = e {
                worker_bar.inc(data.len() as u64);
                if let Some(on_data) = &on_data {
                    on_data(data.len() as u64);
                }
            }
        })
    });

    let mut extents = read.extents;
    let mut source_error = None;
    while let Some(item) = extents.next().await {
        match item {
            Ok(extent) => {
                if tx.send(extent).await.is_err() {
                    break; // the writer failed: its error says why
                }
            }
            Err(err) => {
                source_error = Some(err);
                break;
            }
        }
    }
    // Closing the channel early makes the writer fail ("stopped short") and discard the
    // partial image or abort the upload.
    drop(tx);
    let outcome = worker.await.context("the image writer thread failed")?;
    bar.finish_and_clear();
    if let Some(err) = source_error {
        return Err(anyhow::Error::new(err).context("reading the disk from the source"));
    }
    let mut written = outcome?;
    written.token = token;
    Ok(written)
}

/// Writes a disk that arrives as a streamOptimized VMDK byte stream (ExportVm): decoded on
/// the fly (nothing staged) and re-written like a snapshot read, so the output, its
/// checksums and its manifest are the same whichever way the disk was read.
pub async fn write_from_vmdk_stream<S>(
    job: DiskJob,
    capacity: u64,
    mut body: S,
    on_progress: impl Fn(u64) + Send + 'static,
) -> Result<DiskWritten>
where
    S: futures::Stream<Item = Result<bytes::Bytes, rehost_vsphere::Error>> + Unpin,
{
    let bar = bytes_bar(capacity, &job.label, job.quiet);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(CHANNEL_DEPTH * 4);
    let worker_bar = bar.clone();
    let name = job.label.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let reader = rehost_diskimage::vmdk::StreamReader::new(ChannelRead::new(rx), name)?;
        let declared = reader.info().virtual_size_bytes;
        if declared != capacity {
            bail!("the exported image is {declared} bytes, the VM's disk {capacity}");
        }
        let extents = reader.map(|e| e.map_err(anyhow::Error::from));
        write_blocking(job, capacity, None, extents, &|e| {
            worker_bar.set_position(e.end());
            on_progress(e.end());
        })
    });
    let mut download_error = None;
    while let Some(chunk) = body.next().await {
        let item = chunk.map_err(|e| {
            let text = e.to_string();
            download_error = Some(e);
            std::io::Error::other(text)
        });
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            break;
        }
    }
    drop(tx);
    let outcome = worker.await.context("the image writer thread failed")?;
    bar.finish_and_clear();
    if let Some(err) = download_error {
        return Err(anyhow::Error::new(err).context("downloading the exported disk"));
    }
    outcome
}

/// A blocking `Read` over chunks sent from the async side.
struct ChannelRead {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    current: bytes::Bytes,
}

impl ChannelRead {
    fn new(rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>) -> Self {
        ChannelRead {
            rx,
            current: bytes::Bytes::new(),
        }
    }
}

impl std::io::Read for ChannelRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

fn write_blocking(
    job: DiskJob,
    capacity: u64,
    planned: Option<&[(u64, u64)]>,
    extents: impl Iterator<Item = Result<Extent>>,
    on_extent: &dyn Fn(&Extent),
) -> Result<DiskWritten> {
    use rehost_diskimage::write::OutputFormat;
    // An upload's part size is chosen before the first byte, from the largest the image can be.
    let size_hint = match (job.format, planned) {
        (ImageFormat::VhdDynamic, Some(areas)) => vhd_max_bytes(capacity, areas),
        _ => rehost_diskimage::write::max_stream_bytes(OutputFormat::VmdkStream, capacity)
            .unwrap_or(capacity.saturating_mul(2)),
    };
    let out = SharedOut::new(job.target.create(&job.image, size_hint, &job.handle)?);
    let link = match &job.parent {
        Some(p) => Some(ParentLink {
            relative_path: p.entry.image.clone(),
            absolute_path: p.location.clone(),
            id: parent_id(job.format, &p.entry)?,
            virtual_size_bytes: capacity,
        }),
        None => None,
    };
    let location = job.target.location(&job.image);
    let mut writer: Box<dyn rehost_diskimage::ExtentSink + Send> = match job.format {
        ImageFormat::VmdkStream => rehost_diskimage::write::create_stream(
            out.clone(),
            OutputFormat::VmdkStream,
            capacity,
            link,
            location.clone(),
        )?,
        ImageFormat::VhdDynamic => {
            let Some(areas) = planned else {
                bail!(
                    "{location}: a VHD is written from the areas the source plans to read, and this source gave none"
                );
            };
            Box::new(rehost_diskimage::vhd::VhdStreamWriter::new(
                out.clone(),
                capacity,
                link,
                areas,
                location.clone(),
            )?)
        }
    };
    // A full export also hashes the whole disk; an incremental reads too little for that.
    let mut disk_hash = job.parent.is_none().then(Sha256::new);
    let mut digests = match job.parent {
        Some(parent) => {
            let read = match parent.bytes_from {
                ParentBytesFrom::Image { location, clients } => {
                    image_bytes(location, clients, job.handle.clone())
                }
                ParentBytesFrom::Snapshot {
                    snapshot_id,
                    clients,
                } => snapshot_bytes(snapshot_id, clients, job.handle.clone()),
            };
            BlockDigests::new(capacity, Some(parent.digests))?.with_parent_bytes(read)
        }
        None => BlockDigests::new(capacity, None)?,
    };
    let mut data_bytes = 0u64;
    for extent in extents {
        let extent = extent?;
        digests.put(&extent)?;
        match &extent {
            Extent::Data { data, .. } => {
                data_bytes += data.len() as u64;
                if let Some(hash) = &mut disk_hash {
                    hash.update(data);
                }
            }
            Extent::Zero { len, .. } | Extent::Unchanged { len, .. } => {
                if let Some(hash) = &mut disk_hash {
                    rehost_diskimage::checksum::update_zeros(hash, *len);
                }
            }
        }
        on_extent(&extent);
        writer.put(extent)?;
    }
    writer.finish()?;
    let parent_bytes_read = digests.parent_bytes_read();
    let digests = digests.finish()?;
    let image = out.take()?.finish()?;
    // Read back from what was written: the id a child will be checked against.
    let id = job.target.image_id(&job.image, &job.handle)?;
    match (job.format, &id) {
        (ImageFormat::VmdkStream, ImageId::VmdkCid(_))
        | (ImageFormat::VhdDynamic, ImageId::VhdUniqueId(_)) => {}
        (format, other) => bail!(
            "{location}: expected a {} image, read one with id {other:?}",
            format.name()
        ),
    }
    Ok(DiskWritten {
        capacity_bytes: capacity,
        token: ChangeToken(String::new()),
        data_bytes,
        image,
        id,
        digests,
        disk_sha256: disk_hash.map(|h| hex::encode(h.finalize())),
        parent_bytes_read,
    })
}

/// Reads the parent's image chain (the previous exports, local or in S3) for blocks the
/// source changed only in part. Opened at the first such block: an incremental whose
/// changes all fill whole blocks never touches it. Runs on the writer's blocking thread.
fn image_bytes(
    location: String,
    clients: Option<rehost_importer::aws::Clients>,
    handle: tokio::runtime::Handle,
) -> rehost_diskimage::checksum::ParentBytes {
    use rehost_importer::s3::{S3Fs, S3Url};
    let mut chain: Option<rehost_diskimage::Disk> = None;
    Box::new(move |offset, buf| {
        let disk = match &mut chain {
            Some(disk) => disk,
            None => {
                let opened = if S3Url::is_s3(&location) {
                    let url = S3Url::parse(&location).map_err(|e| {
                        rehost_diskimage::Error::InvalidInput(format!("{location}: {e}"))
                    })?;
                    let Some(clients) = &clients else {
                        return Err(rehost_diskimage::Error::InvalidInput(format!(
                            "{location}: reading the base export from S3 needs AWS clients"
                        )));
                    };
                    let fs = S3Fs::new(clients.s3.clone(), url.bucket.clone(), handle.clone());
                    rehost_diskimage::Disk::open_with(&fs, &url.key)?
                } else {
                    rehost_diskimage::Disk::open(&location)?
                };
                chain.insert(opened)
            }
        };
        disk.read_at(buf, offset)
    })
}

/// Reads the EBS snapshot the parent export became, for blocks the source changed only in
/// part: the snapshot's block list once (at the first such block), then one
/// GetSnapshotBlock per block (checked against EBS's checksum; a block the snapshot never
/// wrote reads as zeros). Runs on the writer's blocking thread.
fn snapshot_bytes(
    snapshot_id: String,
    clients: rehost_importer::aws::Clients,
    handle: tokio::runtime::Handle,
) -> rehost_diskimage::checksum::ParentBytes {
    use rehost_diskimage::checksum::DIGEST_BLOCK_SIZE;
    use rehost_importer::ebs::read;
    let retry = rehost_importer::retry::RetryPolicy::default();
    let mut tokens: Option<std::collections::BTreeMap<u64, String>> = None;
    let failed = |e: rehost_importer::Error| {
        rehost_diskimage::Error::InvalidInput(format!("reading the base snapshot: {e}"))
    };
    Box::new(move |offset, buf| {
        let tokens = match &mut tokens {
            Some(tokens) => tokens,
            None => tokens.insert(
                handle
                    .block_on(read::list_blocks(&clients.ebs, &retry, &snapshot_id))
                    .map_err(failed)?,
            ),
        };
        let index = offset / DIGEST_BLOCK_SIZE;
        if offset % DIGEST_BLOCK_SIZE != 0 || buf.len() as u64 > DIGEST_BLOCK_SIZE {
            return Err(rehost_diskimage::Error::InvalidInput(format!(
                "{} bytes at {offset} is not (part of) one block of snapshot {snapshot_id}",
                buf.len()
            )));
        }
        match tokens.get(&index) {
            Some(token) => {
                let block = handle
                    .block_on(read::get_block(
                        &clients.ebs,
                        &retry,
                        &snapshot_id,
                        index,
                        token,
                    ))
                    .map_err(failed)?;
                buf.copy_from_slice(&block[..buf.len()]);
            }
            None => buf.fill(0),
        }
        Ok(())
    })
}

/// The largest a dynamic VHD of the `areas` can be: headers, BAT, one 2 MiB block (plus
/// its sector bitmap) per block the areas touch, the footer.
fn vhd_max_bytes(capacity: u64, areas: &[(u64, u64)]) -> u64 {
    const BLOCK: u64 = 2 << 20;
    let mut blocks = 0u64;
    let mut last = None;
    for &(offset, len) in areas.iter().filter(|(_, len)| *len > 0) {
        let (first, end) = (offset / BLOCK, (offset + len - 1) / BLOCK);
        let first = match last {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        if end >= first {
            blocks += end - first + 1;
        }
        last = Some(end.max(last.unwrap_or(0)));
    }
    let bat = capacity.div_ceil(BLOCK) * 4;
    64 * 1024 + bat + blocks * (BLOCK + 512) + 512
}

/// The identity a delta of `format` records for its parent, from the parent's manifest entry.
fn parent_id(format: ImageFormat, parent: &DiskEntry) -> Result<ImageId> {
    match format {
        ImageFormat::VmdkStream => Ok(ImageId::VmdkCid(parent.image_cid)),
        ImageFormat::VhdDynamic => {
            let hex_id = parent.image_unique_id.as_deref().with_context(|| {
                format!(
                    "the base export's {} records no VHD unique id",
                    parent.image
                )
            })?;
            let bytes = hex::decode(hex_id)
                .ok()
                .and_then(|b| <[u8; 16]>::try_from(b).ok())
                .with_context(|| {
                    format!("the base export's unique id {hex_id:?} is not 16 hex bytes")
                })?;
            Ok(ImageId::VhdUniqueId(bytes))
        }
    }
}

/// The target writer, shared between the image writer (which owns a `Write`) and us
/// (who finish the upload after the image writer has written its last byte).
#[derive(Clone)]
struct SharedOut(Arc<Mutex<Option<Box<dyn TargetWriter>>>>);

impl SharedOut {
    fn new(out: Box<dyn TargetWriter>) -> Self {
        SharedOut(Arc::new(Mutex::new(Some(out))))
    }

    fn take(&self) -> Result<Box<dyn TargetWriter>> {
        self.0
            .lock()
            .map_err(|_| anyhow::anyhow!("the image writer panicked"))?
            .take()
            .context("the output was already finished")
    }
}

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut guard) => match guard.as_mut() {
                Some(out) => out.write(buf),
                None => Err(std::io::Error::other("the output was already finished")),
            },
            Err(_) => Err(std::io::Error::other("the image writer panicked")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.0.lock() {
            Ok(mut guard) => match guard.as_mut() {
                Some(out) => out.flush(),
                None => Ok(()),
            },
            Err(_) => Err(std::io::Error::other("the image writer panicked")),
        }
    }
}
