use super::*;

const V2: &str = "root/virtualization/v2";

fn header() -> Header<'static> {
    Header {
        to: "https://hv01:5986/wsman",
        message_id: "uuid:00000000-0000-4000-8000-000000000001",
        max_envelope_size: 512_000,
        timeout_secs: 60,
    }
}

#[test]
fn enumerate_with_wql_is_a_well_formed_envelope() {
    let env = enumerate(
        &header(),
        &class_uri(V2, "*"),
        &Filter::Wql(
            "SELECT * FROM Msvm_ComputerSystem WHERE Caption = \"Virtual Machine\"".into(),
        ),
        50,
    );
    let root = xml::parse(env.xml.as_bytes()).unwrap();
    assert!(root.is(ns::S, "Envelope"));
    let header = root.child(ns::S, "Header").unwrap();
    assert_eq!(
        header.child(ns::A, "Action").unwrap().text,
        "http://schemas.xmlsoap.org/ws/2004/09/enumeration/Enumerate"
    );
    assert_eq!(
        header.child(ns::W, "ResourceURI").unwrap().text,
        "http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/*"
    );
    let filter = root
        .path(&[(ns::S, "Body"), (ns::N, "Enumerate"), (ns::W, "Filter")])
        .unwrap();
    assert_eq!(filter.attr("", "Dialect"), Some(DIALECT_WQL));
    assert_eq!(
        filter.text,
        "SELECT * FROM Msvm_ComputerSystem WHERE Caption = \"Virtual Machine\""
    );
}

#[test]
fn association_filter_carries_the_object_reference() {
    let job = Epr::new(V2, "Msvm_ConcreteJob", &[("InstanceID", "J<1>")]);
    let env = enumerate(
        &header(),
        ALL_CIM_CLASSES,
        &Filter::Associated {
            object: job.clone(),
            association: "Msvm_AffectedJobElement".into(),
            result_class: "Msvm_VirtualSystemSettingData".into(),
        },
        50,
    );
    let root = xml::parse(env.xml.as_bytes()).unwrap();
    let assoc = root
        .path(&[
            (ns::S, "Body"),
            (ns::N, "Enumerate"),
            (ns::W, "Filter"),
            (ns::B, "AssociatedInstances"),
        ])
        .unwrap();
    let object = Epr::from_node(assoc.child(ns::B, "Object").unwrap()).unwrap();
    assert_eq!(object, job);
    assert_eq!(
        assoc.child(ns::B, "ResultClassName").unwrap().text,
        "Msvm_VirtualSystemSettingData"
    );
}

#[test]
fn invoke_writes_references_and_escaped_embedded_instances() {
    let service = Epr::new(
        V2,
        "Msvm_VirtualSystemSnapshotService",
        &[
            ("CreationClassName", "Msvm_VirtualSystemSnapshotService"),
            ("Name", "vssnapsvc"),
        ],
    );
    let vm = Epr::new(
        V2,
        "Msvm_ComputerSystem",
        &[
            ("CreationClassName", "Msvm_ComputerSystem"),
            ("Name", "ABC"),
        ],
    );
    let settings = embedded_instance(
        "Msvm_VirtualSystemSnapshotSettingData",
        &[("ConsistencyLevel", "uint8", "2")],
    );
    let env = invoke(
        &header(),
        &service,
        "CreateSnapshot",
        &[
            ("AffectedSystem", Param::Reference(vm.clone())),
            ("SnapshotSettings", Param::Embedded(settings.clone())),
            ("SnapshotType", Param::Text("32768".into())),
        ],
    );
    assert!(
        env.action
            .ends_with("/Msvm_VirtualSystemSnapshotService/CreateSnapshot")
    );
    let root = xml::parse(env.xml.as_bytes()).unwrap();
    let input = root
        .child(ns::S, "Body")
        .unwrap()
        .child(&service.resource_uri, "CreateSnapshot_INPUT")
        .unwrap();
    let params = Instance::from_node(input);
    assert_eq!(params.reference("AffectedSystem"), Some(&vm));
    assert_eq!(params.text("SnapshotSettings"), Some(settings.as_str()));
    let embedded = Instance::from_cim_xml(&settings).unwrap();
    assert_eq!(embedded.class, "Msvm_VirtualSystemSnapshotSettingData");
    assert_eq!(embedded.u64("ConsistencyLevel").unwrap(), Some(2));
}

const ENUMERATE_REPLY: &str = r#"<s:Envelope xml:lang="en-US" xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" xmlns:n="http://schemas.xmlsoap.org/ws/2004/09/enumeration" xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"><s:Header><a:Action>http://schemas.xmlsoap.org/ws/2004/09/enumeration/EnumerateResponse</a:Action></s:Header><s:Body><n:EnumerateResponse><n:EnumerationContext>uuid:C1</n:EnumerationContext><w:Items><p:Msvm_ComputerSystem xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/Msvm_ComputerSystem" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="p:Msvm_ComputerSystem_Type"><p:Caption>Virtual Machine</p:Caption><p:ElementName>web &amp; db</p:ElementName><p:EnabledState>2</p:EnabledState><p:InstallDate><cim:Datetime>2026-01-02T03:04:05Z</cim:Datetime></p:InstallDate><p:OtherIdentifyingInfo xsi:nil="true"/><p:Name>8F2C1A4B-0000-4000-8000-000000000001</p:Name></p:Msvm_ComputerSystem></w:Items></n:EnumerateResponse></s:Body></s:Envelope>"#;

#[test]
fn enumerate_reply_gives_instances_and_the_context() {
    let body = body(ENUMERATE_REPLY.as_bytes()).unwrap();
    let page = page(&body).unwrap();
    assert_eq!(page.context.as_deref(), Some("uuid:C1"));
    assert!(!page.end);
    let vm = &page.items[0];
    assert_eq!(vm.class, "Msvm_ComputerSystem");
    assert_eq!(vm.text("ElementName"), Some("web & db"));
    assert_eq!(vm.u64("EnabledState").unwrap(), Some(2));
    assert_eq!(vm.text("InstallDate"), Some("2026-01-02T03:04:05Z"));
    assert_eq!(vm.text("OtherIdentifyingInfo"), None);
    assert!(vm.u64("Caption").is_err());
}

#[test]
fn pull_reply_end_of_sequence() {
    let reply = r#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:n="http://schemas.xmlsoap.org/ws/2004/09/enumeration"><s:Body><n:PullResponse><n:Items/><n:EndOfSequence/></n:PullResponse></s:Body></s:Envelope>"#;
    let page = page(&body(reply.as_bytes()).unwrap()).unwrap();
    assert!(page.end);
    assert!(page.items.is_empty());
    // Neither an end nor a way on: refused, not looped on.
    let stuck = r#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:n="http://schemas.xmlsoap.org/ws/2004/09/enumeration"><s:Body><n:PullResponse><n:Items/></n:PullResponse></s:Body></s:Envelope>"#;
    assert!(super::page(&body(stuck.as_bytes()).unwrap()).is_err());
}

#[test]
fn method_output_with_a_job_reference() {
    let reply = r#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"><s:Body><p:CreateSnapshot_OUTPUT xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/Msvm_VirtualSystemSnapshotService"><p:Job><a:Address>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:Address><a:ReferenceParameters><w:ResourceURI>http://schemas.microsoft.com/wbem/wsman/1/wmi/root/virtualization/v2/Msvm_ConcreteJob</w:ResourceURI><w:SelectorSet><w:Selector Name="InstanceID">7D0E</w:Selector><w:Selector Name="__cimnamespace">root/virtualization/v2</w:Selector></w:SelectorSet></a:ReferenceParameters></p:Job><p:ResultingSnapshot xsi:nil="true" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/><p:ReturnValue>4096</p:ReturnValue></p:CreateSnapshot_OUTPUT></s:Body></s:Envelope>"#;
    let out = output(&body(reply.as_bytes()).unwrap(), "CreateSnapshot").unwrap();
    assert_eq!(out.u64("ReturnValue").unwrap(), Some(4096));
    let job = out.reference("Job").unwrap();
    assert_eq!(job.class(), "Msvm_ConcreteJob");
    assert_eq!(job.selector("InstanceID"), Some("7D0E"));
    assert_eq!(out.reference("ResultingSnapshot"), None);
}

#[test]
fn faults_are_read_with_winrm_detail() {
    let reply = r#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"><s:Body><s:Fault><s:Code><s:Value>s:Sender</s:Value><s:Subcode><s:Value>w:AccessDenied</s:Value></s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">Access is denied. </s:Text></s:Reason><s:Detail><f:WSManFault xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault" Code="5" Machine="hv01"><f:Message>Access is denied. </f:Message></f:WSManFault></s:Detail></s:Fault></s:Body></s:Envelope>"#;
    let Err(ReplyError::Fault(fault)) = body(reply.as_bytes()) else {
        panic!("a fault");
    };
    assert_eq!(fault.code, "Sender");
    assert_eq!(fault.subcode, "AccessDenied");
    assert_eq!(fault.wsman_code, Some(5));
    assert_eq!(
        fault.to_string(),
        "AccessDenied: Access is denied. (code 5)"
    );
}

#[test]
fn replies_that_are_not_soap_12_are_malformed() {
    for reply in [
        &b"<html>login</html>"[..],
        br#"<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body/></s:Envelope>"#,
        br#"<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"/>"#,
        b"",
    ] {
        assert!(matches!(body(reply), Err(ReplyError::Malformed(_))));
    }
}

#[test]
fn cim_xml_arrays_and_nulls() {
    let text = r#"<INSTANCE CLASSNAME="Msvm_VirtualHardDiskSettingData"><PROPERTY NAME="Format" TYPE="uint16"><VALUE>3</VALUE></PROPERTY><PROPERTY NAME="ParentPath" TYPE="string"></PROPERTY><PROPERTY.ARRAY NAME="X" TYPE="string"><VALUE.ARRAY><VALUE>a</VALUE><VALUE>b</VALUE></VALUE.ARRAY></PROPERTY.ARRAY></INSTANCE>"#;
    let inst = Instance::from_cim_xml(text).unwrap();
    assert_eq!(inst.u64("Format").unwrap(), Some(3));
    assert_eq!(inst.text("ParentPath"), None);
    assert_eq!(inst.texts("X"), vec!["a", "b"]);
    assert!(Instance::from_cim_xml("<CLASS/>").is_err());
    assert!(Instance::from_cim_xml("not xml").is_err());
}

#[test]
fn message_ids_are_uuid_v4() {
    let id = message_id();
    assert_eq!(id.len(), 41);
    assert!(id.starts_with("uuid:"));
    assert_eq!(&id[19..20], "4");
    assert_ne!(id, message_id());
}

proptest::proptest! {
    #[test]
    fn any_bytes_give_a_reply_or_an_error(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        if let Ok(b) = body(&bytes) {
            let _ = page(&b);
            let _ = output(&b, "M");
        }
    }
}
