//! Bytes read as a forward-only streamOptimized VMDK (what an ExportVm download is).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_diskimage::vmdk::StreamReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(reader) = StreamReader::new(data, "fuzz.vmdk".to_owned()) {
        // Bounded: a claimed capacity of terabytes must not make us spin for long.
        for extent in reader.take(4096) {
            if extent.is_err() {
                break;
            }
        }
    }
});
