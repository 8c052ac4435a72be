//! Our own processes: the orchestrator or a pipeline tool killed at a chosen moment, a
//! pipeline whose snapshot outlasts the watchdog or whose middle step is mistyped, two
//! orchestrations of one VM at once.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fault::trial::{wait_for, QUIESCE};
use crate::fault::{Phase, Sig, Tool, Trial, PROMPT, SLACK, THAW_AFTER};

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
        let mut zsnap_args = Vec::new();
        for d in &self.lab.datasets {
            zsnap_args.extend(["--dataset".to_string(), d.clone()]);
        }
        zsnap_args.extend(["--name".to_string(), self.name.clone()]);
        let [mut freeze, mut zsnap, mut thaw] = self.spawn_pipeline(&zsnap_args, THAW_AFTER);
        let spawned = Instant::now();
        let mut seen = None;
        let mut killed_at = Instant::now();
        if kill.is_none() {
            seen = self.shim.snapshot_started();
        }
        // Whether the signal reached a running tool (a fast one may be done already).
        let mut landed = false;
        // Whether the snapshot had started when the signal came.
        let mut after_start = false;
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
            after_start = self.shim.marker("snapshot-started").exists();
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
        // zsnap holds a relay to the watchdog from reading its stdin until its document is
        // out, and the watchdog watches qga-thaw's pipe until it is read: either killed, the
        // guest is thawed at once (qga-thaw's death counts once zsnap, done, finds it gone).
        // Held to `thaw_after` only: qga-freeze killed (this family does not time it against
        // its freeze), and zsnap killed before the snapshot started, which includes the moment between reading its
        // stdin and starting its relay: a hole being fixed in the watchdog (then this bound
        // can tighten too).
        let prompt = landed
            && after_start
            && kill.is_some_and(|(tool, _)| matches!(tool, Tool::Zsnap | Tool::Thaw));
        if prompt {
            let done = self.shim.marked_at("snapshot-done").unwrap_or(killed_at);
            self.check_thawed(reference, killed_at.max(done) + PROMPT);
        } else {
            self.check_thawed(reference, killed_at.max(reference) + THAW_AFTER + SLACK);
        }
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

    /// Starts `qga-freeze | zsnap ZSNAP_ARGS | qga-thaw` (the watchdog's deadline
    /// `thaw_after`, zsnap's `zfs` the shim), each tool killed at cleanup if still running.
    fn spawn_pipeline(&mut self, zsnap_args: &[String], thaw_after: Duration) -> [Child; 3] {
        let mut freeze = Command::new(crate::bin("qga-freeze"))
            .args(["--agent", &self.lab.agent, "--timeout", "4"])
            .args(["--thaw-after", &thaw_after.as_secs().to_string()])
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qga-freeze");
        let mut zsnap = Command::new(crate::bin("zsnap"))
            .args(zsnap_args)
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .env("EVESNAP_ZFS", &self.shim.program)
            .stdin(Stdio::from(freeze.stdout.take().expect("pipe")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zsnap");
        let thaw = Command::new(crate::bin("qga-thaw"))
            .args(["--timeout", "4"])
            .env("EVESNAP_RUN_DIR", &self.run_dir)
            .stdin(Stdio::from(zsnap.stdout.take().expect("pipe")))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qga-thaw");
        self.children.extend([freeze.id(), zsnap.id(), thaw.id()]);
        [freeze, zsnap, thaw]
    }

    /// `qga-freeze | zsnap --datset … | qga-thaw`: the mistyped middle step exits 2 at
    /// once, so qga-freeze cannot pass its document on. The watchdog's deadline is a minute
    /// away, so a thaw within seconds can only be the prompt one: every step exits
    /// non-zero, the guest is thawed within [`PROMPT`] of the pipeline's end, and nothing
    /// is left (no snapshot, no watchdog).
    pub(in crate::fault) fn pipeline_typo(&mut self) {
        let mut args = Vec::new();
        for d in &self.lab.datasets {
            args.extend(["--datset".to_string(), d.clone()]);
        }
        args.extend(["--name".to_string(), self.name.clone()]);
        let tools = self.spawn_pipeline(&args, Duration::from_secs(60));
        let mut codes = Vec::new();
        let mut stderr = String::new();
        for child in tools {
            let (code, _, err) = self.finish(child);
            codes.push(code);
            stderr.push_str(&err);
        }
        let ended = Instant::now();
        self.check(
            codes[1] == 2,
            format!("the mistyped zsnap exits {}, not 2", codes[1]),
        );
        self.check(
            codes[0] != 0 && codes[2] != 0,
            format!("exits {codes:?}: a step with nothing to pass on or read exits 0"),
        );
        self.check(
            stderr.contains("the guest was thawed"),
            format!("no step says the guest was thawed: {}", stderr.trim()),
        );
        self.check_thawed(ended, ended + PROMPT);
        self.check_no_watchdogs();
        let left = self.snapshots();
        self.check(left.is_empty(), format!("left behind: {left:?}"));
        self.check_claims(None);
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
