//! `action: create`: the runs that take their snapshot, one per branch of
//! `flow/create.rs` that ends well (consistency, zfs flavour, expedited RCU, retention).

use std::time::Duration;

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, Program, SimState};
use evesnap::report::{Consistency, ExpeditedRcu};
use evesnap::steps::FlushReport;
use serde_json::json;

use crate::support::*;

#[test]
fn guest_pre_freeze_one_atomic_snapshot_thaw_guest_post_is_application_consistent() {
    let (agent, sim) = with_app();
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let plan = plan(
        &agent.address.to_string(),
        &[DS0, DS1],
        quiesce_and_resume(),
    );
    let run = run(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", true),
            ("zsnap", true),
            ("qga-thaw", true),
            ("guest_post", true)
        ]
    );
    assert!(run.report.ok && run.report.error.is_none());
    assert_eq!(run.report.consistency, Some(Consistency::Application));
    assert!(run.report.freeze_window_ms.is_some() && run.report.create_time.is_some());
    // The application is quiesced around the freeze window, in order.
    assert!(at(&sim, "guest-exec /usr/bin/app-ctl quiesce") < at(&sim, "guest-fsfreeze-freeze"));
    assert!(at(&sim, "guest-fsfreeze-freeze") < at(&sim, "guest-fsfreeze-thaw"));
    assert!(at(&sim, "guest-fsfreeze-thaw") < at(&sim, "guest-exec /usr/bin/app-ctl resume"));
    assert_eq!(sim.state().frozen, 0);
    // One multi-name `zfs snapshot`, the metadata set in the same call, claiming nothing
    // yet; the claims are set once it returned inside the freeze, after the thaw.
    let taken = zfs.calls_of("snapshot");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0][taken[0].len() - 2..], [snap(DS0), snap(DS1)]);
    assert!(taken[0].contains(&format!("{CONSISTENCY}=crash")));
    assert!(taken[0].contains(&"org.lfedge.evesnap:frozen=false".to_string()));
    // OpenZFS takes every claim on every snapshot in one `zfs set`: one txg sync, not four.
    let set = zfs.calls_of("set");
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(set[0][set[0].len() - 2..], [snap(DS0), snap(DS1)]);
    let state = zfs.state();
    let reported = run.report.snapshots.as_ref().expect("snapshots");
    assert_eq!(reported.len(), 2);
    for (entry, dataset) in reported.iter().zip([DS0, DS1]) {
        let real = &state["snapshots"][snap(dataset)];
        assert_eq!(entry.name, snap(dataset));
        assert_eq!(entry.guid, real["guid"].as_str().expect("guid"));
        assert_eq!(entry.createtxg, real["createtxg"]);
        assert_eq!(real["props"]["org.lfedge.evesnap:frozen"], "true");
        assert_eq!(real["props"][CONSISTENCY], "application");
    }
}

#[test]
fn without_guest_pre_the_snapshot_is_filesystem_consistent() {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(&plan(&agent.address.to_string(), &[DS0], json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let tools: Vec<&str> = steps(&run).into_iter().map(|(tool, _)| tool).collect();
    assert_eq!(
        tools,
        ["preflight", "guest_pre", "qga-freeze", "zsnap", "qga-thaw"]
    );
    assert_eq!(run.report.consistency, Some(Consistency::Filesystem));
    assert_eq!(
        zfs.state()["snapshots"][snap(DS0)]["props"][CONSISTENCY],
        "filesystem"
    );
    assert!(!got(&sim, "guest-exec"));
}

#[test]
fn a_non_fatal_guest_pre_failure_makes_it_filesystem_consistent_only() {
    // The quiescing command outlasts its timeout; it is not fatal, so the run goes on.
    let slow = Program {
        runs_for: Duration::from_secs(5),
        ..Program::default()
    };
    let (agent, _sim) = FakeAgent::simulated(SimState {
        programs: vec![("/usr/bin/slow-quiesce".into(), slow)],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra =
        json!({"guest_pre": [{"path": "/usr/bin/slow-quiesce", "timeout_s": 0.2, "fatal": false}]});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let pre = &run.report.steps[1];
    assert_eq!(pre.tool, "guest_pre");
    assert_eq!(pre.fields["commands"][0]["ok"], false, "{pre:?}");
    assert_eq!(run.report.consistency, Some(Consistency::Filesystem));
}

#[test]
fn on_zfs_fuse_the_set_is_one_recursive_snapshot_and_retention_reads_it_back() {
    // zfs-fuse (the lab's) has no multi-name snapshot and no `list -p`.
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = pool(&[DS0, DS1]);
    state["flavour"] = json!("zfs-fuse");
    for dataset in [DS0, DS1] {
        add_snapshot(
            &mut state,
            &format!("{dataset}@old"),
            10,
            json!({"org.lfedge.evesnap:id": "0"}),
        );
    }
    let zfs = FakeZfs::new(&state);
    let extra = json!({"max_snapshots": 1});
    let run = run(&plan(&agent.address.to_string(), &[DS0, DS1], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let parent = snap("tank/vm0");
    let taken = zfs.calls_of("snapshot");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!(taken[0][1], "-r");
    assert_eq!(taken[0].last(), Some(&parent));
    // The parent's own snapshot goes at once; the older set goes by retention.
    let destroyed: Vec<String> = zfs
        .calls_of("destroy")
        .into_iter()
        .map(|c| c[1].clone())
        .collect();
    assert_eq!(
        destroyed,
        [parent, format!("{DS0}@old"), format!("{DS1}@old")]
    );
    assert_eq!(zfs.snapshots(), [snap(DS0), snap(DS1)]);
    let state = zfs.state();
    let txg = |d: &str| state["snapshots"][snap(d)]["createtxg"].clone();
    assert_eq!(txg(DS0), txg(DS1), "atomic: one transaction group");
    assert_eq!(run.report.snapshots.as_ref().map(Vec::len), Some(2));
}

#[test]
fn retention_never_counts_or_destroys_the_guests_snapshots() {
    // Issue 14: three guest snapshots used to make the controller destroy its own
    // recovery point.
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = pool(&[DS0]);
    let controller =
        json!({"org.lfedge.evesnap:id": "c", "org.lfedge.evesnap:origin": "controller"});
    let guest = json!({"org.lfedge.evesnap:id": "g", "org.lfedge.evesnap:origin": "guest"});
    add_snapshot(&mut state, &format!("{DS0}@old"), 10, controller.clone());
    add_snapshot(&mut state, &format!("{DS0}@mine"), 20, controller);
    for (i, txg) in [30, 40, 50].into_iter().enumerate() {
        add_snapshot(&mut state, &format!("{DS0}@guest-{i}"), txg, guest.clone());
    }
    let zfs = FakeZfs::new(&state);
    let run = run(
        &plan(
            &agent.address.to_string(),
            &[DS0],
            json!({"max_snapshots": 2}),
        ),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.origin, evesnap::report::Origin::Controller);
    // Only the controller's oldest goes: its two newest stay, the guest's all stay.
    let destroyed: Vec<String> = zfs
        .calls_of("destroy")
        .into_iter()
        .map(|c| c.last().cloned().unwrap_or_default())
        .collect();
    assert_eq!(destroyed, [format!("{DS0}@old")]);
    let left = zfs.snapshots();
    for name in ["mine", "guest-0", "guest-1", "guest-2", NAME] {
        assert!(left.contains(&format!("{DS0}@{name}")), "{name}: {left:?}");
    }
    // The new snapshot says who asked.
    let props = &zfs.state()["snapshots"][snap(DS0)]["props"];
    assert_eq!(props["org.lfedge.evesnap:origin"], "controller", "{props}");
}

#[test]
fn without_an_agent_the_plan_may_allow_a_crash_consistent_snapshot() {
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"required": false, "timeout_s": 0.3}});
    let run = run(&plan(&no_agent(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", true), ("zsnap", true)]);
    assert_eq!(run.report.consistency, Some(Consistency::Crash));
    assert_eq!(run.report.freeze_window_ms, None);
    let props = &zfs.state()["snapshots"][snap(DS0)]["props"];
    assert_eq!(props[CONSISTENCY], "crash");
    assert_eq!(props["org.lfedge.evesnap:frozen"], "false");
}

#[test]
fn expedited_rcu_is_set_before_the_freeze_and_restored_after_the_thaw() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![("/bin/sh".into(), Program::exits(0))],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"expedite_rcu": true}});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(
        run.report.expedited_rcu,
        Some(ExpeditedRcu {
            set: true,
            restored: Some(true),
            error: None
        })
    );
    assert!(at(&sim, "guest-exec /bin/sh") < at(&sim, "guest-fsfreeze-freeze"));
    assert!(last_at(&sim, "guest-exec /bin/sh") > at(&sim, "guest-fsfreeze-thaw"));
}

#[test]
fn without_a_shell_in_the_guest_the_freeze_goes_on_without_expedited_rcu() {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"expedite_rcu": true}});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let rcu = run.report.expedited_rcu.as_ref().expect("expedited_rcu");
    assert!(!rcu.set && rcu.restored.is_none(), "{rcu:?}");
    assert!(
        rcu.error.as_deref().is_some_and(|e| e.contains("/bin/sh")),
        "{rcu:?}"
    );
    // Tried once, before the freeze; nothing to restore after the thaw.
    assert_eq!(last_at(&sim, "guest-exec"), at(&sim, "guest-exec /bin/sh"));
    assert!(at(&sim, "guest-exec") < at(&sim, "guest-fsfreeze-freeze"));
}

/// The run's `flush` step, typed.
fn flush_record(run: &snap_orchestrate::flow::Finished) -> FlushReport {
    let step = run.report.steps.iter().find(|s| s.tool == "flush");
    step.and_then(|s| s.record()).expect("a flush record")
}

#[test]
fn the_flush_runs_before_the_freeze_on_the_plans_mountpoints_and_is_recorded() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![("/bin/sync".into(), Program::exits(0))],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"flush_first": true, "mountpoints": ["/data0", "/data1"]}});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("flush", true),
            ("qga-freeze", true),
            ("zsnap", true),
            ("qga-thaw", true)
        ]
    );
    let flush: FlushReport = flush_record(&run);
    assert_eq!(
        flush,
        FlushReport {
            command: vec![
                "/bin/sync".into(),
                "-f".into(),
                "/data0".into(),
                "/data1".into()
            ],
            flushed: true,
            error: None
        }
    );
    assert!(at(&sim, "guest-exec /bin/sync -f /data0 /data1") < at(&sim, "guest-fsfreeze-freeze"));
}

#[test]
fn the_flush_is_on_by_default_syncs_everything_for_a_whole_guest_freeze_and_can_be_turned_off() {
    // The flow tests' plans turn it off: the plan's own default is on.
    let defaults = snap_orchestrate::plan::Plan::from_json(
        r#"{"version": 1, "agent": "unix:/x", "datasets": ["p/d"]}"#,
    )
    .expect("a plan");
    assert!(defaults.freeze.flush_first);

    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![("/bin/sync".into(), Program::exits(0))],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let on = run(
        &plan(
            &agent.address.to_string(),
            &[DS0],
            json!({"freeze": {"flush_first": true}}),
        ),
        &zfs,
    );
    assert_eq!(exit(&on), Exit::Success, "{:?}", on.error);
    // No mountpoints: every filesystem is frozen, so all are flushed.
    assert!(sim.state().log.iter().any(|c| c == "guest-exec /bin/sync"));

    let off = run(
        &plan(
            &agent.address.to_string(),
            &[DS0],
            json!({"snapshot": "off"}),
        ),
        &zfs,
    );
    assert_eq!(exit(&off), Exit::Success, "{:?}", off.error);
    assert!(!steps(&off).iter().any(|(tool, _)| *tool == "flush"));
}

#[test]
fn a_guest_without_sync_is_frozen_anyway_and_the_report_says_why_it_was_not_flushed() {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"flush_first": true}});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.consistency, Some(Consistency::Filesystem));
    let flush: FlushReport = flush_record(&run);
    assert!(!flush.flushed, "{flush:?}");
    assert!(
        flush
            .error
            .as_deref()
            .is_some_and(|e| e.contains("/usr/bin/sync")),
        "{flush:?}"
    );
    assert!(got(&sim, "guest-fsfreeze-freeze"));
}

#[test]
fn retention_destroys_the_oldest_sets_but_never_a_held_or_foreign_one() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = pool(&[DS0]);
    let ours = |id: &str| json!({"org.lfedge.evesnap:id": id});
    add_snapshot(&mut state, &format!("{DS0}@old1"), 10, ours("1"));
    add_snapshot(&mut state, &format!("{DS0}@manual"), 15, json!({}));
    add_snapshot(&mut state, &format!("{DS0}@old2"), 20, ours("2"));
    add_snapshot(&mut state, &format!("{DS0}@old3"), 30, ours("3"));
    state["snapshots"][format!("{DS0}@old1")]["userrefs"] = json!(1);
    let zfs = FakeZfs::new(&state);
    let extra = json!({"max_snapshots": 2});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let retention = run.report.steps.last().expect("steps");
    assert_eq!((retention.tool.as_str(), retention.ok), ("retention", true));
    // Four sets of ours, two too many: old1 is held and stays, old2 goes, and old3 is
    // not destroyed in old1's place.
    assert_eq!(
        retention.fields["destroyed"],
        json!([format!("{DS0}@old2")])
    );
    assert_eq!(
        retention.fields["kept"][0]["snapshot"],
        format!("{DS0}@old1")
    );
    let mut left = zfs.snapshots();
    left.sort();
    assert_eq!(
        left,
        [
            format!("{DS0}@manual"),
            format!("{DS0}@old1"),
            format!("{DS0}@old3"),
            snap(DS0)
        ]
    );
}
