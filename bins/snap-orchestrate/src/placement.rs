//! Where the guest sees each volume's disk, and whether a disk the guest agent reports is it.
//!
//! EVE attaches disks without serials, each behind its own `pcie-root-port`; the guest numbers
//! the buses behind the ports itself. So a disk the host knows by its QEMU device id, root
//! port id or WWN ([`GuestDisk`]) is placed through QMP ([`Topology`]: the bus numbers the
//! guest programmed, the SCSI disks' HBAs), and compared with `guest-get-fsinfo`'s PCI
//! controller address and SCSI address; a serial, where both sides have one, is one more check.

use std::collections::BTreeMap;

use evesnap::qga::commands::{GuestDiskAddress, GuestDiskBusType};
use evesnap::qmp::topology::{parse_wwn, GuestPci, Place, Topology};

use crate::guest::parse_pci;
use crate::plan::GuestDisk;

/// What `guest-get-fsinfo` can be compared with for one volume's disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Located {
    pub serial: Option<String>,
    pub place: Option<Place>,
}

/// How an agent's disk address compares with a located disk: how many identifiers both
/// sides have agree, how many disagree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Comparison {
    pub agree: u32,
    pub disagree: u32,
}

impl Comparison {
    /// Strict (the guest names a disk): something compared, and all of it agrees.
    pub fn designates(self) -> bool {
        self.agree > 0 && self.disagree == 0
    }

    /// Cautious (a rollback must not guess): unless something tells them apart.
    pub fn may_be(self) -> bool {
        self.agree > 0 || self.disagree == 0
    }
}

fn place_of_pci(text: &str) -> Option<Place> {
    let (domain, bus, slot, function) = parse_pci(text)?;
    Some(Place {
        pci: GuestPci {
            domain,
            bus,
            slot,
            function,
        },
        scsi: None,
    })
}

/// Places `disk` in the guest: through `topology` for its QEMU device id, root port or WWN,
/// from its `pci` otherwise. Every way given must lead to the same place.
pub fn locate(disk: &GuestDisk, topology: Option<&Topology>) -> Result<Located, String> {
    let mut found: Vec<(String, Place)> = Vec::new();
    if let Some(text) = &disk.pci {
        let place = place_of_pci(text)
            .ok_or_else(|| format!("`pci` {text:?} is not domain:bus:slot.function"))?;
        found.push((format!("pci {text}"), place));
    }
    if disk.needs_qmp() {
        let topology =
            topology.ok_or("it names a QEMU device, root port or WWN, and QMP is not at hand")?;
        let mut qdev = disk.qdev.clone();
        if let Some(text) = &disk.wwn {
            let wwn = parse_wwn(text).ok_or_else(|| format!("`wwn` {text:?} is not hex"))?;
            let carrier = &topology.scsi_by_wwn(wwn).map_err(|e| e.to_string())?.qdev;
            match &qdev {
                Some(id) if id != carrier => {
                    return Err(format!(
                        "WWN {text} is on the QEMU device `{carrier}`, not on `{id}`"
                    ))
                }
                _ => qdev = Some(carrier.clone()),
            }
        }
        if let Some(id) = &qdev {
            let place = topology.place_of_device(id).map_err(|e| e.to_string())?;
            found.push((format!("QEMU device `{id}`"), place));
        }
        if let Some(port) = &disk.port {
            let place = topology
                .place_behind_port(port)
                .map_err(|e| e.to_string())?;
            found.push((format!("root port `{port}`"), place));
        }
    }
    // A root port places the HBA only; a device id adds the SCSI address behind it.
    let mut place: Option<(String, Place)> = None;
    for (how, p) in found {
        match &mut place {
            None => place = Some((how, p)),
            Some((first, q)) => {
                if q.pci != p.pci || (q.scsi.is_some() && p.scsi.is_some() && q.scsi != p.scsi) {
                    return Err(format!(
                        "{first} is at {q} in the guest but {how} is at {p}"
                    ));
                }
                q.scsi = q.scsi.or(p.scsi);
            }
        }
    }
    Ok(Located {
        serial: disk.serial.clone(),
        place: place.map(|(_, p)| p),
    })
}

/// Places every volume's disk; two volumes at one place are refused (a guest that numbers
/// two root ports' buses alike cannot make one disk stand for another).
pub fn locate_all(
    disks: &BTreeMap<String, GuestDisk>,
    topology: Option<&Topology>,
) -> Result<BTreeMap<String, Located>, String> {
    let mut out: BTreeMap<String, Located> = BTreeMap::new();
    for (dataset, disk) in disks {
        let located = locate(disk, topology).map_err(|why| format!("{dataset}: {why}"))?;
        if let Some(place) = located.place {
            if let Some((other, _)) = out.iter().find(|(_, l)| l.place == Some(place)) {
                return Err(format!(
                    "{other} and {dataset} are both at {place} in the guest: cannot tell them apart"
                ));
            }
        }
        out.insert(dataset.clone(), located);
    }
    Ok(out)
}

/// The agent's PCI controller address, when it gave one.
pub fn agent_pci(address: &GuestDiskAddress) -> Option<GuestPci> {
    let p = &address.pci_controller;
    (p.domain >= 0 && p.bus >= 0 && p.slot >= 0 && p.function >= 0).then_some(GuestPci {
        domain: p.domain,
        bus: p.bus,
        slot: p.slot,
        function: p.function,
    })
}

/// Compares what is known of a disk (`serial`, `pci`, and the agent's SCSI address when it is
/// a SCSI disk) with a located volume.
pub fn compare(
    located: &Located,
    serial: Option<&str>,
    pci: Option<GuestPci>,
    address: Option<&GuestDiskAddress>,
) -> Comparison {
    let mut c = Comparison::default();
    let mut tally = |same: bool| {
        if same {
            c.agree += 1;
        } else {
            c.disagree += 1;
        }
    };
    if let (Some(want), Some(have)) = (located.serial.as_deref(), serial) {
        tally(want == have);
    }
    if let (Some(place), Some(pci)) = (located.place, pci) {
        let scsi_same = match (place.scsi, address) {
            (Some(s), Some(a)) if matches!(a.bus_type, GuestDiskBusType::scsi) => {
                (a.bus, a.target, a.unit) == (s.channel, s.target, s.lun)
            }
            _ => true,
        };
        tally(place.pci == pci && scsi_same);
    }
    c
}

/// Compares an agent's disk address with a located volume.
pub fn compare_address(located: &Located, address: &GuestDiskAddress) -> Comparison {
    let serial = address.serial.as_deref().filter(|s| !s.is_empty());
    compare(located, serial, agent_pci(address), Some(address))
}

/// The disks of `datasets` as QEMU knows them (the plan needs no `disks` when QMP is at
/// hand): the device whose drive reads a file under the dataset's `mountpoint`, or its zvol
/// (`/dev/zvol/<dataset>`). Exactly one device per dataset, and one with an id.
pub fn disks_from_qemu(
    topology: &Topology,
    mountpoints: &BTreeMap<String, String>,
    datasets: &[String],
) -> Result<BTreeMap<String, GuestDisk>, String> {
    let mut out = BTreeMap::new();
    for dataset in datasets {
        let zvol = format!("/dev/zvol/{dataset}");
        // The dataset whose mountpoint is the longest prefix of the file holds it.
        let owner = |file: &str| {
            datasets
                .iter()
                .filter_map(|d| {
                    let m = mountpoints.get(d)?;
                    let under = file
                        .strip_prefix(m.trim_end_matches('/'))
                        .is_some_and(|rest| rest.starts_with('/'));
                    under.then_some((m.len(), d))
                })
                .max()
                .map(|(_, d)| d)
        };
        let on_it: Vec<_> = topology
            .blocks
            .iter()
            .filter(|b| b.file == zvol || owner(&b.file) == Some(dataset))
            .collect();
        match on_it.as_slice() {
            [one] => {
                let qdev = one.qdev.clone().ok_or_else(|| {
                    format!(
                        "the VM's disk on {dataset} ({}) has no QEMU device id",
                        one.file
                    )
                })?;
                out.insert(
                    dataset.clone(),
                    GuestDisk {
                        qdev: Some(qdev),
                        ..GuestDisk::default()
                    },
                );
            }
            [] => return Err(format!("no disk of the VM reads a file on {dataset}")),
            several => {
                return Err(format!(
                    "{} disks of the VM read files on {dataset}",
                    several.len()
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "placement_tests.rs"]
mod tests;
