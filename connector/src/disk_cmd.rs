//! `rehost disk`: look inside, hash and convert disk images.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use rehost_diskimage::write::{self, OutputFormat};
use rehost_diskimage::{Disk, ExtentKind, Layer, LocalFs, MapExtent, layer, map::MapWalker};
use serde::Serialize;

use crate::output::{OutputMode, print_json};
use crate::progress::bytes_bar;

/// The `disk` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Format, sizes, allocation unit, parent chain and any inconsistency of an image.
    Inspect {
        /// The image (its format is read from its bytes, not its name).
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// The allocation map of an image (following its parents): data, zero, unallocated.
    Map {
        /// The image.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// SHA-256 of the whole virtual disk, as `qemu-img convert -O raw` + `sha256sum` would print.
    Checksum {
        /// The image.
        file: PathBuf,
        /// Print the block-list SHA-256 instead (the SHA-256 of the SHA-256s of every
        /// 512 KiB block, as export manifests record a disk's content).
        #[arg(long)]
        blocks: bool,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        threads: Threads,
    },
    /// Convert an image to another format; with --parent, write only what differs from PARENT.
    Convert {
        /// The image to read.
        input: PathBuf,
        /// The image to write (replaced if it exists).
        #[arg(value_name = "OUT")]
        out: PathBuf,
        /// Output format.
        #[arg(long, value_parser = parse_output_format)]
        to: OutputFormat,
        /// Write a differencing image (vmdk-sparse, vmdk-stream or vhd-dynamic) whose parent is PARENT.
        #[arg(long)]
        parent: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        threads: Threads,
    },
}

/// Options every disk command takes.
#[derive(Debug, Args)]
pub struct Common {
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    output: OutputMode,
}

/// Reader threads for commands that stream a whole disk.
#[derive(Debug, Args)]
pub struct Threads {
    /// Threads reading and decoding the image (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

impl Threads {
    fn get(&self) -> usize {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
            .max(1)
    }
}

fn parse_output_format(s: &str) -> Result<OutputFormat, String> {
    s.parse()
        .map_err(|e: rehost_diskimage::Error| e.to_string())
}

/// Runs a disk command.
pub fn run(command: DiskCommand) -> Result<ExitCode> {
    match command {
        DiskCommand::Inspect { file, common } => inspect(&file, common.output),
        DiskCommand::Map { file, common } => map(&file, common.output),
        DiskCommand::Checksum {
            file,
            blocks,
            common,
            threads,
        } => checksum(&file, blocks, common.output, threads.get()),
        DiskCommand::Convert {
            input,
            out,
            to,
            parent,
            common,
            threads,
        } => convert(
            &input,
            &out,
            to,
            parent.as_deref(),
            common.output,
            threads.get(),
        ),
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{}: path is not valid UTF-8", path.display()))
}

fn open(path: &Path) -> Result<Disk> {
    Ok(Disk::open(path_str(path)?)?)
}

#[derive(Debug, Serialize)]
struct LayerReport {
    path: String,
    format: layer::Format,
    subformat: String,
    virtual_size_bytes: u64,
    allocated_bytes: u64,
    cluster_size_bytes: Option<u64>,
    id: Option<layer::ImageId>,
    warnings: Vec<String>,
}

#[derive(Debug, Serialize)]
struct InspectReport {
    #[serde(flatten)]
    top: LayerReport,
    /// The parent's path, if the image has one and it was found.
    parent: Option<String>,
    /// Every image of the chain, the inspected one first.
    chain: Vec<LayerReport>,
    /// Everything found wrong, including a parent chain that cannot be followed.
    inconsistencies: Vec<String>,
}

fn layer_report(path: &str, layer: &dyn Layer) -> Result<LayerReport> {
    let info = layer.info();
    Ok(LayerReport {
        path: path.to_owned(),
        format: info.format,
        subformat: info.subformat.clone(),
        virtual_size_bytes: info.virtual_size_bytes,
        allocated_bytes: layer::allocated_bytes(layer)
            .with_context(|| format!("{path}: reading the allocation map"))?,
        cluster_size_bytes: info.cluster_size_bytes,
        id: info.id.clone(),
        warnings: info.warnings.clone(),
    })
}

fn inspect(path: &Path, output: OutputMode) -> Result<ExitCode> {
    let name = path_str(path)?;
    let fs = LocalFs;
    let top: Arc<dyn Layer> =
        rehost_diskimage::open_layer(&fs, rehost_diskimage::FileSystem::open(&fs, name)?)?;
    let mut inconsistencies: Vec<String> = top.info().warnings.clone();
    let mut chain = Vec::new();
    let mut parent = None;
    match Disk::with_parents(&fs, name, top.clone()) {
        Ok(disk) => {
            for (layer, layer_path) in disk.layers().iter().zip(disk.paths()) {
                let report = layer_report(layer_path, layer.as_ref())?;
                if layer_path != name {
                    inconsistencies
                        .extend(report.warnings.iter().map(|w| format!("{layer_path}: {w}")));
                }
                chain.push(report);
            }
            parent = disk.paths().get(1).cloned();
        }
        Err(e) => {
            inconsistencies.push(format!("{e:#}"));
            chain.push(layer_report(name, top.as_ref())?);
        }
    }
    let report = InspectReport {
        top: layer_report(name, top.as_ref())?,
        parent,
        chain,
        inconsistencies,
    };
    match output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => print_inspect(&report),
    }
    Ok(if report.inconsistencies.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn print_inspect(r: &InspectReport) {
    let t = &r.top;
    println!("file:              {}", t.path);
    println!("format:            {} ({})", t.format, t.subformat);
    println!("virtual size:      {} bytes", t.virtual_size_bytes);
    println!("allocated:         {} bytes", t.allocated_bytes);
    if let Some(c) = t.cluster_size_bytes {
        println!("cluster size:      {c} bytes");
    }
    if let Some(p) = &r.parent {
        println!("parent:            {p}");
    }
    if r.chain.len() > 1 {
        println!("chain:");
        for l in &r.chain {
            println!(
                "  {} ({} {}, {} bytes allocated)",
                l.path, l.format, l.subformat, l.allocated_bytes
            );
        }
    }
    if r.inconsistencies.is_empty() {
        println!("inconsistencies:   none");
    } else {
        println!("inconsistencies:");
        for i in &r.inconsistencies {
            println!("  {i}");
        }
    }
}

fn map(path: &Path, output: OutputMode) -> Result<ExitCode> {
    let disk = open(path)?;
    let mut extents: Vec<MapExtent> = Vec::new();
    for (offset, len) in MapWalker::new(disk.virtual_size()) {
        for e in disk.map_range(offset, len)? {
            match extents.last_mut() {
                Some(last) if last.kind == e.kind => last.len += e.len,
                _ => extents.push(e),
            }
        }
    }
    match output {
        OutputMode::Json => print_json(&extents)?,
        OutputMode::Table => {
            println!("{:>16} {:>16} kind", "offset", "length");
            for e in &extents {
                let kind = match e.kind {
                    ExtentKind::Data => "data",
                    ExtentKind::Zero => "zero",
                    ExtentKind::Unallocated => "unallocated",
                };
                println!("{:>16} {:>16} {kind}", e.offset, e.len);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct ChecksumReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_list_sha256: Option<String>,
    virtual_size_bytes: u64,
}

fn checksum(path: &Path, blocks: bool, output: OutputMode, threads: usize) -> Result<ExitCode> {
    use rehost_diskimage::checksum;
    let disk = open(path)?;
    let bar = bytes_bar(disk.virtual_size(), "checksum", output == OutputMode::Json);
    let mut progress = |done| bar.set_position(done);
    let (sha256, block_list_sha256) = if blocks {
        let digests = checksum::block_digests(&disk, threads, &mut progress)?;
        (
            None,
            Some(hex::encode(checksum::block_list_digest(&digests))),
        )
    } else {
        let digest = checksum::sha256(&disk, threads, &mut progress)?;
        (Some(hex::encode(digest)), None)
    };
    bar.finish_and_clear();
    let report = ChecksumReport {
        sha256,
        block_list_sha256,
        virtual_size_bytes: disk.virtual_size(),
    };
    match output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => println!(
            "{}",
            report
                .sha256
                .as_deref()
                .or(report.block_list_sha256.as_deref())
                .unwrap_or_default()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct ConvertReport {
    input: String,
    output: String,
    format: String,
    parent: Option<String>,
    virtual_size_bytes: u64,
    data_bytes: u64,
    file_bytes: u64,
}

fn convert(
    input: &Path,
    output_path: &Path,
    to: OutputFormat,
    parent: Option<&Path>,
    output: OutputMode,
    threads: usize,
) -> Result<ExitCode> {
    let disk = open(input)?;
    if same_file(input, output_path)
        || disk
            .paths()
            .iter()
            .any(|p| same_file(Path::new(p), output_path))
    {
        bail!(
            "{}: refusing to overwrite an image being read",
            output_path.display()
        );
    }
    let parent_disk = parent.map(open).transpose()?;
    if let Some(p) = &parent_disk {
        if p.paths()
            .iter()
            .any(|p| same_file(Path::new(p), output_path))
        {
            bail!(
                "{}: refusing to overwrite the parent chain",
                output_path.display()
            );
        }
    }
    let bar = bytes_bar(disk.virtual_size(), "convert", output == OutputMode::Json);
    let mut on_progress = |done| bar.set_position(done);
    let result = (|| match (parent, &parent_disk) {
        (Some(parent_path), Some(parent_disk)) => {
            let link = write::parent_link(output_path, parent_path, parent_disk)?;
            let sink = write::create(output_path, to, disk.virtual_size(), Some(link))?;
            write::convert_delta(&disk, parent_disk, sink, &mut on_progress)
        }
        _ if to == OutputFormat::Raw => {
            write::convert_to_raw_file(&disk, output_path, threads, &|done| bar.set_position(done))
        }
        _ => {
            let sink = write::create(output_path, to, disk.virtual_size(), None)?;
            write::convert(&disk, sink, threads, &mut on_progress)
        }
    })();
    bar.finish_and_clear();
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            // A half-written image must not be mistaken for a good one.
            let _ = std::fs::remove_file(output_path);
            return Err(e).with_context(|| {
                format!(
                    "converting {} to {}",
                    input.display(),
                    output_path.display()
                )
            });
        }
    };
    let name = OutputFormat::ALL
        .iter()
        .find(|(_, f)| *f == to)
        .map_or("?", |(n, _)| n);
    let report = ConvertReport {
        input: input.display().to_string(),
        output: output_path.display().to_string(),
        format: name.to_owned(),
        parent: parent.map(|p| p.display().to_string()),
        virtual_size_bytes: disk.virtual_size(),
        data_bytes: summary.data_bytes,
        file_bytes: summary.file_bytes,
    };
    match output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => println!(
            "wrote {} ({}): {} bytes of data in a {}-byte file",
            report.output, report.format, report.data_bytes, report.file_bytes
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
