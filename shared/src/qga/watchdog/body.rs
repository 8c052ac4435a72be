//! The watchdog process itself: [`main`] starts it detached, [`run`] waits for the
//! deadline (serving the keeper socket meanwhile) and then thaws a frozen guest.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::keeper::{read_relay, serve_keeper, Asked, RelaySaid};
use super::pipeline::Pipeline;
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
            // Whoever armed it reads this to its end: see `listening` below.
            .stdout(Stdio::inherit())
            .spawn()?;
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "{}", child.id())?;
        stdout.flush()?;
        // Not waited for: it is reparented when this process exits, right now.
        return Ok(());
    }
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
    // Closing stdout tells whoever armed this watchdog that its keeper socket listens: a
    // hand-over right after a quick freeze finds it.
    let listening = || {
        if let Ok(null) = fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2_stdout(&null);
        }
    };
    match run(address, token, deadline, listening)? {
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

/// How often a watched pipe or a relay is looked at.
const WATCH_TICK: Duration = Duration::from_millis(20);

/// Waits for the deadline while armed, then thaws if the guest is frozen; thaws at once
/// when the pipeline broke (see [`Pipeline`]). `listening` is called once the keeper
/// socket listens (or could not).
pub fn run(
    address: &Address,
    token: &str,
    deadline: SystemTime,
    listening: impl FnOnce(),
) -> Result<Ending, Error> {
    let keeper = keeper_path(address);
    let _ = fs::remove_file(&keeper);
    let listener = UnixListener::bind(&keeper)
        .map_err(|e| crate::warn!("watchdog: no keeper socket {}: {e}", keeper.display()))
        .ok();
    listening();
    let mut held: Option<(OwnedFd, Instant)> = None;
    let mut pipeline = Pipeline::default();
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
        if let Err(why) = pipeline.look() {
            crate::warn!("watchdog {}: {why}: thawing now", std::process::id());
            break;
        }
        let mut wait = left.min(Duration::from_millis(500));
        if pipeline.busy() {
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
        fds.extend(
            pipeline
                .relay_sockets()
                .map(|r| PollFd::new(r.as_fd(), PollFlags::POLLIN)),
        );
        if nix::poll::poll(&mut fds, PollTimeout::from(millis)).unwrap_or(0) == 0 {
            continue;
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        // One relay message per round, the first ready: indices stay valid.
        if let Some(index) = ready[1..].iter().position(|&r| r) {
            let said = pipeline
                .relay_sockets()
                .nth(index)
                .map(|r| read_relay(r, token));
            match said {
                Some(RelaySaid::Watch(pipe)) => pipeline.watch(pipe, Some(index)),
                Some(RelaySaid::Done) => pipeline.done(index),
                Some(RelaySaid::Died) => {
                    crate::warn!(
                        "watchdog {}: a step of the pipeline ended after reading the freeze's \
                         document and before passing its own on or thawing: thawing now",
                        std::process::id()
                    );
                    break;
                }
                Some(RelaySaid::Other) | None => {}
            }
        }
        if ready[0] {
            match serve_keeper(listener, token, &mut held) {
                Asked::Watch(pipe) => pipeline.watch(pipe, None),
                Asked::Relay(socket) => pipeline.register(socket),
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
            Ok((ending, client)) => {
                if is_current(address, token) {
                    let _ = remove_state(&state_path(address));
                }
                run_pending(client, address);
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
/// An agent that does not answer them yet (it just came back), or is lost while running
/// one (the command stays pending), gets them again with the thaw's backoff, while its VM
/// exists, for [`FIRE_RETRY_WINDOW`] at most: nobody else would run them until `serve` or
/// `snap-orchestrate recover` does.
fn run_pending(mut client: Client, address: &Address) {
    let started = Instant::now();
    let mut pause = Duration::from_secs(2);
    loop {
        match crate::qga::pending::run(&mut client, address) {
            Ok(None) => return,
            Ok(Some(ran)) => {
                crate::warn!(
                    "watchdog {}: ran {} pending guest_post command(s) of run {}: {}",
                    std::process::id(),
                    ran.commands.len(),
                    ran.id,
                    ran.commands
                        .iter()
                        .map(|c| c.describe())
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                if ran.put_back == 0 {
                    return;
                }
            }
            Err(e) => crate::warn!(
                "watchdog {}: pending guest_post: {}",
                std::process::id(),
                crate::exit::chain_of(&e)
            ),
        }
        if started.elapsed() >= FIRE_RETRY_WINDOW || socket_gone(address) {
            crate::warn!(
                "watchdog {}: the pending guest_post stays recorded: run `snap-orchestrate recover --agent {address}`",
                std::process::id()
            );
            return;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_RETRY_PAUSE);
        let deadline = Instant::now() + Duration::from_secs(15);
        match Client::connect(address, deadline) {
            Ok(c) => client = c,
            Err(e) => crate::warn!(
                "watchdog {}: pending guest_post: {}",
                std::process::id(),
                crate::exit::chain_of(&e)
            ),
        }
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
