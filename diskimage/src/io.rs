//! Where image bytes come from. Format readers never see a `File`: they read through
//! [`ReadAt`], so the same code reads a local file, a byte slice (fuzzing, unit tests) and,
//! in other crates, S3 ranged GETs or SMB reads. Multi-file images (VMDK descriptors with
//! extents, parent chains) open their other files through a [`FileSystem`].

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Random-access, thread-safe reads of a byte source.
#[allow(clippy::len_without_is_empty)] // a length that can fail has no cheap emptiness
pub trait ReadAt: Send + Sync {
    /// Fills `buf` with the bytes at `offset`; fails with `UnexpectedEof` past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The source's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True if `[offset, offset + len)` is known to be a hole (reads as zero without being
    /// stored). A sparse image file's holes then cost no read at all. Default: unknown.
    fn is_hole(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

impl ReadAt for File {
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        // SEEK_DATA finds the next byte that is stored at or after `offset`; ENXIO means
        // none is. Only the file position moves, which positional reads ignore.
        match rustix::fs::seek(self, rustix::fs::SeekFrom::Data(offset)) {
            Ok(next_data) => next_data >= offset.saturating_add(len),
            Err(e) => e == rustix::io::Errno::NXIO,
        }
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

impl ReadAt for bytes::Bytes {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_ref().read_exact_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.as_ref().len() as u64)
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end")
}

/// Reads smaller than this are not checked for holes.
const HOLE_CHECK_MIN_BYTES: u64 = 64 * 1024;

/// An opened image file: its name (for errors), its bytes and its length, read once.
#[derive(Clone)]
pub struct ImageFile {
    name: String,
    inner: Arc<dyn ReadAt>,
    len: u64,
}

impl std::fmt::Debug for ImageFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFile")
            .field("name", &self.name)
            .field("len", &self.len)
            .finish()
    }
}

impl ImageFile {
    /// Wraps a source under a name used in every error about it.
    pub fn new(name: impl Into<String>, inner: Arc<dyn ReadAt>) -> Result<Self> {
        let name = name.into();
        let len = inner.len().map_err(|source| Error::Io {
            file: name.clone(),
            op: "measure",
            structure: "file",
            offset: 0,
            source,
        })?;
        Ok(Self { name, inner, len })
    }

    /// An in-memory image, for tests and fuzzing.
    pub fn from_bytes(name: impl Into<String>, bytes: impl Into<bytes::Bytes>) -> Self {
        let bytes: bytes::Bytes = bytes.into();
        let len = bytes.len() as u64;
        Self {
            name: name.into(),
            inner: Arc::new(bytes),
            len,
        }
    }

    /// The name errors use.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes of `structure` at `offset`; a read past the end is reported as
    /// [`Error::Truncated`] naming the structure.
    pub fn read(&self, buf: &mut [u8], offset: u64, structure: &'static str) -> Result<()> {
        let needed = buf.len() as u64;
        if offset.checked_add(needed).is_none_or(|end| end > self.len) {
            return Err(Error::Truncated {
                file: self.name.clone(),
                structure,
                offset,
                needed,
                file_len: self.len,
            });
        }
        // Only worth a system call for bulk reads: headers and tables are small.
        if needed >= HOLE_CHECK_MIN_BYTES && self.inner.is_hole(offset, needed) {
            buf.fill(0);
            return Ok(());
        }
        self.inner
            .read_exact_at(buf, offset)
            .map_err(|source| Error::Io {
                file: self.name.clone(),
                op: "read",
                structure,
                offset,
                source,
            })
    }

    /// Reads a structure into a new vector. `len` must already be bounded by the caller
    /// (never a size taken from the image without a check).
    pub fn read_vec(&self, len: usize, offset: u64, structure: &'static str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read(&mut buf, offset, structure)?;
        Ok(buf)
    }

    /// Reads a fixed-size structure.
    pub fn read_array<const N: usize>(
        &self,
        offset: u64,
        structure: &'static str,
    ) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read(&mut buf, offset, structure)?;
        Ok(buf)
    }
}

/// Opens the other files an image refers to (VMDK extents, parents), by path.
pub trait FileSystem: Send + Sync {
    /// Opens `path` for reading.
    fn open(&self, path: &str) -> Result<ImageFile>;

    /// Resolves `reference`, written inside the image at `referrer`, to a path to open:
    /// relative references are taken from the referrer's folder.
    fn resolve(&self, referrer: &str, reference: &str) -> String {
        let reference_path = Path::new(reference);
        if reference_path.is_absolute() {
            return reference.to_owned();
        }
        match Path::new(referrer).parent() {
            Some(dir) if !dir.as_os_str().is_empty() => {
                dir.join(reference_path).to_string_lossy().into_owned()
            }
            _ => reference.to_owned(),
        }
    }

    /// A key that is the same for two paths naming the same file (used to detect loops).
    fn identity(&self, path: &str) -> String {
        path.to_owned()
    }
}

/// The local file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalFs;

impl FileSystem for LocalFs {
    fn open(&self, path: &str) -> Result<ImageFile> {
        let file = File::open(path).map_err(|source| Error::Open {
            file: path.to_owned(),
            source,
        })?;
        ImageFile::new(path, Arc::new(file))
    }

    fn identity(&self, path: &str) -> String {
        std::fs::canonicalize(path)
            .unwrap_or_else(|_| PathBuf::from(path))
            .to_string_lossy()
            .into_owned()
    }
}

/// Files held in memory under their paths: for tests and fuzzing of multi-file images.
#[derive(Debug, Default, Clone)]
pub struct MemFs {
    files: HashMap<String, bytes::Bytes>,
}

impl MemFs {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a file.
    pub fn insert(&mut self, path: impl Into<String>, bytes: impl Into<bytes::Bytes>) {
        self.files.insert(path.into(), bytes.into());
    }
}

impl FileSystem for MemFs {
    fn open(&self, path: &str) -> Result<ImageFile> {
        let bytes = self.files.get(path).ok_or_else(|| Error::Open {
            file: path.to_owned(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        })?;
        Ok(ImageFile::from_bytes(path, bytes.clone()))
    }
}

/// Little-endian field readers over a header buffer whose length the caller checked.
#[allow(dead_code)] // some readers use only some widths
pub(crate) mod le {
    /// Reads a u16 at `at`.
    pub fn u16(buf: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([buf[at], buf[at + 1]])
    }
    /// Reads a u32 at `at`.
    pub fn u32(buf: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
    }
    /// Reads a u64 at `at`.
    pub fn u64(buf: &[u8], at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[at..at + 8]);
        u64::from_le_bytes(b)
    }
}

/// Big-endian field readers (VHD is big-endian).
#[allow(dead_code)]
pub(crate) mod be {
    /// Reads a u16 at `at`.
    pub fn u16(buf: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([buf[at], buf[at + 1]])
    }
    /// Reads a u32 at `at`.
    pub fn u32(buf: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
    }
    /// Reads a u64 at `at`.
    pub fn u64(buf: &[u8], at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[at..at + 8]);
        u64::from_be_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_past_the_end_name_the_structure() {
        let f = ImageFile::from_bytes("x.img", vec![0u8; 10]);
        let err = f.read_vec(8, 4, "header").unwrap_err();
        assert!(err.to_string().contains("x.img"), "{err}");
        assert!(err.to_string().contains("header at offset 4"), "{err}");
        let err = f.read_vec(1, u64::MAX, "footer").unwrap_err();
        assert!(matches!(err, Error::Truncated { .. }));
    }

    #[test]
    fn holes_of_a_sparse_file_read_as_zero_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = File::create(&path).unwrap();
        file.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096], 4 << 20).unwrap();
        let file = File::open(&path).unwrap();
        assert!(file.is_hole(0, 1 << 20));
        assert!(!file.is_hole(3 << 20, 2 << 20));
        assert!(file.is_hole(5 << 20, 3 << 20));
        let image = ImageFile::new("sparse", Arc::new(file)).unwrap();
        let mut buf = vec![1u8; 2 << 20];
        image.read(&mut buf, 3 << 20, "data").unwrap();
        assert!(buf[..1 << 20].iter().all(|&b| b == 0));
        assert_eq!(buf[1 << 20], 7);
    }

    #[test]
    fn resolves_relative_references_from_the_referrer() {
        let fs = MemFs::new();
        assert_eq!(
            fs.resolve("/a/b/child.vmdk", "parent.vmdk"),
            "/a/b/parent.vmdk"
        );
        assert_eq!(fs.resolve("child.vmdk", "parent.vmdk"), "parent.vmdk");
        assert_eq!(fs.resolve("/a/child.vmdk", "/z/p.vmdk"), "/z/p.vmdk");
    }
}
