//! Our own processes: the orchestrator or a pipeline tool killed at a chosen moment, a
//! pipeline whose snapshot outlasts the watchdog, two orchestrations of one VM at once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fault::trial::{wait_for, QUIESCE};
use crate::fault::{Phase, Sig, Tool, Trial, SLACK, THAW_AFTER};

impl Trial<'_> {
    pub(in crate::fault) fn orchestrator(
        &mut self,
        signal: Sig,
        phase: Phase,
        jitter: Duration,
        verify: bool,
    ) {
        let mut extra = json!({});
        match phase {
            Phase::BeforeFreeze => {
                extra = json!({"guest_pre": [{"path": "/bin/sh", "args": ["-c", format!("{QUIESCE}; sleep 2")]}]});
            }
            Phase::Frozen => self.shim.set("snapshot.before", "1.5"),
            Phase::Snapshot => self.shim.set("snapshot.after", "1.5"),
            Phase::Thaw => {}
        }
        let child = self.start(extra);
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
        let (code, report, _) = self.finish_checked(child);
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
            self.check_thawed_by_deadline(reference);
        }
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        if verify && !self.snapshots().is_empty() && self.out.claim != "none" {
            let name = self.name.clone();
            self.check_rollback(&name);
        }
    }

    pub(in crate::fault) fn pipeline(
        &mut self,
        kill: Option<(Tool, Sig)>,
        jitter: Duration,
        delay: Duration,
    ) {
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
            seen = self.shim.snapshot_started();
        }
        // Whether the signal reached a running tool (a fast one may be done already).
        let mut landed = false;
        // zsnap SIGKILLed inside its `zfs snapshot`, which finishes on its own (after the
        // shim's delay, so after the watchdog's prompt thaw): whatever it creates must not
        // claim a freeze, whatever its ext4 looks like.
        let mut orphaned = false;
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
            orphaned = tool == Tool::Zsnap
                && signal == Sig::Kill
                && landed
                && !self.shim.marker("snapshot-done").exists();
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
        // qga-freeze's work ends when zsnap has its document, and zsnap snapshots only with
        // one: a signal after that (qga-freeze may still be exiting) is too late to undo the
        // freeze, and the pipeline rightly goes on.
        if landed
            && kill.is_some_and(|(tool, _)| tool == Tool::Freeze)
            && self.shim.marker("snapshot-started").exists()
        {
            landed = false;
            self.note("qga-freeze had passed its document on before the signal");
        }
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
        if orphaned {
            for s in self.snapshots() {
                let frozen = crate::zfs::zfs_get("org.lfedge.evesnap:frozen", &s);
                self.check(
                    frozen != "true",
                    format!("{s}, created by a zfs that outlived the SIGKILLed zsnap, claims frozen=true"),
                );
            }
        }
        self.check_claims(None);
        if kill.is_none() {
            self.check(codes[..2] == [0, 0], format!("exits {codes:?}"));
        }
    }

    pub(in crate::fault) fn concurrent(&mut self) {
        self.shim.set("snapshot.before", "1");
        let second = format!("{}-2", self.name);
        self.names.push(second.clone());
        let first = self.plan(&self.name.clone(), json!({}));
        let other = self.plan(&second, json!({}));
        let a = self.spawn_orchestrator(&first);
        let b = self.spawn_orchestrator(&other);
        let (ca, _, _) = self.finish_checked(a);
        let (cb, _, _) = self.finish_checked(b);
        let mut codes = [ca, cb];
        codes.sort();
        self.check(
            codes == [0, 8],
            format!("two at once exit {codes:?}, not [0, 8]"),
        );
        self.check_thawed_at_once();
        self.check_resumed(0);
        self.check_claims(None);
        let count = self.snapshots().len();
        self.check(count == 2, format!("{count} snapshots, not the winner's 2"));
    }
}
