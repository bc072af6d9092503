//! Any bytes, through format detection and whichever reader claims them.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_diskimage::{MemFs, fuzzing};

fuzz_target!(|data: &[u8]| {
    fuzzing::exercise_disk(&MemFs::new(), "fuzz.img", data);
});
