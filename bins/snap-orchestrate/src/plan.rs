//! The plan: what the controller asks for, as JSON (schema in `plan.schema.json`).
//!
//! Unknown fields and wrong types are refused with a message that names the field and
//! gives line and column; defaults are filled in here so the flow never guesses.

use std::collections::BTreeMap;

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
    #[serde(default)]
    pub action: Action,
    /// Guest agent address: `unix:<path>`, a plain path, or `vsock:<cid>:<port>`.
    pub agent: String,
    /// QMP socket of the VM, to learn whether it runs (used for rollback).
    #[serde(default)]
    pub qmp: Option<String>,
    /// The VM's volumes.
    pub datasets: Vec<String>,
    /// Snapshot name; default `evesnap-<id>`.
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub freeze: FreezePlan,
    #[serde(default)]
    pub guest_pre: Vec<GuestCommand>,
    #[serde(default)]
    pub guest_post: Vec<GuestCommand>,
    /// Retention after a create: keep at most this many snapshots per dataset (eve-api
    /// `max_snapshots`), oldest removed first, never a held one.
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
    /// How the guest sees each dataset, for the "not mounted in the guest" check before a
    /// rollback: by virtio serial, by PCI address where the agent reports no serial, or by a
    /// device path resolved in the guest (zvols, which the agent reports with neither).
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackPlan {
    /// The snapshot to go back to.
    pub to: String,
    /// Destroy snapshots newer than `to` (after checking none is held or cloned).
    #[serde(default)]
    pub destroy_newer: bool,
    /// The controller states the VM is stopped (otherwise QMP or the guest decides).
    #[serde(default)]
    pub vm_stopped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestDisk {
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
        plan.id.get_or_insert_with(uuid::Uuid::new_v4);
        plan.check()?;
        Ok(plan)
    }

    /// The rules the types cannot say; [`Plan::from_json`] applies them, and a caller that
    /// builds a plan as a value calls this.
    pub fn check(&self) -> Result<(), Error> {
        let invalid = |m: String| Err(Error::Invalid(m));
        if self.agent.trim().is_empty() {
            return invalid("`agent` is empty".into());
        }
        if self.datasets.is_empty() {
            return invalid("`datasets` is empty: name at least one volume".into());
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
            (Action::Create, Some(_)) => {
                invalid("`rollback` is given but `action` is `create`".into())
            }
            _ => Ok(()),
        }?;
        for (d, disk) in &self.disks {
            if !self.datasets.contains(d) {
                return invalid(format!("`disks` names `{d}`, which is not in `datasets`"));
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
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"version":1,"agent":"unix:/a","datasets":["p/a"]}"#;

    #[test]
    fn minimal_plan_gets_defaults() {
        let plan = Plan::from_json(MINIMAL).expect("valid");
        assert_eq!(plan.action, Action::Create);
        assert_eq!(plan.kind, SnapshotType::Immediate);
        assert!(plan.freeze.required);
        assert_eq!(plan.snapshot_name(), format!("evesnap-{}", plan.id()));
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = Plan::from_json(r#"{"version":1,"agent":"a","datasets":["p/a"],"freez":{}}"#)
            .unwrap_err();
        let cause = std::error::Error::source(&err).expect("cause").to_string();
        assert!(cause.contains("unknown field `freez`"), "{cause}");
        let err = Plan::from_json(
            r#"{"version":1,"agent":"a","datasets":["p/a"],"freeze":{"timeout":1}}"#,
        )
        .unwrap_err();
        assert!(std::error::Error::source(&err)
            .expect("cause")
            .to_string()
            .contains("`timeout`"));
    }

    #[test]
    fn wrong_values_are_refused() {
        for (plan, needle) in [
            (r#"{"version":1,"agent":"a","datasets":[]}"#, "datasets"),
            (
                r#"{"version":1,"agent":"a","datasets":["p/a","p/a"]}"#,
                "twice",
            ),
            (
                r#"{"version":1,"agent":"a","datasets":["p/a"],"action":"rollback"}"#,
                "rollback.to",
            ),
            (
                r#"{"version":1,"agent":"a","datasets":["p/a"],"guest_pre":[{"path":"sync"}]}"#,
                "absolute",
            ),
            (
                r#"{"version":1,"agent":"a","datasets":["p/a"],"max_snapshots":0}"#,
                "max_snapshots",
            ),
            (
                r#"{"version":1,"agent":"a","datasets":["p/a"],"disks":{"p/b":{"serial":"x"}}}"#,
                "p/b",
            ),
            (
                r#"{"version":1,"agent":"a","datasets":["p/a"],"disks":{"p/a":{"dev":"zd0"}}}"#,
                "disks.p/a.dev",
            ),
            (
                r#"{"version":1,"agent":"a","datasets":["p/a"],"disks":{"p/a":{"dev":"-f /x"}}}"#,
                "absolute",
            ),
        ] {
            let err = Plan::from_json(plan).unwrap_err().to_string();
            assert!(err.contains(needle), "{plan}: {err}");
        }
        assert!(matches!(
            Plan::from_json(r#"{"version":2,"agent":"a","datasets":["p/a"]}"#),
            Err(Error::Version(2))
        ));
        // Regression: these were accepted, then panicked converting to a Duration/deadline.
        for plan in [
            r#"{"version":1,"agent":"a","datasets":["p/a"],"freeze":{"timeout_s":1e300}}"#,
            r#"{"version":1,"agent":"a","datasets":["p/a"],"freeze":{"thaw_after_s":1e20}}"#,
            r#"{"version":1,"agent":"a","datasets":["p/a"],"guest_pre":[{"path":"/x","timeout_s":1e30}]}"#,
        ] {
            let err = Plan::from_json(plan).unwrap_err().to_string();
            assert!(
                err.contains("timeout_s") || err.contains("thaw_after_s"),
                "{plan}: {err}"
            );
        }
        let err =
            Plan::from_json(r#"{"version":1,"agent":"a","datasets":["p/a"],"type":"weekly"}"#)
                .unwrap_err();
        assert!(std::error::Error::source(&err)
            .expect("cause")
            .to_string()
            .contains("weekly"));
    }
}
