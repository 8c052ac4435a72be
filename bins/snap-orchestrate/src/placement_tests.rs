use evesnap::qga::commands::GuestFilesystemInfo;
use evesnap::qmp::topology::{BlockBackend, PciFunction, ScsiAddress, ScsiDisk};

use super::*;

fn at(bus: i64, slot: i64) -> GuestPci {
    GuestPci {
        domain: 0,
        bus,
        slot,
        function: 0,
    }
}

/// The lab VM in EVE's shape, as QMP reported it (shared/src/qmp/topology_tests.rs has the
/// verbatim replies): virtio-disk0 behind root port pci.8 (bus 1), scsi-disk1 on HBA scsi1
/// behind pci.9 (bus 2).
fn lab() -> Topology {
    let f = |qdev: &str, bus, slot, secondary| PciFunction {
        qdev: qdev.into(),
        at: at(bus, slot),
        secondary_bus: secondary,
    };
    Topology {
        pci: vec![
            f("vser0", 0, 1, None),
            f("pci.8", 0, 8, Some(1)),
            f("virtio-disk0", 1, 0, None),
            f("pci.9", 0, 9, Some(2)),
            f("scsi1", 2, 0, None),
        ],
        scsi: vec![ScsiDisk {
            qdev: "scsi-disk1".into(),
            hba: "scsi1".into(),
            address: ScsiAddress {
                channel: 0,
                target: 0,
                lun: 0,
            },
            wwn: Some(0x5001405e7a5b0001),
        }],
        blocks: vec![
            BlockBackend {
                qdev: Some("virtio-disk0".into()),
                file: "/lab/mnt/lab/vm0/disk0/disk.img".into(),
            },
            BlockBackend {
                qdev: Some("scsi-disk1".into()),
                file: "/lab/mnt/lab/vm0/disk1/disk.img".into(),
            },
        ],
    }
}

/// Verbatim `guest-get-fsinfo` of the lab guest in EVE's shape (no serials anywhere).
const FSINFO: &str = r#"[{"name": "sda", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "scsi", "bus": 0, "unit": 0, "pci-controller": {"bus": 2, "slot": 0, "domain": 0, "function": 0}, "dev": "/dev/sda", "target": 0}], "used-bytes": 14336, "type": "ext4"}, {"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 1, "slot": 0, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}]"#;

fn fsinfo() -> Vec<GuestFilesystemInfo> {
    serde_json::from_str(FSINFO).expect("fsinfo")
}

fn disk(json: &str) -> GuestDisk {
    serde_json::from_str(json).expect(json)
}

fn lab_disks() -> BTreeMap<String, GuestDisk> {
    BTreeMap::from([
        (
            "p/disk0".to_string(),
            disk(r#"{"qdev": "virtio-disk0", "port": "pci.8"}"#),
        ),
        (
            "p/disk1".to_string(),
            disk(r#"{"qdev": "scsi-disk1", "port": "pci.9", "wwn": "0x5001405e7a5b0001"}"#),
        ),
    ])
}

/// Which of the placed volumes the agent's filesystem at `mountpoint` designates.
fn designated(placed: &BTreeMap<String, Located>, mountpoint: &str) -> Vec<String> {
    let fs = fsinfo();
    let fs = fs
        .iter()
        .find(|f| f.mountpoint == mountpoint)
        .expect("mounted");
    placed
        .iter()
        .filter(|(_, l)| fs.disk.iter().any(|a| compare_address(l, a).designates()))
        .map(|(d, _)| d.clone())
        .collect()
}

#[test]
fn eve_shaped_disks_are_found_without_serials() {
    let placed = locate_all(&lab_disks(), Some(&lab())).expect("placed");
    assert_eq!(designated(&placed, "/data0"), ["p/disk0"]);
    assert_eq!(designated(&placed, "/data1"), ["p/disk1"]);
    // Each way alone finds the same disk.
    for json in [
        r#"{"qdev": "scsi-disk1"}"#,
        r#"{"port": "pci.9"}"#,
        r#"{"wwn": "5001405E7A5B0001"}"#,
    ] {
        let one = BTreeMap::from([("p/disk1".to_string(), disk(json))]);
        let placed = locate_all(&one, Some(&lab())).expect(json);
        assert_eq!(designated(&placed, "/data1"), ["p/disk1"], "{json}");
        assert!(designated(&placed, "/data0").is_empty(), "{json}");
    }
}

#[test]
fn contradictions_and_unknown_disks_are_refused() {
    for (json, needle) in [
        (
            r#"{"qdev": "virtio-disk0", "port": "pci.9"}"#,
            "but root port",
        ),
        (
            r#"{"qdev": "virtio-disk0", "wwn": "0x5001405e7a5b0001"}"#,
            "not on",
        ),
        (r#"{"qdev": "virtio-disk9"}"#, "no device"),
        (
            r#"{"qdev": "virtio-disk0", "pci": "0000:00:07.0"}"#,
            "but QEMU device",
        ),
    ] {
        let one = BTreeMap::from([("p/d".to_string(), disk(json))]);
        let e = locate_all(&one, Some(&lab())).expect_err(json);
        assert!(e.contains(needle), "{json}: {e}");
    }
    let e = locate(&disk(r#"{"port": "pci.8"}"#), None).expect_err("no qmp");
    assert!(e.contains("QMP"), "{e}");
    // Two volumes at one place (a guest numbering two ports alike) cannot be told apart.
    let twice = BTreeMap::from([
        ("p/a".to_string(), disk(r#"{"qdev": "virtio-disk0"}"#)),
        ("p/b".to_string(), disk(r#"{"port": "pci.8"}"#)),
    ]);
    assert!(locate_all(&twice, Some(&lab()))
        .expect_err("twice")
        .contains("both at"));
}

#[test]
fn scsi_address_and_serial_are_checked_too() {
    let placed = locate(&disk(r#"{"qdev": "scsi-disk1"}"#), Some(&lab())).expect("placed");
    let fs = fsinfo();
    let mut address = fs[0].disk[0].clone();
    assert!(compare_address(&placed, &address).designates());
    address.target = 1; // another disk on the same HBA
    assert!(!compare_address(&placed, &address).designates());
    // A serial, where both sides have one, must agree as well.
    let with_serial = Located {
        serial: Some("vol1".into()),
        ..placed.clone()
    };
    let mut address = fs[0].disk[0].clone();
    address.serial = Some("vol9".into());
    let c = compare_address(&with_serial, &address);
    assert!(!c.designates() && c.may_be());
}

#[test]
fn disks_come_from_qemu_by_the_files_on_the_datasets() {
    let mountpoints = BTreeMap::from([
        ("p/disk0".to_string(), "/lab/mnt/lab/vm0/disk0".to_string()),
        ("p/disk1".to_string(), "/lab/mnt/lab/vm0/disk1".to_string()),
        ("p/disk".to_string(), "/lab/mnt/lab/vm0/disk".to_string()),
    ]);
    let datasets = ["p/disk0".to_string(), "p/disk1".to_string()];
    let found = disks_from_qemu(&lab(), &mountpoints, &datasets).expect("found");
    assert_eq!(found["p/disk0"].qdev.as_deref(), Some("virtio-disk0"));
    assert_eq!(found["p/disk1"].qdev.as_deref(), Some("scsi-disk1"));
    // `/lab/mnt/lab/vm0/disk` is a prefix of the others' paths, not a parent folder.
    let e = disks_from_qemu(&lab(), &mountpoints, &["p/disk".to_string()]).expect_err("none");
    assert!(e.contains("no disk"), "{e}");
    // A zvol is found by its /dev/zvol path.
    let mut t = lab();
    t.blocks[0].file = "/dev/zvol/persist/vault/volumes/v.1".into();
    let found = disks_from_qemu(
        &t,
        &BTreeMap::new(),
        &["persist/vault/volumes/v.1".to_string()],
    )
    .expect("zvol");
    assert_eq!(
        found["persist/vault/volumes/v.1"].qdev.as_deref(),
        Some("virtio-disk0")
    );
}
