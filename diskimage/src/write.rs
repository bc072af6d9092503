//! Writing images: choosing a writer for an output format, full conversion, and
//! differencing conversion against a parent.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use bytes::BytesMut;
use rehost_core::{Extent, ExtentKind};

use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::map::MapWalker;
use crate::sink::{ExtentSink, ParentLink, WriteSummary};
use crate::stream::{Coalescer, StreamOptions, for_each_extent};

/// The formats we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Plain bytes.
    Raw,
    /// streamOptimized VMDK (what vSphere and VM Import accept); with a parent, a delta
    /// child that is still written forward-only (for uploads).
    VmdkStream,
    /// monolithicSparse VMDK; with a parent, a delta child.
    VmdkSparse,
    /// Fixed VHD (Azure's format).
    VhdFixed,
    /// Dynamic VHD; with a parent, a differencing VHD.
    VhdDynamic,
    /// Dynamic VHDX.
    Vhdx,
}

impl OutputFormat {
    /// Every format, with its command-line name.
    pub const ALL: [(&'static str, OutputFormat); 6] = [
        ("raw", OutputFormat::Raw),
        ("vmdk-stream", OutputFormat::VmdkStream),
        ("vmdk-sparse", OutputFormat::VmdkSparse),
        ("vhd-fixed", OutputFormat::VhdFixed),
        ("vhd-dynamic", OutputFormat::VhdDynamic),
        ("vhdx", OutputFormat::Vhdx),
    ];

    /// Whether the format can record a parent.
    pub fn supports_parent(self) -> bool {
        matches!(
            self,
            OutputFormat::VmdkStream | OutputFormat::VmdkSparse | OutputFormat::VhdDynamic
        )
    }

    /// Whether the format can be written to a forward-only output (see [`create_stream`]).
    pub fn is_forward_only(self) -> bool {
        matches!(self, OutputFormat::VmdkStream)
    }
}

impl FromStr for OutputFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, f)| *f)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|(n, _)| *n).collect();
                Error::InvalidInput(format!(
                    "unknown output format {s:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// Creates `path` and a writer of `format` into it.
pub fn create(
    path: &Path,
    format: OutputFormat,
    virtual_size: u64,
    parent: Option<ParentLink>,
) -> Result<Box<dyn ExtentSink>> {
    let name = path.display().to_string();
    if parent.is_some() && !format.supports_parent() {
        return Err(Error::InvalidInput(format!(
            "{name}: a differencing image can be written as vmdk-stream, vmdk-sparse or vhd-dynamic, not {format:?}"
        )));
    }
    let file = File::create(path).map_err(|source| Error::Open {
        file: name.clone(),
        source,
    })?;
    Ok(match format {
        OutputFormat::Raw => Box::new(crate::raw::RawWriter::new(file, virtual_size, name)),
        OutputFormat::VmdkStream => Box::new(crate::vmdk::StreamOptimizedWriter::with_parent(
            BufWriter::with_capacity(1 << 20, file),
            virtual_size,
            parent,
            name,
        )?),
        OutputFormat::VmdkSparse => Box::new(crate::vmdk::SparseWriter::new(
            file,
            virtual_size,
            parent,
            name,
        )?),
        OutputFormat::VhdFixed => Box::new(crate::vhd::VhdWriter::new(
            file,
            virtual_size,
            crate::vhd::VhdKind::Fixed,
            name,
        )?),
        OutputFormat::VhdDynamic => {
            let kind = match parent {
                Some(link) => crate::vhd::VhdKind::Differencing(link),
                None => crate::vhd::VhdKind::Dynamic,
            };
            Box::new(crate::vhd::VhdWriter::new(file, virtual_size, kind, name)?)
        }
        OutputFormat::Vhdx => Box::new(crate::vhdx::VhdxWriter::new(
            file,
            virtual_size,
            None,
            name,
        )?),
    })
}

/// A writer of `format` into a forward-only output `out` (a pipe, an upload, `&mut` one so it
/// can be finished after the sink): only formats
/// that never seek back ([`OutputFormat::is_forward_only`]). `name` is used in errors and,
/// for a VMDK, its last component as the extent's file name. The caller buffers `out` if
/// small writes are costly; the writer itself writes whole grains and tables.
pub fn create_stream<'a, W: std::io::Write + Send + 'a>(
    out: W,
    format: OutputFormat,
    virtual_size: u64,
    parent: Option<ParentLink>,
    name: String,
) -> Result<Box<dyn ExtentSink + Send + 'a>> {
    match format {
        OutputFormat::VmdkStream => Ok(Box::new(crate::vmdk::StreamOptimizedWriter::with_parent(
            out,
            virtual_size,
            parent,
            name,
        )?)),
        _ => Err(Error::InvalidInput(format!(
            "{name}: {format:?} cannot be written forward-only; use vmdk-stream"
        ))),
    }
}

/// The largest output `format` can take for a `virtual_size`-byte disk, for formats
/// written forward-only (to size an upload: S3 needs the part size before the first
/// part). `None` for the others.
pub fn max_stream_bytes(format: OutputFormat, virtual_size: u64) -> Option<u64> {
    match format {
        OutputFormat::VmdkStream => {
            Some(crate::vmdk::StreamOptimizedWriter::<std::io::Sink>::max_file_bytes(virtual_size))
        }
        _ => None,
    }
}

/// How a child will name `parent` (opened from `parent_path`) when written at `child_path`.
pub fn parent_link(child_path: &Path, parent_path: &Path, parent: &Disk) -> Result<ParentLink> {
    let info = parent.top().info();
    let id = info.id.clone().ok_or_else(|| {
        Error::InvalidInput(format!(
            "{}: a {} image has no identity a child could record; use a vmdk, vhd or vhdx parent",
            parent_path.display(),
            info.format
        ))
    })?;
    let absolute = std::fs::canonicalize(parent_path).map_err(|source| Error::Open {
        file: parent_path.display().to_string(),
        source,
    })?;
    let child_dir = child_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let child_dir = std::fs::canonicalize(&child_dir).unwrap_or(child_dir);
    Ok(ParentLink {
        relative_path: relative_path(&child_dir, &absolute),
        absolute_path: absolute.to_string_lossy().into_owned(),
        id,
        virtual_size_bytes: info.virtual_size_bytes,
    })
}

/// `target` relative to the folder `from`, both absolute.
fn relative_path(from: &Path, target: &Path) -> String {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = target.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel.to_string_lossy().into_owned()
}

/// Writes all of `disk` into `sink`. Zero and unallocated areas are left out.
pub fn convert(
    disk: &Disk,
    sink: Box<dyn ExtentSink + '_>,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<WriteSummary> {
    let mut sink = sink;
    let options = StreamOptions {
        threads,
        ..StreamOptions::default()
    };
    let mut coalescer = Coalescer::default();
    for_each_extent(disk, &options, |extent| {
        let end = extent.end();
        if let Some(done) = coalescer.push(extent) {
            sink.put(done)?;
        }
        progress(end);
        Ok(())
    })?;
    if let Some(last) = coalescer.finish() {
        sink.put(last)?;
    }
    sink.finish()
}

/// Writes all of `disk` as a raw file at `path`, reading and writing on `threads` threads
/// at once with positional writes (a raw file needs no order), holes left unwritten.
pub fn convert_to_raw_file(
    disk: &Disk,
    path: &Path,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<WriteSummary> {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};

    let name = path.display().to_string();
    let file = File::create(path).map_err(|source| Error::Open {
        file: name.clone(),
        source,
    })?;
    let io_err = |offset: u64| {
        let name = name.clone();
        move |source| Error::Io {
            file: name,
            op: "write",
            structure: "data",
            offset,
            source,
        }
    };
    let (data_bytes, done) = (AtomicU64::new(0), AtomicU64::new(0));
    let options = StreamOptions {
        threads,
        ..StreamOptions::default()
    };
    crate::stream::for_each_extent_unordered(disk, &options, |extent| {
        if let Extent::Data { offset, data } = &extent {
            file.write_all_at(data, *offset).map_err(io_err(*offset))?;
            data_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        progress(done.fetch_add(extent.len(), Ordering::Relaxed) + extent.len());
        Ok(())
    })?;
    let size = disk.virtual_size();
    file.set_len(size).map_err(io_err(size))?;
    Ok(WriteSummary {
        data_bytes: data_bytes.into_inner(),
        file_bytes: size,
    })
}

/// Writes into `sink` only what differs between `disk` and `parent`, in units of the
/// sink's alignment: a differing unit as `Data` (or `Zero` when it is now all zero, which
/// a delta must still record), the rest as `Unchanged`.
pub fn convert_delta(
    disk: &Disk,
    parent: &Disk,
    sink: Box<dyn ExtentSink + '_>,
    progress: &mut dyn FnMut(u64),
) -> Result<WriteSummary> {
    let mut sink = sink;
    let unit = sink.alignment().max(512);
    // Chunks are whole units so that a unit never straddles two reads.
    let chunk = (1u64 << 20).div_ceil(unit) * unit;
    let size = disk.virtual_size();
    let mut coalescer = Coalescer::default();
    let mut emit = |e: Extent, sink: &mut Box<dyn ExtentSink + '_>| -> Result<()> {
        if let Some(done) = coalescer.push(e) {
            sink.put(done)?;
        }
        Ok(())
    };
    let mut new_buf = BytesMut::new();
    let mut old_buf = vec![0u8; 0];
    for (offset, len) in MapWalker::with_window(size, chunk) {
        let new_has_data = has_data(disk, offset, len)?;
        let old_len = len.min(parent.virtual_size().saturating_sub(offset));
        let old_len_usize =
            usize::try_from(old_len).map_err(|_| Error::InvalidInput("chunk too large".into()))?;
        let old_has_data = old_len > 0 && has_data(parent, offset, old_len)?;
        if !new_has_data && !old_has_data {
            emit(Extent::Unchanged { offset, len }, &mut sink)?;
            progress(offset + len);
            continue;
        }
        let len_usize =
            usize::try_from(len).map_err(|_| Error::InvalidInput("chunk too large".into()))?;
        new_buf.clear();
        new_buf.resize(len_usize, 0);
        disk.read_at(&mut new_buf, offset)?;
        old_buf.clear();
        old_buf.resize(len_usize, 0);
        if old_len > 0 {
            parent.read_at(&mut old_buf[..old_len_usize], offset)?;
        }
        let mut data = new_buf.split().freeze();
        let mut pos = 0usize;
        while pos < len_usize {
            let n = usize::try_from(unit)
                .unwrap_or(usize::MAX)
                .min(len_usize - pos);
            let unit_offset = offset + pos as u64;
            let piece = data.split_to(n);
            if piece[..] == old_buf[pos..pos + n] {
                emit(
                    Extent::Unchanged {
                        offset: unit_offset,
                        len: n as u64,
                    },
                    &mut sink,
                )?;
            } else if crate::sink::is_zero(&piece) {
                emit(
                    Extent::Zero {
                        offset: unit_offset,
                        len: n as u64,
                    },
                    &mut sink,
                )?;
            } else {
                emit(
                    Extent::Data {
                        offset: unit_offset,
                        data: piece,
                    },
                    &mut sink,
                )?;
            }
            pos += n;
        }
        progress(offset + len);
    }
    if let Some(last) = coalescer.finish() {
        sink.put(last)?;
    }
    sink.finish()
}

fn has_data(disk: &Disk, offset: u64, len: u64) -> Result<bool> {
    Ok(disk
        .map_range(offset, len)?
        .iter()
        .any(|e| e.kind == ExtentKind::Data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/b/p.vmdk")),
            "p.vmdk"
        );
        assert_eq!(
            relative_path(Path::new("/a/b"), Path::new("/a/c/p.vmdk")),
            "../c/p.vmdk"
        );
    }

    #[test]
    fn output_formats_parse_by_name() {
        assert_eq!("vhdx".parse::<OutputFormat>().unwrap(), OutputFormat::Vhdx);
        assert!(
            "qcow2"
                .parse::<OutputFormat>()
                .unwrap_err()
                .to_string()
                .contains("vmdk-stream")
        );
    }
}
