//! The auto-thaw watchdog: a detached process that thaws the guest at a deadline unless
//! it is cancelled first.
//!
//! A freeze arms it *before* sending the freeze, so no death of the freezing process
//! (or of the whole pipeline) can leave the guest frozen past the deadline. A thaw
//! cancels it. One watchdog is armed per agent address; its state file in the runtime
//! folder ([`crate::runtime::dir`]) names it:
//!
//! ```json
//! {"pid": 4242, "token": "9f…", "agent": "unix:/run/vm0/qga.sock",
//!  "deadline": "2026-11-25T19:31:00.000Z", "deadline_unix_ms": 1795635060000,
//!  "state_file": "/run/evesnap/watchdog-….json", "log_file": "/run/evesnap/watchdog-….log"}
//! ```
//!
//! The watchdog only acts while the state file still carries its token: a thaw removes
//! the file, a later freeze replaces it with its own watchdog's token. At the deadline it
//! connects, and if the guest is frozen it thaws and verifies, then runs the `guest_post`
//! commands a run left pending for the agent ([`pending`](super::pending)). While the agent does
//! not answer it retries with a backoff (2 s doubling to 30 s): for as long as the VM
//! exists (a paused VM's agent socket accepts connections but nothing answers), and gives
//! up once the agent's socket file is gone, or once the agent has been unreachable
//! (refused: QEMU is gone) past [`FIRE_RETRY_WINDOW`] (tests only:
//! `EVESNAP_WATCHDOG_RETRY_WINDOW_S` seconds).
//!
//! The watchdog also keeps the freezing tool's agent connection, handed over through its
//! keeper socket (`watchdog-<hash>.sock`, SCM_RIGHTS) when that tool exits, and hands it
//! on to the thaw, for at most [`KEEP_FOR`]. qemu-ga, when its virtio-serial client
//! disconnects, sleeps about 100 ms before it reads again; a pipeline that hands the one
//! connection along never pays that inside the freeze window. Without a hand-over, or
//! after [`KEEP_FOR`], everyone connects as usual.
//!
//! The process is started as `<program> --watchdog-detach --watchdog-token T
//! --watchdog-deadline-ms D --agent A`: that first process starts the real watchdog
//! (the same program without `--watchdog-detach`, stdio detached, its own session),
//! prints its pid and exits, so the watchdog is nobody's child and outlives everyone. The
//! watchdog keeps the starter's stdout until its keeper socket listens, and [`arm`] reads
//! it to its end: once armed, a hand-over finds the socket.
//! `qga-freeze` is such a program ([`main`] does the work).

mod body;
mod keeper;
mod pipeline;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use body::{main, run, Ending};
pub use keeper::{hand_over, take_over, watch, Relay};
pub use pipeline::{await_read, pipe_state, Delivery, PipeState, WATCH_FOR, WATCH_READ_FOR};

use super::Address;
use crate::exit::{Exit, HasExit};

/// Hidden flags of a program that can be a watchdog (see the module documentation).
pub const DETACH_FLAG: &str = "watchdog-detach";
pub const TOKEN_FLAG: &str = "watchdog-token";
pub const DEADLINE_FLAG: &str = "watchdog-deadline-ms";

/// How long a watchdog keeps a handed-over connection for the thaw. The agent serves one
/// client at a time: anyone else waits while it is kept, so only briefly (a pipeline's
/// snapshot takes milliseconds); after that the thaw reconnects as usual.
pub const KEEP_FOR: Duration = Duration::from_secs(2);

/// How long a watchdog keeps trying to thaw after its deadline once the agent is
/// unreachable (its socket gone or refused); a VM that exists but does not answer (paused)
/// is retried for as long as it exists.
pub const FIRE_RETRY_WINDOW: Duration = Duration::from_secs(600);

/// A watchdog as recorded in its state file and in the job document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Watchdog {
    /// The watchdog's pid (`null` in the moment between writing the state and starting it).
    pub pid: Option<u32>,
    pub token: String,
    pub agent: String,
    /// RFC 3339, UTC.
    pub deadline: String,
    pub deadline_unix_ms: u64,
    pub state_file: PathBuf,
    pub log_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    RuntimeDir(#[from] crate::runtime::DirError),
    #[error("cannot write the watchdog state {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the watchdog state {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the watchdog {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the watchdog starter {} failed: {detail}", program.display())]
    Start { program: PathBuf, detail: String },
    #[error("cannot stop the watchdog (pid {pid})")]
    Kill {
        pid: u32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("cannot hand the agent connection over through {}", path.display())]
    Handover {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the watchdog could not thaw the guest: its agent stayed unreachable (the VM is gone?)"
    )]
    GaveUp {
        #[source]
        source: super::ThawError,
    },
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::GaveUp { .. } => Exit::ThawFailed,
            _ => Exit::StepFailed,
        }
    }
}

fn stem(address: &Address) -> String {
    format!(
        "watchdog-{:016x}",
        crate::runtime::fnv1a(&address.to_string())
    )
}

/// The state file of the watchdog for `address`.
pub fn state_path(address: &Address) -> PathBuf {
    crate::runtime::dir().join(format!("{}.json", stem(address)))
}

fn log_path(address: &Address) -> PathBuf {
    crate::runtime::dir().join(format!("{}.log", stem(address)))
}

/// The keeper socket of the watchdog for `address`.
pub fn keeper_path(address: &Address) -> PathBuf {
    crate::runtime::dir().join(format!("{}.sock", stem(address)))
}

fn random_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut a = std::collections::hash_map::RandomState::new().build_hasher();
    a.write_u32(std::process::id());
    let mut b = std::collections::hash_map::RandomState::new().build_hasher();
    b.write_u64(a.finish());
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339_ms(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map(crate::time::rfc3339)
        .unwrap_or_else(|_| unix_ms.to_string())
}

fn write_state(watchdog: &Watchdog) -> Result<(), Error> {
    let path = &watchdog.state_file;
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    let text = serde_json::to_string_pretty(watchdog).unwrap_or_default();
    let written = fs::write(&tmp, text + "\n").and_then(|()| fs::rename(&tmp, path));
    written.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        Error::Write {
            path: path.clone(),
            source,
        }
    })
}

/// The watchdog currently armed for `address`, if any.
pub fn current(address: &Address) -> Result<Option<Watchdog>, Error> {
    let path = state_path(address);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(serde_json::from_str(&text).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Read { path, source }),
    }
}

fn is_current(address: &Address, token: &str) -> bool {
    matches!(current(address), Ok(Some(w)) if w.token == token)
}

/// Waits, at most `limit`, until `watchdog` stood down (a thaw cancelled it, it fired, or
/// another freeze replaced it): work that would compete with the thaw for the pool and the
/// guest's disks waits for it. True when it stood down.
pub fn wait_stood_down(watchdog: &Watchdog, limit: Duration) -> bool {
    let Ok(address) = watchdog.agent.parse::<Address>() else {
        return true;
    };
    let until = std::time::Instant::now() + limit;
    while is_current(&address, &watchdog.token) {
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// Arms a watchdog for `address` that thaws `thaw_after` from now, started through
/// `program` (a program that accepts the watchdog flags, e.g. `qga-freeze`). Replaces
/// any watchdog armed before for the same address (that one then stands down).
pub fn arm(address: &Address, thaw_after: Duration, program: &Path) -> Result<Watchdog, Error> {
    crate::runtime::ensure_dir()?;
    let deadline_unix_ms = unix_ms(SystemTime::now() + thaw_after);
    let mut watchdog = Watchdog {
        pid: None,
        token: random_token(),
        agent: address.to_string(),
        deadline: rfc3339_ms(deadline_unix_ms),
        deadline_unix_ms,
        state_file: state_path(address),
        log_file: log_path(address),
    };
    // The state is there before the watchdog starts: it stands down when it is not.
    write_state(&watchdog)?;
    let started = start(&watchdog, program);
    match started {
        Ok(pid) => {
            watchdog.pid = Some(pid);
            if let Err(e) = write_state(&watchdog) {
                let _ = cancel_this(&watchdog);
                return Err(e);
            }
            Ok(watchdog)
        }
        Err(e) => {
            let _ = fs::remove_file(&watchdog.state_file);
            Err(e)
        }
    }
}

fn start(watchdog: &Watchdog, program: &Path) -> Result<u32, Error> {
    let spawn_error = |source| Error::Spawn {
        program: program.to_path_buf(),
        source,
    };
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&watchdog.log_file)
        .map_err(spawn_error)?;
    let output = Command::new(program)
        .arg(format!("--{DETACH_FLAG}"))
        .arg(format!("--{TOKEN_FLAG}={}", watchdog.token))
        .arg(format!("--{DEADLINE_FLAG}={}", watchdog.deadline_unix_ms))
        .arg(format!("--agent={}", watchdog.agent))
        .env("EVESNAP_RUN_DIR", crate::runtime::dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .output()
        .map_err(spawn_error)?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.trim().parse::<u32>() {
        Ok(pid) if output.status.success() => Ok(pid),
        _ => Err(Error::Start {
            program: program.to_path_buf(),
            detail: format!(
                "{} (printed {:?}; see {})",
                output.status,
                text.trim(),
                watchdog.log_file.display()
            ),
        }),
    }
}

/// True when `pid` runs a watchdog with `token` on its command line (not a reused pid).
fn is_watchdog_process(pid: u32, token: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == format!("--{TOKEN_FLAG}={token}").as_bytes())
}

fn stop(watchdog: &Watchdog) -> Result<(), Error> {
    let Some(pid) = watchdog.pid else {
        return Ok(());
    };
    if !is_watchdog_process(pid, &watchdog.token) {
        return Ok(());
    }
    let target = nix::unistd::Pid::from_raw(pid as i32);
    match nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(source) => Err(Error::Kill { pid, source }),
    }
}

/// Cancels whatever watchdog is armed for `address` (a thaw was verified); returns it.
pub fn cancel(address: &Address) -> Result<Option<Watchdog>, Error> {
    let Some(watchdog) = current(address)? else {
        return Ok(None);
    };
    remove_state(&watchdog.state_file)?;
    stop(&watchdog)?;
    Ok(Some(watchdog))
}

/// Cancels this watchdog if it is still the one armed for its address; returns whether
/// it was.
pub fn cancel_this(watchdog: &Watchdog) -> Result<bool, Error> {
    let address: Address = match watchdog.agent.parse() {
        Ok(a) => a,
        Err(_) => return Ok(false),
    };
    let armed = matches!(current(&address)?, Some(w) if w.token == watchdog.token);
    if armed {
        remove_state(&watchdog.state_file)?;
    }
    stop(watchdog)?;
    Ok(armed)
}

fn remove_state(path: &Path) -> Result<(), Error> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_distinct() {
        let a: Address = "unix:/run/a.sock".parse().expect("address");
        let b: Address = "vsock:3:4444".parse().expect("address");
        assert_eq!(
            crate::runtime::fnv1a("unix:/run/a.sock"),
            crate::runtime::fnv1a(&a.to_string())
        );
        assert_ne!(state_path(&a), state_path(&b));
        assert!(state_path(&a).to_string_lossy().ends_with(".json"));
        assert_eq!(rfc3339_ms(1_795_635_060_123), "2026-11-25T19:31:00.123Z");
        assert_ne!(random_token(), random_token());
    }
}
