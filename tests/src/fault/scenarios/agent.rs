//! The guest side fails: qemu-ga killed while frozen, the VM paused while frozen, garbage
//! left on the agent channel.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fault::{Rng, Sig, Trial, SLACK, THAW_AFTER};
use crate::guest::{set_paused, try_connect};

/// The lab guest's qemu-ga, which init respawns (scripts/lab.d/guest/inittab).
const AGENT_BINARY: &str = "/usr/bin/qemu-ga";

/// How long after it may run again an agent may take to answer: init respawns it within
/// about 1 s, and qemu-ga starts slowly in a TCG guest on a loaded host.
const AGENT_BACK: Duration = Duration::from_secs(5);

/// An agent kept away at least this long after the freeze is away past the run's own thaw,
/// which must then give up: the snapshot holds the run 3 s, and each of the run's agent
/// calls after it (verifying the freeze, the thaw, verifying the thaw, each with its sync)
/// gets the 4 s agent timeout (`freeze.timeout_s`). A CI run on a loaded host had its thaw
/// through 15.8 s after the freeze; a TCG guest adds a few seconds more.
const PAST_THE_RUNS_THAW: Duration = Duration::from_secs(22);

/// At the latest, when the watchdog tries again at or after `t` (from the freeze): it
/// tries from its deadline; a try the agent does not answer lasts up to
/// [`WATCHDOG_TRY`], then it pauses 2 s, twice as long each time, up to 30 s
/// (shared/src/qga/watchdog/body.rs), so an agent back just after one try waits for the next.
fn watchdog_retry_at_or_after(t: Duration) -> Duration {
    let (mut at, mut gap) = (THAW_AFTER, Duration::from_secs(2));
    while at < t {
        at += WATCHDOG_TRY + gap;
        gap = (gap * 2).min(Duration::from_secs(30));
    }
    at
}

/// How long one of the watchdog's thaw tries waits for an agent that does not answer.
const WATCHDOG_TRY: Duration = Duration::from_secs(15);

/// The lab guest runs two qemu-ga: on virtio-serial (state in /run) and on vsock (state in
/// /run/qga-vsock). A trial's faults hit the one its `agent` address reaches.
struct GuestAgent {
    /// A shell expression for its pid (busybox).
    pid: String,
    /// The file it keeps while the guest is frozen.
    frozen_marker: &'static str,
}

impl Trial<'_> {
    fn guest_agent(&self) -> GuestAgent {
        let (mode, frozen_marker) = if self.lab.agent.starts_with("hvsock:") {
            ("vsock-listen", "/run/qga-vsock/qga.state.isfrozen")
        } else {
            ("virtio-serial", "/run/qga.state.isfrozen")
        };
        GuestAgent {
            pid: format!(
                "$(for p in $(pidof qemu-ga); do grep -q {mode} /proc/$p/cmdline && echo $p; done)"
            ),
            frozen_marker,
        }
    }

    /// The trial's qemu-ga's pid in the guest.
    fn agent_pid(&mut self) -> Option<String> {
        let agent = self.guest_agent();
        self.sh(&format!("echo {}", agent.pid))
            .ok()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
    }

    /// Starts a guest job that kills qemu-ga `after` the freeze (guest-exec is disabled
    /// while frozen, so it must be started before).
    fn arm_agent_killer(&mut self, signal: Sig, after: Duration) -> bool {
        let agent = self.guest_agent();
        let script = format!(
            "( i=0; while [ ! -e {} ] && [ $i -lt 600 ]; do usleep 20000; i=$((i+1)); done; \
             [ $i -lt 600 ] && usleep {} && kill -{} {} ) </dev/null >/dev/null 2>&1 &",
            agent.frozen_marker,
            after.as_micros(),
            signal.name(),
            agent.pid
        );
        match self.sh(&script) {
            Ok(_) => true,
            Err(e) => {
                self.fail(format!("cannot start the agent killer: {e}"));
                false
            }
        }
    }

    pub(in crate::fault) fn agent_killed(&mut self, signal: Sig, after: Duration) {
        let before = self.agent_pid();
        if !self.arm_agent_killer(signal, after) {
            return;
        }
        self.shim.set("snapshot.before", "2");
        let child = self.start(json!({}));
        let seen = self.shim.snapshot_started();
        let (code, report, _) = self.finish_checked(child);
        let reference = seen.unwrap_or(self.started);
        self.check_thawed_by_deadline(reference);
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

    /// How many times `guest_post` ran in the guest so far.
    fn posts(&mut self) -> usize {
        self.sh("cat /run/app.posts 2>/dev/null | wc -l")
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// qemu-ga killed right after the freeze and kept from restarting for `away`: the run
    /// cannot thaw nor run `guest_post` (unless the agent is back before its thaw gives up;
    /// never when `away` is [`PAST_THE_RUNS_THAW`] or more). Its report says
    /// `guest_post: "pending"`; the watchdog thaws once the agent is back and runs
    /// `guest_post`, once.
    pub(in crate::fault) fn agent_away(&mut self, away: Duration) {
        let posts = self.posts();
        let agent = self.guest_agent();
        // Stopped for `away` on the guest's clock (/proc/uptime in centiseconds, read by the
        // shell itself): its binary is moved aside before the kill, so init's respawn (once a
        // second) fails until it is moved back. Killing each respawned agent instead left it
        // flapping: an instance living a few milliseconds read a queued request (a thaw, a
        // guest-exec) and died before answering, which is another fault (a guest_post then
        // runs twice, as README says it may).
        let script = format!(
            "( i=0; while [ ! -e {marker} ] && [ $i -lt 600 ]; do usleep 20000; i=$((i+1)); done; \
             [ $i -lt 600 ] || exit 0; usleep 300000; read up _ < /proc/uptime; end=$((${{up%.*}}${{up#*.}} + {away})); \
             mv {bin} {bin}.away && kill -9 {pid}; \
             while read up _ < /proc/uptime && [ ${{up%.*}}${{up#*.}} -lt $end ]; do usleep 100000; done; \
             mv {bin}.away {bin} ) </dev/null >/dev/null 2>&1 &",
            marker = agent.frozen_marker,
            away = away.as_millis() / 10,
            bin = AGENT_BINARY,
            pid = agent.pid
        );
        if let Err(e) = self.sh(&script) {
            self.fail(format!("cannot start the agent killer: {e}"));
            return;
        }
        // The snapshot holds the run 3 s inside the window (under the 4 s agent timeout), so
        // that the killer, 0.3 s after the freeze on a guest slowed by a loaded host, has
        // the agent gone before the run's thaw.
        self.shim.set("snapshot.before", "3");
        self.agent_away = Some(away + AGENT_BACK);
        let child = self.start(json!({}));
        let seen = self.shim.snapshot_started();
        let (code, report, _) = self.finish_checked(child);
        let reference = seen.unwrap_or(self.started);
        // The run's own thaw keeps trying until its agent timeout: an agent back by then (a
        // short `away`, a slow guest) is the run's to thaw, and its guest_post ran. Else the
        // run lost its agent and left guest_post pending: always when away that long.
        let lost = away >= PAST_THE_RUNS_THAW;
        let outcomes: &[i32] = if lost { &[3, 4, 6] } else { &[0, 3, 4, 6] };
        self.check(
            outcomes.contains(&code),
            format!("exit {code}, not one of {outcomes:?}: the agent was away {away:?}"),
        );
        let said = report
            .as_ref()
            .and_then(|r| r.get("guest_post"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let expected = if code == 0 { "ran" } else { "pending" };
        self.check(
            said.as_deref() == Some(expected),
            format!("exit {code} but the report says guest_post {said:?}, not \"{expected}\""),
        );
        // The agent is away until `away` after the freeze and back within AGENT_BACK; the
        // watchdog, past its deadline by then, thaws at its first retry after that.
        let deadline = reference + watchdog_retry_at_or_after(away + AGENT_BACK) + SLACK;
        self.check_thawed(reference, deadline);
        let until = Instant::now() + Duration::from_secs(30);
        let mut ran = self.posts().saturating_sub(posts);
        while ran == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(500));
            ran = self.posts().saturating_sub(posts);
        }
        self.check(
            ran == 1,
            format!("guest_post ran {ran} times once the agent was back"),
        );
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        self.note(format!(
            "exit {code}, guest_post {expected}, ran {ran} time(s)"
        ));
    }

    pub(in crate::fault) fn vm_paused(&mut self, paused: Duration) {
        self.shim.set("snapshot.before", "0.5");
        let child = self.start(json!({}));
        let seen = self.shim.snapshot_started();
        if let Err(e) = set_paused(self.lab, true) {
            self.fail(format!("QMP stop: {e}"));
        }
        std::thread::sleep(paused);
        let resumed = Instant::now();
        if let Err(e) = set_paused(self.lab, false) {
            self.fail(format!("QMP cont: {e}"));
        }
        let (code, report, _) = self.finish_checked(child);
        let reference = seen.unwrap_or(self.started);
        // A paused guest cannot thaw: the deadline runs on from the resume.
        let deadline = (reference + THAW_AFTER).max(resumed) + SLACK;
        self.check_thawed(reference, deadline);
        self.check_resumed(code);
        self.check_claims(report.as_ref());
    }

    pub(in crate::fault) fn garbage(&mut self, seed: u64, verify: bool) {
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
        let child = self.start(json!({}));
        let (code, report, stderr) = self.finish_checked(child);
        self.check(
            code == 0,
            format!(
                "after garbage on the channel: exit {code}: {}",
                stderr.trim()
            ),
        );
        self.check_thawed_at_once();
        self.check_resumed(code);
        self.check_claims(report.as_ref());
        if verify && code == 0 {
            let name = self.name.clone();
            self.check_rollback(&name);
        }
    }
}
