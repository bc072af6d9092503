//! vSphere Web Services SOAP: request envelopes, reply and fault parsing, and the typed
//! model of what rehost reads. Everything here is pure over strings and bytes.

pub mod model;
pub mod write;
pub mod xml;

use std::fmt::Write as _;

pub use model::MoRef;
pub use xml::{Node, XmlError};

/// The vim25 namespace every request body and reply element lives in.
pub const VIM25_NS: &str = "urn:vim25";

/// A request body under construction: `<Method xmlns="urn:vim25"><_this …/>…`.
#[derive(Debug, Clone)]
pub struct Request {
    method: &'static str,
    xml: String,
}

impl Request {
    /// Starts a call of `method` on the managed object `this`.
    pub fn new(method: &'static str, this: &MoRef) -> Self {
        let mut req = Request {
            method,
            xml: format!("<{method} xmlns=\"{VIM25_NS}\">"),
        };
        req.moref("_this", this);
        req
    }

    /// The method's name, for errors.
    pub fn method(&self) -> &'static str {
        self.method
    }

    /// Adds `<name>value</name>`, escaped.
    pub fn text(&mut self, name: &str, value: &str) -> &mut Self {
        let _ = write!(self.xml, "<{name}>{}</{name}>", escape(value));
        self
    }

    /// Adds `<name type="T">value</name>`.
    pub fn moref(&mut self, name: &str, moref: &MoRef) -> &mut Self {
        let _ = write!(
            self.xml,
            "<{name} type=\"{}\">{}</{name}>",
            escape(&moref.kind),
            escape(&moref.value)
        );
        self
    }

    /// Adds already-formed XML (built with [`escape`] by the caller).
    pub fn raw(&mut self, xml: &str) -> &mut Self {
        self.xml.push_str(xml);
        self
    }

    /// The whole SOAP envelope.
    pub fn envelope(&self) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
             <soapenv:Envelope xmlns:soapenv=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\
             <soapenv:Body>{}</{}></soapenv:Body></soapenv:Envelope>",
            self.xml, self.method
        )
    }
}

/// Escapes text for element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
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

/// A SOAP fault as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The vim25 fault type (`InvalidLogin`, `NoPermission`, …), or `""` when the fault
    /// has no detail (a plain SOAP fault).
    pub fault_type: String,
    /// `faultstring`.
    pub message: String,
    /// The detail element (its children hold the fault's fields).
    pub detail: Node,
}

/// What a reply held: the method's response element, or a fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The `<MethodResponse>` element; its `returnval` children are the result.
    Response(Node),
    /// A SOAP fault.
    Fault(Fault),
}

/// Parses a reply envelope.
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, XmlError> {
    let root = xml::parse(bytes)?;
    if root.name != "Envelope" || !root.soap_env {
        return Err(XmlError(format!(
            "root element is <{}>, not a SOAP Envelope",
            root.name
        )));
    }
    let body = root
        .children
        .iter()
        .find(|c| c.name == "Body" && c.soap_env)
        .ok_or_else(|| XmlError("SOAP Envelope without a Body".into()))?;
    let first = body
        .children
        .first()
        .ok_or_else(|| XmlError("empty SOAP Body".into()))?;
    if first.name == "Fault" && first.soap_env {
        return Ok(Reply::Fault(fault(first)));
    }
    Ok(Reply::Response(first.clone()))
}

fn fault(node: &Node) -> Fault {
    let message = node
        .child_text("faultstring")
        .unwrap_or_default()
        .to_owned();
    let detail = node
        .child("detail")
        .and_then(|d| d.children.first())
        .cloned()
        .unwrap_or_default();
    // vCenter types the detail element (`<InvalidLoginFault xsi:type="InvalidLogin">`);
    // without a type the element name, minus its `Fault` suffix, is the type.
    let fault_type = detail.xsi_type.clone().unwrap_or_else(|| {
        detail
            .name
            .strip_suffix("Fault")
            .unwrap_or(&detail.name)
            .to_owned()
    });
    Fault {
        fault_type,
        message,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_envelope_is_escaped_and_closed() {
        let mut req = Request::new("Login", &MoRef::new("SessionManager", "SessionManager"));
        req.text("userName", "a<b&\"c\"");
        let env = req.envelope();
        assert!(env.contains("<Login xmlns=\"urn:vim25\"><_this type=\"SessionManager\">SessionManager</_this><userName>a&lt;b&amp;&quot;c&quot;</userName></Login>"));
        // The envelope parses back.
        let root = xml::parse(env.as_bytes()).unwrap();
        let login = &root.children[0].children[0];
        assert_eq!(login.child_text("userName"), Some("a<b&\"c\""));
    }

    #[test]
    fn vcenter_fault_is_typed() {
        let reply = br#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
<soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Cannot complete login due to an incorrect user name or password.</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let Reply::Fault(f) = parse_reply(reply).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!(f.fault_type, "InvalidLogin");
        assert!(f.message.contains("incorrect user name"));
    }

    #[test]
    fn simulator_fault_with_its_prefix_is_typed() {
        let reply = br#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Permission to perform this operation was denied.</faultstring><detail><Fault xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="NoPermission"><object type="VirtualMachine">vm-42</object><privilegeId>VirtualMachine.State.CreateSnapshot</privilegeId></Fault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        let Reply::Fault(f) = parse_reply(reply).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!(f.fault_type, "NoPermission");
        assert_eq!(
            f.detail.child_text("privilegeId"),
            Some("VirtualMachine.State.CreateSnapshot")
        );
    }

    #[test]
    fn untyped_fault_and_non_soap_replies() {
        let plain = br#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><s:Fault><faultcode>Client</faultcode><faultstring>bad</faultstring></s:Fault></s:Body></s:Envelope>"#;
        let Reply::Fault(f) = parse_reply(plain).unwrap() else {
            panic!("not a fault")
        };
        assert_eq!((f.fault_type.as_str(), f.message.as_str()), ("", "bad"));
        // An HTML error page from a proxy, an envelope in the wrong namespace, no body.
        assert!(parse_reply(b"<html><body>502</body></html>").is_err());
        assert!(parse_reply(br#"<Envelope><Body/></Envelope>"#).is_err());
        assert!(
            parse_reply(br#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"/>"#)
                .is_err()
        );
    }
}
