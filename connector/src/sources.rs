//! Connecting to the sources named in the config.

use anyhow::{Context, Result};
use rehost_vsphere::{Client, ConnectOptions, Password, Tls};

use crate::config::{Config, SourceConfig, SourceKind, TlsCheck};

/// Logs in to the vSphere source `source`.
pub async fn connect_vsphere(config: &Config, source: &SourceConfig) -> Result<Client> {
    let SourceKind::Vsphere = source.kind;
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
