//! EVE's retention for plans with an `app`: `max_snapshots` sets of the app's volumes, the
//! oldest destroyed first, room made before the create (or after, by the plan's choice);
//! held, foreign and guest snapshots never counted or destroyed.

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, SimState};
use serde_json::{json, Value};

use crate::by_id::{eve_plan, eve_pool, ours, zvol, VOL0, VOL1};
use crate::support::*;

/// Sets `a` (txg 10), `b` (20), `c` (30) on both zvols; an older held set `h` (5), a
/// foreign snapshot (6, no evesnap properties) and a guest's (7) on VOL0.
fn crowded() -> Value {
    let mut state = eve_pool();
    for (v, g) in [(VOL0, 1), (VOL1, 3)] {
        for (set, txg) in [("a", 10), ("b", 20), ("c", 30), ("h", 5)] {
            let id = format!("00000000-0000-4000-8000-00000000000{}", txg / 5);
            add_snapshot(
                &mut state,
                &format!("{}@{set}", zvol(v, g)),
                txg,
                ours(&id, "filesystem"),
            );
        }
    }
    state["snapshots"][format!("{}@h", zvol(VOL1, 3))]["userrefs"] = json!(1);
    add_snapshot(
        &mut state,
        &format!("{}@manual", zvol(VOL0, 1)),
        6,
        json!({}),
    );
    let guest = json!({"org.lfedge.evesnap:id": "00000000-0000-4000-8000-0000000000aa",
                       "org.lfedge.evesnap:origin": "guest"});
    add_snapshot(&mut state, &format!("{}@guest", zvol(VOL0, 1)), 7, guest);
    state
}

fn left(zfs: &FakeZfs) -> Vec<String> {
    let mut names: Vec<String> = zfs
        .snapshots()
        .into_iter()
        .map(|s| s.split_once('@').map(|(_, n)| n.to_string()).unwrap_or(s))
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn max_snapshots_per_app_makes_room_before_the_create() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&crowded());
    let run = run(
        &eve_plan(&agent.address.to_string(), json!({"max_snapshots": 3})),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let tools: Vec<&str> = steps(&run).into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        tools,
        [
            "retention",
            "preflight",
            "guest_pre",
            "qga-freeze",
            "zsnap",
            "qga-thaw"
        ]
    );
    // a, b, c counted (h held, manual foreign, guest the guest's): keep 2 before the
    // create, so `a` goes, oldest first, on both volumes.
    let retention = &run.report.steps[0];
    assert_eq!(
        retention.fields["destroyed"],
        json!([
            format!("{}@a", zvol(VOL0, 1)),
            format!("{}@a", zvol(VOL1, 3))
        ])
    );
    let name = format!("evesnap-{}", crate::by_id::ID);
    assert_eq!(left(&zfs), ["b", "c", &name, "guest", "h", "manual"]);
    // The destroys came before the snapshot.
    let calls = zfs.calls();
    let first_snapshot = calls
        .iter()
        .position(|c| c[0] == "snapshot" && c.len() > 1)
        .expect("snapshot");
    let last_destroy = calls
        .iter()
        .rposition(|c| c[0] == "destroy")
        .expect("destroy");
    assert!(last_destroy < first_snapshot, "{calls:?}");
}

#[test]
fn retention_after_the_create_is_the_plans_other_order() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&crowded());
    let extra = json!({"max_snapshots": 2, "retention": "after_create"});
    let run = run(&eve_plan(&agent.address.to_string(), extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let tools: Vec<&str> = steps(&run).into_iter().map(|(t, _)| t).collect();
    assert_eq!(tools.last(), Some(&"retention"));
    // a, b, c and the new set counted, 2 kept: a and b go.
    let name = format!("evesnap-{}", crate::by_id::ID);
    assert_eq!(left(&zfs), ["c", &name, "guest", "h", "manual"]);
}

#[test]
fn a_create_refused_for_its_agent_destroys_nothing() {
    // Room is made once the agent and the guest's freeze state have passed the preflight:
    // a create refused there keeps every set.
    let zfs = FakeZfs::new(&crowded());
    let extra = json!({"max_snapshots": 3, "freeze": {"timeout_s": 0.3}});
    let run = run(&eve_plan(&no_agent(), extra), &zfs);

    assert_eq!(exit(&run), Exit::AgentUnreachable, "{:?}", run.error);
    assert_eq!(left(&zfs), ["a", "b", "c", "guest", "h", "manual"]);
    assert!(zfs.calls_of("destroy").is_empty());
}
