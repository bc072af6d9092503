//! A parsed [`Node`] written back as request XML: what a server answered (CreateImportSpec's
//! `importSpec`) is sent back verbatim (ImportVApp's `spec`) without a typed model of the
//! hundreds of vim25 types it may hold.
//!
//! Element names, order and text are kept; a ManagedObjectReference keeps its `type`; an
//! `xsi:type` is written `vim25:T` (the prefix bound on the written root), or `xsd:T` for
//! the XML Schema primitives, whose prefix the request envelope binds.

use std::fmt::Write as _;

use super::xml::Node;
use super::{VIM25_NS, escape};

/// The XML Schema types vim25 values carry (`xsd:string` in an `OptionValue`, …); every
/// other type name is a vim25 one (they are capitalised, these are not).
const XSD_TYPES: &[&str] = &[
    "string",
    "boolean",
    "byte",
    "short",
    "int",
    "long",
    "float",
    "double",
    "decimal",
    "dateTime",
    "base64Binary",
    "anyURI",
    "anyType",
];

/// `node` as an element named `name` (the server's name for it is usually another one:
/// `importSpec` is sent as `spec`), with the `vim25` prefix bound on it.
pub fn to_xml(name: &str, node: &Node) -> String {
    let mut out = String::new();
    write_element(&mut out, name, node, true);
    out
}

fn write_element(out: &mut String, name: &str, node: &Node, root: bool) {
    let _ = write!(out, "<{name}");
    if root {
        let _ = write!(out, " xmlns:vim25=\"{VIM25_NS}\"");
    }
    if let Some(t) = &node.xsi_type {
        let prefix = if XSD_TYPES.contains(&t.as_str()) {
            "xsd"
        } else {
            "vim25"
        };
        let _ = write!(out, " xsi:type=\"{prefix}:{}\"", escape(t));
    }
    if let Some(t) = &node.type_attr {
        let _ = write!(out, " type=\"{}\"", escape(t));
    }
    out.push('>');
    if node.children.is_empty() {
        out.push_str(&escape(&node.text));
    } else {
        // Text between child elements is formatting (vim25 has no mixed content).
        for child in &node.children {
            write_element(out, &child.name, child, false);
        }
    }
    let _ = write!(out, "</{name}>");
}

#[cfg(test)]
mod tests {
    use super::super::{Reply, parse_reply, xml};
    use super::*;

    /// vcsim's (govmomi 0.24) answer to CreateImportSpec for the appliance's descriptor, a
    /// network mapping and one property, captured with curl from rehost-vcsim.
    const CAPTURED: &[u8] = include_bytes!("testdata/create_import_spec.vcsim.xml");

    fn import_spec() -> Node {
        let Reply::Response(response) = parse_reply(CAPTURED).unwrap() else {
            panic!("a fault")
        };
        response.path(&["returnval", "importSpec"]).unwrap().clone()
    }

    #[test]
    fn the_captured_import_spec_is_written_back_faithfully() {
        let spec = import_spec();
        let written = to_xml("spec", &spec);
        assert!(written.starts_with(
            "<spec xmlns:vim25=\"urn:vim25\" xsi:type=\"vim25:VirtualMachineImportSpec\"><configSpec><name>app1</name><version>vmx-14</version>"
        ));
        for fragment in [
            "<deviceChange xsi:type=\"vim25:VirtualDeviceConfigSpec\"><operation>add</operation><device xsi:type=\"vim25:ParaVirtualSCSIController\"><key>-201</key>",
            "<backing xsi:type=\"vim25:VirtualDiskFlatVer2BackingInfo\"><fileName>[LocalDS_0] app1/disk-0.vmdk</fileName><datastore type=\"Datastore\">",
            "<extraConfig xsi:type=\"vim25:OptionValue\"><key>hostname</key><value xsi:type=\"xsd:string\">h1</value></extraConfig>",
            "<resPoolEntity type=\"ResourcePool\">resgroup-22</resPoolEntity></spec>",
            "<summary></summary>",
        ] {
            assert!(written.contains(fragment), "{fragment} not in {written}");
        }
        // Inside a request envelope (which binds xsi and xsd) it parses back to the same
        // tree: names, order, text, types and moref types.
        let mut req = super::super::Request::new(
            "ImportVApp",
            &super::super::MoRef::new("ResourcePool", "resgroup-22"),
        );
        req.raw(&written);
        let root = xml::parse(req.envelope().as_bytes()).unwrap();
        let back = root.children[0].children[0].child("spec").unwrap();
        assert_eq!(back.children, spec.children);
        assert_eq!(back.xsi_type, spec.xsi_type);
    }

    #[test]
    fn text_is_escaped_and_primitive_types_get_xsd() {
        let doc = br#"<v xmlns:x="http://www.w3.org/2001/XMLSchema-instance"><a x:type="xsd:long">5</a><b x:type="vim25:KeyValue"><key>k</key><value>a&lt;b &amp; "c"</value></b></v>"#;
        let node = xml::parse(doc).unwrap();
        assert_eq!(
            to_xml("s", &node),
            "<s xmlns:vim25=\"urn:vim25\"><a xsi:type=\"xsd:long\">5</a><b xsi:type=\"vim25:KeyValue\"><key>k</key><value>a&lt;b &amp; &quot;c&quot;</value></b></s>"
        );
    }
}
