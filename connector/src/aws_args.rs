//! The AWS options every command that talks to AWS takes, as the AWS CLI spells them,
//! and the Tokio runtime those commands run on.

use anyhow::{Context, Result};
use clap::Args;
use rehost_importer::aws::{AwsOptions, Clients};

/// `--region`, `--profile`, `--endpoint-url`.
#[derive(Debug, Clone, Args)]
pub struct AwsArgs {
    /// AWS region (else AWS_REGION or the profile's).
    #[arg(long)]
    pub region: Option<String>,
    /// Named profile of ~/.aws/config (else AWS_PROFILE or the default chain).
    #[arg(long)]
    pub profile: Option<String>,
    /// One endpoint for every service (S3, EBS, EC2), e.g. a local emulator.
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
}

impl AwsArgs {
    /// As the importer's options (credentials from the usual chain).
    pub fn options(&self) -> AwsOptions {
        AwsOptions {
            region: self.region.clone(),
            profile: self.profile.clone(),
            endpoint_url: self.endpoint_url.clone(),
            static_credentials: None,
        }
    }

    /// Loads the configuration and builds the clients.
    pub async fn clients(&self) -> Clients {
        Clients::load(&self.options()).await
    }
}

/// A multi-threaded runtime: S3 sources are read by the disk-image library's threads,
/// which block on it while its workers drive the requests.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
