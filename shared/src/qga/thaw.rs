//! Thaw and verify: the one implementation qga-thaw, qga-freeze's cleanup after a failed
//! freeze, the orchestrator and the auto-thaw watchdog all use.

use std::time::{Duration, Instant};

use super::{commands, Client, Error};
use crate::exit::{Exit, HasExit};

/// Why a thaw did not end with the guest verified thawed. Every case but a refused
/// connection may leave the guest frozen.
#[derive(Debug, thiserror::Error)]
pub enum ThawError {
    #[error("cannot reach the guest agent to thaw: the guest may still be frozen")]
    Connect(#[source] Error),
    #[error("the thaw failed: the guest may still be frozen")]
    Thaw(#[source] Error),
    #[error("a thaw was queued but not answered: the guest may still be frozen until the agent reads again")]
    Queued(#[source] Error),
    #[error("cannot verify the thaw: the guest may still be frozen")]
    Verify(#[source] Error),
    #[error("the guest still reports frozen after the thaw")]
    StillFrozen,
}

impl HasExit for ThawError {
    fn exit(&self) -> Exit {
        Exit::ThawFailed
    }
}

/// A thaw the guest confirmed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thawed {
    /// Filesystems thawed (0: nothing was frozen).
    pub count: i64,
    /// Round trip of the thaw command alone.
    pub thaw_ms: f64,
    /// When the thaw command returned (µs since the epoch).
    pub at_unix_us: u64,
}

/// Sends `guest-fsfreeze-thaw` (with `queue`, behind whatever is pending on a connection
/// whose agent stopped answering, instead of syncing first), then checks that
/// `guest-fsfreeze-status` says `thawed`. Each call gets `timeout`; a queued thaw may
/// get a shorter `thaw_timeout`.
pub fn thaw_and_verify(
    client: &mut Client,
    timeout: Duration,
    queue: bool,
) -> Result<Thawed, ThawError> {
    thaw_within(client, timeout, timeout, queue)
}

/// [`thaw_and_verify`] with its own time for the thaw command.
pub fn thaw_within(
    client: &mut Client,
    thaw_timeout: Duration,
    timeout: Duration,
    queue: bool,
) -> Result<Thawed, ThawError> {
    let started = Instant::now();
    let sent = if queue {
        client.execute_unsynced(commands::guest_fsfreeze_thaw {}, thaw_timeout)
    } else {
        client.execute_within(commands::guest_fsfreeze_thaw {}, thaw_timeout)
    };
    let thaw_ms = crate::time::millis(started.elapsed());
    let at_unix_us = crate::time::now_unix_us();
    let count = match sent {
        Ok(n) => n,
        Err(e) if e.is_timeout() => return Err(ThawError::Queued(e)),
        Err(e) => return Err(ThawError::Thaw(e)),
    };
    verify_thawed(client, timeout)?;
    Ok(Thawed {
        count,
        thaw_ms,
        at_unix_us,
    })
}

/// `guest-fsfreeze-status` must say `thawed`.
pub fn verify_thawed(client: &mut Client, timeout: Duration) -> Result<(), ThawError> {
    match client.execute_within(commands::guest_fsfreeze_status {}, timeout) {
        Ok(commands::GuestFsfreezeStatus::thawed) => Ok(()),
        Ok(commands::GuestFsfreezeStatus::frozen) => Err(ThawError::StillFrozen),
        Err(e) => Err(ThawError::Verify(e)),
    }
}
