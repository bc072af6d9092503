//! The host's disk files as the disk-image library sees them: Windows paths (`C:\…`)
//! opened on the host's administrative share (`\\host\C$\…`) through an SMB session, read
//! at random offsets. Parent locators inside `.avhdx` files name Windows paths too, so
//! chains resolve the way Hyper-V resolves them.

use std::sync::Arc;

use rehost_diskimage::io::{FileSystem, ImageFile, ReadAt};

/// Opens host files for random-access reads (an SMB session in production).
pub trait Opener: Send + Sync + std::fmt::Debug {
    /// Opens `share` (`C$`) and the file at `path` inside it (`Hyper-V\vm1\disk.vhdx`).
    fn open(&self, share: &str, path: &str) -> std::io::Result<Arc<dyn ReadAt>>;
}

/// A Windows path split into the administrative share of its drive and the path inside.
pub fn share_path(windows_path: &str) -> Option<(String, String)> {
    let normal = windows_path.replace('/', "\\");
    let bytes = normal.as_bytes();
    if bytes.len() >= 3 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' && bytes[2] == b'\\' {
        let drive = (bytes[0] as char).to_ascii_uppercase();
        return Some((format!("{drive}$"), normal[3..].to_owned()));
    }
    None
}

/// The host's files, by Windows path.
#[derive(Debug, Clone)]
pub struct HostFiles {
    opener: Arc<dyn Opener>,
}

impl HostFiles {
    pub fn new(opener: Arc<dyn Opener>) -> Self {
        HostFiles { opener }
    }
}

impl FileSystem for HostFiles {
    fn open(&self, path: &str) -> rehost_diskimage::Result<ImageFile> {
        let not_found = |detail: String| rehost_diskimage::Error::Open {
            file: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, detail),
        };
        let (share, inner) = share_path(path).ok_or_else(|| {
            not_found(format!(
                "{path:?} is not a local path of the host (X:\\…), so no administrative share serves it"
            ))
        })?;
        let file =
            self.opener
                .open(&share, &inner)
                .map_err(|source| rehost_diskimage::Error::Open {
                    file: path.to_owned(),
                    source,
                })?;
        ImageFile::new(path, file)
    }

    /// Windows resolution: `X:\…` and `\\…` are absolute, anything else is relative to the
    /// referrer's folder (`..` steps up).
    fn resolve(&self, referrer: &str, reference: &str) -> String {
        let reference = reference.replace('/', "\\");
        if share_path(&reference).is_some() || reference.starts_with("\\\\") {
            return reference;
        }
        let referrer = referrer.replace('/', "\\");
        let mut parts: Vec<&str> = referrer.split('\\').collect();
        parts.pop();
        for part in reference.split('\\') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.len() > 1 {
                        parts.pop();
                    }
                }
                other => parts.push(other),
            }
        }
        parts.join("\\")
    }

    /// NTFS names are case-insensitive.
    fn identity(&self, path: &str) -> String {
        path.replace('/', "\\").to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct NoFiles;
    impl Opener for NoFiles {
        fn open(&self, _: &str, _: &str) -> std::io::Result<Arc<dyn ReadAt>> {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, "none"))
        }
    }

    #[test]
    fn drive_paths_map_to_administrative_shares() {
        assert_eq!(
            share_path("c:\\Hyper-V\\vm1\\d.vhdx"),
            Some(("C$".into(), "Hyper-V\\vm1\\d.vhdx".into()))
        );
        assert_eq!(
            share_path("D:/VMs/x.avhdx"),
            Some(("D$".into(), "VMs\\x.avhdx".into()))
        );
        assert_eq!(share_path("relative\\x.vhdx"), None);
        assert_eq!(share_path("\\\\server\\share\\x"), None);
    }

    #[test]
    fn parents_resolve_as_windows_resolves_them() {
        let fs = HostFiles::new(Arc::new(NoFiles));
        let child = "C:\\VMs\\vm1\\Snapshots\\d_1234.avhdx";
        assert_eq!(
            fs.resolve(child, "C:/VMs/vm1/d.vhdx"),
            "C:\\VMs\\vm1\\d.vhdx"
        );
        assert_eq!(fs.resolve(child, "..\\d.vhdx"), "C:\\VMs\\vm1\\d.vhdx");
        assert_eq!(
            fs.resolve(child, "d.vhdx"),
            "C:\\VMs\\vm1\\Snapshots\\d.vhdx"
        );
        assert_eq!(fs.resolve("C:\\d.vhdx", "..\\..\\x.vhdx"), "C:\\x.vhdx");
        assert_eq!(fs.identity("C:/VMs/D.vhdx"), fs.identity("c:\\vms\\d.VHDX"));
        assert!(fs.open("relative.vhdx").is_err());
        assert!(fs.open("C:\\missing.vhdx").is_err());
    }
}
