//! A client for the QEMU guest agent (qemu-ga), as the real agent needs it.
//!
//! # Transports
//! - `unix:<path>` or a plain path: the host end of the virtio-serial chardev QEMU serves.
//! - `vsock:<cid>:<port>`: an agent listening on AF_VSOCK (EVE's guests), through the host
//!   kernel's vhost-vsock.
//! - `hvsock:<path>:<port>`: the same agent behind a hybrid vsock device (a userspace
//!   backend: the host connects to its Unix socket `<path>`, sends `CONNECT <port>\n` and
//!   reads `OK <n>\n`; then the stream is the guest's). A device that closes instead of `OK`
//!   is refused ([`Error::Unreachable`], retried until the deadline like a refused socket),
//!   one that never answers times out ([`Error::Timeout`]).
//!
//! # Framing
//! The chardev serves one client at a time, and what a previous client left behind
//! survives it: replies to requests whose client went away, half a JSON object, syncs
//! sent while the guest was booting. So every connection starts with the byte `0xFF`
//! (resets the agent's parser), then `guest-sync-delimited` with a random id; everything
//! up to the `0xFF` that precedes a reply is dropped, and replies carrying another id are
//! skipped. Commands carry an `id` too (qemu-ga echoes it; verified against 7.2), and
//! replies with another id or none are skipped, so a late reply to a request that timed
//! out is never taken for the answer to a later one. While the agent does not answer yet,
//! the sync is repeated until the caller's deadline; only the newest sync's reply counts.
//!
//! After a timeout or garbage the connection is re-synchronised before the next command.
//! [`Client::execute_unsynced`] is the exception: a rescue thaw queued behind a freeze to
//! an agent that stopped answering (a paused VM), which runs when it reads again.
//!
//! Commands are the typed ones of the `qapi` crate ([`qapi::qga`]), replies are
//! decoded as [`qapi_spec::Response`].
//!
//! # Errors
//! [`Error`] distinguishes an agent that cannot be reached ([`Exit::AgentUnreachable`]),
//! one that does not answer in time ([`Exit::AgentTimeout`]), garbage on the wire, and
//! the agent's own refusals: an error reply, a command disabled (most are while the guest
//! is frozen), a command the agent does not have.

mod address;
mod client;
#[cfg(test)]
mod client_tests;
pub mod pending;
mod stream;
#[doc(hidden)]
pub mod testing;
#[doc(hidden)]
pub mod testing_hybrid;
mod testing_socket;
mod thaw;
pub mod watchdog;

use std::time::Duration;

pub use address::{Address, ParseAddressError};
pub use client::{Client, CommandRun, ExecResult, DEFAULT_MAX_REPLY, DEFAULT_TIMEOUT};
/// The agent's typed commands and reply types.
pub use qapi::qga as commands;
pub use thaw::{thaw_and_verify, thaw_within, verify_thawed, ThawError, Thawed};

use crate::exit::{Exit, HasExit};

/// A command this run needs that the agent's `guest-info` does not offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    #[error("the guest agent lacks {0}")]
    Missing(&'static str),
    #[error("the guest agent has {0} disabled")]
    Disabled(&'static str),
}

impl HasExit for Unavailable {
    fn exit(&self) -> Exit {
        Exit::Preflight
    }
}

/// Checks that every command in `needed` is present and enabled in `info`.
pub fn check_commands(
    info: &commands::GuestAgentInfo,
    needed: &[&'static str],
) -> Result<(), Unavailable> {
    for &name in needed {
        match info.supported_commands.iter().find(|c| c.name == name) {
            None => return Err(Unavailable::Missing(name)),
            Some(c) if !c.enabled => return Err(Unavailable::Disabled(name)),
            Some(_) => {}
        }
    }
    Ok(())
}

/// What the agent said when it refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc} ({class})")]
pub struct AgentError {
    pub class: String,
    pub desc: String,
}

/// An error talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the guest agent at {address}")]
    Unreachable {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent at {address} did not answer {command} within {}", client::fmt_seconds(*after))]
    Timeout {
        address: String,
        command: String,
        after: Duration,
    },
    /// The agent started the program and answered for it, but it had not exited by its
    /// timeout: it ran, and is left running (the agent has no kill).
    #[error("{command} (pid {pid}) in the guest had not exited after {}: left running", client::fmt_seconds(*after))]
    StillRunning {
        command: String,
        pid: i64,
        after: Duration,
    },
    #[error("the connection to the guest agent broke during {command}")]
    Disconnected {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent answered {command} with garbage ({detail})")]
    Protocol {
        command: String,
        detail: String,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("the guest agent's reply to {command} is longer than {limit} bytes")]
    ReplyTooLong { command: String, limit: usize },
    #[error("the guest agent refused {command}")]
    Agent {
        command: String,
        #[source]
        source: AgentError,
    },
    #[error("the guest agent has {command} disabled")]
    Disabled {
        command: String,
        #[source]
        source: AgentError,
    },
    #[error("the guest agent does not support {command}")]
    Unsupported {
        command: String,
        #[source]
        source: AgentError,
    },
}

impl Error {
    /// Classifies an error reply.
    fn from_agent(command: &str, agent: AgentError) -> Error {
        let command = command.to_string();
        let desc = agent.desc.to_ascii_lowercase();
        // qemu-ga 7.2 answers "Command guest-exec has been disabled: the agent is in frozen
        // state" with class CommandNotFound: the text decides first.
        if desc.contains("disabled") {
            Error::Disabled {
                command,
                source: agent,
            }
        } else if agent.class == "CommandNotFound"
            || desc.contains("not currently supported")
            || desc.contains("not found")
        {
            Error::Unsupported {
                command,
                source: agent,
            }
        } else {
            Error::Agent {
                command,
                source: agent,
            }
        }
    }

    /// True when the request may have reached the agent but its reply did not come back:
    /// the command may still run (or have run).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Unreachable { .. } | Error::Disconnected { .. } => Exit::AgentUnreachable,
            Error::Timeout { .. } | Error::StillRunning { .. } => Exit::AgentTimeout,
            _ => Exit::StepFailed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_replies_are_classified() {
        let e = |class: &str, desc: &str| {
            Error::from_agent(
                "x",
                AgentError {
                    class: class.into(),
                    desc: desc.into(),
                },
            )
        };
        assert!(matches!(
            e("GenericError", "Command guest-exec has been disabled"),
            Error::Disabled { .. }
        ));
        // Verbatim from qemu-ga 7.2 while frozen.
        assert!(matches!(
            e(
                "CommandNotFound",
                "Command guest-exec has been disabled: the agent is in frozen state"
            ),
            Error::Disabled { .. }
        ));
        assert!(matches!(
            e(
                "CommandNotFound",
                "The command guest-foo has not been found"
            ),
            Error::Unsupported { .. }
        ));
        assert!(matches!(
            e(
                "GenericError",
                "this feature or command is not currently supported"
            ),
            Error::Unsupported { .. }
        ));
        assert!(matches!(
            e("GenericError", "failed to freeze /: Device busy"),
            Error::Agent { .. }
        ));
    }

    #[test]
    fn with_exit_keeps_code_and_chain() {
        let inner = Error::Timeout {
            address: "unix:/a".into(),
            command: "guest-ping".into(),
            after: Duration::from_millis(1500),
        };
        let err = crate::exit::wrap(inner).context("outer");
        assert_eq!(crate::exit::exit_of(&err), Exit::AgentTimeout);
        assert_eq!(
            crate::exit::chain(&err),
            "outer: the guest agent at unix:/a did not answer guest-ping within 1.5s"
        );
    }
}
