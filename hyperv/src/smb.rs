//! The host's files over SMB 2/3 (the `smb2` crate): one session per source, a tree per
//! administrative share, and read-only file handles read at random offsets — the
//! disk-image library's [`ReadAt`] over SMB, never a whole-file copy.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rehost_diskimage::io::ReadAt;
use smb2::{ClientConfig, SmbClient};
use tokio::runtime::Handle;

use crate::files::Opener;

/// Where and as whom to open the SMB session. The password never appears in `Debug`.
#[derive(Clone)]
pub struct SmbSettings {
    /// `host:port` (445 unless the config says otherwise).
    pub address: String,
    /// `user`, `DOMAIN\user` or `user@domain`.
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for SmbSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmbSettings")
            .field("address", &self.address)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

struct Session {
    client: SmbClient,
    trees: HashMap<String, smb2::client::tree::Tree>,
}

/// Opens files on the host's shares; blocking calls run the async client on `handle`
/// (they are made from blocking threads: the disk-image readers are synchronous).
pub struct SmbOpener {
    settings: SmbSettings,
    handle: Handle,
    session: tokio::sync::Mutex<Option<Session>>,
    /// Bytes read from every file so far (data and image metadata alike).
    bytes_read: Arc<AtomicU64>,
}

impl std::fmt::Debug for SmbOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmbOpener")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn io_error(error: &smb2::Error, what: impl std::fmt::Display) -> io::Error {
    let kind = match error.kind() {
        smb2::ErrorKind::NotFound => io::ErrorKind::NotFound,
        smb2::ErrorKind::AccessDenied
        | smb2::ErrorKind::AuthRequired
        | smb2::ErrorKind::SigningRequired => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{what}: {error}"))
}

impl SmbOpener {
    /// An opener; nothing is connected until the first file is opened.
    pub fn new(settings: SmbSettings, handle: Handle) -> Self {
        SmbOpener {
            settings,
            handle,
            session: tokio::sync::Mutex::new(None),
            bytes_read: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Bytes read over SMB so far, from every file: what an export cost the host's disks
    /// and network, metadata included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    fn config(&self) -> ClientConfig {
        let (domain, user) = crate::transport::split_user(&self.settings.user);
        ClientConfig {
            addr: self.settings.address.clone(),
            username: user,
            password: self.settings.password.clone(),
            domain,
            timeout: Duration::from_secs(30),
            ..Default::default()
        }
    }

    /// Logs in and connects `share`: what `config check` calls "SMB reachable".
    pub async fn check(&self, share: &str) -> io::Result<()> {
        let mut guard = self.session.lock().await;
        self.tree(&mut guard, share).await.map(|_| ())
    }

    async fn tree<'a>(
        &self,
        guard: &'a mut Option<Session>,
        share: &str,
    ) -> io::Result<&'a mut Session> {
        if guard.is_none() {
            let client = SmbClient::connect(self.config()).await.map_err(|e| {
                io_error(
                    &e,
                    format_args!(
                        "SMB login to {} as {:?}",
                        self.settings.address, self.settings.user
                    ),
                )
            })?;
            *guard = Some(Session {
                client,
                trees: HashMap::new(),
            });
        }
        let session = guard
            .as_mut()
            .ok_or_else(|| io::Error::other("no SMB session"))?;
        if !session.trees.contains_key(share) {
            let tree = session.client.connect_share(share).await.map_err(|e| {
                io_error(
                    &e,
                    format_args!(
                        "connecting share \\\\{}\\{share} as {:?}",
                        self.settings.address, self.settings.user
                    ),
                )
            })?;
            session.trees.insert(share.to_owned(), tree);
        }
        Ok(session)
    }

    async fn open_async(&self, share: &str, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        let mut guard = self.session.lock().await;
        let session = self.tree(&mut guard, share).await?;
        let tree = session
            .trees
            .get(share)
            .ok_or_else(|| io::Error::other("share vanished"))?
            .clone();
        let unix_path = path.replace('\\', "/");
        let reader = session
            .client
            .open_file_reader(&tree, &unix_path)
            .await
            .map_err(|e| {
                io_error(
                    &e,
                    format_args!("opening \\\\{}\\{share}\\{path}", self.settings.address),
                )
            })?;
        Ok(Arc::new(SmbFile {
            name: format!("\\\\{}\\{share}\\{path}", self.settings.address),
            size: reader.size(),
            reader: Arc::new(reader),
            handle: self.handle.clone(),
            bytes_read: self.bytes_read.clone(),
        }))
    }
}

impl Opener for SmbOpener {
    fn open(&self, share: &str, path: &str) -> io::Result<Arc<dyn ReadAt>> {
        self.handle.block_on(self.open_async(share, path))
    }
}

/// An open file on a share.
struct SmbFile {
    name: String,
    size: u64,
    reader: Arc<smb2::client::stream::FileReader>,
    handle: Handle,
    bytes_read: Arc<AtomicU64>,
}

impl ReadAt for SmbFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: a read at {offset} of {} bytes passes its end ({})",
                    self.name,
                    buf.len(),
                    self.size
                ),
            ));
        }
        let data = self
            .handle
            .block_on(self.reader.read_at(offset, buf.len() as u64))
            .map_err(|e| io_error(&e, format_args!("reading {} at {offset}", self.name)))?;
        if data.len() != buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: {} of {} bytes at {offset}",
                    self.name,
                    data.len(),
                    buf.len()
                ),
            ));
        }
        buf.copy_from_slice(&data);
        self.bytes_read
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}
