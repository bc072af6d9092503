//! Azure answers, as the service (or anything in between) might send them: a Get Page
//! Ranges list and the disk-read plan made from it, Entra ID and IMDS token answers, and
//! Resource Manager and storage error bodies. Any input must give a value or an error,
//! never a panic or a hang.
//!
//! `cargo +nightly fuzz run azure_reply corpus/azure_reply seeds/azure_reply`
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_azure::auth::{parse_entra_answer, parse_imds_answer};
use rehost_azure::error::{parse_arm_error, parse_blob_error};
use rehost_azure::pages::{parse_page_list, plan_areas};

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = parse_page_list(data) {
        // The largest end decides the disk size, so the plan covers every range.
        let capacity = list.ranges.last().map_or(0, |r| r.end);
        let _ = plan_areas(&list.ranges, capacity, 512 * 1024);
    }
    let _ = parse_entra_answer(200, data, "authority", "client");
    let _ = parse_entra_answer(401, data, "authority", "client");
    let _ = parse_imds_answer(200, data, "imds");
    let _ = parse_arm_error(data);
    let _ = parse_blob_error(data, None);
});
