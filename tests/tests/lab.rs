//! The lab is real: its VM runs, its agent answers through the socket and sees the two
//! disks mounted, and zfs-fuse holds the datasets whose images are those disks.

use std::time::Duration;

use evesnap_tests::lab::{test_lab, vm_lock};
use evesnap_tests::zfs::zfs;

#[test]
fn zfs_lists_the_lab_datasets_with_their_images() {
    let lab = test_lab();
    let out = zfs(&[
        "list",
        "-H",
        "-o",
        "name,mountpoint",
        "-r",
        &format!("{}/lab", lab.pool),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    for dataset in &lab.datasets {
        let line = listing
            .lines()
            .find(|l| l.split('\t').next() == Some(dataset.as_str()))
            .unwrap_or_else(|| panic!("{dataset} not in zfs list:\n{listing}"));
        let mountpoint = line.split('\t').nth(1).expect("mountpoint column");
        let image = std::path::Path::new(mountpoint).join("disk.img");
        assert!(
            image.metadata().map(|m| m.len() > 0).unwrap_or(false),
            "{} missing",
            image.display()
        );
    }
    assert_eq!(lab.guest_mounts.len(), 2);
}

#[test]
fn qmp_reports_the_vm_running() {
    let lab = test_lab();
    let _vm = vm_lock();
    let mut qmp =
        evesnap::qmp::Qmp::connect(&lab.qmp, Duration::from_secs(5)).expect("QMP connects");
    let status = qmp.status().expect("query-status");
    assert!(status.running, "{status:?}");
    assert_eq!(status.state, "running");
}

#[test]
fn lab_status_prints_the_same_object_as_up() {
    let lab = test_lab();
    let out = evesnap_tests::lab::lab_command(&["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: evesnap_tests::lab::Lab = serde_json::from_slice(&out.stdout).expect("lab object");
    assert_eq!(status.qemu_pid, lab.qemu_pid);
    assert_eq!(status.agent, lab.agent);
}
