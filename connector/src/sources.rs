//! Connecting to the sources named in the config.

use anyhow::{Context, Result};
use rehost_vsphere::{Client, ConnectOptions, Password, Tls};

use crate::config::{Config, SourceConfig, SourceKind, TlsCheck};

/// Logs in to the vSphere source `source`.
pub async fn connect_vsphere(config: &Config, source: &SourceConfig) -> Result<Client> {
    if source.kind != SourceKind::Vsphere {
        anyhow::bail!(
            "source {:?} is a {} source, not vSphere",
            source.name,
            source.kind
        );
    }
    let password = Password::new(source.password(config)?);
    let mut options = ConnectOptions::new(source.url.clone(), source.username.clone(), password);
    options.tls = match source.tls(config) {
        TlsCheck::System => Tls::System,
        TlsCheck::CaFile(path) => Tls::CaFile(path),
        TlsCheck::Thumbprint(t) => Tls::Thumbprint(t),
        TlsCheck::Insecure => Tls::Insecure,
    };
    Client::connect(options)
        .await
        .with_context(|| format!("source {:?} ({})", source.name, source.url))
}

/// A client of the Azure source `source` (a token is asked for on the first call).
pub fn connect_azure(config: &Config, source: &SourceConfig) -> Result<rehost_azure::AzureSource> {
    use rehost_azure::{Client as AzureClient, ConnectOptions as AzureOptions, Credential, Secret};
    let credential = if source.managed_identity {
        Credential::ManagedIdentity {
            client_id: source.client_id.clone(),
        }
    } else {
        Credential::ClientSecret {
            tenant_id: source.tenant_id.clone().unwrap_or_default(),
            client_id: source.client_id.clone().unwrap_or_default(),
            secret: Secret::new(source.client_secret(config)?),
        }
    };
    let mut options = AzureOptions::new(
        credential,
        source.subscription_id.clone().unwrap_or_default(),
    );
    options.resource_groups = source.resource_groups.clone();
    if let Some(url) = &source.authority_url {
        options.authority_url = url.clone();
    }
    if let Some(url) = &source.resource_manager_url {
        options.resource_manager_url = url.clone();
    }
    if let Some(url) = &source.imds_url {
        options.imds_url = url.clone();
    }
    options.ca_file = source.ca_file.as_ref().map(|p| config.resolve(p));
    let client = AzureClient::new(options).with_context(|| format!("source {:?}", source.name))?;
    Ok(rehost_azure::AzureSource::new(client))
}

/// A client of the Hyper-V source `source`: WS-Management with NTLM (or Basic over HTTPS),
/// and SMB to the same host for the disk files. Nothing is connected until the first call.
pub fn connect_hyperv(
    config: &Config,
    source: &SourceConfig,
) -> Result<rehost_hyperv::HypervSource> {
    use rehost_hyperv::transport::{AuthMethod, Credentials, Endpoint, Transport};
    let context = || format!("source {:?} ({})", source.name, source.url);
    let password = source.password(config)?;
    let tls = if source.url.starts_with("https://") {
        let choice = match source.tls(config) {
            TlsCheck::System => anyhow::bail!(
                "source {:?}: an https:// Hyper-V host needs `ca_file` (the CA that signed its WinRM certificate), `thumbprint` (the SHA-256 of that certificate) or `insecure = true`",
                source.name
            ),
            TlsCheck::CaFile(path) => Tls::CaFile(path),
            TlsCheck::Thumbprint(t) => Tls::Thumbprint(t),
            TlsCheck::Insecure => Tls::Insecure,
        };
        rehost_vsphere::tls::client_config(&choice)
            .with_context(context)?
            .map(std::sync::Arc::new)
    } else {
        None
    };
    let endpoint = Endpoint::parse(&source.url, tls).with_context(context)?;
    let method = match source.auth.as_deref() {
        Some("basic") => AuthMethod::Basic,
        _ => AuthMethod::Ntlm,
    };
    let credentials = Credentials {
        user: source.username.clone(),
        password: password.clone(),
    };
    let transport = Transport::new(endpoint.clone(), credentials, method).with_context(context)?;
    let smb = rehost_hyperv::smb::SmbSettings {
        address: source
            .smb_address
            .clone()
            .unwrap_or_else(|| format!("{}:445", endpoint.host)),
        user: source.username.clone(),
        password,
    };
    let opener = rehost_hyperv::smb::SmbOpener::new(smb, tokio::runtime::Handle::current());
    Ok(rehost_hyperv::HypervSource::new(
        std::sync::Arc::new(rehost_hyperv::Client::new(transport)),
        std::sync::Arc::new(opener),
        endpoint.host,
    ))
}

/// A connected source of any kind.
#[derive(Debug, Clone)]
pub enum Connected {
    Vsphere(Client),
    Azure(rehost_azure::AzureSource),
    Hyperv(rehost_hyperv::HypervSource),
}

/// Connects to `source`, whatever its kind.
pub async fn connect(config: &Config, source: &SourceConfig) -> Result<Connected> {
    Ok(match source.kind {
        SourceKind::Vsphere => Connected::Vsphere(connect_vsphere(config, source).await?),
        SourceKind::Azure => Connected::Azure(connect_azure(config, source)?),
        SourceKind::Hyperv => Connected::Hyperv(connect_hyperv(config, source)?),
    })
}

impl Connected {
    /// Ends the session (vSphere sessions are a limited resource; Azure has none).
    pub async fn logout(&self) {
        if let Connected::Vsphere(client) = self
            && let Err(err) = client.logout().await
        {
            tracing::debug!(error = %err, "logout failed");
        }
    }
}
