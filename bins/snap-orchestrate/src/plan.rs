//! The plan: what the controller asks for, as JSON (schema in `plan.schema.json`).
//!
//! Unknown fields and wrong types are refused with a message that names the field and
//! gives line and column; defaults are filled in here so the flow never guesses.

use std::collections::BTreeMap;
use std::time::Duration;

use qga_freeze::FreezeOptions;
use serde::{Deserialize, Serialize};

pub use evesnap::report::{Action, SnapshotType};

/// The plan format version this tool reads.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub version: u32,
    /// Snapshot id from the controller (eve-api `SnapshotDesc.id`); generated when absent.
    #[serde(default)]
    pub id: Option<uuid::Uuid>,
    #[serde(default, rename = "type")]
    pub kind: SnapshotType,
    /// eve-api `ZInfoSnapshot.config_id`, passed through to the report's `zinfo_snapshot`
    /// (EVE sets it for locally triggered snapshots: the latest `EdgeDevConfig.id`).
    #[serde(default)]
    pub config_id: Option<String>,
    /// eve-api `ZInfoSnapshot.config_version`, passed through like `config_id`.
    #[serde(default)]
    pub config_version: Option<String>,
    #[serde(default)]
    pub action: Action,
    /// Guest agent address: `unix:<path>`, a plain path, `vsock:<cid>:<port>` (AF_VSOCK), or
    /// `hvsock:<path>:<port>` (guest vsock port through a hybrid vsock device's Unix socket).
    pub agent: String,
    /// QMP socket of the VM, to learn whether it runs (used for rollback).
    #[serde(default)]
    pub qmp: Option<String>,
    /// The VM's volumes, by dataset name. A plan names its volumes either here or, in EVE's
    /// terms, in `volumes`.
    #[serde(default)]
    pub datasets: Vec<String>,
    /// EVE's app instance (`AppUUID`) whose volumes these are. A plan with an `app` gets
    /// EVE's retention: `max_snapshots` counts the app's snapshot sets, and room is made
    /// before the create (see `retention`); the report's eve-api entities name it
    /// (`ENTITY_APP_INSTANCE`).
    #[serde(default)]
    pub app: Option<uuid::Uuid>,
    /// The app instance's display name, for the same entity.
    #[serde(default)]
    pub app_name: Option<String>,
    /// The app's volumes in EVE's terms: each is the zvol `<volume_root>/<uuid>.<generation>`
    /// (pillar's volumemgr naming); the report maps each volume's UUID to its snapshot
    /// (`volume_snapshots`, as eve-api's `VolumeSnapshotMeta`).
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Where EVE's volumes live; default `persist/vault/volumes` (for a pool of another name,
    /// such as a lab's).
    #[serde(default)]
    pub volume_root: Option<String>,
    /// When `max_snapshots` makes room: `before_create` (EVE's order, the default for plans
    /// with an `app`) or `after_create` (the default otherwise).
    #[serde(default)]
    pub retention: Option<RetentionOrder>,
    /// The controller states the VM shut itself down cleanly: a snapshot of it while it is not
    /// running is `halted_clean` instead of `halted`.
    #[serde(default)]
    pub shutdown_clean: bool,
    /// Snapshot name; default `evesnap-<id>`. The `id` is the snapshot's handle: create,
    /// rollback and delete find it by `org.lfedge.evesnap:id` whatever its name.
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub freeze: FreezePlan,
    #[serde(default)]
    pub guest_pre: Vec<GuestCommand>,
    #[serde(default)]
    pub guest_post: Vec<GuestCommand>,
    /// Retention (eve-api `max_snapshots`): keep at most this many snapshot sets, oldest
    /// removed first; held snapshots and snapshots evesnap did not take are never counted
    /// or removed. With an `app`: per app, room made before the create (EVE's way); without:
    /// per dataset, after the create.
    #[serde(default)]
    pub max_snapshots: Option<u32>,
    /// Who asks: `controller` (default) or `guest` (`serve`'s plans). Recorded on the
    /// snapshots as `org.lfedge.evesnap:origin`; retention never counts or destroys the
    /// guest's.
    #[serde(default)]
    pub origin: evesnap::report::Origin,
    /// Seconds a controller run waits for the VM while another operation holds it (default
    /// 0: exit 8 at once). While it waits, and for 10 s after it gave up, `serve` turns
    /// guest requests away (`busy`), so the controller is served first.
    #[serde(default)]
    pub lock_wait_s: f64,
    /// The caller quiesced the application itself (e.g. a request from inside the guest):
    /// a frozen snapshot then counts as application-consistent without `guest_pre`.
    #[serde(default)]
    pub application_quiesced: bool,
    /// Until when `application_quiesced` holds (the guest stops waiting then and may resume
    /// its application): a snapshot that returns later claims `filesystem` at best. Set by
    /// `serve` from the request's deadline; not part of the JSON plan.
    #[serde(skip)]
    #[schemars(skip)]
    pub quiesced_until: Option<std::time::Instant>,
    /// For `action: rollback`.
    #[serde(default)]
    pub rollback: Option<RollbackPlan>,
    /// Which disk of the VM each dataset is, for the "not mounted in the guest" check before
    /// a rollback: as the host attached it (QEMU device id, root port id, WWN; placed in the
    /// guest through `qmp`), by serial or PCI address, or by a device path resolved in the
    /// guest (zvols, which the agent reports without address). With `qmp`, a dataset left
    /// out is found through QEMU (the disk whose image or zvol is on it).
    #[serde(default)]
    pub disks: BTreeMap<String, GuestDisk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FreezePlan {
    /// False: nothing is frozen and the agent is not used; the snapshot is
    /// `crash`-consistent (`serve` for a disk with no filesystem mounted in the guest).
    pub enabled: bool,
    /// Mountpoints to freeze; empty means every filesystem of the guest.
    pub mountpoints: Vec<String>,
    /// Deadline of each agent call, in seconds.
    pub timeout_s: f64,
    /// The auto-thaw watchdog's deadline, in seconds (0 = off).
    pub thaw_after_s: f64,
    /// When false, a missing or unresponsive agent does not stop the snapshot; it is then
    /// taken unfrozen and reported as `consistency: "crash"`.
    pub required: bool,
    /// Switch the guest kernel to expedited RCU grace periods (`/sys/kernel/rcu_expedited`)
    /// from just before the freeze until the thaw (on by default): Linux's freeze of each
    /// filesystem waits for grace periods while writers are already blocked, and the
    /// first-frozen filesystem's writers wait for all of them, so this shortens what the
    /// guest's writers feel (see README, Benchmarks). Needs `guest-exec` and `/bin/sh`;
    /// when unavailable the freeze goes on without it. The guest restores its previous
    /// setting by itself within 10 s should this run not get to it.
    pub expedite_rcu: bool,
    /// Flush the filesystems to be frozen (`sync -f <mountpoints>`, or `sync` when all are
    /// frozen, through `guest-exec`) just before the freeze, while the guest still writes:
    /// Linux's freeze writes out what is dirty only after it blocked the writers, one
    /// filesystem after the other, so without this the first-frozen filesystem's writers
    /// wait for every other filesystem's flush (see README, Benchmarks). The `flush` step
    /// records it; when the guest cannot run it, the freeze goes on without it.
    pub flush_first: bool,
    /// What a failed freeze does: `fail` (default) fails the run, nothing is taken;
    /// `crash` thaws, verifies the guest thawed, and takes the snapshot anyway, labelled
    /// `consistency: "crash"` with the failure as `org.lfedge.evesnap:crash_reason` and as
    /// a `crash-fallback` warning in the report. A failure the guest may still be frozen
    /// after (the thaw could not be verified) fails the run either way.
    pub on_failure: OnFreezeFailure,
}

/// `freeze.on_failure`: what a freeze that failed, timed out, froze fewer filesystems than
/// asked or did not verify leads to.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnFreezeFailure {
    /// The run fails and takes nothing.
    #[default]
    Fail,
    /// The guest is thawed and verified, then the snapshot is taken unfrozen and labelled
    /// `crash`, with the reason.
    Crash,
}

impl Default for FreezePlan {
    fn default() -> Self {
        FreezePlan {
            enabled: true,
            mountpoints: Vec::new(),
            timeout_s: 10.0,
            thaw_after_s: 60.0,
            required: true,
            expedite_rcu: true,
            flush_first: true,
            on_failure: OnFreezeFailure::Fail,
        }
    }
}

impl FreezePlan {
    /// The time each agent call gets.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s)
    }

    /// The freeze as qga-freeze takes it: a guest found frozen is not adopted (a run
    /// never thaws a freeze it did not make), and `thaw_after_s: 0` arms no watchdog.
    pub fn options(&self) -> FreezeOptions {
        FreezeOptions {
            mountpoints: self.mountpoints.clone(),
            timeout: self.timeout(),
            adopt_frozen: false,
            thaw_after: (self.thaw_after_s > 0.0)
                .then(|| Duration::from_secs_f64(self.thaw_after_s)),
            watchdog_program: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestCommand {
    /// Absolute path of the program in the guest (run through `guest-exec`, no shell).
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default = "default_command_timeout")]
    pub timeout_s: f64,
    /// A failing fatal command stops the flow; a non-fatal one is reported and skipped.
    #[serde(default = "default_true")]
    pub fatal: bool,
}

fn default_command_timeout() -> f64 {
    30.0
}

fn default_true() -> bool {
    true
}

/// One of EVE's volumes: the zvol `<volume_root>/<uuid>.<generation>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// The volume's UUID (eve-api `VolumeConfig.uuid`).
    pub uuid: uuid::Uuid,
    /// Its generation counter (the zvol name's suffix).
    #[serde(default = "default_generation")]
    pub generation: u32,
}

fn default_generation() -> u32 {
    1
}

/// EVE's volumes' home (pillar: `persist/vault/volumes/<uuid>.<generation>`).
pub const DEFAULT_VOLUME_ROOT: &str = "persist/vault/volumes";

/// When retention makes room (`retention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RetentionOrder {
    /// Keep `max_snapshots - 1` before snapshotting (EVE's order: the new one always fits).
    BeforeCreate,
    /// Keep `max_snapshots` after snapshotting (nothing is removed if the create fails).
    AfterCreate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackPlan {
    /// The snapshot to go back to: its id (a UUID, EVE's `active_snapshot`) or its name.
    pub to: String,
    /// Destroy snapshots newer than `to` (after checking none is held or cloned).
    #[serde(default)]
    pub destroy_newer: bool,
    /// Keep the snapshots newer than `to`: each dataset's current state, with them, is
    /// renamed to `<dataset>.evesnap-kept-<YYYYMMDD-HHMMSSmmm>` and the dataset gets `to`'s
    /// data (`zrollback --keep-newer`); a `to` found only in a kept state rolls forward to
    /// it. Not with `destroy_newer`.
    #[serde(default)]
    pub keep_newer: bool,
    /// The controller states the VM is stopped (otherwise QMP or the guest decides).
    #[serde(default)]
    pub vm_stopped: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestDisk {
    /// The QEMU device id of the disk (`-device virtio-blk-pci,id=…` or `scsi-hd,id=…`):
    /// placed in the guest through QMP (`query-pci`; a SCSI disk through its HBA).
    #[serde(default)]
    pub qdev: Option<String>,
    /// The id of the `pcie-root-port` the disk (or its own SCSI HBA) sits behind, in slot 0:
    /// placed through QMP (the bus number the guest gave the port).
    #[serde(default)]
    pub port: Option<String>,
    /// The disk's WWN (`scsi-hd,wwn=…`, EVE's `vhost-scsi-pci` `wwpn`), hex: the SCSI disk
    /// carrying it, placed through QMP.
    #[serde(default)]
    pub wwn: Option<String>,
    /// The disk's serial, where it has one: an extra check where the agent reports it.
    #[serde(default)]
    pub serial: Option<String>,
    /// PCI address `domain:bus:slot.function` in hex, e.g. `0000:00:07.0`.
    #[serde(default)]
    pub pci: Option<String>,
    /// A device path in the guest, e.g. `/dev/zvol/persist/vault/volumes/<uuid>.1` or
    /// `/dev/disk/by-id/virtio-<serial>`: resolved in the guest (`readlink -f` through
    /// `guest-exec`) and compared with the device names the agent reports. For disks the
    /// agent reports without serial or PCI address, such as the zvols (`/dev/zdN`) of an
    /// agent that runs where the pool is.
    #[serde(default)]
    pub dev: Option<String>,
}

impl GuestDisk {
    /// Whether only QEMU can tell where the guest sees this disk.
    pub fn needs_qmp(&self) -> bool {
        self.qdev.is_some() || self.port.is_some() || self.wwn.is_some()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the plan {0}")]
    Read(String, #[source] std::io::Error),
    #[error("the plan is not valid")]
    Parse(#[source] serde_json::Error),
    #[error("the plan has version {0}; this tool reads version {VERSION}")]
    Version(u32),
    #[error("the plan is not valid: {0}")]
    Invalid(String),
}

impl evesnap::exit::HasExit for Error {
    fn exit(&self) -> evesnap::exit::Exit {
        evesnap::exit::Exit::Usage
    }
}

impl Plan {
    /// Parses and checks a plan; fills in the id.
    pub fn from_json(text: &str) -> Result<Plan, Error> {
        let mut plan: Plan = serde_json::from_str(text).map_err(Error::Parse)?;
        if plan.version != VERSION {
            return Err(Error::Version(plan.version));
        }
        if plan.action == Action::Delete && plan.id.is_none() && plan.snapshot.is_none() {
            return Err(Error::Invalid(
                "`action` is `delete` but neither `id` nor `snapshot` says which".into(),
            ));
        }
        plan.id.get_or_insert_with(uuid::Uuid::new_v4);
        plan.derive_datasets()?;
        plan.check()?;
        Ok(plan)
    }

    /// The rules the types cannot say; [`Plan::from_json`] applies them, and a caller that
    /// builds a plan as a value calls this.
    pub fn check(&self) -> Result<(), Error> {
        let invalid = |m: String| Err(Error::Invalid(m));
        if let Some(root) = &self.volume_root {
            if self.volumes.is_empty() {
                return invalid("`volume_root` is given but `volumes` is empty".into());
            }
            if let Err(e) = evesnap::zfs::names::check_dataset(root) {
                return invalid(format!("`volume_root`: {e}"));
            }
        }
        if self.agent.trim().is_empty() {
            return invalid("`agent` is empty".into());
        }
        if self.datasets.is_empty() {
            return invalid("`datasets` and `volumes` are empty: name at least one volume".into());
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.datasets {
            if !seen.insert(d) {
                return invalid(format!("`datasets` names `{d}` twice"));
            }
        }
        for (what, t) in [
            ("freeze.timeout_s", self.freeze.timeout_s),
            ("freeze.thaw_after_s", self.freeze.thaw_after_s),
        ] {
            if let Err(why) = evesnap::time::seconds(t) {
                return invalid(format!("`{what}`: {why}"));
            }
        }
        if self.freeze.timeout_s == 0.0 {
            return invalid("`freeze.timeout_s` must be above 0".into());
        }
        for (list, cmds) in [
            ("guest_pre", &self.guest_pre),
            ("guest_post", &self.guest_post),
        ] {
            for (i, c) in cmds.iter().enumerate() {
                if !c.path.starts_with('/') {
                    return invalid(format!(
                        "`{list}[{i}].path` must be an absolute path in the guest, not `{}`",
                        c.path
                    ));
                }
                if let Err(why) = evesnap::time::timeout(c.timeout_s) {
                    return invalid(format!("`{list}[{i}].timeout_s`: {why}"));
                }
            }
        }
        match (self.action, &self.rollback) {
            (Action::Rollback, None) => {
                invalid("`action` is `rollback` but `rollback.to` is missing".into())
            }
            (Action::Create | Action::Delete, Some(_)) => invalid(format!(
                "`rollback` is given but `action` is `{}`",
                self.action.as_str()
            )),
            (_, Some(r)) if r.keep_newer && r.destroy_newer => invalid(
                "`rollback.keep_newer` and `rollback.destroy_newer` exclude each other".into(),
            ),
            _ => Ok(()),
        }?;
        for (d, disk) in &self.disks {
            if !self.datasets.contains(d) {
                return invalid(format!("`disks` names `{d}`, which is not in `datasets`"));
            }
            if let Some(wwn) = &disk.wwn {
                if evesnap::qmp::topology::parse_wwn(wwn).is_none() {
                    return invalid(format!(
                        "`disks.{d}.wwn` must be up to 16 hex digits (0x optional), not `{wwn}`"
                    ));
                }
            }
            // Only a rollback reads `disks` (a create's plan may carry them unused).
            if disk.needs_qmp() && self.qmp.is_none() && self.action == Action::Rollback {
                return invalid(format!(
                    "`disks.{d}` names a QEMU device, root port or WWN: the plan needs `qmp` to place it in the guest"
                ));
            }
            if let Some(dev) = &disk.dev {
                if !dev.starts_with('/') || dev.chars().any(char::is_whitespace) {
                    return invalid(format!(
                        "`disks.{d}.dev` must be an absolute path in the guest, not `{dev}`"
                    ));
                }
            }
        }
        if !(0.0..=3600.0).contains(&self.lock_wait_s) {
            return invalid("`lock_wait_s` must be 0-3600 seconds".into());
        }
        if self.max_snapshots == Some(0) {
            return invalid("`max_snapshots` must be at least 1 (the snapshot just taken)".into());
        }
        Ok(())
    }

    /// Fills `datasets` from `volumes` (EVE's names); a plan names them one way only.
    fn derive_datasets(&mut self) -> Result<(), Error> {
        if self.volumes.is_empty() {
            return Ok(());
        }
        if !self.datasets.is_empty() {
            return Err(Error::Invalid(
                "`datasets` and `volumes` are both given: name the volumes one way".into(),
            ));
        }
        self.datasets = self.volumes.iter().map(|v| self.dataset_of(v)).collect();
        Ok(())
    }

    /// The dataset of one of EVE's volumes.
    pub fn dataset_of(&self, volume: &Volume) -> String {
        let root = self.volume_root.as_deref().unwrap_or(DEFAULT_VOLUME_ROOT);
        format!("{root}/{}.{}", volume.uuid, volume.generation)
    }

    /// The volume UUID a dataset stands for, when the plan names its volumes in EVE's terms.
    pub fn volume_of(&self, dataset: &str) -> Option<uuid::Uuid> {
        self.volumes
            .iter()
            .find(|v| self.dataset_of(v) == dataset)
            .map(|v| v.uuid)
    }

    /// When retention makes room: the plan's choice, else before the create for an app.
    pub fn retention_order(&self) -> RetentionOrder {
        self.retention.unwrap_or(if self.app.is_some() {
            RetentionOrder::BeforeCreate
        } else {
            RetentionOrder::AfterCreate
        })
    }

    pub fn id(&self) -> uuid::Uuid {
        self.id.unwrap_or_default()
    }

    /// The snapshot name: the plan's, or `evesnap-<id>`.
    pub fn snapshot_name(&self) -> String {
        self.snapshot
            .clone()
            .unwrap_or_else(|| format!("evesnap-{}", self.id()))
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
