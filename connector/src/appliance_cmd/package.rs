//! `rehost appliance package`: the appliance's raw disk (from `appliance-image/build.sh`)
//! into the three hypervisors' images, with rehost's own writers:
//! - `<name>-<version>.ova`: the OVF descriptor (rendered from the checked-in template and
//!   appliance.toml), its SHA-256 manifest and a streamOptimized VMDK;
//! - `<name>-<version>.vhdx`: a dynamic VHDX for Hyper-V Generation 2;
//! - `<name>-<version>.vhd`: a fixed VHD for Azure, its virtual size a whole number of MiB.
//!
//! Every output is read back through rehost's own readers and compared with the raw disk's
//! SHA-256 before the command succeeds.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use rehost_appliance::{Manifest, ova, ovf, sizes};
use rehost_diskimage::Disk;
use rehost_diskimage::write::{OutputFormat, convert, create};
use serde::Serialize;

use crate::output::{OutputMode, print_json};

/// `rehost appliance package`.
#[derive(Debug, Args)]
pub struct PackageArgs {
    /// The appliance's manifest.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "appliance-image/appliance.toml"
    )]
    pub manifest: PathBuf,
    /// The raw disk `build.sh` made.
    #[arg(long, value_name = "FILE")]
    pub disk: PathBuf,
    /// Where the OVA, VHDX and VHD go.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Threads reading and compressing (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputMode,
}

/// What `package` made.
#[derive(Debug, Serialize)]
pub struct PackageReport {
    pub disk_sha256: String,
    pub outputs: Vec<Output>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Output {
    pub hypervisor: &'static str,
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

pub fn run(args: PackageArgs) -> Result<ExitCode> {
    let started = std::time::Instant::now();
    let manifest = Manifest::load(&args.manifest)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let disk_path = args.disk.to_string_lossy().into_owned();
    let raw = Disk::open(&disk_path).with_context(|| format!("opening {disk_path}"))?;
    let size = raw.virtual_size();
    let expected = sizes::capacity_mib(size).with_context(|| disk_path.clone())?;
    if expected != manifest.disk.size_mib {
        bail!(
            "{disk_path} is {expected} MiB, the manifest's [disk] size_mib is {}: was it built from this manifest?",
            manifest.disk.size_mib
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let quiet = args.output == OutputMode::Json;
    let disk_sha256 = hex::encode(
        rehost_diskimage::checksum::sha256(&raw, threads, &mut |_| {})
            .with_context(|| format!("hashing {disk_path}"))?,
    );

    let mut outputs = Vec::new();
    // The OVA: its VMDK is written beside it first (a tar member's size comes before its
    // bytes), then packed and removed.
    let vmdk_name = format!(
        "{}-{}-disk1.vmdk",
        manifest.image.name, manifest.image.version
    );
    let vmdk = args.out.join(&vmdk_name);
    let written = convert_to(&raw, &vmdk, OutputFormat::VmdkStream, size, threads, quiet)?;
    check_reads_back(&vmdk, &disk_sha256, threads)?;
    let descriptor = ovf::render(
        &manifest,
        &ovf::DiskFile {
            name: vmdk_name.clone(),
            file_bytes: std::fs::metadata(&vmdk)?.len(),
            capacity_bytes: size,
            populated_bytes: written,
        },
    )?;
    let ova_path = args.out.join(manifest.output_name("ova"));
    ova::write(
        &ova_path,
        &manifest.output_name("ovf"),
        &descriptor,
        &[(vmdk_name, vmdk.clone())],
    )?;
    std::fs::remove_file(&vmdk).with_context(|| format!("removing {}", vmdk.display()))?;
    ova::Ova::open(&ova_path)?.verify()?;
    outputs.push(output("vSphere (OVA)", &ova_path)?);

    let vhdx = args.out.join(manifest.output_name("vhdx"));
    convert_to(&raw, &vhdx, OutputFormat::Vhdx, size, threads, quiet)?;
    check_reads_back(&vhdx, &disk_sha256, threads)?;
    outputs.push(output("Hyper-V Generation 2 (VHDX)", &vhdx)?);

    let vhd = args.out.join(manifest.output_name("vhd"));
    // The disk is a whole number of MiB (checked above), which is what Azure demands of a
    // fixed VHD's virtual size.
    let azure_size = sizes::azure_vhd_bytes(size)?;
    debug_assert_eq!(azure_size, size);
    convert_to(&raw, &vhd, OutputFormat::VhdFixed, size, threads, quiet)?;
    let vhd_len = std::fs::metadata(&vhd)?.len();
    if vhd_len != sizes::fixed_vhd_file_bytes(azure_size) {
        bail!(
            "{}: {vhd_len} bytes, a fixed VHD of {azure_size} must be {}",
            vhd.display(),
            sizes::fixed_vhd_file_bytes(azure_size)
        );
    }
    check_reads_back(&vhd, &disk_sha256, threads)?;
    outputs.push(output("Azure (fixed VHD)", &vhd)?);

    let report = PackageReport {
        disk_sha256,
        outputs,
        seconds: started.elapsed().as_secs_f64(),
    };
    match args.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => {
            for o in &report.outputs {
                println!(
                    "{:<28} {} ({:.1} MiB)",
                    o.hypervisor,
                    o.path,
                    o.bytes as f64 / f64::from(1u32 << 20)
                );
            }
            println!(
                "each reads back as the disk (SHA-256 {}); {:.1} s",
                report.disk_sha256, report.seconds
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `raw` (of `virtual_size` bytes) as `format` at `path`; answers the data bytes
/// stored.
fn convert_to(
    raw: &Disk,
    path: &Path,
    format: OutputFormat,
    virtual_size: u64,
    threads: usize,
    quiet: bool,
) -> Result<u64> {
    if !quiet {
        eprintln!("writing {}…", path.display());
    }
    let sink = create(path, format, virtual_size, None)
        .with_context(|| format!("creating {}", path.display()))?;
    let summary = convert(raw, sink, threads, &mut |_| {})
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(summary.data_bytes)
}

/// Reads `path` back through rehost's readers and checks it is the disk (`sha256`): the
/// images must hold exactly what was built.
fn check_reads_back(path: &Path, sha256: &str, threads: usize) -> Result<()> {
    let name = path.to_string_lossy();
    let disk = Disk::open(&name).with_context(|| format!("reading back {name}"))?;
    let actual = hex::encode(
        rehost_diskimage::checksum::sha256(&disk, threads, &mut |_| {})
            .with_context(|| format!("hashing {name}"))?,
    );
    if actual != sha256 {
        bail!("{name} reads back with SHA-256 {actual}, the disk's is {sha256}");
    }
    Ok(())
}

fn output(hypervisor: &'static str, path: &Path) -> Result<Output> {
    Ok(Output {
        hypervisor,
        path: path.display().to_string(),
        bytes: std::fs::metadata(path)?.len(),
        sha256: ova::sha256_file(path)?,
    })
}
