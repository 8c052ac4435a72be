//! What a failed or aborted freeze leaves behind: the cleanup thaw after it and the
//! [`Aftermath`] that says whether the guest may still be frozen.

use std::fmt;
use std::time::Duration;

use evesnap::qga::watchdog::{self, Watchdog};
use evesnap::qga::{Client, ThawError};
use evesnap::steps::FreezeReport;
use serde::{Deserialize, Serialize};

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

/// Undoes a successful freeze (e.g. interrupted before the document was delivered):
/// thaws, verifies, cancels the watchdog.
pub fn abort(client: &mut Client, report: &FreezeReport, timeout: Duration) -> Aftermath {
    let unsynced = !client.is_synced();
    cleanup(client, timeout, report.watchdog.clone(), unsynced)
}

pub(crate) fn boxed_cleanup(
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
