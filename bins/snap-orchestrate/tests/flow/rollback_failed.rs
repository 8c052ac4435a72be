//! `action: rollback` failing once the guest may be touched: nothing is rolled back unless
//! the guest let go of the volumes, and whatever fails, the guest gets its `guest_post`.

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, Program, SimState};
use serde_json::json;

use crate::rollback::{lab_guest, rollback_calls, running, two_snapshots, umount_data0};
use crate::support::*;

#[test]
fn a_fatal_guest_pre_failure_is_undone_and_nothing_is_rolled_back() {
    let busy = Program {
        exitcode: 32,
        stderr: "umount: /data0: target is busy.\n".into(),
        ..Program::default()
    };
    let (agent, sim) = lab_guest(busy);
    let zfs = FakeZfs::new(&two_snapshots());
    let run = run(&running(&agent, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("guest_pre"));
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", false),
            ("guest_post", true)
        ]
    );
    assert_eq!(
        run.report.steps[1].fields["commands"][0]["stderr"],
        "umount: /data0: target is busy.\n"
    );
    assert!(at(&sim, "guest-exec /bin/umount") < at(&sim, "guest-exec /bin/mount"));
    assert!(!got(&sim, "guest-get-fsinfo"));
    assert!(rollback_calls(&zfs).is_empty() && zfs.calls_of("destroy").is_empty());
}

#[test]
fn a_failed_zfs_rollback_still_brings_the_guest_back() {
    let (agent, sim) = lab_guest(umount_data0());
    let mut state = two_snapshots();
    state["faults"]["rollback"] =
        json!({"stderr": format!("cannot rollback '{DS0}': dataset is busy\n")});
    let zfs = FakeZfs::new(&state);
    let run = run(&running(&agent, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("rollback"));
    assert_eq!(
        steps(&run)[3..],
        [("zrollback", false), ("guest_post", true)]
    );
    assert_eq!(run.report.rolled_back, None);
    assert!(at(&sim, "guest-get-fsinfo") < at(&sim, "guest-exec /bin/mount"));
    assert_eq!(rollback_calls(&zfs).len(), 1);
}

#[test]
fn a_running_vm_whose_agent_is_unreachable_is_refused_untouched() {
    let zfs = FakeZfs::new(&two_snapshots());
    let extra = json!({"action": "rollback", "rollback": {"to": "s1", "destroy_newer": true},
        "guest_post": [{"path": "/bin/mount", "args": ["/dev/vda", "/data0"]}],
        "disks": {DS0: {"pci": "0000:00:07.0"}}, "freeze": {"timeout_s": 0.3}});
    let run = run(&plan(&no_agent(), &[DS0], extra), &zfs);

    // Nothing else can show the volumes are unused: the agent is required.
    assert_eq!(exit(&run), Exit::AgentUnreachable, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    let error = run.report.error.as_ref().expect("error");
    assert!(
        error.message.contains("the guest agent is required"),
        "{error:?}"
    );
    assert!(rollback_calls(&zfs).is_empty() && zfs.calls_of("destroy").is_empty());
    assert_eq!(zfs.snapshots().len(), 2);
    assert_eq!(run.report.guest_post, None);
}

#[test]
fn a_dev_that_does_not_resolve_in_the_guest_is_refused_before_guest_pre() {
    // A mistyped path: `readlink -f` echoes it, `test -b` says it is no block device.
    let readlink = Program {
        stdout: "/dev/zvol/tank/vm0/disk9\n".into(),
        ..Program::default()
    };
    let (agent, sim) = FakeAgent::simulated(SimState {
        programs: vec![
            ("/bin/readlink".into(), readlink),
            ("/bin/test".into(), Program::exits(1)),
            ("/bin/umount".into(), Program::exits(0)),
            ("/bin/mount".into(), Program::exits(0)),
        ],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&two_snapshots());
    let extra = json!({"disks": {DS0: {"dev": "/dev/zvol/tank/vm0/disk9"}}});
    let run = run(&running(&agent, extra), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    assert_eq!(run.report.steps[0].fields["devices"], json!({}));
    let error = run.report.error.as_ref().expect("error");
    assert!(
        error
            .message
            .contains("`disks.tank/vm0/disk0.dev` does not resolve")
            && error.message.contains("not a block device"),
        "{error:?}"
    );
    assert!(got(
        &sim,
        "guest-exec /bin/test -b /dev/zvol/tank/vm0/disk9"
    ));
    // Nothing in the guest changed, so nothing is owed to it.
    assert!(!got(&sim, "guest-exec /bin/umount") && !got(&sim, "guest-exec /bin/mount"));
    assert!(rollback_calls(&zfs).is_empty());
}

#[test]
fn a_failing_guest_get_fsinfo_rolls_nothing_back_and_guest_post_runs() {
    let (agent, sim) = lab_guest(umount_data0());
    sim.state().failing = vec![(
        "guest-get-fsinfo".into(),
        "failed to open /proc/self/mountinfo: Too many open files".into(),
    )];
    let zfs = FakeZfs::new(&two_snapshots());
    let run = run(&running(&agent, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("unmounted"));
    let error = run.report.error.as_ref().expect("error");
    assert!(error.message.contains("guest-get-fsinfo"), "{error:?}");
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("unmounted", false),
            ("guest_post", true)
        ]
    );
    assert!(at(&sim, "guest-get-fsinfo") < at(&sim, "guest-exec /bin/mount"));
    assert!(rollback_calls(&zfs).is_empty() && zfs.calls_of("destroy").is_empty());
    assert_eq!(zfs.snapshots().len(), 2);
}

#[test]
fn a_failing_guest_post_after_the_rollback_fails_the_run_but_the_rollback_stands() {
    let (agent, sim) = lab_guest(umount_data0());
    let mount = Program {
        exitcode: 32,
        stderr: "mount: /data0: wrong fs type, bad option, bad superblock on /dev/vda.\n".into(),
        ..Program::default()
    };
    sim.state()
        .programs
        .retain(|(path, _)| path != "/bin/mount");
    sim.state().programs.push(("/bin/mount".into(), mount));
    let zfs = FakeZfs::new(&two_snapshots());
    let run = run(&running(&agent, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("guest_post"));
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("unmounted", true),
            ("zrollback", true),
            ("guest_post", false)
        ]
    );
    assert_eq!(
        run.report.steps[4].fields["commands"][0]["stderr"],
        "mount: /data0: wrong fs type, bad option, bad superblock on /dev/vda.\n"
    );
    // Rolled back (the newer snapshot destroyed), and reported so.
    assert_eq!(rollback_calls(&zfs).len(), 1);
    assert_eq!(zfs.snapshots(), [format!("{DS0}@s1")]);
    assert!(run.report.rolled_back.is_some());
    assert_eq!(run.report.guest_post, Some(evesnap::report::GuestPost::Ran));
}
