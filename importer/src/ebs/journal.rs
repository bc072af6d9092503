//! The local import journal: a JSON-lines file that makes an import resumable and serves as
//! the "checksum journal" of a later incremental import.
//!
//! Lines, in order: a `start` (source identity, client token, options), a `started` (the
//! snapshot id, once StartSnapshot answered), one `block` per acknowledged PutSnapshotBlock
//! (index, SHA-256), one `same` per block left out because the parent already holds those
//! bytes, and a final `completed`. A pending journal lives in the journal folder as
//! `pending-<source hash>-<client token>.jsonl`; a completed one is renamed `<snapshot id>.jsonl`
//! so the next incremental import finds its parent's block digests by name. Appends only, so
//! a crash loses at most the last lines, which only means those blocks are sent again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What identifies the source, so a resume is refused if it changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    /// Path or URL.
    pub location: String,
    /// Size of the source file (or object).
    pub size_bytes: u64,
    /// Cheap fingerprint: for a local file, SHA-256 of its modification time and its first
    /// and last MiB; for S3, the ETag.
    pub fingerprint: String,
}

/// Bytes hashed at each end of a local file for its fingerprint: headers and footers (where
/// VMDK, VHD and VHDX record their state) live there, and 1 MiB reads in milliseconds.
const FINGERPRINT_BYTES: u64 = 1 << 20;

impl SourceIdentity {
    /// The identity of a local file.
    pub fn local(path: &Path) -> Result<Self> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |op| {
            move |source| Error::Io {
                path: path.display().to_string(),
                op,
                source,
            }
        };
        let mut file = File::open(path).map_err(io("opening the source"))?;
        let meta = file
            .metadata()
            .map_err(io("reading the source's metadata"))?;
        let size = meta.len();
        let mut hasher = Sha256::new();
        if let Ok(modified) = meta.modified() {
            if let Ok(since) = modified.duration_since(std::time::UNIX_EPOCH) {
                hasher.update(since.as_nanos().to_le_bytes());
            }
        }
        let mut buf = Vec::new();
        (&mut file)
            .take(FINGERPRINT_BYTES)
            .read_to_end(&mut buf)
            .map_err(io("reading the source"))?;
        hasher.update(&buf);
        buf.clear();
        file.seek(SeekFrom::Start(size.saturating_sub(FINGERPRINT_BYTES)))
            .map_err(io("reading the source"))?;
        file.take(FINGERPRINT_BYTES)
            .read_to_end(&mut buf)
            .map_err(io("reading the source"))?;
        hasher.update(&buf);
        let location = std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string();
        Ok(Self {
            location,
            size_bytes: size,
            fingerprint: hex(&hasher.finalize()[..16]),
        })
    }

    /// Short stable name of the location, for journal file names.
    fn location_hash(&self) -> String {
        hex(&Sha256::digest(self.location.as_bytes())[..8])
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The first line: what is being imported, how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartRecord {
    /// The source.
    pub source: SourceIdentity,
    /// StartSnapshot's ClientToken, kept so a restarted start is idempotent.
    pub client_token: String,
    /// Parent snapshot, if any.
    pub parent_snapshot_id: Option<String>,
    /// Volume size asked for.
    pub volume_size_gib: i64,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// The import began (written before StartSnapshot).
    Start(StartRecord),
    /// StartSnapshot answered.
    Started { snapshot_id: String },
    /// PutSnapshotBlock of `index` was acknowledged; `sha256` is base64.
    Block { index: u64, sha256: String },
    /// Block `index` was not sent: the parent holds the same bytes (`sha256`, base64).
    Same { index: u64, sha256: String },
    /// CompleteSnapshot succeeded. `checksums_complete`: every non-zero block of the snapshot
    /// has a `block` or `same` line (true for full-image imports), so this journal can stand
    /// in for reading the snapshot back.
    Completed {
        snapshot_id: String,
        checksums_complete: bool,
    },
}

/// A journal read back.
#[derive(Debug, Clone, Default)]
pub struct JournalState {
    /// The start line.
    pub start: Option<StartRecord>,
    /// The snapshot, once started.
    pub snapshot_id: Option<String>,
    /// Acknowledged blocks: index → SHA-256 (base64).
    pub acknowledged: BTreeMap<u64, String>,
    /// Blocks identical to the parent's: index → SHA-256 (base64).
    pub same: BTreeMap<u64, String>,
    /// Whether the import completed, and if so whether its digests cover the snapshot.
    pub completed: Option<bool>,
}

impl JournalState {
    /// Reads a journal; a torn last line (a crash mid-write) is ignored.
    pub fn read(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            op: "opening the journal",
            source,
        })?;
        let mut state = Self::default();
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| Error::Io {
                path: path.display().to_string(),
                op: "reading the journal",
                source,
            })?;
            let Ok(record) = serde_json::from_str::<Record>(&line) else {
                break;
            };
            match record {
                Record::Start(start) => state.start = Some(start),
                Record::Started { snapshot_id } => state.snapshot_id = Some(snapshot_id),
                Record::Block { index, sha256 } => {
                    state.acknowledged.insert(index, sha256);
                }
                Record::Same { index, sha256 } => {
                    state.same.insert(index, sha256);
                }
                Record::Completed {
                    checksums_complete, ..
                } => state.completed = Some(checksums_complete),
            }
        }
        Ok(state)
    }

    /// Every non-zero block's digest (acknowledged and same), when the journal is complete.
    pub fn snapshot_digests(&self) -> Option<BTreeMap<u64, String>> {
        if self.completed != Some(true) {
            return None;
        }
        let mut all = self.same.clone();
        all.extend(self.acknowledged.iter().map(|(i, d)| (*i, d.clone())));
        Some(all)
    }
}

/// Where journals go.
#[derive(Debug, Clone)]
pub struct JournalLocation {
    /// The journal folder (`$XDG_STATE_HOME/rehost/imports`); completed journals are looked
    /// up here by snapshot id.
    pub dir: PathBuf,
    /// A journal file chosen by the user (`--journal`), instead of one named in `dir`.
    pub file: Option<PathBuf>,
}

impl JournalLocation {
    /// `$XDG_STATE_HOME/rehost/imports`, else `~/.local/state/rehost/imports`.
    pub fn default_dir() -> PathBuf {
        let state = std::env::var_os("XDG_STATE_HOME")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."));
                home.join(".local/state")
            });
        state.join("rehost/imports")
    }

    /// The journal to resume for `source`: the `--journal` file if it exists, else the most
    /// recent pending journal of the same source location.
    pub fn find_pending(&self, source: &SourceIdentity) -> Result<Option<PathBuf>> {
        if let Some(file) = &self.file {
            return Ok(file.exists().then(|| file.clone()));
        }
        let prefix = format!("pending-{}-", source.location_hash());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(None);
        };
        let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with(&prefix) {
                continue;
            }
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if best.as_ref().is_none_or(|(t, _)| modified > *t) {
                best = Some((modified, entry.path()));
            }
        }
        Ok(best.map(|(_, p)| p))
    }

    /// Path of a new pending journal.
    pub fn new_pending(&self, source: &SourceIdentity, client_token: &str) -> PathBuf {
        self.file.clone().unwrap_or_else(|| {
            self.dir.join(format!(
                "pending-{}-{client_token}.jsonl",
                source.location_hash()
            ))
        })
    }

    /// The completed journal of `snapshot_id`, if this machine made it.
    pub fn completed(&self, snapshot_id: &str) -> Option<PathBuf> {
        let path = self.dir.join(format!("{snapshot_id}.jsonl"));
        path.exists().then_some(path)
    }
}

/// An open journal being appended to.
#[derive(Debug)]
pub struct JournalWriter {
    path: PathBuf,
    out: BufWriter<File>,
    unsynced: u32,
}

/// Lines between fsyncs: a crash loses at most this many acknowledgements (those blocks
/// are sent again on resume), while syncing every line would cost a disk flush per block.
const SYNC_EVERY_LINES: u32 = 256;

impl JournalWriter {
    /// Opens `path` for appending (creating it and its folder).
    pub fn open(path: &Path) -> Result<Self> {
        let io = |op| {
            move |source| Error::Io {
                path: path.display().to_string(),
                op,
                source,
            }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("creating the journal folder"))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io("opening the journal"))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            unsynced: 0,
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record; `sync` forces it to disk now (start, started, completed).
    pub fn append(&mut self, record: &Record, sync: bool) -> Result<()> {
        let path = self.path.display().to_string();
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| Error::Io { path, op, source }
        };
        let mut line = serde_json::to_vec(record)
            .map_err(|e| Error::InvalidInput(format!("journal record: {e}")))?;
        line.push(b'\n');
        self.out
            .write_all(&line)
            .map_err(io("writing the journal"))?;
        self.unsynced += 1;
        if sync || self.unsynced >= SYNC_EVERY_LINES {
            self.out.flush().map_err(io("writing the journal"))?;
            self.out
                .get_ref()
                .sync_data()
                .map_err(io("syncing the journal"))?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Flushes what is buffered (on interruption).
    pub fn flush(&mut self) -> Result<()> {
        let path = self.path.display().to_string();
        self.out.flush().map_err(|source| Error::Io {
            path,
            op: "writing the journal",
            source,
        })
    }

    /// After `completed`: renames a journal of the journal folder to `<snapshot id>.jsonl`
    /// (a `--journal` file stays where the user put it). Returns the final path.
    pub fn finish(mut self, location: &JournalLocation, snapshot_id: &str) -> Result<PathBuf> {
        self.flush()?;
        if location.file.is_some() {
            return Ok(self.path);
        }
        let target = location.dir.join(format!("{snapshot_id}.jsonl"));
        std::fs::rename(&self.path, &target).map_err(|source| Error::Io {
            path: self.path.display().to_string(),
            op: "renaming the completed journal",
            source,
        })?;
        Ok(target)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_reads_back_what_was_appended_and_ignores_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let location = JournalLocation {
            dir: dir.path().to_path_buf(),
            file: None,
        };
        let source = SourceIdentity {
            location: "/x.vmdk".into(),
            size_bytes: 5,
            fingerprint: "f".into(),
        };
        let path = location.new_pending(&source, "tok");
        let mut w = JournalWriter::open(&path).unwrap();
        let start = StartRecord {
            source: source.clone(),
            client_token: "tok".into(),
            parent_snapshot_id: None,
            volume_size_gib: 1,
        };
        w.append(&Record::Start(start.clone()), true).unwrap();
        w.append(
            &Record::Started {
                snapshot_id: "snap-1".into(),
            },
            true,
        )
        .unwrap();
        w.append(
            &Record::Block {
                index: 3,
                sha256: "a".into(),
            },
            false,
        )
        .unwrap();
        w.append(
            &Record::Same {
                index: 4,
                sha256: "b".into(),
            },
            false,
        )
        .unwrap();
        w.flush().unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"block\":{\"ind")
            .unwrap();
        assert_eq!(location.find_pending(&source).unwrap(), Some(path.clone()));
        let state = JournalState::read(&path).unwrap();
        assert_eq!(state.start, Some(start));
        assert_eq!(state.snapshot_id.as_deref(), Some("snap-1"));
        assert_eq!(
            state.acknowledged.clone().into_iter().collect::<Vec<_>>(),
            vec![(3, "a".to_string())]
        );
        assert_eq!(state.snapshot_digests(), None);
    }

    #[test]
    fn a_completed_journal_is_found_by_snapshot_id() {
        let dir = tempfile::tempdir().unwrap();
        let location = JournalLocation {
            dir: dir.path().to_path_buf(),
            file: None,
        };
        let source = SourceIdentity {
            location: "/y.raw".into(),
            size_bytes: 5,
            fingerprint: "f".into(),
        };
        let mut w = JournalWriter::open(&location.new_pending(&source, "t")).unwrap();
        w.append(
            &Record::Block {
                index: 1,
                sha256: "a".into(),
            },
            false,
        )
        .unwrap();
        w.append(
            &Record::Same {
                index: 2,
                sha256: "b".into(),
            },
            false,
        )
        .unwrap();
        w.append(
            &Record::Completed {
                snapshot_id: "snap-9".into(),
                checksums_complete: true,
            },
            true,
        )
        .unwrap();
        w.finish(&location, "snap-9").unwrap();
        assert_eq!(location.find_pending(&source).unwrap(), None);
        let state = JournalState::read(&location.completed("snap-9").unwrap()).unwrap();
        assert_eq!(state.snapshot_digests().unwrap().len(), 2);
    }
}
