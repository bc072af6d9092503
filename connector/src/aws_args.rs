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

/// Opens a disk image from a local path or an `s3://bucket/key` URL (read with ranged
/// GETs, never downloaded), with a fingerprint that tells a resumed import it is the same
/// source. Call it outside the runtime's async context: S3 reads block on the runtime.
pub fn open_source(
    source: &str,
    clients: &Clients,
    runtime: &tokio::runtime::Runtime,
) -> Result<(
    rehost_diskimage::Disk,
    rehost_importer::ebs::journal::SourceIdentity,
)> {
    use rehost_diskimage::ReadAt;
    use rehost_importer::ebs::journal::SourceIdentity;
    use rehost_importer::s3::{S3Fs, S3Url};

    if S3Url::is_s3(source) {
        let url = S3Url::parse(source)?;
        let fs = S3Fs::new(
            clients.s3.clone(),
            url.bucket.clone(),
            runtime.handle().clone(),
        );
        let object = fs
            .open_object(&url.key)
            .with_context(|| format!("opening {source}"))?;
        let identity = SourceIdentity {
            location: source.to_owned(),
            size_bytes: object.len().with_context(|| format!("sizing {source}"))?,
            fingerprint: object.etag().to_owned(),
        };
        let disk = rehost_diskimage::Disk::open_with(&fs, &url.key)
            .with_context(|| format!("opening {source}"))?;
        Ok((disk, identity))
    } else {
        let disk =
            rehost_diskimage::Disk::open(source).with_context(|| format!("opening {source}"))?;
        let identity = SourceIdentity::local(std::path::Path::new(source))?;
        Ok((disk, identity))
    }
}
