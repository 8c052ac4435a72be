//! The zfs layer's errors. A failed `zfs` call keeps its argv, exit status and stderr in a
//! [`Failure`] (the `source()` of the typed error); the known stderr texts of OpenZFS 2.x and
//! zfs-fuse 0.7 become typed variants ([`classify`](super::classify)).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::exit::{Exit, HasExit};

/// One `zfs` run that exited non-zero (or was killed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The whole command line, program first.
    pub argv: Vec<String>,
    /// The exit code, `None` when a signal ended it.
    pub status: Option<i32>,
    pub stderr: String,
    /// What it printed on stdout before failing (a `zfs get` over several names prints the
    /// ones that exist).
    pub stdout: String,
}

impl Failure {
    /// The command line as one string (for messages only; it is never run by a shell).
    pub fn command_line(&self) -> String {
        self.argv.join(" ")
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(code) => write!(f, "`{}` exited with status {code}", self.command_line())?,
            None => write!(f, "`{}` was killed by a signal", self.command_line())?,
        }
        write!(f, "{}", Said(&self.stderr, " saying: "))
    }
}

/// `<lead><the first lines of stderr>`, or nothing when it is empty.
struct Said<'a>(&'a str, &'a str);

impl fmt::Display for Said<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first lines say what went wrong; usage texts that follow are noise.
        let lines: Vec<&str> = self
            .0
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if !lines.is_empty() {
            let shown = lines
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join(" / ");
            write!(f, "{}{shown}", self.1)?;
            if lines.len() > 3 {
                write!(f, " (+{} lines)", lines.len() - 3)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// How a call that was cut short (by its deadline or a cancel) reads in a message.
struct CutShort<'a> {
    command_line: &'a str,
    /// From the call's start to its end; `None` when it was never started.
    after: Option<Duration>,
    why: &'a str,
}

impl fmt::Display for CutShort<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.after {
            Some(after) => write!(
                f,
                "`{}` {} {:.1} s and was killed",
                self.command_line,
                self.why,
                after.as_secs_f64()
            ),
            None => write!(f, "`{}` was not run: {}", self.command_line, self.why),
        }
    }
}

/// A check before any change found a problem (see [`Error::Preflight`]).
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(tag = "problem", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Problem {
    /// The dataset does not exist.
    Missing { dataset: String },
    /// The snapshot name is taken already.
    NameTaken { snapshot: String },
    /// Too little space: `missing` more bytes are needed.
    NoRoom {
        dataset: String,
        needed: u64,
        available: u64,
        missing: u64,
    },
    /// A snapshot is held (`userrefs` > 0) and may not be destroyed.
    Held { snapshot: String, userrefs: u64 },
    /// Clones depend on a snapshot that would be destroyed.
    HasClones {
        snapshot: String,
        clones: Vec<String>,
    },
    /// Snapshots newer than the rollback target exist (and may not be destroyed).
    NewerSnapshots {
        dataset: String,
        to: String,
        newer: Vec<String>,
        /// Those of `newer` the guest asked for (`org.lfedge.evesnap:origin=guest`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        guest: Vec<String>,
    },
    /// The snapshot does not exist.
    NoSuchSnapshot { snapshot: String },
    /// A rollback that keeps the newer snapshots needs `needed` bytes it does not have (the
    /// rolled-back volume's own `refreservation`, while the kept one keeps its own).
    NoRoomToKeep {
        dataset: String,
        needed: u64,
        available: u64,
        missing: u64,
    },
    /// The snapshot name is found in more than one place a rollback could take it from.
    Ambiguous {
        snapshot: String,
        found: Vec<String>,
    },
    /// A name a rollback that keeps the newer snapshots would create is taken.
    DatasetExists { dataset: String },
    /// A rollback that keeps the newer snapshots was killed half way and left its clones.
    Interrupted {
        dataset: String,
        clones: Vec<String>,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Missing { dataset } => write!(f, "dataset {dataset} does not exist"),
            Problem::NameTaken { snapshot } => write!(f, "snapshot {snapshot} exists already"),
            Problem::NoRoom { dataset, needed, available, missing } => write!(
                f,
                "{dataset}: {missing} bytes missing (the snapshot needs {needed} bytes, {available} are available)"
            ),
            Problem::Held { snapshot, userrefs } => write!(f, "snapshot {snapshot} is held ({userrefs} holds)"),
            Problem::HasClones { snapshot, clones } => {
                write!(f, "snapshot {snapshot} has clones: {}", clones.join(", "))
            }
            Problem::NewerSnapshots { dataset, to, newer, guest } => {
                write!(f, "{dataset} has snapshots newer than {to}: {}", newer.join(", "))?;
                if !guest.is_empty() {
                    write!(
                        f,
                        "; {} of them the guest's own (taken at its request): {}",
                        guest.len(),
                        guest.join(", ")
                    )?;
                }
                write!(f, " (--destroy-newer destroys them)")
            }
            Problem::NoSuchSnapshot { snapshot } => write!(f, "snapshot {snapshot} does not exist"),
            Problem::NoRoomToKeep { dataset, needed, available, missing } => write!(
                f,
                "{dataset}: {missing} bytes missing to keep its newer snapshots (the rolled-back \
                 volume needs its refreservation again, {needed} bytes; {available} are available)"
            ),
            Problem::Ambiguous { snapshot, found } => {
                write!(f, "snapshot @{snapshot} exists in several places: {}", found.join(", "))
            }
            Problem::DatasetExists { dataset } => write!(f, "{dataset} exists already"),
            Problem::Interrupted { dataset, clones } => write!(
                f,
                "a rollback of {dataset} that keeps the newer snapshots was cut short (killed) and \
                 left {}: put it back by hand first: if {dataset} is missing, rename the \
                 {dataset}.evesnap-kept-* of the same stamp back to it; `zfs promote` each \
                 dataset whose origin is a snapshot of the clone, the oldest origin first; \
                 then `zfs destroy` the clone",
                clones.join(", ")
            ),
        }
    }
}

impl Problem {
    /// The same problem with every name (dataset, snapshot, clone) passed through `rename`:
    /// how a listener shows it to a guest that must not see host names.
    pub fn renamed(&self, rename: impl Fn(&str) -> String) -> Problem {
        let all = |names: &[String]| names.iter().map(|n| rename(n)).collect::<Vec<_>>();
        match self {
            Problem::Missing { dataset } => Problem::Missing {
                dataset: rename(dataset),
            },
            Problem::NameTaken { snapshot } => Problem::NameTaken {
                snapshot: rename(snapshot),
            },
            Problem::NoRoom {
                dataset,
                needed,
                available,
                missing,
            } => Problem::NoRoom {
                dataset: rename(dataset),
                needed: *needed,
                available: *available,
                missing: *missing,
            },
            Problem::Held { snapshot, userrefs } => Problem::Held {
                snapshot: rename(snapshot),
                userrefs: *userrefs,
            },
            Problem::HasClones { snapshot, clones } => Problem::HasClones {
                snapshot: rename(snapshot),
                clones: all(clones),
            },
            Problem::NewerSnapshots {
                dataset,
                to,
                newer,
                guest,
            } => Problem::NewerSnapshots {
                dataset: rename(dataset),
                to: rename(to),
                newer: all(newer),
                guest: all(guest),
            },
            Problem::NoSuchSnapshot { snapshot } => Problem::NoSuchSnapshot {
                snapshot: rename(snapshot),
            },
            Problem::NoRoomToKeep {
                dataset,
                needed,
                available,
                missing,
            } => Problem::NoRoomToKeep {
                dataset: rename(dataset),
                needed: *needed,
                available: *available,
                missing: *missing,
            },
            Problem::Ambiguous { snapshot, found } => Problem::Ambiguous {
                snapshot: rename(snapshot),
                found: all(found),
            },
            Problem::DatasetExists { dataset } => Problem::DatasetExists {
                dataset: rename(dataset),
            },
            Problem::Interrupted { dataset, clones } => Problem::Interrupted {
                dataset: rename(dataset),
                clones: all(clones),
            },
        }
    }
}

/// The findings of a failed preflight somewhere in `error`'s chain; empty for any other
/// failure.
pub fn preflight_problems(error: &anyhow::Error) -> &[Problem] {
    match crate::exit::find::<Error>(error) {
        Some(Error::Preflight { problems }) => problems,
        _ => &[],
    }
}

/// Joins problems for one message.
struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no zfs program found on PATH (give one with --zfs or EVESNAP_ZFS)")]
    NotInstalled(#[source] which::Error),
    #[error("cannot run {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid property {property:?}: {reason}")]
    InvalidProperty { property: String, reason: String },
    #[error("{name} does not exist")]
    DoesNotExist {
        name: String,
        #[source]
        source: Box<Failure>,
    },
    #[error("{name} exists already")]
    AlreadyExists {
        name: String,
        #[source]
        source: Box<Failure>,
    },
    #[error("out of space for {name}")]
    OutOfSpace {
        name: String,
        #[source]
        source: Box<Failure>,
    },
    #[error("{name} is busy or held")]
    Busy {
        name: String,
        #[source]
        source: Box<Failure>,
    },
    #[error("more recent snapshots than {target} exist: {}", snapshots.join(", "))]
    NewerSnapshots {
        target: String,
        snapshots: Vec<String>,
        #[source]
        source: Box<Failure>,
    },
    #[error("clones depend on {target}: {}", clones.join(", "))]
    Clones {
        target: String,
        clones: Vec<String>,
        #[source]
        source: Box<Failure>,
    },
    #[error("zfs refused the name {name}")]
    NameRejected {
        name: String,
        #[source]
        source: Box<Failure>,
    },
    #[error("zfs failed")]
    Failed(#[source] Box<Failure>),
    /// The call's deadline passed: it was killed, with its process group. What it was doing
    /// in the kernel may still have taken effect. `after` is the time it had; zero when the
    /// deadline had passed before it could start (then it was not run).
    #[error("{}{}", CutShort {
        command_line,
        after: (!after.is_zero()).then_some(*after),
        why: if after.is_zero() { "its deadline had passed" } else { "did not finish within" },
    }, Said(stderr, "; it had said: "))]
    TimedOut {
        command_line: String,
        after: Duration,
        /// What it had said on stderr by then.
        stderr: String,
    },
    /// The call's cancel token was cancelled: it was killed, with its process group (`after`
    /// its start), or not started (`None`).
    #[error("{}", CutShort {
        command_line,
        after: *after,
        why: if after.is_some() { "was cancelled after" } else { "it was cancelled" },
    })]
    Cancelled {
        command_line: String,
        after: Option<Duration>,
    },
    #[error("this zfs cannot {0}")]
    Unsupported(String),
    #[error("unexpected output from `{command}`: {detail}")]
    BadOutput { command: String, detail: String },
    #[error("preflight failed, nothing was changed: {}", Problems(problems))]
    Preflight { problems: Vec<Problem> },
    /// A non-atomic operation failed part way; `undone` lists what was created and destroyed
    /// again, `left` what could not be undone.
    #[error("{what} failed part way (undone: [{}]; left behind: [{}])", undone.join(", "), left.join(", "))]
    Partial {
        what: String,
        undone: Vec<String>,
        left: Vec<String>,
        #[source]
        source: Box<Error>,
    },
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::InvalidName { .. } | Error::InvalidProperty { .. } => Exit::Usage,
            Error::Preflight { .. } => Exit::Preflight,
            // 1, not 4 (`AgentTimeout` is about the guest agent, which a hung zfs says
            // nothing about) nor 7 (a killed call may have changed something): the step
            // failed; the caller decides what a cancel means for its run.
            Error::TimedOut { .. } | Error::Cancelled { .. } => Exit::StepFailed,
            _ => Exit::StepFailed,
        }
    }
}

impl Error {
    /// The failed `zfs` run behind this error, if there was one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Error::DoesNotExist { source, .. }
            | Error::AlreadyExists { source, .. }
            | Error::OutOfSpace { source, .. }
            | Error::Busy { source, .. }
            | Error::NewerSnapshots { source, .. }
            | Error::Clones { source, .. }
            | Error::NameRejected { source, .. }
            | Error::Failed(source) => Some(source),
            Error::Partial { source, .. } => source.failure(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_keep_their_wire_form_and_parse_back_strictly() {
        let text = r#"{"problem":"no-room","dataset":"p/a","needed":5,"available":2,"missing":3}"#;
        let problem: Problem = serde_json::from_str(text).expect("parses");
        assert!(matches!(problem, Problem::NoRoom { missing: 3, .. }));
        assert_eq!(serde_json::to_string(&problem).expect("json"), text);
        let extra = r#"{"problem":"missing","dataset":"p/a","why":"x"}"#;
        assert!(serde_json::from_str::<Problem>(extra).is_err(), "{extra}");
    }

    #[test]
    fn preflight_problems_are_found_through_context_and_exit_codes() {
        let taken = Problem::NameTaken {
            snapshot: "p/a@s".into(),
        };
        let error = crate::exit::wrap(Error::Preflight {
            problems: vec![taken.clone()],
        })
        .context("cannot take the snapshot");
        assert_eq!(preflight_problems(&error), [taken]);
        let other = crate::exit::wrap(Error::Unsupported("x".into()));
        assert!(preflight_problems(&other).is_empty());
    }

    #[test]
    fn renamed_passes_every_name_and_no_number() {
        let p = Problem::HasClones {
            snapshot: "p/a@s".into(),
            clones: vec!["p/c".into()],
        };
        let renamed = p.renamed(|n| n.replace("p/", "q/"));
        assert_eq!(
            renamed,
            Problem::HasClones {
                snapshot: "q/a@s".into(),
                clones: vec!["q/c".into()],
            }
        );
    }
}
