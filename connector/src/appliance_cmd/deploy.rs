//! `rehost appliance deploy`: an OVA to vCenter.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Args;

use crate::output::OutputMode;

/// `rehost appliance deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The vSphere source, as named in the config.
    #[arg(long)]
    pub source: String,
    /// The OVA to deploy.
    #[arg(long, value_name = "FILE")]
    pub ova: PathBuf,
    /// The new VM's name.
    #[arg(long)]
    pub name: String,
    /// The datastore (default: the one with the most free space the host sees).
    #[arg(long)]
    pub datastore: Option<String>,
    /// The network the appliance's NIC joins (default: the OVF's "VM Network").
    #[arg(long)]
    pub network: Option<String>,
    /// An OVF property, KEY=VALUE (repeat): hostname, ip0, api_token…
    #[arg(long = "prop", value_name = "KEY=VALUE")]
    pub props: Vec<String>,
    /// Leave the VM powered off.
    #[arg(long)]
    pub no_power_on: bool,
    /// The config file (else $REHOST_CONFIG, else ./rehost.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output for people (table) or scripts (json).
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputMode,
}

pub fn run(args: DeployArgs) -> Result<ExitCode> {
    bail!(
        "rehost appliance deploy of {} is not built yet",
        args.ova.display()
    )
}
