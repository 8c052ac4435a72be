//! `qga-freeze` (and `qga-thaw` after it) against a simulated agent: the document, the
//! exit codes, the watchdog, signals.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evesnap::qga::testing::{FakeAgent, Sim, SimState};
use evesnap_tests::run::{code, doc_of, run, stderr, RunDir};
use qga_freeze::FreezeReport;

const FREEZE: &str = env!("CARGO_BIN_EXE_qga-freeze");

fn thaw_bin() -> PathBuf {
    // Built by `cargo build --workspace --bins` (scripts/test does it first).
    evesnap_tests::bin("qga-thaw")
}

fn process_alive(pid: u32) -> bool {
    // A zombie is not alive for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn sim(state: SimState) -> (FakeAgent, Sim, String) {
    let (agent, sim) = FakeAgent::simulated(state);
    let address = agent.address.to_string();
    (agent, sim, address)
}

#[test]
fn freeze_then_thaw_round_trip() {
    let dir = RunDir::new("round");
    let (_agent, sim, address) = sim(SimState::default());
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--thaw-after", "30"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.agent.as_deref(), Some(address.as_str()));
    let step = &doc.steps[0];
    assert_eq!((step.tool.as_str(), step.ok), ("qga-freeze", true));
    let report: FreezeReport =
        serde_json::from_value(serde_json::Value::Object(step.fields.clone()))
            .expect("strict report");
    assert_eq!(report.frozen, Some(3));
    assert_eq!(report.mountpoints, None);
    let watchdog = report.watchdog.expect("watchdog armed");
    let pid = watchdog.pid.expect("pid");
    assert!(process_alive(pid), "the watchdog runs");
    assert!(watchdog.state_file.starts_with(dir.path()));
    assert_eq!(sim.state().frozen, 3);

    let out = run(&thaw_bin(), &[], Some(&doc.to_json()), &dir);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    let step = &doc.steps[1];
    assert_eq!((step.tool.as_str(), step.ok), ("qga-thaw", true));
    assert_eq!(step.fields["thawed"], 3);
    assert_eq!(step.fields["expected"], 3);
    assert_eq!(step.fields["watchdog_cancelled"]["pid"], pid);
    assert_eq!(sim.state().frozen, 0);
    let gone = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process_alive(pid), "the watchdog was cancelled");
    assert!(!watchdog.state_file.exists());
}

#[test]
fn a_mountpoint_that_does_not_exist_freezes_nothing_and_is_thawed() {
    let dir = RunDir::new("nomount");
    let (_agent, sim, address) = sim(SimState::default());
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--mountpoint", "/nonexistent"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert!(!doc.ok);
    assert_eq!(doc.steps[0].fields["frozen"], 0);
    assert_eq!(doc.steps[0].fields["possibly_frozen"], false);
    assert!(
        stderr(&out).contains("froze no filesystem"),
        "{}",
        stderr(&out)
    );
    let log = sim.state().log.clone();
    assert_eq!(
        log.iter().filter(|c| *c == "guest-fsfreeze-thaw").count(),
        1,
        "{log:?}"
    );
    assert!(
        std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .all(|e| !e.path().to_string_lossy().ends_with(".json")),
        "watchdog cancelled"
    );
}

#[test]
fn a_freeze_the_guest_does_not_report_is_thawed_and_fails() {
    let dir = RunDir::new("unverified");
    let (_agent, sim, address) = sim(SimState {
        thawed_by_another_client: true,
        ..SimState::default()
    });
    let out = run(Path::new(FREEZE), &["--agent", &address], None, &dir);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(!doc_of(&out).ok);
    assert!(
        stderr(&out).contains("reports thawed right after the freeze"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        sim.after_freeze(2),
        ["guest-fsfreeze-status", "guest-fsfreeze-thaw"],
        "checked, then thawed: {:?}",
        sim.state().log
    );
}

#[test]
fn fewer_filesystems_than_mountpoints_is_an_error() {
    let dir = RunDir::new("partial");
    let (_agent, sim, address) = sim(SimState::default());
    let args = [
        "--agent",
        &address,
        "--mountpoint",
        "/data0",
        "--mountpoint",
        "/gone",
        "--thaw-after",
        "0",
    ];
    let out = run(Path::new(FREEZE), &args, None, &dir);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("froze 1 filesystems but 2 mountpoints"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sim.state().frozen, 0);
}

#[test]
fn freezing_only_listed_mountpoints_uses_the_list_command() {
    let dir = RunDir::new("list");
    let (_agent, sim, address) = sim(SimState::default());
    let out = run(
        Path::new(FREEZE),
        &[
            "--agent",
            &address,
            "--mountpoint",
            "/data0",
            "--thaw-after",
            "0",
        ],
        None,
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["frozen"], 1);
    assert_eq!(
        doc.steps[0].fields["mountpoints"],
        serde_json::json!(["/data0"])
    );
    assert_eq!(doc.steps[0].fields["watchdog"], serde_json::Value::Null);
    assert!(sim
        .state()
        .log
        .contains(&"guest-fsfreeze-freeze-list".to_string()));
    sim.state().frozen = 0;
}

#[test]
fn an_already_frozen_guest_is_refused_unless_adopted() {
    let dir = RunDir::new("adopt");
    let (_agent, sim, address) = sim(SimState {
        frozen: 2,
        ..SimState::default()
    });
    let out = run(Path::new(FREEZE), &["--agent", &address], None, &dir);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(!sim
        .state()
        .log
        .iter()
        .any(|c| c.starts_with("guest-fsfreeze-freeze") || c == "guest-fsfreeze-thaw"));
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--adopt-frozen", "--thaw-after", "0"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["adopted"], true);
    assert_eq!(doc.steps[0].fields["frozen"], serde_json::Value::Null);
}

#[test]
fn an_agent_without_freeze_is_a_preflight_failure() {
    let dir = RunDir::new("missing");
    let mut state = SimState::default();
    state.missing.push("guest-fsfreeze-freeze".into());
    let (_agent, _sim, address) = sim(state);
    let out = run(Path::new(FREEZE), &["--agent", &address], None, &dir);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("lacks guest-fsfreeze-freeze"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_upstream_failure_skips_the_freeze() {
    let dir = RunDir::new("upstream");
    let (agent, _sim, address) = sim(SimState::default());
    let upstream = format!(
        r#"{{"version":1,"ok":false,"agent":"{address}","steps":[{{"tool":"plan","ok":false,"started_at":"x","duration_ms":1}}],
        "error":{{"tool":"plan","kind":"preflight-failed","message":"no room"}}}}"#
    );
    let out = run(Path::new(FREEZE), &[], Some(&upstream), &dir);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[1].fields["skipped"], true);
    assert_eq!(
        doc.error.as_ref().map(|e| e.tool.as_str()),
        Some("plan"),
        "the first failure is kept"
    );
    assert_eq!(
        agent.connections.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the agent was not touched"
    );
}

#[test]
fn bad_usage_and_unreachable_agents_have_their_codes() {
    let dir = RunDir::new("codes");
    let out = run(Path::new(FREEZE), &[], None, &dir);
    assert_eq!(code(&out), 2, "no agent: {}", stderr(&out));
    let out = run(Path::new(FREEZE), &["--agent", "tcp:host:1"], None, &dir);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let missing = dir.path().join("none.sock");
    let out = run(
        Path::new(FREEZE),
        &["--agent", &missing.to_string_lossy(), "--timeout", "0.5"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot connect to the guest agent"),
        "{}",
        stderr(&out)
    );
    let out = run(
        Path::new(FREEZE),
        &["--agent", "x", "--timeout", "0"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 2);
    let out = run(
        Path::new(FREEZE),
        &["--agent", "x"],
        Some("{not json"),
        &dir,
    );
    assert_eq!(code(&out), 2);
}

#[test]
fn a_freeze_without_reply_fails_with_the_timeout_code_and_thaws() {
    let dir = RunDir::new("silent");
    let mut state = SimState::default();
    state.silent.push("guest-fsfreeze-freeze".into());
    let (_agent, sim, address) = sim(state);
    let started = Instant::now();
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--timeout", "1"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let doc = doc_of(&out);
    let step = &doc.steps[0];
    // The agent answered the rescue thaw: thawed and verified, watchdog cancelled.
    assert_eq!(step.fields["possibly_frozen"], false, "{step:?}");
    assert_eq!(step.fields["cleanup_thaw"]["result"], "thawed");
    assert_eq!(step.fields["watchdog"], serde_json::Value::Null);
    let log = sim.state().log.clone();
    assert!(
        log.ends_with(&[
            "guest-fsfreeze-thaw".into(),
            "guest-sync-delimited".into(),
            "guest-fsfreeze-status".into()
        ]),
        "{log:?}"
    );
}

#[test]
fn a_freeze_and_thaw_without_reply_leave_the_watchdog_armed() {
    let dir = RunDir::new("silent2");
    let mut state = SimState::default();
    state
        .silent
        .extend(["guest-fsfreeze-freeze".into(), "guest-fsfreeze-thaw".into()]);
    let (_agent, _sim, address) = sim(state);
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--timeout", "0.5"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let doc = doc_of(&out);
    let step = &doc.steps[0];
    assert_eq!(step.fields["possibly_frozen"], true);
    assert_eq!(step.fields["cleanup_thaw"]["result"], "queued");
    assert!(
        step.fields["watchdog"]["pid"].is_u64(),
        "the watchdog stays armed: {step:?}"
    );
    assert!(stderr(&out).contains("MAY BE FROZEN"), "{}", stderr(&out));
}

#[test]
fn the_watchdog_thaws_at_its_deadline() {
    let dir = RunDir::new("fire");
    let (_agent, sim, address) = sim(SimState::default());
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--thaw-after", "1"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(sim.state().frozen, 3);
    let doc = doc_of(&out);
    let pid = doc.steps[0].fields["watchdog"]["pid"]
        .as_u64()
        .expect("pid") as u32;
    let until = Instant::now() + Duration::from_secs(10);
    while sim.state().frozen > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sim.state().frozen, 0, "thawed by the watchdog");
    let until = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process_alive(pid), "the watchdog exits after thawing");
    // A thaw after that thaws nothing: the freeze was broken early, which qga-thaw reports.
    let out = run(&thaw_bin(), &[], Some(&doc.to_json()), &dir);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("thawed early"), "{}", stderr(&out));
}

#[test]
fn sigterm_during_the_freeze_thaws_before_exiting() {
    let dir = RunDir::new("sigterm");
    let mut state = SimState::default();
    state
        .delays
        .push(("guest-fsfreeze-freeze".into(), Duration::from_millis(1500)));
    let (_agent, sim, address) = sim(state);
    let child = Command::new(FREEZE)
        .args(["--agent", &address, "--thaw-after", "30"])
        .env("EVESNAP_RUN_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let until = Instant::now() + Duration::from_secs(10);
    while sim.state().frozen == 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(sim.state().frozen, 3, "frozen, reply pending");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("interrupted by SIGTERM"),
        "{}",
        stderr(&out)
    );
    assert_eq!(sim.state().frozen, 0);
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["cleanup_thaw"]["result"], "thawed");
    assert_eq!(
        doc.steps[0].fields["watchdog"],
        serde_json::Value::Null,
        "cancelled"
    );
}
