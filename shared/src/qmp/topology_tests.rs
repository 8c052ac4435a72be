use super::*;

/// Verbatim `query-pci` of the lab VM in EVE's shape (QEMU 7.2, q35; disk0 a virtio-blk-pci
/// behind root port pci.8, disk1 a scsi-hd on HBA scsi1 behind pci.9), with the fields this
/// module does not read (regions, class, ids, irqs, ranges) left out.
pub(crate) const LAB_PCI: &str = r#"[{"bus": 0, "devices": [{"bus": 0, "qdev_id": "", "slot": 0, "function": 0}, {"bus": 0, "qdev_id": "vser0", "slot": 1, "function": 0}, {"bus": 0, "pci_bridge": {"bus": {"secondary": 1, "number": 0, "subordinate": 1}, "devices": [{"bus": 1, "qdev_id": "virtio-disk0", "slot": 0, "function": 0}]}, "qdev_id": "pci.8", "slot": 8, "function": 0}, {"bus": 0, "pci_bridge": {"bus": {"secondary": 2, "number": 0, "subordinate": 2}, "devices": [{"bus": 2, "qdev_id": "scsi1", "slot": 0, "function": 0}]}, "qdev_id": "pci.9", "slot": 9, "function": 0}, {"bus": 0, "qdev_id": "", "slot": 31, "function": 0}, {"bus": 0, "qdev_id": "", "slot": 31, "function": 2}, {"bus": 0, "qdev_id": "", "slot": 31, "function": 3}]}]"#;

/// The same VM's `query-block` (inserted trimmed to `file`).
pub(crate) const LAB_BLOCK: &str = r#"[{"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend", "inserted": {"file": "/lab/mnt/lab/vm0/disk0/disk.img"}}, {"device": "", "qdev": "scsi-disk1", "inserted": {"file": "/lab/mnt/lab/vm0/disk1/disk.img"}}]"#;

/// The lab's topology, SCSI disk as QOM reported it (parent_bus
/// `/machine/peripheral/scsi1/virtio-backend/scsi1.0`, channel 0, scsi-id 0, lun 0,
/// wwn 5764959772534833153).
pub(crate) fn lab() -> Topology {
    Topology {
        pci: pci_functions(serde_json::from_str(LAB_PCI).expect("query-pci")),
        scsi: vec![ScsiDisk {
            qdev: "scsi-disk1".into(),
            hba: device_id("/machine/peripheral/scsi1/virtio-backend/scsi1.0").expect("hba"),
            address: ScsiAddress {
                channel: 0,
                target: 0,
                lun: 0,
            },
            wwn: Some(5764959772534833153),
        }],
        blocks: block_backends(serde_json::from_str(LAB_BLOCK).expect("query-block")),
    }
}

fn pci(bus: i64, slot: i64) -> GuestPci {
    GuestPci {
        domain: 0,
        bus,
        slot,
        function: 0,
    }
}

#[test]
fn devices_are_placed_where_the_guest_numbered_them() {
    let t = lab();
    let disk0 = t.place_of_device("virtio-disk0").expect("disk0");
    assert_eq!(
        disk0,
        Place {
            pci: pci(1, 0),
            scsi: None
        }
    );
    assert_eq!(t.place_behind_port("pci.8").expect("pci.8"), disk0);
    let disk1 = t.place_of_device("scsi-disk1").expect("disk1");
    assert_eq!(disk1.pci, pci(2, 0));
    assert_eq!(
        disk1.scsi,
        Some(ScsiAddress {
            channel: 0,
            target: 0,
            lun: 0
        })
    );
    assert_eq!(t.place_behind_port("pci.9").expect("pci.9").pci, pci(2, 0));
    assert_eq!(
        t.scsi_by_wwn(0x5001405e7a5b0001).expect("wwn").qdev,
        "scsi-disk1"
    );
    assert_eq!(disk1.to_string(), "PCI 0000:02:00.0 SCSI 0:0:0");
}

#[test]
fn unknown_ids_and_unnumbered_ports_are_errors() {
    let t = lab();
    assert_eq!(
        t.place_of_device("virtio-disk7"),
        Err(PlaceError::NoDevice("virtio-disk7".into()))
    );
    // An anonymous device ("" id) is never found by an empty id.
    assert!(t.place_of_device("").is_err());
    assert_eq!(
        t.place_behind_port("pci.3"),
        Err(PlaceError::NoPort("pci.3".into()))
    );
    // A guest that has not programmed the port yet (secondary bus 0).
    let unnumbered = LAB_PCI.replace(r#""secondary": 1"#, r#""secondary": 0"#);
    let t2 = Topology {
        pci: pci_functions(serde_json::from_str(&unnumbered).expect("query-pci")),
        ..Topology::default()
    };
    assert_eq!(
        t2.place_behind_port("pci.8"),
        Err(PlaceError::EmptyPort("pci.8".into()))
    );
    assert_eq!(t.scsi_by_wwn(1), Err(PlaceError::NoWwn(1)));
}

#[test]
fn block_devices_and_ids() {
    let t = lab();
    assert_eq!(t.blocks[0].qdev.as_deref(), Some("virtio-disk0"));
    assert_eq!(t.blocks[1].qdev.as_deref(), Some("scsi-disk1"));
    assert_eq!(
        device_id("/machine/peripheral-anon/device[3]/virtio-backend"),
        None
    );
    assert_eq!(parse_wwn("0x5001405E7A5B0001"), Some(0x5001405e7a5b0001));
    assert_eq!(parse_wwn("5001405e7a5b0001"), Some(0x5001405e7a5b0001));
    assert_eq!(parse_wwn("0x"), None);
    assert_eq!(parse_wwn("0x15001405e7a5b0001"), None);
}
