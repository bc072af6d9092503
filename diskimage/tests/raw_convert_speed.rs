//! A measurement, not a check (ignored by default): `write::convert_to_raw_file` against
//! `qemu-img convert -O raw` on the benchmark images of `bench/disk.sh`, best of N, with
//! the output checked against the raw disk they were made from. Run with
//!
//! ```sh
//! bench/disk.sh   # once, to build /var/tmp/rehost-bench/{disk.raw,disk.vhdx,disk.vmdk}
//! cargo test --release -p rehost-diskimage --test raw_convert_speed -- --ignored --nocapture
//! ```
//!
//! `RUNS` (default 3) and `IMAGES` (default `disk.vhdx disk.vmdk`) narrow it down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rehost_diskimage::Disk;
use rehost_diskimage::write::convert_to_raw_file;

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap()
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
#[ignore = "a measurement on the bench/disk.sh images, not a check"]
fn convert_to_raw_against_qemu_img() {
    let dir = Path::new(
        &std::env::var("REHOST_BENCH_DIR").unwrap_or_else(|_| "/var/tmp/rehost-bench".into()),
    )
    .to_path_buf();
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let expected = sha256(&dir.join("disk.raw"));
    let out = dir.join("speed-out.raw");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let images = std::env::var("IMAGES").unwrap_or_else(|_| "disk.vhdx disk.vmdk".into());
    for image in images.split_whitespace() {
        let path = dir.join(image);
        let ours = best_of(runs, || {
            let disk = Disk::open(path.to_str().unwrap()).unwrap();
            convert_to_raw_file(&disk, &out, threads, &|_| {}).unwrap();
        });
        assert_eq!(sha256(&out), expected, "{image}: our output differs");
        let qemu = best_of(runs, || {
            let ok = Command::new("qemu-img")
                .args(["convert", "-O", "raw"])
                .arg(&path)
                .arg(&out)
                .status()
                .unwrap()
                .success();
            assert!(ok);
        });
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "{image}: rehost {:.2}s, qemu-img {:.2}s, ratio {:.2} (best of {runs}; load {})",
            ours.as_secs_f64(),
            qemu.as_secs_f64(),
            ours.as_secs_f64() / qemu.as_secs_f64(),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    std::fs::remove_file(out).unwrap();
}
