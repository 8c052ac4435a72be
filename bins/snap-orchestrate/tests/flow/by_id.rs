//! The snapshot id as the handle, in EVE's terms (issue 16): plans by app and volume
//! UUIDs, the same create twice, a half-made set, delete by id, rollback by id.

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, SimState};
use evesnap::report::{Action, Consistency};
use evesnap::steps::RolledBack;
use evesnap::zfs::Problem;
use serde_json::{json, Value};

use crate::support::*;

pub const APP: &str = "8a5c0f4e-2d35-4c1f-9d27-0b7c3c1e9a11";
pub const VOL0: &str = "1b3e4f5a-6c7d-4e8f-9a0b-1c2d3e4f5a6b";
pub const VOL1: &str = "2c4d6e8f-0a1b-4c3d-8e5f-6a7b8c9d0e1f";
pub const ID: &str = "4f0f3c3e-55a1-4b8e-a0b8-64a8e5a1f001";
/// The lab-style root the plans name (`volume_root`).
pub const ROOT: &str = "tank/vault/volumes";

/// `<ROOT>/<uuid>.<generation>`.
pub fn zvol(uuid: &str, generation: u32) -> String {
    format!("{ROOT}/{uuid}.{generation}")
}

/// A plan in EVE's terms: app, volumes VOL0 (generation 1) and VOL1 (generation 3);
/// `extra` merged in.
pub fn eve_plan(agent: &str, extra: Value) -> snap_orchestrate::Plan {
    let mut plan = json!({"version": 1, "id": ID, "agent": agent, "app": APP,
        "volume_root": ROOT,
        "volumes": [{"uuid": VOL0}, {"uuid": VOL1, "generation": 3}],
        "freeze": {"timeout_s": 2, "thaw_after_s": 0, "flush_first": false, "expedite_rcu": false}});
    if let (Some(plan), Value::Object(extra)) = (plan.as_object_mut(), extra) {
        plan.extend(extra);
    }
    snap_orchestrate::Plan::from_json(&plan.to_string()).expect("a valid plan")
}

/// The pool with the two zvols.
pub fn eve_pool() -> Value {
    pool(&[&zvol(VOL0, 1), &zvol(VOL1, 3)])
}

/// evesnap's properties for a snapshot of set `id`.
pub fn ours(id: &str, consistency: &str) -> Value {
    json!({"org.lfedge.evesnap:id": id, "org.lfedge.evesnap:frozen": "true",
           "org.lfedge.evesnap:origin": "controller", CONSISTENCY: consistency})
}

#[test]
fn a_plan_by_app_and_volume_uuids_snapshots_eves_zvols_and_maps_each_volume() {
    let (agent, _sim) = with_app();
    let zfs = FakeZfs::new(&eve_pool());
    let run = run(
        &eve_plan(&agent.address.to_string(), quiesce_and_resume()),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let name = format!("evesnap-{ID}");
    let (s0, s1) = (
        format!("{}@{name}", zvol(VOL0, 1)),
        format!("{}@{name}", zvol(VOL1, 3)),
    );
    let taken = zfs.calls_of("snapshot");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0][taken[0].len() - 2..], [s0.clone(), s1.clone()]);
    assert_eq!(run.report.datasets, [zvol(VOL0, 1), zvol(VOL1, 3)]);
    assert_eq!(run.report.app.map(|a| a.to_string()).as_deref(), Some(APP));
    let meta = run
        .report
        .volume_snapshots
        .as_ref()
        .expect("volume_snapshots");
    let meta: Vec<(String, &str)> = meta
        .iter()
        .map(|(v, s)| (v.to_string(), s.as_str()))
        .collect();
    assert_eq!(meta, [(VOL0.to_string(), &*s0), (VOL1.to_string(), &*s1)]);
    assert!(!run.report.existing);
}

#[test]
fn the_same_create_twice_reports_the_first_set_and_takes_nothing() {
    let (agent, sim) = with_app();
    let zfs = FakeZfs::new(&eve_pool());
    let plan = eve_plan(&agent.address.to_string(), quiesce_and_resume());
    let first = run(&plan, &zfs);
    assert_eq!(exit(&first), Exit::Success, "{:?}", first.error);
    let before = zfs.state()["snapshots"].clone();
    let commands = sim.state().log.len();

    let second = run(&plan, &zfs);
    assert_eq!(exit(&second), Exit::Success, "{:?}", second.error);
    assert!(second.report.existing);
    assert_eq!(steps(&second), [("existing", true)]);
    // Nothing new on disk, nothing asked of the guest.
    assert_eq!(zfs.state()["snapshots"], before);
    assert_eq!(zfs.calls_of("snapshot").len(), 1);
    assert_eq!(sim.state().log.len(), commands, "{:?}", sim.state().log);
    // The first run's set, as it was taken: names, guids, time, consistency.
    assert_eq!(second.report.snapshots, first.report.snapshots);
    assert_eq!(second.report.create_time, first.report.create_time);
    assert_eq!(second.report.consistency, Some(Consistency::Application));
    assert_eq!(
        second.report.volume_snapshots,
        first.report.volume_snapshots
    );
    assert_eq!(second.report.freeze_window_ms, None);
}

#[test]
fn a_set_on_only_some_volumes_is_removed_and_taken_again_whole() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = eve_pool();
    let half = format!("{}@evesnap-{ID}", zvol(VOL0, 1));
    add_snapshot(&mut state, &half, 10, ours(ID, "filesystem"));
    let old_guid = state["snapshots"][&half]["guid"].clone();
    let zfs = FakeZfs::new(&state);
    let run = run(&eve_plan(&agent.address.to_string(), json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert!(!run.report.existing);
    let existing = &run.report.steps[0];
    assert_eq!(existing.tool, "existing");
    assert_eq!(existing.fields["complete"], false);
    assert_eq!(existing.fields["removed"], json!([half]));
    // Both members now come from one snapshot call (one transaction group).
    let state = zfs.state();
    assert_ne!(state["snapshots"][&half]["guid"], old_guid);
    let other = format!("{}@evesnap-{ID}", zvol(VOL1, 3));
    assert_eq!(
        state["snapshots"][&half]["createtxg"],
        state["snapshots"][&other]["createtxg"]
    );
}

#[test]
fn a_half_set_with_a_held_member_is_refused_and_left_alone() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = eve_pool();
    let half = format!("{}@evesnap-{ID}", zvol(VOL0, 1));
    add_snapshot(&mut state, &half, 10, ours(ID, "filesystem"));
    state["snapshots"][&half]["userrefs"] = json!(1);
    let zfs = FakeZfs::new(&state);
    let run = run(&eve_plan(&agent.address.to_string(), json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(zfs.snapshots(), [half]);
    assert!(zfs.calls_of("destroy").is_empty() && zfs.calls_of("snapshot").is_empty());
}

#[test]
fn a_half_set_that_cannot_be_removed_fails_before_the_guest_is_touched() {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let mut state = eve_pool();
    let half = format!("{}@evesnap-{ID}", zvol(VOL0, 1));
    add_snapshot(&mut state, &half, 10, ours(ID, "filesystem"));
    state["faults"]["destroy"] =
        json!({"stderr": format!("cannot destroy snapshot {half}: dataset is busy\n")});
    let zfs = FakeZfs::new(&state);
    let run = run(&eve_plan(&agent.address.to_string(), json!({})), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("preflight"));
    assert_eq!(steps(&run), [("existing", false)]);
    assert_eq!(run.report.steps[0].fields["removed"], json!([]));
    let error = run.report.error.as_ref().expect("error");
    assert!(
        error.message.contains("cannot remove a partial set"),
        "{error:?}"
    );
    assert!(sim.state().log.is_empty(), "{:?}", sim.state().log);
    assert_eq!(zfs.snapshots(), [half]);
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn a_snapshot_list_that_fails_stops_create_and_rollback_by_id_at_once() {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let mut state = two_sets();
    state["faults"]["list"] = json!({"with": "snapshot",
        "stderr": "internal error: pool I/O is currently suspended\n"});
    let zfs = FakeZfs::new(&state);
    // A create's look for its set.
    let run = run(&eve_plan(&agent.address.to_string(), json!({})), &zfs);
    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(steps(&run), [("existing", false)]);
    assert!(zfs.calls_of("snapshot").is_empty());

    // A rollback's look for the set its id names.
    let extra = json!({"id": "0f0f0f0f-0000-4000-8000-00000000000f", "action": "rollback",
        "rollback": {"to": ID, "destroy_newer": true, "vm_stopped": true}});
    let run = crate::support::run(&eve_plan(&agent.address.to_string(), extra), &zfs);
    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    let error = run.report.error.as_ref().expect("error");
    assert!(error.message.contains("suspended"), "{error:?}");
    assert!(zfs.calls_of("rollback").is_empty() && zfs.calls_of("destroy").is_empty());
    assert!(sim.state().log.is_empty(), "{:?}", sim.state().log);
}

#[test]
fn a_half_set_with_a_cloned_member_is_refused_and_left_alone() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = eve_pool();
    let half = format!("{}@evesnap-{ID}", zvol(VOL0, 1));
    add_snapshot(&mut state, &half, 10, ours(ID, "filesystem"));
    let clone = format!("{ROOT}/clone");
    state["datasets"][&clone] = state["datasets"][zvol(VOL0, 1)].clone();
    state["datasets"][&clone]["origin"] = json!(half);
    let zfs = FakeZfs::new(&state);
    let run = run(&eve_plan(&agent.address.to_string(), json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert!(
        matches!(&problems(&run)[..], [Problem::HasClones { snapshot, clones }]
            if *snapshot == half && *clones == [clone.clone()]),
        "{:?}",
        problems(&run)
    );
    assert_eq!(zfs.snapshots(), [half]);
    assert!(zfs.calls_of("destroy").is_empty() && zfs.calls_of("snapshot").is_empty());
}

#[test]
fn delete_by_id_destroys_the_set_and_a_second_delete_succeeds() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = eve_pool();
    // Named otherwise than `evesnap-<id>`: found by its id.
    let set = [
        format!("{}@before-upgrade", zvol(VOL0, 1)),
        format!("{}@before-upgrade", zvol(VOL1, 3)),
    ];
    for s in &set {
        add_snapshot(&mut state, s, 10, ours(ID, "application"));
    }
    add_snapshot(
        &mut state,
        &format!("{}@other", zvol(VOL0, 1)),
        11,
        ours("5d1c9a1e-0000-4000-8000-000000000001", "filesystem"),
    );
    let zfs = FakeZfs::new(&state);
    let plan = eve_plan(&agent.address.to_string(), json!({"action": "delete"}));
    assert_eq!(plan.action, Action::Delete);

    let first = run(&plan, &zfs);
    assert_eq!(exit(&first), Exit::Success, "{:?}", first.error);
    assert_eq!(first.report.deleted.as_deref(), Some(&set[..]));
    assert_eq!(
        first.report.volume_snapshots.as_ref().map(|m| m.len()),
        Some(2)
    );
    assert_eq!(zfs.snapshots(), [format!("{}@other", zvol(VOL0, 1))]);

    let second = run(&plan, &zfs);
    assert_eq!(exit(&second), Exit::Success, "{:?}", second.error);
    assert_eq!(second.report.deleted, Some(vec![]));
    assert_eq!(zfs.calls_of("destroy").len(), 2);
}

#[test]
fn a_delete_with_a_held_member_destroys_nothing() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = eve_pool();
    for (v, g) in [(VOL0, 1), (VOL1, 3)] {
        add_snapshot(
            &mut state,
            &format!("{}@evesnap-{ID}", zvol(v, g)),
            10,
            ours(ID, "filesystem"),
        );
    }
    state["snapshots"][format!("{}@evesnap-{ID}", zvol(VOL1, 3))]["userrefs"] = json!(1);
    let zfs = FakeZfs::new(&state);
    let run = run(
        &eve_plan(&agent.address.to_string(), json!({"action": "delete"})),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(zfs.snapshots().len(), 2);
    assert!(zfs.calls_of("destroy").is_empty());
}

#[test]
fn a_delete_needs_to_be_told_which_set() {
    let plan = json!({"version": 1, "agent": "unix:/a", "datasets": ["p/a"], "action": "delete"});
    let err = snap_orchestrate::Plan::from_json(&plan.to_string())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`id`"), "{err}");
}

/// Two sets on both zvols: `s0` (id ID, txg 10) and `s1` (another id, txg 20).
fn two_sets() -> Value {
    let mut state = eve_pool();
    for (v, g) in [(VOL0, 1), (VOL1, 3)] {
        add_snapshot(
            &mut state,
            &format!("{}@s0", zvol(v, g)),
            10,
            ours(ID, "application"),
        );
        let other = ours("9e2b7c1d-0000-4000-8000-000000000002", "filesystem");
        add_snapshot(&mut state, &format!("{}@s1", zvol(v, g)), 20, other);
    }
    state
}

#[test]
fn rollback_by_id_goes_to_the_set_with_that_id() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&two_sets());
    // EVE's `active_snapshot` is the id; the VM is stopped.
    let extra = json!({"id": "0f0f0f0f-0000-4000-8000-00000000000f", "action": "rollback",
        "rollback": {"to": ID, "destroy_newer": true, "vm_stopped": true}});
    let run = run(&eve_plan(&agent.address.to_string(), extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.snapshot, "s0");
    let to = |v: &str, g: u32| format!("{}@s0", zvol(v, g));
    assert_eq!(
        zfs.calls_of("rollback"),
        [
            vec!["rollback".to_string(), to(VOL0, 1)],
            vec!["rollback".to_string(), to(VOL1, 3)]
        ]
    );
    let meta = run
        .report
        .volume_snapshots
        .as_ref()
        .expect("volume_snapshots");
    assert_eq!(
        meta.values().cloned().collect::<Vec<_>>(),
        [to(VOL0, 1), to(VOL1, 3)]
    );
    assert!(!run.report.existing);
}

#[test]
fn an_id_on_snapshots_of_different_names_is_refused_not_guessed() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = eve_pool();
    // VOL0's member is `s0`, VOL1's `s5`: no one name to roll back to.
    add_snapshot(
        &mut state,
        &format!("{}@s0", zvol(VOL0, 1)),
        10,
        ours(ID, "application"),
    );
    add_snapshot(
        &mut state,
        &format!("{}@s5", zvol(VOL1, 3)),
        10,
        ours(ID, "application"),
    );
    let zfs = FakeZfs::new(&state);
    let extra = json!({"id": "0f0f0f0f-0000-4000-8000-00000000000f", "action": "rollback",
        "rollback": {"to": ID, "destroy_newer": true, "vm_stopped": true}});
    let run = run(&eve_plan(&agent.address.to_string(), extra), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    let error = run.report.error.as_ref().expect("error");
    assert!(
        error
            .message
            .contains("names snapshots of different names (s0, s5)"),
        "{error:?}"
    );
    assert!(zfs.calls_of("rollback").is_empty() && zfs.calls_of("destroy").is_empty());
    assert_eq!(zfs.snapshots().len(), 2);
}

#[test]
fn a_rollback_to_where_the_volumes_already_are_touches_nothing() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = two_sets();
    for (v, g) in [(VOL0, 1), (VOL1, 3)] {
        state["snapshots"]
            .as_object_mut()
            .expect("snapshots")
            .remove(&format!("{}@s1", zvol(v, g)));
        state["datasets"][zvol(v, g)]["written"] = json!(0);
    }
    let zfs = FakeZfs::new(&state);
    // A running VM, no `disks`: had the rollback been needed, the plan would be refused.
    let extra = json!({"id": "0f0f0f0f-0000-4000-8000-00000000000f", "action": "rollback",
        "rollback": {"to": ID}});
    let run = run(&eve_plan(&agent.address.to_string(), extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert!(run.report.existing);
    assert_eq!(steps(&run), [("preflight", true)]);
    assert!(zfs.calls_of("rollback").is_empty());
    assert_eq!(
        agent.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        run.report.rolled_back,
        Some(vec![
            RolledBack {
                dataset: zvol(VOL0, 1),
                to: format!("{}@s0", zvol(VOL0, 1))
            },
            RolledBack {
                dataset: zvol(VOL1, 3),
                to: format!("{}@s0", zvol(VOL1, 3))
            }
        ])
    );

    // Written to since: rolled back for real (here refused, the running VM's disks unknown).
    let mut state = zfs.state();
    state["datasets"][zvol(VOL1, 3)]["written"] = json!(4096);
    let zfs = FakeZfs::new(&state);
    let run = crate::support::run(
        &eve_plan(
            &agent.address.to_string(),
            json!({"action": "rollback", "rollback": {"to": ID}}),
        ),
        &zfs,
    );
    assert_eq!(exit(&run), Exit::Usage, "{:?}", run.error);
    assert!(!run.report.existing);
}

#[test]
fn the_same_rollback_again_finds_the_volumes_where_the_first_left_them() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = two_sets();
    for (v, g) in [(VOL0, 1), (VOL1, 3)] {
        state["datasets"][zvol(v, g)]["written"] = json!(8192);
    }
    let zfs = FakeZfs::new(&state);
    let plan = eve_plan(
        &agent.address.to_string(),
        json!({"id": "0f0f0f0f-0000-4000-8000-00000000000f", "action": "rollback",
               "rollback": {"to": ID, "destroy_newer": true, "vm_stopped": true}}),
    );
    let first = run(&plan, &zfs);
    assert_eq!(exit(&first), Exit::Success, "{:?}", first.error);
    assert!(!first.report.existing);
    // Where it left each volume: the target's guid and `written` just after (1024 here, as
    // OpenZFS reports for a rolled-back zvol).
    let state = zfs.state();
    let landed = &state["datasets"][zvol(VOL0, 1)]["props"];
    let s0 = format!("{}@s0", zvol(VOL0, 1));
    assert_eq!(
        landed["org.lfedge.evesnap:rolled-back-to"],
        state["snapshots"][&s0]["guid"]
    );
    assert_eq!(landed["org.lfedge.evesnap:written-after-rollback"], "1024");

    let again = run(&plan, &zfs);
    assert_eq!(exit(&again), Exit::Success, "{:?}", again.error);
    assert!(again.report.existing);
    assert_eq!(zfs.calls_of("rollback").len(), 2, "one per volume, once");

    // The guest wrote since: rolled back again.
    let mut state = zfs.state();
    state["datasets"][zvol(VOL1, 3)]["written"] = json!(5120);
    let zfs = FakeZfs::new(&state);
    let third = run(&plan, &zfs);
    assert_eq!(exit(&third), Exit::Success, "{:?}", third.error);
    assert!(!third.report.existing);
    assert_eq!(zfs.calls_of("rollback").len(), 2);
}
