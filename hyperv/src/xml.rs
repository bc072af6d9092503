//! A small element tree of a WS-Management reply, keyed by namespace URI, not by prefix:
//! Windows writes `s:`, `a:`, `w:` and `p:` prefixes, other servers choose their own.
//! Pure over `&[u8]` (fuzzable) and bounded in depth and size.

use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::reader::NsReader;

/// Deeper than any WS-Management reply (an instance is about 10 levels down).
const MAX_DEPTH: usize = 128;

/// Why bytes could not be read as an element tree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct XmlError(pub String);

/// One element: its namespace URI, local name, attributes, text and children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The namespace URI (empty when unbound).
    pub ns: String,
    /// Local name (no prefix).
    pub name: String,
    /// Attributes as (namespace URI, local name, value).
    pub attrs: Vec<(String, String, String)>,
    /// Concatenated text content (entities resolved).
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<Node>,
}

impl Node {
    /// True when the element is `{ns}name`.
    pub fn is(&self, ns: &str, name: &str) -> bool {
        self.ns == ns && self.name == name
    }

    /// The first child `{ns}name`.
    pub fn child(&self, ns: &str, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.is(ns, name))
    }

    /// The first child with this local name, whatever its namespace.
    pub fn child_local(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Follows `(ns, name)` steps down the tree.
    pub fn path(&self, steps: &[(&str, &str)]) -> Option<&Node> {
        steps
            .iter()
            .try_fold(self, |node, (ns, name)| node.child(ns, name))
    }

    /// The value of the attribute `{ns}name` (`ns` empty for an unqualified attribute).
    pub fn attr(&self, ns: &str, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(a_ns, a_name, _)| a_ns == ns && a_name == name)
            .map(|(_, _, v)| v.as_str())
    }

    /// The text trimmed.
    pub fn trimmed(&self) -> &str {
        self.text.trim()
    }

    /// Searches the subtree depth-first for the first `{ns}name`.
    pub fn find(&self, ns: &str, name: &str) -> Option<&Node> {
        if self.is(ns, name) {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(ns, name))
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
        let ns = match ns {
            ResolveResult::Bound(Namespace(uri)) => String::from_utf8_lossy(uri).into_owned(),
            ResolveResult::Unbound => String::new(),
            ResolveResult::Unknown(prefix) => {
                return Err(XmlError(format!(
                    "at byte {position}: undeclared prefix {:?}",
                    String::from_utf8_lossy(&prefix)
                )));
            }
        };
        match event {
            Event::Start(start) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError(format!("nested deeper than {MAX_DEPTH} elements")));
                }
                stack.push(element(&reader, ns, &start)?);
            }
            Event::Empty(start) => {
                let node = element(&reader, ns, &start)?;
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
    if let Some(open) = stack.last() {
        return Err(XmlError(format!("document ends inside <{}>", open.name)));
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

fn element<R>(reader: &NsReader<R>, ns: String, start: &BytesStart<'_>) -> Result<Node, XmlError> {
    let name = String::from_utf8_lossy(start.local_name().as_ref()).into_owned();
    let mut node = Node {
        ns,
        name,
        ..Node::default()
    };
    for attr in start.attributes() {
        let attr = attr.map_err(|e| XmlError(format!("attribute of <{}>: {e}", node.name)))?;
        if attr.key.as_ref().starts_with(b"xmlns") {
            continue;
        }
        let (attr_ns, local) = reader.resolve_attribute(attr.key);
        let attr_ns = match attr_ns {
            ResolveResult::Bound(Namespace(uri)) => String::from_utf8_lossy(uri).into_owned(),
            _ => String::new(),
        };
        let value = attr
            .unescape_value()
            .map_err(|e| XmlError(format!("attribute of <{}>: {e}", node.name)))?
            .into_owned();
        node.attrs.push((
            attr_ns,
            String::from_utf8_lossy(local.as_ref()).into_owned(),
            value,
        ));
    }
    Ok(node)
}

/// Escapes text for an element or attribute value.
pub fn escape(text: &str) -> String {
    quick_xml::escape::escape(text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_and_attributes_are_matched_by_namespace() {
        let a = br#"<s:E xmlns:s="urn:s" xmlns:w="urn:w"><w:Sel w:N="x" Name="InstanceID">a &amp; b</w:Sel></s:E>"#;
        let b = br#"<E xmlns="urn:s"><q:Sel xmlns:q="urn:w" q:N="x" Name="InstanceID">a &amp; b</q:Sel></E>"#;
        for doc in [&a[..], &b[..]] {
            let root = parse(doc).unwrap();
            assert!(root.is("urn:s", "E"));
            let sel = root.child("urn:w", "Sel").unwrap();
            assert_eq!(sel.attr("", "Name"), Some("InstanceID"));
            assert_eq!(sel.attr("urn:w", "N"), Some("x"));
            assert_eq!(sel.text, "a & b");
        }
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for doc in [
            &b"<a><b></a>"[..],
            b"<a>",
            b"",
            b"<a/><b/>",
            b"<x:a/>",
            b"<a>&bogus;</a>",
        ] {
            assert!(parse(doc).is_err(), "{:?}", String::from_utf8_lossy(doc));
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
