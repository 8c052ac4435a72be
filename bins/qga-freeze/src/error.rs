//! Why a freeze failed, and the exit code each failure gives.

use evesnap::exit::{Exit, HasExit};
use evesnap::qga::watchdog;
use evesnap::qga::Error as QgaError;

use crate::aftermath::Aftermath;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aftermath::CleanupThaw;
    use evesnap::qga::AgentError;
    use std::time::Duration;

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
