//! `action: create` failing in a step (refusals before anything changes are in
//! `create_refused.rs`): whatever fails, the guest is thawed and gets its `guest_post`, no
//! snapshot claims a freeze it did not have, and one taken in a verified freeze is kept.

use evesnap::eve_api::{Entity, Severity};
use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, Program, SimState};
use evesnap::report::Consistency;
use serde_json::json;

use crate::support::*;

#[test]
fn a_fatal_guest_pre_failure_undoes_what_ran_and_never_freezes() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![
            (APP_CTL.into(), Program::exits(0)),
            ("/usr/bin/flush".into(), Program::exits(3)),
        ],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    // guest_post[i] undoes guest_pre[i]: both ran, so both are undone, last first.
    let extra = json!({
        "guest_pre": [{"path": APP_CTL, "args": ["quiesce"]}, {"path": "/usr/bin/flush"}],
        "guest_post": [{"path": APP_CTL, "args": ["resume"]}, {"path": APP_CTL, "args": ["unflush"]}]});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("guest_pre"));
    let execs: Vec<String> = sim
        .state()
        .log
        .iter()
        .filter(|c| c.starts_with("guest-exec "))
        .cloned()
        .collect();
    assert_eq!(
        execs,
        [
            "guest-exec /usr/bin/app-ctl quiesce",
            "guest-exec /usr/bin/flush",
            "guest-exec /usr/bin/app-ctl unflush",
            "guest-exec /usr/bin/app-ctl resume"
        ]
    );
    assert!(!got(&sim, "guest-fsfreeze-freeze"));
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn a_freeze_the_agent_refuses_takes_no_snapshot_and_guest_post_runs() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: app_ctl(),
        failing: vec![(
            "guest-fsfreeze-freeze".into(),
            "failed to freeze /data0: Operation not supported".into(),
        )],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(
        &plan(&agent.address.to_string(), &[DS0], quiesce_and_resume()),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("freeze"));
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", false),
            ("guest_post", true)
        ]
    );
    assert!(at(&sim, "guest-fsfreeze-thaw") < at(&sim, "guest-exec /usr/bin/app-ctl resume"));
    assert_eq!(sim.state().frozen, 0);
    assert!(zfs.calls_of("snapshot").is_empty());
    assert_eq!(run.report.consistency, None);
}

#[test]
fn a_freeze_that_does_not_verify_destroys_the_snapshot_taken_meanwhile() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        thawed_by_another_client: true,
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(&plan(&agent.address.to_string(), &[DS0], json!({})), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("freeze"));
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", false),
            ("zsnap", false)
        ]
    );
    assert_eq!(run.report.consistency, None);
    assert_eq!(
        sim.after_freeze(2),
        ["guest-fsfreeze-status", "guest-fsfreeze-thaw"]
    );
    // Cancelled once the check failed, or taken meanwhile and destroyed: either way it
    // cannot claim the freeze.
    assert!(zfs.calls_of("snapshot").len() <= 1);
    assert!(zfs.calls_of("destroy").len() <= 1);
    assert!(zfs.snapshots().is_empty());
}

#[test]
fn a_failed_zfs_snapshot_is_thawed_and_guest_post_runs() {
    let (agent, sim) = with_app();
    let mut state = pool(&[DS0]);
    state["faults"]["snapshot"] = json!({"stderr": format!(
        "cannot create snapshot '{}': out of space\nno snapshots were created\n", snap(DS0))});
    let zfs = FakeZfs::new(&state);
    let run = run(
        &plan(&agent.address.to_string(), &[DS0], quiesce_and_resume()),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("snapshot"));
    let error = run.report.error.as_ref().expect("error");
    assert!(error.message.contains("out of space"), "{error:?}");
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", true),
            ("zsnap", false),
            ("qga-thaw", true),
            ("guest_post", true)
        ]
    );
    assert!(at(&sim, "guest-fsfreeze-thaw") < at(&sim, "guest-exec /usr/bin/app-ctl resume"));
    assert_eq!(sim.state().frozen, 0);
    assert!(zfs.snapshots().is_empty());
    assert_eq!(run.report.consistency, None);
}

#[test]
fn a_hung_zfs_snapshot_is_thawed_at_the_timeout_then_cut_short() {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let mut state = pool(&[DS0]);
    state["faults"]["snapshot"] = json!({"sleep": 1.5});
    let zfs = FakeZfs::new(&state);
    let extra = json!({"freeze": {"timeout_s": 0.5}});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("snapshot"));
    let window = run.report.freeze_window_ms.expect("thawed");
    assert!(
        (400.0..1400.0).contains(&window),
        "thawed after {window} ms"
    );
    assert_eq!(sim.state().frozen, 0);
    // Cancelled after the thaw (what it made would postdate it), not waited for: the run
    // ends well before the call's 1.5 s.
    assert_eq!(zfs.calls_of("snapshot").len(), 1);
    assert!(zfs.snapshots().is_empty());
    let zsnap = &run.report.steps[3];
    assert!(
        zsnap.duration_ms < 1400.0,
        "waited {} ms",
        zsnap.duration_ms
    );
    assert_eq!(run.report.consistency, None);
    // Steps in the order they started, as in every other run.
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", true),
            ("zsnap", false),
            ("qga-thaw", true)
        ]
    );
}

#[test]
fn a_refused_thaw_is_eve_apis_worst_severity_and_the_snapshot_stays() {
    let (agent, sim) = with_app();
    sim.state().failing = vec![(
        "guest-fsfreeze-thaw".into(),
        "failed to thaw /data0: Device or resource busy".into(),
    )];
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(
        &plan(&agent.address.to_string(), &[DS0], quiesce_and_resume()),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::ThawFailed, "{:?}", run.error);
    let error = run.report.error.as_ref().expect("error");
    assert_eq!(
        (error.step.as_str(), error.kind.as_str()),
        ("thaw", "thaw-failed")
    );
    let snap_err = run
        .report
        .zinfo_snapshot
        .snap_err
        .as_ref()
        .expect("snap_err");
    assert_eq!(snap_err.severity, Severity::Error);
    assert!(snap_err.retry_condition.contains("thawed"), "{snap_err:?}");
    assert_eq!(
        snap_err
            .entities
            .iter()
            .map(|e| (e.entity, e.entity_name.as_deref()))
            .collect::<Vec<_>>(),
        [(Entity::Volume, Some(DS0))]
    );
    assert!(sim.state().frozen > 0, "the fake guest stays frozen");
    // Taken while frozen, it stays and says what it is.
    assert_eq!(zfs.snapshots(), [snap(DS0)]);
    assert_eq!(run.report.consistency, Some(Consistency::Application));
    assert_eq!(steps(&run).last(), Some(&("qga-thaw", false)));
}

#[test]
fn a_failing_guest_post_fails_the_run_but_keeps_the_snapshot() {
    let (agent, _sim) = FakeAgent::simulated(SimState {
        programs: vec![
            (APP_CTL.into(), Program::exits(0)),
            ("/usr/bin/resume".into(), Program::exits(1)),
        ],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"guest_pre": [{"path": APP_CTL, "args": ["quiesce"]}],
                       "guest_post": [{"path": "/usr/bin/resume"}]});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("guest_post"));
    assert_eq!(zfs.snapshots(), [snap(DS0)]);
    assert_eq!(run.report.consistency, Some(Consistency::Application));
}

/// The pool with an older set `DS0@old` that retention counts.
fn with_old_set() -> serde_json::Value {
    let mut state = pool(&[DS0]);
    let old = json!({"org.lfedge.evesnap:id": "0", "org.lfedge.evesnap:origin": "controller"});
    add_snapshot(&mut state, &format!("{DS0}@old"), 10, old);
    state
}

/// [`with_old_set`], and `zfs get … origin` (the clones read that pruning starts with)
/// failing.
fn prune_fails() -> serde_json::Value {
    let mut state = with_old_set();
    state["faults"]["get"] =
        json!({"with": "origin", "stderr": "internal error: pool I/O is currently suspended\n"});
    state
}

#[test]
fn retention_failing_before_the_create_takes_nothing_and_keeps_the_old_set() {
    let (agent, sim) = with_app();
    let zfs = FakeZfs::new(&prune_fails());
    let mut extra = quiesce_and_resume();
    extra["max_snapshots"] = json!(1);
    extra["retention"] = json!("before_create");
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("retention"));
    let error = run.report.error.as_ref().expect("error");
    assert!(
        error.message.contains("the snapshot was not taken yet")
            && error.message.contains("suspended"),
        "{error:?}"
    );
    // Retention's step goes before the preflight's, which it cut short.
    assert_eq!(steps(&run), [("retention", false)]);
    // Checked, never changed: nothing ran in the guest, nothing was taken or destroyed.
    assert!(!got(&sim, "guest-exec") && !got(&sim, "guest-fsfreeze-freeze"));
    assert!(
        got(&sim, "guest-fsfreeze-status"),
        "the guest was checked first"
    );
    assert!(zfs.calls_of("snapshot").is_empty() && zfs.calls_of("destroy").is_empty());
    assert_eq!(zfs.snapshots(), [format!("{DS0}@old")]);
    assert_eq!(run.report.consistency, None);
}

#[test]
fn retention_failing_after_the_create_fails_the_run_but_keeps_the_snapshot() {
    let (agent, sim) = with_app();
    let zfs = FakeZfs::new(&prune_fails());
    let mut extra = quiesce_and_resume();
    extra["max_snapshots"] = json!(1);
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("retention"));
    let error = run.report.error.as_ref().expect("error");
    assert!(
        error.message.contains("(the snapshot was taken)"),
        "{error:?}"
    );
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", true),
            ("zsnap", true),
            ("qga-thaw", true),
            ("guest_post", true),
            ("retention", false)
        ]
    );
    assert_eq!(sim.state().frozen, 0);
    assert!(got(&sim, "guest-exec /usr/bin/app-ctl resume"));
    // The new snapshot stays with its claims, and is reported; the old one stays too.
    assert_eq!(zfs.snapshots(), [format!("{DS0}@old"), snap(DS0)]);
    let props = &zfs.state()["snapshots"][snap(DS0)]["props"];
    assert_eq!(props["org.lfedge.evesnap:frozen"], "true", "{props}");
    assert_eq!(run.report.consistency, Some(Consistency::Application));
    assert_eq!(run.report.snapshots.as_ref().map(Vec::len), Some(1));
    assert!(zfs.calls_of("destroy").is_empty());
}

#[test]
fn claims_that_cannot_be_recorded_leave_a_snapshot_claiming_nothing() {
    let (agent, sim) = with_app();
    let mut state = pool(&[DS0]);
    state["faults"]["set"] = json!({"stderr": format!(
        "cannot set property for '{}': pool I/O is currently suspended\n", snap(DS0))});
    let zfs = FakeZfs::new(&state);
    let run = run(
        &plan(&agent.address.to_string(), &[DS0], quiesce_and_resume()),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("snapshot"));
    let error = run.report.error.as_ref().expect("error");
    assert!(
        error.message.contains("cannot record the freeze"),
        "{error:?}"
    );
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", true),
            ("zsnap", false),
            ("qga-thaw", true),
            ("guest_post", true)
        ]
    );
    assert_eq!(sim.state().frozen, 0);
    assert!(at(&sim, "guest-fsfreeze-thaw") < at(&sim, "guest-exec /usr/bin/app-ctl resume"));
    // Taken, and kept: it says what it was created with, no freeze and `crash`.
    assert_eq!(zfs.snapshots(), [snap(DS0)]);
    let props = &zfs.state()["snapshots"][snap(DS0)]["props"];
    assert_eq!(props["org.lfedge.evesnap:frozen"], "false", "{props}");
    assert_eq!(props[CONSISTENCY], "crash", "{props}");
    assert_eq!(run.report.consistency, None);
    assert_eq!(run.report.snapshots, None);
}

#[test]
fn a_destroy_retention_cannot_do_is_reported_and_the_run_succeeds() {
    let (agent, _sim) = with_app();
    let mut state = with_old_set();
    state["faults"] = json!({"destroy": {"stderr": format!(
        "cannot destroy snapshot {DS0}@old: dataset is busy\n")}});
    let zfs = FakeZfs::new(&state);
    let mut extra = quiesce_and_resume();
    extra["max_snapshots"] = json!(1);
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    // Best effort (a race, or zfs-fuse busy): the step names what is left, the run is done.
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(steps(&run).last(), Some(&("retention", true)));
    let retention = &run.report.steps.last().expect("retention").fields;
    assert_eq!(
        retention["failed"][0]["snapshot"],
        format!("{DS0}@old"),
        "{retention:?}"
    );
    assert_eq!(zfs.snapshots(), [format!("{DS0}@old"), snap(DS0)]);
    assert_eq!(run.report.consistency, Some(Consistency::Application));
}

#[test]
fn a_failed_snapshot_without_an_agent_fails_the_run_and_takes_nothing() {
    let mut state = pool(&[DS0]);
    state["faults"]["snapshot"] = json!({"stderr": format!(
        "cannot create snapshot '{}': out of space\nno snapshots were created\n", snap(DS0))});
    let zfs = FakeZfs::new(&state);
    let extra = json!({"freeze": {"required": false, "timeout_s": 0.3}});
    let run = run(&plan(&no_agent(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("snapshot"));
    assert_eq!(steps(&run), [("preflight", true), ("zsnap", false)]);
    assert!(zfs.snapshots().is_empty());
    assert_eq!(run.report.consistency, None);
}

#[test]
fn a_refused_thaw_leaves_expedited_rcu_to_the_guests_own_restore() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![("/bin/sh".into(), Program::exits(0))],
        failing: vec![("guest-fsfreeze-thaw".into(), "failed to thaw /data0".into())],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"expedite_rcu": true}});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::ThawFailed, "{:?}", run.error);
    let rcu = run.report.expedited_rcu.as_ref().expect("expedited_rcu");
    assert!(rcu.set && rcu.restored == Some(false), "{rcu:?}");
    // Set once before the freeze; not restored through an agent that cannot thaw.
    assert_eq!(
        last_at(&sim, "guest-exec /bin/sh"),
        at(&sim, "guest-exec /bin/sh")
    );
    assert_eq!(zfs.snapshots(), [snap(DS0)]);
}
