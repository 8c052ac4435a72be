//! Pending `guest_post` commands: what a run could not run in the guest because the agent
//! was lost or silent (the run ended with exit 3, 4 or 6 after `guest_pre` ran), kept so
//! that the application it quiesced is resumed once the agent answers again.
//!
//! One record per agent, in the runtime folder ([`crate::runtime::ensure_dir`]), keyed by
//! the normalised agent address like the watchdog's state
//! (`pending-post-<hash>.json`), written atomically (a temporary file renamed over it):
//!
//! ```json
//! {"agent": "unix:/run/vm0/qga.sock", "id": "5f0c…", "recorded_at": "2026-11-29T07:01:02Z",
//!  "commands": [{"path": "/usr/bin/systemctl", "args": ["start", "db"], "timeout_s": 30.0}]}
//! ```
//!
//! Whoever talks to the agent next runs them ([`run`]): the watchdog once it got through,
//! `snap-orchestrate serve` before each request, `snap-orchestrate recover --agent A`, and
//! Each command runs once: the record is claimed (renamed away, so two runners never both
//! get it) before anything runs, and a command is dropped from it once the agent reported
//! on it, whatever its result; only a command the agent was lost in, and those after it,
//! are put back.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Address, Client, CommandRun};

/// One command to run in the guest (argv only, as the plan's `guest_post`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingCommand {
    pub path: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub timeout_s: f64,
}

/// The record of one agent's pending commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingPost {
    /// The normalised agent address.
    pub agent: String,
    /// The id of the run (plan) that left them, the last one when several did.
    pub id: String,
    /// RFC 3339, UTC: when they were recorded.
    pub recorded_at: String,
    /// In the order they are to run.
    pub commands: Vec<PendingCommand>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    RuntimeDir(#[from] crate::runtime::DirError),
    #[error("cannot write the pending guest_post record {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the pending guest_post record {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the pending guest_post record {} is not valid: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    #[error(
        "the guest is frozen: the pending guest_post commands wait for its thaw (the watchdog's)"
    )]
    Frozen,
    #[error("cannot ask the guest agent whether the guest is frozen")]
    Agent(#[source] crate::qga::Error),
}

impl crate::exit::HasExit for Error {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            Error::Frozen => crate::exit::Exit::Preflight,
            Error::Agent(e) => e.exit(),
            _ => crate::exit::Exit::StepFailed,
        }
    }
}

/// The record's file for `address`.
pub fn path(address: &Address) -> PathBuf {
    path_in(&crate::runtime::dir(), address)
}

fn path_in(dir: &Path, address: &Address) -> PathBuf {
    dir.join(format!(
        "pending-post-{:016x}.json",
        crate::runtime::fnv1a(&address.to_string())
    ))
}

fn write(path: &Path, record: &PendingPost) -> Result<(), Error> {
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let text = serde_json::to_string_pretty(record).unwrap_or_default();
    fs::write(&tmp, text + "\n")
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = fs::remove_file(&tmp);
            Error::Write {
                path: path.to_path_buf(),
                source,
            }
        })
}

fn read(path: &Path) -> Result<Option<PendingPost>, Error> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Invalid {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Records `commands` as pending for `address`, after those already pending (a record
/// left by an earlier run keeps its commands, which run first). Returns the file.
pub fn record(address: &Address, id: &str, commands: &[PendingCommand]) -> Result<PathBuf, Error> {
    record_in(&crate::runtime::ensure_dir()?, address, id, commands)
}

fn record_in(
    dir: &Path,
    address: &Address,
    id: &str,
    commands: &[PendingCommand],
) -> Result<PathBuf, Error> {
    let path = path_in(dir, address);
    let mut all = read(&path)
        .ok()
        .flatten()
        .map(|r| r.commands)
        .unwrap_or_default();
    all.extend_from_slice(commands);
    let record = PendingPost {
        agent: address.to_string(),
        id: id.to_string(),
        recorded_at: crate::time::now_rfc3339(),
        commands: all,
    };
    write(&path, &record)?;
    Ok(path)
}

/// The record for `address`, if any.
pub fn load(address: &Address) -> Result<Option<PendingPost>, Error> {
    read(&path(address))
}

/// Whether anything is pending for `address` (a cheap look before connecting).
pub fn any(address: &Address) -> bool {
    path(address).exists()
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ran {
    /// The record's run id.
    pub id: String,
    /// The commands that ran, in order, with their results.
    pub commands: Vec<CommandRun>,
    /// How many were put back because the agent was lost before they ran.
    pub put_back: usize,
}

/// Runs the commands pending for `address` through `client`, if any. The record is
/// claimed first (renamed away), so two runners never run the same command; a command
/// counts as run once the agent reported on it, whatever its result. When the agent is
/// lost on the way ([`exec_checked`]), that command and those after it are recorded again
/// (a command the agent was lost in may have started: `guest_post` commands should be
/// safe to repeat, as resuming an application is).
///
/// Nothing runs while the guest is frozen ([`Error::Frozen`]): `guest-exec` is refused
/// then, and the commands would be spent for nothing.
pub fn run(client: &mut Client, address: &Address) -> Result<Option<Ran>, Error> {
    let path = path(address);
    if !path.exists() {
        return Ok(None);
    }
    match client.fsfreeze_status() {
        Ok(crate::qga::commands::GuestFsfreezeStatus::thawed) => {}
        Ok(crate::qga::commands::GuestFsfreezeStatus::frozen) => return Err(Error::Frozen),
        Err(e) => return Err(Error::Agent(e)),
    }
    let claimed = path.with_extension(format!("json.{}.running", std::process::id()));
    match fs::rename(&path, &claimed) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(Error::Read { path, source }),
    }
    let record = read(&claimed);
    let _ = fs::remove_file(&claimed);
    let Some(record) = record? else {
        return Ok(None);
    };
    let mut runs = Vec::new();
    let mut left: Vec<PendingCommand> = Vec::new();
    for (i, command) in record.commands.iter().enumerate() {
        let (run, lost) = run_one(client, command);
        crate::note!("pending guest_post: {}", run.describe());
        runs.push(run);
        if lost {
            // It may not have run: it stays pending, with those after it.
            left = record.commands[i..].to_vec();
            break;
        }
    }
    if !left.is_empty() {
        record_again(address, &record.id, &left)?;
    }
    Ok(Some(Ran {
        id: record.id,
        commands: runs,
        put_back: left.len(),
    }))
}

fn record_again(address: &Address, id: &str, commands: &[PendingCommand]) -> Result<(), Error> {
    // Put back before any recorded since: they were recorded first.
    let path = path(address);
    let newer = read(&path)
        .ok()
        .flatten()
        .map(|r| r.commands)
        .unwrap_or_default();
    let mut all = commands.to_vec();
    all.extend(newer);
    write(
        &path,
        &PendingPost {
            agent: address.to_string(),
            id: id.to_string(),
            recorded_at: crate::time::now_rfc3339(),
            commands: all,
        },
    )
}

/// Runs one command in the guest; says whether the agent was lost doing so.
fn run_one(client: &mut Client, command: &PendingCommand) -> (CommandRun, bool) {
    let args: Vec<&str> = command.args.iter().map(String::as_str).collect();
    let timeout = Duration::from_secs_f64(command.timeout_s.max(0.0));
    exec_checked(client, &command.path, &args, timeout, false)
}

/// [`exec`], and whether the agent was lost doing so: it became unreachable, or the
/// command timed out and the agent does not answer a ping either (a command that is only
/// slow leaves an agent that answers: that command counts as run).
pub fn exec_checked(
    client: &mut Client,
    path: &str,
    args: &[&str],
    timeout: Duration,
    fatal: bool,
) -> (CommandRun, bool) {
    let (run, error) = exec(client, path, args, timeout, fatal);
    let lost = match error {
        None => false,
        // A program that outlived its timeout: it ran (and may still run), so it is not
        // run again.
        Some(crate::qga::Error::StillRunning { .. }) => false,
        // Any other agent error leaves unknown whether it ran: the agent did not answer
        // guest-exec, the connection broke, an agent that restarted meanwhile no longer
        // knows its pid, or one that came back up frozen refused guest-exec. It stays owed.
        Some(_) => true,
    };
    (run, lost)
}

/// Runs `path args…` in the guest through `guest-exec` and waits up to `timeout`: its
/// record, and the agent's error when there was one.
pub fn exec(
    client: &mut Client,
    path: &str,
    args: &[&str],
    timeout: Duration,
    fatal: bool,
) -> (CommandRun, Option<crate::qga::Error>) {
    let started = Instant::now();
    let result = client.guest_exec(path, args, timeout);
    let mut run = CommandRun {
        path: path.to_string(),
        args: args.iter().map(|a| a.to_string()).collect(),
        ok: false,
        fatal,
        exitcode: None,
        signal: None,
        stdout: String::new(),
        stderr: String::new(),
        output_truncated: false,
        error: None,
        duration_ms: 0.0,
    };
    let mut error = None;
    match result {
        Ok(done) => {
            run.ok = done.success();
            run.exitcode = done.exitcode;
            run.signal = done.signal;
            run.stdout = String::from_utf8_lossy(&done.stdout).into_owned();
            run.stderr = String::from_utf8_lossy(&done.stderr).into_owned();
            run.output_truncated = done.stdout_truncated || done.stderr_truncated;
            if !run.ok {
                run.error = Some(match (done.exitcode, done.signal) {
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    (Some(code), None) => format!("exited with status {code}"),
                    (None, None) => "ended without an exit status".into(),
                });
            }
        }
        Err(e) => {
            run.error = Some(crate::exit::chain_of(&e));
            error = Some(e);
        }
    }
    run.duration_ms = crate::time::millis(started.elapsed());
    (run, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(path: &str) -> PendingCommand {
        PendingCommand {
            path: path.into(),
            args: vec!["a b".into()],
            timeout_s: 5.0,
        }
    }

    #[test]
    fn a_record_round_trips_and_accumulates() {
        let dir = std::env::temp_dir().join(format!("evesnap-pending-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let address: Address = "unix:/nowhere/qga.sock".parse().unwrap();
        let load = |a: &Address| read(&path_in(&dir, a));
        assert_eq!(load(&address).unwrap(), None);
        let file = record_in(&dir, &address, "one", &[command("/bin/first")]).unwrap();
        assert!(file.starts_with(&dir));
        record_in(&dir, &address, "two", &[command("/bin/second")]).unwrap();
        let back = load(&address).unwrap().unwrap();
        assert_eq!(back.agent, address.to_string());
        assert_eq!(back.id, "two");
        assert_eq!(
            back.commands,
            vec![command("/bin/first"), command("/bin/second")]
        );
        // The same address written another way is the same record.
        let same: Address = "/nowhere/qga.sock".parse().unwrap();
        assert_eq!(path(&same), path(&address));
        // No temporary file is left beside it.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("pending-post"))
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::write(&file, "{\"agent\": 1}").unwrap();
        assert!(matches!(load(&address), Err(Error::Invalid { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
