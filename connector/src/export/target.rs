//! Where an export's files go: a local folder or an S3 prefix. Images are written as a
//! forward-only byte stream either way (streamOptimized VMDK needs no seeking), so an S3
//! export streams straight into a multipart upload and never stages the disk locally.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rehost_importer::aws::Clients;
use rehost_importer::s3::S3Url;
use sha2::{Digest, Sha256};

/// An export destination.
#[derive(Debug, Clone)]
pub enum Target {
    Dir(PathBuf),
    S3 {
        clients: Clients,
        bucket: String,
        /// Key prefix, empty or ending in `/`.
        prefix: String,
    },
}

/// Bytes written and their SHA-256, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub bytes: u64,
    pub sha256: String,
}

/// A file being written to a target. Dropping it without `finish` discards the file
/// (a partial image is never left behind as if it were whole).
pub trait TargetWriter: Write + Send {
    fn finish(self: Box<Self>) -> Result<Written>;
}

impl Target {
    /// Parses `DIR` or `s3://bucket/prefix`.
    pub fn parse(text: &str, clients: Option<Clients>) -> Result<Target> {
        if S3Url::is_s3(text) {
            let clients = clients.context("an s3:// target needs AWS clients (internal error)")?;
            let (bucket, prefix) = split_s3(text)?;
            Ok(Target::S3 {
                clients,
                bucket,
                prefix,
            })
        } else {
            Ok(Target::Dir(PathBuf::from(text)))
        }
    }

    /// Where a file named `name` lives, as the manifest and messages show it.
    pub fn location(&self, name: &str) -> String {
        match self {
            Target::Dir(dir) => dir.join(name).display().to_string(),
            Target::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}{name}"),
        }
    }

    /// Makes sure the target can be written (creates the folder).
    pub fn prepare(&self) -> Result<()> {
        if let Target::Dir(dir) = self {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the export folder {}", dir.display()))?;
        }
        Ok(())
    }

    /// Starts writing `name`. Call from a blocking thread: an S3 writer blocks on `runtime`.
    pub fn create(
        &self,
        name: &str,
        size_hint: u64,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Box<dyn TargetWriter>> {
        match self {
            Target::Dir(dir) => {
                let path = dir.join(name);
                let partial = dir.join(format!(".{name}.partial"));
                let file = File::create(&partial)
                    .with_context(|| format!("creating {}", partial.display()))?;
                Ok(Box::new(FileTarget {
                    out: BufWriter::with_capacity(1 << 20, file),
                    partial,
                    path,
                    hasher: Sha256::new(),
                    bytes: 0,
                    done: false,
                }))
            }
            Target::S3 {
                clients,
                bucket,
                prefix,
            } => {
                let url = S3Url {
                    bucket: bucket.clone(),
                    key: format!("{prefix}{name}"),
                };
                let options = rehost_importer::s3::MultipartWriterOptions::new(size_hint);
                let writer = rehost_importer::s3::MultipartWriter::create(
                    clients,
                    &url,
                    runtime.clone(),
                    options,
                )
                .with_context(|| {
                    format!("starting the upload of s3://{}/{}", url.bucket, url.key)
                })?;
                Ok(Box::new(S3Target {
                    writer: Some(writer),
                }))
            }
        }
    }

    /// Writes a small file whole (a manifest, a block list).
    pub async fn put(&self, name: &str, bytes: Vec<u8>) -> Result<Written> {
        let written = Written {
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
        };
        match self {
            Target::Dir(dir) => {
                let path = dir.join(name);
                let partial = dir.join(format!(".{name}.partial"));
                tokio::fs::write(&partial, &bytes)
                    .await
                    .with_context(|| format!("writing {}", partial.display()))?;
                tokio::fs::rename(&partial, &path)
                    .await
                    .with_context(|| format!("renaming {} into place", path.display()))?;
            }
            Target::S3 {
                clients,
                bucket,
                prefix,
            } => {
                let key = format!("{prefix}{name}");
                clients
                    .s3
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(bytes.into())
                    .send()
                    .await
                    .map_err(|e| {
                        rehost_importer::retry::classify(
                            "PutObject",
                            &format!("s3://{bucket}/{key}"),
                            &e,
                        )
                    })?;
            }
        }
        Ok(written)
    }
}

impl Target {
    /// Reads back the identity (VMDK CID) of an image just written, from its header and
    /// descriptor only. Call from a blocking thread.
    pub fn image_id(
        &self,
        name: &str,
        runtime: &tokio::runtime::Handle,
    ) -> Result<rehost_diskimage::ImageId> {
        use rehost_diskimage::FileSystem;
        let location = self.location(name);
        let layer = match self {
            Target::Dir(dir) => {
                let fs = rehost_diskimage::LocalFs;
                let path = dir.join(name);
                let file = fs.open(&path.to_string_lossy())?;
                rehost_diskimage::open_layer(&fs, file)?
            }
            Target::S3 {
                clients,
                bucket,
                prefix,
            } => {
                let fs = rehost_importer::s3::S3Fs::new(
                    clients.s3.clone(),
                    bucket.clone(),
                    runtime.clone(),
                );
                let file = fs.open(&format!("{prefix}{name}"))?;
                rehost_diskimage::open_layer(&fs, file)?
            }
        };
        layer
            .info()
            .id
            .clone()
            .with_context(|| format!("{location}: the image written has no identity"))
    }
}

/// Reads a small file (a manifest, a block list) from a local path or an S3 URL.
pub async fn read_small(location: &str, clients: Option<&Clients>) -> Result<Vec<u8>> {
    if S3Url::is_s3(location) {
        let url = S3Url::parse(location)?;
        let clients = clients.context("reading from S3 needs AWS clients (internal error)")?;
        let object = clients
            .s3
            .get_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .send()
            .await
            .map_err(|e| rehost_importer::retry::classify("GetObject", location, &e))?;
        let bytes = object
            .body
            .collect()
            .await
            .with_context(|| format!("reading {location}"))?;
        Ok(bytes.into_bytes().to_vec())
    } else {
        tokio::fs::read(location)
            .await
            .with_context(|| format!("reading {location}"))
    }
}

/// The location of `name` next to the file at `location` (same folder or prefix).
pub fn sibling(location: &str, name: &str) -> String {
    match location.rfind('/') {
        Some(slash) => format!("{}{name}", &location[..=slash]),
        None => name.to_owned(),
    }
}

/// The folder (or `s3://bucket/prefix/`) holding `location`.
pub fn folder_of(location: &str) -> String {
    sibling(location, "")
}

fn split_s3(text: &str) -> Result<(String, String)> {
    let rest = &text["s3://".len()..];
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("{text}: no bucket name");
    }
    let prefix = if prefix.is_empty() || prefix.ends_with('/') {
        prefix.to_owned()
    } else {
        format!("{prefix}/")
    };
    Ok((bucket.to_owned(), prefix))
}

struct FileTarget {
    out: BufWriter<File>,
    partial: PathBuf,
    path: PathBuf,
    hasher: Sha256,
    bytes: u64,
    done: bool,
}

impl Write for FileTarget {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl TargetWriter for FileTarget {
    fn finish(mut self: Box<Self>) -> Result<Written> {
        self.out
            .flush()
            .and_then(|()| self.out.get_ref().sync_all())
            .with_context(|| format!("writing {}", self.partial.display()))?;
        std::fs::rename(&self.partial, &self.path)
            .with_context(|| format!("renaming {} into place", self.path.display()))?;
        self.done = true;
        Ok(Written {
            bytes: self.bytes,
            sha256: hex::encode(std::mem::take(&mut self.hasher).finalize()),
        })
    }
}

impl Drop for FileTarget {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

struct S3Target {
    writer: Option<rehost_importer::s3::MultipartWriter>,
}

impl Write for S3Target {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.writer {
            Some(w) => w.write(buf),
            None => Err(std::io::Error::other("the upload has already finished")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.writer {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl TargetWriter for S3Target {
    fn finish(mut self: Box<Self>) -> Result<Written> {
        let writer = self
            .writer
            .take()
            .context("the upload has already finished")?;
        let report = writer.finish()?;
        Ok(Written {
            bytes: report.size_bytes,
            sha256: report.sha256,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_targets_split_into_bucket_and_prefix() {
        assert_eq!(split_s3("s3://b/p/q").unwrap(), ("b".into(), "p/q/".into()));
        assert_eq!(split_s3("s3://b/p/").unwrap(), ("b".into(), "p/".into()));
        assert_eq!(split_s3("s3://b").unwrap(), ("b".into(), String::new()));
        assert!(split_s3("s3:///x").is_err());
    }

    #[test]
    fn siblings_share_the_folder() {
        assert_eq!(sibling("s3://b/p/m.json", "x.vmdk"), "s3://b/p/x.vmdk");
        assert_eq!(sibling("/tmp/e/m.json", "x.vmdk"), "/tmp/e/x.vmdk");
        assert_eq!(sibling("m.json", "x.vmdk"), "x.vmdk");
        assert_eq!(folder_of("/tmp/e/m.json"), "/tmp/e/");
    }

    #[test]
    fn a_dropped_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::Dir(dir.path().to_path_buf());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut w = target.create("a.vmdk", 0, rt.handle()).unwrap();
        w.write_all(b"half").unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let mut w = target.create("b.vmdk", 0, rt.handle()).unwrap();
        w.write_all(b"whole").unwrap();
        let written = w.finish().unwrap();
        assert_eq!(written.bytes, 5);
        assert_eq!(std::fs::read(dir.path().join("b.vmdk")).unwrap(), b"whole");
    }
}
