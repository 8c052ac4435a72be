//! The zfs layer: runs the `zfs` program (argv, never a shell), parses its `-H -p` output
//! and turns its failures into typed [`Error`]s.
//!
//! Two implementations are targeted: OpenZFS 2.1–2.3 (production) and zfs-fuse 0.7 (what
//! the tests run against). They differ in what a call may ask for; [`Zfs::capabilities`]
//! probes the installed program once instead of guessing:
//!
//! | capability                 | OpenZFS 2.x | zfs-fuse 0.7 | probe                                   |
//! |----------------------------|-------------|--------------|-----------------------------------------|
//! | `multi_snapshot` (`a@s b@s`, atomic) | yes | no          | `zfs snapshot` usage ends in `...`      |
//! | `snapshot_props` (`snapshot -o k=v`) | yes | yes         | `zfs snapshot` usage has `-o`           |
//! | `list_parsable` (`zfs list -p`)      | yes | no (exit 2) | `zfs list -H -p -o name -d 0`           |
//!
//! Where `zfs list -p` is missing, the same facts come from `zfs get -H -p`, which both have.
//! Holds are read from `userrefs` (zfs-fuse has no working `zfs holds`), clones from the
//! `origin` of every dataset in the pool (zfs-fuse has no `clones` property).
//!
//! Every call has a deadline and can be cancelled (`process.rs` runs it): a [`Zfs`] gives
//! each call [`DEFAULT_TIMEOUT`] unless [`Zfs::with_timeout`] says otherwise;
//! [`Zfs::within`] is a view whose calls all end by one instant as well (a caller's own
//! deadline, without a parameter on every call); [`Zfs::with_cancel`] attaches a
//! [`Cancel`] token whose cancel stops the calls in flight. A call cut short is killed
//! with everything it started and fails with [`Error::TimedOut`] or [`Error::Cancelled`].

mod change;
mod classify;
mod error;
mod lineage;
pub mod names;
pub mod parse;
mod process;
mod query;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
pub use classify::{classify, listed_after};
pub use error::{preflight_problems, Error, Failure, Problem};
pub use lineage::Lineage;
pub use query::{SnapshotInfo, Space};

/// The environment variable naming the `zfs` program.
pub const ENV: &str = "EVESNAP_ZFS";

/// The environment variable of the tools' `--zfs-timeout` (seconds per call).
pub const TIMEOUT_ENV: &str = "EVESNAP_ZFS_TIMEOUT";

/// How long one `zfs` call may take by default. Far above what a healthy pool needs: the
/// slowest calls (`snapshot`, `rollback`, `destroy`) wait for a transaction group to sync,
/// 0.1–0.3 s in the OpenZFS lab and 15 ms on zfs-fuse here, up to the txg timeout (5 s) and
/// more on a busy pool; listing a thousand snapshots takes 0.2 s. A minute leaves room for
/// slow or loaded edge storage, yet a hung pool or a stuck `zfs` ends the step within a
/// minute instead of never. It is also the freeze watchdog's default `thaw_after`: a
/// snapshot that needs longer can no longer be taken inside the freeze anyway.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the installed `zfs` can do; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// `zfs snapshot a@s b@s ...` (atomic, one transaction group).
    pub multi_snapshot: bool,
    /// `zfs snapshot -o property=value`.
    pub snapshot_props: bool,
    /// `zfs list -p`.
    pub list_parsable: bool,
}

impl Capabilities {
    /// OpenZFS 2.x.
    pub const OPENZFS: Capabilities = Capabilities {
        multi_snapshot: true,
        snapshot_props: true,
        list_parsable: true,
    };
    /// zfs-fuse 0.7.
    pub const ZFS_FUSE: Capabilities = Capabilities {
        multi_snapshot: false,
        snapshot_props: true,
        list_parsable: false,
    };
}

/// The `zfs` program and what it can do, with the deadline and cancel token its calls get.
/// Cloning is cheap, and clones and views ([`within`](Zfs::within)) share the program and
/// its probed capabilities.
#[derive(Debug, Clone)]
pub struct Zfs {
    program: Arc<Program>,
    /// Each call's own time.
    timeout: Duration,
    /// Every call ends by then too (a view's deadline).
    deadline: Option<Instant>,
    cancel: Option<Cancel>,
}

#[derive(Debug)]
struct Program {
    path: PathBuf,
    caps: OnceLock<Capabilities>,
}

/// Output of one successful run.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Zfs {
    /// The program given (`--zfs`), else `$EVESNAP_ZFS`, else `zfs` on `PATH`.
    pub fn locate(explicit: Option<&Path>) -> Result<Zfs, Error> {
        if let Some(path) = explicit {
            return Ok(Zfs::with_path(path));
        }
        if let Some(path) = std::env::var_os(ENV).filter(|v| !v.is_empty()) {
            return Ok(Zfs::with_path(path));
        }
        // Debian keeps zfs in /usr/sbin, which a user's PATH may lack.
        let path = which::which("zfs")
            .or_else(|e| {
                ["/usr/sbin/zfs", "/sbin/zfs", "/usr/local/sbin/zfs"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
                    .ok_or(e)
            })
            .map_err(Error::NotInstalled)?;
        Ok(Zfs::with_path(path))
    }

    /// This program, with [`DEFAULT_TIMEOUT`] per call and no cancel token.
    pub fn with_path(program: impl Into<PathBuf>) -> Zfs {
        Zfs {
            program: Arc::new(Program {
                path: program.into(),
                caps: OnceLock::new(),
            }),
            timeout: DEFAULT_TIMEOUT,
            deadline: None,
            cancel: None,
        }
    }

    /// Fixes the capabilities instead of probing (tests, or a caller that knows).
    pub fn with_capabilities(self, caps: Capabilities) -> Zfs {
        let _ = self.program.caps.set(caps);
        self
    }

    /// Gives each call `timeout` instead of [`DEFAULT_TIMEOUT`].
    pub fn with_timeout(self, timeout: Duration) -> Zfs {
        Zfs { timeout, ..self }
    }

    /// Calls watch `cancel`: cancelling it kills the calls in flight and refuses later
    /// ones ([`Error::Cancelled`]).
    pub fn with_cancel(self, cancel: Cancel) -> Zfs {
        Zfs {
            cancel: Some(cancel),
            ..self
        }
    }

    /// A view whose calls also end by `deadline` (by the earlier of it and a deadline this
    /// one has), e.g. `zfs.within(start + limit).snapshot(…)`; each call still gets no more
    /// than the per-call timeout.
    pub fn within(&self, deadline: Instant) -> Zfs {
        Zfs {
            deadline: Some(self.deadline.map_or(deadline, |d| d.min(deadline))),
            ..self.clone()
        }
    }

    /// A view for undoing what a call cut short did: the per-call timeout only, without
    /// this one's deadline or cancel token, which ended that call and would end the calls
    /// that tidy up after it as well.
    pub fn for_cleanup(&self) -> Zfs {
        Zfs {
            deadline: None,
            cancel: None,
            ..self.clone()
        }
    }

    pub fn program(&self) -> &Path {
        &self.program.path
    }

    /// Runs `zfs <args>` within this call's deadline (see the module documentation),
    /// collecting stdout and stderr. A non-zero exit is a [`Failure`]; a call cut short is
    /// [`Error::TimedOut`] or [`Error::Cancelled`].
    pub fn run_raw(&self, args: &[String]) -> Result<Result<Output, Failure>, Error> {
        let start = Instant::now();
        let deadline = self
            .deadline
            .map_or(start + self.timeout, |d| d.min(start + self.timeout));
        let command_line = || {
            std::iter::once(self.program().display().to_string())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>()
        };
        if self.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
            return Err(Error::Cancelled {
                command_line: command_line().join(" "),
                after: None,
            });
        }
        if deadline <= start {
            return Err(Error::TimedOut {
                command_line: command_line().join(" "),
                after: Duration::ZERO,
                stderr: String::new(),
            });
        }
        let ended = process::run(self.program(), args, deadline, self.cancel.as_ref()).map_err(
            |source| Error::Spawn {
                program: self.program().to_path_buf(),
                source,
            },
        )?;
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        match ended {
            process::Ended::Exited {
                status,
                stdout,
                stderr,
            } if status.success() => Ok(Ok(Output {
                stdout: text(stdout),
                stderr: text(stderr),
                elapsed: start.elapsed(),
            })),
            process::Ended::Exited {
                status,
                stdout,
                stderr,
            } => Ok(Err(Failure {
                argv: command_line(),
                status: status.code(),
                stderr: text(stderr),
                stdout: text(stdout),
            })),
            process::Ended::TimedOut { stderr } => Err(Error::TimedOut {
                command_line: command_line().join(" "),
                after: deadline.saturating_duration_since(start),
                stderr: text(stderr),
            }),
            process::Ended::Cancelled => Err(Error::Cancelled {
                command_line: command_line().join(" "),
                after: Some(start.elapsed()),
            }),
        }
    }

    /// Runs `zfs <args>`; a failure becomes a typed error about `subject`.
    pub fn run(&self, args: &[String], subject: &str) -> Result<Output, Error> {
        self.run_raw(args)?.map_err(|f| classify(f, subject))
    }

    /// Probes (once) what this `zfs` can do.
    pub fn capabilities(&self) -> Result<Capabilities, Error> {
        if let Some(caps) = self.program.caps.get() {
            return Ok(*caps);
        }
        // `zfs snapshot` without an argument prints its usage and exits 2.
        let usage = match self.run_raw(&args(&["snapshot"]))? {
            Ok(out) => out.stderr,
            Err(f) if f.status == Some(2) => f.stderr,
            Err(f) => return Err(Error::Failed(Box::new(f))),
        };
        if !usage.contains("snapshot") {
            return Err(Error::BadOutput {
                command: "zfs snapshot".into(),
                detail: format!("no usage text: {:?}", usage.trim()),
            });
        }
        let list_parsable =
            match self.run_raw(&args(&["list", "-H", "-p", "-o", "name", "-d", "0"]))? {
                Ok(_) => true,
                Err(f) if f.status == Some(2) => false,
                Err(f) => return Err(Error::Failed(Box::new(f))),
            };
        let caps = Capabilities {
            multi_snapshot: parse::usage_snapshot_multi(&usage),
            snapshot_props: parse::usage_snapshot_props(&usage),
            list_parsable,
        };
        Ok(*self.program.caps.get_or_init(|| caps))
    }
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The pool of a dataset or snapshot name.
pub fn pool_of(name: &str) -> &str {
    let end = name.find(['/', '@', '#']).unwrap_or(name.len());
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools() {
        assert_eq!(pool_of("tank/a/b@c"), "tank");
        assert_eq!(pool_of("tank@c"), "tank");
        assert_eq!(pool_of("tank"), "tank");
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let zfs = Zfs::with_path("/nonexistent/zfs");
        assert!(matches!(zfs.capabilities(), Err(Error::Spawn { .. })));
    }
}
