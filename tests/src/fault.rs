//! Fault injection on the lab: one trial injects one fault into a snapshot (or rollback)
//! of the lab VM and then checks what must hold whatever happened:
//!
//! 1. **thawed in time**: the guest reports `thawed` no later than the freeze plus the
//!    configured `thaw_after` (plus a slack for TCG and the watchdog's polling); where
//!    nothing was left to the watchdog, at once when the tool exits;
//! 2. **no false claim**: every snapshot left behind that says `org.lfedge.evesnap:frozen =
//!    true` (or a `consistency` other than `crash`) really holds frozen filesystems: the ext4
//!    image inside it is clean (a frozen ext4 has no `needs_recovery`; a mounted, unfrozen
//!    one always has), and the two properties agree with each other and with the report;
//! 3. **the report says what happened**: the exit code matches the report (`ok`, `error.kind`,
//!    a named `error.step` and a description), and faults with a known outcome get it
//!    (e.g. a failing `zfs` is exit 1 at step `snapshot` with no snapshot left);
//! 4. **no data lost**: after a rollback to a snapshot, the files equal the ones written
//!    before it (md5 in the guest); after an interrupted rollback each volume holds either
//!    the old or the snapshot's data, and a second rollback restores the snapshot's.
//!
//! `zfs` is a shim ([`Shim`]) in front of the real one: it records calls, touches markers
//! when a snapshot or rollback starts and ends (to time kills), and can delay, fail or
//! hide the pool's free space, as each trial asks. The soak (`scripts/soak`) draws random
//! faults and timings from [`Fault::random`]; `tests/tests/faults.rs` runs a fixed quick
//! subset.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::guest::{resume_and_thaw, set_paused, try_connect, try_guest_sh, wait_thawed};
use crate::lab::Lab;
use crate::run::stop_watchdogs;
use crate::zfs::{list_snapshots, real_zfs, zfs, zfs_get};

/// The watchdog deadline every trial configures.
pub const THAW_AFTER: Duration = Duration::from_secs(5);
/// What the lab may need beyond the deadline: the watchdog polls every 0.5 s, retries every
/// 2 s, and a TCG guest answers slowly.
pub const SLACK: Duration = Duration::from_secs(8);
/// What a freeze window measured by the tool itself may exceed `thaw_after` by.
pub const WINDOW_SLACK: Duration = Duration::from_millis(1500);
/// A trial whose tool runs longer than this has hung.
const HANG: Duration = Duration::from_secs(120);

/// A small deterministic generator (xorshift64*), so a soak can be replayed by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to.saturating_sub(from) + 1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Kill,
    Term,
}

impl Sig {
    fn signal(self) -> nix::sys::signal::Signal {
        match self {
            Sig::Kill => nix::sys::signal::Signal::SIGKILL,
            Sig::Term => nix::sys::signal::Signal::SIGTERM,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sig::Kill => "KILL",
            Sig::Term => "TERM",
        }
    }
}

/// Where in the create flow a signal lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// While `guest_pre` runs (before the freeze).
    BeforeFreeze,
    /// Frozen, `zfs snapshot` started but not yet at work (the shim waits first).
    Frozen,
    /// Frozen, the snapshot exists but `zfs snapshot` has not returned.
    Snapshot,
    /// Right after `zfs snapshot` returned: thawing.
    Thaw,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::BeforeFreeze,
        Phase::Frozen,
        Phase::Snapshot,
        Phase::Thaw,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::BeforeFreeze => "before-freeze",
            Phase::Frozen => "frozen",
            Phase::Snapshot => "snapshot",
            Phase::Thaw => "thaw",
        }
    }
}

/// A tool of the `qga-freeze | zsnap | qga-thaw` pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Freeze,
    Zsnap,
    Thaw,
}

impl Tool {
    pub const ALL: [Tool; 3] = [Tool::Freeze, Tool::Zsnap, Tool::Thaw];

    fn name(self) -> &'static str {
        match self {
            Tool::Freeze => "qga-freeze",
            Tool::Zsnap => "zsnap",
            Tool::Thaw => "qga-thaw",
        }
    }
}

/// One fault, with its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// `snap-orchestrate` gets a signal at `phase`, `jitter` after its marker.
    Orchestrator {
        signal: Sig,
        phase: Phase,
        jitter: Duration,
    },
    /// One tool of the pipeline gets a signal while it works.
    Pipeline {
        tool: Tool,
        signal: Sig,
        jitter: Duration,
    },
    /// `qga-freeze | zsnap | qga-thaw` whose `zfs snapshot` outlasts the watchdog.
    PipelineOutlastsWatchdog,
    /// qemu-ga is killed inside the guest `after` the freeze (init respawns it).
    AgentKilled { signal: Sig, after: Duration },
    /// The VM is paused (QMP `stop`) once frozen and resumed `paused` later.
    VmPaused { paused: Duration },
    /// `zfs snapshot` fails.
    ZfsFails,
    /// `zfs snapshot` blocks past the orchestrator's own timeout (and the watchdog's deadline).
    ZfsHangs,
    /// `zfs snapshot` returns after the watchdog fired but within the agent timeout.
    ZfsOutlastsWatchdog,
    /// `zfs snapshot` is slow but finishes within the deadline.
    ZfsSlow { delay: Duration },
    /// The pool fills up between the preflight and the snapshot (`out of space`).
    PoolFull,
    /// The preflight finds no room.
    NoRoom,
    /// A held snapshot meets retention and a rollback that would destroy it.
    Held,
    /// Stale requests and garbage bytes are left on the agent channel before the run.
    Garbage { seed: u64 },
    /// Two orchestrations of the same VM at once.
    Concurrent,
    /// A rollback, interrupted by a signal during `zfs rollback` (or not).
    Rollback { signal: Option<Sig> },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Orchestrator {
                signal,
                phase,
                jitter,
            } => write!(
                f,
                "orchestrator SIG{} @{} +{}ms",
                signal.name(),
                phase.name(),
                jitter.as_millis()
            ),
            Fault::Pipeline {
                tool,
                signal,
                jitter,
            } => write!(
                f,
                "pipeline {} SIG{} +{}ms",
                tool.name(),
                signal.name(),
                jitter.as_millis()
            ),
            Fault::PipelineOutlastsWatchdog => {
                write!(f, "pipeline zfs snapshot outlasts the watchdog")
            }
            Fault::AgentKilled { signal, after } => write!(
                f,
                "qemu-ga SIG{} while frozen +{}ms",
                signal.name(),
                after.as_millis()
            ),
            Fault::VmPaused { paused } => {
                write!(f, "VM paused while frozen {}ms", paused.as_millis())
            }
            Fault::ZfsFails => write!(f, "zfs snapshot fails"),
            Fault::ZfsHangs => write!(f, "zfs snapshot hangs past the deadline"),
            Fault::ZfsOutlastsWatchdog => write!(f, "zfs snapshot outlasts the watchdog"),
            Fault::ZfsSlow { delay } => write!(f, "zfs snapshot slow {}ms", delay.as_millis()),
            Fault::PoolFull => write!(f, "pool full at the snapshot"),
            Fault::NoRoom => write!(f, "no room at the preflight"),
            Fault::Held => write!(f, "held snapshot"),
            Fault::Garbage { seed } => write!(f, "garbage on the agent channel ({seed:x})"),
            Fault::Concurrent => write!(f, "two orchestrations at once"),
            Fault::Rollback { signal: None } => write!(f, "rollback"),
            Fault::Rollback { signal: Some(s) } => {
                write!(f, "rollback SIG{} during zfs rollback", s.name())
            }
        }
    }
}

impl Fault {
    /// A random fault with a random timing.
    pub fn random(rng: &mut Rng) -> Fault {
        let signal = |rng: &mut Rng| {
            if rng.below(2) == 0 {
                Sig::Kill
            } else {
                Sig::Term
            }
        };
        match rng.below(16) {
            0..=4 => Fault::Orchestrator {
                signal: signal(rng),
                phase: Phase::ALL[rng.below(4) as usize],
                jitter: rng.millis(0, 400),
            },
            5 | 6 if rng.below(6) == 0 => Fault::PipelineOutlastsWatchdog,
            5 | 6 => Fault::Pipeline {
                tool: Tool::ALL[rng.below(3) as usize],
                signal: signal(rng),
                jitter: rng.millis(0, 400),
            },
            7 => Fault::AgentKilled {
                signal: signal(rng),
                after: rng.millis(100, 1500),
            },
            8 => Fault::VmPaused {
                paused: rng.millis(500, 9000),
            },
            9 => match rng.below(4) {
                0 => Fault::ZfsFails,
                1 => Fault::ZfsHangs,
                2 => Fault::ZfsOutlastsWatchdog,
                _ => Fault::ZfsSlow {
                    delay: rng.millis(200, 3000),
                },
            },
            10 => {
                if rng.below(2) == 0 {
                    Fault::PoolFull
                } else {
                    Fault::NoRoom
                }
            }
            11 => Fault::Held,
            12 => Fault::Garbage {
                seed: rng.next_u64(),
            },
            13 => Fault::Concurrent,
            _ => Fault::Rollback {
                signal: match rng.below(3) {
                    0 => None,
                    1 => Some(Sig::Kill),
                    _ => Some(Sig::Term),
                },
            },
        }
    }
}

/// What one trial found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub fault: String,
    /// Exit codes of the tools that ran to the end (`-SIG` for a signal).
    pub exits: Vec<i32>,
    /// Seconds from the freeze (or the fault) to the guest reporting thawed.
    pub thawed_after: Option<f64>,
    /// The consistency the report or the snapshots claim, if any.
    pub claim: String,
    pub elapsed: Duration,
    /// Broken invariants; empty: passed.
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// One table row.
    pub fn row(&self) -> String {
        let exits: Vec<String> = self.exits.iter().map(i32::to_string).collect();
        format!(
            "{:<4} {:<48} {:<9} {:>7} {:<12} {:>6.1}s {}",
            if self.passed() { "ok" } else { "FAIL" },
            self.fault,
            exits.join(","),
            self.thawed_after
                .map_or("-".to_string(), |s| format!("{s:.1}s")),
            self.claim,
            self.elapsed.as_secs_f64(),
            if self.passed() {
                self.notes.join("; ")
            } else {
                self.failures.join("; ")
            }
        )
    }

    pub fn header() -> String {
        format!(
            "{:<4} {:<48} {:<9} {:>7} {:<12} {:>7} {}",
            "", "fault", "exit", "thawed", "claim", "time", "notes / failures"
        )
    }
}

/// The `zfs` shim of one trial: a script in `dir` in front of the real `zfs`.
#[derive(Debug)]
pub struct Shim {
    pub dir: PathBuf,
    pub program: PathBuf,
}

impl Shim {
    pub fn new(dir: &Path) -> Shim {
        let real = real_zfs();
        let d = dir.display();
        let r = real.display();
        // Config files in `dir`: snapshot.before / snapshot.after / rollback.before (seconds to
        // sleep), snapshot.fail (stderr to fail with), noroom (report 4 KiB available).
        let script = format!(
            r#"#!/bin/sh
d='{d}'
echo "$*" >> "$d/calls"
touch "$d/active.$$"
trap 'rm -f "$d/active.$$"' EXIT
case "$1" in
  snapshot)
    if [ $# -gt 1 ]; then
      touch "$d/snapshot-started"
      [ -f "$d/snapshot.before" ] && sleep "$(cat "$d/snapshot.before")"
      if [ -f "$d/snapshot.fail" ]; then cat "$d/snapshot.fail" >&2; exit 1; fi
      '{r}' "$@"; rc=$?
      touch "$d/snapshot-done"
      [ -f "$d/snapshot.after" ] && sleep "$(cat "$d/snapshot.after")"
      exit $rc
    fi;;
  rollback)
    touch "$d/rollback-started"
    [ -f "$d/rollback.before" ] && sleep "$(cat "$d/rollback.before")"
    '{r}' "$@"; rc=$?
    touch "$d/rollback-done"
    exit $rc;;
  get)
    if [ -f "$d/noroom" ]; then
      '{r}' "$@" > "$d/get.$$"; rc=$?
      sed 's/\tavailable\t[0-9][0-9]*$/\tavailable\t4096/' "$d/get.$$"; rm -f "$d/get.$$"
      exit $rc
    fi;;
esac
'{r}' "$@"
"#
        );
        let program = dir.join("zfs");
        std::fs::write(&program, script).expect("write the zfs shim");
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod the zfs shim");
        Shim {
            dir: dir.to_path_buf(),
            program,
        }
    }

    pub fn set(&self, name: &str, value: &str) {
        std::fs::write(self.dir.join(name), value).expect("write shim config");
    }

    pub fn marker(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Waits until no shim call runs any more (an orphaned `zfs` after a SIGKILL).
    pub fn wait_idle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let busy = std::fs::read_dir(&self.dir)
                .map(|entries| {
                    entries.flatten().any(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.starts_with("active."))
                    })
                })
                .unwrap_or(false);
            if !busy {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_for(path: &Path, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(Instant::now())
}

fn exit_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| -status.signal().unwrap_or(0))
}

fn md5_pair(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// The files a trial writes before the snapshot, and their md5s.
/// The application's hooks: `guest_pre` marks it quiesced, `guest_post` running again.
const QUIESCE: &str = "echo quiesced > /run/app.state; sync";
const RESUME: &str = "echo running > /run/app.state";
const DATA: &str = "echo running > /run/app.state && dd if=/dev/urandom of=/data0/fault.bin bs=64k count=4 2>/dev/null && \
    dd if=/dev/urandom of=/data1/fault.bin bs=64k count=4 2>/dev/null && sync && \
    md5sum /data0/fault.bin /data1/fault.bin";
const MD5: &str = "md5sum /data0/fault.bin /data1/fault.bin";
/// Remounts what a killed rollback left unmounted.
const MOUNTS: &str =
    "grep -q ' /data0 ' /proc/mounts || mount -t ext4 \"/dev/$(for b in /sys/block/vd*; do \
    [ \"$(cat $b/serial)\" = disk0 ] && echo ${b##*/}; done)\" /data0; \
    grep -q ' /data1 ' /proc/mounts || mount -t ext4 \"/dev/$(for b in /sys/block/vd*; do \
    [ \"$(cat $b/serial)\" = disk1 ] && echo ${b##*/}; done)\" /data1; \
    grep -q ' /data0 ' /proc/mounts && grep -q ' /data1 ' /proc/mounts";

/// One trial on the lab. The caller holds the VM lock.
#[derive(Debug)]
pub struct Trial<'a> {
    pub lab: &'a Lab,
    pub dir: PathBuf,
    pub run_dir: PathBuf,
    pub name: String,
    pub shim: Shim,
    started: Instant,
    out: Outcome,
    /// Processes this trial started, killed by pid at the end if still running.
    children: Vec<u32>,
    /// Every snapshot name this trial may have made.
    names: Vec<String>,
    /// md5s written before the snapshot.
    data: Vec<String>,
    /// Clones made to read snapshots (destroyed at once; again at cleanup if need be).
    clones: Vec<String>,
}

impl<'a> Trial<'a> {
    pub fn new(lab: &'a Lab, index: usize, fault: &Fault) -> Trial<'a> {
        let dir =
            std::env::temp_dir().join(format!("evesnap-fault-{}-{index}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let run_dir = dir.join("run");
        std::fs::create_dir_all(&run_dir).expect("trial folder");
        let shim = Shim::new(&dir);
        let name = format!("fault-{}-{index}", std::process::id());
        Trial {
            lab,
            dir,
            run_dir,
            names: vec![name.clone()],
            name,
            shim,
            started: Instant::now(),
            out: Outcome {
                fault: fault.to_string(),
                exits: Vec::new(),
                thawed_after: None,
                claim: "-".into(),
                elapsed: Duration::ZERO,
                failures: Vec::new(),
                notes: Vec::new(),
            },
            children: Vec::new(),
            data: Vec::new(),
            clones: Vec::new(),
        }
    }

    fn fail(&mut self, what: impl Into<String>) {
        self.out.failures.push(what.into());
    }

    fn note(&mut self, what: impl Into<String>) {
        self.out.notes.push(what.into());
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.fail(what);
        }
    }

    /// Runs a shell line in the guest on a connection of its own; its stdout, or why not.
    fn sh(&self, script: &str) -> Result<String, String> {
        let mut client =
            try_connect(self.lab, Duration::from_secs(30)).map_err(|e| e.to_string())?;
        try_guest_sh(&mut client, script)
    }

    fn plan(&self, name: &str, extra: Value) -> Value {
        let mut plan = json!({
            "version": 1,
            "type": "app_update",
            "agent": self.lab.agent,
            "qmp": self.lab.qmp,
            "datasets": self.lab.datasets,
            "disks": self.lab.disks,
            "snapshot": name,
            "freeze": {"timeout_s": 4, "thaw_after_s": THAW_AFTER.as_secs_f64()},
            "guest_pre": [{"path": "/bin/sh", "args": ["-c", QUIESCE]}],
            "guest_post": [{"path": "/bin/sh", "args": ["-c", RESUME]}],
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            plan[k] = v.clone();
        }
        plan
    }

    fn rollback_plan(&self, to: &str, destroy_newer: bool) -> Value {
        self.plan(
            to,
            json!({
                "action": "rollback",
                "rollback": {"to": to, "destroy_newer": destroy_newer},
                "guest_pre": [{"path": "/bin/umount", "args": ["/data0"]}, {"path": "/bin/umount", "args": ["/data1"]}],
                "guest_post": [
                    {"path": "/bin/sh", "args": ["-c", "echo 3 > /proc/sys/vm/drop_caches"]},
                    {"path": "/bin/sh", "args": ["-c", MOUNTS]},
                ],
            }),
        )
    }

    /// Starts `snap-orchestrate` on `plan` with the shim and this trial's runtime folder.
    fn spawn_orchestrator(&mut self, plan: &Value) -> Child {
        let mut child = Command::new(crate::bin("snap-orchestrate"))
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .env("EVESNAP_ZFS", &self.shim.program)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn snap-orchestrate");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(plan.to_string().as_bytes())
            .expect("write the plan");
        drop(stdin);
        self.children.push(child.id());
        child
    }

    /// Waits for a child (killing it after [`HANG`]); exit code and stdout/stderr.
    fn finish(&mut self, child: Child) -> (i32, String, String) {
        let pid = child.id();
        let waiter = std::thread::spawn(move || child.wait_with_output());
        let deadline = Instant::now() + HANG;
        while !waiter.is_finished() {
            if Instant::now() > deadline {
                self.fail(format!("pid {pid} hung for {} s: killed", HANG.as_secs()));
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = waiter.join().expect("waiter").expect("wait");
        let code = exit_of(out.status);
        self.out.exits.push(code);
        (
            code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn kill(&mut self, pid: u32, signal: Sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal.signal());
    }

    /// Invariant 3: the exit code and the report agree.
    fn check_report(&mut self, code: i32, stdout: &str, stderr: &str) -> Option<Value> {
        if code < 0 {
            return None; // killed: no report to check
        }
        let report: Value = match serde_json::from_str(stdout) {
            Ok(r) => r,
            Err(e) => {
                if code == 2 || code == 101 {
                    self.fail(format!("exit {code} without a report: {}", stderr.trim()));
                } else {
                    self.fail(format!("exit {code}: no report ({e}): {}", stderr.trim()));
                }
                return None;
            }
        };
        let ok = report["ok"] == true;
        let kind = report["error"]["kind"].as_str().unwrap_or("");
        let expected_kind = evesnap::exit::Exit::ALL
            .iter()
            .find(|e| i32::from(e.code()) == code)
            .map(|e| e.kind());
        self.check(ok == (code == 0), format!("exit {code} but report ok={ok}"));
        if code != 0 {
            self.check(
                Some(kind) == expected_kind,
                format!("exit {code} but error.kind {kind:?}"),
            );
            let step = report["error"]["step"].as_str().unwrap_or("");
            self.check(!step.is_empty(), "the error names no step");
            let description = report["error"]["description"].as_str().unwrap_or("");
            self.check(!description.is_empty(), "the error has no description");
            self.check(
                !stderr.trim().is_empty(),
                "a failure said nothing on stderr",
            );
        }
        // Invariant 1 where the report can tell: the tool's own thaw came in time.
        let thawed = report["steps"].as_array().and_then(|steps| {
            steps
                .iter()
                .find(|s| s["tool"] == "qga-thaw" && s["ok"] == true)
                .and_then(|s| s["thawed"].as_i64())
        });
        if let (Some(window), Some(n)) = (report["freeze_window_ms"].as_f64(), thawed) {
            let limit = (THAW_AFTER + WINDOW_SLACK).as_secs_f64() * 1000.0;
            self.check(
                n == 0 || window <= limit,
                format!(
                    "the guest stayed frozen {window:.0} ms, beyond thaw_after ({} s)",
                    THAW_AFTER.as_secs()
                ),
            );
        }
        Some(report)
    }

    /// The snapshots (full names) of this trial's names that exist now.
    fn snapshots(&mut self) -> Vec<String> {
        let listed = match list_snapshots(&format!("{}/lab", self.lab.pool), true) {
            Ok(listed) => listed,
            Err(e) => {
                self.fail(format!("cannot list the snapshots: {e}"));
                return Vec::new();
            }
        };
        listed
            .into_iter()
            .filter(|l| {
                self.names
                    .iter()
                    .any(|n| l.ends_with(&format!("@{n}")) && !l.contains("/vm0@"))
            })
            .collect()
    }

    /// Whether the ext4 image inside `snapshot` is clean (frozen when taken), through a
    /// temporary clone.
    fn image_clean(&mut self, snapshot: &str) -> Option<bool> {
        // A fresh name and mountpoint for every check: a clone that is slow to go away
        // must not stop the next check.
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let clone = format!(
            "{}/lab/fault-clone-{}-{n}",
            self.lab.pool,
            std::process::id()
        );
        let mnt = self.dir.join(format!("clone-{n}"));
        let made = zfs(&[
            "clone",
            "-o",
            &format!("mountpoint={}", mnt.display()),
            snapshot,
            &clone,
        ]);
        let image = mnt.join("disk.img");
        let features =
            if made.status.success() && wait_for(&image, Duration::from_secs(5)).is_some() {
                let out = Command::new("dumpe2fs")
                    .args(["-h", &image.display().to_string()])
                    .stderr(Stdio::null())
                    .output();
                out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            } else {
                String::new()
            };
        if made.status.success() {
            self.clones.push(clone.clone());
            destroy_clone(&clone);
        }
        let line = features
            .lines()
            .find(|l| l.starts_with("Filesystem features:"));
        if line.is_none() {
            // Unverified is not passed.
            self.fail(format!(
                "cannot read the ext4 inside {snapshot} to verify its claim: {}",
                String::from_utf8_lossy(&made.stderr).trim()
            ));
        }
        line.map(|l| !l.contains("needs_recovery"))
    }

    /// Invariant 5: a tool that ran to its end brought the guest back: the application
    /// its `guest_pre` quiesced runs again (`guest_post` ran), the volumes a rollback's
    /// `guest_pre` unmounted are mounted again. A SIGKILL leaves that to the operator.
    fn check_resumed(&mut self, code: i32) {
        let state = self.sh("cat /run/app.state; grep -c ' /data[01] ' /proc/mounts || true");
        match state {
            Ok(text) => {
                let mut lines = text.lines();
                let app = lines.next().unwrap_or("").trim().to_string();
                let mounted = lines.next().unwrap_or("").trim().to_string();
                // 3, 4, 6: the agent does not answer, nothing can run in the guest (the
                // report says so, critical for 6).
                if code >= 0 && ![3, 4, 6].contains(&code) {
                    self.check(
                        app == "running",
                        format!(
                            "exit {code} but the application stays {app}: guest_post did not run"
                        ),
                    );
                    self.check(
                        mounted == "2",
                        format!("exit {code} but {mounted} of 2 volumes are mounted in the guest"),
                    );
                } else if app != "running" || mounted != "2" {
                    self.note(format!(
                        "exit {code}: left to the operator: application {app}, {mounted} volumes mounted"
                    ));
                }
            }
            Err(e) => self.fail(format!("cannot read the guest's state: {e}")),
        }
    }

    /// Invariant 2: what the snapshots claim is true; returns the claim.
    fn check_claims(&mut self, report: Option<&Value>) {
        let snapshots = self.snapshots();
        let mut claims = Vec::new();
        for s in &snapshots {
            let frozen = zfs_get("org.lfedge.evesnap:frozen", s);
            let consistency = zfs_get("org.lfedge.evesnap:consistency", s);
            let claims_frozen =
                frozen == "true" || matches!(consistency.as_str(), "application" | "filesystem");
            if consistency != "-" {
                let coherent = (frozen == "true") == (consistency != "crash");
                self.check(
                    coherent,
                    format!("{s}: frozen={frozen} but consistency={consistency}"),
                );
            }
            if let Some(r) = report {
                if let Some(c) = r["consistency"].as_str() {
                    if consistency != "-" && r["snapshots"].is_array() {
                        self.check(
                            c == consistency,
                            format!("{s}: property {consistency}, report {c}"),
                        );
                    }
                }
            }
            claims.push(if consistency == "-" {
                format!("frozen={frozen}")
            } else {
                consistency.clone()
            });
            if claims_frozen {
                match self.image_clean(s) {
                    Some(true) => {}
                    Some(false) => self.fail(format!(
                        "{s} claims frozen={frozen} consistency={consistency}, but its ext4 needs recovery: \
                         it was not taken frozen"
                    )),
                    None => self.note(format!("{s}: image not checked")),
                }
            }
        }
        claims.sort();
        claims.dedup();
        self.out.claim = if snapshots.is_empty() {
            "none".into()
        } else {
            claims.join(",")
        };
    }

    /// Invariant 1: thawed by `deadline` (measured from `reference`).
    fn check_thawed(&mut self, reference: Instant, deadline: Instant) {
        match wait_thawed(self.lab, deadline + Duration::from_secs(30)) {
            Some(at) => {
                self.out.thawed_after = Some(at.saturating_duration_since(reference).as_secs_f64());
                if at > deadline {
                    self.fail(format!(
                        "thawed only {:.1} s after the deadline",
                        (at - deadline).as_secs_f64()
                    ));
                }
            }
            None => self.fail("THE GUEST STAYED FROZEN"),
        }
    }

    /// Writes the trial's data in the guest and remembers its md5s.
    fn write_data(&mut self) -> bool {
        match self.sh(DATA) {
            Ok(out) => {
                self.data = md5_pair(&out);
                true
            }
            Err(e) => {
                self.fail(format!("cannot write the data: {e}"));
                false
            }
        }
    }

    /// Invariant 4: overwrite, roll back to `name` (whose snapshot holds the trial's
    /// data), and compare.
    fn check_rollback(&mut self, name: &str) {
        if let Err(e) = self.sh(
            "dd if=/dev/urandom of=/data0/fault.bin bs=64k count=4 conv=notrunc 2>/dev/null; \
             dd if=/dev/urandom of=/data1/fault.bin bs=64k count=4 conv=notrunc 2>/dev/null; sync",
        ) {
            self.fail(format!("cannot overwrite: {e}"));
            return;
        }
        let plan = self.rollback_plan(name, true);
        let child = self.spawn_orchestrator(&plan);
        let (code, stdout, stderr) = self.finish(child);
        self.check_report(code, &stdout, &stderr);
        if code != 0 {
            self.fail(format!(
                "the rollback to {name} failed ({code}): {}",
                stderr.trim()
            ));
            return;
        }
        match self.sh(MD5) {
            Ok(out) => {
                let now = md5_pair(&out);
                self.check(
                    now == self.data,
                    format!(
                        "after the rollback the data differs: {now:?} vs {:?}",
                        self.data
                    ),
                );
            }
            Err(e) => self.fail(format!("cannot read the data back: {e}")),
        }
    }

    /// Takes a snapshot with no fault (setup for held/rollback trials).
    fn take_clean(&mut self, name: &str) -> bool {
        self.names.push(name.to_string());
        let plan = self.plan(name, json!({}));
        let child = self.spawn_orchestrator(&plan);
        let (code, _, stderr) = self.finish(child);
        self.out.exits.pop();
        if code != 0 {
            self.fail(format!(
                "setup snapshot {name} failed ({code}): {}",
                stderr.trim()
            ));
        }
        code == 0
    }

    /// Runs the fault and checks the invariants.
    pub fn run(mut self, fault: &Fault, verify_rollback: bool) -> Outcome {
        if self.write_data() {
            match fault {
                Fault::Orchestrator {
                    signal,
                    phase,
                    jitter,
                } => self.orchestrator(*signal, *phase, *jitter, verify_rollback),
                Fault::Pipeline {
                    tool,
                    signal,
                    jitter,
                } => self.pipeline(Some((*tool, *signal)), *jitter, Duration::from_secs(1)),
                Fault::PipelineOutlastsWatchdog => {
                    self.pipeline(None, Duration::ZERO, THAW_AFTER + Duration::from_secs(2))
                }
                Fault::AgentKilled { signal, after } => self.agent_killed(*signal, *after),
                Fault::VmPaused { paused } => self.vm_paused(*paused),
                Fault::ZfsFails | Fault::PoolFull => self.zfs_fails(fault == &Fault::PoolFull),
                Fault::ZfsHangs => self.zfs_slow(THAW_AFTER + Duration::from_secs(3), 4.0, false),
                Fault::ZfsOutlastsWatchdog => {
                    self.zfs_slow(THAW_AFTER + Duration::from_secs(2), 15.0, false)
                }
                Fault::ZfsSlow { delay } => self.zfs_slow(*delay, 4.0, verify_rollback),
                Fault::NoRoom => self.no_room(),
                Fault::Held => self.held(),
                Fault::Garbage { seed } => self.garbage(*seed, verify_rollback),
                Fault::Concurrent => self.concurrent(),
                Fault::Rollback { signal } => self.rollback(*signal),
            }
        }
        self.cleanup();
        self.out.elapsed = self.started.elapsed();
        self.out.clone()
    }

    fn orchestrator(&mut self, signal: Sig, phase: Phase, jitter: Duration, verify: bool) {
        let mut extra = json!({});
        match phase {
            Phase::BeforeFreeze => {
                extra = json!({"guest_pre": [{"path": "/bin/sh", "args": ["-c", format!("{QUIESCE}; sleep 2")]}]});
            }
            Phase::Frozen => self.shim.set("snapshot.before", "1.5"),
            Phase::Snapshot => self.shim.set("snapshot.after", "1.5"),
            Phase::Thaw => {}
        }
        let plan = self.plan(&self.name.clone(), extra);
        let child = self.spawn_orchestrator(&plan);
        let pid = child.id();
        let marker = match phase {
            Phase::BeforeFreeze => self.shim.marker("calls"),
            Phase::Frozen => self.shim.marker("snapshot-started"),
            Phase::Snapshot | Phase::Thaw => self.shim.marker("snapshot-done"),
        };
        let seen = wait_for(&marker, Duration::from_secs(60));
        if seen.is_none() {
            self.fail(format!("{} never appeared", marker.display()));
        }
        // Before the freeze: the preflight's zfs calls come first, then guest_pre sleeps 2 s.
        let wait = match phase {
            Phase::BeforeFreeze => Duration::from_millis(700) + jitter,
            Phase::Thaw => jitter / 20,
            _ => jitter,
        };
        std::thread::sleep(wait);
        let killed_at = Instant::now();
        self.kill(pid, signal);
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        self.shim.wait_idle(Duration::from_secs(30));
        // The freeze is no later than the snapshot marker (or the kill, before it).
        let reference = seen.unwrap_or(killed_at).min(killed_at);
        if signal == Sig::Term {
            // Caught: the tool itself thaws before it exits.
            self.check(code > 0, format!("SIGTERM but exit {code}"));
            self.check_thawed(reference, Instant::now() + Duration::from_secs(2));
            if let Some(r) = &report {
                if phase == Phase::BeforeFreeze {
                    let froze = r["steps"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s["tool"] == "qga-freeze"));
                    self.check(!froze, "froze after a SIGTERM during guest_pre");
                }
            }
        } else {
            self.check_thawed(reference, reference + THAW_AFTER + SLACK);
        }
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        if verify && !self.snapshots().is_empty() && self.out.claim != "none" {
            let name = self.name.clone();
            self.check_rollback(&name);
        }
    }

    fn pipeline(&mut self, kill: Option<(Tool, Sig)>, jitter: Duration, delay: Duration) {
        self.shim
            .set("snapshot.before", &format!("{:.3}", delay.as_secs_f64()));
        let mut freeze = Command::new(crate::bin("qga-freeze"));
        freeze
            .args(["--agent", &self.lab.agent, "--timeout", "4"])
            .args(["--thaw-after", &THAW_AFTER.as_secs().to_string()])
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut freeze = freeze.spawn().expect("spawn qga-freeze");
        let mut zsnap = Command::new(crate::bin("zsnap"));
        for d in &self.lab.datasets {
            zsnap.args(["--dataset", d]);
        }
        let mut zsnap = zsnap
            .args(["--name", &self.name])
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .env("EVESNAP_ZFS", &self.shim.program)
            .stdin(Stdio::from(freeze.stdout.take().expect("pipe")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zsnap");
        let mut thaw = Command::new(crate::bin("qga-thaw"))
            .args(["--timeout", "4"])
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .stdin(Stdio::from(zsnap.stdout.take().expect("pipe")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qga-thaw");
        let spawned = Instant::now();
        self.children.extend([freeze.id(), zsnap.id(), thaw.id()]);
        let mut seen = None;
        let mut killed_at = Instant::now();
        if kill.is_none() {
            seen = wait_for(
                &self.shim.marker("snapshot-started"),
                Duration::from_secs(60),
            );
        }
        // Whether the signal reached a running tool (a fast one may be done already).
        let mut landed = false;
        if let Some((tool, signal)) = kill {
            // qga-thaw is killed while it waits for zsnap: the thaw is its only work.
            let marker = match tool {
                Tool::Freeze => None,
                Tool::Zsnap | Tool::Thaw => Some("snapshot-started"),
            };
            seen = marker.and_then(|m| wait_for(&self.shim.marker(m), Duration::from_secs(60)));
            if marker.is_some() && seen.is_none() {
                self.fail("the snapshot never started");
            }
            std::thread::sleep(if tool == Tool::Freeze {
                jitter / 2
            } else {
                jitter / 8
            });
            let victim = match tool {
                Tool::Freeze => &mut freeze,
                Tool::Zsnap => &mut zsnap,
                Tool::Thaw => &mut thaw,
            };
            landed = matches!(victim.try_wait(), Ok(None));
            let pid = victim.id();
            killed_at = Instant::now();
            self.kill(pid, signal);
            if !landed {
                self.note(format!("{} had finished before the signal", tool.name()));
            }
        }
        let mut codes = Vec::new();
        let mut last = (0, String::new(), String::new());
        for child in [freeze, zsnap, thaw] {
            let result = self.finish(child);
            codes.push(result.0);
            last = result;
        }
        self.shim.wait_idle(Duration::from_secs(30));
        // The last tool that ran to its end speaks for the pipeline.
        let (code, stdout, stderr) = last;
        let what = if kill.is_some() {
            "a tool was killed"
        } else {
            "the watchdog thawed during the snapshot"
        };
        if code >= 0 && (landed || kill.is_none()) {
            self.check(code != 0, format!("{what}, yet the pipeline exits {code}"));
            if let Ok(doc) = evesnap::document::Document::from_json(&stdout) {
                self.check(!doc.ok, format!("{what}, yet the document says ok"));
            } else if code != 5 && code != 2 {
                self.fail(format!(
                    "qga-thaw exit {code} without a document: {}",
                    stderr.trim()
                ));
            }
        }
        let reference = seen.unwrap_or(spawned).min(killed_at);
        self.check_thawed(reference, killed_at.max(reference) + THAW_AFTER + SLACK);
        self.check_claims(None);
        if kill.is_none() {
            self.check(codes[..2] == [0, 0], format!("exits {codes:?}"));
        }
    }

    /// Starts a guest job that kills qemu-ga `after` the freeze (guest-exec is disabled
    /// while frozen, so it must be started before).
    /// qemu-ga's pid in the guest.
    fn agent_pid(&mut self) -> Option<String> {
        self.sh("pidof qemu-ga")
            .ok()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
    }

    fn arm_agent_killer(&mut self, signal: Sig, after: Duration) -> bool {
        let script = format!(
            "( i=0; while [ ! -e /run/qga.state.isfrozen ] && [ $i -lt 600 ]; do usleep 20000; i=$((i+1)); done; \
             [ $i -lt 600 ] && usleep {} && kill -{} $(pidof qemu-ga) ) </dev/null >/dev/null 2>&1 &",
            after.as_micros(),
            signal.name()
        );
        match self.sh(&script) {
            Ok(_) => true,
            Err(e) => {
                self.fail(format!("cannot start the agent killer: {e}"));
                false
            }
        }
    }

    fn agent_killed(&mut self, signal: Sig, after: Duration) {
        let before = self.agent_pid();
        if !self.arm_agent_killer(signal, after) {
            return;
        }
        self.shim.set("snapshot.before", "2");
        let plan = self.plan(&self.name.clone(), json!({}));
        let child = self.spawn_orchestrator(&plan);
        let seen = wait_for(
            &self.shim.marker("snapshot-started"),
            Duration::from_secs(60),
        );
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        let reference = seen.unwrap_or(self.started);
        self.check_thawed(reference, reference + THAW_AFTER + SLACK);
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        // The respawned agent must serve the next trial.
        if try_connect(self.lab, Duration::from_secs(30)).is_err() {
            self.fail("the agent did not come back");
        }
        // The fault must have happened: SIGKILL restarts qemu-ga (init respawns it, in
        // frozen mode); qemu-ga ignores SIGTERM while frozen (it would exit only thawed).
        let after_pid = self.agent_pid();
        match signal {
            Sig::Kill => self.check(
                before.is_some() && after_pid != before,
                format!("qemu-ga was not killed (pid {before:?} -> {after_pid:?})"),
            ),
            Sig::Term => {
                let what = if after_pid == before {
                    "qemu-ga ignored SIGTERM while frozen"
                } else {
                    "qemu-ga restarted after SIGTERM"
                };
                self.note(what);
            }
        }
        if signal == Sig::Kill {
            self.note(format!("qemu-ga restarted while frozen, exit {code}"));
        }
    }

    fn vm_paused(&mut self, paused: Duration) {
        self.shim.set("snapshot.before", "0.5");
        let plan = self.plan(&self.name.clone(), json!({}));
        let child = self.spawn_orchestrator(&plan);
        let seen = wait_for(
            &self.shim.marker("snapshot-started"),
            Duration::from_secs(60),
        );
        if let Err(e) = set_paused(self.lab, true) {
            self.fail(format!("QMP stop: {e}"));
        }
        std::thread::sleep(paused);
        let resumed = Instant::now();
        if let Err(e) = set_paused(self.lab, false) {
            self.fail(format!("QMP cont: {e}"));
        }
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        let reference = seen.unwrap_or(self.started);
        // A paused guest cannot thaw: the deadline runs on from the resume.
        let deadline = (reference + THAW_AFTER).max(resumed) + SLACK;
        self.check_thawed(reference, deadline);
        self.check_resumed(code);
        self.check_claims(report.as_ref());
    }

    fn zfs_fails(&mut self, out_of_space: bool) {
        let name = format!("{}/lab/vm0/disk0@{}", self.lab.pool, self.name);
        self.shim.set(
            "snapshot.fail",
            &if out_of_space {
                format!("cannot create snapshot '{name}': out of space\n")
            } else {
                format!("cannot create snapshot '{name}': I/O error\n")
            },
        );
        let plan = self.plan(&self.name.clone(), json!({}));
        let child = self.spawn_orchestrator(&plan);
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        self.check(
            code == 1,
            format!("a failing zfs snapshot exits {code}, not 1"),
        );
        if let Some(r) = &report {
            self.check(
                r["error"]["step"] == "snapshot",
                format!("error.step {} instead of snapshot", r["error"]["step"]),
            );
            if out_of_space {
                let d = r["error"]["description"].as_str().unwrap_or("");
                self.check(d.contains("out of space"), format!("description: {d}"));
            }
        }
        self.check_thawed(Instant::now(), Instant::now() + Duration::from_secs(2));
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        let left = self.snapshots();
        self.check(left.is_empty(), format!("left behind: {left:?}"));
    }

    fn zfs_slow(&mut self, delay: Duration, timeout_s: f64, verify: bool) {
        self.shim
            .set("snapshot.before", &format!("{:.3}", delay.as_secs_f64()));
        let freeze = json!({"timeout_s": timeout_s, "thaw_after_s": THAW_AFTER.as_secs_f64()});
        let plan = self.plan(&self.name.clone(), json!({ "freeze": freeze }));
        let child = self.spawn_orchestrator(&plan);
        let seen = wait_for(
            &self.shim.marker("snapshot-started"),
            Duration::from_secs(60),
        );
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        let reference = seen.unwrap_or(self.started);
        self.check_thawed(reference, reference + THAW_AFTER + SLACK);
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        if delay + Duration::from_secs(1) < THAW_AFTER {
            self.check(
                code == 0,
                format!("a slow zfs within the deadline exits {code}"),
            );
            if let Some(r) = &report {
                self.check(
                    r["consistency"] == "application",
                    format!("consistency {}", r["consistency"]),
                );
            }
        } else if delay > THAW_AFTER + Duration::from_secs(1) {
            self.check(
                code != 0,
                "the watchdog thawed during the snapshot, yet exit 0",
            );
        }
        if verify && code == 0 {
            let name = self.name.clone();
            self.check_rollback(&name);
        }
    }

    fn no_room(&mut self) {
        self.shim.set("noroom", "");
        let plan = self.plan(&self.name.clone(), json!({}));
        let child = self.spawn_orchestrator(&plan);
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        self.check(code == 7, format!("no room exits {code}, not 7"));
        if let Some(r) = &report {
            let froze = r["steps"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["tool"] == "qga-freeze" || s["tool"] == "guest_pre")
            });
            self.check(
                !froze,
                "the guest was touched although the preflight failed",
            );
        }
        self.check_thawed(Instant::now(), Instant::now() + Duration::from_secs(2));
        self.check_resumed(code);
        let left = self.snapshots();
        self.check(left.is_empty(), format!("left behind: {left:?}"));
    }

    fn held(&mut self) {
        let older = format!("{}-a", self.name);
        let newer = format!("{}-b", self.name);
        if !self.take_clean(&older) {
            return;
        }
        let held = format!("{}@{older}", self.lab.datasets[0]);
        if !zfs(&["hold", "evesnap-fault", &held]).status.success() {
            // zfs-fuse has `hold` but no `holds`; userrefs tells.
            self.note("zfs hold failed");
        }
        // Retention may not destroy the held snapshot.
        self.names.push(newer.clone());
        let plan = self.plan(&newer, json!({"max_snapshots": 1}));
        let child = self.spawn_orchestrator(&plan);
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        self.check(
            zfs_get("name", &held) == held,
            "retention destroyed a held snapshot",
        );
        self.check_claims(report.as_ref());
        let new_data = self.sh(DATA).map(|o| md5_pair(&o)).unwrap_or_default();
        // Rolling back to the older one would destroy the newer: hold the newer.
        let newer_full = format!("{}@{newer}", self.lab.datasets[0]);
        let _ = zfs(&["hold", "evesnap-fault", &newer_full]);
        let plan = self.rollback_plan(&older, true);
        let child = self.spawn_orchestrator(&plan);
        let (code, stdout, stderr) = self.finish(child);
        self.check_report(code, &stdout, &stderr);
        self.check(
            code == 7,
            format!("a rollback over a held newer snapshot exits {code}, not 7"),
        );
        self.check(
            zfs_get("name", &newer_full) == newer_full,
            "the held newer snapshot was destroyed",
        );
        let now = self.sh(MD5).map(|o| md5_pair(&o)).unwrap_or_default();
        self.check(now == new_data, "a refused rollback changed the data");
        let _ = zfs(&["release", "evesnap-fault", &newer_full]);
        let _ = zfs(&["release", "evesnap-fault", &held]);
        self.check_thawed(Instant::now(), Instant::now() + Duration::from_secs(2));
        self.check_rollback(&older);
    }

    fn garbage(&mut self, seed: u64, verify: bool) {
        let mut rng = Rng::new(seed);
        let path = self.lab.agent.trim_start_matches("unix:").to_string();
        let mut bytes: Vec<u8> = Vec::new();
        for _ in 0..(1 + rng.below(6)) {
            match rng.below(6) {
                0 => bytes.extend(b"{\"execute\":\"guest-ping\""),
                1 => bytes.extend(
                    format!(
                        "{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{}}}}}\n",
                        rng.below(1 << 40)
                    )
                    .as_bytes(),
                ),
                2 => bytes.extend(
                    format!(
                        "{{\"execute\":\"guest-ping\",\"id\":{}}}\n",
                        rng.below(1000)
                    )
                    .as_bytes(),
                ),
                3 => bytes.push(0xFF),
                4 => bytes.extend(b"{\"execute\":\"guest-info\"}\n"),
                _ => bytes.extend((0..rng.below(200)).map(|_| rng.below(256) as u8)),
            }
        }
        match UnixStream::connect(&path) {
            Ok(mut s) => {
                let _ = s.write_all(&bytes);
                // Sometimes read a little, sometimes leave at once.
                if rng.below(2) == 0 {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf);
                }
            }
            Err(e) => self.fail(format!("cannot connect to the agent socket: {e}")),
        }
        let plan = self.plan(&self.name.clone(), json!({}));
        let child = self.spawn_orchestrator(&plan);
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        self.check(
            code == 0,
            format!(
                "after garbage on the channel: exit {code}: {}",
                stderr.trim()
            ),
        );
        self.check_thawed(Instant::now(), Instant::now() + Duration::from_secs(2));
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        if verify && code == 0 {
            let name = self.name.clone();
            self.check_rollback(&name);
        }
    }

    fn concurrent(&mut self) {
        self.shim.set("snapshot.before", "1");
        let second = format!("{}-2", self.name);
        self.names.push(second.clone());
        let first = self.plan(&self.name.clone(), json!({}));
        let other = self.plan(&second, json!({}));
        let a = self.spawn_orchestrator(&first);
        let b = self.spawn_orchestrator(&other);
        let (ca, oa, ea) = self.finish(a);
        let (cb, ob, eb) = self.finish(b);
        self.check_report(ca, &oa, &ea);
        self.check_report(cb, &ob, &eb);
        let mut codes = [ca, cb];
        codes.sort();
        self.check(
            codes == [0, 8],
            format!("two at once exit {codes:?}, not [0, 8]"),
        );
        self.check_thawed(Instant::now(), Instant::now() + Duration::from_secs(2));
        self.check_resumed(0);
        self.check_claims(None);
        let count = self.snapshots().len();
        self.check(count == 2, format!("{count} snapshots, not the winner's 2"));
    }

    fn rollback(&mut self, signal: Option<Sig>) {
        let target = format!("{}-r", self.name);
        if !self.take_clean(&target) {
            return;
        }
        let before = self.data.clone();
        let after = match self.sh(DATA) {
            Ok(o) => md5_pair(&o),
            Err(e) => return self.fail(e),
        };
        self.shim.set("rollback.before", "1");
        let plan = self.rollback_plan(&target, true);
        let child = self.spawn_orchestrator(&plan);
        let pid = child.id();
        if let Some(signal) = signal {
            if wait_for(
                &self.shim.marker("rollback-started"),
                Duration::from_secs(60),
            )
            .is_none()
            {
                self.fail("the rollback never started");
            }
            std::thread::sleep(Duration::from_millis(300));
            self.kill(pid, signal);
        }
        let (code, stdout, stderr) = self.finish(child);
        self.check_report(code, &stdout, &stderr);
        self.shim.wait_idle(Duration::from_secs(30));
        if signal.is_none() {
            self.check(
                code == 0,
                format!("the rollback exits {code}: {}", stderr.trim()),
            );
        }
        if signal == Some(Sig::Term) && code == 0 {
            self.note("SIGTERM during the rollback: it completed");
        }
        self.check_resumed(code);
        // Whatever the kill left: mounted again, each volume old or new, never a mix.
        if let Err(e) = self.sh(MOUNTS) {
            self.fail(format!("cannot remount: {e}"));
            return;
        }
        match self.sh(MD5) {
            Ok(o) => {
                let now = md5_pair(&o);
                self.check(now.len() == before.len(), format!("files missing: {now:?}"));
                for (i, md5) in now.iter().enumerate() {
                    let fine = before.get(i) == Some(md5) || after.get(i) == Some(md5);
                    self.check(fine, format!("volume {i} holds neither version: data lost"));
                }
                if signal.is_none() {
                    self.check(
                        now == before,
                        "the rollback did not restore the snapshot's data",
                    );
                }
            }
            Err(e) => self.fail(e),
        }
        self.check_thawed(Instant::now(), Instant::now() + Duration::from_secs(2));
        // A second rollback finishes the job.
        let _ = std::fs::remove_file(self.shim.marker("rollback.before"));
        self.data = before;
        let plan = self.rollback_plan(&target, true);
        let child = self.spawn_orchestrator(&plan);
        let (code, stdout, stderr) = self.finish(child);
        self.out.exits.pop();
        self.check_report(code, &stdout, &stderr);
        self.check(
            code == 0,
            format!("the second rollback exits {code}: {}", stderr.trim()),
        );
        match self.sh(MD5) {
            Ok(o) => {
                let now = md5_pair(&o);
                self.check(
                    now == self.data,
                    "after a second rollback the data is not the snapshot's",
                );
            }
            Err(e) => self.fail(e),
        }
    }

    /// Leaves the lab as it was: processes gone, VM running and thawed, volumes mounted,
    /// watchdogs stopped, the trial's snapshots destroyed.
    fn cleanup(&mut self) {
        for pid in std::mem::take(&mut self.children) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.shim.wait_idle(Duration::from_secs(30));
        if !resume_and_thaw(self.lab) {
            self.fail("cleanup could not thaw the guest");
        }
        stop_watchdogs(&self.run_dir);
        if let Err(e) = self.sh(MOUNTS) {
            self.fail(format!("cleanup could not remount: {e}"));
        }
        for clone in std::mem::take(&mut self.clones) {
            if !destroy_clone(&clone) {
                self.fail(format!("cleanup could not destroy the clone {clone}"));
            }
        }
        for s in self.snapshots() {
            let _ = zfs(&["release", "evesnap-fault", &s]);
            let _ = zfs(&["destroy", &s]);
        }
        for n in &self.names {
            let _ = zfs(&["destroy", &format!("{}/lab/vm0@{n}", self.lab.pool)]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Unmounts and destroys a clone, retrying while zfs-fuse still calls it busy; whether
/// it is gone.
fn destroy_clone(clone: &str) -> bool {
    for attempt in 0..40 {
        let _ = zfs(&["umount", "-f", clone]);
        if zfs(&["destroy", "-f", clone]).status.success() {
            return true;
        }
        if !zfs(&["list", "-H", "-o", "name", clone]).status.success() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100 + 50 * attempt));
    }
    false
}

/// Runs one trial of `fault` (the caller holds the VM lock).
pub fn trial(lab: &Lab, index: usize, fault: &Fault, verify_rollback: bool) -> Outcome {
    Trial::new(lab, index, fault).run(fault, verify_rollback)
}
