//! The vSphere client and source against rehost-vcsim, the project's vCenter emulator
//! (built by `tests/emulators/install.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../tests/emulators/vcsim/harness.rs"]
mod vcsim;

use std::time::Duration;

use futures::StreamExt;
use rehost_core::{
    ChangeToken, DiskId, ErrorKind, Extent, PowerState, READ_ALIGNMENT, SnapshotOptions, Source,
    VmId,
};
use rehost_vsphere::{
    Client, ConnectOptions, DatastoreFile, Error, ExportOptions, MoRef, Password, Tls,
    VsphereSource,
};
use vcsim::Vcsim;

const DISK_KEY: i32 = 2000;
const MIB: u64 = 1024 * 1024;

fn options(vc: &Vcsim, tls: Tls) -> ConnectOptions {
    let mut o = ConnectOptions::new(&vc.url, &vc.username, Password::new(vc.password.as_str()));
    o.tls = tls;
    o.timeout = Duration::from_secs(30);
    o
}

async fn connect(vc: &Vcsim) -> Client {
    Client::connect(options(vc, Tls::CaFile(vc.ca_pem.clone())))
        .await
        .expect("connect with the emulator's CA")
}

fn start() -> Vcsim {
    Vcsim::start().expect("start rehost-vcsim")
}

#[tokio::test]
async fn login_with_ca_file_or_pinned_thumbprint_reads_about() {
    let vc = start();
    let client = connect(&vc).await;
    assert_eq!(client.about().api_type, "VirtualCenter");
    assert!(!client.about().version.is_empty());
    client.logout().await.unwrap();

    let pinned = Client::connect(options(&vc, Tls::Thumbprint(vc.thumbprint.clone())))
        .await
        .unwrap();
    // Without colons and in lower case, as some tools print it.
    let bare = vc.thumbprint.replace(':', "").to_lowercase();
    Client::connect(options(&vc, Tls::Thumbprint(bare)))
        .await
        .unwrap();
    assert_eq!(pinned.list_vms().await.unwrap().len(), 4);
}

#[tokio::test]
async fn wrong_password_is_invalid_login() {
    let vc = start();
    let mut o = options(&vc, Tls::CaFile(vc.ca_pem.clone()));
    o.password = Password::new("wrong");
    let err = Client::connect(o).await.unwrap_err();
    assert!(matches!(err, Error::InvalidLogin { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    assert!(err.to_string().contains(&vc.username), "{err}");
}

#[tokio::test]
async fn wrong_thumbprint_or_untrusted_ca_is_a_clear_tls_error() {
    let vc = start();
    let wrong = vec!["AB"; 32].join(":");
    let err = Client::connect(options(&vc, Tls::Thumbprint(wrong.clone())))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&vc.thumbprint) && msg.contains(&wrong),
        "{msg}"
    );
    assert!(msg.contains("does not match the pinned"), "{msg}");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);

    // The emulator's CA is in no system store.
    let err = Client::connect(options(&vc, Tls::System))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Tls { .. }), "{err}");
}

#[tokio::test]
async fn lists_vms_with_paths_disks_and_finds_them() {
    let vc = start();
    let client = connect(&vc).await;
    let vms = client.inventory_vms().await.unwrap();
    let mut names: Vec<_> = vms.iter().map(|v| v.info.name.clone()).collect();
    names.sort();
    let mut expected = vc.vm_names().unwrap();
    expected.sort();
    assert_eq!(names, expected);
    let vm0 = vms.iter().find(|v| v.info.name == "DC0_H0_VM0").unwrap();
    assert_eq!(vm0.info.path, "/DC0/vm/DC0_H0_VM0");
    assert_eq!(vm0.datacenter, "DC0");
    assert_eq!(vm0.info.power_state, PowerState::PoweredOn);
    assert_eq!(vm0.info.disks.len(), 1);
    let disk = &vm0.info.disks[0];
    assert_eq!(disk.id.0, DISK_KEY.to_string());
    assert_eq!(disk.capacity_bytes, 64 * MIB);
    assert_eq!(disk.location, "[LocalDS_0] DC0_H0_VM0/disk1.vmdk");
    assert_eq!(disk.unsupported, None);
    assert!(!vm0.info.change_tracking);

    let by_uuid = client.find_vm(&vm0.info.id.0).await.unwrap();
    assert_eq!(by_uuid.moref, vm0.moref);
    let by_name = client.find_vm("DC0_H0_VM0").await.unwrap();
    assert_eq!(by_name.moref, vm0.moref);
    let err = client.find_vm("no-such-vm").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("no-such-vm"), "{err}");
    assert_eq!(client.datacenter_of(&vm0.moref).await.unwrap(), "DC0");
    assert_eq!(
        client
            .find_vm_by_instance_uuid(&vm0.info.id.0)
            .await
            .unwrap(),
        vm0.moref
    );
    let err = client
        .find_vm_by_instance_uuid("00000000-0000-0000-0000-000000000000")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::VmNotFound { .. }), "{err}");
}

#[tokio::test]
async fn small_pages_still_list_every_vm() {
    // Pages of 2 objects: ContinueRetrievePropertiesEx must be followed to the end. (The
    // emulator's govmomi 0.24 ignores maxObjects and answers in one page, so this checks
    // the larger inventory and that the option is accepted; vCenter pages.)
    let vc = Vcsim::start_with(&["--vms", "3"]).unwrap();
    let mut o = options(&vc, Tls::CaFile(vc.ca_pem.clone()));
    o.page_size = 2;
    let client = Client::connect(o).await.unwrap();
    let vms = client.list_vms().await.unwrap();
    assert_eq!(vms.len(), vc.vm_names().unwrap().len());
    assert!(vms.len() > 4);
}

#[tokio::test]
async fn snapshots_are_created_listed_and_removed_idempotently() {
    let vc = start();
    let client = connect(&vc).await;
    let vm = client.find_vm("DC0_H0_VM1").await.unwrap().moref;
    assert!(client.list_snapshots(&vm).await.unwrap().is_empty());

    let s1 = client
        .create_snapshot(&vm, "rehost-1", "first", false, false)
        .await
        .unwrap();
    let s2 = client
        .create_snapshot(&vm, "rehost-2", "second", false, false)
        .await
        .unwrap();
    let list = client.list_snapshots(&vm).await.unwrap();
    let got: Vec<_> = list
        .iter()
        .map(|s| (s.snapshot.clone(), s.name.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![(s1.clone(), "rehost-1"), (s2.clone(), "rehost-2")]
    );
    assert_eq!(list[0].description, "first");
    assert!(!list[0].create_time.is_empty());

    let disks = client.snapshot_disks(&s1).await.unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].key, DISK_KEY);
    assert_eq!(disks[0].file_name, "[LocalDS_0] DC0_H0_VM1/disk1.vmdk");

    client.remove_snapshot(&s1).await.unwrap();
    client.remove_snapshot(&s1).await.unwrap();
    assert_eq!(
        vc.snapshots("DC0_H0_VM1").unwrap(),
        vec!["rehost-2".to_string()]
    );
    client.remove_snapshot(&s2).await.unwrap();
    assert!(client.list_snapshots(&vm).await.unwrap().is_empty());
    assert!(client.running_tasks(&vm).await.unwrap().is_empty());
}

#[tokio::test]
async fn expired_session_is_renewed_transparently() {
    let vc = start();
    let client = connect(&vc).await;
    vc.fail_soap("RetrievePropertiesEx", "NotAuthenticated", 1)
        .unwrap();
    assert_eq!(client.list_vms().await.unwrap().len(), 4);
    // A session that never holds: an error after bounded retries, not a loop.
    vc.fail_soap("RetrievePropertiesEx", "NotAuthenticated", -1)
        .unwrap();
    let err = client.list_vms().await.unwrap_err();
    assert!(matches!(err, Error::NotAuthenticated { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied);
    vc.clear_faults().unwrap();
    assert_eq!(client.list_vms().await.unwrap().len(), 4);
}

#[tokio::test]
async fn missing_privilege_is_named() {
    let vc = start();
    let client = connect(&vc).await;
    let vm = client.find_vm("DC0_H0_VM0").await.unwrap().moref;
    vc.deny_privileges(&["VirtualMachine.State.CreateSnapshot"])
        .unwrap();
    let err = client
        .create_snapshot(&vm, "x", "", false, false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    let msg = err.to_string();
    assert!(msg.contains("VirtualMachine.State.CreateSnapshot"), "{msg}");
    assert!(msg.contains(&vm.value), "{msg}");
}

#[tokio::test]
async fn task_in_progress_is_worth_retrying() {
    let vc = start();
    let client = connect(&vc).await;
    let vm = client.find_vm("DC0_H0_VM0").await.unwrap().moref;
    vc.fail_soap("CreateSnapshot_Task", "TaskInProgress", 1)
        .unwrap();
    let err = client
        .create_snapshot(&vm, "x", "", false, false)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled, "{err}");
}

/// Bytes written at `offset` in `image` and in the emulated guest.
fn write(vc: &Vcsim, image: &mut [u8], vm: &str, offset: u64, data: &[u8]) {
    vc.disk_write(vm, DISK_KEY, offset, data).unwrap();
    let at = usize::try_from(offset).unwrap();
    image[at..at + data.len()].copy_from_slice(data);
}

/// Applies a disk read onto `image`, checking the extents cover the disk in order and are
/// aligned to the 64 KiB grain; returns the data offsets.
async fn apply(read: rehost_core::DiskRead<Error>, image: &mut [u8]) -> Vec<(u64, u64)> {
    let mut at = 0;
    let mut data = Vec::new();
    let mut extents = read.extents;
    while let Some(extent) = extents.next().await {
        let extent = extent.unwrap();
        assert_eq!(extent.offset(), at, "extents are in order without gaps");
        assert_eq!(extent.offset() % READ_ALIGNMENT, 0);
        if let Extent::Data {
            offset,
            data: bytes,
        } = &extent
        {
            let start = usize::try_from(*offset).unwrap();
            image[start..start + bytes.len()].copy_from_slice(bytes);
            data.push((*offset, bytes.len() as u64));
        }
        at = extent.end();
    }
    assert_eq!(at, read.capacity_bytes);
    let sum: u64 = data.iter().map(|(_, l)| l).sum();
    assert_eq!(sum, read.data_bytes);
    data
}

fn covered(data: &[(u64, u64)], offset: u64, len: u64) -> bool {
    data.iter()
        .any(|&(s, l)| s <= offset && offset + len <= s + l)
}

#[tokio::test]
async fn full_then_incremental_reads_give_the_disk_as_snapshotted() {
    let vc = start();
    // Chunked answers: 8 MiB windows over a 64 MiB disk.
    vc.set_cbt_window(8 * MIB).unwrap();
    let client = connect(&vc).await;
    let source = VsphereSource::new(client.clone());
    let name = "DC0_C0_RP0_VM0";
    let vm = client.find_vm(name).await.unwrap();
    let id = VmId(vm.info.id.0.clone());
    let disk = DiskId(DISK_KEY.to_string());

    // CBT off: reading says how to turn it on.
    let opts = |n: &str| SnapshotOptions {
        name: n.into(),
        description: "rehost test".into(),
        quiesce: false,
    };
    let snap = source.snapshot(&id, &opts("off")).await.unwrap();
    let err = source.read_disk(&snap, &disk, None).await.unwrap_err();
    assert!(matches!(err, Error::ChangeTrackingOff { .. }), "{err}");
    assert!(err.to_string().contains("enable"), "{err}");
    source.release(&snap).await.unwrap();

    client.enable_change_tracking(&vm.moref).await.unwrap();
    let mut image = vec![0u8; usize::try_from(64 * MIB).unwrap()];
    write(&vc, &mut image, name, 0, b"boot sector");
    write(&vc, &mut image, name, 9 * MIB + 100, &[7u8; 3000]);
    write(&vc, &mut image, name, 63 * MIB, &[9u8; 4096]);

    let snap1 = source.snapshot(&id, &opts("rehost-1")).await.unwrap();
    assert_eq!(snap1.vm_ref, vm.moref.value);
    // The guest keeps writing; the snapshot must not see it.
    let mut later = image.clone();
    write(&vc, &mut later, name, 20 * MIB, &[5u8; 8192]);
    write(&vc, &mut later, name, 0, b"BOOT");

    let read1 = source.read_disk(&snap1, &disk, None).await.unwrap();
    let token1 = read1.token.clone();
    assert!(!token1.0.is_empty());
    let mut got = vec![0u8; image.len()];
    let data1 = apply(read1, &mut got).await;
    assert!(
        got == image,
        "the full read equals the disk as of the snapshot"
    );
    assert!(
        !covered(&data1, 20 * MIB, 8192),
        "unallocated areas are not read"
    );
    source.release(&snap1).await.unwrap();
    source.release(&snap1).await.unwrap();

    write(&vc, &mut later, name, 40 * MIB, &[3u8; 100]);
    let snap2 = source.snapshot(&id, &opts("rehost-2")).await.unwrap();
    let read2 = source
        .read_disk(&snap2, &disk, Some(&token1))
        .await
        .unwrap();
    assert_ne!(read2.token, token1);
    let data2 = apply(read2, &mut got).await;
    assert!(
        got == later,
        "full + incremental equals the disk as of the second snapshot"
    );
    assert!(covered(&data2, 20 * MIB, 8192) && covered(&data2, 40 * MIB, 100));
    assert!(
        !covered(&data2, 9 * MIB + 100, 3000),
        "unchanged areas are not read"
    );
    source.release(&snap2).await.unwrap();
    assert!(vc.snapshots(name).unwrap().is_empty());

    // QueryChangedDiskAreas directly, across the chunked answers.
    let snap3 = client
        .create_snapshot(&vm.moref, "rehost-3", "", false, false)
        .await
        .unwrap();
    let areas = client
        .changed_areas(&vm.moref, &snap3, DISK_KEY, "*", 64 * MIB)
        .await
        .unwrap();
    for (offset, len) in [(0, 11), (20 * MIB, 8192), (40 * MIB, 100), (63 * MIB, 4096)] {
        assert!(
            areas
                .iter()
                .any(|&(s, l)| s <= offset && offset + len <= s + l)
        );
    }
    let first = client
        .query_changed_disk_areas(&vm.moref, &snap3, DISK_KEY, 0, "*")
        .await
        .unwrap();
    assert_eq!((first.start_offset, first.length), (0, 8 * MIB));
    let stale = ChangeToken("52 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00/1".into());
    let err = client
        .changed_areas(&vm.moref, &snap3, DISK_KEY, &stale.0, 64 * MIB)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::FileFault { .. }), "{err}");
    client.remove_snapshot(&snap3).await.unwrap();
}

#[tokio::test]
async fn datastore_reads_check_ranges_and_retry_transient_failures() {
    let vc = start();
    let client = connect(&vc).await;
    let name = "DC0_H0_VM0";
    vc.disk_write(name, DISK_KEY, MIB, b"hello").unwrap();
    let file = DatastoreFile::new(
        &client,
        "DC0",
        "LocalDS_0",
        &format!("{name}/disk1-flat.vmdk"),
    )
    .unwrap();
    assert_eq!(file.size().await.unwrap(), 64 * MIB);
    assert_eq!(&file.read_range(MIB, 5).await.unwrap()[..], b"hello");

    let path = format!("{name}/disk1-flat.vmdk");
    vc.fail_folder_status(&path, 500, 1).unwrap();
    assert_eq!(&file.read_range(MIB, 5).await.unwrap()[..], b"hello");
    vc.fail_folder_after(&path, 2, 1).unwrap();
    assert_eq!(&file.read_range(MIB, 5).await.unwrap()[..], b"hello");

    // A file that does not exist.
    let missing = DatastoreFile::new(&client, "DC0", "LocalDS_0", "nope/x.vmdk").unwrap();
    assert_eq!(
        missing.read_range(0, 1).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );

    // After logout the session cookie is refused.
    client.logout().await.unwrap();
    let err = file.read_range(MIB, 5).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
}

#[tokio::test]
async fn removing_a_snapshot_that_is_gone_is_ok_and_unknown_vm_is_not_found() {
    let vc = start();
    let client = connect(&vc).await;
    let source = VsphereSource::new(client.clone());
    client
        .remove_snapshot(&MoRef::new("VirtualMachineSnapshot", "snapshot-999"))
        .await
        .unwrap();
    let err = source
        .snapshot(
            &VmId("00000000-0000-0000-0000-000000000000".into()),
            &SnapshotOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn export_is_refused_while_powered_on_and_served_after_power_off() {
    let vc = start();
    let client = connect(&vc).await;
    let name = "DC0_H0_VM1";
    let vm = client.find_vm(name).await.unwrap().moref;
    let err = client.export_vm(&vm).await.unwrap_err();
    assert!(matches!(err, Error::InvalidPowerState { .. }), "{err}");
    assert!(err.to_string().contains("poweredOn"), "{err}");

    vc.disk_write(name, DISK_KEY, 3 * MIB, b"exported bytes")
        .unwrap();
    vc.set_power(name, vcsim::PowerState::Off).unwrap();
    // Leases expire after 1 s without progress; the keep-alive calls every 200 ms.
    vc.set_lease_timeout(1.0).unwrap();
    let lease = client
        .export_vm_with(
            &vm,
            ExportOptions {
                keepalive_interval: Duration::from_millis(200),
                ..ExportOptions::default()
            },
        )
        .await
        .unwrap();
    let urls = lease.disk_urls().unwrap();
    assert_eq!(urls.len(), 1);
    assert!(
        urls[0].1.as_str().starts_with(&vc.base_url),
        "{}",
        urls[0].1
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(client.lease_state(lease.moref()).await.unwrap(), "ready");

    let mut stream = Box::pin(lease.download(&urls[0].1).await.unwrap());
    let mut vmdk = Vec::new();
    while let Some(chunk) = stream.next().await {
        vmdk.extend_from_slice(&chunk.unwrap());
    }
    lease.set_progress(100);
    let moref = lease.moref().clone();
    lease.complete().await.unwrap();
    assert_eq!(client.lease_state(&moref).await.unwrap(), "done");

    // The stream is a streamOptimized VMDK of the disk.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk-0.vmdk");
    std::fs::write(&path, &vmdk).unwrap();
    let disk = rehost_diskimage::Disk::open(path.to_str().unwrap()).unwrap();
    assert_eq!(disk.virtual_size(), 64 * MIB);
    let mut buf = vec![0u8; 14];
    disk.read_at(&mut buf, 3 * MIB).unwrap();
    assert_eq!(&buf, b"exported bytes");

    // A lease dropped without complete() is aborted.
    let dropped = client.export_vm(&vm).await.unwrap();
    let moref = dropped.moref().clone();
    drop(dropped);
    let mut state = String::new();
    for _ in 0..50 {
        state = client.lease_state(&moref).await.unwrap();
        if state == "error" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "error");
}

#[tokio::test]
async fn disk_read_survives_a_dropped_connection_and_refuses_a_delta() {
    let vc = start();
    let client = connect(&vc).await;
    let source = VsphereSource::new(client.clone());
    let name = "DC0_C0_RP0_VM1";
    let vm = client.find_vm(name).await.unwrap();
    let id = VmId(vm.info.id.0.clone());
    let disk = DiskId(DISK_KEY.to_string());
    client.enable_change_tracking(&vm.moref).await.unwrap();
    let mut image = vec![0u8; usize::try_from(64 * MIB).unwrap()];
    write(&vc, &mut image, name, 5 * MIB, &[0xAB; 70_000]);
    let opts = |n: &str| SnapshotOptions {
        name: n.into(),
        ..SnapshotOptions::default()
    };
    let snap1 = source.snapshot(&id, &opts("a")).await.unwrap();
    // The first GET of the base is cut after 1000 bytes: the read is retried.
    vc.fail_folder_after(&format!("{name}/disk1-flat.vmdk"), 1000, 1)
        .unwrap();
    let read = source.read_disk(&snap1, &disk, None).await.unwrap();
    let mut got = vec![0u8; image.len()];
    apply(read, &mut got).await;
    assert!(got == image);

    // A second snapshot while the first exists freezes a delta, which is not read.
    let snap2 = source.snapshot(&id, &opts("b")).await.unwrap();
    let err = source.read_disk(&snap2, &disk, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unsupported, "{err}");
    assert!(err.to_string().contains("other snapshots"), "{err}");
    source.release(&snap2).await.unwrap();
    source.release(&snap1).await.unwrap();
    assert!(vc.snapshots(name).unwrap().is_empty());
}
