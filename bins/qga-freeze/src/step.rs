//! The freeze step, as the binary and the orchestrator call it.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use evesnap::exit::{Exit, HasExit};
use evesnap::qga::commands as qga;
use evesnap::qga::watchdog::{self, Watchdog};
use evesnap::qga::{Client, Error as QgaError, ThawError};
use serde::{Deserialize, Serialize};

/// What to freeze and how.
#[derive(Debug, Clone)]
pub struct FreezeOptions {
    /// Mountpoints to freeze (`guest-fsfreeze-freeze-list`); empty freezes every
    /// filesystem of the guest (`guest-fsfreeze-freeze`).
    pub mountpoints: Vec<String>,
    /// The time each agent call gets.
    pub timeout: Duration,
    /// Take over a guest that is already frozen instead of failing.
    pub adopt_frozen: bool,
    /// Arm the auto-thaw watchdog to thaw this long after the freeze; `None`: no watchdog.
    pub thaw_after: Option<Duration>,
    /// The program that runs the watchdog; `None`: [`default_watchdog_program`].
    pub watchdog_program: Option<PathBuf>,
}

impl Default for FreezeOptions {
    fn default() -> Self {
        FreezeOptions {
            mountpoints: Vec::new(),
            timeout: evesnap::qga::DEFAULT_TIMEOUT,
            adopt_frozen: false,
            thaw_after: Some(Duration::from_secs(60)),
            watchdog_program: None,
        }
    }
}

pub use evesnap::steps::FreezeReport;

/// What a cleanup thaw after a failed or aborted freeze did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "result")]
pub enum CleanupThaw {
    /// Thawed and verified.
    Thawed { count: i64 },
    /// Sent, but no answer came in time: it runs when the agent reads again.
    Queued,
    /// It failed, or the guest still reports frozen.
    Failed { message: String },
}

/// The state a failed freeze left the guest in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aftermath {
    /// The guest may be frozen now, or become frozen later (a freeze that got no reply
    /// runs when the agent reads again).
    pub possibly_frozen: bool,
    /// The cleanup thaw, if one was tried.
    pub thaw: Option<CleanupThaw>,
    /// The auto-thaw watchdog, if it is still armed.
    pub watchdog: Option<Watchdog>,
}

impl Aftermath {
    fn thawed() -> Aftermath {
        Aftermath {
            possibly_frozen: false,
            thaw: None,
            watchdog: None,
        }
    }
}

impl fmt::Display for Aftermath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.possibly_frozen {
            return match &self.thaw {
                Some(CleanupThaw::Thawed { count }) => {
                    write!(f, "the guest was thawed again ({count} filesystems)")
                }
                _ => write!(f, "the guest is not frozen"),
            };
        }
        write!(f, "THE GUEST MAY BE FROZEN")?;
        match &self.thaw {
            Some(CleanupThaw::Queued) => {
                write!(f, "; a thaw was sent and runs when the agent reads again")?
            }
            Some(CleanupThaw::Failed { message }) => write!(f, "; the thaw failed ({message})")?,
            Some(CleanupThaw::Thawed { .. }) | None => {}
        }
        match &self.watchdog {
            Some(w) => write!(
                f,
                "; the watchdog (pid {}) thaws it at {}",
                w.pid.unwrap_or(0),
                w.deadline
            ),
            None => write!(f, "; no watchdog is armed: run qga-thaw"),
        }
    }
}

/// Why a freeze failed. Variants with an [`Aftermath`] say what state the guest is in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the check before freezing failed")]
    Preflight(#[source] QgaError),
    #[error(transparent)]
    Unavailable(#[from] evesnap::qga::Unavailable),
    #[error("the guest is already frozen (--adopt-frozen takes over that freeze)")]
    AlreadyFrozen,
    #[error("cannot arm the auto-thaw watchdog")]
    Watchdog(#[source] watchdog::Error),
    #[error("the freeze failed; {aftermath}")]
    Freeze {
        #[source]
        source: QgaError,
        aftermath: Box<Aftermath>,
    },
    #[error("the freeze froze no filesystem{}; {aftermath}", list(mountpoints))]
    NothingFrozen {
        mountpoints: Vec<String>,
        aftermath: Box<Aftermath>,
    },
    #[error("the freeze froze {frozen} filesystems but {requested} mountpoints were asked for{}; {aftermath}", list(mountpoints))]
    Partial {
        frozen: i64,
        requested: usize,
        mountpoints: Vec<String>,
        aftermath: Box<Aftermath>,
    },
    #[error("the guest reports thawed right after the freeze; {aftermath}")]
    NotFrozen { aftermath: Box<Aftermath> },
    #[error("cannot verify the freeze; {aftermath}")]
    Verify {
        #[source]
        source: QgaError,
        aftermath: Box<Aftermath>,
    },
    #[error("interrupted by {signal} after the freeze; {aftermath}")]
    Interrupted {
        signal: String,
        aftermath: Box<Aftermath>,
    },
}

fn list(mountpoints: &[String]) -> String {
    if mountpoints.is_empty() {
        String::new()
    } else {
        format!(" (of {})", mountpoints.join(", "))
    }
}

impl Error {
    /// The guest's state after this failure, when the failure came after arming the
    /// watchdog (before, nothing changed).
    pub fn aftermath(&self) -> Option<&Aftermath> {
        match self {
            Error::Freeze { aftermath, .. }
            | Error::NothingFrozen { aftermath, .. }
            | Error::Partial { aftermath, .. }
            | Error::NotFrozen { aftermath }
            | Error::Verify { aftermath, .. }
            | Error::Interrupted { aftermath, .. } => Some(&**aftermath),
            _ => None,
        }
    }
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Preflight(e) => match e {
                QgaError::Unsupported { .. }
                | QgaError::Disabled { .. }
                | QgaError::Agent { .. } => Exit::Preflight,
                e => e.exit(),
            },
            Error::Unavailable(_) | Error::AlreadyFrozen => Exit::Preflight,
            Error::Watchdog(_) => Exit::StepFailed,
            // A freeze or verification that got no reply: the agent's silence is the news.
            Error::Freeze { source, .. } | Error::Verify { source, .. } if source.is_timeout() => {
                Exit::AgentTimeout
            }
            e => match e.aftermath() {
                Some(a) if a.possibly_frozen => Exit::ThawFailed,
                _ => match e {
                    Error::Freeze { source, .. } | Error::Verify { source, .. } => source.exit(),
                    _ => Exit::StepFailed,
                },
            },
        }
    }
}

/// The program that runs the watchdog: this executable if it is `qga-freeze`, else a
/// `qga-freeze` next to it (or one level up, for test executables in `deps/`), else
/// `qga-freeze` from `PATH`.
pub fn default_watchdog_program() -> PathBuf {
    const NAME: &str = "qga-freeze";
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == NAME) {
            return exe;
        }
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join(NAME);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(NAME)
}

/// Freezes the guest's filesystems and verifies the freeze.
///
/// Before: `guest-info` (freeze commands present and enabled), `guest-fsfreeze-status`
/// (an existing freeze fails unless adopted). Then the watchdog is armed (so no death
/// after this point leaves the guest frozen past its deadline), the freeze sent, and
/// `guest-fsfreeze-status` must say `frozen`. Any failure after the freeze was sent
/// thaws (a freeze of nothing still ran the agent's hooks) and says in its
/// [`Aftermath`] whether the guest may still be frozen.
pub fn freeze(client: &mut Client, opts: &FreezeOptions) -> Result<FreezeReport, Error> {
    let report = freeze_unverified(client, opts)?;
    verify_frozen(client, &report, opts.timeout)?;
    Ok(report)
}

/// [`freeze`] without its last check, for a caller that overlaps that round trip with
/// work inside the freeze window: nothing may rely on the freeze before
/// [`verify_frozen`] succeeded.
pub fn freeze_unverified(client: &mut Client, opts: &FreezeOptions) -> Result<FreezeReport, Error> {
    let info = client
        .execute_within(qga::guest_info {}, opts.timeout)
        .map_err(Error::Preflight)?;
    let status = check(client, opts, &info, &[])?;
    freeze_checked(client, opts, &info.version, Some(status))
}

/// The check before a freeze: the agent (its `guest-info`, asked by the caller) has the
/// freeze commands and `also_needed` enabled; the guest's freeze state now.
pub fn check(
    client: &mut Client,
    opts: &FreezeOptions,
    info: &qga::GuestAgentInfo,
    also_needed: &[&'static str],
) -> Result<qga::GuestFsfreezeStatus, Error> {
    let freeze_command = if opts.mountpoints.is_empty() {
        "guest-fsfreeze-freeze"
    } else {
        "guest-fsfreeze-freeze-list"
    };
    let mut needed = vec![
        freeze_command,
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
    ];
    needed.extend_from_slice(also_needed);
    evesnap::qga::check_commands(info, &needed)?;
    client
        .execute_within(qga::guest_fsfreeze_status {}, opts.timeout)
        .map_err(Error::Preflight)
}

/// Arms the watchdog and freezes, after [`check`]: `status` is what it found, or `None` to
/// ask again (something ran in the guest since).
pub fn freeze_checked(
    client: &mut Client,
    opts: &FreezeOptions,
    agent_version: &str,
    status: Option<qga::GuestFsfreezeStatus>,
) -> Result<FreezeReport, Error> {
    let timeout = opts.timeout;
    let status = match status {
        Some(status) => status,
        None => client
            .execute_within(qga::guest_fsfreeze_status {}, timeout)
            .map_err(Error::Preflight)?,
    };
    let mountpoints = (!opts.mountpoints.is_empty()).then(|| opts.mountpoints.clone());

    let arm = |client: &Client| -> Result<Option<Watchdog>, Error> {
        let Some(after) = opts.thaw_after else {
            return Ok(None);
        };
        let program = opts
            .watchdog_program
            .clone()
            .unwrap_or_else(default_watchdog_program);
        watchdog::arm(client.address(), after, &program)
            .map(Some)
            .map_err(Error::Watchdog)
    };

    if status == qga::GuestFsfreezeStatus::frozen {
        if !opts.adopt_frozen {
            return Err(Error::AlreadyFrozen);
        }
        return Ok(FreezeReport {
            frozen: None,
            mountpoints,
            adopted: true,
            agent_version: agent_version.to_string(),
            freeze_ms: 0.0,
            frozen_at_unix_us: evesnap::time::now_unix_us(),
            watchdog: arm(client)?,
        });
    }

    let watchdog = arm(client)?;
    let started = Instant::now();
    let result = match &mountpoints {
        None => client.execute_within(qga::guest_fsfreeze_freeze {}, timeout),
        Some(list) => client.execute_within(
            qga::guest_fsfreeze_freeze_list {
                mountpoints: Some(list.clone()),
            },
            timeout,
        ),
    };
    let freeze_ms = evesnap::time::millis(started.elapsed());
    let frozen_at_unix_us = evesnap::time::now_unix_us();
    let frozen = match result {
        Ok(n) => n,
        Err(source) => {
            // A freeze without reply may still run; a refused one thaws what it froze,
            // but thawing again costs nothing and makes sure.
            let aftermath = boxed_cleanup(client, timeout, watchdog, source.is_timeout());
            return Err(Error::Freeze { source, aftermath });
        }
    };
    let wanted: std::collections::BTreeSet<&String> = opts.mountpoints.iter().collect();
    if frozen <= 0 {
        let aftermath = boxed_cleanup(client, timeout, watchdog, false);
        return Err(Error::NothingFrozen {
            mountpoints: opts.mountpoints.clone(),
            aftermath,
        });
    }
    if (frozen as usize) < wanted.len() {
        let aftermath = boxed_cleanup(client, timeout, watchdog, false);
        return Err(Error::Partial {
            frozen,
            requested: wanted.len(),
            mountpoints: opts.mountpoints.clone(),
            aftermath,
        });
    }
    Ok(FreezeReport {
        frozen: Some(frozen),
        mountpoints,
        adopted: false,
        agent_version: agent_version.to_string(),
        freeze_ms,
        frozen_at_unix_us,
        watchdog,
    })
}

/// The guest must report `frozen` after a freeze (an adopted one was just checked);
/// otherwise it is thawed and cleaned up as after any failed freeze.
pub fn verify_frozen(
    client: &mut Client,
    report: &FreezeReport,
    timeout: Duration,
) -> Result<(), Error> {
    if report.adopted {
        return Ok(());
    }
    let watchdog = report.watchdog.clone();
    match client.execute_within(qga::guest_fsfreeze_status {}, timeout) {
        Ok(qga::GuestFsfreezeStatus::frozen) => Ok(()),
        Ok(qga::GuestFsfreezeStatus::thawed) => {
            let aftermath = boxed_cleanup(client, timeout, watchdog, false);
            Err(Error::NotFrozen { aftermath })
        }
        Err(source) => {
            let aftermath = boxed_cleanup(client, timeout, watchdog, source.is_timeout());
            Err(Error::Verify { source, aftermath })
        }
    }
}

/// Undoes a successful freeze (e.g. interrupted before the document was delivered):
/// thaws, verifies, cancels the watchdog.
pub fn abort(client: &mut Client, report: &FreezeReport, timeout: Duration) -> Aftermath {
    let unsynced = !client.is_synced();
    cleanup(client, timeout, report.watchdog.clone(), unsynced)
}

fn boxed_cleanup(
    client: &mut Client,
    timeout: Duration,
    watchdog: Option<Watchdog>,
    unsynced: bool,
) -> Box<Aftermath> {
    Box::new(cleanup(client, timeout, watchdog, unsynced))
}

/// Thaws after a failed freeze; with `unsynced` (the agent stopped answering) the thaw
/// is queued behind the pending requests instead of waiting for a sync.
fn cleanup(
    client: &mut Client,
    timeout: Duration,
    watchdog: Option<Watchdog>,
    unsynced: bool,
) -> Aftermath {
    let count = match evesnap::qga::thaw_and_verify(client, timeout, unsynced) {
        Ok(thawed) => thawed.count,
        Err(e) => {
            let thaw = match e {
                ThawError::Queued(_) => CleanupThaw::Queued,
                e => CleanupThaw::Failed {
                    message: evesnap::exit::chain_of(&e),
                },
            };
            return Aftermath {
                possibly_frozen: true,
                thaw: Some(thaw),
                watchdog,
            };
        }
    };
    if let Some(w) = &watchdog {
        if let Err(e) = watchdog::cancel_this(w) {
            evesnap::warn!(
                "the guest is thawed but its watchdog stays armed: {}",
                evesnap::exit::chain_of(&e)
            );
        }
    }
    Aftermath {
        thaw: Some(CleanupThaw::Thawed { count }),
        ..Aftermath::thawed()
    }
}

/// Runs the watchdog body when the hidden watchdog flags are given.
pub(crate) fn watchdog_main(
    agent: &str,
    token: &str,
    deadline_unix_ms: u64,
    detach: bool,
) -> anyhow::Result<()> {
    let address = agent.parse::<evesnap::qga::Address>()?;
    watchdog::main(&address, token, deadline_unix_ms, detach)
}

#[cfg(test)]
mod tests {
    use super::*;
    use evesnap::qga::AgentError;

    fn timeout() -> QgaError {
        QgaError::Timeout {
            address: "unix:/a".into(),
            command: "guest-fsfreeze-freeze".into(),
            after: Duration::from_secs(2),
        }
    }

    fn possibly_frozen() -> Box<Aftermath> {
        Box::new(Aftermath {
            possibly_frozen: true,
            thaw: Some(CleanupThaw::Queued),
            watchdog: None,
        })
    }

    #[test]
    fn exit_codes_follow_the_guest_state() {
        let refused = AgentError {
            class: "CommandNotFound".into(),
            desc: "not found".into(),
        };
        let unsupported = QgaError::Unsupported {
            command: "guest-info".into(),
            source: refused,
        };
        assert_eq!(Error::Preflight(unsupported).exit(), Exit::Preflight);
        assert_eq!(Error::Preflight(timeout()).exit(), Exit::AgentTimeout);
        assert_eq!(Error::AlreadyFrozen.exit(), Exit::Preflight);
        // No answer to the freeze: the timeout code, even though the guest may be frozen.
        assert_eq!(
            Error::Freeze {
                source: timeout(),
                aftermath: possibly_frozen()
            }
            .exit(),
            Exit::AgentTimeout
        );
        // The freeze broke otherwise and the cleanup thaw could not be verified.
        let broke = QgaError::Disconnected {
            command: "guest-fsfreeze-freeze".into(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        };
        assert_eq!(
            Error::Freeze {
                source: broke,
                aftermath: possibly_frozen()
            }
            .exit(),
            Exit::ThawFailed
        );
        let thawed = Box::new(Aftermath {
            possibly_frozen: false,
            thaw: Some(CleanupThaw::Thawed { count: 0 }),
            watchdog: None,
        });
        assert_eq!(
            Error::NothingFrozen {
                mountpoints: vec!["/x".into()],
                aftermath: thawed
            }
            .exit(),
            Exit::StepFailed
        );
        assert_eq!(
            Error::NotFrozen {
                aftermath: possibly_frozen()
            }
            .exit(),
            Exit::ThawFailed
        );
    }

    #[test]
    fn messages_name_the_mountpoints_and_the_state() {
        let thawed = Box::new(Aftermath {
            possibly_frozen: false,
            thaw: Some(CleanupThaw::Thawed { count: 0 }),
            watchdog: None,
        });
        let e = Error::NothingFrozen {
            mountpoints: vec!["/no".into()],
            aftermath: thawed,
        };
        assert_eq!(
            e.to_string(),
            "the freeze froze no filesystem (of /no); the guest was thawed again (0 filesystems)"
        );
    }
}
