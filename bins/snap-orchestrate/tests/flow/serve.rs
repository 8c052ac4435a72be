//! `serve`: what a guest's `create` claims, with the simulated agent and the fake zfs.
//! The listener runs as a process (the test plays QEMU's end of the channel); the guest's
//! requests are written on the channel as `eve-guest-agent` writes them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evesnap::qga::testing::{FakeAgent, Sim, SimState};
use serde_json::{json, Value};

use crate::support::*;

// Verbatim from qemu-ga 7.2 in the lab guest (no udev: no serial): vda on /data0, vdb on
// /data1.
const VDA: &str = r#"{"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 7, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}"#;
const VDB: &str = r#"{"name": "vdb", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 8, "domain": 0, "function": 0}, "dev": "/dev/vdb", "target": 0}], "used-bytes": 14336, "type": "ext4"}"#;

/// A guest with `mounted` of its two disks mounted (fsinfo and the freeze agree).
fn guest(mounted: &[&str]) -> (FakeAgent, Sim) {
    let fs: Vec<Value> = mounted
        .iter()
        .map(|m| serde_json::from_str(if *m == "/data0" { VDA } else { VDB }).expect("fsinfo"))
        .collect();
    FakeAgent::simulated(SimState {
        mounts: mounted.iter().map(|m| m.to_string()).collect(),
        fsinfo: Value::Array(fs),
        ..SimState::default()
    })
}

/// A listener over the fake zfs and the simulated agent, and the test's end of the
/// channel; SIGTERMed on drop.
struct Listener {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    dir: std::path::PathBuf,
}

impl Listener {
    fn start(agent: &FakeAgent, zfs: &FakeZfs, test: &str) -> Listener {
        Listener::start_with(agent, zfs, test, &["--guest-min-interval", "0"])
    }

    /// As [`Listener::start`], with `flags` for the budget.
    fn start_with(agent: &FakeAgent, zfs: &FakeZfs, test: &str, flags: &[&str]) -> Listener {
        let dir =
            std::env::temp_dir().join(format!("evesnap-flow-serve-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("folder");
        let volumes = dir.join("volumes.json");
        std::fs::write(
            &volumes,
            json!({DS0: {"serial": "disk0", "pci": "0000:00:07.0"},
                   DS1: {"serial": "disk1", "pci": "0000:00:08.0"}})
            .to_string(),
        )
        .expect("volumes");
        let channel = dir.join("request.sock");
        let listener = UnixListener::bind(&channel).expect("bind");
        let child = Command::new(env!("CARGO_BIN_EXE_snap-orchestrate"))
            .arg("serve")
            .arg("--channel")
            .arg(&channel)
            .arg("--agent")
            .arg(agent.address.to_string())
            .arg("--volumes")
            .arg(&volumes)
            .arg("--zfs")
            .arg(zfs.path())
            .args(["--timeout", "5", "--thaw-after", "0"])
            .args(flags)
            .env("EVESNAP_RUN_DIR", dir.join("run"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("serve.err")).expect("stderr"))
            .spawn()
            .expect("spawn serve");
        // A listener that exits (a flag it does not know) fails the test, not hangs it.
        listener.set_nonblocking(true).expect("nonblocking");
        let mut child = child;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "serve exited ({status}):\n{}",
                            std::fs::read_to_string(dir.join("serve.err")).unwrap_or_default()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        Listener {
            child,
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
            dir,
        }
    }

    /// Sends a create of `disk` with `extra` fields; the reply.
    fn create(&mut self, id: &str, disk: Value, extra: Value) -> Value {
        let mut request = json!({"version": 1, "id": id, "op": "create", "disk": disk, "name": id});
        for (k, v) in extra.as_object().expect("object") {
            request[k] = v.clone();
        }
        self.writer
            .write_all(format!("\n{request}\n").as_bytes())
            .expect("write");
        self.reply()
    }

    /// The next reply on the channel.
    fn reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap_or_else(|e| {
                panic!(
                    "no reply ({e}); serve said:\n{}",
                    std::fs::read_to_string(self.dir.join("serve.err")).unwrap_or_default()
                )
            });
            assert!(n > 0, "the listener closed the channel");
            if !line.trim().is_empty() {
                return serde_json::from_str(line.trim()).expect("a JSON reply");
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mounted_vda() -> Value {
    json!({"path": "/data0", "device": "/dev/vda", "mountpoint": "/data0", "serial": "disk0",
           "pci": "0000:00:07.0"})
}

fn now_ms() -> u64 {
    evesnap::time::now_unix_us() / 1000
}

fn props(zfs: &FakeZfs, snapshot: &str) -> Value {
    zfs.state()["snapshots"][snapshot]["props"].clone()
}

#[test]
fn a_guest_create_claims_application_only_when_the_guest_says_it_quiesced() {
    let (agent, sim) = guest(&["/data0", "/data1"]);
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let mut serve = Listener::start(&agent, &zfs, "quiesced");

    let reply = serve.create(
        "plain",
        mounted_vda(),
        json!({"deadline_ms": now_ms() + 60_000}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["consistency"], "filesystem", "{reply}");
    let plain = props(&zfs, &format!("{DS0}@plain"));
    assert_eq!(plain[CONSISTENCY], "filesystem", "{plain}");
    assert_eq!(plain["org.lfedge.evesnap:frozen"], "true", "{plain}");

    let reply = serve.create(
        "quiet",
        mounted_vda(),
        json!({"quiesced": true, "deadline_ms": now_ms() + 60_000}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["consistency"], "application", "{reply}");
    assert_eq!(
        props(&zfs, &format!("{DS0}@quiet"))[CONSISTENCY],
        "application"
    );

    // Only /data0 was ever frozen: each freeze named it alone.
    let log = sim.state().log.clone();
    let freezes: Vec<&String> = log
        .iter()
        .filter(|c| c.starts_with("guest-fsfreeze-freeze"))
        .collect();
    assert_eq!(freezes.len(), 2, "{log:?}");
    assert!(
        freezes
            .iter()
            .all(|c| c.as_str() == "guest-fsfreeze-freeze-list"),
        "{log:?}"
    );
    assert_eq!(sim.state().frozen, 0);
}

#[test]
fn a_snapshot_is_created_claiming_nothing_and_the_claims_follow_its_return() {
    let (agent, _sim) = guest(&["/data0"]);
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let mut serve = Listener::start(&agent, &zfs, "claims");
    let reply = serve.create("c1", mounted_vda(), json!({"quiesced": true}));
    assert_eq!(reply["consistency"], "application", "{reply}");
    // The `zfs snapshot` call itself claims nothing: a call that outlives its caller
    // (SIGKILL) and completes after the thaw leaves a snapshot that says so.
    let taken = zfs.calls_of("snapshot");
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert!(
        taken[0].contains(&"org.lfedge.evesnap:frozen=false".to_string()),
        "{taken:?}"
    );
    assert!(
        taken[0].contains(&format!("{CONSISTENCY}=crash")),
        "{taken:?}"
    );
    let set = zfs.calls_of("set");
    for claim in [
        "org.lfedge.evesnap:frozen=true".to_string(),
        format!("{CONSISTENCY}=application"),
    ] {
        assert!(set.iter().any(|c| c.contains(&claim)), "{claim}: {set:?}");
    }
}

#[test]
fn an_unmounted_disk_is_snapshotted_without_any_freeze_and_claims_crash() {
    // /data1 is mounted, vda is not: nothing of the guest may be frozen.
    let (agent, sim) = guest(&["/data1"]);
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let mut serve = Listener::start(&agent, &zfs, "unmounted");
    let disk =
        json!({"path": "/dev/vda", "device": "/dev/vda", "serial": "disk0", "pci": "0000:00:07.0"});
    let reply = serve.create(
        "u1",
        disk,
        json!({"quiesced": true, "deadline_ms": now_ms() + 60_000}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["consistency"], "crash", "{reply}");
    assert_eq!(reply.get("freeze_window_ms"), None, "{reply}");
    let log = sim.state().log.clone();
    assert!(
        !log.iter().any(|c| c.starts_with("guest-fsfreeze-freeze")),
        "{log:?}"
    );
    let p = props(&zfs, &format!("{DS0}@u1"));
    assert_eq!(
        (
            p[CONSISTENCY].as_str(),
            p["org.lfedge.evesnap:frozen"].as_str()
        ),
        (Some("crash"), Some("false")),
        "{p}"
    );
}

#[test]
fn a_request_past_its_deadline_is_refused_and_one_that_outlives_it_claims_no_application() {
    let (agent, sim) = guest(&["/data0"]);
    let mut state = pool(&[DS0, DS1]);
    let zfs = FakeZfs::new(&state);
    let mut serve = Listener::start(&agent, &zfs, "deadline");

    // Past on the guest's clock (which runs an hour ahead of the host's here).
    sim.state().clock_offset_ns = 3_600_000_000_000;
    let reply = serve.create(
        "late",
        mounted_vda(),
        json!({"quiesced": true, "deadline_ms": now_ms() + 60_000}),
    );
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(
        (
            reply["error"]["kind"].as_str(),
            reply["error"]["code"].as_u64()
        ),
        (Some("expired"), Some(4)),
        "{reply}"
    );
    assert!(zfs.calls_of("snapshot").is_empty());
    assert!(!sim
        .state()
        .log
        .iter()
        .any(|c| c.starts_with("guest-fsfreeze-freeze")));

    // The guest gives up while `zfs snapshot` runs (1.5 s; it waited 1 s).
    sim.state().clock_offset_ns = 0;
    state = zfs.state();
    state["faults"] = json!({"snapshot": {"sleep": 1.5}});
    std::fs::write(zfs.path().with_file_name("state.json"), state.to_string()).expect("state");
    let started = Instant::now();
    let reply = serve.create(
        "slow",
        mounted_vda(),
        json!({"quiesced": true, "deadline_ms": now_ms() + 1_000}),
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["consistency"], "filesystem", "{reply}");
    assert_eq!(
        props(&zfs, &format!("{DS0}@slow"))[CONSISTENCY],
        "filesystem"
    );
}

/// Issue 14: `guest_post` a controller run left pending (its agent was lost) runs when
/// `serve` next talks to the agent, once, before the guest's request.
#[test]
fn serve_runs_a_pending_guest_post_once_before_the_next_request() {
    let (agent, sim) = guest(&["/data0"]);
    sim.state().programs = app_ctl();
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let mut listener = Listener::start(&agent, &zfs, "pending");
    let record = listener.dir.join("run").join(
        evesnap::pending::path(&agent.address)
            .file_name()
            .expect("a file name"),
    );
    let pending = json!({"agent": agent.address.to_string(), "id": "run-1",
        "recorded_at": "2026-11-29T07:00:00Z",
        "commands": [{"path": APP_CTL, "args": ["resume"], "timeout_s": 5.0}]});
    std::fs::write(&record, pending.to_string()).expect("the record");

    let reply = listener.create("c1", mounted_vda(), json!({}));
    assert_eq!(reply["ok"], true, "{reply}");
    let reply = listener.create("c2", mounted_vda(), json!({}));
    assert_eq!(reply["ok"], true, "{reply}");
    let resume = "guest-exec /usr/bin/app-ctl resume";
    let log = sim.state().log.clone();
    assert_eq!(log.iter().filter(|c| *c == resume).count(), 1, "{log:?}");
    assert!(
        at(&sim, resume) < at(&sim, "guest-fsfreeze-freeze"),
        "{log:?}"
    );
    assert!(!record.exists());
}

#[test]
fn a_failed_freeze_gives_a_crash_snapshot_only_to_a_guest_that_accepts_one() {
    const DESC: &str = "failed to freeze /data0: Operation not supported";
    let (agent, sim) = guest(&["/data0"]);
    sim.state().failing = vec![("guest-fsfreeze-freeze-list".into(), DESC.into())];
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let mut serve = Listener::start(&agent, &zfs, "accept-crash");

    let reply = serve.create("strict", mounted_vda(), json!({"quiesced": true}));
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["step"], "freeze", "{reply}");
    assert_eq!(reply.get("crash_reason"), None, "{reply}");
    assert!(zfs.snapshots().is_empty());

    let reply = serve.create(
        "lenient",
        mounted_vda(),
        json!({"quiesced": true, "accept_crash": true}),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["consistency"], "crash", "{reply}");
    assert_eq!(reply["snapshots"][0]["consistency"], "crash", "{reply}");
    let reason = reply["crash_reason"].as_str().unwrap_or_default();
    assert!(reason.contains(DESC), "{reply}");
    // The host's socket path never reaches the guest.
    assert!(!reason.contains("qga.sock"), "{reason}");
    let p = props(&zfs, &format!("{DS0}@lenient"));
    assert_eq!(p[CONSISTENCY], "crash", "{p}");
    assert!(
        p["org.lfedge.evesnap:crash_reason"]
            .as_str()
            .is_some_and(|r| r.contains(DESC)),
        "{p}"
    );
    assert_eq!(sim.state().frozen, 0);
}

fn fsinfo_calls(sim: &Sim) -> usize {
    let log = sim.state().log.clone();
    log.iter().filter(|c| *c == "guest-get-fsinfo").count()
}

/// Issue 14: valid requests cost the host an agent connection, QMP and zfs reads each, so
/// they are rated per VM before any of that; the refused are answered `rate-limited`.
#[test]
fn a_flood_of_valid_requests_is_rate_limited_before_the_agent_is_asked() {
    let (agent, sim) = guest(&["/data0"]);
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let flags = [
        "--guest-request-burst",
        "3",
        "--guest-request-interval",
        "1",
    ];
    let mut serve = Listener::start_with(&agent, &zfs, "flood", &flags);
    let flood: String = (0..40)
        .map(|i| {
            let r = json!({"version": 1, "id": format!("l{i}"), "op": "list",
                           "disk": mounted_vda()});
            format!("{r}\n")
        })
        .collect();
    serve.writer.write_all(flood.as_bytes()).expect("write");
    let replies: Vec<Value> = (0..40).map(|_| serve.reply()).collect();
    let served = replies.iter().filter(|r| r["ok"] == true).count();
    let limited: Vec<&Value> = replies
        .iter()
        .filter(|r| r["error"]["kind"] == "rate-limited")
        .collect();
    assert_eq!(served + limited.len(), 40, "{replies:?}");
    assert!((3..=5).contains(&served), "{served} served: {replies:?}");
    assert_eq!(
        fsinfo_calls(&sim),
        served,
        "only served requests ask the agent"
    );
    let wait = limited[limited.len() - 1]["error"]["retry_after_s"]
        .as_u64()
        .expect("retry_after_s");
    assert!((1..=2).contains(&wait), "{wait}");
    // Their records and log lines are rated like bad lines'.
    let log = std::fs::read_to_string(serve.dir.join("serve.err")).unwrap_or_default();
    let logged = log.lines().filter(|l| l.contains("rate-limited")).count();
    assert!(
        logged < limited.len(),
        "{logged} of {}: {log}",
        limited.len()
    );

    std::thread::sleep(Duration::from_secs(wait));
    let reply = serve.create("after", mounted_vda(), json!({}));
    assert_eq!(reply["ok"], true, "{reply}");
}

/// Issue 14: a create that failed counts toward `--guest-min-interval` like one that made a
/// snapshot (the interval used to come from the newest snapshot alone).
#[test]
fn a_failed_create_counts_toward_the_create_interval() {
    let (agent, sim) = guest(&["/data0"]);
    sim.state().failing = vec![("guest-fsfreeze-freeze-list".into(), "no".into())];
    let zfs = FakeZfs::new(&pool(&[DS0, DS1]));
    let mut serve = Listener::start_with(&agent, &zfs, "failed-create", &[]);
    let reply = serve.create("f1", mounted_vda(), json!({}));
    assert_eq!(reply["error"]["step"], "freeze", "{reply}");
    assert!(zfs.snapshots().is_empty());
    let asked = fsinfo_calls(&sim);
    let reply = serve.create("f2", mounted_vda(), json!({}));
    assert_eq!(reply["error"]["kind"], "rate-limited", "{reply}");
    let wait = reply["error"]["retry_after_s"].as_u64().unwrap_or(0);
    assert!((25..=30).contains(&wait), "{reply}");
    assert_eq!(
        fsinfo_calls(&sim),
        asked,
        "refused before the agent is asked"
    );
    // A list is no create: it is served.
    let list = json!({"version": 1, "id": "l1", "op": "list", "disk": mounted_vda()});
    serve
        .writer
        .write_all(format!("{list}\n").as_bytes())
        .expect("write");
    assert_eq!(serve.reply()["ok"], true);
}
