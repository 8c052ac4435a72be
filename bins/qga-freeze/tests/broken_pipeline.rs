//! A pipeline that breaks after the freeze is thawed at once, not at the watchdog's
//! deadline (30 s or more here, so a thaw within seconds can only be the prompt one):
//! against a simulated agent, with the real qga-freeze, qga-thaw and watchdog.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use evesnap::qga::testing::{FakeAgent, Sim, SimState};
use evesnap_tests::run::{code, doc_of, run, stderr, RunDir};

const FREEZE: &str = env!("CARGO_BIN_EXE_qga-freeze");

/// A next step that waits for the document to arrive, then exits without reading it.
const LEAVES_IT_UNREAD: &str =
    "python3 -c 'import select, sys; select.select([sys.stdin], [], [])'";

/// A broken pipeline must have been thawed within this long after it broke.
const PROMPT: Duration = Duration::from_secs(2);

fn sim() -> (FakeAgent, Sim, String) {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let address = agent.address.to_string();
    (agent, sim, address)
}

/// Runs `qga-freeze --agent <agent> --thaw-after 30 | <reader>` in bash; the last line of
/// stdout is `${PIPESTATUS[@]}`.
fn pipeline(reader: &str, agent: &str, dir: &RunDir) -> (Output, Vec<i32>) {
    let script =
        format!(r#""$1" --agent "$2" --thaw-after 30 | {reader}; echo "${{PIPESTATUS[@]}}""#);
    let out = Command::new("bash")
        .args(["-c", &script, "pipeline", FREEZE, agent])
        .env("EVESNAP_RUN_DIR", dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let codes = stdout
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .map(|c| c.parse().unwrap_or(-1))
        .collect();
    (out, codes)
}

/// Waits up to [`PROMPT`] for the simulated guest to be thawed.
fn thawed_within_prompt(sim: &Sim) -> Duration {
    let since = Instant::now();
    while sim.state().frozen > 0 {
        assert!(
            since.elapsed() < PROMPT,
            "still frozen {PROMPT:?} after the pipeline broke"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    since.elapsed()
}

/// What the watchdogs of `dir` logged.
fn watchdog_log(dir: &RunDir) -> String {
    std::fs::read_dir(dir.path())
        .expect("run dir")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

#[test]
fn a_reader_that_exits_without_reading_fails_the_freeze_and_is_thawed() {
    let dir = RunDir::new("unread");
    let (_agent, sim, address) = sim();
    let started = Instant::now();
    // The reader waits until the document is there, then exits without reading it.
    let (out, codes) = pipeline(LEAVES_IT_UNREAD, &address, &dir);
    let took = started.elapsed();
    let stderr = stderr(&out);
    assert_eq!(codes, [1, 0], "{stderr}");
    assert!(
        stderr.contains("the next step exited without reading the document")
            && stderr.contains("the watchdog thawed the guest"),
        "{stderr}"
    );
    // qga-freeze waited for the watchdog's thaw before it exited.
    assert_eq!(sim.state().frozen, 0, "{stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_reader_that_exits_right_after_reading_is_thawed_at_once() {
    let dir = RunDir::new("read-exit");
    let (_agent, sim, address) = sim();
    let started = Instant::now();
    // One read takes the whole document in (it is written at once, well under 64 KiB);
    // then the step ends, as a zsnap killed before it registered with the watchdog would.
    let (out, codes) = pipeline(
        "dd bs=65536 count=1 of=/dev/null status=none",
        &address,
        &dir,
    );
    let ended = started.elapsed();
    assert_eq!(codes, [0, 0], "the document was read: {}", stderr(&out));
    let took = thawed_within_prompt(&sim);
    assert!(
        ended < Duration::from_secs(10),
        "the pipeline took {ended:?}"
    );
    let log = watchdog_log(&dir);
    assert!(
        log.contains("read the document and exited before passing it on or thawing"),
        "thawed {took:?} after the pipeline ended; watchdog log: {log}"
    );
}

#[test]
fn a_thaw_killed_before_its_thaw_was_answered_is_thawed_at_once() {
    let dir = RunDir::new("thaw-killed");
    let (_agent, sim, address) = sim();
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--thaw-after", "60"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    // The agent takes the thaw in and does not act on it until it is killed.
    sim.state().silent.push("guest-fsfreeze-thaw".into());
    let mut thaw = Command::new(evesnap_tests::bin("qga-thaw"))
        .args(["--timeout", "30"])
        .env("EVESNAP_RUN_DIR", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qga-thaw");
    thaw.stdin
        .take()
        .expect("stdin")
        .write_all(doc.to_json().as_bytes())
        .expect("document");
    let since = Instant::now();
    while !sim.state().log.iter().any(|c| c == "guest-fsfreeze-thaw") {
        assert!(since.elapsed() < Duration::from_secs(10), "no thaw sent");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Long past any watch of a pipe: only its registration with the watchdog is left.
    std::thread::sleep(Duration::from_secs(1));
    sim.state().silent.clear();
    thaw.kill().expect("kill qga-thaw");
    let _ = thaw.wait();
    let took = thawed_within_prompt(&sim);
    assert!(
        watchdog_log(&dir).contains("before passing its own on or thawing"),
        "thawed {took:?} after qga-thaw was killed: {}",
        watchdog_log(&dir)
    );
}

#[test]
fn a_thaw_that_keeps_the_watchdog_leaves_it_armed() {
    let dir = RunDir::new("keep");
    let (_agent, sim, address) = sim();
    let out = run(
        Path::new(FREEZE),
        &["--agent", &address, "--thaw-after", "30"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    let watchdog = doc.steps[0].fields["watchdog"].clone();
    let out = run(
        &evesnap_tests::bin("qga-thaw"),
        &["--keep-watchdog"],
        Some(&doc.to_json()),
        &dir,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(sim.state().frozen, 0);
    std::thread::sleep(Duration::from_millis(300));
    let pid = watchdog["pid"].as_u64().expect("pid");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        !stat.is_empty() && !stat.contains(") Z "),
        "the watchdog is still armed: {}",
        watchdog_log(&dir)
    );
    assert!(Path::new(watchdog["state_file"].as_str().expect("state")).exists());
}
