//! What every trial checks afterwards (the invariants of the module doc): the report and
//! the exit code agree, the guest was thawed in time and resumed, what the snapshots
//! claim is true (their ext4 is clean), and a rollback brings the data back.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::trial::{md5_pair, wait_for, MD5};
use super::{Trial, SLACK, THAW_AFTER, WINDOW_SLACK};
use crate::guest::wait_thawed;
use crate::run::live_watchdogs;
use crate::zfs::{list_snapshots, zfs, zfs_get};

impl Trial<'_> {
    /// Invariant 3: the exit code and the report agree.
    pub(super) fn check_report(&mut self, code: i32, stdout: &str, stderr: &str) -> Option<Value> {
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
            // eve-api's view agrees: its worst severity exactly when the guest may be frozen.
            let snap_err = &report["zinfo_snapshot"]["snap_err"];
            let severity = snap_err["severity"].as_str().unwrap_or("");
            let worst = if code == 6 {
                "SEVERITY_ERROR"
            } else {
                "SEVERITY_WARNING"
            };
            self.check(
                severity == worst,
                format!("exit {code} but snap_err.severity {severity:?}"),
            );
            self.check(
                snap_err["retry_condition"]
                    .as_str()
                    .is_some_and(|r| !r.is_empty()),
                "snap_err has no retry_condition",
            );
            self.check(
                !stderr.trim().is_empty(),
                "a failure said nothing on stderr",
            );
        }
        // Invariant 1 where the report can tell: the tool's own thaw came in time (an agent
        // kept away past thaw_after is thawed when it is back, not before).
        let thawed = report["steps"].as_array().and_then(|steps| {
            steps
                .iter()
                .find(|s| s["tool"] == "qga-thaw" && s["ok"] == true)
                .and_then(|s| s["thawed"].as_i64())
        });
        if let (Some(window), Some(n)) = (report["freeze_window_ms"].as_f64(), thawed) {
            let earliest = THAW_AFTER.max(self.agent_away.unwrap_or_default());
            let limit = (earliest + WINDOW_SLACK).as_secs_f64() * 1000.0;
            self.check(
                n == 0 || window <= limit,
                format!(
                    "the guest stayed frozen {window:.0} ms, beyond thaw_after ({} s) and the agent's return",
                    THAW_AFTER.as_secs()
                ),
            );
        }
        Some(report)
    }

    /// Invariant 1: thawed by `deadline` (measured from `reference`).
    pub(super) fn check_thawed(&mut self, reference: Instant, deadline: Instant) {
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

    /// Invariant 1 where the watchdog may have to thaw: by `thaw_after` (plus [`SLACK`])
    /// after `reference`, the freeze or the fault.
    pub(super) fn check_thawed_by_deadline(&mut self, reference: Instant) {
        self.check_thawed(reference, reference + THAW_AFTER + SLACK);
    }

    /// Invariant 1 where nothing was left to the watchdog: thawed at once (within 2 s).
    pub(super) fn check_thawed_at_once(&mut self) {
        self.check_thawed(Instant::now(), Instant::now() + Duration::from_secs(2));
    }

    /// Invariant 5: a tool that ran to its end brought the guest back: the application
    /// its `guest_pre` quiesced runs again (`guest_post` ran), the volumes a rollback's
    /// `guest_pre` unmounted are mounted again. A SIGKILL leaves that to the operator.
    pub(super) fn check_resumed(&mut self, code: i32) {
        let state = self.sh("cat /run/app.state; grep -c ' /data[01] ' /proc/mounts || true");
        match state {
            Ok(text) => {
                let mut lines = text.lines();
                let app = lines.next().unwrap_or("").trim().to_string();
                let mounted = lines.next().unwrap_or("").trim().to_string();
                // 3, 4, 6: the agent did not answer, guest_post is pending and runs once
                // the agent is back (the watchdog): polled below.
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
                } else if code >= 0 {
                    let (mut app, mut mounted) = (app, mounted);
                    let until = Instant::now() + Duration::from_secs(40);
                    while (app != "running" || mounted != "2") && Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(500));
                        if let Ok(text) = self
                            .sh("cat /run/app.state; grep -c ' /data[01] ' /proc/mounts || true")
                        {
                            let mut lines = text.lines();
                            app = lines.next().unwrap_or("").trim().to_string();
                            mounted = lines.next().unwrap_or("").trim().to_string();
                        }
                    }
                    self.check(
                        app == "running" && mounted == "2",
                        format!(
                            "exit {code}: the pending guest_post did not run once the agent was back: \
                             application {app}, {mounted} of 2 volumes mounted"
                        ),
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

    /// Nothing of the run watches the guest any more: its watchdogs are gone (within 2 s).
    pub(super) fn check_no_watchdogs(&mut self) {
        let until = Instant::now() + Duration::from_secs(2);
        let mut watchdogs = live_watchdogs(&self.run_dir);
        while !watchdogs.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
            watchdogs = live_watchdogs(&self.run_dir);
        }
        self.check(
            watchdogs.is_empty(),
            format!("watchdogs left running: {watchdogs:?}"),
        );
    }

    /// Invariant 2: what the snapshots claim is true; returns the claim.
    pub(super) fn check_claims(&mut self, report: Option<&Value>) {
        let snapshots = self.snapshots();
        let mut claims = Vec::new();
        for s in &snapshots {
            let frozen = zfs_get("org.lfedge.evesnap:frozen", s);
            let consistency = zfs_get("org.lfedge.evesnap:consistency", s);
            // A snapshot taken after a failed freeze is labelled for what it is.
            let crash_reason = zfs_get("org.lfedge.evesnap:crash_reason", s);
            if crash_reason != "-" {
                self.check(
                    consistency == "crash" && frozen == "false",
                    format!("{s}: crash_reason set but frozen={frozen} consistency={consistency}"),
                );
            }
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
        if let Some(r) = report {
            self.check_fallback_label(r);
        }
        claims.sort();
        claims.dedup();
        self.out.claim = if snapshots.is_empty() {
            "none".into()
        } else {
            claims.join(",")
        };
    }

    /// Invariant 2 for `freeze.on_failure: crash`: never silent, never labelled better. A
    /// report that fell back says `crash` and its snapshots carry the reason; a report that
    /// says `crash` (the trials' agent is always required) fell back and says so.
    fn check_fallback_label(&mut self, report: &Value) {
        let warnings = report["warnings"].as_array().cloned().unwrap_or_default();
        let fell_back = warnings.iter().any(|w| w["kind"] == "crash-fallback");
        let says_crash = report["consistency"] == "crash";
        if fell_back {
            self.check(
                says_crash,
                format!("fell back, but the report says {}", report["consistency"]),
            );
            let taken = report["snapshots"].as_array().cloned().unwrap_or_default();
            for name in taken.iter().filter_map(|s| s["name"].as_str()) {
                let reason = zfs_get("org.lfedge.evesnap:crash_reason", name);
                self.check(
                    reason != "-" && !reason.is_empty(),
                    format!("{name}: fell back, but no crash_reason on it"),
                );
            }
        } else if says_crash && report["snapshots"].is_array() {
            self.fail("a crash-consistent snapshot without a crash-fallback warning: silent");
        }
    }

    /// The snapshots (full names) of this trial's names that exist now.
    pub(super) fn snapshots(&mut self) -> Vec<String> {
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
    pub(super) fn image_clean(&mut self, snapshot: &str) -> Option<bool> {
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

    /// Invariant 4: overwrite, roll back to `name` (whose snapshot holds the trial's
    /// data), and compare.
    pub(super) fn check_rollback(&mut self, name: &str) {
        if let Err(e) = self.sh(
            "dd if=/dev/urandom of=/data0/fault.bin bs=64k count=4 conv=notrunc 2>/dev/null; \
             dd if=/dev/urandom of=/data1/fault.bin bs=64k count=4 conv=notrunc 2>/dev/null; sync",
        ) {
            self.fail(format!("cannot overwrite: {e}"));
            return;
        }
        let plan = self.rollback_plan(name, true);
        let child = self.spawn_orchestrator(&plan);
        let (code, _, stderr) = self.finish_checked(child);
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
}

/// Unmounts and destroys a clone, retrying while zfs-fuse still calls it busy; whether
/// it is gone.
pub(super) fn destroy_clone(clone: &str) -> bool {
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
