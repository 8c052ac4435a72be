//! `guest_post` a run could not run (the agent went silent): recorded as pending, the
//! report says so, and `snap-orchestrate recover` runs each command once the agent answers.

use evesnap::exit::Exit;
use evesnap::qga::watchdog;
use evesnap::report::GuestPost;
use serde_json::Value;
use snap_orchestrate::recover::{run as recover, RecoverArgs};

use crate::support::*;

const RESUME: &str = "guest-exec /usr/bin/app-ctl resume";

fn resumes(sim: &evesnap::qga::testing::Sim) -> usize {
    sim.state().log.iter().filter(|c| *c == RESUME).count()
}

fn recover_now(agent: &str) -> (Exit, Value) {
    run_dir();
    let args = RecoverArgs {
        agent: agent.to_string(),
        timeout: std::time::Duration::from_secs(2),
        lock_wait: std::time::Duration::ZERO,
    };
    let outcome = recover(&args);
    let exit = outcome.exit();
    let document = outcome.document.expect("a document");
    (exit, serde_json::to_value(&document).expect("JSON"))
}

#[test]
fn a_silent_thaw_leaves_guest_post_pending_and_recover_runs_it_once() {
    let (agent, sim) = with_app();
    sim.state().silent = vec!["guest-fsfreeze-thaw".into()];
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let address = agent.address.to_string();
    let run = run(&plan(&address, &[DS0], quiesce_and_resume()), &zfs);
    // The run arms a watchdog to run them; this test runs them itself.
    let _ = watchdog::cancel(&agent.address);

    assert!(
        matches!(exit(&run), Exit::AgentTimeout | Exit::ThawFailed),
        "{:?}",
        run.error
    );
    assert_eq!(run.report.guest_post, Some(GuestPost::Pending));
    let record = evesnap::pending::load(&agent.address)
        .expect("readable")
        .expect("a pending record");
    assert_eq!(record.id, run.report.id.to_string());
    assert_eq!(record.commands.len(), 1);
    assert_eq!(record.commands[0].path, APP_CTL);
    assert_eq!(record.commands[0].args, ["resume"]);
    assert_eq!(resumes(&sim), 0);
    // The report as a document says it too.
    let document = serde_json::to_value(&run.report).expect("JSON");
    assert_eq!(document["guest_post"], "pending");

    // Still frozen: nothing runs, nothing is spent.
    sim.state().silent.clear();
    let (code, document) = recover_now(&address);
    assert_eq!(code, Exit::Preflight, "{document}");
    assert_eq!(document["guest_post"], "pending");
    assert!(evesnap::pending::any(&agent.address));
    assert_eq!(resumes(&sim), 0);

    // Thawed (the watchdog's work): recover runs it, once.
    sim.state().frozen = 0;
    let (code, document) = recover_now(&address);
    assert_eq!(code, Exit::Success, "{document}");
    assert_eq!(document["guest_post"], "ran");
    assert_eq!(document["id"], run.report.id.to_string());
    assert_eq!(document["steps"][0]["tool"], "guest_post");
    assert_eq!(document["steps"][0]["commands"][0]["args"][0], "resume");
    assert_eq!(resumes(&sim), 1);
    assert!(!evesnap::pending::any(&agent.address));

    let (code, document) = recover_now(&address);
    assert_eq!(code, Exit::Success, "{document}");
    assert!(document.get("guest_post").is_none(), "{document}");
    assert_eq!(resumes(&sim), 1);
}

#[test]
fn recover_without_an_agent_keeps_the_record() {
    run_dir();
    let agent = no_agent();
    let address = agent.parse().expect("address");
    let recorded = evesnap::pending::record(
        &address,
        "run-1",
        &[evesnap::pending::PendingCommand {
            path: APP_CTL.into(),
            args: vec!["resume".into()],
            timeout_s: 5.0,
        }],
    );
    assert!(recorded.is_ok(), "{recorded:?}");
    let (code, document) = recover_now(&agent);
    assert_eq!(code, Exit::AgentUnreachable, "{document}");
    assert_eq!(document["guest_post"], "pending");
    assert!(evesnap::pending::any(&address));
    let _ = std::fs::remove_file(evesnap::pending::path(&address));
}

#[test]
fn a_run_that_reaches_guest_post_says_it_ran_and_records_nothing() {
    let (agent, sim) = with_app();
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(
        &plan(&agent.address.to_string(), &[DS0], quiesce_and_resume()),
        &zfs,
    );
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.guest_post, Some(GuestPost::Ran));
    assert!(!evesnap::pending::any(&agent.address));
    assert_eq!(resumes(&sim), 1);
}
