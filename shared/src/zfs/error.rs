//! The zfs layer's errors. A failed `zfs` call keeps its argv, exit status and stderr in a
//! [`Failure`] (the `source()` of the typed error); the known stderr texts of OpenZFS 2.x and
//! zfs-fuse 0.7 become typed variants ([`classify`]).

use std::fmt;
use std::path::PathBuf;

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
        // The first lines say what went wrong; usage texts that follow are noise.
        let lines: Vec<&str> = self
            .stderr
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
            write!(f, " saying: {shown}")?;
            if lines.len() > 3 {
                write!(f, " (+{} lines)", lines.len() - 3)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Failure {}

/// A check before any change found a problem (see [`Error::Preflight`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", rename_all = "kebab-case")]
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
    },
    /// The snapshot does not exist.
    NoSuchSnapshot { snapshot: String },
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
            Problem::NewerSnapshots { dataset, to, newer } => write!(
                f,
                "{dataset} has snapshots newer than {to}: {} (--destroy-newer destroys them)",
                newer.join(", ")
            ),
            Problem::NoSuchSnapshot { snapshot } => write!(f, "snapshot {snapshot} does not exist"),
        }
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

/// The quoted name in `cannot <verb> '<name>': <reason>`, or OpenZFS' unquoted
/// `cannot destroy snapshot <name>: it's being held...`.
fn subject(line: &str) -> Option<String> {
    let rest = line.strip_prefix("cannot ")?;
    let colon = rest.find(": ")?;
    match rest.find('\'') {
        Some(start) if start < colon => {
            let after = &rest[start + 1..];
            after.find("':").map(|end| after[..end].to_string())
        }
        _ => rest[..colon].rsplit(' ').next().map(str::to_string),
    }
}

/// The names listed after a `use '-r' ...:` / `use '-R' ...:` line.
pub fn listed_after(stderr: &str, marker: &str) -> Vec<String> {
    let mut lines = stderr.lines().skip_while(|l| !l.starts_with(marker));
    if lines.next().is_none() {
        return Vec::new();
    }
    lines
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("cannot ") && !l.starts_with("use '"))
        .map(str::to_string)
        .collect()
}

/// Maps a failed run to a typed error by its stderr; `fallback` names the object when the
/// text does not.
pub fn classify(failure: Failure, fallback: &str) -> Error {
    let text = failure.stderr.clone();
    let failure = Box::new(failure);
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cannot "))
        .unwrap_or("");
    let name = subject(first).unwrap_or_else(|| fallback.to_string());
    let has = |needle: &str| first.contains(needle);
    if has("more recent snapshots") {
        let snapshots = listed_after(&text, "use '-r'");
        return Error::NewerSnapshots {
            target: name,
            snapshots,
            source: failure,
        };
    }
    if has("clones of previous snapshots exist") || has("snapshot has dependent clones") {
        let clones = listed_after(&text, "use '-R'");
        return Error::Clones {
            target: name,
            clones,
            source: failure,
        };
    }
    if has("dataset does not exist") || has("no such pool") || has("could not find any snapshots") {
        return Error::DoesNotExist {
            name,
            source: failure,
        };
    }
    if has("dataset already exists") {
        return Error::AlreadyExists {
            name,
            source: failure,
        };
    }
    if has("out of space") {
        return Error::OutOfSpace {
            name,
            source: failure,
        };
    }
    if has("dataset is busy") || has("it's being held") || has("pool or dataset is busy") {
        return Error::Busy {
            name,
            source: failure,
        };
    }
    if has("invalid character")
        || has("in name")
        || has("name is too long")
        || has("invalid name")
        || has("empty component")
        || has("leading slash")
        || has("trailing slash")
    {
        return Error::NameRejected {
            name,
            source: failure,
        };
    }
    Error::Failed(failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(stderr: &str) -> Failure {
        Failure {
            argv: vec!["zfs".into(), "x".into()],
            status: Some(1),
            stderr: stderr.into(),
            stdout: String::new(),
        }
    }

    // Verbatim texts: zfs-fuse 0.7.0 on this machine, OpenZFS 2.3.2 in the lab VM
    // (docs/lab.md#zfs-fuse-messages, docs/lab.md#openzfs-messages).
    #[test]
    fn zfs_fuse_texts() {
        let e = classify(fail("cannot open 'P/x': dataset does not exist\n"), "?");
        assert!(
            matches!(&e, Error::DoesNotExist { name, .. } if name == "P/x"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot create snapshot 'P/fs@a': dataset already exists\n"),
            "?",
        );
        assert!(
            matches!(&e, Error::AlreadyExists { name, .. } if name == "P/fs@a"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot snapshot 'P/fs@with#hash': invalid character '#' in name\n"),
            "?",
        );
        assert!(
            matches!(&e, Error::NameRejected { name, .. } if name == "P/fs@with#hash"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot snapshot 'evz-a/fs1@a@b': multiple '@' delimiters in name\n"),
            "?",
        );
        assert!(matches!(e, Error::NameRejected { .. }));
        let e = classify(fail("cannot create snapshot 'P/fs@s': out of space\n"), "?");
        assert!(matches!(&e, Error::OutOfSpace { name, .. } if name == "P/fs@s"));
        let e = classify(fail("cannot destroy 'P/fs@x': dataset is busy\n"), "?");
        assert!(matches!(&e, Error::Busy { name, .. } if name == "P/fs@x"));
        let e = classify(
            fail(
                "cannot rollback to 'evz-a/fs1@s1': more recent snapshots exist\n\
                 use '-r' to force deletion of the following snapshots:\n\
                 evz-a/fs1@s3\nevz-a/fs1@s2\n",
            ),
            "?",
        );
        match &e {
            Error::NewerSnapshots {
                target, snapshots, ..
            } => {
                assert_eq!(target, "evz-a/fs1@s1");
                assert_eq!(snapshots, &["evz-a/fs1@s3", "evz-a/fs1@s2"]);
            }
            other => panic!("{other:?}"),
        }
        let e = classify(
            fail(
                "cannot rollback to 'evz-a/fs1@s1': clones of previous snapshots exist\n\
                 use '-R' to force deletion of the following clones and dependents:\nevz-a/c1\n",
            ),
            "?",
        );
        assert!(
            matches!(&e, Error::Clones { clones, .. } if clones == &["evz-a/c1"]),
            "{e:?}"
        );
        let e = classify(
            fail(
                "cannot destroy 'evz-a/fs1@s2': snapshot has dependent clones\n\
                 use '-R' to destroy the following datasets:\nevz-a/c1\n",
            ),
            "?",
        );
        assert!(
            matches!(&e, Error::Clones { clones, .. } if clones == &["evz-a/c1"]),
            "{e:?}"
        );
        let usage = "too many arguments\nusage:\n\tsnapshot [-r] [-o property=value] ... \
                     <filesystem@snapname|volume@snapname>\n\nFor the property list, run: zfs set|get\n";
        let e = classify(
            Failure {
                status: Some(2),
                ..fail(usage)
            },
            "P/a@s",
        );
        assert!(matches!(e, Error::Failed(_)));
        assert!(e
            .failure()
            .expect("failure")
            .to_string()
            .contains("too many arguments"));
    }

    #[test]
    fn openzfs_texts() {
        let e = classify(
            fail(
                "cannot rollback to 'tank/sparse@a': more recent snapshots or bookmarks exist\n\
                 use '-r' to force deletion of the following snapshots and bookmarks:\n\
                 tank/sparse@b\ntank/sparse#bm\n",
            ),
            "?",
        );
        assert!(
            matches!(&e, Error::NewerSnapshots { snapshots, .. } if snapshots == &["tank/sparse@b", "tank/sparse#bm"]),
            "{e:?}"
        );
        let e = classify(
            fail("cannot destroy snapshot tank/vol@a: it's being held. Run 'zfs holds -r tank/vol@a' to see holders.\n"),
            "?",
        );
        assert!(
            matches!(&e, Error::Busy { name, .. } if name == "tank/vol@a"),
            "{e:?}"
        );
        let e = classify(fail("cannot create snapshot 'tank/vol@multi': out of space\nno snapshots were created\n"), "?");
        assert!(
            matches!(&e, Error::OutOfSpace { name, .. } if name == "tank/vol@multi"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot open 'tank/nope': dataset does not exist\n"),
            "?",
        );
        assert!(matches!(e, Error::DoesNotExist { .. }));
        let e = classify(
            fail("The ZFS modules cannot be auto-loaded.\nTry running 'modprobe zfs' as root to manually load them.\n"),
            "tank",
        );
        assert!(matches!(e, Error::Failed(_)));
    }

    #[test]
    fn messages_do_not_repeat_the_cause() {
        let e = classify(
            fail("cannot create snapshot 'P/fs@a': dataset already exists\n"),
            "?",
        );
        assert_eq!(e.to_string(), "P/fs@a exists already");
        let source = std::error::Error::source(&e).expect("source").to_string();
        assert!(
            source.starts_with("`zfs x` exited with status 1 saying: cannot create"),
            "{source}"
        );
    }
}
