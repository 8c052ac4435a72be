//! `qga-freeze`: freezes a guest's filesystems through its QEMU guest agent, arms an
//! auto-thaw watchdog, and passes the job document on.
//!
//! The step it appends to the document (see [`evesnap::document`]):
//!
//! ```json
//! {"tool": "qga-freeze", "ok": true, "started_at": "…", "duration_ms": 31.2,
//!  "frozen": 3, "mountpoints": null, "adopted": false, "agent_version": "7.2.0",
//!  "freeze_ms": 2.7, "watchdog": {"pid": 4242, "deadline": "…", "deadline_unix_ms": 0,
//!  "token": "…", "agent": "unix:…", "state_file": "…", "log_file": "…"}}
//! ```
//!
//! On failure `ok` is false, `frozen` is 0 and `possibly_frozen`, `cleanup_thaw` and
//! `watchdog` say what state the guest was left in; a step skipped because an upstream
//! step failed has `skipped: true`.
//!
//! The orchestrator calls [`freeze`] (and [`abort`]) on a [`evesnap::qga::Client`] it
//! connected itself, exactly as this binary does.

mod aftermath;
mod delivery;
mod error;
mod step;

use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use evesnap::cli::Outcome;
use evesnap::document::{self, fields_of, Document, StepTimer};
use evesnap::exit::{coded, Exit};
use evesnap::qga::watchdog::{self, Watchdog};
use evesnap::qga::{Address, Client};
use evesnap::signals::Events;
use nix::sys::signal::Signal;
use serde::Serialize;

pub use aftermath::{abort, Aftermath, CleanupThaw};
pub use error::Error;
pub use step::{
    check, default_watchdog_program, freeze, freeze_checked, freeze_unverified, verify_frozen,
    FreezeOptions, FreezeReport,
};

/// The tool's name, as in the document's steps.
pub const TOOL: &str = "qga-freeze";

const LONG_ABOUT: &str = "\
Freezes the filesystems of a guest through its QEMU guest agent (qemu-ga), so that a \
snapshot of its disks taken now is application-consistent, then writes the job document \
on stdout for the next tool (zsnap, then qga-thaw).

Steps: connect (0xFF + guest-sync-delimited, retried while the agent is not up yet, until \
--connect-timeout), guest-info (freeze commands present and enabled), guest-fsfreeze-status \
(already frozen fails unless --adopt-frozen), arm the auto-thaw watchdog, freeze \
(guest-fsfreeze-freeze, or guest-fsfreeze-freeze-list with --mountpoint), verify \
guest-fsfreeze-status is frozen. A freeze that froze nothing (e.g. a mountpoint that does \
not exist) or fewer filesystems than mountpoints asked for is an error and is thawed again.

The watchdog is a detached process that survives this tool and the whole pipeline; at \
--thaw-after seconds it thaws the guest unless qga-thaw cancelled it first. A freeze \
whose reply timed out may still happen when the agent reads again (a paused VM): the tool \
then queues a thaw, leaves the watchdog armed, says THE GUEST MAY BE FROZEN and fails. \
SIGINT, SIGTERM or SIGHUP after the freeze and before the document is written thaws \
before exiting; once the document is passed on, the next steps own the freeze.

A broken pipeline is thawed at once, not at --thaw-after. When the document cannot be \
written (the next step is already gone, e.g. a mistyped command line) this tool thaws and \
exits non-zero. Otherwise it waits until the next step has read the document (at most 2 s): \
if that step exits without reading it, the watchdog thaws and this tool exits non-zero. \
The watchdog also thaws within a fraction of a second when zsnap or qga-thaw dies after \
reading its document and before passing its own on or verifying its thaw, and when any \
other next step exits within 0.5 s of reading the document. A next step other than zsnap \
or qga-thaw that reads the document and dies later is thawed at --thaw-after; one that \
reads to the end of the pipe (cat, $(qga-freeze …)) sees that end 0.5 s after it read.

Reads the upstream document on stdin (a terminal or /dev/null: none). If an upstream step \
failed, it does not freeze, appends a skipped step and exits 5. The agent is --agent, \
else the document's `agent`; the output document's `agent` is set to it.";

/// The command line of `qga-freeze`.
#[derive(Debug, Parser)]
#[command(name = "qga-freeze", version, about = "Freeze a guest's filesystems through its guest agent", long_about = LONG_ABOUT)]
pub struct Args {
    /// The guest agent: unix:PATH (or a plain path) for the virtio-serial socket,
    /// vsock:CID:PORT (AF_VSOCK through the host kernel), or hvsock:PATH:PORT (guest vsock
    /// port PORT through a hybrid vsock device's Unix socket PATH: `CONNECT PORT`, `OK`)
    /// [default: the upstream document's `agent`]
    #[arg(long, value_name = "ADDR")]
    pub agent: Option<String>,
    /// Freeze only this mountpoint of the guest (repeatable) [default: every filesystem]
    #[arg(long = "mountpoint", value_name = "PATH")]
    pub mountpoints: Vec<String>,
    /// Seconds each agent call may take
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = evesnap::time::parse_timeout)]
    pub timeout: Duration,
    /// Seconds to wait for the agent to answer at all (guest booting, agent restarting,
    /// another client on the socket) [default: --timeout]
    #[arg(long, value_name = "SECS", value_parser = evesnap::time::parse_timeout)]
    pub connect_timeout: Option<Duration>,
    /// Seconds after which the watchdog thaws the guest unless qga-thaw ran; 0: no watchdog
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = evesnap::time::parse_seconds)]
    pub thaw_after: Duration,
    /// Take over a guest that is already frozen instead of failing
    #[arg(long)]
    pub adopt_frozen: bool,

    #[arg(long = evesnap::qga::watchdog::DETACH_FLAG, hide = true)]
    pub watchdog_detach: bool,
    #[arg(long = evesnap::qga::watchdog::TOKEN_FLAG, hide = true)]
    pub watchdog_token: Option<String>,
    #[arg(long = evesnap::qga::watchdog::DEADLINE_FLAG, hide = true)]
    pub watchdog_deadline_ms: Option<u64>,
}

pub fn command() -> clap::Command {
    Args::command().after_help(Exit::table())
}

/// The first signal caught so far, if any, as its name.
fn caught(signals: &mut Events<()>) -> Option<String> {
    signals.poll_signal().then(|| {
        let number = signals.interrupted.unwrap_or_default();
        Signal::try_from(number).map_or_else(|_| format!("signal {number}"), |s| s.to_string())
    })
}

/// The step of a freeze that was not tried.
#[derive(Debug, Serialize)]
struct NotTried<'a> {
    skipped: bool,
    reason: &'a str,
    frozen: i64,
    mountpoints: Option<&'a [String]>,
    watchdog: Option<Watchdog>,
}

/// The step of a freeze that failed, and the state it left.
#[derive(Debug, Serialize)]
struct FreezeFailed<'a> {
    frozen: i64,
    mountpoints: Option<&'a [String]>,
    possibly_frozen: bool,
    cleanup_thaw: Option<CleanupThaw>,
    watchdog: Option<Watchdog>,
}

fn some_mountpoints(mountpoints: &[String]) -> Option<&[String]> {
    (!mountpoints.is_empty()).then_some(mountpoints)
}

pub fn run(args: Args) -> Outcome {
    if let Some(token) = &args.watchdog_token {
        let agent = args.agent.as_deref().unwrap_or_default();
        let deadline = args.watchdog_deadline_ms.unwrap_or(0);
        return match step::watchdog_main(agent, token, deadline, args.watchdog_detach) {
            Ok(()) => Outcome::default(),
            Err(e) => Outcome::error(e),
        };
    }
    let timer = StepTimer::start(TOOL);
    let skipped = |timer: StepTimer, reason: &str, args: &Args| {
        let step = NotTried {
            skipped: true,
            reason,
            frozen: 0,
            mountpoints: some_mountpoints(&args.mountpoints),
            watchdog: None,
        };
        timer.finish_with(false, &step)
    };
    let mut doc = match document::read_stdin() {
        Ok(upstream) => upstream.into_document().unwrap_or_default(),
        Err(e @ document::Error::UpstreamDied) => {
            let mut doc = Document::new();
            doc.agent = args.agent.clone();
            doc.push(skipped(timer, "no upstream document", &args));
            return Outcome::failed(doc, TOOL, evesnap::exit::wrap(e));
        }
        Err(e) => return Outcome::error(evesnap::exit::wrap(e)),
    };
    if let Some(reason) = doc.upstream_failure() {
        doc.push(skipped(timer, &reason, &args));
        return Outcome::failed(
            doc,
            TOOL,
            coded(Exit::UpstreamFailed, format!("{reason}; not freezing")),
        );
    }
    let agent = match (&args.agent, &doc.agent) {
        (Some(flag), Some(upstream)) if flag != upstream => {
            evesnap::warn!("--agent {flag} overrides the document's agent {upstream}");
            flag.clone()
        }
        (Some(agent), _) | (None, Some(agent)) => agent.clone(),
        (None, None) => {
            doc.push(skipped(timer, "no agent", &args));
            let e = coded(
                Exit::Usage,
                "no guest agent: give --agent or a document with `agent`",
            );
            return Outcome::failed(doc, TOOL, e);
        }
    };
    let address: Address = match agent.parse() {
        Ok(address) => address,
        Err(e) => {
            doc.push(skipped(timer, "bad agent address", &args));
            return Outcome::failed(doc, TOOL, coded(Exit::Usage, e.to_string()));
        }
    };
    doc.agent = Some(address.to_string());
    let opts = FreezeOptions {
        mountpoints: args.mountpoints.clone(),
        timeout: args.timeout,
        adopt_frozen: args.adopt_frozen,
        thaw_after: (!args.thaw_after.is_zero()).then_some(args.thaw_after),
        watchdog_program: None,
    };
    let failed_fields = |aftermath: Option<&Aftermath>| {
        fields_of(&FreezeFailed {
            frozen: 0,
            mountpoints: some_mountpoints(&opts.mountpoints),
            possibly_frozen: aftermath.is_some_and(|a| a.possibly_frozen),
            cleanup_thaw: aftermath.and_then(|a| a.thaw.clone()),
            watchdog: aftermath.and_then(|a| a.watchdog.clone()),
        })
    };

    let connect_deadline = Instant::now() + args.connect_timeout.unwrap_or(args.timeout);
    let mut client = match Client::connect(&address, connect_deadline) {
        Ok(client) => client,
        Err(e) => {
            doc.push(timer.finish(false, failed_fields(None)));
            return Outcome::failed(doc, TOOL, evesnap::exit::wrap(e));
        }
    };
    client.set_timeout(args.timeout);

    // From here on a signal does not end the process: it is answered by a thaw.
    let mut signals = match Events::<()>::install() {
        Ok(signals) => signals,
        Err(e) => {
            doc.push(timer.finish(false, failed_fields(None)));
            let e = anyhow::Error::new(e).context("cannot install signal handlers");
            return Outcome::failed(doc, TOOL, e);
        }
    };
    let result = match caught(&mut signals) {
        Some(signal) => Err(coded(
            Exit::StepFailed,
            format!("interrupted by {signal} before the freeze"),
        )),
        None => Ok(freeze(&mut client, &opts)),
    };
    let result = match result {
        Ok(result) => result,
        Err(e) => {
            doc.push(timer.finish(false, failed_fields(None)));
            return Outcome::failed(doc, TOOL, e);
        }
    };
    let result = result.and_then(|report| match caught(&mut signals) {
        None => Ok(report),
        Some(signal) => Err(Error::Interrupted {
            signal,
            aftermath: Box::new(abort(&mut client, &report, opts.timeout)),
        }),
    });
    match result {
        Ok(report) => {
            let what = match report.frozen {
                Some(n) => format!("froze {n} filesystems in {:.1} ms", report.freeze_ms),
                None => "adopted the existing freeze".to_string(),
            };
            match &report.watchdog {
                Some(w) => evesnap::note!(
                    "{what} (agent {}); watchdog pid {} thaws at {} unless qga-thaw runs first",
                    report.agent_version,
                    w.pid.unwrap_or(0),
                    w.deadline
                ),
                None => evesnap::note!("{what} (agent {}); no watchdog", report.agent_version),
            }
            // The watchdog keeps this connection for qga-thaw: closing it would make the
            // agent pause ~100 ms before it reads the thaw (see the watchdog module).
            let mut client = Some(client);
            if let (Some(w), Some(c)) = (&report.watchdog, client.take()) {
                if let Err(e) = watchdog::hand_over(w, c.into_fd()) {
                    evesnap::note!(
                        "the agent connection is closed instead of kept: {}",
                        evesnap::exit::chain_of(&e)
                    );
                }
            }
            doc.push(timer.finish_with(true, &report));
            if let Some(failed) = delivery::pass_on(&doc, client, &address, &report, opts.timeout) {
                return failed;
            }
            if let Some(signal) = caught(&mut signals) {
                evesnap::note!(
                    "{signal} came after the document was passed on: the next steps own the freeze now"
                );
            }
            Outcome::default()
        }
        Err(e) => {
            doc.push(timer.finish(false, failed_fields(e.aftermath())));
            if e.aftermath().is_some_and(|a| a.possibly_frozen) {
                evesnap::warn!(
                    "the guest may be frozen: {}",
                    e.aftermath().map(ToString::to_string).unwrap_or_default()
                );
            }
            Outcome::failed(doc, TOOL, evesnap::exit::wrap(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_complete() {
        let help = evesnap::cli::assert_help(
            command(),
            &["--mountpoint", "--thaw-after", "--adopt-frozen", "watchdog"],
        );
        assert!(
            !help.contains("--watchdog-token"),
            "hidden flags stay hidden"
        );
    }

    #[test]
    fn aftermath_says_what_state_the_guest_is_in() {
        let a = Aftermath {
            possibly_frozen: true,
            thaw: Some(CleanupThaw::Queued),
            watchdog: None,
        };
        let text = a.to_string();
        assert!(
            text.contains("MAY BE FROZEN") && text.contains("run qga-thaw"),
            "{text}"
        );
        let b = Aftermath {
            possibly_frozen: false,
            thaw: Some(CleanupThaw::Thawed { count: 2 }),
            watchdog: None,
        };
        assert_eq!(b.to_string(), "the guest was thawed again (2 filesystems)");
    }
}
