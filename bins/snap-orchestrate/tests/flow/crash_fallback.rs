//! `freeze.on_failure`: a freeze that fails, times out, freezes fewer filesystems than
//! asked or does not verify fails the run by default (`fail`); with `crash` the guest is
//! thawed and verified first, then the snapshot is taken unfrozen and labelled `crash`
//! with the reason, and the run succeeds. A guest that may still be frozen fails the run
//! either way.

use std::time::Duration;

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, Sim, SimState};
use evesnap::report::{Consistency, WarningKind};
use serde_json::{json, Value};

use crate::support::*;

const CRASH_REASON: &str = "org.lfedge.evesnap:crash_reason";
const FROZEN: &str = "org.lfedge.evesnap:frozen";

/// An agent with the application's control tool whose `command` fails with `desc`.
fn failing(command: &str, desc: &str) -> (FakeAgent, Sim) {
    FakeAgent::simulated(SimState {
        programs: app_ctl(),
        failing: vec![(command.into(), desc.into())],
        ..SimState::default()
    })
}

/// `extra` with `freeze.on_failure` set, and the application quiesced and resumed.
fn on_failure(value: &str, extra: Value) -> Value {
    let mut plan = quiesce_and_resume();
    plan["freeze"] = json!({"on_failure": value});
    for (k, v) in extra.as_object().expect("object") {
        if k == "freeze" {
            for (fk, fv) in v.as_object().expect("freeze object") {
                plan["freeze"][fk] = fv.clone();
            }
        } else {
            plan[k] = v.clone();
        }
    }
    plan
}

fn props(zfs: &FakeZfs, snapshot: &str) -> Value {
    zfs.state()["snapshots"][snapshot]["props"].clone()
}

/// The run fell back: exit 0, `ok`, one snapshot labelled `crash` with the reason (which
/// contains `needle`) on it and in the report's warning, nothing claimed, guest thawed
/// before the snapshot and `guest_post` after it.
fn assert_fell_back(
    run: &snap_orchestrate::flow::Finished,
    zfs: &FakeZfs,
    sim: &Sim,
    needle: &str,
) {
    assert_eq!(exit(run), Exit::Success, "{:?}", run.error);
    assert!(run.report.ok, "{:?}", run.report);
    assert_eq!(run.report.error, None);
    assert_eq!(run.report.consistency, Some(Consistency::Crash));
    assert_eq!(run.report.freeze_window_ms, None);
    let warnings = &run.report.warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(warnings[0].kind, WarningKind::CrashFallback);
    assert_eq!(warnings[0].step, "freeze");
    assert!(warnings[0].message.contains(needle), "{warnings:?}");
    assert_eq!(zfs.snapshots(), [snap(DS0)]);
    let p = props(zfs, &snap(DS0));
    assert_eq!(p[CONSISTENCY], "crash", "{p}");
    assert_eq!(p[FROZEN], "false", "{p}");
    let reason = p[CRASH_REASON].as_str().unwrap_or_default();
    assert!(reason.contains(needle), "{p}");
    // No claim is written afterwards.
    assert!(zfs.calls_of("set").is_empty(), "{:?}", zfs.calls_of("set"));
    assert_eq!(sim.state().frozen, 0);
    assert!(
        last_at(sim, "guest-fsfreeze-thaw") < last_at(sim, "guest-exec /usr/bin/app-ctl resume"),
        "{:?}",
        sim.state().log
    );
    let report = &run.report;
    assert_eq!(report.snapshots.as_ref().map(Vec::len), Some(1));
    let last = &report.steps[report.steps.len() - 2..];
    assert_eq!(
        last.iter()
            .map(|s| (s.tool.as_str(), s.ok))
            .collect::<Vec<_>>(),
        [("zsnap", true), ("guest_post", true)]
    );
}

#[test]
fn a_refused_freeze_fails_by_default_and_falls_back_to_crash_when_allowed() {
    const DESC: &str = "failed to freeze /data0: Operation not supported";
    let (agent, sim) = failing("guest-fsfreeze-freeze", DESC);
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let address = agent.address.to_string();
    let run_fail = run(&plan(&address, &[DS0], on_failure("fail", json!({}))), &zfs);
    assert_eq!(exit(&run_fail), Exit::StepFailed, "{:?}", run_fail.error);
    assert_eq!(failed_step(&run_fail), Some("freeze"));
    assert!(zfs.snapshots().is_empty());
    assert!(run_fail.report.warnings.is_empty());

    let run = run(
        &plan(&address, &[DS0], on_failure("crash", json!({}))),
        &zfs,
    );
    assert_fell_back(&run, &zfs, &sim, DESC);
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("qga-freeze", false),
            ("zsnap", true),
            ("guest_post", true)
        ]
    );
    // The application stayed quiesced for the snapshot: resumed only after it.
    let taken = zfs.calls_of("snapshot");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert!(
        taken[0].contains(&format!("{CONSISTENCY}=crash")),
        "{taken:?}"
    );
}

#[test]
fn a_freeze_that_times_out_falls_back_once_the_guest_is_verified_thawed() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: app_ctl(),
        delays: vec![("guest-fsfreeze-freeze".into(), Duration::from_millis(1500))],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let address = agent.address.to_string();
    let timeout = json!({"freeze": {"timeout_s": 1}});
    let run_fail = run(
        &plan(&address, &[DS0], on_failure("fail", timeout.clone())),
        &zfs,
    );
    assert_eq!(exit(&run_fail), Exit::AgentTimeout, "{:?}", run_fail.error);
    assert!(zfs.snapshots().is_empty());
    assert_eq!(sim.state().frozen, 0);

    let run = run(&plan(&address, &[DS0], on_failure("crash", timeout)), &zfs);
    assert_fell_back(&run, &zfs, &sim, "guest-fsfreeze-freeze");
}

#[test]
fn a_partial_freeze_falls_back_with_the_count_in_the_reason() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: app_ctl(),
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let address = agent.address.to_string();
    // /nowhere is not mounted: the agent freezes one of the two.
    let partial = json!({"freeze": {"mountpoints": ["/data0", "/nowhere"]}});
    let run_fail = run(
        &plan(&address, &[DS0], on_failure("fail", partial.clone())),
        &zfs,
    );
    assert_eq!(exit(&run_fail), Exit::StepFailed, "{:?}", run_fail.error);
    assert!(zfs.snapshots().is_empty());

    let run = run(&plan(&address, &[DS0], on_failure("crash", partial)), &zfs);
    assert_fell_back(&run, &zfs, &sim, "froze 1 filesystems but 2 mountpoints");
}

#[test]
fn a_freeze_that_does_not_verify_is_replaced_by_a_crash_snapshot() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: app_ctl(),
        thawed_by_another_client: true,
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(
        &plan(
            &agent.address.to_string(),
            &[DS0],
            on_failure("crash", json!({})),
        ),
        &zfs,
    );
    assert_fell_back(
        &run,
        &zfs,
        &sim,
        "the guest reports thawed right after the freeze",
    );
    // The snapshot taken during the unverified freeze (if any) was destroyed, then the
    // fallback took its own.
    let s = steps(&run);
    assert_eq!(s[2], ("qga-freeze", false), "{s:?}");
    assert_eq!(s[s.len() - 2], ("zsnap", true), "{s:?}");
}

#[test]
fn a_failed_freeze_whose_thaw_cannot_be_verified_fails_even_with_crash() {
    // A partial freeze (one of two mountpoints) whose cleanup thaw the agent refuses: the
    // guest stays frozen.
    let (agent, sim) = failing(
        "guest-fsfreeze-thaw",
        "failed to thaw /data0: Device or resource busy",
    );
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let partial = json!({"freeze": {"mountpoints": ["/data0", "/nowhere"]}});
    let run = run(
        &plan(
            &agent.address.to_string(),
            &[DS0],
            on_failure("crash", partial),
        ),
        &zfs,
    );
    assert_eq!(exit(&run), Exit::ThawFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("freeze"));
    assert!(run.report.warnings.is_empty());
    assert!(zfs.snapshots().is_empty());
    assert_eq!(run.report.consistency, None);
    assert!(sim.state().frozen > 0, "the fake guest stays frozen");
}

#[test]
fn a_freeze_whose_agent_goes_silent_fails_even_with_crash() {
    // Neither the freeze nor the thaw after it is answered: the guest may be frozen.
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: app_ctl(),
        silent: vec!["guest-fsfreeze-freeze".into(), "guest-fsfreeze-thaw".into()],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let silent = json!({"freeze": {"timeout_s": 1}});
    let run = run(
        &plan(
            &agent.address.to_string(),
            &[DS0],
            on_failure("crash", silent),
        ),
        &zfs,
    );
    assert_eq!(exit(&run), Exit::AgentTimeout, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("freeze"));
    assert!(run.report.warnings.is_empty());
    assert!(zfs.snapshots().is_empty());
    assert!(zfs.calls_of("snapshot").is_empty());
    assert!(got(&sim, "guest-fsfreeze-thaw"));
}
