//! The watchdog process itself: [`main`] starts it detached, [`run`] waits for the
//! deadline (serving the keeper socket meanwhile) and then thaws a frozen guest.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::keeper::serve_keeper;
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

fn thaw_once(address: &Address, held: Option<OwnedFd>) -> Result<Ending, qga::ThawError> {
    let timeout = Duration::from_secs(15);
    let deadline = Instant::now() + timeout;
    let mut client = match held {
        Some(fd) => Client::from_fd(fd, address.clone(), deadline),
        None => Client::connect(address, deadline),
    }
    .map_err(qga::ThawError::Connect)?;
    client.set_timeout(timeout);
    if qga::verify_thawed(&mut client, timeout).is_ok() {
        return Ok(Ending::NotFrozen);
    }
    qga::thaw_and_verify(&mut client, timeout, false).map(|t| Ending::Thawed(t.count))
}
