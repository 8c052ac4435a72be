//! Before a rollback under a running VM: which disk of the guest each volume is
//! ([`crate::placement`]), from the plan's `disks` and, with `qmp`, from QEMU itself.

use std::collections::BTreeMap;

use evesnap::exit::{coded, Exit};

use super::Run;
use crate::placement::{self, Located};

/// The volumes placed in the guest, and how (for the preflight's record).
pub(super) struct Placed {
    pub located: BTreeMap<String, Located>,
    /// Each volume's place as text (`PCI 0000:01:00.0`), where it has one.
    pub places: BTreeMap<String, String>,
    /// The volumes the plan's `disks` left out, as QEMU knows them.
    pub from_qemu: BTreeMap<String, crate::plan::GuestDisk>,
}

impl Run<'_> {
    /// Places every volume. Without `qmp`, a volume the plan's `disks` leaves out cannot be
    /// checked (exit 2); a disk QEMU does not have, or two volumes at one place, exit 7.
    pub(super) fn place_volumes(&self) -> Result<Placed, anyhow::Error> {
        let plan = self.plan;
        let missing: Vec<String> = plan
            .datasets
            .iter()
            .filter(|d| !plan.disks.contains_key(*d))
            .cloned()
            .collect();
        let needs_qmp = !missing.is_empty() || plan.disks.values().any(|d| d.needs_qmp());
        let topology = match (&plan.qmp, needs_qmp) {
            (Some(qmp), true) => Some(
                evesnap::qmp::Qmp::connect(std::path::Path::new(qmp), self.timeout)
                    .and_then(|mut q| q.topology())
                    .map_err(|e| evesnap::exit::wrap(e).context("plan field `qmp`"))?,
            ),
            (None, true) => {
                return Err(coded(
                    Exit::Usage,
                    format!(
                        "the VM is running and neither the plan's `disks` nor QEMU (no `qmp`) says how the guest sees {}: \
                         cannot check that it is unmounted",
                        missing.join(", ")
                    ),
                ))
            }
            (_, false) => None,
        };
        let mut disks = plan.disks.clone();
        let mut from_qemu = BTreeMap::new();
        if let (Some(topology), false) = (&topology, missing.is_empty()) {
            let (table, gone) = self
                .zfs
                .get(&missing, &["mountpoint"])
                .map_err(evesnap::exit::wrap)?;
            if let Some(d) = gone.first() {
                return Err(coded(Exit::Preflight, format!("{d} does not exist")));
            }
            let mountpoints: BTreeMap<String, String> = table
                .into_iter()
                .filter_map(|(name, props)| Some((name, props.get("mountpoint")?.clone()?)))
                .filter(|(_, m)| m.starts_with('/'))
                .collect();
            from_qemu =
                placement::disks_from_qemu(topology, &mountpoints, &missing).map_err(|why| {
                    coded(
                        Exit::Preflight,
                        format!("cannot tell which disk of the VM is which volume: {why}"),
                    )
                })?;
            disks.extend(from_qemu.clone());
        }
        let located = placement::locate_all(&disks, topology.as_ref()).map_err(|why| {
            coded(
                Exit::Preflight,
                format!("cannot place the volumes in the guest: {why}"),
            )
        })?;
        let places = located
            .iter()
            .filter_map(|(d, l)| Some((d.clone(), l.place?.to_string())))
            .collect();
        Ok(Placed {
            located,
            places,
            from_qemu,
        })
    }
}
