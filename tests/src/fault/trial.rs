//! One trial: its folder, shim and snapshot names, the plans it runs, the processes it
//! starts and waits for, the fault it dispatches to its scenario, and the cleanup that
//! leaves the lab as it was.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::checks::destroy_clone;
use super::{Fault, Shim, Sig, HANG, THAW_AFTER};
use crate::guest::{resume_and_thaw, try_connect, try_guest_sh};
use crate::lab::Lab;
use crate::run::stop_watchdogs;
use crate::zfs::zfs;

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

pub(super) fn wait_for(path: &Path, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(Instant::now())
}

pub(super) fn exit_of(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| -status.signal().unwrap_or(0))
}

pub(super) fn md5_pair(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// The watchdog's retry window in the trials (seconds), shorter than any pause.
pub(super) const WATCHDOG_RETRY_WINDOW_S: &str = "2";

/// The application's hooks: `guest_pre` marks it quiesced, `guest_post` running again.
pub(super) const QUIESCE: &str = "echo quiesced > /run/app.state; sync";
/// (Each run of it adds a line to `/run/app.posts`: it must run once.)
pub(super) const RESUME: &str = "echo running > /run/app.state; echo post >> /run/app.posts";
/// The files a trial writes before the snapshot, and their md5s.
pub(super) const DATA: &str = "echo running > /run/app.state && dd if=/dev/urandom of=/data0/fault.bin bs=64k count=4 2>/dev/null && \
    dd if=/dev/urandom of=/data1/fault.bin bs=64k count=4 2>/dev/null && sync && \
    md5sum /data0/fault.bin /data1/fault.bin";
pub(super) const MD5: &str = "md5sum /data0/fault.bin /data1/fault.bin";
/// Remounts what a killed rollback left unmounted (the disks by their ext4 label: EVE's
/// disks have no serial).
pub(super) const MOUNTS: &str =
    "grep -q ' /data0 ' /proc/mounts || mount -t ext4 \"$(findfs LABEL=disk0)\" /data0; \
    grep -q ' /data1 ' /proc/mounts || mount -t ext4 \"$(findfs LABEL=disk1)\" /data1; \
    grep -q ' /data0 ' /proc/mounts && grep -q ' /data1 ' /proc/mounts";

/// One trial on the lab. The caller holds the VM lock.
#[derive(Debug)]
pub struct Trial<'a> {
    pub lab: &'a Lab,
    pub dir: PathBuf,
    pub run_dir: PathBuf,
    pub name: String,
    pub shim: Shim,
    pub(super) started: Instant,
    pub(super) out: Outcome,
    /// Processes this trial started, killed by pid at the end if still running.
    pub(super) children: Vec<u32>,
    /// Every snapshot name this trial may have made.
    pub(super) names: Vec<String>,
    /// md5s written before the snapshot.
    pub(super) data: Vec<String>,
    /// Clones made to read snapshots (destroyed at once; again at cleanup if need be).
    pub(super) clones: Vec<String>,
    /// How long after the freeze the fault keeps the agent from answering, at most: no
    /// thaw can come before, whatever `thaw_after` says.
    pub(super) agent_away: Option<Duration>,
}

impl<'a> Trial<'a> {
    pub fn new(lab: &'a Lab, index: usize, fault: &Fault) -> Trial<'a> {
        // Unique in the process too: the deterministic tests are all trial 0, and a failed
        // trial's folder is kept.
        static TRIALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let nth = TRIALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "evesnap-fault-{}-{index}-{nth}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let run_dir = dir.join("run");
        // Private, or the tools refuse it.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&run_dir)
            .expect("trial folder");
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
            agent_away: None,
        }
    }

    pub(super) fn fail(&mut self, what: impl Into<String>) {
        self.out.failures.push(what.into());
    }

    pub(super) fn note(&mut self, what: impl Into<String>) {
        self.out.notes.push(what.into());
    }

    pub(super) fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.fail(what);
        }
    }

    /// Runs a shell line in the guest on a connection of its own; its stdout, or why not.
    pub(super) fn sh(&self, script: &str) -> Result<String, String> {
        let mut client =
            try_connect(self.lab, Duration::from_secs(30)).map_err(|e| e.to_string())?;
        try_guest_sh(&mut client, script)
    }

    pub(super) fn plan(&self, name: &str, extra: Value) -> Value {
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

    pub(super) fn rollback_plan(&self, to: &str, destroy_newer: bool) -> Value {
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
    pub(super) fn spawn_orchestrator(&mut self, plan: &Value) -> Child {
        let mut child = Command::new(crate::bin("snap-orchestrate"))
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .env("EVESNAP_ZFS", &self.shim.program)
            // The watchdog's give-up limit (600 s) shortened, test-only: it must keep
            // retrying a paused VM regardless, and give up only on a VM that is gone.
            .env("EVESNAP_WATCHDOG_RETRY_WINDOW_S", WATCHDOG_RETRY_WINDOW_S)
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

    /// Starts `snap-orchestrate` on a plan for the trial's own snapshot, `extra` merged in.
    pub(super) fn start(&mut self, extra: Value) -> Child {
        let plan = self.plan(&self.name.clone(), extra);
        self.spawn_orchestrator(&plan)
    }

    /// Waits for an orchestrator and checks its report (invariant 3); exit code, report
    /// (if it printed one) and stderr.
    pub(super) fn finish_checked(&mut self, child: Child) -> (i32, Option<Value>, String) {
        let (code, stdout, stderr) = self.finish(child);
        let report = self.check_report(code, &stdout, &stderr);
        (code, report, stderr)
    }

    /// Waits for a child (killing it after [`HANG`]); exit code and stdout/stderr.
    pub(super) fn finish(&mut self, child: Child) -> (i32, String, String) {
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
        // Kept with the trial's folder when the trial fails.
        let log = self.dir.join(format!("pid-{pid}.stderr"));
        let _ = std::fs::write(log, &out.stderr);
        (
            code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub(super) fn kill(&mut self, pid: u32, signal: Sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal.signal());
    }

    /// Writes the trial's data in the guest and remembers its md5s.
    pub(super) fn write_data(&mut self) -> bool {
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

    /// Takes a snapshot with no fault (setup for held/rollback trials).
    pub(super) fn take_clean(&mut self, name: &str) -> bool {
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
                Fault::PipelineTypo => self.pipeline_typo(),
                Fault::AgentKilled { signal, after } => self.agent_killed(*signal, *after),
                Fault::AgentAway { away } => self.agent_away(*away),
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
                Fault::ZfsHangsTerm { call } => self.zfs_hangs_term(*call),
                Fault::FreezeFails { crash } => self.freeze_fails(*crash),
                Fault::KeepNewer { clone_fails } => self.keep_newer(*clone_fails),
            }
        }
        self.cleanup();
        self.out.elapsed = self.started.elapsed();
        self.out.clone()
    }

    /// Leaves the lab as it was: processes gone, VM running and thawed, volumes mounted,
    /// watchdogs stopped, the trial's snapshots destroyed.
    pub(super) fn cleanup(&mut self) {
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
        if self.out.failures.is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            // The run's stderr, the watchdogs' logs and the zfs calls, to read.
            self.note(format!("kept {}", self.dir.display()));
        }
    }
}
