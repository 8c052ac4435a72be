//! `qga-thaw` against a simulated agent: it thaws whatever the upstream says, and its exit
//! code reports the pipeline's failure.

use std::path::Path;

use evesnap::qga::testing::{FakeAgent, SimState};
use evesnap::steps::{NotThawed, ThawReport};
use evesnap_tests::run::{code, doc_of, run, stderr, RunDir};

const THAW: &str = env!("CARGO_BIN_EXE_qga-thaw");

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
    let out = run(Path::new(THAW), &["--agent", &address], None, &dir);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["thawed"], 2);
    assert_eq!(doc.steps[0].fields["expected"], serde_json::Value::Null);
    assert_eq!(sim.state().frozen, 0);
    let report: ThawReport = doc.steps[0].record().expect("a strict ThawReport");
    assert!(!report.early_thaw && !doc.steps[0].fields.contains_key("early_thaw"));
}

#[test]
fn fewer_thawed_than_frozen_is_an_early_thaw_record() {
    let dir = RunDir::new("early");
    let (_agent, _sim, address) = frozen_sim();
    let upstream = format!(
        r#"{{"version":1,"ok":true,"agent":"{address}","steps":[
        {{"tool":"qga-freeze","ok":true,"started_at":"x","duration_ms":1,"frozen":3,
          "mountpoints":null,"adopted":false,"agent_version":"7.2.0","freeze_ms":1.0,
          "frozen_at_unix_us":1,"watchdog":null}}],"error":null}}"#
    );
    let out = run(Path::new(THAW), &[], Some(&upstream), &dir);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let step = &doc_of(&out).steps[1];
    assert_eq!(step.fields["early_thaw"], true);
    let report: ThawReport = step.record().expect("a strict ThawReport");
    assert_eq!(
        (report.thawed, report.expected, report.early_thaw),
        (2, Some(3), true)
    );
}

#[test]
fn bad_input_still_thaws_then_reports_it() {
    let dir = RunDir::new("garbage");
    let (_agent, sim, address) = frozen_sim();
    let out = run(
        Path::new(THAW),
        &["--agent", &address],
        Some("{\"version\": 1, \"ok\": tr"),
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
    let out = run(Path::new(THAW), &["--agent", &address], Some(""), &dir);
    assert_eq!(code(&out), 5, "{}", stderr(&out));
    assert_eq!(sim.state().frozen, 0);
}

#[test]
fn an_upstream_failure_still_thaws_and_exits_upstream_failed() {
    let dir = RunDir::new("upfail");
    let (_agent, sim, address) = frozen_sim();
    let upstream = format!(
        r#"{{"version":1,"ok":false,"agent":"{address}","steps":[
        {{"tool":"qga-freeze","ok":true,"started_at":"x","duration_ms":1,"frozen":2,
          "mountpoints":null,"adopted":false,"agent_version":"7.2.0","freeze_ms":1.0,
          "frozen_at_unix_us":1,"watchdog":null}},
        {{"tool":"zsnap","ok":false,"started_at":"x","duration_ms":1}}],
        "error":{{"tool":"zsnap","kind":"step-failed","message":"out of space"}}}}"#
    );
    let out = run(Path::new(THAW), &[], Some(&upstream), &dir);
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
        Path::new(THAW),
        &["--agent", &address, "--timeout", "0.5"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["possibly_frozen"], true);
    let step: NotThawed = doc.steps[0].record().expect("a strict NotThawed");
    assert_eq!(
        (step.possibly_frozen, step.early_thaw),
        (Some(true), Some(false))
    );
    assert!(
        stderr(&out).contains("may still be frozen"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unreachable_agent_exits_thaw_failed() {
    let dir = RunDir::new("unreach");
    let missing = dir.path().join("none.sock");
    let out = run(
        Path::new(THAW),
        &["--agent", &missing.to_string_lossy(), "--timeout", "0.3"],
        None,
        &dir,
    );
    assert_eq!(code(&out), 6, "{}", stderr(&out));
}

#[test]
fn no_agent_is_a_usage_error() {
    let dir = RunDir::new("noagent");
    let out = run(Path::new(THAW), &[], None, &dir);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = run(
        Path::new(THAW),
        &[],
        Some("{\"version\":1,\"ok\":true}"),
        &dir,
    );
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}
