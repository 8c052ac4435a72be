//! Where the guest sees the VM's disks, as QEMU reports it: `query-pci` (the bus numbers the
//! guest programmed into each root port, and the QEMU device id behind each PCI function),
//! the SCSI disks' HBA, address and WWN (QOM), and `query-block` (which file or zvol each
//! disk device reads). docs/lab.md#eves-vm-shape.
//!
//! QEMU 7.2's replies carry more fields than read here; the structs below take only what the
//! lookups need, so a QEMU with other optional fields still parses.

use serde::{Deserialize, Serialize};

/// A PCI function as the guest numbered it (`guest-get-fsinfo`'s `pci-controller`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestPci {
    pub domain: i64,
    pub bus: i64,
    pub slot: i64,
    pub function: i64,
}

impl std::fmt::Display for GuestPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

/// A SCSI disk's address on its HBA (`guest-get-fsinfo`'s `bus`, `target`, `unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScsiAddress {
    pub channel: i64,
    pub target: i64,
    pub lun: i64,
}

/// Where the guest sees one disk: the PCI function of its controller (the virtio-blk device,
/// or the SCSI HBA) and, behind an HBA, its SCSI address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    pub pci: GuestPci,
    pub scsi: Option<ScsiAddress>,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PCI {}", self.pci)?;
        if let Some(s) = self.scsi {
            write!(f, " SCSI {}:{}:{}", s.channel, s.target, s.lun)?;
        }
        Ok(())
    }
}

/// A PCI function of the VM: its QEMU device id (empty for a device without one), where the
/// guest numbered it, and for a bridge (a root port) the secondary bus the guest gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    pub qdev: String,
    pub at: GuestPci,
    pub secondary_bus: Option<i64>,
}

/// A SCSI disk device (`scsi-hd`, `scsi-block`) with an id: its HBA's id and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiDisk {
    pub qdev: String,
    pub hba: String,
    pub address: ScsiAddress,
    pub wwn: Option<u64>,
}

/// A disk device and the file (image, `/dev/zvol/...`) its drive reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBackend {
    /// The device's id; `None` for a device QEMU names only by its QOM path (no id).
    pub qdev: Option<String>,
    pub file: String,
}

/// Everything QEMU says about the VM's disks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    pub pci: Vec<PciFunction>,
    pub scsi: Vec<ScsiDisk>,
    pub blocks: Vec<BlockBackend>,
}

/// Why a disk has no place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("the VM has no device with id `{0}`")]
    NoDevice(String),
    #[error("the VM has no PCI root port with id `{0}`")]
    NoPort(String),
    #[error("the guest has not numbered the bus behind root port `{0}` (no device seen there)")]
    EmptyPort(String),
    #[error("the VM has no SCSI disk with WWN {0:#018x}")]
    NoWwn(u64),
    #[error("the SCSI disk `{disk}`'s HBA `{hba}` is not a PCI device the guest sees")]
    NoHba { disk: String, hba: String },
}

impl Topology {
    fn function(&self, qdev: &str) -> Option<&PciFunction> {
        self.pci.iter().find(|f| !qdev.is_empty() && f.qdev == qdev)
    }

    /// The place of the device with QEMU id `qdev`: a PCI disk itself, or a SCSI disk
    /// through its HBA.
    pub fn place_of_device(&self, qdev: &str) -> Result<Place, PlaceError> {
        if let Some(f) = self.function(qdev) {
            return Ok(Place {
                pci: f.at,
                scsi: None,
            });
        }
        let disk = self
            .scsi
            .iter()
            .find(|d| d.qdev == qdev)
            .ok_or_else(|| PlaceError::NoDevice(qdev.to_string()))?;
        let hba = self.function(&disk.hba).ok_or_else(|| PlaceError::NoHba {
            disk: disk.qdev.clone(),
            hba: disk.hba.clone(),
        })?;
        Ok(Place {
            pci: hba.at,
            scsi: Some(disk.address),
        })
    }

    /// The place of what sits in slot 0 behind the root port `port` (EVE puts each disk, or
    /// each disk's HBA, there): the PCI function only, whatever is behind an HBA.
    pub fn place_behind_port(&self, port: &str) -> Result<Place, PlaceError> {
        let bridge = self
            .function(port)
            .ok_or_else(|| PlaceError::NoPort(port.to_string()))?;
        let secondary = bridge
            .secondary_bus
            .filter(|b| *b > 0)
            .ok_or_else(|| PlaceError::EmptyPort(port.to_string()))?;
        let device = self
            .pci
            .iter()
            .find(|f| f.at.bus == secondary && f.at.slot == 0 && f.at.function == 0)
            .ok_or_else(|| PlaceError::EmptyPort(port.to_string()))?;
        Ok(Place {
            pci: device.at,
            scsi: None,
        })
    }

    /// The SCSI disk carrying `wwn`.
    pub fn scsi_by_wwn(&self, wwn: u64) -> Result<&ScsiDisk, PlaceError> {
        self.scsi
            .iter()
            .find(|d| d.wwn == Some(wwn))
            .ok_or(PlaceError::NoWwn(wwn))
    }
}

/// A QOM path's device id: `/machine/peripheral/<id>/...` → `<id>`; a plain id as it is;
/// an anonymous device (`/machine/peripheral-anon/...`) has none.
pub fn device_id(qom: &str) -> Option<String> {
    match qom.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().map(str::to_string),
        None if qom.starts_with('/') => None,
        None => Some(qom.to_string()),
    }
}

/// Parses a WWN as written in a plan or on QEMU's command line: hex with or without `0x`.
pub fn parse_wwn(text: &str) -> Option<u64> {
    let hex = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    (!hex.is_empty() && hex.len() <= 16)
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

// ------------------------------------------------------------------ the QMP wire

#[derive(Debug, Deserialize)]
pub(super) struct PciBusReply {
    devices: Vec<PciDeviceReply>,
}

#[derive(Debug, Deserialize)]
struct PciDeviceReply {
    bus: i64,
    slot: i64,
    function: i64,
    #[serde(default)]
    qdev_id: String,
    #[serde(default)]
    pci_bridge: Option<PciBridgeReply>,
}

#[derive(Debug, Deserialize)]
struct PciBridgeReply {
    bus: PciBusNumbers,
    #[serde(default)]
    devices: Vec<PciDeviceReply>,
}

#[derive(Debug, Deserialize)]
struct PciBusNumbers {
    secondary: i64,
}

/// Every PCI function of `query-pci`'s reply, bridges' devices included.
pub(super) fn pci_functions(buses: Vec<PciBusReply>) -> Vec<PciFunction> {
    fn walk(devices: Vec<PciDeviceReply>, out: &mut Vec<PciFunction>) {
        for d in devices {
            out.push(PciFunction {
                qdev: d.qdev_id,
                at: GuestPci {
                    domain: 0,
                    bus: d.bus,
                    slot: d.slot,
                    function: d.function,
                },
                secondary_bus: d.pci_bridge.as_ref().map(|b| b.bus.secondary),
            });
            if let Some(bridge) = d.pci_bridge {
                walk(bridge.devices, out);
            }
        }
    }
    let mut out = Vec::new();
    for bus in buses {
        walk(bus.devices, &mut out);
    }
    out
}

#[derive(Debug, Deserialize)]
pub(super) struct BlockReply {
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    inserted: Option<InsertedReply>,
}

#[derive(Debug, Deserialize)]
struct InsertedReply {
    file: String,
}

/// The disk devices of `query-block`'s reply that have a medium.
pub(super) fn block_backends(blocks: Vec<BlockReply>) -> Vec<BlockBackend> {
    blocks
        .into_iter()
        .filter_map(|b| {
            let qdev = b.qdev?;
            Some(BlockBackend {
                qdev: device_id(&qdev),
                file: b.inserted?.file,
            })
        })
        .collect()
}

#[derive(Debug, Deserialize)]
pub(super) struct QomProperty {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

macro_rules! qmp_command {
    ($name:ident, $wire:literal, $ok:ty $(, $field:ident: $ty:ty)*) => {
        #[derive(Debug, Serialize)]
        pub(super) struct $name {
            $(pub $field: $ty,)*
        }
        impl qapi_spec::Command for $name {
            const NAME: &'static str = $wire;
            const ALLOW_OOB: bool = false;
            type Ok = $ok;
        }
    };
}

qmp_command!(QueryPci, "query-pci", Vec<PciBusReply>);
qmp_command!(QueryBlock, "query-block", Vec<BlockReply>);
qmp_command!(QomList, "qom-list", Vec<QomProperty>, path: String);
qmp_command!(QomGet, "qom-get", serde_json::Value, path: String, property: String);

#[cfg(test)]
#[path = "topology_tests.rs"]
mod tests;
