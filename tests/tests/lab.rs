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

/// The lab is in EVE's shape (unless EVESNAP_LAB_SHAPE=serial): no serial anywhere, each disk
/// behind its own root port, and QEMU's view (query-pci, QOM) places every disk exactly where
/// the guest agent reports the filesystem mounted on it.
#[test]
fn the_disks_have_no_serials_and_qemu_places_them_where_the_agent_sees_them() {
    let lab = test_lab();
    if lab.shape != "eve" {
        eprintln!("SKIPPED: the test lab is in the {} shape", lab.shape);
        return;
    }
    let _vm = vm_lock();
    let topology = evesnap::qmp::Qmp::connect(&lab.qmp, Duration::from_secs(5))
        .and_then(|mut q| q.topology())
        .expect("QMP topology");
    let mut agent = evesnap_tests::guest::connect(lab);
    let fsinfo = agent.fsinfo().expect("guest-get-fsinfo");
    let serials =
        evesnap_tests::guest::guest_sh(&mut agent, "cat /sys/block/*/serial 2>/dev/null; true");
    assert_eq!(serials.trim(), "", "the guest sees serials");
    for (dataset, disk) in &lab.disks {
        assert!(disk.get("serial").is_none(), "{dataset}: {disk}");
        let qdev = disk["qdev"].as_str().expect("qdev");
        let port = disk["port"].as_str().expect("port");
        let place = topology.place_of_device(qdev).expect("placed");
        assert_eq!(
            topology
                .place_behind_port(port)
                .expect("behind its port")
                .pci,
            place.pci,
            "{dataset}"
        );
        assert_ne!(
            place.pci.bus, 0,
            "{dataset}: behind a root port, not on the root bus"
        );
        if let Some(wwn) = disk.get("wwn").and_then(|w| w.as_str()) {
            let wwn = evesnap::qmp::topology::parse_wwn(wwn).expect("hex");
            assert_eq!(topology.scsi_by_wwn(wwn).expect("by WWN").qdev, qdev);
            assert!(place.scsi.is_some(), "{dataset}: a SCSI address");
        }
        let mountpoint = &lab.guest_mounts[dataset];
        let fs = fsinfo
            .iter()
            .find(|f| &f.mountpoint == mountpoint)
            .unwrap_or_else(|| panic!("{mountpoint} not mounted: {fsinfo:?}"));
        let seen = &fs.disk[0];
        assert_eq!(
            (seen.pci_controller.bus, seen.pci_controller.slot),
            (place.pci.bus, place.pci.slot),
            "{dataset}: {fs:?}"
        );
        assert!(seen.serial.as_deref().unwrap_or("").is_empty(), "{fs:?}");
    }
}
