//! The configuration file every connector command shares (TOML).
//!
//! Found via `--config FILE`, then `REHOST_CONFIG`, then `./rehost.toml`. Secrets are
//! never in the file itself: a source names an environment variable or a file holding
//! its password, and a `password = "…"` key is refused with a message saying so.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "REHOST_CONFIG";
/// The config file looked for in the working directory when neither is given.
pub const DEFAULT_FILE: &str = "rehost.toml";

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// `[aws]`: where replication runs stage images and write snapshots.
    #[serde(default)]
    pub aws: AwsConfig,
    /// `[api]`: the API `rehost serve` answers.
    #[serde(default)]
    pub api: ApiConfig,
    /// `[scheduler]`: how `rehost serve` runs jobs.
    #[serde(default)]
    pub scheduler: SchedulerConfig,
    /// Where the file was read from (relative paths in it are resolved against its folder).
    #[serde(skip)]
    pub file: PathBuf,
}

/// `[store]`: the embedded SQLite database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Database file, created on first use; relative to the config file's folder.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: default_store_path(),
        }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("rehost.db")
}

/// `[aws]`: the account replication runs write to. Credentials come from the usual AWS
/// chain (environment, profile, instance role), never from this file.
#[allow(dead_code)] // read by `rehost serve` and the run pipeline (written alongside)
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// Region (else AWS_REGION or the profile's).
    pub region: Option<String>,
    /// Named profile of ~/.aws/config.
    pub profile: Option<String>,
    /// One endpoint for every service (S3, EBS, EC2, KMS): a local emulator.
    pub endpoint_url: Option<String>,
    /// The bucket runs stage their exported images in. Required by replication jobs.
    pub staging_bucket: Option<String>,
    /// Key prefix of staged images (`<prefix><job>/<run>/…`).
    #[serde(default = "default_staging_prefix")]
    pub staging_prefix: String,
    /// Keep staged images after a successful import (default: delete them; the manifest
    /// and block list, a few KiB, are always kept: the next incremental run builds on them).
    #[serde(default)]
    pub keep_staged: bool,
}

fn default_staging_prefix() -> String {
    "rehost/".to_owned()
}

/// `[api]`: the REST API of `rehost serve`.
#[allow(dead_code)] // read by `rehost serve` and the run pipeline (written alongside)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address and port to listen on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Environment variable holding the bearer token clients must send.
    pub token_env: Option<String>,
    /// File holding the bearer token (trailing newline ignored); relative to the config file.
    pub token_file: Option<PathBuf>,
    /// Refused with an explanation, like a source's password.
    #[serde(default)]
    token: Option<toml::Value>,
    /// Job-state changes are POSTed here as JSON events.
    pub webhook_url: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM); relative to the config file.
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token_env: None,
            token_file: None,
            token: None,
            webhook_url: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}

/// `[scheduler]`: limits and retry policy of `rehost serve`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Runs executing at once, across all jobs.
    #[serde(default = "default_max_concurrent_runs")]
    pub max_concurrent_runs: u32,
    /// Failed runs in a row after which a job is PAUSED_ON_FAILURE.
    #[serde(default = "default_max_consecutive_failures")]
    pub max_consecutive_failures: u32,
    /// First delay before retrying a run that failed on a transient error; doubled per
    /// attempt, with jitter.
    #[serde(default = "default_retry_backoff_secs")]
    pub retry_backoff_secs: u64,
    /// Tests only: a job's `frequency_hours` counts seconds instead of hours, so a
    /// schedule can be seen to fire within a test. Never set this in production.
    #[serde(default)]
    pub test_frequency_unit_secs: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_runs: default_max_concurrent_runs(),
            max_consecutive_failures: default_max_consecutive_failures(),
            retry_backoff_secs: default_retry_backoff_secs(),
            test_frequency_unit_secs: false,
        }
    }
}

fn default_max_concurrent_runs() -> u32 {
    50
}

fn default_max_consecutive_failures() -> u32 {
    3
}

fn default_retry_backoff_secs() -> u64 {
    60
}

impl SchedulerConfig {
    /// Seconds in one unit of `frequency_hours` (3600, or 1 under the test override).
    pub fn frequency_unit_secs(&self) -> i64 {
        if self.test_frequency_unit_secs {
            1
        } else {
            3600
        }
    }
}

/// The kinds of source rehost reads VMs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Vsphere,
    Azure,
    Hyperv,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceKind::Vsphere => f.write_str("vsphere"),
            SourceKind::Azure => f.write_str("azure"),
            SourceKind::Hyperv => f.write_str("hyperv"),
        }
    }
}

/// `[[sources]]`: one hypervisor manager.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The name commands use (`--source vc1`).
    pub name: String,
    pub kind: SourceKind,
    /// vSphere: `https://vcenter.example.com/sdk`.
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub username: String,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// File holding the password (trailing newline ignored); relative to the config file.
    pub password_file: Option<PathBuf>,
    /// Refused with an explanation: the password must not sit in the config file.
    #[serde(default)]
    password: Option<toml::Value>,
    /// PEM file of the CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server's certificate (hex, colons optional), as `govc about.cert` prints it.
    pub thumbprint: Option<String>,
    /// Skip certificate verification entirely (never in production).
    #[serde(default)]
    pub insecure: bool,
    /// Azure: the directory (tenant) id.
    pub tenant_id: Option<String>,
    /// Azure: the application (client) id; with `managed_identity`, a user-assigned one.
    pub client_id: Option<String>,
    /// Azure: environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// Azure: file holding the client secret; relative to the config file.
    pub client_secret_file: Option<PathBuf>,
    /// Refused with an explanation, like `password`.
    #[serde(default)]
    client_secret: Option<toml::Value>,
    /// Azure: use the managed identity of the VM the connector runs on.
    #[serde(default)]
    pub managed_identity: bool,
    /// Azure: the subscription holding the VMs.
    pub subscription_id: Option<String>,
    /// Azure: only these resource groups (all of the subscription's when empty).
    #[serde(default)]
    pub resource_groups: Vec<String>,
    /// Azure: Entra ID's endpoint (other clouds and tests override it).
    pub authority_url: Option<String>,
    /// Azure: Resource Manager's endpoint.
    pub resource_manager_url: Option<String>,
    /// Azure: the instance metadata service, for `managed_identity` (tests override it).
    pub imds_url: Option<String>,
    /// Hyper-V: `host:port` of the host's SMB service (default: the url's host, port 445).
    pub smb_address: Option<String>,
    /// Hyper-V: `ntlm` (default; sealed over http://) or `basic` (https:// only).
    pub auth: Option<String>,
}

/// Azure's public-cloud Resource Manager endpoint.
pub const DEFAULT_RESOURCE_MANAGER_URL: &str = "https://management.azure.com";

impl fmt::Debug for SourceConfig {
    // Written by hand so a password that slipped into the file is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("thumbprint", &self.thumbprint)
            .field("insecure", &self.insecure)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("client_secret_env", &self.client_secret_env)
            .field("client_secret_file", &self.client_secret_file)
            .field("managed_identity", &self.managed_identity)
            .field("subscription_id", &self.subscription_id)
            .field("resource_groups", &self.resource_groups)
            .field("authority_url", &self.authority_url)
            .field("resource_manager_url", &self.resource_manager_url)
            .finish()
    }
}

/// How a source's TLS certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCheck {
    /// The system's trusted roots.
    System,
    CaFile(PathBuf),
    Thumbprint(String),
    Insecure,
}

impl Config {
    /// Finds and loads the config: `explicit`, else `$REHOST_CONFIG`, else `./rehost.toml`.
    pub fn locate(explicit: Option<&Path>) -> Result<Config> {
        let (path, how) = match explicit {
            Some(path) => (path.to_path_buf(), "--config"),
            None => match std::env::var_os(CONFIG_ENV) {
                Some(path) => (PathBuf::from(path), CONFIG_ENV),
                None => (PathBuf::from(DEFAULT_FILE), "the default location"),
            },
        };
        if !path.exists() {
            bail!(
                "no config file at {} (from {how}); pass --config FILE, set {CONFIG_ENV}, or create ./{DEFAULT_FILE} (see the README's config reference)",
                path.display()
            );
        }
        Self::load(&path)
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let mut config =
            Self::parse(&text).with_context(|| format!("in config file {}", path.display()))?;
        config.file = path.to_path_buf();
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.api.token.is_some() {
            bail!(
                "[api]: `token` must not be written in the config file; put it in an environment variable named by `token_env`, or a file named by `token_file`"
            );
        }
        if self.api.token_env.is_some() && self.api.token_file.is_some() {
            bail!("[api]: set only one of `token_env` and `token_file`");
        }
        if self.api.tls_cert_file.is_some() != self.api.tls_key_file.is_some() {
            bail!("[api]: set both `tls_cert_file` and `tls_key_file` (HTTPS), or neither (HTTP)");
        }
        if let Some(url) = &self.api.webhook_url
            && !(url.starts_with("https://") || url.starts_with("http://"))
        {
            bail!("[api]: `webhook_url` must be an http(s):// URL, got {url:?}");
        }
        if self.scheduler.max_concurrent_runs == 0 {
            bail!("[scheduler]: `max_concurrent_runs` must be at least 1");
        }
        if self.scheduler.max_consecutive_failures == 0 {
            bail!("[scheduler]: `max_consecutive_failures` must be at least 1");
        }
        if let Some(bucket) = &self.aws.staging_bucket
            && (bucket.is_empty() || bucket.contains('/'))
        {
            bail!("[aws]: `staging_bucket` must be a bucket name (no s3://, no /), got {bucket:?}");
        }
        if !self.aws.staging_prefix.is_empty() && !self.aws.staging_prefix.ends_with('/') {
            bail!(
                "[aws]: `staging_prefix` must be empty or end in /, got {:?}",
                self.aws.staging_prefix
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, source) in self.sources.iter().enumerate() {
            let at = format!("sources[{i}] ({:?})", source.name);
            if source.name.trim().is_empty() {
                bail!("sources[{i}]: `name` is empty");
            }
            if !seen.insert(source.name.as_str()) {
                bail!("{at}: a second source with the same name");
            }
            match source.kind {
                SourceKind::Vsphere => source.validate_vsphere(&at)?,
                SourceKind::Azure => source.validate_azure(&at)?,
                SourceKind::Hyperv => source.validate_hyperv(&at)?,
            }
        }
        Ok(())
    }

    /// The source named `name`.
    pub fn source(&self, name: &str) -> Result<&SourceConfig> {
        self.sources
            .iter()
            .find(|s| s.name == name)
            .with_context(|| {
                let names: Vec<_> = self.sources.iter().map(|s| s.name.as_str()).collect();
                format!(
                    "no source named {name:?} in {} (sources: {})",
                    self.file.display(),
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                )
            })
    }

    /// A path from the file, resolved against the file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// The store's database path.
    pub fn store_path(&self) -> PathBuf {
        self.resolve(&self.store.path)
    }

    /// The API's bearer token, read from where `[api]` points; `None` when it names
    /// none (then `rehost serve` refuses to start: the API is never open).
    #[allow(dead_code)] // read by `rehost serve` and the run pipeline (written alongside)
    pub fn api_token(&self) -> Result<Option<String>> {
        if let Some(var) = &self.api.token_env {
            let token = std::env::var(var).with_context(|| {
                format!("[api]: environment variable {var} (its token_env) is not set")
            })?;
            return check_token(token, var).map(Some);
        }
        if let Some(file) = &self.api.token_file {
            let path = self.resolve(file);
            let token = std::fs::read_to_string(&path)
                .with_context(|| format!("[api]: reading token_file {}", path.display()))?;
            return check_token(
                token.trim_end_matches(['\n', '\r']).to_owned(),
                &path.display().to_string(),
            )
            .map(Some);
        }
        Ok(None)
    }

    /// The AWS options of `[aws]`.
    #[allow(dead_code)] // read by `rehost serve` and the run pipeline (written alongside)
    pub fn aws_options(&self) -> rehost_importer::aws::AwsOptions {
        rehost_importer::aws::AwsOptions {
            region: self.aws.region.clone(),
            profile: self.aws.profile.clone(),
            endpoint_url: self.aws.endpoint_url.clone(),
            static_credentials: None,
        }
    }
}

/// A token must be long enough not to be guessed; `from` names where it came from.
#[allow(dead_code)] // read by `rehost serve` and the run pipeline (written alongside)
fn check_token(token: String, from: &str) -> Result<String> {
    if token.trim().len() < 16 {
        bail!(
            "[api]: the token in {from} is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)"
        );
    }
    Ok(token)
}

impl SourceConfig {
    fn validate_vsphere(&self, at: &str) -> Result<()> {
        self.validate_vsphere_like(at)?;
        self.refuse_fields(
            at,
            &[
                ("smb_address", self.smb_address.is_some()),
                ("auth", self.auth.is_some()),
            ],
        )
    }

    /// url, user, password by reference, one TLS choice, and no Azure fields.
    fn validate_vsphere_like(&self, at: &str) -> Result<()> {
        if self.password.is_some() {
            bail!(
                "{at}: `password` must not be written in the config file; put it in an environment variable named by `password_env`, or a file named by `password_file`"
            );
        }
        match (&self.password_env, &self.password_file) {
            (None, None) => bail!("{at}: set `password_env` or `password_file`"),
            (Some(_), Some(_)) => {
                bail!("{at}: set only one of `password_env` and `password_file`")
            }
            _ => {}
        }
        if !(self.url.starts_with("https://") || self.url.starts_with("http://")) {
            bail!("{at}: `url` must be an https:// URL, got {:?}", self.url);
        }
        if self.username.trim().is_empty() {
            bail!("{at}: set `username`");
        }
        let tls_choices = usize::from(self.ca_file.is_some())
            + usize::from(self.thumbprint.is_some())
            + usize::from(self.insecure);
        if tls_choices > 1 {
            bail!("{at}: set at most one of `ca_file`, `thumbprint` and `insecure = true`");
        }
        if let Some(thumbprint) = &self.thumbprint {
            let hex: String = thumbprint.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                bail!(
                    "{at}: `thumbprint` must be a SHA-256 (64 hex digits, colons optional), got {thumbprint:?}"
                );
            }
        }
        self.refuse_fields(
            at,
            &[
                ("tenant_id", self.tenant_id.is_some()),
                ("client_id", self.client_id.is_some()),
                ("client_secret_env", self.client_secret_env.is_some()),
                ("client_secret_file", self.client_secret_file.is_some()),
                ("managed_identity", self.managed_identity),
                ("subscription_id", self.subscription_id.is_some()),
                ("resource_groups", !self.resource_groups.is_empty()),
                ("authority_url", self.authority_url.is_some()),
                ("resource_manager_url", self.resource_manager_url.is_some()),
                ("imds_url", self.imds_url.is_some()),
            ],
        )
    }

    /// A Hyper-V host: the vSphere rules for url, user, password and TLS, plus its own.
    fn validate_hyperv(&self, at: &str) -> Result<()> {
        self.validate_vsphere_like(at)?;
        match self.auth.as_deref() {
            None | Some("ntlm") => {}
            Some("basic") if self.url.starts_with("https://") => {}
            Some("basic") => bail!(
                "{at}: `auth = \"basic\"` sends the password in the clear over http://, which WinRM refuses; use an https:// url (port 5986) or NTLM"
            ),
            Some(other) => bail!("{at}: `auth` must be \"ntlm\" or \"basic\", got {other:?}"),
        }
        if let Some(address) = &self.smb_address
            && address
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            bail!("{at}: `smb_address` must be host:port, got {address:?}");
        }
        Ok(())
    }

    fn validate_azure(&self, at: &str) -> Result<()> {
        if self.client_secret.is_some() {
            bail!(
                "{at}: `client_secret` must not be written in the config file; put it in an environment variable named by `client_secret_env`, or a file named by `client_secret_file`"
            );
        }
        self.refuse_fields(
            at,
            &[
                ("url", !self.url.is_empty()),
                ("username", !self.username.is_empty()),
                ("password_env", self.password_env.is_some()),
                ("password_file", self.password_file.is_some()),
                ("password", self.password.is_some()),
                ("thumbprint", self.thumbprint.is_some()),
                ("insecure", self.insecure),
                ("smb_address", self.smb_address.is_some()),
                ("auth", self.auth.is_some()),
            ],
        )?;
        let subscription = self.subscription_id.as_deref().unwrap_or("");
        if subscription.trim().is_empty() {
            bail!("{at}: set `subscription_id`");
        }
        let secrets = usize::from(self.client_secret_env.is_some())
            + usize::from(self.client_secret_file.is_some())
            + usize::from(self.managed_identity);
        match secrets {
            0 => bail!(
                "{at}: set `client_secret_env`, `client_secret_file` or `managed_identity = true`"
            ),
            1 => {}
            _ => bail!(
                "{at}: set only one of `client_secret_env`, `client_secret_file` and `managed_identity = true`"
            ),
        }
        if !self.managed_identity {
            for (field, value) in [
                ("tenant_id", &self.tenant_id),
                ("client_id", &self.client_id),
            ] {
                if value.as_deref().is_none_or(|v| v.trim().is_empty()) {
                    bail!("{at}: set `{field}` (or use `managed_identity = true`)");
                }
            }
        }
        for (field, value) in [
            ("authority_url", &self.authority_url),
            ("resource_manager_url", &self.resource_manager_url),
            ("imds_url", &self.imds_url),
        ] {
            if let Some(url) = value
                && !(url.starts_with("https://") || url.starts_with("http://"))
            {
                bail!("{at}: `{field}` must be an https:// URL, got {url:?}");
            }
        }
        Ok(())
    }

    fn refuse_fields(&self, at: &str, fields: &[(&str, bool)]) -> Result<()> {
        let set: Vec<&str> = fields
            .iter()
            .filter(|(_, set)| *set)
            .map(|(f, _)| *f)
            .collect();
        if !set.is_empty() {
            let verb = if set.len() == 1 { "is" } else { "are" };
            bail!(
                "{at}: {} {verb} not used by a source of kind {}; remove it",
                set.iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.kind
            );
        }
        Ok(())
    }

    /// Where the source is, for manifests and messages.
    pub fn endpoint(&self) -> String {
        match self.kind {
            SourceKind::Vsphere | SourceKind::Hyperv => self.url.clone(),
            SourceKind::Azure => format!(
                "{}/subscriptions/{}",
                self.resource_manager_url
                    .as_deref()
                    .unwrap_or(DEFAULT_RESOURCE_MANAGER_URL)
                    .trim_end_matches('/'),
                self.subscription_id.as_deref().unwrap_or("")
            ),
        }
    }

    /// Reads the Azure client secret from where the config points (never printed).
    pub fn client_secret(&self, config: &Config) -> Result<String> {
        if let Some(var) = &self.client_secret_env {
            return std::env::var(var).with_context(|| {
                format!(
                    "source {:?}: environment variable {var} (its client_secret_env) is not set",
                    self.name
                )
            });
        }
        if let Some(file) = &self.client_secret_file {
            let path = config.resolve(file);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "source {:?}: reading its client_secret_file {}",
                    self.name,
                    path.display()
                )
            })?;
            return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        bail!(
            "source {:?}: no client_secret_env or client_secret_file",
            self.name
        )
    }
}

impl SourceConfig {
    /// Reads the password from where the config points. The error names the variable or
    /// file, never the value.
    pub fn password(&self, config: &Config) -> Result<String> {
        if let Some(var) = &self.password_env {
            return std::env::var(var).with_context(|| {
                format!(
                    "source {:?}: environment variable {var} (its password_env) is not set",
                    self.name
                )
            });
        }
        if let Some(file) = &self.password_file {
            let path = config.resolve(file);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "source {:?}: reading its password_file {}",
                    self.name,
                    path.display()
                )
            })?;
            return Ok(text.trim_end_matches(['\r', '\n']).to_owned());
        }
        bail!("source {:?}: no password_env or password_file", self.name)
    }

    /// How its certificate is checked.
    pub fn tls(&self, config: &Config) -> TlsCheck {
        if self.insecure {
            TlsCheck::Insecure
        } else if let Some(ca) = &self.ca_file {
            TlsCheck::CaFile(config.resolve(ca))
        } else if let Some(thumbprint) = &self.thumbprint {
            TlsCheck::Thumbprint(thumbprint.clone())
        } else {
            TlsCheck::System
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [store]
        path = "state/rehost.db"
        [[sources]]
        name = "vc1"
        kind = "vsphere"
        url = "https://127.0.0.1:8989/sdk"
        username = "user"
        password_env = "REHOST_TEST_VC1_PASSWORD"
        thumbprint = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89"
    "#;

    #[test]
    fn a_good_config_parses() {
        let mut config = Config::parse(GOOD).unwrap();
        config.file = PathBuf::from("/etc/rehost/rehost.toml");
        assert_eq!(
            config.store_path(),
            PathBuf::from("/etc/rehost/state/rehost.db")
        );
        let vc1 = config.source("vc1").unwrap();
        assert_eq!(vc1.kind, SourceKind::Vsphere);
        assert!(matches!(vc1.tls(&config), TlsCheck::Thumbprint(_)));
    }

    #[test]
    fn a_password_in_the_file_is_refused() {
        let text = GOOD.replace(
            "password_env = \"REHOST_TEST_VC1_PASSWORD\"",
            "password = \"hunter2\"",
        );
        let err = Config::parse(&text).unwrap_err().to_string();
        assert!(
            err.contains("must not be written in the config file"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn mistakes_are_named() {
        for (from, to, expected) in [
            ("kind = \"vsphere\"", "kind = \"xen\"", "unknown variant"),
            ("username", "user_name", "unknown field"),
            ("thumbprint = \"AB", "thumbprint = \"ZZ", "64 hex digits"),
            (
                "password_env = \"REHOST_TEST_VC1_PASSWORD\"",
                "",
                "set `password_env` or `password_file`",
            ),
            (
                "thumbprint",
                "insecure = true\nthumbprint",
                "at most one of",
            ),
            ("https://127", "ftp://127", "https:// URL"),
        ] {
            let err = format!("{:#}", Config::parse(&GOOD.replace(from, to)).unwrap_err());
            assert!(err.contains(expected), "{from} -> {to}: {err}");
        }
    }

    const AZURE: &str = r#"
        [[sources]]
        name = "az1"
        kind = "azure"
        tenant_id = "00000000-0000-0000-0000-0000000000aa"
        client_id = "11111111-1111-1111-1111-111111111111"
        client_secret_env = "REHOST_TEST_AZ1_SECRET"
        subscription_id = "22222222-2222-2222-2222-222222222222"
        resource_groups = ["prod-rg"]
        authority_url = "http://127.0.0.1:1"
        resource_manager_url = "http://127.0.0.1:1"
    "#;

    #[test]
    fn an_azure_source_parses() {
        let config = Config::parse(AZURE).unwrap();
        let source = config.source("az1").unwrap();
        assert_eq!(source.kind, SourceKind::Azure);
        assert_eq!(source.resource_groups, ["prod-rg"]);
        assert_eq!(
            source.endpoint(),
            "http://127.0.0.1:1/subscriptions/22222222-2222-2222-2222-222222222222"
        );
        let managed = AZURE.replace(
            "client_secret_env = \"REHOST_TEST_AZ1_SECRET\"",
            "managed_identity = true",
        );
        assert!(Config::parse(&managed).is_ok());
    }

    #[test]
    fn azure_mistakes_are_named() {
        for (from, to, expected) in [
            (
                "client_secret_env = \"REHOST_TEST_AZ1_SECRET\"",
                "client_secret = \"hunter2\"",
                "must not be written in the config file",
            ),
            (
                "client_secret_env = \"REHOST_TEST_AZ1_SECRET\"",
                "",
                "set `client_secret_env`, `client_secret_file` or `managed_identity = true`",
            ),
            (
                "client_secret_env",
                "managed_identity = true\nclient_secret_env",
                "only one of",
            ),
            (
                "subscription_id = \"2",
                "subscription_id = \"\"\n#",
                "set `subscription_id`",
            ),
            ("tenant_id = \"0", "#", "set `tenant_id`"),
            (
                "kind = \"azure\"",
                "kind = \"azure\"\nusername = \"u\"",
                "`username` is not used by a source of kind azure",
            ),
            (
                "authority_url = \"http",
                "authority_url = \"ftp",
                "https:// URL",
            ),
        ] {
            let text = AZURE.replace(from, to);
            let err = format!("{:#}", Config::parse(&text).unwrap_err());
            assert!(err.contains(expected), "{from} -> {to}: {err}");
        }
        // A vSphere source refuses Azure's fields.
        let err = format!(
            "{:#}",
            Config::parse(&GOOD.replace("username", "subscription_id = \"s\"\nusername"))
                .unwrap_err()
        );
        assert!(err.contains("`subscription_id`"), "{err}");
    }

    #[test]
    fn an_unknown_source_lists_the_known_ones() {
        let config = Config::parse(GOOD).unwrap();
        let err = config.source("vc2").unwrap_err().to_string();
        assert!(err.contains("vc1"), "{err}");
    }

    #[test]
    fn a_missing_password_variable_is_named_without_a_value() {
        let config = Config::parse(GOOD).unwrap();
        let err = config
            .source("vc1")
            .unwrap()
            .password(&config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("REHOST_TEST_VC1_PASSWORD"), "{err}");
    }
}
