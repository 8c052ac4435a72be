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

mod change;
mod classify;
mod error;
pub mod names;
pub mod parse;
mod query;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use classify::classify;
pub use error::{Error, Failure, Problem};
pub use query::{SnapshotInfo, Space};

/// The environment variable naming the `zfs` program.
pub const ENV: &str = "EVESNAP_ZFS";

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

/// The `zfs` program and what it can do.
#[derive(Debug)]
pub struct Zfs {
    program: PathBuf,
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

    pub fn with_path(program: impl Into<PathBuf>) -> Zfs {
        Zfs {
            program: program.into(),
            caps: OnceLock::new(),
        }
    }

    /// Fixes the capabilities instead of probing (tests, or a caller that knows).
    pub fn with_capabilities(self, caps: Capabilities) -> Zfs {
        let _ = self.caps.set(caps);
        self
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Runs `zfs <args>`, collecting stdout and stderr (both read as they come, so neither
    /// pipe can fill up and block the child). A non-zero exit is a [`Failure`].
    pub fn run_raw(&self, args: &[String]) -> Result<Result<Output, Failure>, Error> {
        let start = Instant::now();
        let output = Command::new(&self.program)
            .args(args)
            // Messages are matched by text: keep them untranslated.
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let status = output.status;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if status.success() {
            return Ok(Ok(Output {
                stdout,
                stderr,
                elapsed: start.elapsed(),
            }));
        }
        let mut argv = vec![self.program.display().to_string()];
        argv.extend(args.iter().cloned());
        Ok(Err(Failure {
            argv,
            status: status.code(),
            stderr,
            stdout,
        }))
    }

    /// Runs `zfs <args>`; a failure becomes a typed error about `subject`.
    pub fn run(&self, args: &[String], subject: &str) -> Result<Output, Error> {
        self.run_raw(args)?.map_err(|f| classify(f, subject))
    }

    /// Probes (once) what this `zfs` can do.
    pub fn capabilities(&self) -> Result<Capabilities, Error> {
        if let Some(caps) = self.caps.get() {
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
        Ok(*self.caps.get_or_init(|| caps))
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

/// Records a failed step of a zfs tool in the document (the error and, for a failed
/// preflight, its problems) and fails with it: the document still goes downstream.
pub fn failed_step(
    mut doc: crate::document::Document,
    tool: &str,
    timer: crate::document::StepTimer,
    mut fields: serde_json::Map<String, serde_json::Value>,
    error: anyhow::Error,
) -> crate::cli::Outcome {
    use serde_json::Value;
    fields.insert("error".into(), Value::String(crate::cli::chain(&error)));
    if let Some(Error::Preflight { problems }) = error.downcast_ref::<Error>() {
        fields.insert(
            "problems".into(),
            serde_json::to_value(problems).unwrap_or(Value::Null),
        );
    }
    doc.push(timer.finish(false, fields));
    crate::cli::Outcome::failed(doc, tool, error)
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
