//! `rollback.keep_newer`: back and forward again with every snapshot kept, and each of the
//! switch's zfs calls failing in turn (the state must be exactly what it was).

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, SimState};
use evesnap::zfs::Problem;
use serde_json::{json, Value};

use crate::support::*;

/// `DS0@s1` (txg 10) and `DS0@s2` (txg 20, held, with the evesnap origin property).
fn history() -> Value {
    let mut state = pool(&[DS0, DS1]);
    add_snapshot(&mut state, &format!("{DS0}@s1"), 10, json!({}));
    add_snapshot(
        &mut state,
        &format!("{DS0}@s2"),
        20,
        json!({"org.lfedge.evesnap:origin": "controller"}),
    );
    state["snapshots"][format!("{DS0}@s2")]["userrefs"] = json!(1);
    state
}

/// The same history on zfs-fuse, `DS0` a mounted filesystem (renamed only unmounted).
fn fuse_history() -> Value {
    let mut state = history();
    state["flavour"] = json!("zfs-fuse");
    state["datasets"][DS0]["type"] = json!("filesystem");
    state["datasets"][DS0]["mounted"] = json!("yes");
    state
}

/// A rollback of `DS0` to `to` keeping the newer snapshots, the VM said to be stopped.
fn keeping(to: &str) -> snap_orchestrate::Plan {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    plan(
        &agent.address.to_string(),
        &[DS0],
        json!({"action": "rollback",
               "rollback": {"to": to, "keep_newer": true, "vm_stopped": true}}),
    )
}

/// The zrollback step's `kept`.
fn kept(run: &snap_orchestrate::flow::Finished) -> Value {
    let step = run.report.steps.iter().find(|s| s.tool == "zrollback");
    step.and_then(|s| s.fields.get("kept"))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The datasets and snapshots of the fake's state (what a failure must leave as it was);
/// an `origin` of `-` is no origin.
fn layout(zfs: &FakeZfs) -> Value {
    let mut state = zfs.state();
    for dataset in state["datasets"]
        .as_object_mut()
        .expect("datasets")
        .values_mut()
    {
        if dataset["origin"] == "-" {
            dataset.as_object_mut().expect("a dataset").remove("origin");
        }
    }
    json!({"datasets": state["datasets"], "snapshots": state["snapshots"]})
}

/// Dataset names starting with `prefix`.
fn named(zfs: &FakeZfs, prefix: &str) -> Vec<String> {
    let state = zfs.state();
    let datasets = state["datasets"].as_object().expect("datasets");
    datasets
        .keys()
        .filter(|d| d.starts_with(prefix))
        .cloned()
        .collect()
}

#[test]
fn back_keeps_the_newer_snapshots_and_forward_brings_them_back() {
    let zfs = FakeZfs::new(&history());
    let run = run(&keeping("s1"), &zfs);
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", true), ("zrollback", true)]);
    let kept_as = kept(&run)[0]["kept_as"]
        .as_str()
        .expect("kept_as")
        .to_string();
    assert!(
        kept_as.starts_with(&format!("{DS0}.evesnap-kept-")),
        "{kept_as}"
    );
    assert_eq!(kept(&run)[0]["snapshots"], json!([format!("{kept_as}@s2")]));
    let state = zfs.state();
    // The dataset owns s1 and nothing newer; the kept state is a clone of it with s2, its
    // hold and its property.
    assert_eq!(state["datasets"][DS0]["origin"], "-");
    assert_eq!(state["datasets"][&kept_as]["origin"], format!("{DS0}@s1"));
    let s2 = &state["snapshots"][format!("{kept_as}@s2")];
    assert_eq!(s2["userrefs"], 1);
    assert_eq!(s2["props"]["org.lfedge.evesnap:origin"], "controller");
    let mut snaps = zfs.snapshots();
    snaps.sort();
    let mut expected = [format!("{DS0}@s1"), format!("{kept_as}@s2")];
    expected.sort();
    assert_eq!(snaps, expected);
    let subcommands: Vec<String> = zfs
        .calls()
        .into_iter()
        .map(|c| c[0].clone())
        .filter(|c| ["clone", "promote", "rename", "rollback", "destroy"].contains(&c.as_str()))
        .collect();
    assert_eq!(subcommands, ["clone", "promote", "rename", "rename"]);
    assert!(named(&zfs, &format!("{DS0}.evesnap-new-")).is_empty());

    // Forward: s2 lives only in the kept state; the dataset gets it back with its history.
    std::thread::sleep(std::time::Duration::from_millis(5)); // a new stamp
    let run = crate::support::run(&keeping("s2"), &zfs);
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let state = zfs.state();
    assert_eq!(state["datasets"][DS0]["origin"], "-");
    let mut snaps: Vec<String> = zfs
        .snapshots()
        .into_iter()
        .filter(|s| s.starts_with(&format!("{DS0}@")))
        .collect();
    snaps.sort();
    assert_eq!(snaps, [format!("{DS0}@s1"), format!("{DS0}@s2")]);
    assert_eq!(state["snapshots"][format!("{DS0}@s2")]["userrefs"], 1);
    assert_eq!(
        run.report.rolled_back.as_ref().expect("rolled_back")[0].to,
        format!("{kept_as}@s2")
    );
    // Both states left behind are kept: the first (now a clone of s2) and the one after s1.
    let kept_states = named(&zfs, &format!("{DS0}.evesnap-kept-"));
    assert_eq!(kept_states.len(), 2, "{kept_states:?}");
    assert_eq!(state["datasets"][&kept_as]["origin"], format!("{DS0}@s2"));
}

#[test]
fn a_mounted_filesystem_is_unmounted_for_the_renames_and_mounted_again() {
    let zfs = FakeZfs::new(&fuse_history());
    let run = run(&keeping("s1"), &zfs);
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let kept_as = kept(&run)[0]["kept_as"]
        .as_str()
        .expect("kept_as")
        .to_string();
    let state = zfs.state();
    assert_eq!(state["datasets"][DS0]["mounted"], "yes");
    assert_eq!(state["datasets"][&kept_as]["mounted"], "yes");
    let order: Vec<String> = zfs
        .calls()
        .into_iter()
        .filter(|c| ["unmount", "rename", "mount"].contains(&c[0].as_str()))
        .map(|c| c.join(" "))
        .collect();
    assert_eq!(order.len(), 6, "{order:?}");
    assert!(order[0].starts_with("unmount") && order[1] == format!("unmount {DS0}"));
    assert!(order[2].starts_with(&format!("rename {DS0} ")) && order[3].starts_with("rename"));
    assert_eq!(order[4], format!("mount {DS0}"));
}

/// Each zfs call of the switch failing (`nth` call of `sub`; `after`: once its change was
/// made) leaves the datasets and snapshots exactly as they were, with exit 1 and an error
/// that names the call and says it was undone.
#[test]
fn each_step_failing_is_undone_completely() {
    let cases = [
        ("clone", 1, false),
        ("clone", 1, true),
        ("promote", 1, false),
        ("promote", 1, true),
        ("unmount", 1, false),
        ("unmount", 2, false),
        ("rename", 1, false),
        ("rename", 2, false),
        ("rename", 2, true),
        ("mount", 1, false),
        ("mount", 2, false),
        ("mount", 2, true),
    ];
    for (sub, nth, after) in cases {
        let mut state = fuse_history();
        state["faults"][sub] =
            json!({"nth": nth, "after": after, "stderr": format!("{sub} broke\n")});
        let zfs = FakeZfs::new(&state);
        let before = layout(&zfs);
        let run = run(&keeping("s1"), &zfs);
        let case = format!("{sub} #{nth} (after: {after})");
        assert_eq!(exit(&run), Exit::StepFailed, "{case}: {:?}", run.error);
        assert_eq!(failed_step(&run), Some("rollback"), "{case}");
        let message = format!("{:#}", run.error.as_ref().expect("an error"));
        assert!(
            message.contains(&format!("failed at `zfs {sub}"))
                && message.contains("everything done was undone")
                && message.contains(&format!("{sub} broke")),
            "{case}: {message}"
        );
        assert_eq!(layout(&zfs), before, "{case}: the state changed");
        assert_eq!(run.report.rolled_back, None, "{case}");
    }
}

#[test]
fn an_undo_that_fails_says_what_is_left_to_repair() {
    let mut state = history();
    state["faults"]["promote"] = json!({"stderr": "promote broke\n"});
    state["faults"]["destroy"] = json!({"stderr": "destroy broke\n"});
    let zfs = FakeZfs::new(&state);
    let run = run(&keeping("s1"), &zfs);
    assert_eq!(exit(&run), Exit::StepFailed);
    let message = format!("{:#}", run.error.as_ref().expect("an error"));
    let clone = named(&zfs, &format!("{DS0}.evesnap-new-"));
    assert_eq!(clone.len(), 1, "the clone is left: {clone:?}");
    assert!(
        message.contains("undoing it failed at `created ")
            && message.contains("destroy broke")
            && message.contains(&format!("to repair by hand: created {}", clone[0])),
        "{message}"
    );
}

#[test]
fn a_thick_volume_without_room_for_its_reservation_again_is_refused() {
    let mut state = history();
    let gib = 1u64 << 30;
    state["datasets"][DS0]["refreservation"] = json!(gib);
    state["datasets"][DS0]["usedbyrefreservation"] = json!(gib);
    state["datasets"][DS0]["available"] = json!(gib + (gib / 2));
    let zfs = FakeZfs::new(&state);
    let run = run(&keeping("s1"), &zfs);
    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(
        problems(&run),
        [Problem::NoRoomToKeep {
            dataset: DS0.into(),
            needed: gib,
            available: gib / 2,
            missing: gib / 2,
        }]
    );
    assert!(zfs.calls_of("clone").is_empty());

    // With room, the clone gets the volume's reservation (a thick volume's clone is sparse).
    let mut state = history();
    state["datasets"][DS0]["refreservation"] = json!(gib / 4);
    let zfs = FakeZfs::new(&state);
    let run = crate::support::run(&keeping("s1"), &zfs);
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let clone = &zfs.calls_of("clone")[0];
    assert_eq!(
        clone[1..3],
        ["-o".to_string(), format!("refreservation={}", gib / 4)]
    );
    assert_eq!(zfs.state()["datasets"][DS0]["refreservation"], gib / 4);
}

#[test]
fn keep_newer_and_destroy_newer_exclude_each_other() {
    let plan = json!({"version": 1, "agent": "unix:/nonexistent", "datasets": [DS0],
        "action": "rollback", "rollback": {"to": "s1", "keep_newer": true, "destroy_newer": true}});
    let err = snap_orchestrate::Plan::from_json(&plan.to_string()).expect_err("refused");
    assert!(err.to_string().contains("exclude each other"), "{err}");
}

/// A run killed half way (a SIGKILL is not undone) left its clone: the next one refuses,
/// names it and changes nothing.
#[test]
fn a_clone_left_by_a_killed_run_is_refused_until_repaired() {
    let mut state = history();
    let leftover = format!("{DS0}.evesnap-new-20261129-080000000");
    state["datasets"][&leftover] = state["datasets"][DS0].clone();
    state["datasets"][&leftover]["origin"] = json!(format!("{DS0}@s1"));
    let zfs = FakeZfs::new(&state);
    let before = layout(&zfs);
    let run = run(&keeping("s1"), &zfs);
    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(
        problems(&run),
        [Problem::Interrupted {
            dataset: DS0.into(),
            clones: vec![leftover],
        }]
    );
    let message = format!("{:#}", run.error.as_ref().expect("an error"));
    assert!(message.contains("put it back by hand"), "{message}");
    assert!(zfs.calls_of("clone").is_empty());
    assert_eq!(layout(&zfs), before);
}

/// Two volumes: the second one's switch failing undoes the first one's, already complete.
#[test]
fn a_failure_on_the_second_volume_undoes_the_first() {
    let mut state = history();
    add_snapshot(&mut state, &format!("{DS1}@s1"), 10, json!({}));
    add_snapshot(&mut state, &format!("{DS1}@s2"), 20, json!({}));
    // Renames 1 and 2 are DS0's, 3 and 4 DS1's.
    state["faults"]["rename"] = json!({"nth": 4, "stderr": "rename broke\n"});
    let zfs = FakeZfs::new(&state);
    let before = layout(&zfs);
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let plan = plan(
        &agent.address.to_string(),
        &[DS0, DS1],
        json!({"action": "rollback",
               "rollback": {"to": "s1", "keep_newer": true, "vm_stopped": true}}),
    );
    let run = run(&plan, &zfs);
    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    let message = format!("{:#}", run.error.as_ref().expect("an error"));
    assert!(
        message.contains(&format!(
            "keeping the newer snapshots of {DS1} failed at `zfs rename"
        )) && message.contains("everything done was undone"),
        "{message}"
    );
    assert_eq!(
        layout(&zfs),
        before,
        "the first volume's switch was not undone"
    );
    // Back: DS1's first rename, then DS0's two.
    assert_eq!(zfs.calls_of("rename").len(), 4 + 3);
}
