//! `rehost appliance`: the connector appliance's images packed from the raw disk
//! `appliance-image/build.sh` makes (`package`), and an OVA deployed to vCenter (`deploy`).

mod deploy;
mod package;

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

pub use deploy::DeployArgs;
pub use package::PackageArgs;

#[derive(Debug, Subcommand)]
pub enum ApplianceCommand {
    /// Pack the appliance's raw disk into an OVA (vSphere), a VHDX (Hyper-V Generation 2)
    /// and a fixed VHD (Azure), with the OVF descriptor rendered from appliance.toml.
    Package(PackageArgs),
    /// Deploy an OVA to vCenter (CreateImportSpec, ImportVApp, an NFC upload) and power
    /// it on.
    Deploy(Box<DeployArgs>),
}

pub fn run(cmd: ApplianceCommand) -> Result<ExitCode> {
    match cmd {
        ApplianceCommand::Package(args) => package::run(args),
        ApplianceCommand::Deploy(args) => deploy::run(*args),
    }
}
