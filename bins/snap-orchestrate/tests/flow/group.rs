//! Consistency groups (`flow/group/`): several VMs frozen in parallel around one atomic
//! snapshot; a required VM's failure fails the group with every VM thawed and nothing left.

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, Sim, SimState};
use evesnap::report::Consistency;
use serde_json::{json, Value};
use snap_orchestrate::flow::Finished;
use snap_orchestrate::GroupPlan;

use crate::support::*;

const VM1_DS0: &str = "tank/vm1/disk0";
const VM1_DS1: &str = "tank/vm1/disk1";

/// A pool with both VMs' volumes (OpenZFS: one multi-name snapshot).
fn two_vm_pool() -> Value {
    let mut state = pool(&[DS0, DS1, VM1_DS0, VM1_DS1]);
    state["datasets"]["tank/vm1"] = state["datasets"]["tank/vm0"].clone();
    state
}

/// A group plan of `vms` (`[agent, datasets, extra]`), snapshot [`NAME`], agent calls
/// limited to 2 s, no watchdog.
fn group(vms: &[(&str, &[&str], Value)]) -> GroupPlan {
    let vms: Vec<Value> = vms
        .iter()
        .map(|(agent, datasets, extra)| {
            let mut vm = json!({"agent": agent, "datasets": datasets});
            for (k, v) in extra.as_object().expect("an object") {
                vm[k] = v.clone();
            }
            vm
        })
        .collect();
    let plan = json!({"version": 1, "snapshot": NAME, "vms": vms,
                      "freeze": {"timeout_s": 2, "thaw_after_s": 0}});
    GroupPlan::from_json(&plan.to_string()).expect("a valid group plan")
}

fn run_group(plan: &GroupPlan, zfs: &FakeZfs) -> Finished {
    run_dir();
    let finished = snap_orchestrate::flow::execute_group(plan, &zfs.zfs());
    for vm in &plan.vms {
        let key = evesnap::runtime::file_key(&vm.agent);
        let _ = std::fs::remove_file(run_dir().join("locks").join(format!("{key}.lock")));
    }
    finished
}

fn thawed_after_freezing(sim: &Sim) -> bool {
    sim.state().frozen == 0
        && at(sim, "guest-fsfreeze-freeze") < last_at(sim, "guest-fsfreeze-thaw")
}

fn consistency_of(zfs: &FakeZfs, dataset: &str) -> Value {
    zfs.state()["snapshots"][snap(dataset)]["props"][CONSISTENCY].clone()
}

#[test]
fn two_vms_are_frozen_around_one_atomic_snapshot_of_all_their_volumes() {
    let ((a, sim_a), (b, sim_b)) = (with_app(), with_app());
    let zfs = FakeZfs::new(&two_vm_pool());
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], quiesce_and_resume()),
        (&b.address.to_string(), &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", true), ("zsnap", true)]);
    let taken = zfs.calls_of("snapshot");
    assert_eq!(taken.len(), 1, "one zfs call for the group: {taken:?}");
    let all: Vec<String> = [DS0, DS1, VM1_DS0, VM1_DS1].map(snap).to_vec();
    assert_eq!(taken[0][taken[0].len() - 4..], all);
    let snapshots = run.report.snapshots.as_ref().expect("snapshots");
    assert_eq!(snapshots.len(), 4);
    assert!(snapshots
        .iter()
        .all(|s| s.createtxg == snapshots[0].createtxg));
    for sim in [&sim_a, &sim_b] {
        assert!(thawed_after_freezing(sim));
        // Each freeze was checked while the snapshot ran, before its thaw.
        assert_eq!(sim.after_freeze(1), ["guest-fsfreeze-status"]);
    }
    assert!(
        at(&sim_a, "guest-exec /usr/bin/app-ctl quiesce") < at(&sim_a, "guest-fsfreeze-freeze")
    );
    assert!(
        last_at(&sim_a, "guest-fsfreeze-thaw") < at(&sim_a, "guest-exec /usr/bin/app-ctl resume")
    );

    let vms = run.report.vms.as_ref().expect("vms");
    assert_eq!(vms.len(), 2);
    assert_eq!(vms[0].consistency, Some(Consistency::Application));
    assert_eq!(vms[1].consistency, Some(Consistency::Filesystem));
    for vm in vms {
        assert!(vm.ok && vm.error.is_none(), "{vm:?}");
        assert_eq!(vm.frozen, Some(3));
        assert!(vm.freeze_window_ms.is_some());
    }
    let tools: Vec<&str> = vms[0].steps.iter().map(|s| s.tool.as_str()).collect();
    assert_eq!(
        tools,
        [
            "preflight",
            "guest_pre",
            "qga-freeze",
            "qga-thaw",
            "guest_post"
        ]
    );
    // The group's window spans each VM's.
    let window = run.report.freeze_window_ms.expect("group window");
    assert!(vms.iter().all(|vm| vm.freeze_window_ms.unwrap() <= window));
    assert_eq!(run.report.consistency, Some(Consistency::Filesystem));
    // Each VM's snapshots claim what its own VM proved.
    assert_eq!(consistency_of(&zfs, DS1), "application");
    assert_eq!(consistency_of(&zfs, VM1_DS0), "filesystem");
    assert_eq!(
        zfs.state()["snapshots"][snap(VM1_DS1)]["props"]["org.lfedge.evesnap:frozen"],
        "true"
    );
}

#[test]
fn a_required_vm_without_agent_fails_the_group_before_anything_is_frozen() {
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&two_vm_pool());
    let dead = no_agent();
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&dead, &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::AgentUnreachable, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("preflight"));
    let error = run.report.error.as_ref().expect("error");
    assert!(error.message.contains(&dead), "names the VM: {error:?}");
    assert!(!got(&sim_a, "guest-fsfreeze-freeze"));
    assert!(zfs.snapshots().is_empty() && zfs.calls_of("snapshot").is_empty());
    let vms = run.report.vms.as_ref().expect("vms");
    assert!(vms[0].ok && !vms[1].ok && vms[1].consistency.is_none());
}

#[test]
fn a_required_vm_whose_freeze_fails_thaws_every_vm_and_leaves_nothing() {
    let (a, sim_a) = with_app();
    let (b, sim_b) = FakeAgent::simulated(SimState {
        failing: vec![(
            "guest-fsfreeze-freeze".into(),
            "failed to freeze /data0: Operation not supported".into(),
        )],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&two_vm_pool());
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], quiesce_and_resume()),
        (&b.address.to_string(), &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("freeze"));
    assert!(thawed_after_freezing(&sim_a), "{:?}", sim_a.state().log);
    assert!(
        last_at(&sim_a, "guest-fsfreeze-thaw") < at(&sim_a, "guest-exec /usr/bin/app-ctl resume")
    );
    assert_eq!(sim_b.state().frozen, 0);
    assert!(zfs.calls_of("snapshot").is_empty() && zfs.snapshots().is_empty());
    assert_eq!(run.report.consistency, None);
}

#[test]
fn a_required_vm_whose_freeze_does_not_verify_destroys_the_group_snapshot() {
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let (b, sim_b) = FakeAgent::simulated(SimState {
        thawed_by_another_client: true,
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&two_vm_pool());
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&b.address.to_string(), &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("freeze"));
    assert!(thawed_after_freezing(&sim_a));
    assert_eq!(sim_b.state().frozen, 0);
    assert!(zfs.snapshots().is_empty(), "{:?}", zfs.snapshots());
    assert!(run.report.snapshots.is_none());
}

#[test]
fn a_vm_that_is_not_required_is_left_out_and_claims_crash() {
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&two_vm_pool());
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&no_agent(), &[VM1_DS0, VM1_DS1], json!({"required": false})),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert!(thawed_after_freezing(&sim_a));
    let vms = run.report.vms.as_ref().expect("vms");
    assert_eq!(vms[0].consistency, Some(Consistency::Filesystem));
    assert_eq!(vms[1].consistency, Some(Consistency::Crash));
    assert!(!vms[1].ok && vms[1].error.is_some() && vms[1].frozen.is_none());
    assert_eq!(run.report.consistency, Some(Consistency::Crash));
    assert_eq!(consistency_of(&zfs, DS0), "filesystem");
    assert_eq!(consistency_of(&zfs, VM1_DS0), "crash");
}

#[test]
fn a_failed_group_snapshot_thaws_every_vm_and_guest_post_runs() {
    let ((a, sim_a), (b, sim_b)) = (with_app(), with_app());
    let mut state = two_vm_pool();
    state["faults"]["snapshot"] = json!({"stderr": "cannot create snapshots : out of space\n"});
    let zfs = FakeZfs::new(&state);
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], quiesce_and_resume()),
        (
            &b.address.to_string(),
            &[VM1_DS0, VM1_DS1],
            quiesce_and_resume(),
        ),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("snapshot"));
    for sim in [&sim_a, &sim_b] {
        assert!(thawed_after_freezing(sim));
        assert!(got(sim, "guest-exec /usr/bin/app-ctl resume"));
    }
    assert!(zfs.snapshots().is_empty());
}

#[test]
fn a_busy_vm_fails_the_group_before_any_vm_is_touched() {
    let ((a, sim_a), (b, sim_b)) = (with_app(), with_app());
    let zfs = FakeZfs::new(&two_vm_pool());
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&b.address.to_string(), &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    let held = hold_lock(&plan.member(1));
    let run = run_group(&plan, &zfs);
    drop(held);

    assert_eq!(exit(&run), Exit::Busy, "{:?}", run.error);
    assert!(sim_a.state().log.is_empty() && sim_b.state().log.is_empty());
    // Released: the next run takes the first VM's lock again.
    let again = hold_lock(&plan.member(0));
    drop(again);
}

#[test]
fn volumes_that_zfs_fuse_cannot_snapshot_at_once_are_refused_before_the_freeze() {
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let (b, sim_b) = FakeAgent::simulated(SimState::default());
    let mut state = two_vm_pool();
    state["flavour"] = json!("zfs-fuse");
    let zfs = FakeZfs::new(&state);
    // tank/vm1/disk1 is below the common parent but not in the group.
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&b.address.to_string(), &[VM1_DS0], json!({})),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert!(!got(&sim_a, "guest-fsfreeze-freeze") && !got(&sim_b, "guest-fsfreeze-freeze"));
    assert!(zfs.calls_of("snapshot").is_empty());
}

#[test]
fn on_zfs_fuse_the_group_is_one_recursive_snapshot_and_the_datasets_between_lose_theirs() {
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let (b, sim_b) = FakeAgent::simulated(SimState::default());
    let mut state = two_vm_pool();
    state["flavour"] = json!("zfs-fuse");
    let zfs = FakeZfs::new(&state);
    let plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&b.address.to_string(), &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    let taken = zfs.calls_of("snapshot");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert!(taken[0].contains(&"-r".to_string()) && taken[0].contains(&"tank@s1".to_string()));
    let mut left = zfs.snapshots();
    left.sort();
    assert_eq!(left, [DS0, DS1, VM1_DS0, VM1_DS1].map(snap));
    assert!(thawed_after_freezing(&sim_a) && thawed_after_freezing(&sim_b));
}

#[test]
fn a_hung_group_snapshot_thaws_every_vm_at_the_timeout_and_leaves_nothing() {
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let (b, sim_b) = FakeAgent::simulated(SimState::default());
    let mut state = two_vm_pool();
    state["faults"]["snapshot"] = json!({"sleep": 1.5});
    let zfs = FakeZfs::new(&state);
    let mut plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&b.address.to_string(), &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    plan.freeze.timeout_s = 0.5;
    let run = run_group(&plan, &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("snapshot"));
    for sim in [&sim_a, &sim_b] {
        assert!(thawed_after_freezing(sim));
    }
    let window = run.report.freeze_window_ms.expect("thawed");
    assert!(window < 1400.0, "thawed before zfs returned: {window} ms");
    assert!(zfs.snapshots().is_empty(), "{:?}", zfs.snapshots());
}

#[test]
fn sigterm_while_the_group_snapshot_hangs_thaws_every_vm_and_ends_the_run() {
    use crate::signal::{spawn, terminate, wait_for_call, BOUND, HANG};
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let (b, sim_b) = FakeAgent::simulated(SimState::default());
    let mut state = two_vm_pool();
    state["faults"]["snapshot"] = json!({"sleep": HANG});
    let zfs = FakeZfs::new(&state);
    let mut plan = group(&[
        (&a.address.to_string(), &[DS0, DS1], json!({})),
        (&b.address.to_string(), &[VM1_DS0, VM1_DS1], json!({})),
    ]);
    plan.freeze.timeout_s = 30.0;
    let mut child = spawn(&zfs, &serde_json::to_value(&plan).expect("plan"));
    wait_for_call(&zfs, &mut child, "snapshot");
    let (took, code, report) = terminate(child);

    assert!(took < BOUND, "ended {took:?} after SIGTERM: {report}");
    assert_ne!(code, 0, "{report}");
    assert_eq!(report["error"]["step"], "snapshot", "{report}");
    for sim in [&sim_a, &sim_b] {
        assert!(thawed_after_freezing(sim));
    }
    assert!(zfs.snapshots().is_empty(), "{:?}", zfs.snapshots());
    for i in 0..2 {
        drop(hold_lock(&plan.member(i)));
    }
}

#[test]
fn a_group_takes_its_vms_locks_in_one_order_whatever_the_plans_order() {
    let (a, sim_a) = FakeAgent::simulated(SimState::default());
    let (b, sim_b) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&two_vm_pool());
    let (a, b) = (a.address.to_string(), b.address.to_string());
    // The order locks are taken in: by the normalised address.
    let (first, last) = if a < b { (&a, &b) } else { (&b, &a) };
    let datasets = |agent: &str| {
        if agent == a {
            [DS0, DS1]
        } else {
            [VM1_DS0, VM1_DS1]
        }
    };
    let mut plan = group(&[
        (last, &datasets(last), json!({})),
        (first, &datasets(first), json!({})),
    ]);
    plan.lock_wait_s = 30.0;
    let held = hold_lock(&plan.member(0));
    let vm = |agent: &str| agent.parse::<evesnap::qga::Address>().expect("address");
    let run = std::thread::scope(|scope| {
        let run = scope.spawn(|| run_group(&plan, &zfs));
        // It waits for the VM held, holding the one before it in the order: two groups
        // sharing VMs never hold one each of what the other waits for.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while snap_orchestrate::lock::lock_vm(&vm(first)).is_ok() {
            assert!(
                std::time::Instant::now() < until,
                "the first VM is never locked"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!got(&sim_a, "guest-fsfreeze") && !got(&sim_b, "guest-fsfreeze"));
        drop(held);
        run.join().expect("the group")
    });

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert!(thawed_after_freezing(&sim_a) && thawed_after_freezing(&sim_b));
}
