//! `rehost appliance package` on a disk that boots Linux (scripts/make-linux-image.sh),
//! with a manifest sized for it: the OVA is a tar in OVF order whose manifest digests hold,
//! and each image — the OVA's streamOptimized VMDK, the VHDX and the fixed VHD — passes
//! `qemu-img check` where qemu has a checker, compares identical to the disk in qemu-img,
//! and reads back through `rehost disk inspect`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn package_makes_an_ova_a_vhdx_and_a_vhd_that_are_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let made = Command::new(root().join("scripts/make-linux-image.sh"))
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let size_mib = std::fs::metadata(&raw).unwrap().len() >> 20;
    let manifest = dir.path().join("appliance.toml");
    let text = std::fs::read_to_string(root().join("appliance-image/appliance.toml"))
        .unwrap()
        .replace("size_mib = 2048", &format!("size_mib = {size_mib}"))
        .replace("esp_mib = 128", "esp_mib = 8");
    std::fs::write(&manifest, text).unwrap();
    let out = dir.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_rehost"))
        .args([
            "appliance",
            "package",
            "--manifest",
            p(&manifest),
            "--disk",
            p(&raw),
        ])
        .args(["--out", p(&out), "--output", "json"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["outputs"].as_array().unwrap().len(), 3, "{report}");

    // The OVA: descriptor, manifest, disk, in that order; nothing else left beside it.
    let ova = out.join("rehost-appliance-0.1.0.ova");
    let listing = Command::new("tar").arg("tf").arg(&ova).output().unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        names,
        [
            "rehost-appliance-0.1.0.ovf",
            "rehost-appliance-0.1.0.mf",
            "rehost-appliance-0.1.0-disk1.vmdk"
        ]
    );
    let mut left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "rehost-appliance-0.1.0.ova",
            "rehost-appliance-0.1.0.vhd",
            "rehost-appliance-0.1.0.vhdx"
        ]
    );
    let extract = dir.path().join("x");
    std::fs::create_dir(&extract).unwrap();
    let untar = Command::new("tar")
        .arg("xf")
        .arg(&ova)
        .arg("-C")
        .arg(&extract)
        .output()
        .unwrap();
    assert!(untar.status.success());
    // The .mf's digests are what sha256sum says.
    let mf = std::fs::read_to_string(extract.join("rehost-appliance-0.1.0.mf")).unwrap();
    for line in mf.lines() {
        let (name, digest) = line
            .strip_prefix("SHA256(")
            .and_then(|r| r.split_once(")= "))
            .unwrap();
        let sum = Command::new("sha256sum")
            .arg(extract.join(name))
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&sum.stdout).starts_with(digest),
            "{name}"
        );
    }
    let ovf = std::fs::read_to_string(extract.join("rehost-appliance-0.1.0.ovf")).unwrap();
    assert!(
        ovf.contains(&format!("ovf:capacity=\"{size_mib}\"")),
        "{ovf}"
    );

    let vmdk = extract.join("rehost-appliance-0.1.0-disk1.vmdk");
    let vhdx = out.join("rehost-appliance-0.1.0.vhdx");
    let vhd = out.join("rehost-appliance-0.1.0.vhd");
    for (image, format, checkable) in [
        (&vmdk, "vmdk", true),
        (&vhdx, "vhdx", true),
        (&vhd, "vpc", false),
    ] {
        if checkable {
            let (ok, text) = qemu_img(&["check", "-f", format, p(image)]);
            assert!(ok, "qemu-img check {}: {text}", image.display());
        }
        let (ok, text) = qemu_img(&["compare", "-f", format, "-F", "raw", p(image), p(&raw)]);
        assert!(
            ok && text.contains("identical"),
            "{}: {text}",
            image.display()
        );
        let inspect = Command::new(env!("CARGO_BIN_EXE_rehost"))
            .args(["disk", "inspect", p(image), "--output", "json"])
            .output()
            .unwrap();
        assert!(
            inspect.status.success(),
            "{}",
            String::from_utf8_lossy(&inspect.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        assert_eq!(info["virtual_size_bytes"], size_mib << 20, "{info}");
    }
    // Azure's rules: a fixed VHD of a whole number of MiB.
    assert_eq!(
        std::fs::metadata(&vhd).unwrap().len(),
        (size_mib << 20) + 512
    );

    // A manifest for another disk size is refused before anything is written.
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(&manifest)
            .unwrap()
            .replace(&format!("size_mib = {size_mib}"), "size_mib = 4096"),
    )
    .unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_rehost"))
        .args([
            "appliance",
            "package",
            "--manifest",
            p(&wrong),
            "--disk",
            p(&raw),
        ])
        .args(["--out", p(&dir.path().join("out2"))])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("size_mib is 4096"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
