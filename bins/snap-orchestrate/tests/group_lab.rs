//! Consistency groups against the lab's two VMs (`EVESNAP_LAB_VMS=2`): the real agents,
//! the real zfs-fuse pool. Each test holds the lab's VM lock and a [`ThawGuard`] per VM.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use evesnap::qga::commands::GuestFsfreezeStatus;
use evesnap::report::{Consistency, Report};
use evesnap::steps::{FreezeReport, ThawReport};
use evesnap_tests::guest::{code, set_paused, status, stderr, wait_thawed, ThawGuard};
use evesnap_tests::lab::{destroy_snapshots_named, snapshots_named, Lab};
use evesnap_tests::run::spawn_with_stdin;
use evesnap_tests::zfs::{real_zfs, zfs, zfs_get};
use serde_json::{json, Value};

/// The lab's VM 0 (locked, thawed on drop) and VM 1 (thawed on drop).
fn two_vms(name: &str) -> (ThawGuard<'static>, ThawGuard<'static>) {
    let first = ThawGuard::lock(name);
    let lab = first.lab;
    assert!(
        lab.vms.len() >= 2,
        "the test lab has {} VM(s); the group tests need 2 (EVESNAP_TEST_LAB_VMS)",
        lab.vms.len()
    );
    let second = ThawGuard::new(&lab.vms[1], &format!("{name}-vm1"));
    (first, second)
}

/// A group plan of both VMs, every volume, snapshot `name`; `extra` merged into VM 1's.
fn group_plan(lab: &Lab, name: &str, freeze: Value, vm1: Value) -> Value {
    let vm = |vm: &Lab| json!({"agent": vm.agent, "qmp": vm.qmp, "datasets": vm.datasets, "disks": vm.disks});
    let mut second = vm(&lab.vms[1]);
    for (k, v) in vm1.as_object().expect("object") {
        second[k] = v.clone();
    }
    json!({"version": 1, "snapshot": name, "type": "app_update", "freeze": freeze,
           "vms": [vm(&lab.vms[0]), second]})
}

fn orchestrate(guard: &ThawGuard<'_>, plan: &Value, env: &[(&str, &str)]) -> std::process::Child {
    let mut command = guard.command("snap-orchestrate");
    command.envs(env.iter().copied());
    spawn_with_stdin(command, &plan.to_string())
}

fn report(out: &Output) -> Report {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a report ({e}):\n{}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// A `zfs` in the guard's folder that runs the shell line `first`, then the real zfs.
fn zfs_shim(guard: &ThawGuard<'_>, first: &str) -> std::path::PathBuf {
    let shim = guard.run_dir.path().join("zfs");
    let script = format!(
        "#!/bin/sh\n{first}\nexec '{}' \"$@\"\n",
        real_zfs().display()
    );
    std::fs::write(&shim, script).expect("write shim");
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    shim
}

/// Destroys the snapshots named `name` (test cleanup).
struct Cleanup<'a>(&'a Lab, String);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        destroy_snapshots_named(self.0, &self.1);
    }
}

/// Whether the ext4 image inside `snapshot` is clean: a mounted ext4 that was not frozen
/// when the snapshot was taken always has `needs_recovery`.
fn image_clean(lab: &Lab, snapshot: &str, dir: &std::path::Path) -> bool {
    let clone = format!("{}/lab/group-clone-{}", lab.pool, std::process::id());
    let mnt = dir.join("clone");
    let made = zfs(&[
        "clone",
        "-o",
        &format!("mountpoint={}", mnt.display()),
        snapshot,
        &clone,
    ]);
    assert!(
        made.status.success(),
        "zfs clone {snapshot}: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let image = mnt.join("disk.img");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !image.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new("dumpe2fs")
        .args(["-h", &image.display().to_string()])
        .stderr(Stdio::null())
        .output()
        .expect("dumpe2fs");
    for _ in 0..40 {
        let _ = zfs(&["umount", "-f", &clone]);
        if zfs(&["destroy", "-f", &clone]).status.success() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let features = text
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or_else(|| panic!("no ext4 inside {snapshot}: {text}"));
    !features.contains("needs_recovery")
}

#[test]
fn a_group_of_two_vms_is_one_atomic_snapshot_taken_while_both_were_frozen() {
    let (first, second) = two_vms("group-ok");
    let lab = first.lab;
    let name = format!("t-group-{}", std::process::id());
    let _cleanup = Cleanup(lab, name.clone());
    let plan = group_plan(
        lab,
        &name,
        json!({"timeout_s": 20, "thaw_after_s": 60}),
        json!({}),
    );
    let out = orchestrate(&first, &plan, &[])
        .wait_with_output()
        .expect("wait");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    let vms = r.vms.as_ref().expect("vms");
    assert_eq!(vms.len(), 2);
    for (vm, lab_vm) in vms.iter().zip(&lab.vms) {
        assert_eq!(vm.agent, lab_vm.agent);
        assert!(vm.ok, "{vm:?}");
        assert!(vm.frozen.is_some_and(|n| n >= 2), "{vm:?}");
        assert_eq!(vm.consistency, Some(Consistency::Filesystem));
        let window = vm.freeze_window_ms.expect("window");
        assert!(window <= r.freeze_window_ms.expect("group window"));
    }
    // Every volume of both VMs, one recursive call: one txg, one creation time.
    let snapshots = r.snapshots.as_ref().expect("snapshots");
    assert_eq!(snapshots.len(), 4, "{snapshots:?}");
    let mut taken = snapshots_named(lab, &name);
    taken.sort();
    let mut expected: Vec<String> = lab.vms[..2]
        .iter()
        .flat_map(|vm| vm.datasets.iter().map(|d| format!("{d}@{name}")))
        .collect();
    expected.sort();
    assert_eq!(
        taken, expected,
        "nothing else is left (no lab@, vm0@, vm1@)"
    );
    for s in snapshots {
        assert_eq!(
            zfs_get("createtxg", &s.name),
            snapshots[0].createtxg.to_string()
        );
        assert_eq!(s.creation, snapshots[0].creation);
        assert_eq!(zfs_get("org.lfedge.evesnap:frozen", &s.name), "true");
        // Frozen when taken: the ext4 inside is clean, in both VMs' volumes.
        assert!(
            image_clean(lab, &s.name, first.run_dir.path()),
            "{} needs recovery: its VM was not frozen",
            s.name
        );
    }
    assert_eq!(status(&lab.vms[0]), GuestFsfreezeStatus::thawed);
    assert_eq!(status(&lab.vms[1]), GuestFsfreezeStatus::thawed);
    drop(second);
}

#[test]
fn a_group_whose_second_vm_fails_to_freeze_thaws_both_and_leaves_nothing() {
    let (first, second) = two_vms("group-freeze-fails");
    let lab = first.lab;
    let name = format!("t-group-fail-{}", std::process::id());
    let _cleanup = Cleanup(lab, name.clone());
    let plan = group_plan(
        lab,
        &name,
        json!({"timeout_s": 20, "thaw_after_s": 60}),
        json!({"mountpoints": ["/no/such/mount"]}),
    );
    let out = orchestrate(&first, &plan, &[])
        .wait_with_output()
        .expect("wait");
    assert_ne!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    assert_eq!(r.error.as_ref().map(|e| e.step.as_str()), Some("freeze"));
    let vms = r.vms.as_ref().expect("vms");
    assert!(!vms[1].ok && vms[1].frozen.is_none(), "{:?}", vms[1]);
    assert!(snapshots_named(lab, &name).is_empty());
    assert_eq!(status(&lab.vms[0]), GuestFsfreezeStatus::thawed);
    assert_eq!(status(&lab.vms[1]), GuestFsfreezeStatus::thawed);
    drop(second);
}

#[test]
fn a_group_with_a_vm_whose_agent_does_not_answer_fails_and_nothing_is_frozen() {
    let (first, second) = two_vms("group-dead-agent");
    let lab = first.lab;
    let name = format!("t-group-dead-{}", std::process::id());
    let _cleanup = Cleanup(lab, name.clone());
    set_paused(&lab.vms[1], true).expect("pause VM 1");
    let plan = group_plan(
        lab,
        &name,
        json!({"timeout_s": 3, "thaw_after_s": 60}),
        json!({}),
    );
    let out = orchestrate(&first, &plan, &[])
        .wait_with_output()
        .expect("wait");
    set_paused(&lab.vms[1], false).expect("resume VM 1");
    assert_eq!(code(&out), 4, "the agent did not answer: {}", stderr(&out));
    let r = report(&out);
    assert_eq!(r.error.as_ref().map(|e| e.step.as_str()), Some("preflight"));
    let vms = r.vms.as_ref().expect("vms");
    assert!(vms[0].ok && vms[0].frozen.is_none(), "{:?}", vms[0]);
    assert!(snapshots_named(lab, &name).is_empty());
    assert_eq!(status(&lab.vms[0]), GuestFsfreezeStatus::thawed);
    drop(second);
}

#[test]
fn a_sigkilled_group_is_thawed_by_each_vms_own_watchdog() {
    let (first, second) = two_vms("group-kill");
    let lab = first.lab;
    let name = format!("t-group-kill-{}", std::process::id());
    let _cleanup = Cleanup(lab, name.clone());
    // `zfs snapshot` waits (the group frozen meanwhile); its pid is left in the marker.
    let marker = first.run_dir.path().join("snapshot-started");
    let shim = zfs_shim(
        &first,
        &format!(
            "if [ \"$1\" = snapshot ] && [ $# -gt 1 ]; then echo $$ > '{}'; sleep 30; exit 1; fi",
            marker.display()
        ),
    );
    let plan = group_plan(
        lab,
        &name,
        json!({"timeout_s": 60, "thaw_after_s": 4}),
        json!({}),
    );
    let mut child = orchestrate(&first, &plan, &[("EVESNAP_ZFS", shim.to_str().unwrap())]);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the snapshot never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().expect("SIGKILL");
    let killed = Instant::now();
    let _ = child.wait();
    for vm in &lab.vms[..2] {
        let thawed = wait_thawed(vm, killed + Duration::from_secs(60))
            .unwrap_or_else(|| panic!("VM {} is still frozen 60 s after the kill", vm.agent));
        assert!(thawed.duration_since(killed) < Duration::from_secs(30));
    }
    if let Ok(pid) = std::fs::read_to_string(&marker) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    assert!(snapshots_named(lab, &name).is_empty());
    drop(second);
}

/// Two VMs of one pool snapshotted at once, one plan each: their freeze windows take turns
/// (`src/turn.rs`). `zfs snapshot` is held 2 s, so that windows started together would
/// overlap; one run waits for the other's window to end and says how long it waited.
#[test]
fn two_vms_of_one_pool_snapshotted_at_once_take_turns() {
    let (first, second) = two_vms("turns");
    let lab = first.lab;
    let name = format!("t-turns-{}", std::process::id());
    let _cleanup = Cleanup(lab, name.clone());
    let shim = zfs_shim(&first, "[ \"$1\" = snapshot ] && sleep 2");
    let env = [("EVESNAP_ZFS", shim.to_str().unwrap())];
    // Both through VM 0's guard: one runtime folder, as on a node.
    let runs: Vec<_> = lab.vms[..2]
        .iter()
        .map(|vm| {
            let plan = json!({"version": 1, "agent": vm.agent, "qmp": vm.qmp, "datasets": vm.datasets,
                              "disks": vm.disks, "snapshot": name,
                              "freeze": {"timeout_s": 20, "thaw_after_s": 60}});
            orchestrate(&first, &plan, &env)
        })
        .collect();
    let mut windows = Vec::new();
    for run in runs {
        let out = run.wait_with_output().expect("wait");
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let r = report(&out);
        let frozen = r.steps.iter().find_map(|s| s.record::<FreezeReport>());
        let thawed = r.steps.iter().find_map(|s| s.record::<ThawReport>());
        let (Some(frozen), Some(thawed)) = (frozen, thawed) else {
            panic!("no freeze or thaw step: {:?}", r.steps);
        };
        let waited = r.pool_turn_wait_ms.expect("pool_turn_wait_ms");
        windows.push((frozen.frozen_at_unix_us, thawed.thawed_at_unix_us, waited));
    }
    windows.sort_by_key(|w| w.0);
    let (earlier, later) = (windows[0], windows[1]);
    assert!(
        earlier.1 <= later.0,
        "the windows overlap: {earlier:?} and {later:?} (µs since the epoch, wait ms)"
    );
    assert!(
        later.2 > 0.5 * 1000.0,
        "the later run did not wait for the earlier window (held 2 s): {later:?}"
    );
    drop(second);
}
