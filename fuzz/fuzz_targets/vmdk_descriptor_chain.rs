//! A VMDK descriptor naming extents and a parent, with the files it names made from the
//! same input: exercises descriptor parsing, multi-extent layout and chain resolution.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rehost_diskimage::{MemFs, fuzzing};

fuzz_target!(|data: &[u8]| {
    // Split the input: descriptor | extent bytes | parent bytes.
    let mut parts = data.splitn(3, |&b| b == 0xff);
    let descriptor = parts.next().unwrap_or_default();
    let extent = parts.next().unwrap_or_default();
    let parent = parts.next().unwrap_or_default();
    let mut fs = MemFs::new();
    for name in ["disk-flat.vmdk", "disk-s001.vmdk", "disk-f001.vmdk", "extent.vmdk"] {
        fs.insert(name, extent.to_vec());
    }
    fs.insert("parent.vmdk", parent.to_vec());
    fs.insert("disk.vmdk", descriptor.to_vec());
    fuzzing::exercise_disk(&fs, "disk.vmdk", descriptor);
});
