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
//! connects, and if the guest is frozen it thaws and verifies, retrying for
//! [`FIRE_RETRY_WINDOW`] if the agent does not answer (a paused VM).
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
//! prints its pid and exits, so the watchdog is nobody's child and outlives everyone.
//! `qga-freeze` is such a program ([`main`] does the work).

use std::fs;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use super::{Address, Client};
use crate::exit::{Exit, HasExit};

/// Hidden flags of a program that can be a watchdog (see the module documentation).
pub const DETACH_FLAG: &str = "watchdog-detach";
pub const TOKEN_FLAG: &str = "watchdog-token";
pub const DEADLINE_FLAG: &str = "watchdog-deadline-ms";

/// How long a watchdog keeps a handed-over connection for the thaw. The agent serves one
/// client at a time: anyone else waits while it is kept, so only briefly (a pipeline's
/// snapshot takes milliseconds); after that the thaw reconnects as usual.
pub const KEEP_FOR: Duration = Duration::from_secs(2);

/// How long a watchdog keeps trying to thaw after its deadline.
pub const FIRE_RETRY_WINDOW: Duration = Duration::from_secs(600);

/// A watchdog as recorded in its state file and in the job document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    #[error("cannot create the runtime folder {}", path.display())]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
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
    #[error("the watchdog could not thaw the guest within {}s after its deadline", FIRE_RETRY_WINDOW.as_secs())]
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

/// Longest keeper request or reply line.
const KEEPER_LINE: usize = 128;

fn send_with_fd(socket: &UnixStream, line: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let raw = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = raw
        .as_ref()
        .map(|r| ControlMessage::ScmRights(r))
        .into_iter()
        .collect();
    let sent = socket::sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    if sent != line.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short keeper message",
        ));
    }
    Ok(())
}

/// One line and at most one descriptor. A stream socket delivers the descriptor with the
/// first byte of the message it was sent with, which is all there is here.
fn receive_with_fd(socket: &UnixStream) -> io::Result<(String, Option<OwnedFd>)> {
    let mut buf = [0u8; KEEPER_LINE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                let owned = own_received(raw);
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    let n = msg.bytes;
    let line = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
    Ok((line, fd))
}

/// Takes ownership of a descriptor received with SCM_RIGHTS.
#[allow(unsafe_code)]
fn own_received(raw: RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: recvmsg just installed `raw` in this process's table for this message; no
    // other owner exists, and it is owned exactly once here.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Hands the agent connection of a successful freeze to the watchdog `watchdog`, which
/// keeps it open for the thaw (see the module documentation).
pub fn hand_over(watchdog: &Watchdog, connection: OwnedFd) -> Result<(), Error> {
    let address: Address = watchdog.agent.parse().map_err(|e| Error::Handover {
        path: PathBuf::new(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let path = keeper_path(&address);
    let handover = |source| Error::Handover {
        path: path.clone(),
        source,
    };
    let socket = UnixStream::connect(&path).map_err(handover)?;
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(handover)?;
    send_with_fd(
        &socket,
        &format!("hold {}\n", watchdog.token),
        Some(connection.as_fd()),
    )
    .map_err(handover)?;
    let (reply, _) = receive_with_fd(&socket).map_err(handover)?;
    if reply != "ok" {
        return Err(handover(io::Error::other(format!(
            "the watchdog answered {reply:?}"
        ))));
    }
    Ok(())
}

/// Takes the agent connection the watchdog for `address` keeps, if it keeps one.
pub fn take_over(address: &Address) -> Result<Option<OwnedFd>, Error> {
    let Some(watchdog) = current(address)? else {
        return Ok(None);
    };
    let path = keeper_path(address);
    let handover = |source| Error::Handover {
        path: path.clone(),
        source,
    };
    let socket = match UnixStream::connect(&path) {
        Ok(socket) => socket,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(handover(e)),
    };
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(handover)?;
    send_with_fd(&socket, &format!("take {}\n", watchdog.token), None).map_err(handover)?;
    let (reply, fd) = receive_with_fd(&socket).map_err(handover)?;
    Ok(if reply == "ok" { fd } else { None })
}

/// Serves one keeper request: `hold <token>` (with a descriptor) or `take <token>`.
fn serve_keeper(listener: &UnixListener, token: &str, held: &mut Option<(OwnedFd, Instant)>) {
    let Ok((socket, _)) = listener.accept() else {
        return;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = socket.set_write_timeout(Some(Duration::from_secs(2)));
    let Ok((line, fd)) = receive_with_fd(&socket) else {
        return;
    };
    let reply = match (line.split_once(' '), fd) {
        (Some(("hold", t)), Some(fd)) if t == token => {
            *held = Some((fd, Instant::now()));
            send_with_fd(&socket, "ok\n", None)
        }
        (Some(("take", t)), None) if t == token => match held.take() {
            Some((fd, _)) => send_with_fd(&socket, "ok\n", Some(fd.as_fd())),
            None => send_with_fd(&socket, "none\n", None),
        },
        _ => send_with_fd(&socket, "refused\n", None),
    };
    if let Err(e) = reply {
        crate::warn!("watchdog keeper: {e}");
    }
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

fn ensure_runtime_dir() -> Result<PathBuf, Error> {
    let dir = crate::runtime::dir();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| Error::RuntimeDir {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
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

/// Arms a watchdog for `address` that thaws `thaw_after` from now, started through
/// `program` (a program that accepts the watchdog flags, e.g. `qga-freeze`). Replaces
/// any watchdog armed before for the same address (that one then stands down).
pub fn arm(address: &Address, thaw_after: Duration, program: &Path) -> Result<Watchdog, Error> {
    ensure_runtime_dir()?;
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

/// How a watchdog ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Cancelled (or replaced) before it had to act.
    Cancelled,
    /// At the deadline the guest was not frozen.
    NotFrozen,
    /// It thawed this many filesystems.
    Thawed(i64),
}

/// The body of a watchdog-capable program when called with the watchdog flags.
/// With `detach`, starts the real watchdog and prints its pid; without, is the watchdog.
pub fn main(
    address: &Address,
    token: &str,
    deadline_unix_ms: u64,
    detach: bool,
) -> Result<(), anyhow::Error> {
    if detach {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .arg(format!("--{TOKEN_FLAG}={token}"))
            .arg(format!("--{DEADLINE_FLAG}={deadline_unix_ms}"))
            .arg(format!("--agent={address}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{}", child.id())?;
        stdout.flush()?;
        // Not waited for: it is reparented when this process exits, right now.
        return Ok(());
    }
    // The freezing tool defers these signals while it freezes, and a blocked mask is
    // inherited: let a cancel's SIGTERM through.
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(nix::sys::signal::Signal::SIGTERM);
    let _ = term.thread_unblock();
    // Its own session: no terminal's hangup or interrupt reaches it. Fails only for a
    // group leader, which a freshly spawned child is not.
    if let Err(e) = nix::unistd::setsid() {
        crate::warn!("setsid: {e}");
    }
    let deadline = UNIX_EPOCH + Duration::from_millis(deadline_unix_ms);
    crate::note!(
        "watchdog {} armed for {address}, thaws at {}",
        std::process::id(),
        rfc3339_ms(deadline_unix_ms)
    );
    match run(address, token, deadline)? {
        Ending::Cancelled => crate::note!("watchdog {}: cancelled", std::process::id()),
        Ending::NotFrozen => crate::note!(
            "watchdog {}: deadline reached; the guest was not frozen",
            std::process::id()
        ),
        Ending::Thawed(n) => crate::warn!(
            "watchdog {}: deadline reached; thawed {n} filesystems",
            std::process::id()
        ),
    }
    Ok(())
}

/// Waits for the deadline while armed, then thaws if the guest is frozen.
pub fn run(address: &Address, token: &str, deadline: SystemTime) -> Result<Ending, Error> {
    let keeper = keeper_path(address);
    let _ = fs::remove_file(&keeper);
    let listener = UnixListener::bind(&keeper)
        .map_err(|e| crate::warn!("watchdog: no keeper socket {}: {e}", keeper.display()))
        .ok();
    let mut held: Option<(OwnedFd, Instant)> = None;
    loop {
        if !is_current(address, token) {
            let _ = fs::remove_file(&keeper);
            return Ok(Ending::Cancelled);
        }
        let Ok(left) = deadline.duration_since(SystemTime::now()) else {
            break;
        };
        if left.is_zero() {
            break;
        }
        let mut wait = left.min(Duration::from_millis(500));
        if let Some((_, since)) = &held {
            match KEEP_FOR.checked_sub(since.elapsed()) {
                // Kept long enough: let other clients in.
                None => held = None,
                Some(keep) => wait = wait.min(keep),
            }
        }
        match &listener {
            Some(listener) => {
                let millis = wait.as_millis().clamp(1, 500) as u16;
                let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                if let Ok(n) = nix::poll::poll(&mut fds, PollTimeout::from(millis)) {
                    if n > 0 {
                        serve_keeper(listener, token, &mut held);
                    }
                }
            }
            None => std::thread::sleep(wait),
        }
    }
    let _ = fs::remove_file(&keeper);
    let give_up = Instant::now() + FIRE_RETRY_WINDOW;
    loop {
        if !is_current(address, token) {
            return Ok(Ending::Cancelled);
        }
        match thaw_once(address, held.take().map(|(fd, _)| fd)) {
            Ok(ending) => {
                if is_current(address, token) {
                    let _ = remove_state(&state_path(address));
                }
                return Ok(ending);
            }
            Err(e) if Instant::now() < give_up => {
                crate::warn!(
                    "watchdog: thaw attempt failed, retrying: {}",
                    crate::exit::chain_of(&e)
                );
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(source) => return Err(Error::GaveUp { source }),
        }
    }
}

fn thaw_once(address: &Address, held: Option<OwnedFd>) -> Result<Ending, super::ThawError> {
    let timeout = Duration::from_secs(15);
    let deadline = Instant::now() + timeout;
    let mut client = match held {
        Some(fd) => Client::from_fd(fd, address.clone(), deadline),
        None => Client::connect(address, deadline),
    }
    .map_err(super::ThawError::Connect)?;
    client.set_timeout(timeout);
    if super::verify_thawed(&mut client, timeout).is_ok() {
        return Ok(Ending::NotFrozen);
    }
    super::thaw_and_verify(&mut client, timeout, false).map(|t| Ending::Thawed(t.count))
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
