//! Which of this VM's volumes a guest's request is about. Security critical: the guest is
//! untrusted, so only the guest agent's `guest-get-fsinfo` and the host's own volumes map
//! decide; the guest's claims (serial, PCI address) may only narrow, never widen, and a
//! claim that contradicts the agent is refused.

use std::collections::{BTreeMap, BTreeSet};

use evesnap::exit::Exit;
use evesnap::qga::commands::GuestFilesystemInfo;
use evesnap::qmp::topology::GuestPci;
use evesnap::request::{DiskRef, ReplyError};

use crate::guest::parse_pci;
use crate::placement::{agent_pci, compare, compare_address, Located};

/// This VM's volumes, placed in the guest (`placement::locate_all`).
pub type Placed = BTreeMap<String, Located>;

/// The volumes the request is about, and the guest mountpoints on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    pub datasets: Vec<String>,
    pub mountpoints: Vec<String>,
}

/// A refusal the guest is told: `kind`, the host's exit code, why.
pub(super) fn refuse(kind: &str, exit: Exit, message: String) -> ReplyError {
    ReplyError {
        kind: kind.into(),
        code: exit.code(),
        message,
        step: None,
        problems: Vec::new(),
        ..ReplyError::default()
    }
}

fn unknown(message: String) -> ReplyError {
    refuse("unknown-disk", Exit::Preflight, message)
}

/// Finds the volumes of `volumes` that the guest's `disk` designates. `fsinfo` is the
/// guest agent's `guest-get-fsinfo` (`None` when it could not be asked: only the guest's
/// sysfs claims are left then).
pub fn identify(
    volumes: &Placed,
    disk: &DiskRef,
    fsinfo: Option<&[GuestFilesystemInfo]>,
) -> Result<Identified, ReplyError> {
    let claimed_pci = match disk.pci.as_deref() {
        Some(text) => Some(
            parse_pci(text)
                .map(|(domain, bus, slot, function)| GuestPci {
                    domain,
                    bus,
                    slot,
                    function,
                })
                .ok_or_else(|| {
                    refuse(
                        "bad-request",
                        Exit::Usage,
                        format!("`disk.pci` {text:?} is not domain:bus:slot.function"),
                    )
                })?,
        ),
        None => None,
    };
    let claimed: Vec<&String> = volumes
        .iter()
        .filter(|(_, e)| compare(e, disk.serial.as_deref(), claimed_pci, None).designates())
        .map(|(d, _)| d)
        .collect();
    let describe_claim = || {
        format!(
            "serial {}, PCI address {}",
            disk.serial.as_deref().unwrap_or("(none)"),
            disk.pci.as_deref().unwrap_or("(none)")
        )
    };

    if let Some(fsinfo) = fsinfo {
        let hits: Vec<&GuestFilesystemInfo> = match (&disk.mountpoint, &disk.device) {
            (Some(mountpoint), _) => fsinfo
                .iter()
                .filter(|fs| fs.mountpoint == *mountpoint)
                .collect(),
            (None, Some(device)) => fsinfo
                .iter()
                .filter(|fs| {
                    format!("/dev/{}", fs.name) == *device
                        || fs.disk.iter().any(|a| a.dev.as_deref() == Some(device))
                })
                .collect(),
            (None, None) => Vec::new(),
        };
        if !hits.is_empty() {
            let mut datasets = BTreeSet::new();
            for fs in &hits {
                if fs.disk.is_empty() {
                    return Err(unknown(format!(
                        "the guest agent reports no disk under {} ({}): it is not one of this VM's volumes",
                        fs.mountpoint, fs.name
                    )));
                }
                for address in &fs.disk {
                    let serial = address.serial.as_deref().filter(|s| !s.is_empty());
                    let pci = agent_pci(address);
                    let found: Vec<&String> = volumes
                        .iter()
                        .filter(|(_, e)| compare_address(e, address).designates())
                        .map(|(d, _)| d)
                        .collect();
                    match found.as_slice() {
                        [dataset] => {
                            datasets.insert((*dataset).clone());
                        }
                        _ => {
                            let pci = pci.map_or("(none)".to_string(), |p| p.to_string());
                            return Err(unknown(format!(
                                "{} is on a disk that is not one of this VM's volumes (the guest agent reports serial {}, PCI address {pci})",
                                disk.path,
                                serial.unwrap_or("(none)"),
                            )));
                        }
                    }
                }
            }
            if (disk.serial.is_some() || disk.pci.is_some())
                && !claimed.iter().any(|d| datasets.contains(*d))
            {
                return Err(unknown(format!(
                    "{}: the disk the guest describes ({}) is not the one the guest agent reports under it",
                    disk.path,
                    describe_claim()
                )));
            }
            let entries: Vec<&Located> = datasets.iter().filter_map(|d| volumes.get(d)).collect();
            let mountpoints: Vec<String> = fsinfo
                .iter()
                .filter(|fs| {
                    fs.disk
                        .iter()
                        .any(|a| entries.iter().any(|e| compare_address(e, a).designates()))
                })
                .map(|fs| fs.mountpoint.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            return Ok(Identified {
                datasets: datasets.into_iter().collect(),
                mountpoints,
            });
        }
        if let Some(mountpoint) = &disk.mountpoint {
            return Err(unknown(format!(
                "the guest agent does not list {mountpoint} as a mounted filesystem"
            )));
        }
    }
    // Not mounted: the guest's sysfs claims, checked against this VM's map only.
    if disk.serial.is_none() && disk.pci.is_none() {
        return Err(unknown(format!(
            "{} is not mounted and the guest sent neither its serial nor its PCI address",
            disk.path
        )));
    }
    match claimed.as_slice() {
        [dataset] => Ok(Identified {
            datasets: vec![(*dataset).clone()],
            mountpoints: Vec::new(),
        }),
        _ => Err(unknown(format!(
            "{} ({}) is not one of this VM's volumes",
            disk.path,
            describe_claim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::volumes::tests::volumes;
    use crate::serve::Volumes;

    fn placed(volumes: &Volumes) -> Placed {
        crate::placement::locate_all(volumes, None).expect("placed")
    }

    // Verbatim from qemu-ga 7.2 in the lab guest (no udev: no serial).
    const LAB: &str = r#"[{"name": "vdb", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 8, "domain": 0, "function": 0}, "dev": "/dev/vdb", "target": 0}], "used-bytes": 14336, "type": "ext4"}, {"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 7, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}]"#;

    fn fsinfo(json: &str) -> Vec<GuestFilesystemInfo> {
        serde_json::from_str(json).expect("fsinfo")
    }

    fn disk(
        path: &str,
        device: &str,
        mountpoint: Option<&str>,
        serial: Option<&str>,
        pci: Option<&str>,
    ) -> DiskRef {
        DiskRef {
            path: path.into(),
            device: Some(device.into()),
            mountpoint: mountpoint.map(str::to_string),
            serial: serial.map(str::to_string),
            pci: pci.map(str::to_string),
        }
    }

    #[test]
    fn a_mounted_disk_is_found_through_the_agent() {
        let fs = fsinfo(LAB);
        let d = disk(
            "/data0",
            "/dev/vda",
            Some("/data0"),
            Some("disk0"),
            Some("0000:00:07.0"),
        );
        let id = identify(&placed(&volumes()), &d, Some(&fs)).expect("identified");
        assert_eq!(
            id,
            Identified {
                datasets: vec!["pool/vm0/disk0".into()],
                mountpoints: vec!["/data0".into()]
            }
        );
        // By device, without claims.
        let d = disk("/dev/vdb", "/dev/vdb", None, None, None);
        assert_eq!(
            identify(&placed(&volumes()), &d, Some(&fs))
                .expect("identified")
                .datasets,
            ["pool/vm0/disk1"]
        );
    }

    #[test]
    fn claims_that_contradict_the_agent_are_refused() {
        let fs = fsinfo(LAB);
        let d = disk("/data0", "/dev/vda", Some("/data0"), Some("disk1"), None);
        let e = identify(&placed(&volumes()), &d, Some(&fs)).expect_err("contradiction");
        assert_eq!((e.kind.as_str(), e.code), ("unknown-disk", 7));
        assert!(
            e.message.contains("not the one the guest agent reports"),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_unmounted_disk_is_found_by_its_claims_within_the_map_only() {
        let fs = fsinfo(
            &LAB.replace("/data0", "/elsewhere")
                .replace("\"vda\"", "\"vdz\"")
                .replace("/dev/vda", "/dev/vdz"),
        );
        let d = disk(
            "/dev/vda",
            "/dev/vda",
            None,
            Some("disk0"),
            Some("0000:00:07.0"),
        );
        assert_eq!(
            identify(&placed(&volumes()), &d, Some(&fs))
                .expect("identified")
                .datasets,
            ["pool/vm0/disk0"]
        );
        // Serial of one volume, PCI address of the other: no.
        let d = disk(
            "/dev/vda",
            "/dev/vda",
            None,
            Some("disk0"),
            Some("0000:00:08.0"),
        );
        assert_eq!(
            identify(&placed(&volumes()), &d, Some(&fs))
                .expect_err("mixed")
                .kind,
            "unknown-disk"
        );
        // Another VM's serial: no.
        let d = disk("/dev/vdc", "/dev/vdc", None, Some("other-vm-disk"), None);
        assert!(identify(&placed(&volumes()), &d, Some(&fs))
            .expect_err("foreign")
            .message
            .contains("not one of this VM's volumes"));
        // Nothing to go by: no.
        let d = disk("/dev/vdc", "/dev/vdc", None, None, None);
        assert_eq!(
            identify(&placed(&volumes()), &d, None)
                .expect_err("nothing")
                .kind,
            "unknown-disk"
        );
        // A mountpoint the agent does not know: no.
        let d = disk("/data9", "/dev/vda", Some("/data9"), Some("disk0"), None);
        assert!(identify(&placed(&volumes()), &d, Some(&fs))
            .expect_err("unknown mount")
            .message
            .contains("/data9"));
        let d = disk("/dev/vda", "/dev/vda", None, None, Some("07"));
        assert_eq!(
            identify(&placed(&volumes()), &d, None)
                .expect_err("bad pci")
                .kind,
            "bad-request"
        );
    }

    #[test]
    fn a_filesystem_on_a_foreign_disk_is_refused() {
        let fs = fsinfo(&LAB.replace("\"slot\": 8", "\"slot\": 9"));
        let d = disk("/data1", "/dev/vdb", Some("/data1"), None, None);
        let e = identify(&placed(&volumes()), &d, Some(&fs)).expect_err("foreign");
        assert!(e.message.contains("0000:00:09.0"), "{}", e.message);
    }

    /// Every combination that matters, one row each: what the agent reports (the lab's
    /// answer, or none), which volumes map, what the guest claims → the datasets found, or
    /// the refusal's kind.
    #[test]
    fn identification_table() {
        let by_pci: Volumes = serde_json::from_str(
            r#"{"pool/vm0/disk0": {"pci": "0000:00:07.0"}, "pool/vm0/disk1": {"pci": "0000:00:08.0"}}"#,
        )
        .expect("volumes");
        let by_serial: Volumes = serde_json::from_str(
            r#"{"pool/vm0/disk0": {"serial": "disk0"}, "pool/vm0/disk1": {"serial": "disk1"}}"#,
        )
        .expect("volumes");
        let with_serials = LAB
            .replacen("\"bus-type\": \"virtio\"", "\"serial\": \"disk1\", \"bus-type\": \"virtio\"", 1)
            .replacen("\"bus-type\": \"virtio\", \"bus\": 0, \"unit\": 0, \"pci-controller\": {\"bus\": 0, \"slot\": 7", "\"serial\": \"disk0\", \"bus-type\": \"virtio\", \"bus\": 0, \"unit\": 0, \"pci-controller\": {\"bus\": 0, \"slot\": 7", 1);
        let lab = fsinfo(LAB);
        let serials = fsinfo(&with_serials);
        let none: &[GuestFilesystemInfo] = &[];
        type Row<'a> = (
            &'a str,
            Option<&'a [GuestFilesystemInfo]>,
            &'a Volumes,
            DiskRef,
            Result<&'a str, &'a str>,
        );
        let rows: Vec<Row> = vec![
            (
                "mounted, PCI map, no claims",
                Some(&lab),
                &by_pci,
                disk("/data1", "/dev/vdb", Some("/data1"), None, None),
                Ok("pool/vm0/disk1"),
            ),
            (
                "mounted, PCI map, true claims",
                Some(&lab),
                &by_pci,
                disk(
                    "/data0",
                    "/dev/vda",
                    Some("/data0"),
                    None,
                    Some("0000:00:07.0"),
                ),
                Ok("pool/vm0/disk0"),
            ),
            (
                "mounted, PCI map, lying PCI",
                Some(&lab),
                &by_pci,
                disk(
                    "/data0",
                    "/dev/vda",
                    Some("/data0"),
                    None,
                    Some("0000:00:08.0"),
                ),
                Err("unknown-disk"),
            ),
            (
                "mounted, serial map, agent without serials",
                Some(&lab),
                &by_serial,
                disk("/data0", "/dev/vda", Some("/data0"), Some("disk0"), None),
                Err("unknown-disk"),
            ),
            (
                "mounted, serial map, agent with serials",
                Some(&serials),
                &by_serial,
                disk("/data0", "/dev/vda", Some("/data0"), Some("disk0"), None),
                Ok("pool/vm0/disk0"),
            ),
            (
                "mounted, serial map, lying serial",
                Some(&serials),
                &by_serial,
                disk("/data0", "/dev/vda", Some("/data0"), Some("disk1"), None),
                Err("unknown-disk"),
            ),
            (
                "by device, agent knows it",
                Some(&lab),
                &by_pci,
                disk("/dev/vdb", "/dev/vdb", None, None, None),
                Ok("pool/vm0/disk1"),
            ),
            (
                "unmounted, claims within the map",
                Some(none),
                &by_serial,
                disk("/dev/vda", "/dev/vda", None, Some("disk1"), None),
                Ok("pool/vm0/disk1"),
            ),
            (
                "unmounted, claims of another VM",
                Some(none),
                &by_serial,
                disk("/dev/vda", "/dev/vda", None, Some("vm9-disk"), None),
                Err("unknown-disk"),
            ),
            (
                "unmounted, no claims",
                Some(none),
                &by_pci,
                disk("/dev/vda", "/dev/vda", None, None, None),
                Err("unknown-disk"),
            ),
            (
                "no agent, PCI claim",
                None,
                &by_pci,
                disk("/dev/vda", "/dev/vda", None, None, Some("0000:00:08.0")),
                Ok("pool/vm0/disk1"),
            ),
            (
                "no agent, malformed PCI",
                None,
                &by_pci,
                disk("/dev/vda", "/dev/vda", None, None, Some("8")),
                Err("bad-request"),
            ),
            (
                "mountpoint the agent does not list",
                Some(&lab),
                &by_pci,
                disk(
                    "/data7",
                    "/dev/vda",
                    Some("/data7"),
                    None,
                    Some("0000:00:07.0"),
                ),
                Err("unknown-disk"),
            ),
        ];
        for (what, agent, volumes, claim, expected) in rows {
            let got = identify(&placed(volumes), &claim, agent);
            match (got, expected) {
                (Ok(found), Ok(dataset)) => assert_eq!(found.datasets, [dataset], "{what}"),
                (Err(e), Err(kind)) => assert_eq!(e.kind, kind, "{what}: {}", e.message),
                (got, expected) => panic!("{what}: got {got:?}, expected {expected:?}"),
            }
        }
    }
}
