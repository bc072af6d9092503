//! `rehost servers import-catalog|list` and `rehost config check`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::aws_args::runtime;
use crate::config::{Config, SourceConfig};
use crate::output::{OutputMode, print_json};
use crate::store::{SharedStore, Store};

/// The config file and output options every source command takes.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// The config file (else $REHOST_CONFIG, else ./rehost.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputMode,
}

#[derive(Debug, Subcommand)]
pub enum ServersCommand {
    /// Read every VM of a source into the store's catalog (replacing that source's entries).
    ImportCatalog {
        /// The source, as named in the config.
        #[arg(long)]
        source: String,
        #[command(flatten)]
        common: ConfigArgs,
    },
    /// List the catalog.
    List {
        /// Only this source's VMs.
        #[arg(long)]
        source: Option<String>,
        #[command(flatten)]
        common: ConfigArgs,
    },
    /// Tests only: adds a made-up VM to a source's catalog without asking the source, so
    /// that the API and job commands can be tested without a vCenter.
    #[command(hide = true)]
    AddTestServer {
        /// The source (as named in the config) the VM is catalogued under.
        #[arg(long)]
        source: String,
        /// The VM's name.
        #[arg(long)]
        name: String,
        /// The VM's id in the source (default: `test-<name>`).
        #[arg(long)]
        vm_id: Option<String>,
        #[command(flatten)]
        common: ConfigArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and try every source: reachable, logged in, version, and the
    /// privileges replication needs that the account lacks.
    Check {
        #[command(flatten)]
        common: ConfigArgs,
    },
}

/// The vSphere privileges replication needs (the SMS connector role, plus CBT and disk reads).
pub const VSPHERE_PRIVILEGES: &[&str] = &[
    "Datastore.Browse",
    "Datastore.FileManagement",
    "VirtualMachine.State.CreateSnapshot",
    "VirtualMachine.State.RemoveSnapshot",
    "VirtualMachine.Config.ChangeTracking",
    "VirtualMachine.Provisioning.DiskRandomRead",
    "VApp.Export",
];

pub fn run(cmd: ServersCommand) -> Result<ExitCode> {
    match cmd {
        ServersCommand::ImportCatalog { source, common } => import_catalog(&source, &common),
        ServersCommand::List { source, common } => list(source.as_deref(), &common),
        ServersCommand::AddTestServer {
            source,
            name,
            vm_id,
            common,
        } => add_test_server(&source, &name, vm_id, &common),
    }
}

/// What importing one source's catalog found.
#[derive(Debug, Serialize)]
pub struct ImportReport {
    pub source: String,
    pub servers: usize,
    pub unsupported: usize,
}

/// Reads every VM of `source` into the store's catalog, replacing that source's entries:
/// what `servers import-catalog` and the API's ImportServerCatalog both do.
pub async fn import_source_catalog(
    config: &Config,
    source: &SourceConfig,
    store: &SharedStore,
) -> Result<ImportReport> {
    let vms = match crate::sources::connect(config, source).await? {
        crate::sources::Connected::Vsphere(client) => {
            let vms = client.list_vms().await;
            let _ = client.logout().await;
            vms?
        }
        crate::sources::Connected::Azure(azure) => azure
            .client()
            .list_vms()
            .await
            .with_context(|| format!("source {:?}", source.name))?
            .into_iter()
            .map(|vm| vm.info)
            .collect(),
        crate::sources::Connected::Hyperv(hyperv) => hyperv
            .client()
            .vms(hyperv.host_label())
            .await
            .with_context(|| format!("source {:?}", source.name))?
            .into_iter()
            .map(|vm| vm.info)
            .collect(),
    };
    let report = ImportReport {
        source: source.name.clone(),
        servers: vms.len(),
        unsupported: vms
            .iter()
            .filter(|v| !v.unsupported_reasons().is_empty())
            .count(),
    };
    let (name, kind, url) = (
        source.name.clone(),
        source.kind.to_string(),
        source.endpoint(),
    );
    let store = store.clone();
    // SQLite blocks; keep it off the async workers.
    tokio::task::spawn_blocking(move || {
        store.with(|s| s.replace_catalog(&name, &kind, &url, &vms))
    })
    .await??;
    Ok(report)
}

fn import_catalog(source_name: &str, common: &ConfigArgs) -> Result<ExitCode> {
    let config = Config::locate(common.config.as_deref())?;
    let source = config.source(source_name)?.clone();
    let store = SharedStore::open(&config.store_path())?;
    let report = runtime()?.block_on(import_source_catalog(&config, &source, &store))?;
    match common.output {
        OutputMode::Json => print_json(&report)?,
        OutputMode::Table => println!(
            "imported {} server(s) from {} ({} with unsupported disks)",
            report.servers, report.source, report.unsupported
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn list(source: Option<&str>, common: &ConfigArgs) -> Result<ExitCode> {
    let config = Config::locate(common.config.as_deref())?;
    if let Some(name) = source {
        config.source(name)?;
    }
    let store = Store::open(&config.store_path())?;
    let servers = store.servers(source)?;
    match common.output {
        OutputMode::Json => print_json(&servers)?,
        OutputMode::Table => {
            println!(
                "{:<19} {:<8} {:<24} {:<38} {:<12} {:>4} {:>8} {:<5} {:>5} {:>10}  NOTE",
                "SERVER_ID",
                "SOURCE",
                "NAME",
                "VM_ID",
                "POWER",
                "CPU",
                "MEM_MIB",
                "FW",
                "DISKS",
                "GIB"
            );
            for s in &servers {
                let gib: u64 = s.info.disks.iter().map(|d| d.capacity_bytes).sum::<u64>() >> 30;
                println!(
                    "{:<19} {:<8} {:<24} {:<38} {:<12} {:>4} {:>8} {:<5} {:>5} {:>10}  {}",
                    s.server_id,
                    s.source,
                    s.info.name,
                    s.info.id,
                    format!("{:?}", s.info.power_state),
                    s.info.cpus,
                    s.info.memory_mib,
                    format!("{:?}", s.info.firmware).to_lowercase(),
                    s.info.disks.len(),
                    gib,
                    s.unsupported.join("; ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn add_test_server(
    source_name: &str,
    name: &str,
    vm_id: Option<String>,
    common: &ConfigArgs,
) -> Result<ExitCode> {
    use rehost_core::{DiskId, DiskInfo, Firmware, PowerState, VmId, VmInfo};

    let config = Config::locate(common.config.as_deref())?;
    let source = config.source(source_name)?;
    let mut store = Store::open(&config.store_path())?;
    let vm_id = vm_id.unwrap_or_else(|| format!("test-{name}"));
    let mut vms: Vec<VmInfo> = store
        .servers(Some(source_name))?
        .into_iter()
        .map(|s| s.info)
        .filter(|vm| vm.id.to_string() != vm_id)
        .collect();
    vms.push(VmInfo {
        id: VmId::from(vm_id.as_str()),
        name: name.to_owned(),
        path: format!("/test/vm/{name}"),
        source_ref: format!("vm-{name}"),
        power_state: PowerState::PoweredOn,
        guest_os: "test".to_owned(),
        cpus: 1,
        memory_mib: 1024,
        firmware: Firmware::Bios,
        change_tracking: true,
        disks: vec![DiskInfo {
            id: DiskId::from("2000"),
            label: "Hard disk 1".to_owned(),
            capacity_bytes: 1 << 30,
            location: format!("[test] {name}/{name}.vmdk"),
            change_id: None,
            unsupported: None,
        }],
    });
    store.replace_catalog(&source.name, &source.kind.to_string(), &source.url, &vms)?;
    println!("added test server {name} ({vm_id}) to {source_name}");
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct SourceCheck {
    source: String,
    url: String,
    reachable: bool,
    authenticated: bool,
    version: Option<String>,
    missing_privileges: Vec<String>,
    /// Hyper-V: whether the host's VMs can have Resilient Change Tracking.
    #[serde(skip_serializing_if = "Option::is_none")]
    rct_available: Option<bool>,
    /// Hyper-V: whether the host's administrative share opens over SMB.
    #[serde(skip_serializing_if = "Option::is_none")]
    smb_reachable: Option<bool>,
    error: Option<String>,
}

impl SourceCheck {
    /// A check of the source `name` at `url` before anything was tried.
    fn nothing_yet(name: String, url: String) -> Self {
        SourceCheck {
            source: name,
            url,
            reachable: false,
            authenticated: false,
            version: None,
            missing_privileges: Vec::new(),
            rct_available: None,
            smb_reachable: None,
            error: None,
        }
    }
}

pub fn run_config(cmd: ConfigCommand) -> Result<ExitCode> {
    let ConfigCommand::Check { common } = cmd;
    let config = Config::locate(common.config.as_deref())?;
    let store_path = config.store_path();
    let schema_version = Store::open(&store_path)?.schema_version()?;
    let checks = runtime()?.block_on(async {
        let mut checks = Vec::new();
        for source in &config.sources {
            checks.push(check_source(&config, source).await);
        }
        checks
    });
    let ok = checks
        .iter()
        .all(|c| c.authenticated && c.missing_privileges.is_empty() && c.error.is_none());
    match common.output {
        OutputMode::Json => print_json(&serde_json::json!({
            "config": config.file.display().to_string(),
            "store": store_path.display().to_string(),
            "store_schema_version": schema_version,
            "sources": checks,
            "ok": ok,
        }))?,
        OutputMode::Table => {
            println!(
                "config {}: valid; store {}",
                config.file.display(),
                store_path.display()
            );
            for c in &checks {
                let status = if c.error.is_none() && c.missing_privileges.is_empty() {
                    "ok"
                } else {
                    "PROBLEM"
                };
                println!(
                    "source {} ({}): {status}; reachable: {}, authenticated: {}, version: {}",
                    c.source,
                    c.url,
                    yes(c.reachable),
                    yes(c.authenticated),
                    c.version.as_deref().unwrap_or("-")
                );
                if let Some(rct) = c.rct_available {
                    println!("  RCT available: {}", yes(rct));
                }
                if let Some(smb) = c.smb_reachable {
                    println!("  SMB reachable: {}", yes(smb));
                }
                if !c.missing_privileges.is_empty() {
                    println!("  missing privileges: {}", c.missing_privileges.join(", "));
                }
                if let Some(err) = &c.error {
                    println!("  error: {err}");
                }
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

async fn check_source(config: &Config, source: &crate::config::SourceConfig) -> SourceCheck {
    if source.kind == crate::config::SourceKind::Azure {
        return check_azure_source(config, source).await;
    }
    if source.kind == crate::config::SourceKind::Hyperv {
        return check_hyperv_source(config, source).await;
    }
    let mut check = SourceCheck::nothing_yet(source.name.clone(), source.url.clone());
    match crate::sources::connect_vsphere(config, source).await {
        Ok(client) => {
            check.reachable = true;
            check.authenticated = true;
            let about = client.about();
            check.version = Some(format!("{} ({})", about.full_name, about.api_version));
            match client.missing_privileges(VSPHERE_PRIVILEGES).await {
                Ok(missing) => check.missing_privileges = missing,
                Err(err) => check.error = Some(format!("checking privileges: {err}")),
            }
            let _ = client.logout().await;
        }
        Err(err) => {
            // A server that answered with a login fault was reached.
            let vsphere = err
                .chain()
                .find_map(|e| e.downcast_ref::<rehost_vsphere::Error>());
            check.reachable =
                vsphere.is_some_and(|e| e.kind() == rehost_core::ErrorKind::PermissionDenied);
            check.error = Some(format!("{err:#}"));
        }
    }
    check
}

/// `config check` of an Azure source: a token obtained ("authenticated"), the subscription
/// visible ("reachable", with its name as the version line), and the replication actions
/// the caller's role assignments do not grant.
async fn check_azure_source(config: &Config, source: &crate::config::SourceConfig) -> SourceCheck {
    let mut check = SourceCheck::nothing_yet(source.name.clone(), source.endpoint());
    let azure = match crate::sources::connect_azure(config, source) {
        Ok(azure) => azure,
        Err(err) => {
            check.error = Some(format!("{err:#}"));
            return check;
        }
    };
    let client = azure.client();
    if let Err(err) = client.token().await {
        check.reachable = err.kind() == rehost_core::ErrorKind::PermissionDenied;
        check.error = Some(format!("getting a token: {err}"));
        return check;
    }
    check.authenticated = true;
    match client.subscription().await {
        Ok(sub) => {
            check.reachable = true;
            check.version = Some(format!(
                "Azure Resource Manager, subscription {} ({}, {})",
                sub.name, sub.id, sub.state
            ));
        }
        Err(err) => {
            check.reachable = err.status().is_some();
            check.error = Some(format!("the subscription is not visible: {err}"));
            return check;
        }
    }
    match client
        .missing_permissions(rehost_azure::permissions::REPLICATION_ACTIONS)
        .await
    {
        Ok(missing) => check.missing_privileges = missing,
        Err(err) => check.error = Some(format!("checking permissions: {err}")),
    }
    check
}

/// `config check` of a Hyper-V source: WS-Management reachable (Identify needs no login),
/// authenticated (a WMI query), the Windows version, whether RCT is available (Windows
/// Server 2016 or later: build 14393), and the administrative share over SMB.
async fn check_hyperv_source(config: &Config, source: &crate::config::SourceConfig) -> SourceCheck {
    use rehost_core::SourceError as _;
    let mut check = SourceCheck::nothing_yet(source.name.clone(), source.url.clone());
    let hyperv = match crate::sources::connect_hyperv(config, source) {
        Ok(hyperv) => hyperv,
        Err(err) => {
            check.error = Some(format!("{err:#}"));
            return check;
        }
    };
    let client = hyperv.client();
    match client.identify().await {
        Ok(_) => check.reachable = true,
        Err(err) => {
            check.error = Some(format!("{err}"));
            return check;
        }
    }
    match client.host_os().await {
        Ok((caption, version)) => {
            check.authenticated = true;
            let build: u32 = version
                .split('.')
                .nth(2)
                .and_then(|b| b.parse().ok())
                .unwrap_or(0);
            check.rct_available = Some(build >= 14393);
            check.version = Some(format!("{caption} {version}"));
        }
        Err(err) => {
            check.authenticated = err.kind() != rehost_core::ErrorKind::PermissionDenied;
            check.error = Some(format!("{err}"));
            return check;
        }
    }
    if let Err(err) = client.vms(hyperv.host_label()).await {
        check.error = Some(format!("reading the Hyper-V classes: {err}"));
        if err.kind() == rehost_core::ErrorKind::PermissionDenied {
            check.missing_privileges.push(
                "membership of Administrators or Hyper-V Administrators on the host".to_owned(),
            );
        }
        return check;
    }
    match hyperv.smb().check("C$").await {
        Ok(()) => check.smb_reachable = Some(true),
        Err(err) => {
            check.smb_reachable = Some(false);
            check.error = Some(format!("{err}"));
        }
    }
    check
}
