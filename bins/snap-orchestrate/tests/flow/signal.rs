//! SIGTERM while a `zfs` call hangs, in each phase: the binary `snap-orchestrate` runs as a
//! child (the test process cannot take the signal itself) over the fake zfs, whose faulted
//! call sleeps for an hour, and the simulated agent. The run must end within seconds, not
//! at the call's 60 s deadline, with the guest thawed and the VM lock free. And SIGTERM
//! while the guest takes its time (no call to cut short): the run stops at the next step.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evesnap::qga::testing::{FakeAgent, Program, Sim, SimState};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::support::*;

/// Far longer than any bound below: the faulted call never returns by itself.
pub(crate) const HANG: f64 = 3600.0;
/// Within this of the signal the run has ended (the snapshot's grace is 2 s).
pub(crate) const BOUND: Duration = Duration::from_secs(8);

/// The plan as JSON: agent calls get 30 s, so nothing but the signal ends the run early.
fn plan_json(agent: &FakeAgent, extra: Value) -> Value {
    let mut plan = json!({"version": 1, "agent": agent.address.to_string(), "datasets": [DS0],
                          "snapshot": NAME, "freeze": {"timeout_s": 30, "thaw_after_s": 0}});
    if let (Some(plan), Value::Object(extra)) = (plan.as_object_mut(), extra) {
        plan.extend(extra);
    }
    plan
}

pub(crate) fn spawn(zfs: &FakeZfs, plan: &Value) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_snap-orchestrate"))
        .arg("--zfs")
        .arg(zfs.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("snap-orchestrate");
    let mut stdin = child.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, plan.to_string().as_bytes()).expect("the plan");
    child
}

/// Waits until the fake got a `sub` call (which then hangs).
pub(crate) fn wait_for_call(zfs: &FakeZfs, child: &mut Child, sub: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while zfs.calls_of(sub).is_empty() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the run ended ({status}) before any `zfs {sub}`");
        }
        assert!(Instant::now() < until, "no `zfs {sub}` within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Inside the call, past the fake's bookkeeping.
    std::thread::sleep(Duration::from_millis(300));
}

/// SIGTERM, then how long the run took to end, and its report.
pub(crate) fn terminate(mut child: Child) -> (Duration, i32, Value) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if signalled.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running 90 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = signalled.elapsed();
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("stderr");
    let report: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("no report ({e}): {out:?}; stderr: {err}"));
    (took, status.code().unwrap_or(-1), report)
}

/// The run ended within [`BOUND`], failed, left the guest thawed and the VM lock free.
fn check(took: Duration, code: i32, report: &Value, sim: &Sim, plan: &Value, step: &str) {
    assert!(took < BOUND, "ended {took:?} after SIGTERM: {report}");
    assert_ne!(code, 0, "{report}");
    assert_eq!(report["error"]["step"], step, "{report}");
    assert_eq!(sim.state().frozen, 0, "the guest is left frozen");
    let plan = snap_orchestrate::Plan::from_json(&plan.to_string()).expect("plan");
    drop(hold_lock(&plan));
}

#[test]
fn sigterm_during_a_hung_preflight_read_ends_the_run() {
    let (agent, sim) = with_app();
    let mut state = pool(&[DS0]);
    // The preflight's space read (`zfs get`); the capability probes are never faulted.
    state["faults"] = json!({"get": {"sleep": HANG}});
    let zfs = FakeZfs::new(&state);
    let plan = plan_json(&agent, json!({}));
    let mut child = spawn(&zfs, &plan);
    wait_for_call(&zfs, &mut child, "get");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "preflight");
    assert!(
        !got(&sim, "guest-fsfreeze-freeze"),
        "froze after the signal"
    );
}

#[test]
fn sigterm_during_a_hung_snapshot_thaws_and_ends_the_run() {
    let (agent, sim) = with_app();
    let mut state = pool(&[DS0]);
    state["faults"] = json!({"snapshot": {"sleep": HANG}});
    let zfs = FakeZfs::new(&state);
    let plan = plan_json(&agent, json!({}));
    let mut child = spawn(&zfs, &plan);
    wait_for_call(&zfs, &mut child, "snapshot");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "snapshot");
    assert!(got(&sim, "guest-fsfreeze-thaw"), "never thawed");
    assert!(zfs.snapshots().is_empty(), "{:?}", zfs.snapshots());
}

#[test]
fn sigterm_during_a_hung_retention_ends_the_run() {
    let (agent, sim) = with_app();
    let mut state = pool(&[DS0]);
    add_snapshot(
        &mut state,
        &format!("{DS0}@old"),
        10,
        json!({"org.lfedge.evesnap:id": "0"}),
    );
    state["faults"] = json!({"destroy": {"sleep": HANG}});
    let zfs = FakeZfs::new(&state);
    let plan = plan_json(&agent, json!({"max_snapshots": 1}));
    let mut child = spawn(&zfs, &plan);
    wait_for_call(&zfs, &mut child, "destroy");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "retention");
    // The new snapshot stays, with its claims.
    assert_eq!(report["consistency"], "filesystem", "{report}");
    assert!(zfs.snapshots().contains(&snap(DS0)));
}

#[test]
fn sigterm_during_a_hung_rollback_ends_the_run() {
    let (agent, sim) = with_app();
    let mut state = pool(&[DS0]);
    add_snapshot(&mut state, &format!("{DS0}@s1"), 10, json!({}));
    state["faults"] = json!({"rollback": {"sleep": HANG}});
    let zfs = FakeZfs::new(&state);
    let plan = plan_json(
        &agent,
        json!({"action": "rollback", "rollback": {"to": "s1", "vm_stopped": true}}),
    );
    let mut child = spawn(&zfs, &plan);
    wait_for_call(&zfs, &mut child, "rollback");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "rollback");
}

/// A keep-newer switch cut short by SIGTERM in its `zfs promote` is undone (the clone
/// destroyed, with calls the signal does not cut short) and the run ends within seconds.
#[test]
fn sigterm_during_a_hung_keep_newer_promote_undoes_the_switch() {
    let (agent, sim) = with_app();
    let mut state = pool(&[DS0]);
    add_snapshot(&mut state, &format!("{DS0}@s1"), 10, json!({}));
    add_snapshot(&mut state, &format!("{DS0}@s2"), 20, json!({}));
    state["faults"] = json!({"promote": {"sleep": HANG}});
    let zfs = FakeZfs::new(&state);
    let before = zfs.state()["datasets"].clone();
    let plan = plan_json(
        &agent,
        json!({"action": "rollback",
               "rollback": {"to": "s1", "keep_newer": true, "vm_stopped": true}}),
    );
    let mut child = spawn(&zfs, &plan);
    wait_for_call(&zfs, &mut child, "promote");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "rollback");
    let message = report["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("everything done was undone"), "{report}");
    assert_eq!(zfs.state()["datasets"], before, "the clone is left");
    assert_eq!(zfs.snapshots().len(), 2);
}

/// Waits until the agent got a command starting with `prefix` (which then takes its time).
fn wait_for_agent(sim: &Sim, child: &mut Child, prefix: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while !got(sim, prefix) {
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the run ended ({status}) before the agent got {prefix:?}");
        }
        assert!(Instant::now() < until, "no {prefix:?} within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// A guest program that runs for 1.5 s.
fn slow() -> Program {
    Program {
        runs_for: Duration::from_millis(1500),
        ..Program::default()
    }
}

/// The report's steps as (tool, ok).
fn tools(report: &Value) -> Vec<(String, bool)> {
    let steps = report["steps"].as_array().expect("steps");
    steps
        .iter()
        .map(|s| {
            (
                s["tool"].as_str().unwrap_or("?").to_string(),
                s["ok"] == true,
            )
        })
        .collect()
}

#[test]
fn sigterm_while_guest_pre_runs_stops_before_the_freeze_and_guest_post_runs() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![
            ("/usr/bin/quiesce".into(), slow()),
            (APP_CTL.into(), Program::exits(0)),
        ],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let plan = plan_json(
        &agent,
        json!({"guest_pre": [{"path": "/usr/bin/quiesce"}],
               "guest_post": [{"path": APP_CTL, "args": ["resume"]}]}),
    );
    run_dir();
    let mut child = spawn(&zfs, &plan);
    wait_for_agent(&sim, &mut child, "guest-exec /usr/bin/quiesce");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "freeze");
    let message = report["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("before freeze"), "{report}");
    // The command ran to its end, then nothing moved forward; the application resumed.
    assert!(
        !got(&sim, "guest-fsfreeze-freeze"),
        "froze after the signal"
    );
    assert!(got(&sim, "guest-exec /usr/bin/app-ctl resume"), "{report}");
    let steps = tools(&report);
    assert!(steps.contains(&("guest_pre".into(), true)), "{report}");
    assert_eq!(steps.last(), Some(&("guest_post".into(), true)), "{report}");
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn sigterm_while_guest_post_runs_skips_retention_and_keeps_the_snapshot() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![
            (APP_CTL.into(), Program::exits(0)),
            ("/usr/bin/resume".into(), slow()),
        ],
        ..SimState::default()
    });
    let mut state = pool(&[DS0]);
    add_snapshot(
        &mut state,
        &format!("{DS0}@old"),
        10,
        json!({"org.lfedge.evesnap:id": "0"}),
    );
    let zfs = FakeZfs::new(&state);
    let plan = plan_json(
        &agent,
        json!({"max_snapshots": 1, "guest_pre": [{"path": APP_CTL, "args": ["quiesce"]}],
               "guest_post": [{"path": "/usr/bin/resume"}]}),
    );
    run_dir();
    let mut child = spawn(&zfs, &plan);
    wait_for_agent(&sim, &mut child, "guest-exec /usr/bin/resume");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "retention");
    let message = report["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("before retention"), "{report}");
    assert_eq!(
        tools(&report).last(),
        Some(&("guest_post".into(), true)),
        "{report}"
    );
    // The snapshot stays with its claims; the old one was not pruned.
    assert_eq!(report["consistency"], "application", "{report}");
    assert!(zfs.calls_of("destroy").is_empty());
    assert_eq!(zfs.snapshots(), [format!("{DS0}@old"), snap(DS0)]);
}

/// A rollback of `DS0` to `s1` (`s2` newer) under a running VM, whose agent answers
/// `slow_command` after 1.5 s; `guest_pre` unmounts, `guest_post` mounts.
fn slow_rollback(slow_command: &str) -> (FakeAgent, Sim, FakeZfs, Value) {
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![
            ("/bin/umount".into(), Program::exits(0)),
            ("/bin/mount".into(), Program::exits(0)),
        ],
        delays: vec![(slow_command.into(), Duration::from_millis(1500))],
        ..SimState::default()
    });
    let mut state = pool(&[DS0]);
    add_snapshot(&mut state, &format!("{DS0}@s1"), 10, json!({}));
    add_snapshot(&mut state, &format!("{DS0}@s2"), 20, json!({}));
    let zfs = FakeZfs::new(&state);
    let plan = plan_json(
        &agent,
        json!({"action": "rollback", "rollback": {"to": "s1", "destroy_newer": true},
               "guest_pre": [{"path": "/bin/umount", "args": ["/data0"]}],
               "guest_post": [{"path": "/bin/mount", "args": ["/dev/vda", "/data0"]}],
               "disks": {DS0: {"pci": "0000:00:07.0"}}}),
    );
    (agent, sim, zfs, plan)
}

#[test]
fn sigterm_while_the_agent_is_asked_in_the_rollback_preflight_touches_nothing() {
    let (_agent, sim, zfs, plan) = slow_rollback("guest-info");
    run_dir();
    let mut child = spawn(&zfs, &plan);
    wait_for_agent(&sim, &mut child, "guest-info");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "guest_pre");
    let message = report["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("before guest_pre"), "{report}");
    assert_eq!(tools(&report), [("preflight".to_string(), true)]);
    // Nothing ran in the guest, so nothing is owed to it.
    assert!(!got(&sim, "guest-exec"), "{:?}", sim.state().log);
    assert_eq!(report["guest_post"], Value::Null, "{report}");
    assert!(zfs.calls_of("rollback").is_empty() && zfs.calls_of("destroy").is_empty());
}

#[test]
fn sigterm_before_the_rollback_step_rolls_nothing_back_and_guest_post_runs() {
    let (_agent, sim, zfs, plan) = slow_rollback("guest-get-fsinfo");
    run_dir();
    let mut child = spawn(&zfs, &plan);
    wait_for_agent(&sim, &mut child, "guest-get-fsinfo");
    let (took, code, report) = terminate(child);
    check(took, code, &report, &sim, &plan, "rollback");
    let message = report["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("before rollback"), "{report}");
    assert!(zfs.calls_of("rollback").is_empty() && zfs.calls_of("destroy").is_empty());
    assert_eq!(zfs.snapshots().len(), 2);
    // The volume is mounted again now, not left for a watchdog.
    assert!(
        at(&sim, "guest-get-fsinfo") < at(&sim, "guest-exec /bin/mount"),
        "{report}"
    );
    assert_eq!(report["guest_post"], "ran", "{report}");
}
