//! `action: rollback`, by branch of `flow/rollback.rs`: rolled back, or refused; its steps
//! failing (the agent, a device, guest commands, zfs) are in `rollback_failed.rs`.

use std::sync::atomic::Ordering;

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, Program, Sim, SimState};
use evesnap::steps::RolledBack;
use evesnap::zfs::Problem;
use serde_json::{json, Value};

use crate::support::*;

/// qemu-ga 7.2's `guest-get-fsinfo` in the lab guest, verbatim: `/data0` on vda (PCI slot
/// 7), `/data1` on vdb (slot 8), no serials (no udev).
const LAB_FSINFO: &str = r#"[{"name": "vdb", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 8, "domain": 0, "function": 0}, "dev": "/dev/vdb", "target": 0}], "used-bytes": 14336, "type": "ext4"}, {"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 7, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}]"#;

/// qemu-ga 7.2's `guest-get-fsinfo` where the pool is (the OpenZFS lab guest), verbatim:
/// ext4 on the zvols zd0 and zd16, which the agent reports with no disk address at all.
const ZVOLS_FSINFO: &str = r#"[{"name": "zd0", "total-bytes": 110621696, "mountpoint": "/mnt/6f1e0a52-3c8d-4b7a-9e21-5d4c3b2a1f00", "disk": [], "used-bytes": 14336, "type": "ext4"}, {"name": "zd16", "total-bytes": 223465472, "mountpoint": "/mnt/a3b9c7d1-2e4f-4a6b-8c0d-1e2f3a4b5c6d", "disk": [], "used-bytes": 14336, "type": "ext4"}]"#;

/// The pool with `DS0@s1` (txg 10) and `DS0@s2` (txg 20).
pub(crate) fn two_snapshots() -> Value {
    let mut state = pool(&[DS0, DS1]);
    add_snapshot(&mut state, &format!("{DS0}@s1"), 10, json!({}));
    add_snapshot(&mut state, &format!("{DS0}@s2"), 20, json!({}));
    state
}

/// Removes the filesystems named `name` from the guest's fsinfo.
fn unmount(state: &mut SimState, name: &str) {
    if let Some(list) = state.fsinfo.as_array_mut() {
        list.retain(|fs| fs["name"] != name);
    }
}

/// `/bin/umount` that unmounts `/data0` (vda).
pub(crate) fn umount_data0() -> Program {
    Program {
        effect: Some(|s| unmount(s, "vda")),
        ..Program::default()
    }
}

/// A guest as in the lab (`/data0` on vda, `/data1` on vdb) with `umount` as `/bin/umount`
/// and a `/bin/mount`.
pub(crate) fn lab_guest(umount: Program) -> (FakeAgent, Sim) {
    FakeAgent::simulated(SimState {
        fsinfo: serde_json::from_str(LAB_FSINFO).expect("fsinfo"),
        programs: vec![
            ("/bin/umount".into(), umount),
            ("/bin/mount".into(), Program::exits(0)),
        ],
        ..SimState::default()
    })
}

/// Back to `DS0@s1` under a running VM: unmount in guest_pre, mount in guest_post; the
/// guest sees DS0 as the disk in PCI slot 7.
pub(crate) fn running(agent: &FakeAgent, extra: Value) -> snap_orchestrate::Plan {
    let mut base = json!({"action": "rollback", "rollback": {"to": "s1", "destroy_newer": true},
        "guest_pre": [{"path": "/bin/umount", "args": ["/data0"]}],
        "guest_post": [{"path": "/bin/mount", "args": ["/dev/vda", "/data0"]}],
        "disks": {DS0: {"pci": "0000:00:07.0"}}});
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    plan(&agent.address.to_string(), &[DS0], base)
}

pub(crate) fn rollback_calls(zfs: &FakeZfs) -> Vec<Vec<String>> {
    zfs.calls_of("rollback")
}

#[test]
fn a_vm_the_plan_says_is_stopped_is_rolled_back_without_the_agent() {
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let mut state = two_snapshots();
    state["bookmarks"][format!("{DS0}#b")] = json!({"createtxg": 25});
    let zfs = FakeZfs::new(&state);
    let extra = json!({"action": "rollback",
                       "rollback": {"to": "s1", "destroy_newer": true, "vm_stopped": true}});
    let run = run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", true), ("zrollback", true)]);
    assert_eq!(
        run.report.rolled_back,
        Some(vec![RolledBack {
            dataset: DS0.into(),
            to: format!("{DS0}@s1")
        }])
    );
    let newer = [format!("{DS0}@s2"), format!("{DS0}#b")];
    assert_eq!(run.report.destroyed.as_deref(), Some(&newer[..]));
    assert_eq!(
        rollback_calls(&zfs),
        [vec!["rollback".to_string(), format!("{DS0}@s1")]]
    );
    assert_eq!(zfs.snapshots(), [format!("{DS0}@s1")]);
    assert_eq!(zfs.state()["bookmarks"], json!({}));
    assert_eq!(agent.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn a_running_vm_is_rolled_back_once_guest_pre_unmounted_the_volume() {
    let (agent, sim) = lab_guest(umount_data0());
    let zfs = FakeZfs::new(&two_snapshots());
    let run = run(&running(&agent, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(
        steps(&run),
        [
            ("preflight", true),
            ("guest_pre", true),
            ("unmounted", true),
            ("zrollback", true),
            ("guest_post", true)
        ]
    );
    // /data1 (vdb, slot 8) stays mounted: it is not on this volume.
    assert!(at(&sim, "guest-exec /bin/umount /data0") < at(&sim, "guest-get-fsinfo"));
    assert!(at(&sim, "guest-get-fsinfo") < at(&sim, "guest-exec /bin/mount /dev/vda /data0"));
    assert_eq!(
        rollback_calls(&zfs),
        [vec!["rollback".to_string(), format!("{DS0}@s1")]]
    );
}

#[test]
fn a_zvol_is_told_apart_by_its_device_resolved_in_the_guest() {
    let umount = Program {
        effect: Some(|s| unmount(s, "zd0")),
        ..Program::default()
    };
    let readlink = Program {
        stdout: "/dev/zd0\n".into(),
        ..Program::default()
    };
    let (agent, sim) = FakeAgent::simulated(SimState {
        fsinfo: serde_json::from_str(ZVOLS_FSINFO).expect("fsinfo"),
        programs: vec![
            ("/bin/readlink".into(), readlink),
            ("/bin/test".into(), Program::exits(0)),
            ("/bin/umount".into(), umount),
            ("/bin/mount".into(), Program::exits(0)),
        ],
        ..SimState::default()
    });
    let zfs = FakeZfs::new(&two_snapshots());
    let dev = format!("/dev/zvol/{DS0}");
    let run = run(
        &running(&agent, json!({"disks": {DS0: {"dev": dev}}})),
        &zfs,
    );

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(
        run.report.steps[0].fields["devices"],
        json!({DS0: "/dev/zd0"})
    );
    assert!(
        at(&sim, &format!("guest-exec /bin/readlink -f {dev}"))
            < at(&sim, "guest-exec /bin/umount")
    );
    // zd16 stays mounted: another volume.
    assert_eq!(rollback_calls(&zfs).len(), 1);
}

#[test]
fn a_volume_still_mounted_after_guest_pre_is_refused_and_guest_post_runs() {
    let (agent, sim) = lab_guest(Program::exits(0));
    let zfs = FakeZfs::new(&two_snapshots());
    let run = run(&running(&agent, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("unmounted"));
    let error = run.report.error.as_ref().expect("error");
    assert!(error.message.contains("/data0 (vda)"), "{error:?}");
    assert!(!error.message.contains("/data1"), "{error:?}");
    assert!(at(&sim, "guest-get-fsinfo") < at(&sim, "guest-exec /bin/mount"));
    assert!(rollback_calls(&zfs).is_empty());
    assert_eq!(zfs.snapshots().len(), 2, "nothing destroyed");
}

#[test]
fn a_running_vm_without_disks_in_the_plan_is_bad_input() {
    let (agent, sim) = lab_guest(umount_data0());
    let zfs = FakeZfs::new(&two_snapshots());
    let mut plan = running(&agent, json!({}));
    plan.disks.clear();
    let run = run(&plan, &zfs);

    assert_eq!(exit(&run), Exit::Usage, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("preflight"));
    assert!(!got(&sim, "guest-exec"), "{:?}", sim.state().log);
    assert!(rollback_calls(&zfs).is_empty());
}

#[test]
fn newer_snapshots_are_refused_without_destroy_newer() {
    let (agent, _sim) = lab_guest(umount_data0());
    let zfs = FakeZfs::new(&two_snapshots());
    let run = run(&running(&agent, json!({"rollback": {"to": "s1"}})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    assert_eq!(
        problems(&run),
        [Problem::NewerSnapshots {
            dataset: DS0.into(),
            to: format!("{DS0}@s1"),
            newer: vec![format!("{DS0}@s2")],
            guest: vec![],
        }]
    );
    // Refused before the guest is asked anything.
    assert_eq!(agent.connections.load(Ordering::SeqCst), 0);
    assert!(zfs.calls_of("destroy").is_empty() && rollback_calls(&zfs).is_empty());
}

#[test]
fn a_rollback_refused_for_newer_guest_snapshots_says_they_are_the_guests() {
    let (agent, _sim) = lab_guest(umount_data0());
    let mut state = pool(&[DS0, DS1]);
    add_snapshot(&mut state, &format!("{DS0}@s1"), 10, json!({}));
    add_snapshot(
        &mut state,
        &format!("{DS0}@g1"),
        20,
        json!({"org.lfedge.evesnap:origin": "guest"}),
    );
    let zfs = FakeZfs::new(&state);
    let run = run(&running(&agent, json!({"rollback": {"to": "s1"}})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert_eq!(
        problems(&run),
        [Problem::NewerSnapshots {
            dataset: DS0.into(),
            to: format!("{DS0}@s1"),
            newer: vec![format!("{DS0}@g1")],
            guest: vec![format!("{DS0}@g1")],
        }]
    );
    let message = run
        .report
        .error
        .as_ref()
        .map(|e| e.message.clone())
        .unwrap_or_default();
    assert!(message.contains("the guest's own"), "{message}");
    assert!(rollback_calls(&zfs).is_empty());
}

/// qemu-ga 7.2's `guest-get-fsinfo` in the lab guest in EVE's shape, verbatim (no serials):
/// `/data0` on vda behind the root port the guest numbered bus 1, `/data1` on the SCSI disk
/// sda of the HBA on bus 2.
const EVE_FSINFO: &str = r#"[{"name": "sda", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "scsi", "bus": 0, "unit": 0, "pci-controller": {"bus": 2, "slot": 0, "domain": 0, "function": 0}, "dev": "/dev/sda", "target": 0}], "used-bytes": 14336, "type": "ext4"}, {"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 1, "slot": 0, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}]"#;

/// The EVE-shaped guest, `/bin/umount` unmounting `/data0` when `releases`.
fn eve_guest(releases: bool) -> (FakeAgent, Sim) {
    let umount = if releases {
        umount_data0()
    } else {
        Program::exits(0)
    };
    FakeAgent::simulated(SimState {
        fsinfo: serde_json::from_str(EVE_FSINFO).expect("fsinfo"),
        programs: vec![
            ("/bin/umount".into(), umount),
            ("/bin/mount".into(), Program::exits(0)),
        ],
        ..SimState::default()
    })
}

/// [`running`] with the VM's QMP (the fake EVE-shaped QEMU) and `disks` as given.
fn running_eve(agent: &FakeAgent, disks: Value) -> snap_orchestrate::Plan {
    let qmp = crate::qmp::fake_qmp(crate::qmp::eve_shaped());
    running(agent, json!({"qmp": qmp, "disks": disks}))
}

#[test]
fn disks_named_as_qemu_knows_them_are_placed_through_qmp() {
    for disks in [
        json!({DS0: {"qdev": "virtio-disk0", "port": "pci.8"}}),
        json!({DS0: {"port": "pci.8"}}),
        json!({}), // QEMU says which disk reads DS0's zvol
    ] {
        // Still mounted (guest_pre does not release it): refused, nothing rolled back.
        let (agent, _sim) = eve_guest(false);
        let zfs = FakeZfs::new(&two_snapshots());
        let refused = run(&running_eve(&agent, disks.clone()), &zfs);
        assert_eq!(
            exit(&refused),
            Exit::Preflight,
            "{disks}: {:?}",
            refused.error
        );
        assert_eq!(failed_step(&refused), Some("unmounted"), "{disks}");
        let error = refused.report.error.as_ref().expect("error");
        assert!(error.description.contains("/data0"), "{error:?}");
        assert!(!error.description.contains("/data1"), "{error:?}");
        assert!(rollback_calls(&zfs).is_empty());

        // Released: rolled back.
        let (agent, _sim) = eve_guest(true);
        let zfs = FakeZfs::new(&two_snapshots());
        let done = run(&running_eve(&agent, disks.clone()), &zfs);
        assert_eq!(exit(&done), Exit::Success, "{disks}: {:?}", done.error);
        assert_eq!(rollback_calls(&zfs).len(), 1);
        let preflight = &done
            .report
            .steps
            .iter()
            .find(|s| s.tool == "preflight")
            .expect("preflight")
            .fields;
        let preflight = Value::Object(preflight.clone());
        assert_eq!(preflight["places"][DS0], "PCI 0000:01:00.0", "{preflight}");
        if disks == json!({}) {
            assert_eq!(
                preflight["disks_from_qemu"][DS0]["qdev"], "virtio-disk0",
                "{preflight}"
            );
        }
    }
}

#[test]
fn a_scsi_disk_is_placed_by_its_hba_and_address() {
    // DS1 is the SCSI disk (by its WWN) and /data1 is mounted on it: refused, and /data0 on
    // the virtio disk is not counted against it.
    let (agent, _sim) = eve_guest(true);
    let mut state = two_snapshots();
    add_snapshot(&mut state, &format!("{DS1}@s1"), 10, json!({}));
    let zfs = FakeZfs::new(&state);
    let qmp = crate::qmp::fake_qmp(crate::qmp::eve_shaped());
    let plan = plan(
        &agent.address.to_string(),
        &[DS0, DS1],
        json!({"action": "rollback", "rollback": {"to": "s1", "destroy_newer": true}, "qmp": qmp,
               "guest_pre": [{"path": "/bin/umount", "args": ["/data0"]}],
               "disks": {DS0: {"qdev": "virtio-disk0"}, DS1: {"wwn": "0x5001405e7a5b0001"}}}),
    );
    let run = run(&plan, &zfs);
    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    let error = run.report.error.as_ref().expect("error");
    assert!(error.description.contains("/data1"), "{error:?}");
    assert!(!error.description.contains("/data0"), "{error:?}");
}

#[test]
fn a_disk_qemu_does_not_have_or_the_wrong_one_is_refused_before_the_guest_is_touched() {
    for (disks, needle) in [
        (
            json!({DS0: {"qdev": "virtio-disk7"}}),
            "no device with id `virtio-disk7`",
        ),
        (
            json!({DS0: {"qdev": "virtio-disk0", "port": "pci.9"}}),
            "but root port `pci.9`",
        ),
    ] {
        let (agent, sim) = eve_guest(true);
        let zfs = FakeZfs::new(&two_snapshots());
        let run = run(&running_eve(&agent, disks.clone()), &zfs);
        assert_eq!(exit(&run), Exit::Preflight, "{disks}: {:?}", run.error);
        assert_eq!(failed_step(&run), Some("preflight"));
        let error = run.report.error.as_ref().expect("error");
        assert!(error.description.contains(needle), "{error:?}");
        assert!(!got(&sim, "guest-exec"), "{:?}", sim.state().log);
        assert!(rollback_calls(&zfs).is_empty());
    }
}
