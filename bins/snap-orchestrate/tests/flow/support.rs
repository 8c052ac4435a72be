//! What the flow tests share: a fake `zfs` over a state file (`tests/support/fake-zfs.py`),
//! the simulated agent, plans, and one run of the flow with its outcome.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use evesnap::exit::{exit_of, find, Exit};
use evesnap::qga::testing::{FakeAgent, Program, Sim, SimState};
use evesnap::runtime::Lock;
use evesnap::zfs::{Error as ZfsError, Problem, Zfs};
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

/// The Python behind `python3` (a version manager's shim on `PATH` costs ~0.3 s a call).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 on PATH");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A pool `tank` holding `datasets` (volumes, 64 KiB written, 1 GiB free) and the
/// filesystems above them, no snapshots, as OpenZFS 2.x.
pub fn pool(datasets: &[&str]) -> Value {
    let space = |kind: &str| {
        json!({"type": kind, "available": 1u64 << 30, "referenced": 65536, "usedbydataset": 65536,
               "refreservation": 0, "usedbyrefreservation": 0})
    };
    let mut all = json!({"tank": space("filesystem"), "tank/vm0": space("filesystem")});
    for d in datasets {
        all[*d] = space("volume");
    }
    json!({"flavour": "openzfs", "txg": 100, "datasets": all, "snapshots": {}, "bookmarks": {},
           "faults": {}})
}

/// Adds the snapshot `name` to a [`pool`] state, taken at `txg`, with user `props`.
pub fn add_snapshot(state: &mut Value, name: &str, txg: u64, props: Value) {
    state["snapshots"][name] = json!({"guid": (txg * 7919).to_string(), "createtxg": txg,
        "creation": 1764099000 + txg, "userrefs": 0, "used": 0, "referenced": 65536,
        "props": props});
}

/// `tests/support/fake-zfs.py` over its own state, run through a `zfs` wrapper; the folder
/// goes when dropped.
#[derive(Debug)]
pub struct FakeZfs {
    dir: PathBuf,
}

impl FakeZfs {
    pub fn new(state: &Value) -> FakeZfs {
        let dir = unique("zfs");
        std::fs::create_dir_all(&dir).expect("fake zfs folder");
        std::fs::write(dir.join("state.json"), state.to_string()).expect("state");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake-zfs.py");
        let wrapper = format!(
            "#!/bin/sh\nexec '{}' -S '{}' '{}' \"$@\"\n",
            python().display(),
            script.display(),
            dir.display()
        );
        let path = dir.join("zfs");
        std::fs::write(&path, wrapper).expect("wrapper");
        let mut perms = std::fs::metadata(&path).expect("wrapper").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).expect("chmod wrapper");
        FakeZfs { dir }
    }

    /// The zfs layer over this fake; it probes the capabilities as with a real `zfs`.
    pub fn zfs(&self) -> Zfs {
        Zfs::with_path(self.dir.join("zfs"))
    }

    /// The `zfs` wrapper, for a process (`--zfs`).
    pub fn path(&self) -> PathBuf {
        self.dir.join("zfs")
    }

    pub fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.join("state.json")).expect("state");
        serde_json::from_str(&text).expect("state is JSON")
    }

    /// The snapshots that exist, by name.
    pub fn snapshots(&self) -> Vec<String> {
        let state = self.state();
        let all = state["snapshots"].as_object().expect("snapshots");
        all.keys().cloned().collect()
    }

    /// Every call's argv (without the program), in order.
    pub fn calls(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a logged argv"))
            .collect()
    }

    /// The calls of one subcommand, without the capability probe (`zfs snapshot` alone).
    pub fn calls_of(&self, sub: &str) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter(|c| c.len() > 1 && c[0] == sub)
            .collect()
    }
}

impl Drop for FakeZfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

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
