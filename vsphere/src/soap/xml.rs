//! A small element tree read from a SOAP reply, keyed by namespace, not by prefix.
//!
//! vCenter writes `xsi:type="VirtualDisk"` where the simulator writes
//! `XMLSchema-instance:type="VirtualDisk"`; both bind their prefix to the
//! XMLSchema-instance namespace, which is what we match. The tree is pure over `&[u8]`
//! (fuzzable) and bounded in depth so a hostile reply cannot overflow the stack.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::reader::NsReader;

/// The XML Schema instance namespace, which carries the `type` attribute.
pub const XSI_NS: &[u8] = b"http://www.w3.org/2001/XMLSchema-instance";
/// The SOAP 1.1 envelope namespace.
pub const SOAP_ENV_NS: &[u8] = b"http://schemas.xmlsoap.org/soap/envelope/";

/// Deeper than any vSphere reply (a snapshot tree of 32 levels, vCenter's own limit, is
/// about 100 elements deep); beyond this the reply is refused rather than recursed into.
const MAX_DEPTH: usize = 512;

/// Why bytes could not be read as an element tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct XmlError(pub String);

/// One element: its local name, its `xsi:type` (without prefix), the `type` attribute a
/// ManagedObjectReference carries, its text and its child elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// Local name (no prefix).
    pub name: String,
    /// True when the element is in the SOAP envelope namespace.
    pub soap_env: bool,
    /// The `xsi:type`, prefix stripped (`vim25:VirtualDisk` → `VirtualDisk`).
    pub xsi_type: Option<String>,
    /// The unqualified `type` attribute (a ManagedObjectReference's type).
    pub type_attr: Option<String>,
    /// Concatenated text content (entities resolved).
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Node>,
}

impl Node {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// Follows a path of child names (`["backing", "fileName"]`).
    pub fn path(&self, names: &[&str]) -> Option<&Node> {
        names.iter().try_fold(self, |n, name| n.child(name))
    }

    /// The text trimmed, for values where surrounding whitespace is formatting.
    pub fn trimmed(&self) -> &str {
        self.text.trim()
    }
}

/// Parses a whole document into its root element.
pub fn parse(bytes: &[u8]) -> Result<Node, XmlError> {
    let mut reader = NsReader::from_reader(bytes);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    loop {
        let position = reader.buffer_position();
        let (ns, event) = reader
            .read_resolved_event()
            .map_err(|e| XmlError(format!("at byte {position}: {e}")))?;
        let soap_env = matches!(ns, ResolveResult::Bound(Namespace(uri)) if uri == SOAP_ENV_NS);
        match event {
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError(format!("nested deeper than {MAX_DEPTH} elements")));
                }
                stack.push(element(&reader, soap_env, &start)?);
            }
            Event::Empty(start) => {
                let node = element(&reader, soap_env, &start)?;
                close(&mut stack, &mut root, node)?;
            }
            Event::End(_) => {
                let node = stack
                    .pop()
                    .ok_or_else(|| XmlError("end tag without a start".into()))?;
                close(&mut stack, &mut root, node)?;
            }
            Event::Text(text) => {
                if let Some(top) = stack.last_mut() {
                    let s = text
                        .xml10_content()
                        .map_err(|e| XmlError(format!("text at byte {position}: {e}")))?;
                    top.text.push_str(&s);
                }
            }
            Event::CData(data) => {
                if let Some(top) = stack.last_mut() {
                    let s = data
                        .xml10_content()
                        .map_err(|e| XmlError(format!("CDATA at byte {position}: {e}")))?;
                    top.text.push_str(&s);
                }
            }
            Event::GeneralRef(r) => {
                let resolved = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .map_err(|e| XmlError(format!("character reference: {e}")))?
                } else {
                    let name = r
                        .decode()
                        .map_err(|e| XmlError(format!("entity reference: {e}")))?;
                    match &*name {
                        "amp" => Some('&'),
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "quot" => Some('"'),
                        "apos" => Some('\''),
                        other => return Err(XmlError(format!("unknown entity &{other};"))),
                    }
                };
                if let (Some(top), Some(c)) = (stack.last_mut(), resolved) {
                    top.text.push(c);
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError(format!(
            "document ends inside <{}>",
            stack.last().map(|n| n.name.as_str()).unwrap_or_default()
        )));
    }
    root.ok_or_else(|| XmlError("no root element".into()))
}

fn close(stack: &mut [Node], root: &mut Option<Node>, node: Node) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(parent) => parent.children.push(node),
        None if root.is_none() => *root = Some(node),
        None => return Err(XmlError("more than one root element".into())),
    }
    Ok(())
}

fn element<R>(
    reader: &NsReader<R>,
    soap_env: bool,
    start: &BytesStart<'_>,
) -> Result<Node, XmlError> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut node = Node {
        name,
        soap_env,
        ..Node::default()
    };
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError(format!("attribute of <{}>: {e}", node.name)))?;
        let (attr_ns, local) = reader.resolve_attribute(attr.key);
        if local.as_ref() != b"type" {
            continue;
        }
        let value = attr
            .unescape_value()
            .map_err(|e| XmlError(format!("attribute of <{}>: {e}", node.name)))?
            .into_owned();
        match attr_ns {
            ResolveResult::Bound(Namespace(uri)) if uri == XSI_NS => {
                // The value is a QName; its prefix names the vim25 namespace, which is
                // the only one types come from.
                let local_type = value.rsplit(':').next().unwrap_or(&value).to_owned();
                node.xsi_type = Some(local_type);
            }
            ResolveResult::Unbound => node.type_attr = Some(value),
            _ => {}
        }
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsi_type_is_matched_by_namespace_whatever_the_prefix() {
        let vc = br#"<a xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><b xsi:type="VirtualDisk"/></a>"#;
        let sim = br#"<a xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance"><b XMLSchema-instance:type="vim25:VirtualDisk"/></a>"#;
        for doc in [&vc[..], &sim[..]] {
            let root = parse(doc).unwrap();
            assert_eq!(root.children[0].xsi_type.as_deref(), Some("VirtualDisk"));
            assert_eq!(root.children[0].type_attr, None);
        }
        // A prefix that is not bound to XMLSchema-instance is not a type.
        let other = br#"<a xmlns:x="urn:other"><b x:type="Nope"/></a>"#;
        assert_eq!(parse(other).unwrap().children[0].xsi_type, None);
    }

    #[test]
    fn moref_type_entities_and_cdata() {
        let doc =
            br#"<r><obj type="VirtualMachine">vm-1</obj><t>a &amp; b &#65;<![CDATA[<c>]]></t></r>"#;
        let root = parse(doc).unwrap();
        let obj = root.child("obj").unwrap();
        assert_eq!(obj.type_attr.as_deref(), Some("VirtualMachine"));
        assert_eq!(obj.text, "vm-1");
        assert_eq!(root.child_text("t"), Some("a & b A<c>"));
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for doc in [
            &b""[..],
            b"<a>",
            b"<a></b>",
            b"<a/><b/>",
            b"<a>&bogus;</a>",
            b"</a>",
            b"<a x='1' x='2'/>",
        ] {
            assert!(parse(doc).is_err(), "{}", String::from_utf8_lossy(doc));
        }
    }

    #[test]
    fn depth_is_bounded() {
        let mut doc = "<a>".repeat(MAX_DEPTH + 1);
        doc.push_str(&"</a>".repeat(MAX_DEPTH + 1));
        assert!(parse(doc.as_bytes()).unwrap_err().0.contains("deeper"));
    }
}
