//! Replays every sample of `tests/corpus/` (corrupt and hostile images found by the fuzzers
//! or built by hand) through detection, every reader and the chain resolver: each must end
//! in a clean result or a clean error, never a panic or a hang.
//!
//! A sample named `*.err.*` must fail to open, and its error must name the file.

use std::path::Path;
use std::time::{Duration, Instant};

use rehost_diskimage::{Disk, MemFs, fuzzing};

#[test]
fn every_corpus_sample_ends_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut samples: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    samples.sort();
    assert!(
        !samples.is_empty(),
        "the corpus in {} is empty",
        dir.display()
    );
    for path in samples {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let started = Instant::now();
        fuzzing::exercise_disk(&MemFs::new(), &name, &bytes);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name} took {:?}",
            started.elapsed()
        );
        if name.contains(".err.") {
            let err = Disk::from_bytes(&MemFs::new(), &name, bytes).expect_err(&name);
            assert!(
                err.to_string().contains(&name),
                "{name}: error does not name the file: {err}"
            );
        }
    }
}
