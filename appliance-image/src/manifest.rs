//! The appliance's typed manifest (`appliance-image/appliance.toml`): what goes into the
//! image, its virtual hardware, the service's paths and the OVF properties that configure
//! it on first boot. The image build (`build.sh`) and the packager read the same file.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub image: Image,
    pub debian: Debian,
    pub disk: Disk,
    pub hardware: Hardware,
    pub service: Service,
    #[serde(default)]
    pub properties: Vec<Property>,
}

/// Names and version of the outputs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// `rehost-appliance`: outputs are `<name>-<version>.{raw,ova,vhdx,vhd}`.
    pub name: String,
    pub version: String,
}

/// The root filesystem (read by `build.sh`; the keys it alone uses are kept as they are).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Debian {
    pub suite: String,
    pub mirror: String,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, toml::Value>,
}

/// The disk's layout.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Disk {
    /// The disk's size in MiB (a whole number: Azure takes only whole-MiB fixed VHDs).
    pub size_mib: u64,
    /// The EFI system partition's size in MiB.
    pub esp_mib: u64,
    #[serde(flatten)]
    pub extra: BTreeMap<String, toml::Value>,
}

/// The virtual machine the OVF describes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    pub cpus: u32,
    pub memory_mib: u64,
}

/// The connector service inside the image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub user: String,
    pub config_dir: String,
    pub state_dir: String,
    pub api_port: u16,
}

/// One OVF ProductSection property: a first-boot setting the deployer fills in.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Property {
    /// The key the OVF environment carries (`hostname`, `ip0`…).
    pub key: String,
    /// OVF's type: `string`, `boolean`, `int` or `uint`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub default: String,
    pub label: String,
    pub description: String,
    /// Shown masked by vSphere (the API token).
    #[serde(default)]
    pub password: bool,
}

/// The largest disk: a dynamic VHDX holds more, but Azure's fixed VHD and our images do
/// not need more than 64 GiB.
const MAX_DISK_MIB: u64 = 64 * 1024;

impl Manifest {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks a manifest's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Manifest> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| Error::Manifest {
            origin: origin.to_owned(),
            detail: e.to_string(),
        })?;
        manifest.validate().map_err(|detail| Error::Manifest {
            origin: origin.to_owned(),
            detail,
        })?;
        Ok(manifest)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(&self.image.name) || !name_ok(&self.image.version) {
            return Err(format!(
                "[image] name and version must be file-name safe (letters, digits, - _ .), got {:?} and {:?}",
                self.image.name, self.image.version
            ));
        }
        if self.disk.size_mib == 0 || self.disk.size_mib > MAX_DISK_MIB {
            return Err(format!(
                "[disk] size_mib must be 1..={MAX_DISK_MIB}, got {}",
                self.disk.size_mib
            ));
        }
        if self.disk.esp_mib == 0 || self.disk.esp_mib + 2 >= self.disk.size_mib {
            return Err(format!(
                "[disk] esp_mib ({}) must leave room for the root partition in {} MiB",
                self.disk.esp_mib, self.disk.size_mib
            ));
        }
        if !(1..=128).contains(&self.hardware.cpus) {
            return Err(format!(
                "[hardware] cpus must be 1..=128, got {}",
                self.hardware.cpus
            ));
        }
        if self.hardware.memory_mib < 512 || self.hardware.memory_mib % 4 != 0 {
            return Err(format!(
                "[hardware] memory_mib must be at least 512 and a multiple of 4, got {}",
                self.hardware.memory_mib
            ));
        }
        if self.service.api_port == 0 {
            return Err("[service] api_port must not be 0".into());
        }
        let mut seen = HashSet::new();
        for (i, p) in self.properties.iter().enumerate() {
            let key_ok = p
                .key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic())
                && p.key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !key_ok {
                return Err(format!(
                    "properties[{i}]: key {:?} must start with a letter and hold only letters, digits, _ and .",
                    p.key
                ));
            }
            if !seen.insert(p.key.as_str()) {
                return Err(format!("properties[{i}]: key {:?} appears twice", p.key));
            }
            if !matches!(p.kind.as_str(), "string" | "boolean" | "int" | "uint") {
                return Err(format!(
                    "properties[{i}] ({}): type must be string, boolean, int or uint, got {:?}",
                    p.key, p.kind
                ));
            }
            if p.password && !p.default.is_empty() {
                return Err(format!(
                    "properties[{i}] ({}): a password property has no default: the appliance never ships one",
                    p.key
                ));
            }
        }
        Ok(())
    }

    /// The file name of an output with `extension` (`ova`, `vhdx`…).
    pub fn output_name(&self, extension: &str) -> String {
        format!("{}-{}.{extension}", self.image.name, self.image.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = r#"
        [image]
        name = "rehost-appliance"
        version = "0.1.0"
        [debian]
        suite = "bookworm"
        mirror = "http://deb.debian.org/debian"
        packages = ["systemd", "cloud-init"]
        kernel = "linux-image-amd64"
        [disk]
        size_mib = 2048
        esp_mib = 128
        [hardware]
        cpus = 2
        memory_mib = 4096
        [service]
        user = "rehost"
        config_dir = "/etc/rehost"
        state_dir = "/var/lib/rehost"
        api_port = 8443
        [[properties]]
        key = "hostname"
        type = "string"
        default = "rehost"
        label = "Host name"
        description = "The appliance's host name."
        [[properties]]
        key = "api_token"
        type = "string"
        label = "API token"
        description = "Bearer token of the connector's API; empty: a random one is made."
        password = true
    "#;

    #[test]
    fn the_example_parses_and_keeps_build_only_keys() {
        let m = Manifest::parse(EXAMPLE, "example").expect("parses");
        assert_eq!(m.output_name("ova"), "rehost-appliance-0.1.0.ova");
        assert_eq!(m.properties.len(), 2);
        assert!(m.properties[1].password);
        assert_eq!(
            m.debian.extra.get("kernel").and_then(|v| v.as_str()),
            Some("linux-image-amd64")
        );
    }

    #[test]
    fn mistakes_are_named() {
        for (from, to, expected) in [
            ("cpus = 2", "cpus = 0", "cpus must be"),
            (
                "memory_mib = 4096",
                "memory_mib = 100",
                "memory_mib must be",
            ),
            ("size_mib = 2048", "size_mib = 100", "esp_mib (128)"),
            (
                "key = \"hostname\"",
                "key = \"1host\"",
                "must start with a letter",
            ),
            ("key = \"api_token\"", "key = \"hostname\"", "appears twice"),
            (
                "type = \"string\"\n        default",
                "type = \"text\"\n        default",
                "type must be",
            ),
            (
                "password = true",
                "password = true\n        default = \"x\"",
                "never ships one",
            ),
            (
                "version = \"0.1.0\"",
                "version = \"0.1/0\"",
                "file-name safe",
            ),
            ("cpus = 2", "cpus = 2\n        gpus = 1", "unknown field"),
        ] {
            let text = EXAMPLE.replacen(from, to, 1);
            let err = Manifest::parse(&text, "m").expect_err(expected).to_string();
            assert!(err.contains(expected), "{from} -> {to}: {err}");
        }
    }
}
