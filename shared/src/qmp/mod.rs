//! A small QMP client (the VM's monitor socket): is the VM running, stop it, resume it,
//! and where the guest sees the VM's disks ([`topology`]).
//!
//! Typed commands and replies come from the `qapi` crate; the greeting is read here so a
//! socket that closes early is an error, not a panic.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qapi::qmp;

use crate::exit::{Exit, HasExit};

pub mod topology;

use topology::{QomGet, QomList, QueryBlock, QueryPci, ScsiAddress, ScsiDisk, Topology};

type Stream = qapi::Stream<BufReader<UnixStream>, UnixStream>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the QMP socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("the QMP connection failed")]
    Io(#[source] std::io::Error),
    #[error("QMP sent no greeting")]
    NoGreeting,
    #[error("QMP command `{0}` failed")]
    Command(&'static str, #[source] qapi::ExecuteError),
    #[error("QMP reports {0} without a usable `{1}`")]
    Property(String, &'static str),
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        Exit::StepFailed
    }
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    inner: qapi::Qmp<Stream>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Qmp")
    }
}

/// The VM's run state as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// True only while guest CPUs execute.
    pub running: bool,
    /// QEMU's run state, e.g. `running`, `paused`, `shutdown`.
    pub state: String,
}

impl Qmp {
    /// Connects and negotiates capabilities; every read and write has `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, Error> {
        let socket =
            UnixStream::connect(path).map_err(|e| Error::Connect(path.to_path_buf(), e))?;
        socket.set_read_timeout(Some(timeout)).map_err(Error::Io)?;
        socket.set_write_timeout(Some(timeout)).map_err(Error::Io)?;
        let writer = socket.try_clone().map_err(Error::Io)?;
        let mut reader = BufReader::new(socket);
        let mut greeting = String::new();
        if reader.read_line(&mut greeting).map_err(Error::Io)? == 0 || !greeting.contains("\"QMP\"")
        {
            return Err(Error::NoGreeting);
        }
        let mut inner = qapi::Qmp::new(qapi::Stream::new(reader, writer));
        inner
            .execute(&qmp::qmp_capabilities { enable: None })
            .map_err(|e| Error::Command("qmp_capabilities", e))?;
        Ok(Qmp { inner })
    }

    pub fn status(&mut self) -> Result<VmStatus, Error> {
        let info = self
            .inner
            .execute(&qmp::query_status {})
            .map_err(|e| Error::Command("query-status", e))?;
        let state = serde_json::to_value(info.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Ok(VmStatus {
            running: info.running,
            state,
        })
    }

    /// Pauses the guest's CPUs (QMP `stop`).
    pub fn stop(&mut self) -> Result<(), Error> {
        self.inner
            .execute(&qmp::stop {})
            .map(drop)
            .map_err(|e| Error::Command("stop", e))
    }

    /// The VM's PCI functions as the guest numbered them (`query-pci`), its SCSI disks with
    /// their HBA, address and WWN (QOM, `/machine/peripheral/<id>`), and which file each
    /// disk device reads (`query-block`).
    pub fn topology(&mut self) -> Result<Topology, Error> {
        let pci = self
            .inner
            .execute(&QueryPci {})
            .map_err(|e| Error::Command("query-pci", e))?;
        let blocks = self
            .inner
            .execute(&QueryBlock {})
            .map_err(|e| Error::Command("query-block", e))?;
        let children = self
            .inner
            .execute(&QomList {
                path: "/machine/peripheral".into(),
            })
            .map_err(|e| Error::Command("qom-list", e))?;
        let mut scsi = Vec::new();
        for child in children {
            if !matches!(child.kind.as_str(), "child<scsi-hd>" | "child<scsi-block>") {
                continue;
            }
            scsi.push(self.scsi_disk(&child.name)?);
        }
        Ok(Topology {
            pci: topology::pci_functions(pci),
            scsi,
            blocks: topology::block_backends(blocks),
        })
    }

    fn qom_get(&mut self, id: &str, property: &str) -> Result<serde_json::Value, Error> {
        self.inner
            .execute(&QomGet {
                path: format!("/machine/peripheral/{id}"),
                property: property.into(),
            })
            .map_err(|e| Error::Command("qom-get", e))
    }

    /// The SCSI disk device `id`: its HBA (the device owning its bus), address and WWN.
    fn scsi_disk(&mut self, id: &str) -> Result<ScsiDisk, Error> {
        let what = || format!("SCSI disk `{id}`");
        let bus = self.qom_get(id, "parent_bus")?;
        let hba = bus
            .as_str()
            .and_then(topology::device_id)
            .ok_or_else(|| Error::Property(what(), "parent_bus"))?;
        let mut number = |property: &'static str| {
            self.qom_get(id, property)?
                .as_i64()
                .ok_or_else(|| Error::Property(what(), property))
        };
        let address = ScsiAddress {
            channel: number("channel")?,
            target: number("scsi-id")?,
            lun: number("lun")?,
        };
        let wwn = self.qom_get(id, "wwn")?.as_u64().filter(|w| *w != 0);
        Ok(ScsiDisk {
            qdev: id.to_string(),
            hba,
            address,
            wwn,
        })
    }

    /// Resumes the guest's CPUs (QMP `cont`).
    pub fn cont(&mut self) -> Result<(), Error> {
        self.inner
            .execute(&qmp::cont {})
            .map(drop)
            .map_err(|e| Error::Command("cont", e))
    }
}
