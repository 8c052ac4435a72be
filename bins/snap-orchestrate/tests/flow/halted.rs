//! A VM that is not running (EVE's `app_update` snapshots of a halted app): snapshot and
//! rollback without the agent, labelled `halted`/`halted_clean`, refused while a process on
//! the host holds a volume open.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use evesnap::exit::Exit;
use evesnap::qga::testing::{FakeAgent, SimState};
use evesnap::report::Consistency;
use serde_json::{json, Value};

use crate::support::*;

/// A folder of its own, gone at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("evesnap-flow-halted-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// DS0 as a filesystem mounted at `mountpoint` holding the VM's image (as on zfs-fuse).
fn image_pool(mountpoint: &Path) -> Value {
    let mut state = pool(&[DS0]);
    state["datasets"][DS0]["type"] = json!("filesystem");
    state["datasets"][DS0]["mountpoint"] = json!(mountpoint.to_string_lossy());
    std::fs::write(mountpoint.join("disk.img"), b"image").expect("image");
    state
}

/// A plan whose QMP socket does not exist (no QEMU) and whose agent does not answer.
fn halted_plan(dir: &Path, extra: Value) -> snap_orchestrate::Plan {
    let mut base = json!({"qmp": dir.join("no-qmp.sock"), "freeze": {"timeout_s": 0.3}});
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        base.extend(extra);
    }
    plan(&no_agent(), &[DS0], base)
}

#[test]
fn a_vm_without_qemu_is_snapshotted_as_halted_without_the_agent() {
    let dir = TempDir::new("noqemu");
    let mountpoint = dir.0.join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mountpoint");
    let zfs = FakeZfs::new(&image_pool(&mountpoint));
    let run = run(&halted_plan(&dir.0, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.consistency, Some(Consistency::Halted));
    assert_eq!(
        steps(&run),
        [("vm_state", true), ("preflight", true), ("zsnap", true)]
    );
    assert_eq!(run.report.steps[0].fields["in_use"], false);
    assert_eq!(
        zfs.state()["snapshots"][snap(DS0)]["props"][CONSISTENCY],
        "halted"
    );

    // The controller's word that it shut down cleanly.
    let zfs = FakeZfs::new(&image_pool(&mountpoint));
    let run = crate::support::run(&halted_plan(&dir.0, json!({"shutdown_clean": true})), &zfs);
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.consistency, Some(Consistency::HaltedClean));
}

#[test]
fn a_halted_vm_whose_volume_a_process_holds_open_is_refused() {
    let dir = TempDir::new("held");
    let mountpoint = dir.0.join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mountpoint");
    let zfs = FakeZfs::new(&image_pool(&mountpoint));
    // This test process is the one holding the image.
    let image = std::fs::File::open(mountpoint.join("disk.img")).expect("image");
    let run = run(&halted_plan(&dir.0, json!({})), &zfs);

    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    let message = &run.report.error.as_ref().expect("error").message;
    assert!(
        message.contains(&format!("process {}", std::process::id()))
            && message.contains("disk.img"),
        "{message}"
    );
    assert_eq!(steps(&run), [("vm_state", false)]);
    assert!(zfs.snapshots().is_empty());

    // So is a rollback.
    let mut state = image_pool(&mountpoint);
    add_snapshot(&mut state, &snap(DS0), 10, json!({}));
    let zfs = FakeZfs::new(&state);
    let extra = json!({"action": "rollback", "rollback": {"to": NAME}});
    let run = crate::support::run(&halted_plan(&dir.0, extra), &zfs);
    assert_eq!(exit(&run), Exit::Preflight, "{:?}", run.error);
    assert!(zfs.calls_of("rollback").is_empty());
    drop(image);
}

/// A QMP server answering `query-status` with `state`, on `path`, for one session.
fn fake_qmp(path: &Path, state: &'static str) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).expect("bind QMP");
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut out = stream.try_clone().expect("clone");
        let greeting = json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                  "package": ""}, "capabilities": []}});
        writeln!(out, "{greeting}").expect("greeting");
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let command: Value = serde_json::from_str(&line).expect("a QMP command");
            let reply = match command["execute"].as_str() {
                Some("query-status") => {
                    json!({"return": {"status": state, "running": false, "singlestep": false}})
                }
                _ => json!({"return": {}}),
            };
            let mut reply = reply;
            if let Some(id) = command.get("id") {
                reply["id"] = id.clone();
            }
            if writeln!(out, "{reply}").is_err() {
                return;
            }
        }
    })
}

#[test]
fn a_guest_that_powered_itself_off_is_halted_clean_and_a_running_one_is_not_halted() {
    let dir = TempDir::new("qmp");
    let mountpoint = dir.0.join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mountpoint");
    let qmp = dir.0.join("qmp.sock");
    let server = fake_qmp(&qmp, "shutdown");
    let zfs = FakeZfs::new(&image_pool(&mountpoint));
    let extra = json!({"qmp": qmp, "freeze": {"timeout_s": 0.3}});
    let run = run(&plan(&no_agent(), &[DS0], extra), &zfs);
    server.join().expect("QMP server");

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.consistency, Some(Consistency::HaltedClean));
    assert_eq!(run.report.steps[0].fields["clean"], true);

    // A VM that runs goes through the agent as always.
    std::fs::remove_file(&qmp).expect("old socket");
    let server = fake_qmp(&qmp, "running");
    let (agent, _sim) = FakeAgent::simulated(SimState::default());
    let zfs = FakeZfs::new(&image_pool(&mountpoint));
    let extra = json!({"qmp": qmp});
    let run = crate::support::run(&plan(&agent.address.to_string(), &[DS0], extra), &zfs);
    server.join().expect("QMP server");
    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(run.report.consistency, Some(Consistency::Filesystem));
}

#[test]
fn a_vm_without_qemu_is_rolled_back_without_the_agent_when_nothing_holds_it() {
    let dir = TempDir::new("rollback");
    let mountpoint = dir.0.join("mnt");
    std::fs::create_dir_all(&mountpoint).expect("mountpoint");
    let mut state = image_pool(&mountpoint);
    add_snapshot(&mut state, &snap(DS0), 10, json!({}));
    let zfs = FakeZfs::new(&state);
    let extra = json!({"action": "rollback", "rollback": {"to": NAME}});
    let run = run(&halted_plan(&dir.0, extra), &zfs);

    assert_eq!(exit(&run), Exit::Success, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", true), ("zrollback", true)]);
    assert_eq!(run.report.steps[0].fields["vm_stopped"], true);
    assert_eq!(
        zfs.calls_of("rollback"),
        [vec!["rollback".to_string(), snap(DS0)]]
    );
}

#[test]
fn a_qmp_that_answers_badly_fails_the_preflight_and_touches_nothing() {
    // It greets and negotiates, then answers `query-status` with an error.
    let qmp = crate::qmp::fake_qmp(json!({}));
    let (agent, sim) = FakeAgent::simulated(SimState::default());
    let mut state = pool(&[DS0]);
    add_snapshot(&mut state, &snap(DS0), 10, json!({}));
    let zfs = FakeZfs::new(&state);
    // A create: its `vm_state` step fails, before the guest is asked anything.
    let plan = |extra: Value| {
        let mut base = json!({"qmp": qmp, "snapshot": "s2"});
        if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
            base.extend(extra);
        }
        crate::support::plan(&agent.address.to_string(), &[DS0], base)
    };
    let run = run(&plan(json!({})), &zfs);

    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(failed_step(&run), Some("preflight"));
    assert_eq!(steps(&run), [("vm_state", false)]);
    let message = &run.report.error.as_ref().expect("error").message;
    assert!(message.contains("plan field `qmp`"), "{message}");
    assert!(sim.state().log.is_empty(), "{:?}", sim.state().log);
    assert!(zfs.calls_of("snapshot").is_empty());

    // So does a rollback's preflight: nothing is rolled back.
    let extra = json!({"action": "rollback", "rollback": {"to": NAME}});
    let run = crate::support::run(&plan(extra), &zfs);
    assert_eq!(exit(&run), Exit::StepFailed, "{:?}", run.error);
    assert_eq!(steps(&run), [("preflight", false)]);
    let message = &run.report.error.as_ref().expect("error").message;
    assert!(message.contains("plan field `qmp`"), "{message}");
    assert!(sim.state().log.is_empty(), "{:?}", sim.state().log);
    assert!(zfs.calls_of("rollback").is_empty());
}
