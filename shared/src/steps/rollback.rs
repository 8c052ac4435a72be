//! What `zrollback --dry-run` records as its `plan`: checked, nothing changed yet.

use serde::{Deserialize, Serialize};

/// One dataset's part of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub dataset: String,
    /// `dataset@name`.
    pub to: String,
    /// Snapshots newer than `to`, newest first: destroyed before the rollback.
    pub newer: Vec<String>,
    /// Bookmarks newer than `to` (OpenZFS only; its `zfs rollback` refuses them too):
    /// destroyed before the rollback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub newer_bookmarks: Vec<String>,
}

/// Everything checked; nothing changed yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackPlan {
    pub targets: Vec<Target>,
    /// With `--keep-newer`: the switches (and no `targets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep: Vec<Switch>,
}

/// One dataset's switch to the data of `to`, in a rollback that keeps the newer snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    pub dataset: String,
    /// `dataset@name`, or `<kept state>@name` to roll forward.
    pub to: String,
    /// Where the dataset's current state goes.
    pub kept_as: String,
    /// The temporary clone that becomes `dataset`.
    pub clone: String,
    /// The clone's `refreservation` (a thick volume's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreservation: Option<u64>,
    /// The dataset is a volume (checked for users before anything changes).
    pub volume: bool,
    /// `dataset` and its kept states: the clone is promoted while its origin is one of them.
    pub family: Vec<String>,
}
