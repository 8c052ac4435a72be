//! `qga-thaw`: thaws a guest's filesystems through its QEMU guest agent, whatever the
//! upstream steps did, cancels the auto-thaw watchdog and ends the pipeline's document.
//!
//! The step it appends to the document (see [`evesnap::document`]):
//!
//! ```json
//! {"tool": "qga-thaw", "ok": true, "started_at": "…", "duration_ms": 12.0,
//!  "thawed": 3, "expected": 3, "thaw_ms": 2.1, "watchdog_cancelled": {"pid": 4242, …}}
//! ```
//!
//! `expected` is the count the upstream `qga-freeze` step froze (`null` if unknown); a
//! thaw that thawed fewer filesystems means some were thawed early (by the watchdog?),
//! so the snapshot in between may not be consistent: the step fails.
//!
//! The orchestrator calls [`thaw`] on a [`evesnap::qga::Client`] it connected itself.

use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use evesnap::cli::Outcome;
use evesnap::document::{self, Document, StepTimer};
use evesnap::exit::{coded, Exit, HasExit};
use evesnap::qga::watchdog;
use evesnap::qga::{Address, Client, ThawError, Thawed};
use evesnap::steps::{FreezeReport, NotThawed};

/// The tool's name, as in the document's steps.
pub const TOOL: &str = "qga-thaw";

/// How to thaw.
#[derive(Debug, Clone)]
pub struct ThawOptions {
    /// The time each agent call gets.
    pub timeout: Duration,
    /// The number of filesystems the freeze froze, if known: a thaw of fewer is an
    /// [`Error::EarlyThaw`].
    pub expected: Option<i64>,
    /// Cancel the auto-thaw watchdog armed for this agent once the thaw is verified.
    pub cancel_watchdog: bool,
}

impl Default for ThawOptions {
    fn default() -> Self {
        ThawOptions {
            timeout: evesnap::qga::DEFAULT_TIMEOUT,
            expected: None,
            cancel_watchdog: true,
        }
    }
}

pub use evesnap::steps::ThawReport;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Thaw(#[from] ThawError),
    #[error(
        "the thaw thawed {thawed} filesystems but the freeze froze {expected}: some were thawed early \
         (by the watchdog?), so the snapshot may not be consistent"
    )]
    EarlyThaw {
        thawed: i64,
        expected: i64,
        report: Box<ThawReport>,
    },
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::EarlyThaw { .. } => Exit::StepFailed,
            _ => Exit::ThawFailed,
        }
    }
}

/// Thaws, verifies that the guest reports `thawed`, and cancels the watchdog.
///
/// The watchdog stays armed when the thaw cannot be verified: it may still succeed.
pub fn thaw(client: &mut Client, opts: &ThawOptions) -> Result<ThawReport, Error> {
    // An agent that stopped answering earlier gets the thaw queued behind what is pending.
    let thawed = evesnap::qga::thaw_and_verify(client, opts.timeout, !client.is_synced())?;
    finish(client, opts, thawed)
}

/// After a verified thaw: cancels the watchdog, checks the count.
fn finish(client: &Client, opts: &ThawOptions, thawed: Thawed) -> Result<ThawReport, Error> {
    let watchdog_cancelled = if opts.cancel_watchdog {
        watchdog::cancel(client.address()).unwrap_or_else(|e| {
            evesnap::warn!(
                "the guest is thawed, but its watchdog could not be cancelled (it will find the guest thawed): {}",
                evesnap::exit::chain_of(&e)
            );
            None
        })
    } else {
        None
    };
    let report = ThawReport {
        thawed: thawed.count,
        expected: opts.expected,
        thaw_ms: thawed.thaw_ms,
        thawed_at_unix_us: thawed.at_unix_us,
        kept_connection: false,
        watchdog_cancelled,
        early_thaw: false,
    };
    match opts.expected {
        Some(expected) if thawed.count < expected => Err(Error::EarlyThaw {
            thawed: thawed.count,
            expected,
            report: Box::new(ThawReport {
                early_thaw: true,
                ..report
            }),
        }),
        _ => Ok(report),
    }
}

/// Connects and thaws. A connection the agent does not answer still gets a queued thaw.
///
/// From before it connects until its thaw is verified it is registered with the freeze's
/// watchdog ([`watchdog::Relay`]): should it end in between, or fail, the watchdog thaws
/// at once instead of at its deadline.
pub fn connect_and_thaw(
    address: &Address,
    connect_timeout: Duration,
    opts: &ThawOptions,
) -> Result<ThawReport, Error> {
    let (relay, kept) = match watchdog::Relay::thaw(address) {
        Ok(Some((relay, kept))) => (Some(relay), kept),
        Ok(None) => (None, None),
        Err(e) => {
            evesnap::note!(
                "not registered with the watchdog, no kept agent connection: {}",
                evesnap::exit::chain_of(&e)
            );
            (None, None)
        }
    };
    let result = thaw_through(address, connect_timeout, opts, kept);
    match (relay, &result) {
        // A watchdog left armed stays armed; a cancelled one is gone already.
        (Some(relay), Ok(_)) if !opts.cancel_watchdog => {
            if let Err(e) = relay.delivered(None) {
                evesnap::warn!(
                    "the watchdog may thaw now rather than at its deadline: {}",
                    evesnap::exit::chain_of(&e)
                );
            }
        }
        // Dropped: a failed thaw is the watchdog's to retry, now.
        (relay, _) => drop(relay),
    }
    result
}

/// [`connect_and_thaw`] through `kept`, the freeze's own connection the watchdog kept (no
/// reconnect inside the freeze window), or else a new one.
fn thaw_through(
    address: &Address,
    connect_timeout: Duration,
    opts: &ThawOptions,
    kept: Option<std::os::fd::OwnedFd>,
) -> Result<ThawReport, Error> {
    let started = Instant::now();
    let deadline = started + connect_timeout;
    if let Some(fd) = kept {
        match Client::from_kept_fd(fd, address.clone(), deadline) {
            Ok(mut client) => {
                client.set_timeout(opts.timeout);
                return thaw(&mut client, opts).map(|report| ThawReport {
                    kept_connection: true,
                    ..report
                });
            }
            Err(e) => evesnap::note!("the kept agent connection failed ({e}); connecting anew"),
        }
    }
    let mut client = Client::open(address, deadline).map_err(ThawError::Connect)?;
    client.set_timeout(opts.timeout);
    if let Err(e) = client.sync(deadline) {
        if !e.is_timeout() {
            return Err(ThawError::Connect(e).into());
        }
        // Silent agent (paused VM, busy socket): queue a thaw anyway, it runs later.
        let thawed =
            evesnap::qga::thaw_within(&mut client, Duration::from_millis(500), opts.timeout, true)
                .map_err(|queued| match queued {
                    ThawError::Queued(_) | ThawError::Thaw(_) => ThawError::Queued(e),
                    other => other,
                })?;
        return finish(&client, opts, thawed);
    }
    thaw(&mut client, opts)
}

const LONG_ABOUT: &str = "\
Thaws the filesystems of a guest through its QEMU guest agent (qemu-ga), verifies that the \
guest reports `thawed`, cancels the auto-thaw watchdog qga-freeze armed, and writes the job \
document on stdout.

It thaws whatever the upstream says: an upstream failure is exactly when a thaw matters. The \
agent is --agent, else the document's `agent`. If stdin is not a valid document but --agent \
is given, it still thaws, then reports the bad input. From before it connects until its thaw is \
verified it is registered with the freeze's watchdog: should it die or fail in between, the \
watchdog thaws at once rather than at its deadline.

Exit status is non-zero when this step or any upstream step failed, so that \
`qga-freeze … | zsnap … | qga-thaw` reports failure from its last command: 6 when the thaw \
failed or could not be verified (the watchdog, still armed, then tries at once), 5 for an upstream failure, \
1 when fewer filesystems were thawed than frozen (some were thawed early, e.g. by the \
watchdog, so the snapshot may not be consistent).";

/// The command line of `qga-thaw`.
#[derive(Debug, Parser)]
#[command(name = "qga-thaw", version, about = "Thaw a guest's filesystems through its guest agent", long_about = LONG_ABOUT)]
pub struct Args {
    /// The guest agent: unix:PATH (or a plain path) for the virtio-serial socket,
    /// vsock:CID:PORT (AF_VSOCK through the host kernel), or hvsock:PATH:PORT (guest vsock
    /// port PORT through a hybrid vsock device's Unix socket PATH: `CONNECT PORT`, `OK`)
    /// [default: the upstream document's `agent`]
    #[arg(long, value_name = "ADDR")]
    pub agent: Option<String>,
    /// Seconds each agent call may take
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = evesnap::time::parse_timeout)]
    pub timeout: Duration,
    /// Seconds to wait for the agent to answer at all [default: --timeout]
    #[arg(long, value_name = "SECS", value_parser = evesnap::time::parse_timeout)]
    pub connect_timeout: Option<Duration>,
    /// Leave the auto-thaw watchdog armed
    #[arg(long)]
    pub keep_watchdog: bool,
}

pub fn command() -> clap::Command {
    Args::command().after_help(Exit::table())
}

/// What the upstream `qga-freeze` step froze, when it froze through this agent.
fn expected_count(doc: &Document, address: &Address) -> Option<i64> {
    let (_, freeze) = doc.last_ok::<FreezeReport>()?;
    let upstream_agent = doc.agent.as_deref().and_then(|a| a.parse::<Address>().ok());
    if matches!(upstream_agent, Some(a) if a != *address) {
        return None;
    }
    freeze.frozen
}

pub fn run(args: Args) -> Outcome {
    let timer = StepTimer::start(TOOL);
    let (upstream, input_error) = match document::read_stdin() {
        Ok(upstream) => (upstream.into_document(), None),
        Err(e) => (None, Some(e)),
    };
    let agent = args
        .agent
        .clone()
        .or_else(|| upstream.as_ref().and_then(|d| d.agent.clone()));
    let Some(agent) = agent else {
        return match (input_error, upstream) {
            (Some(e), _) => Outcome::error(
                evesnap::exit::wrap(e).context("no --agent, and no document to read it from"),
            ),
            (None, Some(doc)) => Outcome::failed(
                doc,
                TOOL,
                coded(
                    Exit::Usage,
                    "no guest agent: give --agent or a document with `agent`",
                ),
            ),
            (None, None) => Outcome::error(coded(
                Exit::Usage,
                "no guest agent: give --agent or a document with `agent`",
            )),
        };
    };
    let mut doc = upstream.unwrap_or_default();
    let address: Address = match agent.parse() {
        Ok(address) => address,
        Err(e) => {
            let step = NotThawed {
                thawed: None,
                expected: None,
                possibly_frozen: None,
                reason: Some("bad agent address".into()),
                early_thaw: None,
            };
            doc.push(timer.finish_with(false, &step));
            return Outcome::failed(doc, TOOL, coded(Exit::Usage, e.to_string()));
        }
    };
    let opts = ThawOptions {
        timeout: args.timeout,
        expected: expected_count(&doc, &address),
        cancel_watchdog: !args.keep_watchdog,
    };
    doc.agent = Some(address.to_string());
    let upstream_failed = doc.upstream_failure();
    let result = connect_and_thaw(
        &address,
        args.connect_timeout.unwrap_or(args.timeout),
        &opts,
    );

    let thaw_error = match result {
        Ok(report) => {
            evesnap::note!(
                "thawed {} filesystems in {:.1} ms{}",
                report.thawed,
                report.thaw_ms,
                report
                    .watchdog_cancelled
                    .as_ref()
                    .map_or(String::new(), |w| format!(
                        "; cancelled watchdog pid {}",
                        w.pid.unwrap_or(0)
                    ))
            );
            doc.push(timer.finish_with(true, &report));
            None
        }
        Err(e) => {
            let step = match &e {
                Error::EarlyThaw { report, .. } => timer.finish_with(false, report),
                Error::Thaw(_) => timer.finish_with(
                    false,
                    &NotThawed {
                        thawed: None,
                        expected: opts.expected,
                        possibly_frozen: Some(true),
                        reason: None,
                        early_thaw: Some(false),
                    },
                ),
            };
            doc.push(step);
            Some(e)
        }
    };
    // The most urgent failure decides the exit: a guest that may be frozen first.
    match (thaw_error, input_error, upstream_failed) {
        (Some(e), input, _) if e.exit() == Exit::ThawFailed => {
            if let Some(input) = input {
                evesnap::warn!(
                    "also, the input was bad: {}",
                    evesnap::exit::chain_of(&input)
                );
            }
            Outcome::failed(doc, TOOL, evesnap::exit::wrap(e))
        }
        (thaw_error, Some(input), _) => {
            if let Some(e) = thaw_error {
                evesnap::warn!("{}", evesnap::exit::chain(&evesnap::exit::wrap(e)));
            }
            Outcome::failed(
                doc,
                TOOL,
                evesnap::exit::wrap(input).context("thawed, but the upstream document is bad"),
            )
        }
        (thaw_error, None, Some(reason)) => {
            if let Some(e) = thaw_error {
                evesnap::warn!("{}", evesnap::exit::chain(&evesnap::exit::wrap(e)));
            }
            Outcome::failed(
                doc,
                TOOL,
                coded(
                    Exit::UpstreamFailed,
                    format!("{reason} (the guest is thawed)"),
                ),
            )
        }
        (Some(e), None, None) => Outcome::failed(doc, TOOL, evesnap::exit::wrap(e)),
        (None, None, None) => Outcome::success(doc),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_complete() {
        evesnap::cli::assert_help(command(), &["--agent", "--timeout", "upstream"]);
    }

    #[test]
    fn expected_count_comes_from_the_freeze_step_of_the_same_agent() {
        let text = r#"{"version":1,"ok":true,"agent":"unix:/a.sock","steps":[
            {"tool":"qga-freeze","ok":true,"started_at":"x","duration_ms":1,"frozen":3,
             "mountpoints":null,"adopted":false,"agent_version":"7.2","freeze_ms":1.0,
             "frozen_at_unix_us":1,"watchdog":null}]}"#;
        let doc = Document::from_json(text).expect("doc");
        assert_eq!(
            expected_count(&doc, &"unix:/a.sock".parse().expect("a")),
            Some(3)
        );
        assert_eq!(
            expected_count(&doc, &"unix:/b.sock".parse().expect("b")),
            None
        );
    }

    #[test]
    fn thaw_failures_exit_thaw_failed() {
        assert_eq!(Error::Thaw(ThawError::StillFrozen).exit(), Exit::ThawFailed);
        let timeout = evesnap::qga::Error::Timeout {
            address: "unix:/a".into(),
            command: "x".into(),
            after: Duration::from_secs(1),
        };
        let err = evesnap::exit::wrap(Error::Thaw(ThawError::Queued(timeout)));
        assert_eq!(evesnap::exit::exit_of(&err), Exit::ThawFailed);
    }
}
