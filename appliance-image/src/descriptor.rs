//! What a deployment needs from an OVF descriptor (any, not only ours): the ProductSection
//! properties (their full keys, and which hold passwords), the networks, and which
//! referenced files are streamOptimized disks. vCenter parses the rest.

use quick_xml::events::{BytesStart, Event};

use crate::error::{Error, Result};

/// The `ovf:format` of a streamOptimized VMDK.
pub const STREAM_OPTIMIZED_FORMAT: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// A ProductSection property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// The key CreateImportSpec's `propertyMapping` takes: `class.key.instance`, with the
    /// section's class and instance when it has them.
    pub key: String,
    /// `ovf:type` (`string`, `boolean`, `uint16`, …).
    pub kind: String,
    /// `ovf:password="true"`: the value is a secret.
    pub password: bool,
}

/// A file of the References section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRef {
    /// `ovf:id`.
    pub id: String,
    /// `ovf:href`: the OVA member.
    pub href: String,
}

/// The parts of a descriptor a deployment reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// ProductSection properties, in document order.
    pub properties: Vec<Property>,
    /// NetworkSection network names.
    pub networks: Vec<String>,
    /// Referenced files.
    pub files: Vec<FileRef>,
    /// `ovf:fileRef` of each disk whose `ovf:format` is streamOptimized.
    stream_optimized_refs: Vec<String>,
}

impl Descriptor {
    /// Reads a descriptor.
    pub fn parse(text: &str) -> Result<Descriptor> {
        let mut reader = quick_xml::Reader::from_str(text);
        let mut out = Descriptor::default();
        let mut stack: Vec<String> = Vec::new();
        // The class and instance of the ProductSection being read.
        let mut product: Option<(String, String)> = None;
        loop {
            let position = reader.buffer_position();
            let event = reader
                .read_event()
                .map_err(|e| Error::Descriptor(format!("at byte {position}: {e}")))?;
            match event {
                Event::Start(e) => {
                    out.element(&e, &stack, &mut product)?;
                    stack.push(local(&e));
                }
                Event::Empty(e) => out.element(&e, &stack, &mut product)?,
                Event::End(_) if stack.pop().as_deref() == Some("ProductSection") => {
                    product = None;
                }
                Event::Eof => break,
                _ => {}
            }
        }
        Ok(out)
    }

    /// Whether the referenced file `href` is a streamOptimized disk.
    pub fn is_stream_optimized(&self, href: &str) -> bool {
        self.files
            .iter()
            .any(|f| f.href == href && self.stream_optimized_refs.contains(&f.id))
    }

    /// The property with this key.
    pub fn property(&self, key: &str) -> Option<&Property> {
        self.properties.iter().find(|p| p.key == key)
    }

    fn element(
        &mut self,
        e: &BytesStart<'_>,
        stack: &[String],
        product: &mut Option<(String, String)>,
    ) -> Result<()> {
        let parent = stack.last().map(String::as_str);
        match (local(e).as_str(), parent) {
            ("ProductSection", _) => {
                *product = Some((attr(e, "class")?, attr(e, "instance")?));
            }
            ("Property", Some("ProductSection")) => {
                let key = attr(e, "key")?;
                if key.is_empty() {
                    return Err(Error::Descriptor("a Property without ovf:key".into()));
                }
                let (class, instance) = product.clone().unwrap_or_default();
                let full = [class.as_str(), key.as_str(), instance.as_str()]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(".");
                self.properties.push(Property {
                    key: full,
                    kind: attr(e, "type")?,
                    password: attr(e, "password")? == "true",
                });
            }
            ("Network", Some("NetworkSection")) => self.networks.push(attr(e, "name")?),
            ("File", Some("References")) => self.files.push(FileRef {
                id: attr(e, "id")?,
                href: attr(e, "href")?,
            }),
            ("Disk", Some("DiskSection")) if attr(e, "format")? == STREAM_OPTIMIZED_FORMAT => {
                self.stream_optimized_refs.push(attr(e, "fileRef")?);
            }
            _ => {}
        }
        Ok(())
    }
}

fn local(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.local_name().as_ref()).into_owned()
}

/// The attribute whose local name is `name` (`ovf:key` → `key`), unescaped; `""` if absent.
fn attr(e: &BytesStart<'_>, name: &str) -> Result<String> {
    for a in e.attributes() {
        let a =
            a.map_err(|err| Error::Descriptor(format!("attribute of <{}>: {err}", local(e))))?;
        if a.key.local_name().as_ref() == name.as_bytes() {
            return a
                .unescape_value()
                .map(|v| v.into_owned())
                .map_err(|err| Error::Descriptor(format!("attribute {name}: {err}")));
        }
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Manifest;
    use crate::ovf::{DiskFile, render};

    #[test]
    fn the_appliance_descriptor_is_read() {
        let manifest =
            Manifest::parse(include_str!("../appliance.toml"), "appliance.toml").unwrap();
        let text = render(
            &manifest,
            &DiskFile {
                name: "a-disk1.vmdk".into(),
                file_bytes: 100,
                capacity_bytes: 4 << 20,
                populated_bytes: 10,
            },
        )
        .unwrap();
        let d = Descriptor::parse(&text).unwrap();
        let keys: Vec<&str> = d.properties.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "hostname",
                "ip0",
                "netmask0",
                "gateway",
                "dns",
                "api_token",
                "ssh_authorized_key"
            ]
        );
        assert!(d.property("api_token").unwrap().password);
        assert!(!d.property("hostname").unwrap().password);
        assert_eq!(d.networks, ["VM Network"]);
        assert!(d.is_stream_optimized("a-disk1.vmdk"));
        assert!(!d.is_stream_optimized("other.iso"));
    }

    #[test]
    fn class_and_instance_make_the_full_key() {
        let text = r#"<Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:id="f1" ovf:href="x.iso"/></References><VirtualSystem><ProductSection ovf:class="vami" ovf:instance="vm"><Property ovf:key="ip0" ovf:type="string"/></ProductSection><ProductSection><Property ovf:key="plain" ovf:type="boolean"/></ProductSection></VirtualSystem></Envelope>"#;
        let d = Descriptor::parse(text).unwrap();
        let keys: Vec<&str> = d.properties.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["vami.ip0.vm", "plain"]);
        assert!(!d.is_stream_optimized("x.iso"));
        assert!(Descriptor::parse("<a><b></a>").is_err());
    }
}
