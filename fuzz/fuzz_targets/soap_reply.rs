//! A vSphere SOAP reply, as a server (or anything in between) might send it: the envelope
//! parser, then every model reader over each `returnval`. Any input must give a value or
//! an error, never a panic or a hang.
//!
//! `cargo +nightly fuzz run soap_reply corpus/soap_reply seeds/soap_reply` (the seeds are
//! vCenter- and vcsim-shaped replies; the corpus folder is local and ignored).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_vsphere::soap::model::{
    AboutInfo, DiskChangeInfo, HttpNfcLeaseInfo, MoRef, ObjectContent, RetrieveResult,
    ServiceContent, SnapshotInfo, TaskInfo, VirtualDisk,
};
use rehost_vsphere::soap::{Reply, parse_reply};

fuzz_target!(|data: &[u8]| {
    let Ok(Reply::Response(response)) = parse_reply(data) else {
        return;
    };
    let _ = RetrieveResult::from_response(&response);
    for node in response.children.iter() {
        let _ = MoRef::from_node(node);
        let _ = ServiceContent::from_node(node);
        let _ = AboutInfo::from_node(node);
        let _ = ObjectContent::from_node(node);
        let _ = VirtualDisk::from_node(node);
        let _ = VirtualDisk::list(node);
        let _ = TaskInfo::from_node(node);
        let _ = DiskChangeInfo::from_node(node);
        let _ = HttpNfcLeaseInfo::from_node(node);
        let _ = SnapshotInfo::flatten(node);
    }
});
