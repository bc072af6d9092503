//! Bytes fed straight to the VMDK reader, without detection.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_diskimage::{fuzzing, vmdk};

fuzz_target!(|data: &[u8]| {
    fuzzing::exercise_layer(vmdk::open(&rehost_diskimage::MemFs::new(), fuzzing::file("fuzz.vmdk", data)));
});
