//! This VM's volumes map (`--volumes`): dataset → how the guest sees it. The guest can only
//! ever name an entry of it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use evesnap::exit::{coded, Exit};
use evesnap::zfs;

use crate::guest::parse_pci;
use crate::plan::GuestDisk;

/// Largest volumes map read.
const MAX_VOLUMES_BYTES: u64 = 1024 * 1024;

/// This VM's volumes: dataset → how the guest sees it.
pub type Volumes = BTreeMap<String, GuestDisk>;

/// Reads and checks a volumes map.
pub fn load_volumes(path: &Path) -> Result<Volumes, anyhow::Error> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_VOLUMES_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| {
            coded(
                Exit::Usage,
                format!("cannot read the volumes map {}: {e}", path.display()),
            )
        })?;
    if text.len() as u64 > MAX_VOLUMES_BYTES {
        return Err(coded(
            Exit::Usage,
            format!("the volumes map is larger than {MAX_VOLUMES_BYTES} bytes"),
        ));
    }
    let volumes: Volumes = serde_json::from_str(&text).map_err(|e| {
        coded(
            Exit::Usage,
            format!("the volumes map {} is not valid: {e}", path.display()),
        )
    })?;
    check_volumes(&volumes).map_err(|e| {
        coded(
            Exit::Usage,
            format!("the volumes map {}: {e}", path.display()),
        )
    })?;
    Ok(volumes)
}

/// Every entry names a valid dataset and can be told apart from the others.
pub fn check_volumes(volumes: &Volumes) -> Result<(), String> {
    if volumes.is_empty() {
        return Err("it names no volume".into());
    }
    let mut serials = BTreeSet::new();
    let mut ids = BTreeSet::new();
    let mut pcis = BTreeSet::new();
    for (dataset, disk) in volumes {
        zfs::names::check_dataset(dataset).map_err(|e| e.to_string())?;
        if disk.serial.is_none() && disk.pci.is_none() && !disk.needs_qmp() {
            return Err(format!(
                "{dataset} has none of `qdev`, `port`, `wwn`, `serial`, `pci`"
            ));
        }
        for (what, id) in [("qdev", &disk.qdev), ("port", &disk.port)] {
            if let Some(id) = id {
                if id.is_empty() || id.chars().any(|c| c.is_control() || c == '/') {
                    return Err(format!(
                        "{dataset}: `{what}` is empty or has '/' or control characters"
                    ));
                }
                if !ids.insert((what, id.clone())) {
                    return Err(format!("{what} {id} is given to two volumes"));
                }
            }
        }
        if let Some(wwn) = &disk.wwn {
            let Some(number) = evesnap::qmp::topology::parse_wwn(wwn) else {
                return Err(format!("{dataset}: `wwn` {wwn:?} is not hex"));
            };
            if !ids.insert(("wwn", format!("{number:x}"))) {
                return Err(format!("WWN {wwn} is given to two volumes"));
            }
        }
        if let Some(serial) = &disk.serial {
            if serial.is_empty() || serial.chars().any(char::is_control) {
                return Err(format!(
                    "{dataset}: `serial` is empty or has control characters"
                ));
            }
            if !serials.insert(serial.clone()) {
                return Err(format!("serial {serial} is given to two volumes"));
            }
        }
        if let Some(pci) = &disk.pci {
            let Some(address) = parse_pci(pci) else {
                return Err(format!(
                    "{dataset}: `pci` {pci:?} is not domain:bus:slot.function"
                ));
            };
            if !pcis.insert(address) {
                return Err(format!("PCI address {pci} is given to two volumes"));
            }
        }
    }
    Ok(())
}

/// The name a disk has for the guest: its serial, else its QEMU device id, root port id,
/// `wwn:<WWN>` or `pci:<address>`.
pub fn label(disk: &GuestDisk) -> String {
    if let Some(name) = disk
        .serial
        .as_ref()
        .or(disk.qdev.as_ref())
        .or(disk.port.as_ref())
    {
        return name.clone();
    }
    match (&disk.wwn, &disk.pci) {
        (Some(wwn), _) => format!("wwn:{wwn}"),
        (None, Some(pci)) => format!("pci:{pci}"),
        (None, None) => "?".into(),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The lab VM's two disks, as a map: the fixture of every serve test.
    pub(in crate::serve) fn volumes() -> Volumes {
        serde_json::from_str(
            r#"{"pool/vm0/disk0": {"serial": "disk0", "pci": "0000:00:07.0"},
                "pool/vm0/disk1": {"serial": "disk1", "pci": "0000:00:08.0"}}"#,
        )
        .expect("volumes")
    }

    #[test]
    fn volumes_maps_are_checked() {
        assert!(check_volumes(&volumes()).is_ok());
        for (json, needle) in [
            (r#"{}"#, "no volume"),
            (r#"{"pool/a": {}}"#, "none of"),
            (
                r#"{"pool/a": {"qdev": "virtio-disk0"}, "pool/b": {"qdev": "virtio-disk0"}}"#,
                "two volumes",
            ),
            (
                r#"{"pool/a": {"wwn": "0x5001405e7a5b0001"}, "pool/b": {"wwn": "5001405E7A5B0001"}}"#,
                "two volumes",
            ),
            (r#"{"pool/a": {"wwn": "0xnothex"}}"#, "not hex"),
            (r#"{"pool/a": {"port": "/machine/pci.8"}}"#, "'/'"),
            (
                r#"{"pool/a": {"serial": "x"}, "pool/b": {"serial": "x"}}"#,
                "two volumes",
            ),
            (
                r#"{"pool/a": {"pci": "0000:00:07.0"}, "pool/b": {"pci": "00:07.0"}}"#,
                "not domain",
            ),
            (
                r#"{"pool/a": {"pci": "0000:00:07.0"}, "pool/b": {"pci": "0000:00:07.0"}}"#,
                "two volumes",
            ),
            (r#"{"pool/a@s": {"serial": "x"}}"#, "no '@'"),
        ] {
            let v: Volumes = serde_json::from_str(json).expect(json);
            let e = check_volumes(&v).expect_err(json);
            assert!(e.contains(needle), "{json}: {e}");
        }
        assert!(
            serde_json::from_str::<Volumes>(r#"{"pool/a": {"serial": "x", "dataset": "y"}}"#)
                .is_err()
        );
    }
}
