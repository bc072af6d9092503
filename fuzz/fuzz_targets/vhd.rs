//! Bytes fed straight to the VHD reader, without detection.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_diskimage::{fuzzing, vhd};

fuzz_target!(|data: &[u8]| {
    fuzzing::exercise_layer(vhd::open(fuzzing::file("fuzz.vhd", data)));
});
