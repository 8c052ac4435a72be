//! `qga-thaw` against a simulated agent: it thaws whatever the upstream says, and its exit
//! code reports the pipeline's failure.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use evesnap::document::Document;
use evesnap::qga::testing::{FakeAgent, SimState};

const THAW: &str = env!("CARGO_BIN_EXE_qga-thaw");

struct RunDir(PathBuf);

impl RunDir {
    fn new(name: &str) -> RunDir {
        let dir = std::env::temp_dir().join(format!("evesnap-qt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("run dir");
        RunDir(dir)
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

enum Input<'a> {
    Null,
    Text(&'a str),
}

fn run(args: &[&str], input: Input<'_>, dir: &RunDir) -> Output {
    let mut child = Command::new(THAW)
        .args(args)
        .env("EVESNAP_RUN_DIR", &dir.0)
        .stdin(match input {
            Input::Null => Stdio::null(),
            Input::Text(_) => Stdio::piped(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Input::Text(text) = input {
        let mut pipe = child.stdin.take().expect("stdin");
        let _ = pipe.write_all(text.as_bytes());
    }
    child.wait_with_output().expect("wait")
}

fn doc_of(out: &Output) -> Document {
    let text = String::from_utf8_lossy(&out.stdout);
    Document::from_json(&text).unwrap_or_else(|e| panic!("no document ({e}): {text}"))
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn frozen_sim() -> (FakeAgent, evesnap::qga::testing::Sim, String) {
    let (agent, sim) = FakeAgent::simulated(SimState {
        frozen: 2,
        ..SimState::default()
    });
    let address = agent.address.to_string();
    (agent, sim, address)
}

#[test]
fn thaws_with_agent_flag_and_no_upstream() {
    let dir = RunDir::new("plain");
    let (_agent, sim, address) = frozen_sim();
    let out = run(&["--agent", &address], Input::Null, &dir);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["thawed"], 2);
    assert_eq!(doc.steps[0].fields["expected"], serde_json::Value::Null);
    assert_eq!(sim.state().frozen, 0);
}

#[test]
fn bad_input_still_thaws_then_reports_it() {
    let dir = RunDir::new("garbage");
    let (_agent, sim, address) = frozen_sim();
    let out = run(
        &["--agent", &address],
        Input::Text("{\"version\": 1, \"ok\": tr"),
        &dir,
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert_eq!(sim.state().frozen, 0, "thawed first");
    assert!(
        stderr(&out).contains("upstream document"),
        "{}",
        stderr(&out)
    );
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["thawed"], 2);
    assert!(!doc.ok);
}

#[test]
fn a_dead_upstream_still_thaws_and_exits_upstream_failed() {
    let dir = RunDir::new("dead");
    let (_agent, sim, address) = frozen_sim();
    let out = run(&["--agent", &address], Input::Text(""), &dir);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert_eq!(sim.state().frozen, 0);
}

#[test]
fn an_upstream_failure_still_thaws_and_exits_upstream_failed() {
    let dir = RunDir::new("upfail");
    let (_agent, sim, address) = frozen_sim();
    let upstream = format!(
        r#"{{"version":1,"ok":false,"agent":"{address}","steps":[
        {{"tool":"qga-freeze","ok":true,"started_at":"x","duration_ms":1,"frozen":2}},
        {{"tool":"zsnap","ok":false,"started_at":"x","duration_ms":1}}],
        "error":{{"tool":"zsnap","kind":"step-failed","message":"out of space"}}}}"#
    );
    let out = run(&[], Input::Text(&upstream), &dir);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert_eq!(sim.state().frozen, 0);
    let doc = doc_of(&out);
    let step = &doc.steps[2];
    assert_eq!((step.tool.as_str(), step.ok), ("qga-thaw", true));
    assert_eq!(step.fields["thawed"], 2);
    assert_eq!(doc.error.as_ref().map(|e| e.tool.as_str()), Some("zsnap"));
}

#[test]
fn an_agent_that_does_not_answer_the_thaw_exits_thaw_failed() {
    let dir = RunDir::new("silent");
    let mut state = SimState {
        frozen: 2,
        ..SimState::default()
    };
    state.silent.push("guest-fsfreeze-thaw".into());
    let (agent, _sim) = FakeAgent::simulated(state);
    let address = agent.address.to_string();
    let out = run(
        &["--agent", &address, "--timeout", "0.5"],
        Input::Null,
        &dir,
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["possibly_frozen"], true);
    assert!(
        stderr(&out).contains("may still be frozen"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unreachable_agent_exits_thaw_failed() {
    let dir = RunDir::new("unreach");
    let missing = dir.0.join("none.sock");
    let out = run(
        &["--agent", &missing.to_string_lossy(), "--timeout", "0.3"],
        Input::Null,
        &dir,
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
}

#[test]
fn no_agent_is_a_usage_error() {
    let dir = RunDir::new("noagent");
    let out = run(&[], Input::Null, &dir);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = run(&[], Input::Text("{\"version\":1,\"ok\":true}"), &dir);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}
