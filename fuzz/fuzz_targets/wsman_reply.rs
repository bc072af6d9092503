//! WS-Management replies, as a Hyper-V host (or anything in between) might send them:
//! envelopes, faults, enumeration pages, method outputs, embedded CIM-XML instances and
//! sealed NTLM message bodies. Any input must give a value or an error, never a panic.
//!
//! `cargo +nightly fuzz run wsman_reply corpus/wsman_reply seeds/wsman_reply`
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_hyperv::wsman::{self, Instance};

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = wsman::body(data) {
        let _ = wsman::page(&body);
        let _ = wsman::instance(&body);
        let _ = wsman::identity(&body);
        if let Ok(out) = wsman::output(&body, "GetVirtualDiskChanges") {
            let _ = out.u64("ProcessedByteLength");
            let _ = out.texts("ChangedByteOffsets");
            let _ = out.reference("Job");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Instance::from_cim_xml(text);
    }
    let mut sealing = rehost_hyperv::ntlm_seal::Sealing::new(&[7u8; 16]);
    let _ = sealing.unwrap_message(data);
});
