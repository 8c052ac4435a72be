//! `action: create` refused before anything changes: no agent, an agent that cannot
//! freeze, a guest frozen already, the zfs preflight, another run on the VM.

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, SimState};
use evesnap::zfs::Problem;
use serde_json::json;

use crate::support::*;

#[test]
fn without_an_agent_a_required_freeze_fails_the_run_unreachable() {
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let extra = json!({"freeze": {"timeout_s": 0.3}});
    let run = run(&plan(&no_agent(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::AgentUnreachable, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("preflight"));
    assert_eq!(
        run.report.error.as_ref().map(|e| e.kind.as_str()),
        Some("agent-unreachable")
    );
    // Only read (the capability probe, whether the plan's id exists already): nothing
    // changed.
    let calls = zfs.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.len() == 1 || c[0] == "list" || c[0] == "get"),
        "{calls:?}"
    );
}

#[test]
fn an_agent_without_the_freeze_command_is_refused_before_anything_changes() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        missing: vec!["guest-fsfreeze-freeze".into()],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(&plan(&agent.address.to_string(), &[DS0], json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    assert!(!got(&sim, "guest-fsfreeze-freeze") && !got(&sim, "guest-fsfreeze-thaw"));
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn a_guest_frozen_already_is_refused_and_left_as_it_is() {
    let (agent, sim) = FakeAgent::simulated(SimState {
        frozen: 3,
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let run = run(&plan(&agent.address.to_string(), &[DS0], json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("preflight"));
    // Someone else's freeze: not ours to thaw.
    assert!(!got(&sim, "guest-fsfreeze-thaw"), "{:?}", sim.state().log);
    assert_eq!(sim.state().frozen, 3);
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn a_missing_dataset_is_refused_before_the_guest_is_touched() {
    let (agent, sim) = with_app();
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let gone = "tank/vm0/gone";
    let run = run(
        &plan(
            &agent.address.to_string(),
            &[DS0, gone],
            quiesce_and_resume(),
        ),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    assert_eq!(
        problems(&run),
        [Problem::Missing {
            dataset: gone.into()
        }]
    );
    assert!(!got(&sim, "guest-exec") && !got(&sim, "guest-fsfreeze-freeze"));
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn no_room_for_the_snapshot_is_refused_before_the_guest_is_touched() {
    let (agent, sim) = with_app();
    // A thick volume: 600 MiB written of its 1 GiB reservation, 500 MiB available of
    // which 424 MiB are its own unused reservation. The snapshot needs the 600 MiB.
    let mut state = pool(&[DS0]);
    let volume = &mut state["datasets"][DS0];
    volume["usedbydataset"] = json!(600u64 << 20);
    volume["refreservation"] = json!(1u64 << 30);
    volume["usedbyrefreservation"] = json!(424u64 << 20);
    volume["available"] = json!(500u64 << 20);
    let zfs = FakeZfs::new(&state);
    let run = run(
        &plan(&agent.address.to_string(), &[DS0], quiesce_and_resume()),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    match &problems(&run)[..] {
        [Problem::NoRoom {
            dataset, available, ..
        }] => assert_eq!((dataset.as_str(), *available), (DS0, 76u64 << 20)),
        other => panic!("{other:?}"),
    }
    assert!(!got(&sim, "guest-exec") && !got(&sim, "guest-fsfreeze-freeze"));
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn a_second_orchestration_of_the_same_vm_is_refused_busy() {
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&pool(&[DS0]));
    let plan = plan(&agent.address.to_string(), &[DS0], json!({}));
    let _first = hold_lock(&plan);
    let run = run(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Busy, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("preflight"));
    assert!(sim.state().log.is_empty(), "{:?}", sim.state().log);
    assert!(zfs.calls().is_empty(), "{:?}", zfs.calls());
}
