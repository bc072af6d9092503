//! AWS client construction with the usual credential chain and AWS CLI conventions:
//! `--region`, `--profile`, and one `--endpoint-url` for every service (the emulator).

use aws_config::{BehaviorVersion, Region, SdkConfig};

// Callers build requests with the SDKs' types (ByteStream, enums) without depending on
// the SDK crates themselves, so they always get the versions the importer was built with.
pub use {aws_sdk_ebs, aws_sdk_ec2, aws_sdk_kms, aws_sdk_s3};

/// Where and as whom to talk to AWS.
#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    /// Region (else the profile's or the environment's).
    pub region: Option<String>,
    /// Named profile from `~/.aws/config`.
    pub profile: Option<String>,
    /// One endpoint for every service (e.g. a local emulator).
    pub endpoint_url: Option<String>,
    /// Fixed credentials instead of the credential chain: for emulators, so tests never
    /// look for real credentials (or reach the instance metadata service).
    pub static_credentials: Option<(String, String)>,
}

/// The clients the importer uses, built from one configuration.
#[derive(Debug, Clone)]
pub struct Clients {
    /// EBS direct APIs.
    pub ebs: aws_sdk_ebs::Client,
    /// EC2 (AMIs, snapshot state).
    pub ec2: aws_sdk_ec2::Client,
    /// S3 (sources and staging).
    pub s3: aws_sdk_s3::Client,
}

impl Clients {
    /// Loads the configuration (credential chain, region) and builds every client.
    pub async fn load(options: &AwsOptions) -> Self {
        let config = sdk_config(options).await;
        // Emulators serve buckets by path, not by virtual host.
        let s3_config = aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(options.endpoint_url.is_some())
            .build();
        Self {
            ebs: aws_sdk_ebs::Client::new(&config),
            ec2: aws_sdk_ec2::Client::new(&config),
            s3: aws_sdk_s3::Client::from_conf(s3_config),
        }
    }
}

/// The shared SDK configuration for `options`: every client the importer builds (the KMS
/// one of [`crate::kms::KeyResolver`] too) comes from it, so all talk to the same
/// endpoint, region and account.
pub async fn sdk_config(options: &AwsOptions) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(profile) = &options.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(endpoint) = &options.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some((access_key, secret_key)) = &options.static_credentials {
        loader = loader.credentials_provider(aws_sdk_ebs::config::Credentials::new(
            access_key, secret_key, None, None, "static",
        ));
    }
    loader.load().await
}
