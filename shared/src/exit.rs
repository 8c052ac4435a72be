//! The one exit-code table of every evesnap tool.
//!
//! | code | name               | meaning                                                        |
//! |------|--------------------|----------------------------------------------------------------|
//! | 0    | `Success`          | every step, upstream and this one, succeeded                   |
//! | 1    | `StepFailed`       | this tool's step failed; nothing is left half done             |
//! | 2    | `Usage`            | bad command line or bad input document (clap uses 2 as well)   |
//! | 3    | `AgentUnreachable` | the guest agent's socket is missing or refused the connection  |
//! | 4    | `AgentTimeout`     | the guest agent did not answer within the deadline             |
//! | 5    | `UpstreamFailed`   | an earlier step of the pipeline failed or died                 |
//! | 6    | `ThawFailed`       | thawing failed or could not be verified: the guest may still be frozen |
//! | 7    | `Preflight`        | a check before any change failed (space, names, state); nothing changed |
//! | 8    | `Busy`             | another operation holds the lock for this VM                    |
//!
//! All codes stay below 126 so that shells never confuse them with signals.

use std::fmt;

/// Exit status of an evesnap tool; see the module documentation for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Exit {
    Success = 0,
    StepFailed = 1,
    Usage = 2,
    AgentUnreachable = 3,
    AgentTimeout = 4,
    UpstreamFailed = 5,
    ThawFailed = 6,
    Preflight = 7,
    Busy = 8,
}

impl Exit {
    /// Every code, in table order (for documentation and tests).
    pub const ALL: [Exit; 9] = [
        Exit::Success,
        Exit::StepFailed,
        Exit::Usage,
        Exit::AgentUnreachable,
        Exit::AgentTimeout,
        Exit::UpstreamFailed,
        Exit::ThawFailed,
        Exit::Preflight,
        Exit::Busy,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    /// The short machine-readable name used as `error.kind` in the job document.
    pub fn kind(self) -> &'static str {
        match self {
            Exit::Success => "success",
            Exit::StepFailed => "step-failed",
            Exit::Usage => "bad-input",
            Exit::AgentUnreachable => "agent-unreachable",
            Exit::AgentTimeout => "agent-timeout",
            Exit::UpstreamFailed => "upstream-failed",
            Exit::ThawFailed => "thaw-failed",
            Exit::Preflight => "preflight-failed",
            Exit::Busy => "busy",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Exit::Success => "every step succeeded",
            Exit::StepFailed => "this tool's step failed",
            Exit::Usage => "bad command line or bad input document",
            Exit::AgentUnreachable => "the guest agent is unreachable",
            Exit::AgentTimeout => "the guest agent did not answer in time",
            Exit::UpstreamFailed => "an upstream step failed or died",
            Exit::ThawFailed => "thaw failed: the guest may still be frozen",
            Exit::Preflight => "a preflight check failed; nothing was changed",
            Exit::Busy => "another operation on this VM is in progress",
        }
    }

    /// The table as text, for `--help` epilogues and man pages.
    pub fn table() -> String {
        let mut text = String::from("Exit status:\n");
        for exit in Exit::ALL {
            text.push_str(&format!("  {:<3} {}\n", exit.code(), exit.description()));
        }
        text
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code(), self.kind())
    }
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit.code())
    }
}

/// Implemented by every error type that knows which exit code it means.
pub trait HasExit {
    fn exit(&self) -> Exit;
}

/// An error together with its exit code: the one way a code travels through
/// `anyhow::Error` to the edge ([`exit_of`]). Build it with [`wrap`] (an error that knows
/// its code) or [`coded`] (a condition a tool detects itself). It displays as the wrapped
/// error and hands on that error's causes, so the chain reads as if it were not there;
/// [`find`] reaches the wrapped error itself.
#[derive(Debug)]
pub struct WithExit {
    exit: Exit,
    /// The error itself, or with [`recode`] a whole chain.
    error: anyhow::Error,
}

impl fmt::Display for WithExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for WithExit {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

/// A message that is its own error (for [`coded`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Message(String);

/// Wraps an error that knows its exit code into `anyhow::Error`, keeping the code.
pub fn wrap<E: HasExit + std::error::Error + Send + Sync + 'static>(error: E) -> anyhow::Error {
    anyhow::Error::new(WithExit {
        exit: error.exit(),
        error: anyhow::Error::new(error),
    })
}

/// An error with a message and an exit code, for conditions a tool detects itself.
pub fn coded(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(WithExit {
        exit,
        error: anyhow::Error::new(Message(message.into())),
    })
}

/// `error` with the exit code `exit` instead of its own. Its chain reads the same, and
/// [`find`] still reaches the typed errors in it.
pub fn recode(exit: Exit, error: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(WithExit { exit, error })
}

/// The exit code of an error chain: the outermost code given with [`wrap`] or [`coded`];
/// a clap error is a usage error; anything else is a failed step.
pub fn exit_of(error: &anyhow::Error) -> Exit {
    for cause in error.chain() {
        if let Some(with) = cause.downcast_ref::<WithExit>() {
            return with.exit;
        }
        if let Some(e) = cause.downcast_ref::<clap::Error>() {
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Success
            };
        }
    }
    Exit::StepFailed
}

/// The first error of type `E` in the chain, also where it was wrapped with its code.
pub fn find<E: std::error::Error + 'static>(error: &anyhow::Error) -> Option<&E> {
    error.chain().find_map(|cause| {
        cause.downcast_ref::<E>().or_else(|| {
            cause
                .downcast_ref::<WithExit>()
                .and_then(|w| find::<E>(&w.error))
        })
    })
}

/// [`chain`] of an error that is not (yet) an `anyhow::Error`.
pub fn chain_of(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `cause: cause: cause`, each layer once.
pub fn chain(error: &anyhow::Error) -> String {
    error
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_below_126() {
        let mut seen = std::collections::HashSet::new();
        for exit in Exit::ALL {
            assert!(exit.code() < 126);
            assert!(seen.insert(exit.code()), "duplicate code {exit}");
        }
        assert_eq!(Exit::Usage.code(), 2, "clap's own usage code");
    }

    #[test]
    fn codes_survive_context_and_the_wrapped_error_is_found() {
        let err = coded(Exit::ThawFailed, "thaw refused").context("qga-thaw step");
        assert_eq!(exit_of(&err), Exit::ThawFailed);
        assert_eq!(chain(&err), "qga-thaw step: thaw refused");
        assert_eq!(exit_of(&anyhow::anyhow!("plain")), Exit::StepFailed);
        #[derive(Debug, thiserror::Error)]
        #[error("upstream died")]
        struct Died;
        impl HasExit for Died {
            fn exit(&self) -> Exit {
                Exit::UpstreamFailed
            }
        }
        let err = wrap(Died).context("reading");
        assert_eq!(exit_of(&err), Exit::UpstreamFailed);
        assert!(find::<Died>(&err).is_some());
        assert_eq!(chain(&err), "reading: upstream died");
    }

    #[test]
    fn a_recoded_error_keeps_its_chain_and_its_typed_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("not verified")]
        struct Unverified;
        impl HasExit for Unverified {
            fn exit(&self) -> Exit {
                Exit::StepFailed
            }
        }
        for inner in [wrap(Unverified), wrap(Unverified).context("the freeze")] {
            let text = chain(&inner);
            let err = recode(Exit::ThawFailed, inner).context("vm0");
            assert_eq!(exit_of(&err), Exit::ThawFailed);
            assert!(find::<Unverified>(&err).is_some(), "{text}");
            assert_eq!(chain(&err), format!("vm0: {text}"));
        }
    }
}
