//! The orchestrator's report: a job document whose own fields are typed.
//!
//! `snap-orchestrate` prints it, `snap-orchestrate serve` records it and builds the guest's
//! reply from it. Its `zinfo_snapshot` is eve-api's `ZInfoSnapshot` (see [`crate::eve_api`]),
//! which EVE forwards as it is; every other field is evesnap's own, so the two can never
//! collide. Its JSON Schema is
//! generated from these types (`snap-orchestrate --print-schema report`, checked in as
//! `bins/snap-orchestrate/report.schema.json`).

use serde::{Deserialize, Serialize};

use crate::document::{Step, VERSION};
pub use crate::eve_api::SnapshotType;
use crate::eve_api::{DeviceEntity, ErrorInfo, Severity, ZInfoSnapshot};
use crate::steps::{RolledBack, SnapshotEntry};

/// Who asked for a snapshot, recorded on it as `org.lfedge.evesnap:origin`: the controller
/// (EVE, an operator, `zsnap` by default) or the guest (`snap-orchestrate serve`). Controller
/// retention never counts or destroys the guest's; the guest's have their own budget.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    #[default]
    Controller,
    Guest,
}

impl Origin {
    /// The property's name.
    pub const PROPERTY: &'static str = "org.lfedge.evesnap:origin";

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Controller => "controller",
            Origin::Guest => "guest",
        }
    }

    /// The origin a snapshot's properties record: a snapshot without the property (taken
    /// before it existed) is the controller's.
    pub fn of(properties: &std::collections::BTreeMap<String, String>) -> Origin {
        match properties.get(Origin::PROPERTY).map(String::as_str) {
            Some("guest") => Origin::Guest,
            _ => Origin::Controller,
        }
    }
}

impl std::str::FromStr for Origin {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "controller" => Ok(Origin::Controller),
            "guest" => Ok(Origin::Guest),
            other => Err(format!("unknown origin {other:?} (controller or guest)")),
        }
    }
}

/// What a snapshot can claim: what was proven when `zfs snapshot` returned, never more
/// (written on the snapshot only after it returned inside the verified freeze).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// The filesystems were frozen and the application quiesced: by `guest_pre` hooks that
    /// all succeeded, or by the caller (a guest request with `quiesced`, whose snapshot
    /// returned before the guest's deadline).
    Application,
    /// Frozen and verified, the application not known to be quiesced.
    Filesystem,
    /// Not frozen (no agent, or a guest disk with no filesystem mounted): as if the power
    /// had been cut.
    Crash,
    /// The VM was not running (no QEMU, or QEMU with its guest stopped) and no process held
    /// the volumes open; how the guest stopped is not known (it may have crashed).
    Halted,
    /// The VM was not running, and its guest had powered itself off (QMP run state
    /// `shutdown`) or the plan says it was shut down cleanly (`shutdown_clean`).
    HaltedClean,
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Application => "application",
            Consistency::Filesystem => "filesystem",
            Consistency::Crash => "crash",
            Consistency::Halted => "halted",
            Consistency::HaltedClean => "halted_clean",
        }
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    /// As recorded in the snapshot's `org.lfedge.evesnap:consistency` property.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "application" => Ok(Consistency::Application),
            "filesystem" => Ok(Consistency::Filesystem),
            "crash" => Ok(Consistency::Crash),
            "halted" => Ok(Consistency::Halted),
            "halted_clean" => Ok(Consistency::HaltedClean),
            other => Err(format!("unknown consistency {other:?}")),
        }
    }
}

/// What the run does.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Create,
    Rollback,
    /// Destroys the snapshot set (by `id`, or by name); one already gone is success (EVE
    /// deletes a snapshot by leaving its id out of the list).
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Rollback => "rollback",
            Action::Delete => "delete",
        }
    }
}

/// What became of the plan's `guest_post` commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuestPost {
    /// They ran (each command's result is in the `guest_post` step).
    Ran,
    /// The agent was lost or silent: they are recorded and run when it answers again
    /// (the watchdog, `snap-orchestrate serve` or `snap-orchestrate recover`; see
    /// `evesnap::pending`).
    Pending,
}

/// The first failure as evesnap records it: the job document's fields (`tool`, `kind`,
/// `message`), the failed `step`, and `description` and `timestamp` as in eve-api's
/// `snap_err` (`zinfo_snapshot.snap_err`, which adds severity, entities and retry condition).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportError {
    pub tool: String,
    /// The exit code's name (`thaw-failed`, `preflight-failed`, …: `Exit::kind`).
    pub kind: String,
    pub message: String,
    pub description: String,
    /// The step that failed: `preflight`, `guest_pre`, `freeze`, `snapshot`, `thaw`,
    /// `guest_post`, `retention`, `unmounted`, `rollback`, `delete`.
    pub step: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
}

/// What a warning is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum WarningKind {
    /// The freeze failed and the run fell back to a crash-consistent snapshot, as the
    /// plan's `freeze.on_failure: "crash"` allows: the guest was thawed and verified first.
    CrashFallback,
}

/// A failure the run went on from, as its plan allows: the run succeeded, but not as well
/// as asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportWarning {
    pub kind: WarningKind,
    /// The step that failed (`freeze`).
    pub step: String,
    /// Why it failed.
    pub message: String,
}

/// Whether the guest ran with expedited RCU for the freeze (`freeze.expedite_rcu`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpeditedRcu {
    pub set: bool,
    /// Its previous setting was put back (else the guest does it by itself within 10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<bool>,
    /// Why it was not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The orchestrator's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The job document's version ([`VERSION`]).
    pub version: u32,
    /// The run succeeded: every step succeeded, or the ones that failed were fallen back
    /// from as the plan allows, each named in `warnings`.
    pub ok: bool,
    /// One entry per step, in order (see the crate documentation of `snap-orchestrate`).
    pub steps: Vec<Step>,
    pub error: Option<ReportError>,
    /// The plan's guest agent address.
    pub agent: String,
    /// The plan's datasets.
    pub datasets: Vec<String>,
    /// The snapshot's name (create) or the one rolled back to.
    pub snapshot: String,
    /// The snapshot id (eve-api `SnapshotDesc.id`).
    pub id: uuid::Uuid,
    #[serde(rename = "type")]
    pub kind: SnapshotType,
    pub action: Action,
    /// Who asked for it (`controller` or `guest`), as recorded on the snapshots.
    #[serde(default)]
    pub origin: Origin,
    /// Create: the snapshots' creation, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<String>,
    /// Create: the snapshots taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotEntry>>,
    /// The plan's app (EVE's `AppUUID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<uuid::Uuid>,
    /// For a plan that names its volumes in EVE's terms: volume UUID → `dataset@name`
    /// (eve-api's `VolumeSnapshotMeta`), the set created, found, rolled back to or deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_snapshots: Option<std::collections::BTreeMap<uuid::Uuid, String>>,
    /// Create: the set with this id already existed on every volume and is reported as it
    /// was taken (nothing was frozen or snapshotted). Rollback: every volume already was at
    /// the snapshot (nothing written since, nothing newer), so nothing was rolled back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub existing: bool,
    /// Delete: the snapshots destroyed (empty when the set was already gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<Vec<String>>,
    /// Create: what the snapshot can claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// Create: from the freeze command's return to the thaw command's return, one clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<f64>,
    /// Create: how long the run waited, before its freeze, for other VMs' freeze windows on
    /// its pool to end (windows on one pool take turns; the guest still writes meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_turn_wait_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expedited_rcu: Option<ExpeditedRcu>,
    /// The plan's app instance name (`app_name`), for eve-api's app entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_name: Option<String>,
    /// eve-api's `ZInfoSnapshot` of this run, in protojson with proto field names.
    pub zinfo_snapshot: ZInfoSnapshot,
    /// Absent when the plan has no `guest_post` or the run never got to need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_post: Option<GuestPost>,
    /// Rollback: each dataset and the snapshot it went back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<Vec<RolledBack>>,
    /// Rollback: newer snapshots destroyed on the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<Vec<String>>,
    /// Failures the run went on from (a failed freeze with `freeze.on_failure: "crash"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<ReportWarning>,
    /// A consistency group (a plan with `vms`): each VM's own part, in the plan's order.
    /// The report's `agent` is then empty, `datasets` every VM's, `consistency` the
    /// weakest VM's and `freeze_window_ms` the group's (first freeze to last thaw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vms: Option<Vec<VmReport>>,
}

/// One VM of a consistency group: its own steps (`preflight`, `guest_pre`, `qga-freeze`,
/// `qga-thaw`, `guest_post`) and what its snapshots can claim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    /// The VM's guest agent address.
    pub agent: String,
    /// The VM's volumes.
    pub datasets: Vec<String>,
    /// The plan's `required`: whether this VM's failure fails the group.
    pub required: bool,
    /// Every step of this VM succeeded.
    pub ok: bool,
    pub steps: Vec<Step>,
    /// Filesystems frozen in this VM (absent: not frozen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<i64>,
    /// What this VM's snapshots claim (absent when no snapshot was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// This VM's freeze command's return to its thaw command's return.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_post: Option<GuestPost>,
    /// Why this VM failed (for a VM that is not `required`, the group goes on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReportError>,
}

impl Report {
    /// An empty report for a run of `action` on `datasets`.
    pub fn new(
        id: uuid::Uuid,
        kind: SnapshotType,
        action: Action,
        agent: &str,
        datasets: &[String],
        snapshot: &str,
    ) -> Report {
        Report {
            version: VERSION,
            ok: true,
            steps: Vec::new(),
            error: None,
            agent: agent.to_string(),
            datasets: datasets.to_vec(),
            snapshot: snapshot.to_string(),
            id,
            kind,
            action,
            origin: Origin::Controller,
            create_time: None,
            snapshots: None,
            app: None,
            volume_snapshots: None,
            existing: false,
            deleted: None,
            consistency: None,
            freeze_window_ms: None,
            pool_turn_wait_ms: None,
            expedited_rcu: None,
            app_name: None,
            zinfo_snapshot: ZInfoSnapshot {
                id,
                config_id: None,
                config_version: None,
                create_time: None,
                kind: kind.into(),
                snap_err: None,
            },
            guest_post: None,
            rolled_back: None,
            destroyed: None,
            warnings: Vec::new(),
            vms: None,
        }
    }

    /// Sets `create_time` (RFC 3339), here and in `zinfo_snapshot`.
    pub fn set_create_time(&mut self, at: String) {
        self.zinfo_snapshot.create_time = Some(at.clone());
        self.create_time = Some(at);
    }

    /// The eve-api entities of this run: the app instance, when named, and every volume.
    pub fn entities(&self) -> Vec<DeviceEntity> {
        DeviceEntity::app(self.app, self.app_name.as_deref())
            .into_iter()
            .chain(self.datasets.iter().map(|d| DeviceEntity::volume(d)))
            .collect()
    }

    /// Appends a step.
    pub fn push(&mut self, step: Step) {
        self.ok &= step.ok;
        self.steps.push(step);
    }

    /// Inserts a step at `index`, for a step measured earlier but finished later (the
    /// snapshot, whose read-back waits until after the thaw), so steps stay in start order.
    pub fn insert(&mut self, index: usize, step: Step) {
        self.ok &= step.ok;
        self.steps.insert(index.min(self.steps.len()), step);
    }

    /// The run goes on from the failure of `step`, as its plan allows: the steps that failed
    /// so far (the ones of that failure) no longer fail the run; `message` says why.
    pub fn fall_back(&mut self, kind: WarningKind, step: &str, message: String) {
        self.warnings.push(ReportWarning {
            kind,
            step: step.to_string(),
            message,
        });
        self.ok = self.error.is_none();
    }

    /// The reason of a crash-consistent fallback, if the run fell back to one.
    pub fn crash_reason(&self) -> Option<&str> {
        self.warnings
            .iter()
            .find(|w| w.kind == WarningKind::CrashFallback)
            .map(|w| w.message.as_str())
    }

    /// Records the run's failure in `step` (the first one counts), here and as eve-api's
    /// `snap_err`.
    pub fn fail(&mut self, tool: &str, step: &str, error: &anyhow::Error) {
        self.ok = false;
        if self.error.is_some() {
            return;
        }
        let exit = crate::exit::exit_of(error);
        let message = crate::exit::chain(error);
        let timestamp = crate::time::now_rfc3339();
        self.zinfo_snapshot.snap_err = Some(ErrorInfo {
            description: message.clone(),
            timestamp: timestamp.clone(),
            severity: Severity::of(exit),
            entities: self.entities(),
            retry_condition: crate::eve_api::retry_condition(error),
        });
        self.error = Some(ReportError {
            tool: tool.to_string(),
            kind: exit.kind().to_string(),
            description: message.clone(),
            message,
            step: step.to_string(),
            timestamp,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::StepTimer;

    fn report() -> Report {
        Report::new(
            uuid::Uuid::nil(),
            SnapshotType::Immediate,
            Action::Create,
            "unix:/a",
            &["p/a".to_string()],
            "s",
        )
    }

    #[test]
    fn a_fallback_forgives_the_failed_steps_so_far_and_says_why() {
        let mut r = report();
        r.push(StepTimer::start("qga-freeze").finish(false, Default::default()));
        assert!(!r.ok);
        assert_eq!(r.crash_reason(), None);
        r.fall_back(WarningKind::CrashFallback, "freeze", "froze 1 of 2".into());
        assert!(r.ok);
        assert_eq!(r.crash_reason(), Some("froze 1 of 2"));
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["warnings"][0]["kind"], "crash-fallback");
        // A step failing after the fallback fails the run again.
        r.push(StepTimer::start("guest_post").finish(false, Default::default()));
        assert!(!r.ok);
        // A run that failed stays failed.
        let mut failed = report();
        let error = crate::exit::coded(crate::exit::Exit::StepFailed, "x");
        failed.fail("t", "freeze", &error);
        failed.fall_back(WarningKind::CrashFallback, "freeze", "y".into());
        assert!(!failed.ok);
    }

    #[test]
    fn no_warnings_leave_no_field() {
        let json = serde_json::to_value(report()).expect("json");
        assert!(json.get("warnings").is_none(), "{json}");
    }
}
