//! WS-Management messages (DSP0226, with the CIM binding of DSP0227) as WinRM's WMI plugin
//! speaks them: the request envelopes of Identify, Get, Enumerate/Pull and method Invoke,
//! and the replies read back into instances, end-point references and typed faults.
//! Pure over strings and bytes: no I/O here.

use std::fmt::Write as _;

use crate::xml::{self, Node, escape};

/// The namespaces of WS-Management messages.
pub mod ns {
    /// SOAP 1.2.
    pub const S: &str = "http://www.w3.org/2003/05/soap-envelope";
    /// WS-Addressing (2004/08, as WS-Management 1.x uses).
    pub const A: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing";
    /// WS-Management.
    pub const W: &str = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd";
    /// WS-Enumeration.
    pub const N: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration";
    /// Microsoft's WS-Management extensions.
    pub const P: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd";
    /// The CIM binding (association filters).
    pub const B: &str = "http://schemas.dmtf.org/wbem/wsman/1/cimbinding.xsd";
    /// XML Schema instance (`xsi:nil`).
    pub const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";
    /// WS-Management identity (Identify).
    pub const WSMID: &str = "http://schemas.dmtf.org/wbem/wsman/identity/1/wsmanidentity.xsd";
    /// WinRM's fault detail.
    pub const WSMAN_FAULT: &str = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault";
}

const ANONYMOUS: &str = "http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous";
const ACTION_GET: &str = "http://schemas.xmlsoap.org/ws/2004/09/transfer/Get";
const ACTION_ENUMERATE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate";
const ACTION_PULL: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Pull";
const ACTION_RELEASE: &str = "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Release";
/// The WQL filter dialect of WinRM.
pub const DIALECT_WQL: &str = "http://schemas.microsoft.com/wbem/wsman/1/WQL";
/// The association filter dialect of the CIM binding.
pub const DIALECT_ASSOCIATION: &str =
    "http://schemas.dmtf.org/wbem/wsman/1/cimbinding/associationFilter";
/// The resource URI association enumerations go to (WinRM requires this one).
pub const ALL_CIM_CLASSES: &str = "http://schemas.dmtf.org/wbem/wscim/1/*";
/// WMI classes of a namespace are `…/wmi/<namespace>/<class>`.
pub const WMI_BASE: &str = "http://schemas.microsoft.com/wbem/wsman/1/wmi/";

/// The resource URI of a WMI class in a namespace (`root/virtualization/v2`).
pub fn class_uri(namespace: &str, class: &str) -> String {
    format!("{WMI_BASE}{namespace}/{class}")
}

/// An end-point reference: which instance a call is about.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Epr {
    pub resource_uri: String,
    /// Key properties and values, in order.
    pub selectors: Vec<(String, String)>,
}

impl Epr {
    /// The EPR of `class` in `namespace` with these keys.
    pub fn new(namespace: &str, class: &str, keys: &[(&str, &str)]) -> Self {
        Epr {
            resource_uri: class_uri(namespace, class),
            selectors: keys
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// The class named by the resource URI (its last segment).
    pub fn class(&self) -> &str {
        self.resource_uri
            .rsplit('/')
            .next()
            .unwrap_or(&self.resource_uri)
    }

    /// The value of selector `name`.
    pub fn selector(&self, name: &str) -> Option<&str> {
        self.selectors
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn write_selector_set(&self, out: &mut String) {
        out.push_str("<w:SelectorSet>");
        for (name, value) in &self.selectors {
            let _ = write!(
                out,
                "<w:Selector Name=\"{}\">{}</w:Selector>",
                escape(name),
                escape(value)
            );
        }
        out.push_str("</w:SelectorSet>");
    }

    /// The EPR's content as a method parameter or filter object.
    fn write_reference(&self, out: &mut String) {
        let _ = write!(
            out,
            "<a:Address>{ANONYMOUS}</a:Address><a:ReferenceParameters><w:ResourceURI>{}</w:ResourceURI>",
            escape(&self.resource_uri)
        );
        self.write_selector_set(out);
        out.push_str("</a:ReferenceParameters>");
    }

    /// Reads an EPR element (`a:Address` + `a:ReferenceParameters`).
    pub fn from_node(node: &Node) -> Option<Epr> {
        let params = node.child(ns::A, "ReferenceParameters")?;
        let resource_uri = params.child(ns::W, "ResourceURI")?.trimmed().to_owned();
        let selectors = params
            .child(ns::W, "SelectorSet")
            .map(|set| {
                set.children
                    .iter()
                    .filter(|c| c.is(ns::W, "Selector"))
                    .filter_map(|c| Some((c.attr("", "Name")?.to_owned(), c.text.clone())))
                    .collect()
            })
            .unwrap_or_default();
        Some(Epr {
            resource_uri,
            selectors,
        })
    }
}

/// What an Enumerate selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every instance of the resource URI's class.
    All,
    /// A WQL query (`SELECT * FROM Msvm_ComputerSystem WHERE …`).
    Wql(String),
    /// The instances of `result_class` associated to `object` through `association`.
    Associated {
        object: Epr,
        association: String,
        result_class: String,
    },
}

/// A method parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Param {
    /// A scalar, as text (`32768`, `TRUE`, a path).
    Text(String),
    /// A reference to an instance.
    Reference(Epr),
    /// An embedded instance, as CIM-XML text ([`embedded_instance`]).
    Embedded(String),
}

/// A request envelope under construction.
#[derive(Debug)]
pub struct Envelope {
    /// The whole SOAP document.
    pub xml: String,
    /// The `wsa:Action`, for logs and errors.
    pub action: String,
}

/// Parameters every request header carries.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    /// The endpoint URL (`https://hv01:5986/wsman`).
    pub to: &'a str,
    /// A fresh `uuid:…` message id.
    pub message_id: &'a str,
    /// `w:MaxEnvelopeSize` (WinRM's default limit is 512000).
    pub max_envelope_size: u32,
    /// `w:OperationTimeout`, seconds.
    pub timeout_secs: u32,
}

fn envelope(
    header: &Header<'_>,
    action: &str,
    resource_uri: Option<&str>,
    selectors: Option<&Epr>,
    body: &str,
) -> Envelope {
    let mut xml = String::with_capacity(1024 + body.len());
    let _ = write!(
        xml,
        "<s:Envelope xmlns:s=\"{}\" xmlns:a=\"{}\" xmlns:w=\"{}\" xmlns:n=\"{}\" xmlns:p=\"{}\" xmlns:b=\"{}\">",
        ns::S,
        ns::A,
        ns::W,
        ns::N,
        ns::P,
        ns::B
    );
    let _ = write!(
        xml,
        "<s:Header><a:To>{}</a:To><a:ReplyTo><a:Address s:mustUnderstand=\"true\">{ANONYMOUS}</a:Address></a:ReplyTo><a:Action s:mustUnderstand=\"true\">{}</a:Action><w:MaxEnvelopeSize s:mustUnderstand=\"true\">{}</w:MaxEnvelopeSize><a:MessageID>{}</a:MessageID><w:Locale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/><p:DataLocale xml:lang=\"en-US\" s:mustUnderstand=\"false\"/><w:OperationTimeout>PT{}S</w:OperationTimeout>",
        escape(header.to),
        escape(action),
        header.max_envelope_size,
        escape(header.message_id),
        header.timeout_secs
    );
    if let Some(uri) = resource_uri {
        let _ = write!(
            xml,
            "<w:ResourceURI s:mustUnderstand=\"true\">{}</w:ResourceURI>",
            escape(uri)
        );
    }
    if let Some(epr) = selectors {
        epr.write_selector_set(&mut xml);
    }
    let _ = write!(xml, "</s:Header><s:Body>{body}</s:Body></s:Envelope>");
    Envelope {
        xml,
        action: action.to_owned(),
    }
}

/// `Identify`: who the server is (answered without authentication by WinRM).
pub fn identify() -> Envelope {
    let xml = format!(
        "<s:Envelope xmlns:s=\"{}\" xmlns:wsmid=\"{}\"><s:Header/><s:Body><wsmid:Identify/></s:Body></s:Envelope>",
        ns::S,
        ns::WSMID
    );
    Envelope {
        xml,
        action: "Identify".to_owned(),
    }
}

/// `Get` of one instance.
pub fn get(header: &Header<'_>, target: &Epr) -> Envelope {
    envelope(
        header,
        ACTION_GET,
        Some(&target.resource_uri),
        Some(target),
        "",
    )
}

/// `Enumerate` of `resource_uri` with `filter`, items returned in the answer itself
/// (`OptimizeEnumeration`) up to `max_elements` at a time.
pub fn enumerate(
    header: &Header<'_>,
    resource_uri: &str,
    filter: &Filter,
    max_elements: u32,
) -> Envelope {
    let mut body = format!(
        "<n:Enumerate><w:OptimizeEnumeration/><w:MaxElements>{max_elements}</w:MaxElements>"
    );
    match filter {
        Filter::All => {}
        Filter::Wql(query) => {
            let _ = write!(
                body,
                "<w:Filter Dialect=\"{DIALECT_WQL}\">{}</w:Filter>",
                escape(query)
            );
        }
        Filter::Associated {
            object,
            association,
            result_class,
        } => {
            let _ = write!(
                body,
                "<w:Filter Dialect=\"{DIALECT_ASSOCIATION}\"><b:AssociatedInstances><b:Object>"
            );
            object.write_reference(&mut body);
            let _ = write!(
                body,
                "</b:Object><b:AssociationClassName>{}</b:AssociationClassName><b:ResultClassName>{}</b:ResultClassName></b:AssociatedInstances></w:Filter>",
                escape(association),
                escape(result_class)
            );
        }
    }
    body.push_str("</n:Enumerate>");
    envelope(header, ACTION_ENUMERATE, Some(resource_uri), None, &body)
}

/// `Pull`: the next items of an enumeration.
pub fn pull(header: &Header<'_>, resource_uri: &str, context: &str, max_elements: u32) -> Envelope {
    let body = format!(
        "<n:Pull><n:EnumerationContext>{}</n:EnumerationContext><n:MaxElements>{max_elements}</n:MaxElements></n:Pull>",
        escape(context)
    );
    envelope(header, ACTION_PULL, Some(resource_uri), None, &body)
}

/// `Release`: ends an enumeration early.
pub fn release(header: &Header<'_>, resource_uri: &str, context: &str) -> Envelope {
    let body = format!(
        "<n:Release><n:EnumerationContext>{}</n:EnumerationContext></n:Release>",
        escape(context)
    );
    envelope(header, ACTION_RELEASE, Some(resource_uri), None, &body)
}

/// Invokes `method` on the instance `target` (a service) with `params` in order.
pub fn invoke(
    header: &Header<'_>,
    target: &Epr,
    method: &str,
    params: &[(&str, Param)],
) -> Envelope {
    let uri = &target.resource_uri;
    let mut body = format!("<p:{method}_INPUT xmlns:p=\"{}\">", escape(uri));
    for (name, param) in params {
        let _ = write!(body, "<p:{name}>");
        match param {
            Param::Text(text) | Param::Embedded(text) => body.push_str(&escape(text)),
            Param::Reference(epr) => epr.write_reference(&mut body),
        }
        let _ = write!(body, "</p:{name}>");
    }
    let _ = write!(body, "</p:{method}_INPUT>");
    let action = format!("{uri}/{method}");
    envelope(header, &action, Some(uri), Some(target), &body)
}

/// An embedded instance for a method parameter, in CIM-XML (DSP0201) as WMI's
/// `GetText(CIM DTD 2.0)` writes it: `(name, CIM type, value)` per property.
pub fn embedded_instance(class: &str, properties: &[(&str, &str, &str)]) -> String {
    let mut out = format!("<INSTANCE CLASSNAME=\"{}\">", escape(class));
    for (name, ty, value) in properties {
        let _ = write!(
            out,
            "<PROPERTY NAME=\"{}\" TYPE=\"{}\"><VALUE>{}</VALUE></PROPERTY>",
            escape(name),
            escape(ty),
            escape(value)
        );
    }
    out.push_str("</INSTANCE>");
    out
}

/// One property value of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `xsi:nil="true"`, or no VALUE in CIM-XML.
    Nil,
    Text(String),
    Reference(Epr),
}

/// A CIM instance as read from a reply: its class and its properties in document order
/// (an array property repeats its name).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Instance {
    pub class: String,
    pub properties: Vec<(String, Value)>,
}

impl Instance {
    /// Reads an instance element: `<p:CLASS xmlns:p="…/CLASS">` with one child per value.
    pub fn from_node(node: &Node) -> Instance {
        let properties = node
            .children
            .iter()
            .map(|child| {
                let value = if child.attr(ns::XSI, "nil") == Some("true") {
                    Value::Nil
                } else if let Some(epr) = Epr::from_node(child) {
                    Value::Reference(epr)
                } else {
                    // A datetime comes wrapped: `<p:CreationTime><cim:Datetime>…`.
                    Value::Text(collect_text(child))
                };
                (child.name.clone(), value)
            })
            .collect();
        Instance {
            class: node.name.clone(),
            properties,
        }
    }

    /// The text of the first value of `name` (`None` when absent or nil).
    pub fn text(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| match v {
                Value::Text(t) => Some(t.as_str()),
                _ => None,
            })
    }

    /// Every text value of the array property `name`.
    pub fn texts(&self, name: &str) -> Vec<&str> {
        self.properties
            .iter()
            .filter(|(n, _)| n == name)
            .filter_map(|(_, v)| match v {
                Value::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The reference value of `name`.
    pub fn reference(&self, name: &str) -> Option<&Epr> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| match v {
                Value::Reference(epr) => Some(epr),
                _ => None,
            })
    }

    /// `name` as an unsigned number; `Err` names the property and the text.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, String> {
        match self.text(name).map(str::trim) {
            None | Some("") => Ok(None),
            Some(text) => text
                .parse()
                .map(Some)
                .map_err(|_| format!("{}.{name} is {text:?}, not a number", self.class)),
        }
    }

    /// `name` as a boolean (`true`/`TRUE`).
    pub fn bool(&self, name: &str) -> Option<bool> {
        match self.text(name)?.trim() {
            t if t.eq_ignore_ascii_case("true") => Some(true),
            t if t.eq_ignore_ascii_case("false") => Some(false),
            _ => None,
        }
    }

    /// Reads an embedded instance in CIM-XML (`<INSTANCE CLASSNAME=…>` with `PROPERTY`,
    /// `PROPERTY.ARRAY` and `PROPERTY.REFERENCE` children).
    pub fn from_cim_xml(text: &str) -> Result<Instance, String> {
        let root = xml::parse(text.as_bytes()).map_err(|e| format!("embedded instance: {e}"))?;
        if root.name != "INSTANCE" {
            return Err(format!(
                "embedded instance: <{}> where <INSTANCE> was expected",
                root.name
            ));
        }
        let class = root.attr("", "CLASSNAME").unwrap_or_default().to_owned();
        let mut properties = Vec::new();
        for prop in &root.children {
            let Some(name) = prop.attr("", "NAME") else {
                continue;
            };
            match prop.name.as_str() {
                "PROPERTY" => {
                    let value = match prop.child_local("VALUE") {
                        Some(v) => Value::Text(v.text.clone()),
                        None => Value::Nil,
                    };
                    properties.push((name.to_owned(), value));
                }
                "PROPERTY.ARRAY" => {
                    if let Some(array) = prop.child_local("VALUE.ARRAY") {
                        for v in array.children.iter().filter(|c| c.name == "VALUE") {
                            properties.push((name.to_owned(), Value::Text(v.text.clone())));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Instance { class, properties })
    }
}

/// A SOAP fault, as WinRM reports one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fault {
    /// `Sender` or `Receiver`.
    pub code: String,
    /// The subcode's local name (`InvalidSelectors`, `AccessDenied`, `CannotProcessFilter`).
    pub subcode: String,
    /// The reason text.
    pub reason: String,
    /// WinRM's numeric code (`2150858752`, or a Win32 code like 5 for access denied).
    pub wsman_code: Option<u64>,
    /// WinRM's message, when it gives one.
    pub message: Option<String>,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.subcode)?;
        let text = self.message.as_deref().unwrap_or(&self.reason).trim();
        if !text.is_empty() {
            write!(f, ": {text}")?;
        }
        if let Some(code) = self.wsman_code {
            write!(f, " (code {code})")?;
        }
        Ok(())
    }
}

/// Why a reply could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// Not a SOAP 1.2 envelope with a body.
    Malformed(String),
    /// A SOAP fault.
    Fault(Fault),
}

/// Parses a reply and returns its `s:Body`, or its fault.
pub fn body(bytes: &[u8]) -> Result<Node, ReplyError> {
    let root = xml::parse(bytes).map_err(|e| ReplyError::Malformed(e.0))?;
    if !root.is(ns::S, "Envelope") {
        return Err(ReplyError::Malformed(format!(
            "the root element is <{}> in {:?}, not a SOAP 1.2 Envelope",
            root.name, root.ns
        )));
    }
    let body = root
        .children
        .into_iter()
        .find(|c| c.is(ns::S, "Body"))
        .ok_or_else(|| ReplyError::Malformed("the envelope has no Body".into()))?;
    if let Some(fault) = body.child(ns::S, "Fault") {
        return Err(ReplyError::Fault(parse_fault(fault)));
    }
    Ok(body)
}

fn parse_fault(fault: &Node) -> Fault {
    let local = |qname: &str| qname.rsplit(':').next().unwrap_or(qname).trim().to_owned();
    let code = fault
        .path(&[(ns::S, "Code"), (ns::S, "Value")])
        .map(|n| local(&n.text))
        .unwrap_or_default();
    let subcode = fault
        .path(&[(ns::S, "Code"), (ns::S, "Subcode"), (ns::S, "Value")])
        .map(|n| local(&n.text))
        .unwrap_or_default();
    let reason = fault
        .path(&[(ns::S, "Reason"), (ns::S, "Text")])
        .map(|n| n.trimmed().to_owned())
        .unwrap_or_default();
    let detail = fault.find(ns::WSMAN_FAULT, "WSManFault");
    let wsman_code = detail
        .and_then(|d| d.attr("", "Code"))
        .and_then(|c| c.trim().parse().ok());
    let message = detail
        .and_then(|d| d.find(ns::WSMAN_FAULT, "Message"))
        .map(|m| collect_text(m).trim().to_owned())
        .filter(|m| !m.is_empty());
    Fault {
        code,
        subcode,
        reason,
        wsman_code,
        message,
    }
}

fn collect_text(node: &Node) -> String {
    let mut text = node.text.clone();
    for child in &node.children {
        text.push_str(&collect_text(child));
    }
    text
}

/// The items and continuation of an EnumerateResponse or PullResponse body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    pub items: Vec<Instance>,
    /// The context to Pull with, unless the sequence ended.
    pub context: Option<String>,
    pub end: bool,
}

/// Reads an EnumerateResponse or PullResponse.
pub fn page(body: &Node) -> Result<Page, String> {
    let response = body
        .child(ns::N, "EnumerateResponse")
        .or_else(|| body.child(ns::N, "PullResponse"))
        .ok_or("the body is neither an EnumerateResponse nor a PullResponse")?;
    let items = response
        .child(ns::W, "Items")
        .or_else(|| response.child(ns::N, "Items"))
        .map(|items| items.children.iter().map(Instance::from_node).collect())
        .unwrap_or_default();
    let end = response.child(ns::W, "EndOfSequence").is_some()
        || response.child(ns::N, "EndOfSequence").is_some();
    let context = response
        .child(ns::N, "EnumerationContext")
        .map(|c| c.trimmed().to_owned())
        .filter(|c| !c.is_empty());
    if !end && context.is_none() {
        return Err("the enumeration neither ended nor gave a context to continue".into());
    }
    Ok(Page {
        items,
        context,
        end,
    })
}

/// Reads a Get reply: the one instance in the body.
pub fn instance(body: &Node) -> Result<Instance, String> {
    body.children
        .first()
        .map(Instance::from_node)
        .ok_or_else(|| "the Get reply's body is empty".to_owned())
}

/// Reads a method's `<p:METHOD_OUTPUT>` as an instance of its out parameters.
pub fn output(body: &Node, method: &str) -> Result<Instance, String> {
    let name = format!("{method}_OUTPUT");
    body.children
        .iter()
        .find(|c| c.name == name)
        .map(Instance::from_node)
        .ok_or_else(|| format!("the reply has no {name}"))
}

/// Reads an Identify reply: (vendor, version).
pub fn identity(body: &Node) -> Result<(String, String), String> {
    let response = body
        .child(ns::WSMID, "IdentifyResponse")
        .ok_or("the reply is not an IdentifyResponse")?;
    let text = |name| {
        response
            .child(ns::WSMID, name)
            .map(|n| n.trimmed().to_owned())
            .unwrap_or_default()
    };
    Ok((text("ProductVendor"), text("ProductVersion")))
}

/// A fresh `uuid:` message id (random, version 4).
pub fn message_id() -> String {
    let mut b = [0u8; 16];
    // The id only has to be unique; a failing OS generator falls back to the clock.
    if getrandom::getrandom(&mut b).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b = nanos.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "uuid:{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests;
