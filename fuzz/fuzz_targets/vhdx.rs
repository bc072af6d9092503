//! Bytes fed straight to the VHDX reader, without detection.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_diskimage::{fuzzing, vhdx};

fuzz_target!(|data: &[u8]| {
    fuzzing::exercise_layer(vhdx::open(fuzzing::file("fuzz.vhdx", data)));
});
