//! The orchestrator's report: a job document whose own fields are typed.
//!
//! `snap-orchestrate` prints it, `snap-orchestrate serve` records it and builds the guest's
//! reply from it, EVE forwards its `error` as eve-api's `snap_err`. Its JSON Schema is
//! generated from these types (`snap-orchestrate --print-schema report`, checked in as
//! `bins/snap-orchestrate/report.schema.json`).

use serde::{Deserialize, Serialize};

use crate::document::{Step, VERSION};
use crate::exit::Exit;
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
}

impl Consistency {
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Application => "application",
            Consistency::Filesystem => "filesystem",
            Consistency::Crash => "crash",
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
            other => Err(format!("unknown consistency {other:?}")),
        }
    }
}

/// eve-api's `SnapshotDesc.type`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotType {
    AppUpdate,
    #[default]
    Immediate,
}

impl SnapshotType {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotType::AppUpdate => "app_update",
            SnapshotType::Immediate => "immediate",
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

/// How bad a failure is: `critical` when the guest may still be frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Critical,
}

/// The first failure, with eve-api's `snap_err` fields (`description`, `severity`,
/// `timestamp`) beside the job document's (`tool`, `kind`, `message`) and the failed `step`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportError {
    pub tool: String,
    /// The exit code's name ([`Exit::kind`]).
    pub kind: String,
    pub message: String,
    pub description: String,
    pub severity: Severity,
    /// The step that failed: `preflight`, `guest_pre`, `freeze`, `snapshot`, `thaw`,
    /// `guest_post`, `retention`, `unmounted`, `rollback`.
    pub step: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
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
    /// Every step succeeded.
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
    /// Create: what the snapshot can claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// Create: from the freeze command's return to the thaw command's return, one clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expedited_rcu: Option<ExpeditedRcu>,
    /// Absent when the plan has no `guest_post` or the run never got to need it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_post: Option<GuestPost>,
    /// Rollback: each dataset and the snapshot it went back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<Vec<RolledBack>>,
    /// Rollback: newer snapshots destroyed on the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<Vec<String>>,
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
            consistency: None,
            freeze_window_ms: None,
            expedited_rcu: None,
            guest_post: None,
            rolled_back: None,
            destroyed: None,
            vms: None,
        }
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

    /// Records the run's failure in `step` (the first one counts).
    pub fn fail(&mut self, tool: &str, step: &str, exit: Exit, message: String) {
        self.ok = false;
        if self.error.is_some() {
            return;
        }
        self.error = Some(ReportError {
            tool: tool.to_string(),
            kind: exit.kind().to_string(),
            description: message.clone(),
            message,
            severity: if exit == Exit::ThawFailed {
                Severity::Critical
            } else {
                Severity::Error
            },
            step: step.to_string(),
            timestamp: crate::time::now_rfc3339(),
        });
    }
}
