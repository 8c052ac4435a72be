//! What the flow tests share: a fake `zfs` over a state file (`tests/support/fake-zfs.py`),
//! the simulated agent, plans, and one run of the flow with its outcome.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use evesnap::exit::{exit_of, find, Exit};
use evesnap::qga::testing::{FakeAgent, Program, Sim, SimState};
use evesnap::runtime::Lock;
use evesnap::zfs::{Error as ZfsError, Problem};
use serde_json::{json, Value};
use snap_orchestrate::flow::Finished;
use snap_orchestrate::Plan;

pub const DS0: &str = "tank/vm0/disk0";
pub const DS1: &str = "tank/vm0/disk1";
/// The snapshot name the plans ask for.
pub const NAME: &str = "s1";
pub const APP_CTL: &str = "/usr/bin/app-ctl";

/// A fresh name for a temporary folder or socket.
pub fn unique(what: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "evesnap-flow-{what}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ))
}

/// The runtime folder (the VM locks; no watchdog is armed with `thaw_after_s: 0`), set
/// once, before any test runs the flow. Each run removes its lock file afterwards.
pub fn run_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("evesnap-flow-tests-{}", nix::unistd::geteuid()));
        std::env::set_var("EVESNAP_RUN_DIR", &dir);
        dir
    })
}

pub use evesnap_tests::fake_zfs::{add_snapshot, pool, FakeZfs};

/// The programs of an application's control tool: `guest-exec` of `APP_CTL` exits 0.
pub fn app_ctl() -> Vec<(String, Program)> {
    vec![(APP_CTL.into(), Program::exits(0))]
}

/// The user property that records a snapshot's consistency.
pub const CONSISTENCY: &str = "org.lfedge.evesnap:consistency";

/// `dataset@`[`NAME`].
pub fn snap(dataset: &str) -> String {
    format!("{dataset}@{NAME}")
}

/// An agent whose guest has the application's control tool.
pub fn with_app() -> (FakeAgent, Sim) {
    FakeAgent::simulated(SimState {
        programs: app_ctl(),
        ..SimState::default()
    })
}

/// `guest_pre` quiesces the application, `guest_post` resumes it.
pub fn quiesce_and_resume() -> Value {
    json!({"guest_pre": [{"path": APP_CTL, "args": ["quiesce"]}],
           "guest_post": [{"path": APP_CTL, "args": ["resume"]}]})
}

/// An agent address where nothing listens.
pub fn no_agent() -> String {
    format!("unix:{}", unique("noagent").join("qga.sock").display())
}

/// A plan for `agent` and `datasets`, snapshot [`NAME`], agent calls limited to 2 s, no
/// watchdog; `extra` is merged in (objects field by field).
pub fn plan(agent: &str, datasets: &[&str], extra: Value) -> Plan {
    let mut plan = json!({"version": 1, "agent": agent, "datasets": datasets, "snapshot": NAME,
                          "freeze": {"timeout_s": 2, "thaw_after_s": 0,
                                     "flush_first": false, "expedite_rcu": false}});
    merge(&mut plan, extra);
    Plan::from_json(&plan.to_string()).expect("a valid plan")
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (k, v) in from {
                merge(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, from) => *into = from,
    }
}

/// Runs the plan's flow with the fake zfs.
pub fn run(plan: &Plan, zfs: &FakeZfs) -> Finished {
    let lock = run_dir()
        .join("locks")
        .join(format!("{}.lock", evesnap::runtime::file_key(&plan.agent)));
    let finished = snap_orchestrate::flow::execute(plan, &zfs.zfs());
    // Keyed by this test's own agent address: nobody else's.
    let _ = std::fs::remove_file(lock);
    finished
}

/// Takes the plan's VM lock, as a run in progress holds it.
pub fn hold_lock(plan: &Plan) -> Lock {
    run_dir();
    snap_orchestrate::lock::lock_vm(&plan.agent.parse().expect("agent address"))
        .expect("the VM lock")
}

/// The run's exit code.
pub fn exit(run: &Finished) -> Exit {
    run.error.as_ref().map_or(Exit::Success, exit_of)
}

/// The report's steps: tool and whether it succeeded, in order.
pub fn steps(run: &Finished) -> Vec<(&str, bool)> {
    let steps = &run.report.steps;
    steps.iter().map(|s| (s.tool.as_str(), s.ok)).collect()
}

/// The failed step the report names, if any.
pub fn failed_step(run: &Finished) -> Option<&str> {
    run.report.error.as_ref().map(|e| e.step.as_str())
}

/// The zfs preflight's problems, from the run's error.
pub fn problems(run: &Finished) -> Vec<Problem> {
    let error = run.error.as_ref().expect("an error");
    match find::<ZfsError>(error) {
        Some(ZfsError::Preflight { problems }) => problems.clone(),
        other => panic!("not a zfs preflight refusal: {other:?} ({error:#})"),
    }
}

/// Where the agent's log first has an entry starting with `prefix`.
pub fn at(sim: &Sim, prefix: &str) -> usize {
    let log = sim.state().log.clone();
    log.iter()
        .position(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("the agent never got {prefix:?}: {log:?}"))
}

/// Where the agent's log last has an entry starting with `prefix`.
pub fn last_at(sim: &Sim, prefix: &str) -> usize {
    let log = sim.state().log.clone();
    log.iter()
        .rposition(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("the agent never got {prefix:?}: {log:?}"))
}

/// Whether the agent ever got a command starting with `prefix`.
pub fn got(sim: &Sim, prefix: &str) -> bool {
    sim.state().log.iter().any(|c| c.starts_with(prefix))
}
