//! The OVF descriptor: the checked-in template with its `{{placeholders}}` filled from the
//! manifest and the packed disk. Every placeholder must be filled and every value used, so
//! a template and its renderer cannot drift apart silently.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::sizes;

/// The template, as checked in.
pub const TEMPLATE: &str = include_str!("../ovf/rehost-appliance.ovf.in");

/// What the descriptor says of the disk file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFile {
    /// The VMDK's name inside the OVA.
    pub name: String,
    /// Its size in bytes.
    pub file_bytes: u64,
    /// The virtual disk's size in bytes (a whole number of MiB).
    pub capacity_bytes: u64,
    /// Bytes of data the disk holds (what vSphere reserves for a thin disk).
    pub populated_bytes: u64,
}

/// The descriptor for `manifest` and its disk.
pub fn render(manifest: &Manifest, disk: &DiskFile) -> Result<String> {
    let mut values = BTreeMap::new();
    values.insert("name", escape(&manifest.image.name));
    values.insert("version", escape(&manifest.image.version));
    values.insert("suite", escape(&manifest.debian.suite));
    values.insert("cpus", manifest.hardware.cpus.to_string());
    values.insert("memory_mib", manifest.hardware.memory_mib.to_string());
    values.insert("disk_file", escape(&disk.name));
    values.insert("disk_file_bytes", disk.file_bytes.to_string());
    values.insert(
        "disk_capacity_mib",
        sizes::capacity_mib(disk.capacity_bytes)?.to_string(),
    );
    values.insert("disk_populated_bytes", disk.populated_bytes.to_string());
    values.insert("properties", properties(manifest));
    fill(TEMPLATE, &values)
}

/// The ProductSection's `<Property>` elements.
fn properties(manifest: &Manifest) -> String {
    let mut out = String::new();
    for p in &manifest.properties {
        let password = if p.password {
            " ovf:password=\"true\""
        } else {
            ""
        };
        out.push_str(&format!(
            "      <Property ovf:key=\"{}\" ovf:type=\"{}\" ovf:userConfigurable=\"true\" ovf:value=\"{}\"{password}>\n        <Label>{}</Label>\n        <Description>{}</Description>\n      </Property>\n",
            escape(&p.key),
            escape(&p.kind),
            escape(&p.default),
            escape(&p.label),
            escape(&p.description),
        ));
    }
    out.trim_end_matches('\n').to_owned()
}

/// Replaces every `{{key}}` of `template` by its value; a placeholder without a value, or a
/// value without a placeholder, is an error.
pub fn fill(template: &str, values: &BTreeMap<&str, String>) -> Result<String> {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut used = std::collections::BTreeSet::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| Error::Template("a `{{` without its `}}`".into()))?;
        let key = &after[..end];
        let value = values
            .get(key)
            .ok_or_else(|| Error::Template(format!("no value for placeholder {{{{{key}}}}}")))?;
        out.push_str(value);
        used.insert(key);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if let Some(unused) = values.keys().find(|k| !used.contains(*k)) {
        return Err(Error::Template(format!(
            "value {unused:?} has no placeholder in the template"
        )));
    }
    Ok(out)
}

/// Escapes text for XML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use quick_xml::events::Event;

    const MANIFEST: &str = include_str!("../appliance.toml");

    fn disk() -> DiskFile {
        DiskFile {
            name: "rehost-appliance-0.1.0-disk1.vmdk".into(),
            file_bytes: 123_456_789,
            capacity_bytes: 2048 * sizes::MIB,
            populated_bytes: 900_000_000,
        }
    }

    /// (element local name, attributes) of every element, in order.
    fn elements(xml: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut reader = quick_xml::Reader::from_str(xml);
        let mut out = Vec::new();
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(e) | Event::Empty(e) => {
                    let attrs = e
                        .attributes()
                        .map(|a| {
                            let a = a.expect("attribute");
                            (
                                String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                                a.unescape_value().expect("value").into_owned(),
                            )
                        })
                        .collect();
                    out.push((
                        String::from_utf8_lossy(e.local_name().as_ref()).into_owned(),
                        attrs,
                    ));
                }
                Event::Eof => return out,
                _ => {}
            }
        }
    }

    fn attr<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
        attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_descriptor_describes_the_manifest_and_the_disk() {
        let manifest = Manifest::parse(MANIFEST, "appliance.toml").expect("manifest");
        let xml = render(&manifest, &disk()).expect("renders");
        let elements = elements(&xml);
        let file = elements.iter().find(|(n, _)| n == "File").expect("File");
        assert_eq!(
            attr(&file.1, "ovf:href"),
            Some("rehost-appliance-0.1.0-disk1.vmdk")
        );
        assert_eq!(attr(&file.1, "ovf:size"), Some("123456789"));
        let disk = elements.iter().find(|(n, _)| n == "Disk").expect("Disk");
        assert_eq!(attr(&disk.1, "ovf:capacity"), Some("2048"));
        let keys: Vec<&str> = elements
            .iter()
            .filter(|(n, _)| n == "Property")
            .filter_map(|(_, a)| attr(a, "ovf:key"))
            .collect();
        let expected: Vec<&str> = manifest.properties.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, expected);
        let token = elements
            .iter()
            .find(|(n, a)| n == "Property" && attr(a, "ovf:key") == Some("api_token"))
            .expect("api_token");
        assert_eq!(attr(&token.1, "ovf:password"), Some("true"));
        assert_eq!(attr(&token.1, "ovf:value"), Some(""), "no default token");
        assert!(xml.contains(&format!(
            "<rasd:VirtualQuantity>{}</rasd:VirtualQuantity>",
            manifest.hardware.memory_mib
        )));
        assert!(!xml.contains("{{"), "a placeholder was left");
    }

    #[test]
    fn values_are_escaped() {
        let mut manifest = Manifest::parse(MANIFEST, "appliance.toml").expect("manifest");
        manifest.properties[0].description = "a <b> & \"c\"".into();
        let xml = render(&manifest, &disk()).expect("renders");
        let _ = elements(&xml); // still well-formed
        assert!(xml.contains("a &lt;b&gt; &amp; &quot;c&quot;"));
    }

    #[test]
    fn templates_and_values_must_match() {
        let values = BTreeMap::from([("a", "1".to_owned())]);
        assert_eq!(fill("x{{a}}y", &values).expect("fills"), "x1y");
        assert!(fill("x{{b}}y", &values).is_err(), "missing value");
        assert!(fill("xy", &values).is_err(), "unused value");
        assert!(fill("x{{a", &values).is_err(), "unclosed");
        let odd = DiskFile {
            capacity_bytes: 2048 * sizes::MIB + 1,
            ..disk()
        };
        let manifest = Manifest::parse(MANIFEST, "appliance.toml").expect("manifest");
        assert!(render(&manifest, &odd).is_err(), "capacity not whole MiB");
    }
}
