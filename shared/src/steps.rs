//! What each step records: the typed fields of a step in the job document.
//!
//! The small tools and the orchestrator write the same records, and whoever reads a step
//! back (zsnap reading the upstream freeze, qga-thaw the count it froze, tests) reads it
//! through [`Step::record`](crate::document::Step::record) into these types, never by key
//! name. Each record says which step (`tool`) it belongs to.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::qga::watchdog::Watchdog;
pub use crate::qga::CommandRun;
use crate::zfs::SnapshotInfo;

mod rollback;

pub use rollback::{RollbackPlan, Switch, Target};

/// Adds every record of this module to `generator`'s definitions: the report's schema
/// publishes them in `$defs`, since a step's own fields (open in `Step`'s schema) are one of
/// them, chosen by its `tool` and shape. The orchestrator's own small records (`existing`,
/// a failed `zsnap` step's `error`) are not among them.
pub fn add_schemas(generator: &mut schemars::SchemaGenerator) {
    let _ = [
        generator.subschema_for::<FreezeReport>(),
        generator.subschema_for::<ThawReport>(),
        generator.subschema_for::<NotThawed>(),
        generator.subschema_for::<SnapshotReport>(),
        generator.subschema_for::<SnapshotPlan>(),
        generator.subschema_for::<ActionReport>(),
        generator.subschema_for::<ActionFailed>(),
        generator.subschema_for::<RollbackReport>(),
        generator.subschema_for::<DestroyReport>(),
        generator.subschema_for::<GuestCommands>(),
        generator.subschema_for::<FlushReport>(),
        generator.subschema_for::<Skipped>(),
        generator.subschema_for::<Failed>(),
    ];
}

/// The typed fields of one kind of step.
pub trait StepRecord: Serialize + DeserializeOwned {
    /// The step's `tool` in the document.
    const TOOL: &'static str;
}

/// A successful freeze: the `qga-freeze` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeReport {
    /// Filesystems the freeze froze; `null` when an existing freeze was adopted.
    pub frozen: Option<i64>,
    /// The mountpoints asked for; `null`: all of the guest's.
    pub mountpoints: Option<Vec<String>>,
    /// An existing freeze was adopted (`--adopt-frozen`).
    pub adopted: bool,
    /// The guest agent's version (`guest-info`).
    pub agent_version: String,
    /// Round trip of the freeze command alone (the agent runs its hooks inside it).
    pub freeze_ms: f64,
    /// When the freeze command returned (µs since the epoch): the freeze window starts here.
    pub frozen_at_unix_us: u64,
    /// The auto-thaw watchdog, if armed.
    pub watchdog: Option<Watchdog>,
}

impl StepRecord for FreezeReport {
    const TOOL: &'static str = "qga-freeze";
}

/// A verified thaw: the `qga-thaw` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ThawReport {
    /// Filesystems thawed (0: nothing was frozen).
    pub thawed: i64,
    /// What the freeze froze, if known.
    pub expected: Option<i64>,
    /// Round trip of the thaw command alone (the agent runs its hooks inside it).
    pub thaw_ms: f64,
    /// When the thaw command returned (µs since the epoch): the freeze window ends here.
    pub thawed_at_unix_us: u64,
    /// The thaw went through the freeze's own connection, kept by its watchdog.
    #[serde(default)]
    pub kept_connection: bool,
    /// The watchdog this thaw cancelled, if one was armed.
    pub watchdog_cancelled: Option<Watchdog>,
    /// The thaw thawed fewer filesystems than the freeze froze: some were thawed early (by
    /// the watchdog?), so the snapshot may not be consistent. The step failed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub early_thaw: bool,
}

impl StepRecord for ThawReport {
    const TOOL: &'static str = "qga-thaw";
}

/// A thaw that did not happen or did not verify: the failed `qga-thaw` step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotThawed {
    pub thawed: Option<i64>,
    /// What the freeze froze, if known.
    pub expected: Option<i64>,
    /// The thaw was asked and not verified: the guest may still be frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub possibly_frozen: Option<bool>,
    /// Why no thaw was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_thaw: Option<bool>,
}

impl StepRecord for NotThawed {
    const TOOL: &'static str = "qga-thaw";
}

/// How a set of snapshots is taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Method {
    /// One dataset, one call.
    Single,
    /// `zfs snapshot a@n b@n ...`: one call, one transaction group (OpenZFS).
    Multi,
    /// `zfs snapshot -r parent@n`: one call, atomic, where the datasets are exactly `parent`'s
    /// descendants (a zfs without multi-name snapshots, e.g. zfs-fuse). When `parent` is not
    /// one of the datasets, its own snapshot (`extra`) is destroyed after the freeze window;
    /// so are those of datasets between `parent` and the datasets (`between`).
    Recursive {
        parent: String,
        extra: Option<String>,
        /// The snapshots of datasets between `parent` and the datasets (e.g. `pool/vm0`
        /// for `pool/vm0/disk0` in a group of several VMs' volumes under `pool`), which the
        /// recursive call makes too: destroyed with `extra`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        between: Vec<String>,
    },
    /// One call per dataset, not atomic; a failure destroys what this run created.
    OneByOne,
}

impl Method {
    pub fn atomic(&self) -> bool {
        !matches!(self, Method::OneByOne)
    }
}

/// One snapshot taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// `dataset@name`.
    pub name: String,
    /// A string: 64-bit guids do not survive JSON readers that use doubles.
    pub guid: String,
    pub createtxg: u64,
    /// Seconds since the epoch.
    pub creation: u64,
}

impl SnapshotEntry {
    /// The dataset part of `name`.
    pub fn dataset(&self) -> &str {
        self.name.split_once('@').map_or(&self.name, |(d, _)| d)
    }

    /// The part after `@`.
    pub fn short_name(&self) -> &str {
        self.name.split_once('@').map_or("", |(_, s)| s)
    }
}

/// A snapshot set taken: the `zsnap` step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotReport {
    pub snapshots: Vec<SnapshotEntry>,
    /// All snapshots belong to one transaction group.
    pub atomic: bool,
    pub method: Method,
    /// Milliseconds spent in the `zfs snapshot` call(s): the part inside a freeze window.
    pub snapshot_ms: f64,
    /// `zfs` calls inside that window.
    pub calls: usize,
    /// The user properties set on every snapshot.
    pub properties: BTreeMap<String, String>,
    /// Snapshots made only as a side effect (a recursive parent's own) that could not be
    /// destroyed again; normally empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_behind: Vec<String>,
    /// Snapshots made only as a side effect that are destroyed once the document was
    /// written: outside a pipeline's freeze window. A failure there is a warning on stderr.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destroy_after_output: Vec<String>,
}

impl StepRecord for SnapshotReport {
    const TOOL: &'static str = "zsnap";
}

/// A snapshot set planned: the `zsnap` step of a `--dry-run`, and what a failed take had
/// decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPlan {
    pub method: Method,
    pub atomic: bool,
    /// `dataset@name`, one per dataset.
    pub planned: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

impl StepRecord for SnapshotPlan {
    const TOOL: &'static str = "zsnap";
}

/// `zsnap list`, `destroy`, `prune`: the `zsnap` step of an action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "action", rename_all = "lowercase", deny_unknown_fields)]
pub enum ActionReport {
    List { snapshots: Vec<SnapshotInfo> },
    Destroy(DestroyReport),
    Prune(DestroyReport),
}

impl StepRecord for ActionReport {
    const TOOL: &'static str = "zsnap";
}

/// The `zsnap` actions besides taking a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ZsnapAction {
    List,
    Destroy,
    Prune,
}

/// What a failed action step says of itself, beside its [`Failed`] record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionFailed {
    pub action: ZsnapAction,
}

/// One dataset rolled back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolledBack {
    pub dataset: String,
    /// `dataset@name`.
    pub to: String,
}

/// A rollback done, or with `dry_run` planned: the `zrollback` step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackReport {
    /// Nothing was changed: `plan` says what would be.
    pub dry_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<RollbackPlan>,
    pub rolled_back: Vec<RolledBack>,
    pub destroyed: Vec<String>,
    /// With `keep_newer`: where each dataset's previous state is kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<KeptState>,
}

/// A dataset's state before a rollback that kept the newer snapshots: renamed, with its
/// snapshots newer than the target, to `kept_as`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeptState {
    pub dataset: String,
    /// `kept_as`: `<dataset>.evesnap-kept-<YYYYMMDD-HHMMSSmmm>`.
    pub kept_as: String,
    /// The snapshots now under `kept_as` (those the dataset no longer has).
    pub snapshots: Vec<String>,
}

impl StepRecord for RollbackReport {
    const TOOL: &'static str = "zrollback";
}

/// Snapshots destroyed (`zsnap destroy`, `zsnap prune`, the orchestrator's retention).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestroyReport {
    /// Destroyed (or, with `defer`, marked for destruction when the last hold goes).
    pub destroyed: Vec<String>,
    /// Left alone, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<Kept>,
    /// `zfs destroy` failed on these (after the checks passed: a race, or zfs-fuse being
    /// busy); the rest went on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<Kept>,
    pub dry_run: bool,
    /// `zsnap prune`: how many snapshot sets it keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep: Option<usize>,
}

/// A snapshot left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Kept {
    pub snapshot: String,
    pub reason: String,
}

/// A list of guest commands run: the `guest_pre` and `guest_post` steps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestCommands {
    pub commands: Vec<CommandRun>,
}

/// The flush before the freeze (`freeze.flush_first`): the `flush` step. It never fails
/// the run: a flush that could not run leaves the work to the freeze (`flushed: false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlushReport {
    /// The command run in the guest: `sync -f <mountpoints>…`, or `sync` when every
    /// filesystem is frozen.
    pub command: Vec<String>,
    /// It ran and exited 0.
    pub flushed: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StepRecord for FlushReport {
    const TOOL: &'static str = "flush";
}

/// A step that did nothing because an upstream step failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Skipped {
    pub skipped: bool,
    pub reason: String,
}

/// A step that failed, with why (the document's `error` says it too; a step keeps its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Failed {
    pub error: String,
    /// A preflight's findings, when that is why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<crate::zfs::Problem>,
}
