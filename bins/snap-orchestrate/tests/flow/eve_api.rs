//! The report's `zinfo_snapshot`: eve-api's `ZInfoSnapshot` of a run that succeeded, and
//! `snap_err` (severity, entities, retry condition) of runs refused for different reasons.

use evesnap::eve_api::{DeviceEntity, Entity, ErrorInfo, EveSnapshotType, Severity};
use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, SimState};
use evesnap::zfs::Problem;
use serde_json::json;

use crate::support::*;

const APP: &str = "0b5e7a8e-8d7e-4a44-9b8c-52c1f4e3a7d2";
/// An EVE zvol name: `<pool>/<volume uuid>.<generation>`.
const ZVOL: &str = "persist/vault/volumes/6f1c0a52-0d43-4a2e-8d3e-1f8f3b1c9e44.1";

fn snap_err(run: &snap_orchestrate::flow::Finished) -> &ErrorInfo {
    run.report
        .zinfo_snapshot
        .snap_err
        .as_ref()
        .expect("a snap_err")
}

#[test]
fn a_run_reports_eve_apis_zinfo_snapshot_with_the_plans_config() {
    let (agent, _sim) = with_app();
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"type": "app_update", "config_id": "cfg-1", "config_version": "12",
                       "app_uuid": APP});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let z = &run.report.zinfo_snapshot;
    assert_eq!(z.id, run.report.id);
    assert_eq!(z.kind, EveSnapshotType::AppUpdate);
    assert_eq!(
        (z.config_id.as_deref(), z.config_version.as_deref()),
        (Some("cfg-1"), Some("12"))
    );
    assert!(z.create_time.is_some());
    assert_eq!(z.create_time, run.report.create_time);
    assert_eq!(z.snap_err, None);
    // Only ZInfoSnapshot's own fields, by their proto names.
    let value = serde_json::to_value(z).expect("json");
    let keys: Vec<&str> = value
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["id", "config_id", "config_version", "create_time", "type"]
    );
    assert_eq!(value["type"], "SNAPSHOT_TYPE_APP_UPDATE");
}

#[test]
fn an_unreachable_agent_is_a_warning_retried_when_the_agent_answers() {
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"timeout_s": 0.3}, "app_uuid": APP, "app_name": "vault"});
    let run = run(&plan(&no_agent(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::AgentUnreachable, "{:?}", run.error);
    let e = snap_err(&run);
    assert_eq!(e.severity, Severity::Warning);
    assert!(
        e.retry_condition
            .contains("guest agent accepts connections"),
        "{e:?}"
    );
    assert_eq!(
        e.description,
        run.report.error.as_ref().expect("error").message
    );
    assert_eq!(
        e.entities,
        [
            DeviceEntity {
                entity: Entity::AppInstance,
                entity_id: Some(APP.parse().expect("uuid")),
                entity_name: Some("vault".into())
            },
            DeviceEntity::volume(DS0)
        ]
    );
    assert_eq!(run.report.zinfo_snapshot.create_time, None);
}

#[test]
fn no_room_names_the_volume_and_the_bytes_to_free() {
    let (agent, _sim) = with_app();
    let mut state = pool(&[ZVOL]);
    for parent in ["persist", "persist/vault", "persist/vault/volumes"] {
        state["datasets"][parent] = state["datasets"]["tank"].clone();
    }
    // Thick: 600 MiB written, 424 MiB of its 1 GiB reservation unused, 500 MiB available:
    // 76 MiB for a snapshot that needs the 600.
    let volume = &mut state["datasets"][ZVOL];
    volume["usedbydataset"] = json!(600u64 << 20);
    volume["refreservation"] = json!(1u64 << 30);
    volume["usedbyrefreservation"] = json!(424u64 << 20);
    volume["available"] = json!(500u64 << 20);
    let zfs = FakeZfs::new(&state);
    let run = run(&plan(&agent.address.to_string(), &[ZVOL], json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    let e = snap_err(&run);
    assert_eq!(e.severity, Severity::Warning);
    let missing = match &problems(&run)[..] {
        [Problem::NoRoom { missing, .. }] => *missing,
        other => panic!("{other:?}"),
    };
    assert!(missing > 500 << 20, "{missing}");
    assert_eq!(
        e.retry_condition,
        format!("after {missing} bytes are freed for {ZVOL}")
    );
    assert_eq!(
        e.entities.iter().map(|v| v.entity_id).collect::<Vec<_>>(),
        [Some(
            "6f1c0a52-0d43-4a2e-8d3e-1f8f3b1c9e44"
                .parse()
                .expect("uuid")
        )]
    );
}

#[test]
fn a_busy_vm_is_retried_when_the_other_operation_ends() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let plan = plan(&agent.address.to_string(), &[DS0], json!({}));
    let _first = hold_lock(&plan);
    let run = run(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Busy, "{:?}", run.error);
    let e = snap_err(&run);
    assert_eq!(e.severity, Severity::Warning);
    assert_eq!(
        e.retry_condition,
        "when the VM's other snapshot operation has finished"
    );
}
