//! The freeze step, as the binary and the orchestrator call it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use evesnap::qga::commands as qga;
use evesnap::qga::watchdog::{self, Watchdog};
use evesnap::qga::Client;

use crate::aftermath::boxed_cleanup;
use crate::error::Error;

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
/// [`Aftermath`](crate::Aftermath) whether the guest may still be frozen.
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
