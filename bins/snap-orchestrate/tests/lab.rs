//! snap-orchestrate against the lab: the real agent in the VM, the real zfs-fuse pool.
//!
//! Every test that touches the VM holds [`vm_lock`] (most through [`ThawGuard::lock`]),
//! and destroys the snapshots it made, so tests stay independent. The agent serves one
//! connection at a time: a test never keeps one open while a tool runs.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use evesnap::eve_api::Severity;
use evesnap::qga::commands::GuestFsfreezeStatus;
use evesnap::qga::testing::{FakeAgent, SimState};
use evesnap::report::{Consistency, ExpeditedRcu, Report, WarningKind};
use evesnap::steps::{FlushReport, FreezeReport, SnapshotReport, ThawReport};
use evesnap_tests::guest::{
    code, connect, doc_of, freeze_behind_the_agent, guest_sh, status, stderr, unfreeze_in_guest,
    ThawGuard,
};
use evesnap_tests::lab::{destroy_snapshots_named, snapshots_named, test_lab, vm_lock, Lab};
use evesnap_tests::run::{spawn_with_stdin, RunDir};
use evesnap_tests::zfs::{real_zfs, zfs_get};
use serde_json::{json, Value};

/// The report, parsed strictly into the orchestrator's own type (`deny_unknown_fields`): a
/// renamed or extra field fails the test.
fn report(out: &Output) -> Report {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a report ({e}):\n{}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

/// A step of the report, as JSON.
fn step(report: &Report, tool: &str) -> Value {
    let step = report
        .steps
        .iter()
        .find(|s| s.tool == tool)
        .unwrap_or_else(|| panic!("no {tool} step: {report:?}"));
    serde_json::to_value(step).expect("a step is JSON")
}

fn plan(lab: &Lab, extra: Value) -> Value {
    let mut plan = json!({
        "version": 1,
        "id": new_id(),
        "type": "app_update",
        "agent": lab.agent,
        "qmp": lab.qmp,
        "datasets": lab.datasets,
        "disks": lab.disks,
        "freeze": {"timeout_s": 20, "thaw_after_s": 60},
    });
    for (k, v) in extra.as_object().expect("object").iter() {
        plan[k] = v.clone();
    }
    plan
}

fn new_id() -> String {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid").expect("a uuid");
    String::from_utf8_lossy(&bytes).trim().to_string()
}

fn orchestrate(guard: &ThawGuard<'_>, plan: &Value, env: &[(&str, &str)]) -> Output {
    spawn_orchestrate(guard, plan, env)
        .wait_with_output()
        .expect("wait")
}

/// Starts snap-orchestrate with `plan` on its stdin (closed after) and output captured.
fn spawn_orchestrate(
    guard: &ThawGuard<'_>,
    plan: &Value,
    env: &[(&str, &str)],
) -> std::process::Child {
    let mut command = guard.command("snap-orchestrate");
    command.envs(env.iter().copied());
    spawn_with_stdin(command, &plan.to_string())
}

fn run_with_stdin(command: Command, input: &str) -> Output {
    spawn_with_stdin(command, input)
        .wait_with_output()
        .expect("wait")
}

/// Destroys every snapshot of the lab's datasets named `name` (test cleanup).
struct Cleanup<'a>(&'a Lab, Vec<String>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for name in &self.1 {
            destroy_snapshots_named(self.0, name);
        }
    }
}

#[test]
fn create_with_hooks_then_rollback_restores_the_data() {
    create_with_hooks_then_rollback_restores_the_data_through(ThawGuard::lock("orch-create"));
}

/// The same over vsock: the guest's second agent, through the hybrid vsock device.
#[test]
fn over_vsock_create_with_hooks_then_rollback_restores_the_data() {
    create_with_hooks_then_rollback_restores_the_data_through(ThawGuard::lock_vsock(
        "orch-create-vsock",
    ));
}

fn create_with_hooks_then_rollback_restores_the_data_through(guard: ThawGuard<'static>) {
    let lab = guard.lab;
    let name = format!("t-create-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![name.clone()]);
    guest_sh(&mut connect(lab), "dd if=/dev/urandom of=/data0/app.bin bs=64k count=16 2>/dev/null; rm -f /data0/hook.log; sync");

    // Create: guest_pre's effect is in the snapshot, guest_post's is not.
    let create = plan(
        lab,
        json!({
            "snapshot": name,
            "guest_pre": [{"path": "/bin/sh", "args": ["-c", "echo pre >> /data0/hook.log; sync"]}],
            "guest_post": [{"path": "/bin/sh", "args": ["-c", "echo post >> /data0/hook.log"]}],
        }),
    );
    let out = orchestrate(&guard, &create, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    assert!(r.ok && r.error.is_none());
    assert_eq!(r.consistency, Some(Consistency::Application));
    let snaps = r.snapshots.as_ref().expect("snapshots");
    assert_eq!(snaps.len(), 2);
    assert!(snaps
        .iter()
        .all(|s| s.createtxg == snaps[0].createtxg && !s.guid.is_empty() && s.creation > 0));
    assert!(r.freeze_window_ms.expect("window") > 0.0);
    let tools: Vec<&str> = r.steps.iter().map(|s| s.tool.as_str()).collect();
    assert_eq!(
        tools,
        [
            "preflight",
            "guest_pre",
            "flush",
            "qga-freeze",
            "zsnap",
            "qga-thaw",
            "guest_post"
        ]
    );
    assert_eq!(
        r.expedited_rcu,
        Some(ExpeditedRcu {
            set: true,
            restored: Some(true),
            error: None
        }),
        "expedited RCU is the default"
    );
    assert_eq!(step(&r, "qga-freeze")["frozen"], 2);
    assert_eq!(step(&r, "qga-thaw")["thawed"], 2);
    // Each tool's step is its typed record, strictly (`deny_unknown_fields`).
    let record = |tool: &str| r.steps.iter().find(|s| s.tool == tool).expect("step");
    assert!(record("qga-freeze").record::<FreezeReport>().is_some());
    assert!(record("zsnap").record::<SnapshotReport>().is_some());
    assert!(record("qga-thaw").record::<ThawReport>().is_some());
    for s in snaps {
        assert_eq!(zfs_get("org.lfedge.evesnap:frozen", &s.name), "true");
        assert_eq!(
            zfs_get("org.lfedge.evesnap:consistency", &s.name),
            "application"
        );
        assert_eq!(zfs_get("org.lfedge.evesnap:id", &s.name), r.id.to_string());
    }
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
    let at_snapshot = guest_sh(&mut connect(lab), "md5sum /data0/app.bin");

    // The application writes on.
    guest_sh(
        &mut connect(lab),
        "dd if=/dev/urandom of=/data0/app.bin bs=64k count=16 conv=notrunc 2>/dev/null; sync",
    );
    assert_ne!(
        guest_sh(&mut connect(lab), "md5sum /data0/app.bin"),
        at_snapshot
    );

    // Rollback while /data0 is mounted: refused, nothing changed.
    let mounted = plan(lab, json!({"action": "rollback", "rollback": {"to": name}}));
    let out = orchestrate(&guard, &mounted, &[]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let r = report(&out);
    let error = r.error.as_ref().expect("error");
    assert_eq!(
        (error.step.as_str(), error.kind.as_str()),
        ("unmounted", "preflight-failed")
    );
    assert!(
        error.description.contains("/data0"),
        "{}",
        error.description
    );
    assert!(step(&r, "unmounted")["mounted"][0]
        .as_str()
        .unwrap_or("")
        .contains("/data0"));
    assert_ne!(
        guest_sh(&mut connect(lab), "md5sum /data0/app.bin"),
        at_snapshot
    );

    // The same without the plan's `disks`: QEMU says which disk holds each volume
    // (query-block) and where the guest sees it (query-pci); still refused.
    let mut from_qemu = mounted.clone();
    from_qemu.as_object_mut().expect("object").remove("disks");
    let out = orchestrate(&guard, &from_qemu, &[]);
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let r = report(&out);
    assert!(step(&r, "unmounted")["mounted"][0]
        .as_str()
        .unwrap_or("")
        .contains("/data0"));
    assert_eq!(
        step(&r, "preflight")["disks_from_qemu"]
            .as_object()
            .map(|m| m.len()),
        Some(lab.datasets.len()),
        "{:?}",
        step(&r, "preflight")
    );

    // A plan that names the wrong disk for a volume (disk1's device for disk0's dataset, as
    // if the mount had moved) is refused before anything changes: the two volumes land at
    // one place in the guest.
    if let (Some(d0), Some(d1)) = (
        lab.disks.get(&lab.datasets[0]),
        lab.disks.get(&lab.datasets[1]),
    ) {
        let mut swapped = mounted.clone();
        swapped["disks"] = json!({lab.datasets[0].clone(): d1, lab.datasets[1].clone(): d1});
        let out = orchestrate(&guard, &swapped, &[]);
        assert_eq!(code(&out), 7, "{}", stderr(&out));
        assert!(
            stderr(&out).contains("cannot place the volumes"),
            "{}",
            stderr(&out)
        );
        let _ = d0;
    }

    // With guest_pre unmounting and guest_post remounting (disks found by their ext4
    // label: a SCSI disk is sdX), and no `disks` in the plan: the data is the snapshot's.
    let released = plan(
        lab,
        json!({
            "action": "rollback",
            "rollback": {"to": name},
            "guest_pre": [{"path": "/bin/umount", "args": ["/data0"]}, {"path": "/bin/umount", "args": ["/data1"]}],
            "guest_post": [
                {"path": "/bin/sh", "args": ["-c", "echo 3 > /proc/sys/vm/drop_caches; mount -t ext4 $(findfs LABEL=disk0) /data0"]},
                {"path": "/bin/sh", "args": ["-c", "mount -t ext4 $(findfs LABEL=disk1) /data1"]},
            ],
        }),
    );
    let released = {
        let mut p = released;
        p.as_object_mut().expect("object").remove("disks");
        p
    };
    let out = orchestrate(&guard, &released, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    assert_eq!(r.rolled_back.as_ref().map(Vec::len), Some(2));
    assert_eq!(
        guest_sh(&mut connect(lab), "md5sum /data0/app.bin"),
        at_snapshot
    );
    assert_eq!(guest_sh(&mut connect(lab), "cat /data0/hook.log"), "pre\n");
}

#[test]
fn a_failing_guest_pre_leaves_no_snapshot_and_a_thawed_guest() {
    let guard = ThawGuard::lock("orch-pre");
    let lab = guard.lab;
    let name = format!("t-pre-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![name.clone()]);
    let failing = plan(
        lab,
        json!({
            "snapshot": name,
            "guest_pre": [
                {"path": "/bin/sh", "args": ["-c", "echo stopping > /tmp/app.state"]},
                {"path": "/bin/sh", "args": ["-c", "echo cannot quiesce >&2; exit 3"]},
            ],
            "guest_post": [
                {"path": "/bin/sh", "args": ["-c", "echo resumed > /tmp/app.state"]},
                {"path": "/bin/sh", "args": ["-c", "echo never >> /tmp/app.state"]},
            ],
        }),
    );
    let out = orchestrate(&guard, &failing, &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let r = report(&out);
    let error = r.error.as_ref().expect("error");
    assert_eq!(error.step, "guest_pre");
    assert!(
        error.description.contains("exited with status 3"),
        "{}",
        error.description
    );
    // eve-api's view: a warning (the guest runs, thawed) on both volumes, retry once fixed.
    let snap_err = r.zinfo_snapshot.snap_err.as_ref().expect("snap_err");
    assert_eq!(snap_err.severity, Severity::Warning);
    assert_eq!(snap_err.description, error.message);
    assert_eq!(snap_err.entities.len(), lab.datasets.len());
    assert!(snap_err.retry_condition.starts_with("after the cause"));
    let pre = step(&r, "guest_pre");
    assert_eq!(pre["commands"][1]["stderr"], "cannot quiesce\n");
    assert!(r
        .steps
        .iter()
        .all(|s| s.tool != "qga-freeze" && s.tool != "zsnap"));
    assert!(snapshots_named(lab, &name).is_empty());
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
    // The guest_post of the commands that ran, in reverse: both ran, so both undo steps,
    // the second's first.
    assert_eq!(
        guest_sh(&mut connect(lab), "cat /tmp/app.state"),
        "resumed\n"
    );
}

#[test]
fn a_freeze_the_real_agent_fails_takes_nothing_by_default_and_a_labelled_crash_snapshot_when_allowed(
) {
    let guard = ThawGuard::lock("orch-crash");
    let lab = guard.lab;
    let strict = format!("t-strict-{}", std::process::id());
    let lenient = format!("t-lenient-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![strict.clone(), lenient.clone()]);
    let hooks = |name: &str, on_failure: &str| {
        plan(
            lab,
            json!({
                "snapshot": name,
                "freeze": {"timeout_s": 20, "thaw_after_s": 60, "on_failure": on_failure,
                           "mountpoints": ["/data0", "/data1"]},
                "guest_pre": [{"path": "/bin/sh", "args": ["-c", "echo quiesced > /tmp/crash.state"]}],
                "guest_post": [{"path": "/bin/sh", "args": ["-c", "echo resumed > /tmp/crash.state"]}],
            }),
        )
    };

    // /data0 frozen behind the agent's back: qemu-ga skips it (EBUSY, which it takes for
    // a bind mount) and freezes /data1 only, fewer than the plan names.
    freeze_behind_the_agent(lab, "/data0");
    let out = orchestrate(&guard, &hooks(&strict, "fail"), &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let r = report(&out);
    let error = r.error.as_ref().expect("error");
    assert_eq!(error.step, "freeze", "{error:?}");
    assert!(
        error.description.contains("froze 1 filesystems but 2"),
        "{error:?}"
    );
    assert!(r.warnings.is_empty() && r.consistency.is_none(), "{r:?}");
    assert!(snapshots_named(lab, &strict).is_empty());
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
    // qemu-ga's thaw after its failed freeze thawed /data0 too.
    assert!(!unfreeze_in_guest(lab, "/data0"), "/data0 stayed frozen");
    assert_eq!(
        guest_sh(&mut connect(lab), "cat /tmp/crash.state"),
        "resumed\n"
    );

    freeze_behind_the_agent(lab, "/data0");
    let out = orchestrate(&guard, &hooks(&lenient, "crash"), &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("crash-consistent"),
        "never silent: {}",
        stderr(&out)
    );
    let r = report(&out);
    assert!(r.ok && r.error.is_none(), "{r:?}");
    assert_eq!(r.consistency, Some(Consistency::Crash));
    assert_eq!(r.freeze_window_ms, None);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    let warning = &r.warnings[0];
    assert_eq!(
        (warning.kind, warning.step.as_str()),
        (WarningKind::CrashFallback, "freeze")
    );
    assert!(
        warning.message.contains("froze 1 filesystems but 2"),
        "{warning:?}"
    );
    let tools: Vec<(&str, bool)> = r.steps.iter().map(|s| (s.tool.as_str(), s.ok)).collect();
    assert_eq!(
        tools,
        [
            ("preflight", true),
            ("guest_pre", true),
            // The flush (on by default) runs before the freeze, frozen volume or not.
            ("flush", true),
            ("qga-freeze", false),
            ("zsnap", true),
            ("guest_post", true)
        ]
    );
    let snaps = snapshots_named(lab, &lenient);
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    for s in &snaps {
        assert_eq!(zfs_get("org.lfedge.evesnap:consistency", s), "crash");
        assert_eq!(zfs_get("org.lfedge.evesnap:frozen", s), "false");
        let reason = zfs_get("org.lfedge.evesnap:crash_reason", s);
        assert!(
            reason.contains("froze 1 filesystems but 2"),
            "{s}: {reason}"
        );
    }
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
    assert!(!unfreeze_in_guest(lab, "/data0"), "/data0 stayed frozen");
    assert_eq!(
        guest_sh(&mut connect(lab), "cat /tmp/crash.state"),
        "resumed\n"
    );
}

/// A second qemu-ga in the lab guest, on its own vsock port, whose fsfreeze hook takes
/// `hook_s` seconds before every freeze: a real agent that answers a freeze late. Killed
/// (and the guest thawed) when dropped.
struct SlowHookAgent<'a> {
    lab: &'a Lab,
    address: String,
}

impl<'a> SlowHookAgent<'a> {
    const PORT: u32 = 10073;

    fn start(lab: &'a Lab, hook_s: f64) -> SlowHookAgent<'a> {
        let port = Self::PORT;
        guest_sh(
            &mut connect(lab),
            &format!(
                "printf '#!/bin/sh\\n[ \"$1\" = freeze ] && sleep {hook_s}\\nexit 0\\n' > /tmp/slow-hook; \
                 chmod 755 /tmp/slow-hook; mkdir -p /run/qga-slow-hook; \
                 /usr/bin/qemu-ga -d -f /run/qga-slow-hook.pid -m vsock-listen \
                 -p 4294967295:{port} -t /run/qga-slow-hook -F/tmp/slow-hook"
            ),
        );
        let address = format!("hvsock:{}:{port}", lab.vsock.uds.display());
        let agent = SlowHookAgent { lab, address };
        let deadline = Instant::now() + Duration::from_secs(20);
        while agent.status().is_err() {
            assert!(
                Instant::now() < deadline,
                "the slow-hook agent does not answer"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        agent
    }

    fn status(&self) -> Result<GuestFsfreezeStatus, evesnap::qga::Error> {
        let address: evesnap::qga::Address = self.address.parse().expect("hvsock address");
        let mut client =
            evesnap::qga::Client::connect(&address, Instant::now() + Duration::from_secs(5))?;
        client.execute_within(
            evesnap::qga::commands::guest_fsfreeze_status {},
            Duration::from_secs(10),
        )
    }
}

impl Drop for SlowHookAgent<'_> {
    fn drop(&mut self) {
        let _ = evesnap_tests::guest::try_guest_sh(
            &mut connect(self.lab),
            "kill $(cat /run/qga-slow-hook.pid); fsfreeze --unfreeze /data0; fsfreeze --unfreeze /data1; true",
        );
    }
}

#[test]
fn a_freeze_that_times_out_on_the_real_agent_takes_nothing_by_default_and_a_crash_snapshot_when_allowed(
) {
    let guard = ThawGuard::lock("orch-freeze-timeout");
    let lab = guard.lab;
    // The hook (3 s) outlasts the freeze deadline (2 s), not the thaw queued behind it
    // (answered within its own 2 s, once the late freeze is done).
    let agent = SlowHookAgent::start(lab, 3.0);
    let strict = format!("t-late-strict-{}", std::process::id());
    let lenient = format!("t-late-lenient-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![strict.clone(), lenient.clone()]);
    let late = |name: &str, on_failure: &str| {
        plan(
            lab,
            json!({
                "snapshot": name, "agent": agent.address,
                "freeze": {"timeout_s": 2, "thaw_after_s": 60, "on_failure": on_failure,
                           "mountpoints": ["/data0", "/data1"]},
            }),
        )
    };

    let out = orchestrate(&guard, &late(&strict, "fail"), &[]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let r = report(&out);
    let error = r.error.as_ref().expect("error");
    assert_eq!(error.step, "freeze", "{error:?}");
    assert!(r.warnings.is_empty() && r.consistency.is_none(), "{r:?}");
    assert!(snapshots_named(lab, &strict).is_empty());
    assert_eq!(agent.status().expect("status"), GuestFsfreezeStatus::thawed);

    let out = orchestrate(&guard, &late(&lenient, "crash"), &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    assert_eq!(r.consistency, Some(Consistency::Crash), "{r:?}");
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    let warning = &r.warnings[0];
    assert_eq!(warning.kind, WarningKind::CrashFallback);
    assert!(
        warning.message.contains("guest-fsfreeze-freeze"),
        "{warning:?}"
    );
    let snaps = snapshots_named(lab, &lenient);
    assert_eq!(snaps.len(), lab.datasets.len(), "{snaps:?}");
    for s in &snaps {
        assert_eq!(zfs_get("org.lfedge.evesnap:consistency", s), "crash");
        assert_eq!(zfs_get("org.lfedge.evesnap:frozen", s), "false");
    }
    assert_eq!(agent.status().expect("status"), GuestFsfreezeStatus::thawed);
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
}

/// A `zfs` on which `snapshot` first waits `delay` seconds, then runs the real one; it
/// touches `marker` when a snapshot starts (not for the bare `zfs snapshot` that probes
/// the usage text).
fn slow_zfs(dir: &std::path::Path, delay: u32) -> (PathBuf, PathBuf) {
    let real = real_zfs();
    let marker = dir.join("snapshot-started");
    let shim = dir.join("zfs");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nif [ \"$1\" = snapshot ] && [ $# -gt 1 ]; then touch '{}'; sleep {delay}; fi\nexec '{}' \"$@\"\n",
            marker.display(),
            real.display()
        ),
    )
    .expect("write shim");
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    (shim, marker)
}

fn wait_for(path: &std::path::Path, within: Duration) {
    let deadline = Instant::now() + within;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_during_the_snapshot_leaves_the_guest_thawed() {
    let guard = ThawGuard::lock("orch-term");
    let lab = guard.lab;
    let name = format!("t-term-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![name.clone()]);
    let (shim, marker) = slow_zfs(guard.run_dir.path(), 4);
    let shim_path = shim.to_str().expect("utf-8 path");
    let child = spawn_orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": name})),
        &[("EVESNAP_ZFS", shim_path)],
    );
    // The orchestrator holds the agent's one connection now: the report tells what it did.
    wait_for(&marker, Duration::from_secs(60));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    // A second signal must not skip the thaw either.
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM again");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
    let r = report(&out);
    assert_eq!(
        step(&r, "qga-freeze")["frozen"],
        2,
        "the snapshot step ran while frozen"
    );
    assert_eq!(step(&r, "qga-thaw")["ok"], true);
    assert_eq!(r.error.as_ref().map(|e| e.step.as_str()), Some("snapshot"));
    // Taken after the early thaw, the snapshot cannot claim consistency: it is gone.
    assert!(
        snapshots_named(lab, &name).is_empty(),
        "{:?}",
        snapshots_named(lab, &name)
    );
}

#[test]
fn a_second_orchestration_of_the_same_vm_is_refused_at_once() {
    let guard = ThawGuard::lock("orch-busy");
    let lab = guard.lab;
    let first_name = format!("t-busy1-{}", std::process::id());
    let second_name = format!("t-busy2-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![first_name.clone(), second_name.clone()]);
    let (shim, marker) = slow_zfs(guard.run_dir.path(), 1);
    let shim_path = shim.to_str().expect("utf-8 path");
    let first = spawn_orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": first_name})),
        &[("EVESNAP_ZFS", shim_path)],
    );
    wait_for(&marker, Duration::from_secs(60));
    let started = Instant::now();
    let out = orchestrate(&guard, &plan(lab, json!({"snapshot": second_name})), &[]);
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once"
    );
    assert!(stderr(&out).contains("in progress"), "{}", stderr(&out));
    let first = first.wait_with_output().expect("wait");
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    assert_eq!(snapshots_named(lab, &first_name).len(), 2);
    assert!(snapshots_named(lab, &second_name).is_empty());
}

#[test]
fn the_pipeline_and_the_orchestrator_take_equivalent_snapshots() {
    the_pipeline_and_the_orchestrator_take_equivalent_snapshots_through(ThawGuard::lock(
        "orch-pipe",
    ));
}

/// The same over vsock: the guest's second agent, through the hybrid vsock device.
#[test]
fn over_vsock_the_pipeline_and_the_orchestrator_take_equivalent_snapshots() {
    the_pipeline_and_the_orchestrator_take_equivalent_snapshots_through(ThawGuard::lock_vsock(
        "orch-pipe-vsock",
    ));
}

fn the_pipeline_and_the_orchestrator_take_equivalent_snapshots_through(guard: ThawGuard<'static>) {
    let lab = guard.lab;
    let piped = format!("t-pipe-{}", std::process::id());
    let orchestrated = format!("t-orch-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![piped.clone(), orchestrated.clone()]);

    let mut datasets = Vec::new();
    for d in &lab.datasets {
        datasets.extend(["--dataset", d.as_str()]);
    }
    let pipeline = format!(
        "'{}' --agent '{}' | '{}' {} --name '{}' | '{}'",
        evesnap_tests::bin("qga-freeze").display(),
        lab.agent,
        evesnap_tests::bin("zsnap").display(),
        datasets
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" "),
        piped,
        evesnap_tests::bin("qga-thaw").display(),
    );
    let out = Command::new("sh")
        .args(["-c", &pipeline])
        .env("EVESNAP_RUN_DIR", guard.run_dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("pipeline");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let piped_doc = doc_of(&out);
    assert!(piped_doc.ok);
    // The thaw went through the freeze's connection, kept by the watchdog: no reconnect
    // (and no qemu-ga reconnect pause) inside the window.
    let thaw = piped_doc
        .steps
        .iter()
        .find(|s| s.tool == "qga-thaw")
        .expect("thaw step");
    assert_eq!(thaw.fields["kept_connection"], true, "{thaw:?}");

    let out = orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": orchestrated, "type": "immediate"})),
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    // Frozen, but nothing quiesced the application: filesystem-consistent, no more.
    assert_eq!(r.consistency, Some(Consistency::Filesystem));

    for (name, expect_consistency) in [(&piped, None), (&orchestrated, Some("filesystem"))] {
        let snaps = snapshots_named(lab, name);
        assert_eq!(snaps.len(), 2, "{name}: {snaps:?}");
        let txgs: Vec<String> = snaps.iter().map(|s| zfs_get("createtxg", s)).collect();
        assert_eq!(txgs[0], txgs[1], "{name} is atomic");
        for s in &snaps {
            assert_eq!(zfs_get("org.lfedge.evesnap:frozen", s), "true", "{s}");
            assert_eq!(zfs_get("org.lfedge.evesnap:type", s), "IMMEDIATE", "{s}");
            if let Some(c) = expect_consistency {
                assert_eq!(zfs_get("org.lfedge.evesnap:consistency", s), c);
            }
        }
    }
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
}

/// `freeze.flush_first` (on by default): the guest's own `sync -f` of the plan's
/// mountpoints runs, and ends, before the freeze starts, and the report records it; a plan
/// can turn it off.
#[test]
fn by_default_the_volumes_are_flushed_before_the_freeze_and_a_plan_can_turn_it_off() {
    let guard = ThawGuard::lock("orch-flush");
    let lab = guard.lab;
    let flushed = format!("t-flush-{}", std::process::id());
    let unflushed = format!("t-noflush-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![flushed.clone(), unflushed.clone()]);
    let mounts: Vec<&str> = lab
        .datasets
        .iter()
        .map(|d| lab.guest_mounts[d].as_str())
        .collect();
    // Something to flush: data written in the guest just before, not yet written back.
    guest_sh(
        &mut connect(lab),
        &format!(
            "dd if=/dev/zero of={}/flushme bs=64k count=32 2>/dev/null",
            mounts[0]
        ),
    );

    let freeze = json!({"timeout_s": 20, "thaw_after_s": 60, "mountpoints": mounts});
    let out = orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": flushed, "freeze": freeze})),
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    let tools: Vec<&str> = r.steps.iter().map(|s| s.tool.as_str()).collect();
    let (at_flush, at_freeze) = (
        tools.iter().position(|t| *t == "flush"),
        tools.iter().position(|t| *t == "qga-freeze"),
    );
    assert!(
        matches!((at_flush, at_freeze), (Some(f), Some(z)) if f < z),
        "{tools:?}"
    );
    let flush_step = &r.steps[at_flush.unwrap_or_default()];
    let flush: FlushReport = flush_step.record().expect("a flush record");
    let mut command = vec!["/bin/sync".to_string(), "-f".to_string()];
    command.extend(mounts.iter().map(|m| m.to_string()));
    assert_eq!(
        flush,
        FlushReport {
            command,
            flushed: true,
            error: None
        }
    );
    // It had returned when the freeze began: the steps' own clocks say so.
    let started = |s: &evesnap::document::Step| {
        time::OffsetDateTime::parse(
            &s.started_at,
            &time::format_description::well_known::Rfc3339,
        )
        .expect("an RFC 3339 time")
    };
    let freeze_step = &r.steps[at_freeze.unwrap_or_default()];
    let flush_end = started(flush_step) + Duration::from_secs_f64(flush_step.duration_ms / 1000.0);
    assert!(
        flush_end <= started(freeze_step) + Duration::from_millis(2),
        "the flush ended at {flush_end}, after the freeze began ({})",
        freeze_step.started_at
    );
    assert_eq!(r.consistency, Some(Consistency::Filesystem));

    let freeze =
        json!({"timeout_s": 20, "thaw_after_s": 60, "mountpoints": mounts, "flush_first": false});
    let out = orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": unflushed, "freeze": freeze})),
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    assert!(r.steps.iter().all(|s| s.tool != "flush"), "{:?}", r.steps);
    assert_eq!(r.consistency, Some(Consistency::Filesystem));
    guest_sh(&mut connect(lab), &format!("rm -f {}/flushme", mounts[0]));
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
}

#[test]
fn a_missing_agent_fails_unless_the_plan_allows_a_crash_consistent_snapshot() {
    let guard = ThawGuard::lock("orch-noagent");
    let lab = guard.lab;
    let name = format!("t-noagent-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![name.clone()]);
    let missing = guard.run_dir.path().join("no-such-agent.sock");
    let agent = format!("unix:{}", missing.display());

    let out = orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": name, "agent": agent})),
        &[],
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(
        report(&out).error.as_ref().map(|e| e.kind.as_str()),
        Some("agent-unreachable")
    );
    assert!(snapshots_named(lab, &name).is_empty());

    let allowed = plan(
        lab,
        json!({"snapshot": name, "agent": agent, "freeze": {"required": false, "timeout_s": 2, "thaw_after_s": 60}}),
    );
    let out = orchestrate(&guard, &allowed, &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let r = report(&out);
    assert_eq!(r.consistency, Some(Consistency::Crash));
    assert!(
        stderr(&out).contains("crash-consistent"),
        "{}",
        stderr(&out)
    );
    for s in snapshots_named(lab, &name) {
        assert_eq!(zfs_get("org.lfedge.evesnap:frozen", &s), "false");
        assert_eq!(zfs_get("org.lfedge.evesnap:consistency", &s), "crash");
    }
}

#[test]
fn a_bad_plan_is_refused_with_the_field_named() {
    // Refused before anything is contacted: no lab needed.
    let bad = json!({"version": 1, "agent": "unix:/nonexistent", "datasets": ["p/a"], "freez": {}});
    let out = run_with_stdin(
        Command::new(evesnap_tests::bin("snap-orchestrate")),
        &bad.to_string(),
    );
    assert_eq!(code(&out), 2);
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("unknown field `freez`"),
        "{}",
        stderr(&out)
    );
    let out = run_with_stdin(
        Command::new(evesnap_tests::bin("snap-orchestrate")),
        "{\"version\": 1,\n \"agent\": }",
    );
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("line 2"), "{}", stderr(&out));
}

#[test]
fn a_hung_zfs_snapshot_does_not_keep_the_guest_frozen() {
    let guard = ThawGuard::lock("orch-hang");
    let lab = guard.lab;
    let name = format!("t-hang-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![name.clone()]);
    let (shim, _marker) = slow_zfs(guard.run_dir.path(), 8);
    let hanging = plan(
        lab,
        json!({"snapshot": name, "freeze": {"timeout_s": 3, "thaw_after_s": 60}}),
    );
    let out = orchestrate(
        &guard,
        &hanging,
        &[("EVESNAP_ZFS", shim.to_str().expect("utf-8 path"))],
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let r = report(&out);
    assert_eq!(step(&r, "qga-thaw")["ok"], true);
    let error = r.error.as_ref().expect("error");
    assert_eq!(error.step, "snapshot");
    assert!(
        error.description.contains("did not return within 3.0 s"),
        "{}",
        error.description
    );
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
    assert!(
        snapshots_named(lab, &name).is_empty(),
        "{:?}",
        snapshots_named(lab, &name)
    );
}

#[test]
fn a_freeze_that_does_not_verify_is_thawed_and_its_snapshot_destroyed() {
    // The agent answers the freeze, then reports thawed (another client thawed): the
    // snapshot started meanwhile cannot claim the freeze. A simulated agent, the lab's pool.
    let lab = test_lab();
    let _vm = vm_lock(); // rollback tests must not see this test's snapshot come and go
    let (agent, sim) = FakeAgent::simulated(SimState {
        thawed_by_another_client: true,
        ..SimState::default()
    });
    let dir = RunDir::new("orch-unverified");
    let name = format!("t-unverified-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![name.clone()]);
    let mut plan = plan(
        lab,
        json!({"snapshot": name, "agent": agent.address.to_string()}),
    );
    let fields = plan.as_object_mut().expect("object");
    fields.remove("qmp");
    fields.remove("disks");
    let mut command = Command::new(evesnap_tests::bin("snap-orchestrate"));
    command.env("EVESNAP_RUN_DIR", dir.path());
    let out = run_with_stdin(command, &plan.to_string());

    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let r = report(&out);
    assert!(!r.ok);
    assert_eq!(step(&r, "qga-freeze")["ok"], false);
    assert_eq!(step(&r, "zsnap")["ok"], false);
    assert_eq!(r.error.as_ref().map(|e| e.step.as_str()), Some("freeze"));
    assert_eq!(r.consistency, None, "no claim");
    // Started before the check failed: cut short (the window's zfs call is cancelled), or
    // taken and then destroyed; either way it is gone.
    let destroyed = format!("{}@{name}", lab.datasets[0]);
    let said = stderr(&out);
    assert!(
        said.contains("the freeze did not verify")
            && (said.contains(&destroyed) || said.contains("destroyed (nothing)")),
        "{said}"
    );
    assert!(
        snapshots_named(lab, &name).is_empty(),
        "{:?}",
        snapshots_named(lab, &name)
    );
    assert_eq!(
        sim.after_freeze(2),
        ["guest-fsfreeze-status", "guest-fsfreeze-thaw"],
        "checked, then thawed: {:?}",
        sim.state().log
    );
    assert_eq!(sim.state().frozen, 0);

    // The same, and the thaw after the failed check is refused: the guest may be frozen,
    // which is what the run reports (exit 6), still without a snapshot.
    sim.state().failing = vec![("guest-fsfreeze-thaw".into(), "thaw refused".into())];
    let again = format!("{name}-b");
    let _cleanup_again = Cleanup(lab, vec![again.clone()]);
    plan["snapshot"] = json!(again);
    // No watchdog: it would keep retrying a thaw the fake refuses, long after this test.
    plan["freeze"]["thaw_after_s"] = json!(0);
    let mut command = Command::new(evesnap_tests::bin("snap-orchestrate"));
    command.env("EVESNAP_RUN_DIR", dir.path());
    let out = run_with_stdin(command, &plan.to_string());
    assert_eq!(code(&out), 6, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("THE GUEST MAY BE FROZEN"),
        "{}",
        stderr(&out)
    );
    assert!(snapshots_named(lab, &again).is_empty());
}

/// The guest's `/sys/kernel/rcu_expedited`, and whether the run's marker file is there.
fn rcu_state(lab: &Lab) -> (String, bool) {
    let out = guest_sh(
        &mut connect(lab),
        "cat /sys/kernel/rcu_expedited; [ -e /run/evesnap-rcu-expedited ] && echo marker; true",
    );
    let mut lines = out.lines();
    let value = lines.next().unwrap_or_default().to_string();
    (value, lines.next() == Some("marker"))
}

#[test]
fn expedite_rcu_holds_for_the_freeze_and_the_guest_gets_its_setting_back() {
    let guard = ThawGuard::lock("orch-rcu");
    let lab = guard.lab;
    let name = format!("t-rcu-{}", std::process::id());
    let killed = format!("t-rcu-kill-{}", std::process::id());
    let _cleanup = Cleanup(lab, vec![name.clone(), killed.clone()]);
    assert_eq!(
        rcu_state(lab),
        ("0".to_string(), false),
        "the lab guest's default"
    );

    let freeze = json!({"timeout_s": 20, "thaw_after_s": 60, "expedite_rcu": true});
    let out = orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": name, "freeze": freeze})),
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(
        report(&out).expedited_rcu,
        Some(ExpeditedRcu {
            set: true,
            restored: Some(true),
            error: None
        })
    );
    assert_eq!(
        rcu_state(lab),
        ("0".to_string(), false),
        "restored after the thaw"
    );

    // Killed inside the window (a slow zfs keeps it there): the watchdog thaws after 3 s;
    // the setting is still expedited then, and the guest restores it by itself within its
    // fallback delay (10 s after it was set). The orphaned zfs finishes after 8 s, before
    // the cleanup destroys what it made.
    let (shim, marker) = slow_zfs(guard.run_dir.path(), 8);
    let shim_path = shim.to_str().expect("utf-8 path");
    let freeze = json!({"timeout_s": 20, "thaw_after_s": 3, "expedite_rcu": true});
    let mut child = spawn_orchestrate(
        &guard,
        &plan(lab, json!({"snapshot": killed, "freeze": freeze})),
        &[("EVESNAP_ZFS", shim_path)],
    );
    wait_for(&marker, Duration::from_secs(60));
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(lab) != GuestFsfreezeStatus::thawed {
        assert!(Instant::now() < deadline, "the watchdog did not thaw");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        rcu_state(lab),
        ("1".to_string(), true),
        "expedited during the freeze, nobody restored it yet"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while rcu_state(lab) != ("0".to_string(), false) {
        assert!(
            Instant::now() < deadline,
            "the guest did not restore its RCU setting: {:?}",
            rcu_state(lab)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The orphaned zfs is done by now (8 s): what it made goes with the cleanup.
    std::thread::sleep(Duration::from_secs(1));
}
