//! `action: rollback`: preflight (zrollback's checks, the VM's state) → guest_pre → no
//! guest filesystem on the volumes → rollback → guest_post.

use std::collections::BTreeMap;

use evesnap::document::StepTimer;
use evesnap::exit::{coded, Exit};
use serde::Serialize;

use super::halted::VmState;
use super::{Run, StepError};
use crate::guest;

/// The `existing` step's record: every volume already is at the snapshot.
#[derive(Debug, Serialize)]
struct AlreadyThere<'a> {
    /// Each dataset's `written` (0) and its snapshot (the newest).
    at: &'a [evesnap::steps::RolledBack],
}

/// The rollback preflight's record.
#[derive(Debug, Serialize)]
struct Preflight<'a> {
    vm_stopped: bool,
    plan: &'a zrollback::RollbackPlan,
    /// `disks.*.dev` as resolved in the guest.
    devices: &'a BTreeMap<&'a str, String>,
    /// Where the guest sees each volume's disk (`PCI 0000:01:00.0`, `… SCSI 0:0:0`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    places: BTreeMap<String, String>,
    /// The volumes the plan's `disks` left out, as QEMU knows them (`qdev`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    disks_from_qemu: BTreeMap<String, crate::plan::GuestDisk>,
}

/// The `unmounted` step's record: guest filesystems found on the volumes.
#[derive(Debug, Serialize)]
struct Unmounted {
    mounted: Vec<String>,
}

/// A failed step's partial record: the devices resolved so far.
#[derive(Debug, Serialize)]
struct Devices<'a> {
    devices: &'a BTreeMap<&'a str, String>,
}

impl Run<'_> {
    pub(super) fn rollback(&mut self) -> Result<(), StepError> {
        let plan = self.plan;
        let Some(rollback) = plan.rollback.as_ref() else {
            return Err((
                "preflight",
                coded(Exit::Usage, "`rollback` is missing from the plan"),
            ));
        };
        // 1. Preflight: zrollback's checks (`to` an id or a name), then whether the VM is
        // stopped.
        let timer = StepTimer::start("preflight");
        let name = match self.rollback_name(&rollback.to) {
            Ok(name) => name,
            Err(e) => {
                self.failed(timer);
                return Err(("preflight", e));
            }
        };
        self.report.snapshot = name.clone();
        let planned = if rollback.keep_newer {
            zrollback::plan_keeping(self.zfs, &plan.datasets, &name)
        } else {
            zrollback::plan(self.zfs, &plan.datasets, &name, rollback.destroy_newer)
        };
        let target = match planned {
            Ok(t) => t,
            Err(e) => {
                self.failed(timer);
                return Err(("preflight", evesnap::exit::wrap(e)));
            }
        };
        self.report.volume_snapshots = self.by_volume(target.targets.iter().map(|t| t.to.as_str()));
        if let Some(at) = self.already_there(&target) {
            // Nothing would change: the guest is not touched (EVE handles the same
            // `active_snapshot` again after a reboot).
            self.done(timer, &AlreadyThere { at: &at });
            evesnap::note!("every volume already is at {name}: nothing to roll back");
            self.report.existing = true;
            self.report.rolled_back = Some(at);
            self.report.destroyed = Some(Vec::new());
            return Ok(());
        }
        let vm_stopped = match self.vm_stopped(rollback.vm_stopped) {
            Ok(stopped) => stopped,
            Err(e) => {
                self.failed(timer);
                return Err(("preflight", e));
            }
        };
        let mut agent = None;
        let mut placed = None;
        if !vm_stopped {
            let mut needed = vec!["guest-get-fsinfo"];
            let resolves = plan.disks.values().any(|d| d.dev.is_some());
            if !plan.guest_pre.is_empty() || !plan.guest_post.is_empty() || resolves {
                needed.extend(["guest-exec", "guest-exec-status"]);
            }
            // Without an agent nothing can show the volumes are unused: it is required here.
            match self.connect_agent(&needed, true) {
                Ok(a) => agent = a,
                Err(e) => {
                    self.failed(timer);
                    return Err(e);
                }
            }
            match self.place_volumes() {
                Ok(p) => placed = Some(p),
                Err(e) => {
                    self.failed(timer);
                    return Err(("preflight", e));
                }
            }
        }
        // `disks.*.dev` resolved in the guest, before anything changes there.
        let mut devices: BTreeMap<&str, String> = BTreeMap::new();
        if let Some((client, _)) = agent.as_mut() {
            for (dataset, disk) in &plan.disks {
                let Some(dev) = &disk.dev else { continue };
                match guest::resolve_dev(client, dev, self.timeout) {
                    Ok(node) => {
                        devices.insert(dataset, node);
                    }
                    Err(why) => {
                        self.report
                            .push(timer.finish_with(false, &Devices { devices: &devices }));
                        return Err((
                            "preflight",
                            coded(
                                Exit::Preflight,
                                format!(
                                    "cannot tell whether {dataset} is mounted in the guest: `disks.{dataset}.dev` \
                                     does not resolve there: {why}"
                                ),
                            ),
                        ));
                    }
                }
            }
        }
        self.done(
            timer,
            &Preflight {
                vm_stopped,
                plan: &target,
                devices: &devices,
                places: placed
                    .as_ref()
                    .map(|p| p.places.clone())
                    .unwrap_or_default(),
                disks_from_qemu: placed
                    .as_ref()
                    .map(|p| p.from_qemu.clone())
                    .unwrap_or_default(),
            },
        );
        self.check_signal("guest_pre")?;

        if let Some((client, _)) = agent.as_mut() {
            // 2. Release the volumes in the guest.
            let (ran, _, pre) = self.guest_commands(client, "guest_pre", &plan.guest_pre);
            if let Err(e) = pre {
                self.undo_pre(client, ran);
                return Err(e);
            }
            // 3. Nothing may be mounted on them any more.
            let timer = StepTimer::start("unmounted");
            let busy = match client.fsinfo() {
                Ok(filesystems) => plan
                    .datasets
                    .iter()
                    .filter_map(|d| {
                        let dev = devices.get(d.as_str()).map(String::as_str);
                        // Every volume is placed once the VM runs (place_volumes).
                        let mounts = placed
                            .as_ref()
                            .and_then(|p| p.located.get(d))
                            .map(|located| guest::mounts_on(&filesystems, located, dev))
                            .unwrap_or_default();
                        (!mounts.is_empty()).then(|| format!("{d}: {}", mounts.join(", ")))
                    })
                    .collect::<Vec<_>>(),
                Err(e) => {
                    self.failed(timer);
                    let _ = self.run_post(client); // its step records its own result
                    return Err((
                        "unmounted",
                        evesnap::exit::wrap(e).context("guest-get-fsinfo"),
                    ));
                }
            };
            if !busy.is_empty() {
                let message = format!(
                    "refusing to roll back under a running guest that has the volume mounted ({}); \
                     unmount it in guest_pre or stop the VM",
                    busy.join("; ")
                );
                self.report
                    .push(timer.finish_with(false, &Unmounted { mounted: busy }));
                let _ = self.run_post(client); // its step records its own result
                return Err(("unmounted", coded(Exit::Preflight, message)));
            }
            self.done(timer, &Unmounted { mounted: vec![] });
        }
        if let Err(e) = self.check_signal("rollback") {
            // Nothing rolled back, but guest_pre ran: the guest gets its volumes back now,
            // not from a watchdog (`post_left` would record them as pending).
            if let Some((client, _)) = agent.as_mut() {
                let _ = self.run_post(client); // its step records its own result
            }
            return Err(e);
        }

        // 4. Roll back.
        let timer = StepTimer::start(zrollback::TOOL);
        let result = match zrollback::execute(self.zfs, &target) {
            Ok(report) => {
                self.record_landing(&target);
                self.report.rolled_back = Some(report.rolled_back.clone());
                self.report.destroyed = Some(report.destroyed.clone());
                self.done(timer, &report);
                Ok(())
            }
            Err(e) => {
                self.report.push(timer.finish_with(false, &e.report));
                Err(("rollback", evesnap::exit::wrap(e.source)))
            }
        };
        // 5. Bring the guest back, whether or not the rollback worked.
        let post = match agent.as_mut() {
            Some((client, _)) => self.run_post(client),
            None => Ok(()),
        };
        result.and(post)
    }

    /// Whether the VM is stopped: the plan says so, or QMP reports it not running (no QEMU,
    /// or its guest stopped) and no process on the host holds its volumes (exit 7 if one
    /// does). A paused VM resumes with its caches: it counts as running.
    fn vm_stopped(&self, plan_says: bool) -> Result<bool, anyhow::Error> {
        if plan_says {
            return Ok(true);
        }
        match self.vm_state()? {
            VmState::Running => Ok(false),
            VmState::Halted { qemu, .. } => self.check_unheld(&qemu).map(|()| true),
        }
    }
}
