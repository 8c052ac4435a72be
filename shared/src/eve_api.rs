//! eve-api's view of a run: `ZInfoSnapshot` and its `snap_err` (`ErrorInfo`), as protojson
//! writes them with proto field names (`protojson.MarshalOptions{UseProtoNames: true}`):
//! enums by their value names, `google.protobuf.Timestamp` as an RFC 3339 string, zero
//! values left out. EVE can decode the report's `zinfo_snapshot` with `protojson.Unmarshal`
//! into `info.ZInfoSnapshot` and forward it as it is; nothing of evesnap's own is inside.
//!
//! Messages and enums from lf-edge/eve-api `proto/info/info.proto` (`ZInfoSnapshot`,
//! `SnapshotType`) and `proto/info/common.proto` (`ErrorInfo`, `Severity`, `DeviceEntity`,
//! `Entity`).

use serde::{Deserialize, Serialize};

use crate::exit::Exit;
use crate::zfs::{self, Problem};

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

/// eve-api `ZInfoSnapshot`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ZInfoSnapshot {
    /// The snapshot id (UUID).
    pub id: uuid::Uuid,
    /// The plan's `config_id` (EVE sends it for locally triggered snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_id: Option<String>,
    /// The plan's `config_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_version: Option<String>,
    /// When the snapshot was created (RFC 3339, UTC); absent when none was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<String>,
    #[serde(rename = "type")]
    pub kind: EveSnapshotType,
    /// The run's failure; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snap_err: Option<ErrorInfo>,
}

/// eve-api `SnapshotType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[allow(clippy::enum_variant_names)]
pub enum EveSnapshotType {
    #[serde(rename = "SNAPSHOT_TYPE_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "SNAPSHOT_TYPE_APP_UPDATE")]
    AppUpdate,
    #[serde(rename = "SNAPSHOT_TYPE_IMMEDIATE")]
    Immediate,
}

impl From<SnapshotType> for EveSnapshotType {
    fn from(kind: SnapshotType) -> Self {
        match kind {
            SnapshotType::AppUpdate => EveSnapshotType::AppUpdate,
            SnapshotType::Immediate => EveSnapshotType::Immediate,
        }
    }
}

/// eve-api `ErrorInfo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    pub description: String,
    /// When the failure happened (RFC 3339, UTC).
    pub timestamp: String,
    pub severity: Severity,
    /// The app instance (when the plan names it) and the volumes of the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entities: Vec<DeviceEntity>,
    /// When a retry can succeed (from the failure's kind, see [`retry_condition`]).
    pub retry_condition: String,
}

/// eve-api `Severity`. evesnap uses `SEVERITY_ERROR` only when the guest may still be
/// frozen (exit 6), the worst it can be; every other failure is `SEVERITY_WARNING`: the
/// operation did not happen (or only partly, as the description says) and the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[allow(clippy::enum_variant_names)]
pub enum Severity {
    #[serde(rename = "SEVERITY_UNSPECIFIED")]
    Unspecified,
    #[serde(rename = "SEVERITY_NOTICE")]
    Notice,
    #[serde(rename = "SEVERITY_WARNING")]
    Warning,
    #[serde(rename = "SEVERITY_ERROR")]
    Error,
}

impl Severity {
    /// The severity of a run that ended with `exit`.
    pub fn of(exit: Exit) -> Severity {
        match exit {
            Exit::Success => Severity::Unspecified,
            Exit::ThawFailed => Severity::Error,
            _ => Severity::Warning,
        }
    }
}

/// eve-api `DeviceEntity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntity {
    pub entity: Entity,
    /// The entity's UUID; absent when it is not known (a dataset not named
    /// `<volume uuid>.<generation>`, an app instance named without its UUID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_id: Option<uuid::Uuid>,
    /// The app instance's name, or the volume's dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_name: Option<String>,
}

/// eve-api `Entity`: the two kinds a snapshot involves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Entity {
    #[serde(rename = "ENTITY_APP_INSTANCE")]
    AppInstance,
    #[serde(rename = "ENTITY_VOLUME")]
    Volume,
}

impl DeviceEntity {
    /// The app instance, when the plan names it by UUID or name.
    pub fn app(id: Option<uuid::Uuid>, name: Option<&str>) -> Option<DeviceEntity> {
        (id.is_some() || name.is_some()).then(|| DeviceEntity {
            entity: Entity::AppInstance,
            entity_id: id,
            entity_name: name.map(str::to_string),
        })
    }

    /// A volume by its dataset: EVE names them `persist/vault/volumes/<uuid>.<generation>`
    /// (`persist/clear/…` unencrypted), whose UUID is the volume's.
    pub fn volume(dataset: &str) -> DeviceEntity {
        let leaf = dataset.rsplit('/').next().unwrap_or(dataset);
        let stem = leaf.split_once('.').map_or(leaf, |(stem, _)| stem);
        DeviceEntity {
            entity: Entity::Volume,
            entity_id: stem.parse().ok(),
            entity_name: Some(dataset.to_string()),
        }
    }
}

/// When a run that failed with `error` can be retried with success: from its exit code,
/// or from what the error says more precisely (a preflight's problems, zfs out of space).
pub fn retry_condition(error: &anyhow::Error) -> String {
    if let Some(text) = from_zfs(error) {
        return text;
    }
    match crate::exit::exit_of(error) {
        Exit::Success => "",
        Exit::StepFailed => "after the cause in the description is fixed",
        Exit::Usage => "never as it is: the plan must be corrected",
        Exit::AgentUnreachable => "when the VM runs and its guest agent accepts connections",
        Exit::AgentTimeout => "when the guest agent answers in time",
        Exit::UpstreamFailed => "after the upstream step succeeds",
        Exit::ThawFailed => {
            "after the guest is thawed (the auto-thaw watchdog keeps trying while the VM exists)"
        }
        Exit::Preflight => "after the failed check passes; nothing was changed",
        Exit::Busy => "when the VM's other snapshot operation has finished",
    }
    .to_string()
}

/// The retry condition a zfs error implies, if it is specific.
fn from_zfs(error: &anyhow::Error) -> Option<String> {
    match crate::exit::find::<zfs::Error>(error)? {
        zfs::Error::Preflight { problems } => problems.first().map(of_problem),
        zfs::Error::OutOfSpace { .. } => Some("after space is freed in the pool".to_string()),
        _ => None,
    }
}

fn of_problem(problem: &Problem) -> String {
    match problem {
        Problem::Missing { dataset } => format!("after dataset {dataset} exists"),
        Problem::NameTaken { snapshot } => {
            format!("with another snapshot name, or after {snapshot} is destroyed")
        }
        Problem::NoRoom {
            dataset, missing, ..
        } => {
            format!("after {missing} bytes are freed for {dataset}")
        }
        Problem::Held { snapshot, .. } => format!("after the holds on {snapshot} are released"),
        Problem::HasClones { snapshot, .. } => {
            format!("after the clones of {snapshot} are destroyed or promoted")
        }
        Problem::NewerSnapshots { to, .. } => {
            format!("with destroy_newer, or after the snapshots newer than {to} are destroyed")
        }
        Problem::NoSuchSnapshot { snapshot } => format!("never: {snapshot} does not exist"),
        Problem::NoRoomToKeep {
            dataset, missing, ..
        } => format!("after {missing} bytes are freed for {dataset}, or without keep_newer"),
        Problem::Ambiguous { snapshot, .. } => {
            format!("never as it is: name which of the datasets holding {snapshot} to take")
        }
        Problem::DatasetExists { dataset } => format!("after {dataset} is renamed or destroyed"),
        Problem::Interrupted { dataset, .. } => format!(
            "after the interrupted keep_newer rollback of {dataset} is put back by hand (see the description)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_volume_is_named_by_the_uuid_in_its_dataset() {
        let id = "9c6a3f0e-2f55-4d8e-a0d4-3b1c1f5e7a01";
        let v = DeviceEntity::volume(&format!("persist/vault/volumes/{id}.1"));
        assert_eq!(v.entity_id.map(|u| u.to_string()).as_deref(), Some(id));
        let lab = DeviceEntity::volume("evesnap/lab/vm0/disk0");
        assert_eq!(lab.entity_id, None);
        assert_eq!(lab.entity_name.as_deref(), Some("evesnap/lab/vm0/disk0"));
        assert_eq!(DeviceEntity::app(None, None), None);
    }

    #[test]
    fn only_a_guest_that_may_be_frozen_is_an_error() {
        for exit in Exit::ALL {
            let expected = match exit {
                Exit::Success => Severity::Unspecified,
                Exit::ThawFailed => Severity::Error,
                _ => Severity::Warning,
            };
            assert_eq!(Severity::of(exit), expected, "{exit}");
            let retry = retry_condition(&crate::exit::coded(exit, "failed"));
            assert_eq!(retry.is_empty(), exit == Exit::Success, "{exit}: {retry}");
        }
    }

    #[test]
    fn a_preflight_problem_says_what_to_free() {
        let error = crate::exit::wrap(zfs::Error::Preflight {
            problems: vec![Problem::NoRoom {
                dataset: "p/a".into(),
                needed: 10,
                available: 4,
                missing: 6,
            }],
        });
        assert_eq!(retry_condition(&error), "after 6 bytes are freed for p/a");
    }

    #[test]
    fn enums_are_written_as_protojson_names() {
        let text = serde_json::to_string(&ErrorInfo {
            description: "d".into(),
            timestamp: "2026-11-29T08:00:00.123Z".into(),
            severity: Severity::Error,
            entities: vec![DeviceEntity::volume("p/a")],
            retry_condition: "r".into(),
        })
        .expect("json");
        assert!(text.contains(r#""severity":"SEVERITY_ERROR""#), "{text}");
        assert!(text.contains(r#""entity":"ENTITY_VOLUME""#), "{text}");
    }
}
