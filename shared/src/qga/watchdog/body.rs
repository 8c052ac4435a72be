//! The watchdog process itself: [`main`] starts it detached, [`run`] waits for the
//! deadline (serving the keeper socket meanwhile) and then thaws a frozen guest.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::keeper::{read_relay, serve_keeper, Asked, RelaySaid};
use super::{
    is_current, keeper_path, remove_state, rfc3339_ms, state_path, Error, DEADLINE_FLAG,
    FIRE_RETRY_WINDOW, KEEP_FOR, TOKEN_FLAG,
};
use crate::qga::{self, Address, Client};

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
        Ending::Thawed(n) => {
            crate::warn!("watchdog {}: thawed {n} filesystems", std::process::id())
        }
    }
    Ok(())
}

/// A pipe holding a document of this freeze, watched until its reader took it in.
struct Watched {
    pipe: OwnedFd,
    since: Instant,
}

/// How often a watched pipe or a relay is looked at.
const WATCH_TICK: Duration = Duration::from_millis(20);

/// How long a watched pipe is watched: its reader takes the document in at once, or it
/// exits without it (a mistyped command line) at once. A reader that is alive and does not
/// read is left to the deadline, and the pipe to it (`| cat`) is not held open longer.
const WATCH_FOR: Duration = Duration::from_secs(2);

/// What a look at a watched pipe found.
fn look(watched: &Watched) -> Option<Result<(), String>> {
    let mut fds = [PollFd::new(watched.pipe.as_fd(), PollFlags::empty())];
    let reader_gone = nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP));
    let unread = rustix::io::ioctl_fionread(&watched.pipe).unwrap_or(0);
    match (unread, reader_gone) {
        (0, _) => Some(Ok(())),
        (n, true) => Some(Err(format!(
            "the next step of the pipeline exited without reading the document ({n} bytes unread)"
        ))),
        _ if watched.since.elapsed() > WATCH_FOR => Some(Ok(())),
        _ => None,
    }
}

/// Waits for the deadline while armed, then thaws if the guest is frozen; thaws at once
/// when the pipeline broke (a watched document left unread, a relay gone unfinished).
pub fn run(address: &Address, token: &str, deadline: SystemTime) -> Result<Ending, Error> {
    let keeper = keeper_path(address);
    let _ = fs::remove_file(&keeper);
    let listener = UnixListener::bind(&keeper)
        .map_err(|e| crate::warn!("watchdog: no keeper socket {}: {e}", keeper.display()))
        .ok();
    let mut held: Option<(OwnedFd, Instant)> = None;
    let mut watched: Option<Watched> = None;
    let mut relay: Option<UnixStream> = None;
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
        if let Some(found) = watched.as_ref().and_then(look) {
            watched = None;
            if let Err(why) = found {
                crate::warn!("watchdog {}: {why}: thawing now", std::process::id());
                break;
            }
        }
        let mut wait = left.min(Duration::from_millis(500));
        if watched.is_some() || relay.is_some() {
            wait = wait.min(WATCH_TICK);
        }
        if let Some((_, since)) = &held {
            match KEEP_FOR.checked_sub(since.elapsed()) {
                // Kept long enough: let other clients in.
                None => held = None,
                Some(keep) => wait = wait.min(keep),
            }
        }
        let Some(listener) = &listener else {
            std::thread::sleep(wait);
            continue;
        };
        let millis = wait.as_millis().clamp(1, 500) as u16;
        let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if let Some(relay) = &relay {
            fds.push(PollFd::new(relay.as_fd(), PollFlags::POLLIN));
        }
        if nix::poll::poll(&mut fds, PollTimeout::from(millis)).unwrap_or(0) == 0 {
            continue;
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let (listener_ready, relay_ready) = (ready(&fds[0]), fds.get(1).is_some_and(ready));
        drop(fds);
        if relay_ready {
            let said = relay.as_ref().map(|r| read_relay(r, token));
            match said {
                Some(RelaySaid::Watch(pipe)) => {
                    watched = Some(Watched {
                        pipe,
                        since: Instant::now(),
                    })
                }
                Some(RelaySaid::Done) => relay = None,
                Some(RelaySaid::Died) => {
                    crate::warn!(
                        "watchdog {}: a step of the pipeline ended between reading the freeze's \
                         document and passing its own on: thawing now",
                        std::process::id()
                    );
                    break;
                }
                Some(RelaySaid::Other) | None => {}
            }
        }
        if listener_ready {
            match serve_keeper(listener, token, &mut held) {
                Asked::Watch(pipe) => {
                    watched = Some(Watched {
                        pipe,
                        since: Instant::now(),
                    })
                }
                Asked::Relay(socket) => relay = Some(socket),
                Asked::Nothing => {}
            }
        }
    }
    let _ = fs::remove_file(&keeper);
    // A VM paused while frozen cannot answer: keep trying while it exists (its agent
    // socket accepts connections), with a backoff; give up only when the agent has been
    // unreachable (no socket, refused: QEMU is gone) past the retry window.
    let window = retry_window();
    let started = Instant::now();
    let mut pause = Duration::from_secs(2);
    loop {
        if !is_current(address, token) {
            return Ok(Ending::Cancelled);
        }
        match thaw_once(address, held.take().map(|(fd, _)| fd)) {
            Ok((ending, mut client)) => {
                if is_current(address, token) {
                    let _ = remove_state(&state_path(address));
                }
                run_pending(&mut client, address);
                return Ok(ending);
            }
            Err(e) if !(vm_gone(&e) && (started.elapsed() >= window || socket_gone(address))) => {
                crate::warn!(
                    "watchdog: thaw attempt failed, retrying in {} s: {}",
                    pause.as_secs(),
                    crate::exit::chain_of(&e)
                );
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_RETRY_PAUSE);
            }
            Err(source) => return Err(Error::GaveUp { source }),
        }
    }
}

/// The longest pause between two thaw attempts of a watchdog past its deadline.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// [`FIRE_RETRY_WINDOW`], or for tests only `EVESNAP_WATCHDOG_RETRY_WINDOW_S` seconds.
fn retry_window() -> Duration {
    std::env::var("EVESNAP_WATCHDOG_RETRY_WINDOW_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(FIRE_RETRY_WINDOW)
}

/// Whether a failed attempt says the VM is gone (its agent socket is missing or refuses,
/// its vsock CID names no VM), rather than paused or busy. A connect that got no answer is
/// a paused VM's: a kernel AF_VSOCK connect to a paused VM times out (ETIMEDOUT; one to a
/// CID without a VM fails at once, ENODEV, or ECONNRESET when its vhost device goes away
/// meanwhile). A hybrid vsock device that refuses the guest port is there, and so is its
/// VM (paused, or its agent restarting).
fn vm_gone(error: &qga::ThawError) -> bool {
    use nix::errno::Errno;
    match error {
        qga::ThawError::Connect(qga::Error::Unreachable { source, .. }) => {
            let no_answer = matches!(
                source.raw_os_error().map(Errno::from_raw),
                Some(Errno::ETIMEDOUT | Errno::EAGAIN | Errno::EINPROGRESS | Errno::EALREADY)
            );
            !no_answer && !qga::stream::is_hybrid_refusal(source)
        }
        _ => false,
    }
}

/// The agent's socket file is not there at all: its QEMU is gone (a new one would boot a
/// guest that is not frozen), so there is nothing to wait for.
fn socket_gone(address: &Address) -> bool {
    match address {
        Address::Unix(path) | Address::HybridVsock { path, .. } => !path.exists(),
        _ => false,
    }
}

/// Runs the `guest_post` commands a run left pending for this agent, now that it answers.
fn run_pending(client: &mut Client, address: &Address) {
    match crate::pending::run(client, address) {
        Ok(Some(ran)) => crate::warn!(
            "watchdog {}: ran {} pending guest_post command(s) of run {}: {}",
            std::process::id(),
            ran.commands.len(),
            ran.id,
            ran.commands
                .iter()
                .map(|c| c.describe())
                .collect::<Vec<_>>()
                .join("; ")
        ),
        Ok(None) => {}
        Err(e) => crate::warn!(
            "watchdog {}: pending guest_post: {}",
            std::process::id(),
            crate::exit::chain_of(&e)
        ),
    }
}

fn thaw_once(address: &Address, held: Option<OwnedFd>) -> Result<(Ending, Client), qga::ThawError> {
    let timeout = Duration::from_secs(15);
    let deadline = Instant::now() + timeout;
    let mut client = match held {
        Some(fd) => Client::from_fd(fd, address.clone(), deadline),
        None => Client::connect(address, deadline),
    }
    .map_err(qga::ThawError::Connect)?;
    client.set_timeout(timeout);
    if qga::verify_thawed(&mut client, timeout).is_ok() {
        return Ok((Ending::NotFrozen, client));
    }
    let ending =
        qga::thaw_and_verify(&mut client, timeout, false).map(|t| Ending::Thawed(t.count))?;
    Ok((ending, client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::errno::Errno;

    fn unreachable(source: io::Error) -> qga::ThawError {
        qga::ThawError::Connect(qga::Error::Unreachable {
            address: "vsock:7:9".into(),
            source,
        })
    }

    #[test]
    fn a_connect_without_an_answer_is_a_paused_vm_not_a_gone_one() {
        for present in [Errno::ETIMEDOUT, Errno::EAGAIN, Errno::EINPROGRESS] {
            let error = unreachable(io::Error::from_raw_os_error(present as i32));
            assert!(!vm_gone(&error), "{present}");
        }
        for gone in [
            Errno::ENODEV,
            Errno::ECONNRESET,
            Errno::ENOENT,
            Errno::ECONNREFUSED,
            Errno::ENETUNREACH,
            Errno::EHOSTUNREACH,
        ] {
            let error = unreachable(io::Error::from_raw_os_error(gone as i32));
            assert!(vm_gone(&error), "{gone}");
        }
        let timeout = qga::ThawError::Connect(qga::Error::Timeout {
            address: "vsock:7:9".into(),
            command: "connect".into(),
            after: Duration::from_secs(1),
        });
        assert!(!vm_gone(&timeout));
    }
}
