//! The connection to one guest agent: opening it (or adopting one handed over), its
//! timeouts, and the commands the tools use, typed. The framing on the wire is in
//! `framing.rs` (see the module documentation of [`crate::qga`] for the rules it follows),
//! `guest-exec` in `exec.rs`.

mod exec;
mod framing;

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use qapi::qga;

pub use exec::{CommandRun, ExecResult};

use super::stream::{Stream, WaitError};
use super::{Address, Error};

/// The default time an agent gets to answer one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default cap on one reply line, libvirt's: a guest cannot make the host hold more
/// for one answer. `guest-exec-status` carries a command's output base64-encoded, so the
/// plan's guest commands get about 7 MiB of output and errors together; a reply over the
/// cap is an error (the command's outcome is then unknown).
pub const DEFAULT_MAX_REPLY: usize = 10 * 1024 * 1024;

/// Pause between connection attempts while the socket is missing or refuses.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// A synchronised connection to one guest agent.
///
/// Every reply is awaited with a deadline; after a timeout or garbage the connection is
/// re-synchronised (`0xFF` + `guest-sync-delimited`) before the next command, so a late
/// reply can never be mistaken for the answer to a later command.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    address: Address,
    buf: Vec<u8>,
    /// Bytes of `buf` already searched for a line end.
    scanned: usize,
    timeout: Duration,
    max_reply: usize,
    next_id: i64,
    synced: bool,
}

/// A random positive id below 2^52 (exact in any JSON reader).
fn random_id() -> i64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    (hasher.finish() >> 12) as i64 | 1
}

fn seconds(d: Duration) -> String {
    format!("{}s", (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

impl Client {
    /// Connects and synchronises, retrying while the socket is missing or refuses and
    /// while the agent does not answer, until `deadline`.
    ///
    /// Fails with [`Error::Unreachable`] when the socket never accepted a connection and
    /// with [`Error::Timeout`] when it did but the agent never answered.
    pub fn connect(address: &Address, deadline: Instant) -> Result<Client, Error> {
        let started = Instant::now();
        loop {
            let mut client = Client::open(address, deadline)?;
            match client.handshake(deadline, started) {
                Ok(()) => return Ok(client),
                // The agent end went away (QEMU restarting): connect again.
                Err(Error::Disconnected { .. }) if Instant::now() + RECONNECT_PAUSE < deadline => {
                    std::thread::sleep(RECONNECT_PAUSE);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens the connection without synchronising (retrying while the socket is missing
    /// or refuses, until `deadline`). The first [`Client::execute`] synchronises; only
    /// [`Client::execute_unsynced`] goes without: a rescue thaw queued to an agent that
    /// does not answer.
    pub fn open(address: &Address, deadline: Instant) -> Result<Client, Error> {
        let started = Instant::now();
        loop {
            match Stream::connect(address, deadline) {
                Ok(stream) => return Ok(Client::new(stream, address.clone())),
                Err(WaitError::Timeout) => {
                    return Err(Error::Timeout {
                        address: address.to_string(),
                        command: "connect".into(),
                        after: started.elapsed(),
                    })
                }
                Err(WaitError::Io(source)) => {
                    // A hybrid vsock device refuses with a closed connection, not an errno.
                    let retry = source.kind() == std::io::ErrorKind::ConnectionRefused
                        || matches!(
                            source.raw_os_error().map(nix::errno::Errno::from_raw),
                            Some(
                                nix::errno::Errno::ENOENT
                                    | nix::errno::Errno::ECONNREFUSED
                                    | nix::errno::Errno::EAGAIN
                                    | nix::errno::Errno::ECONNRESET
                                    | nix::errno::Errno::ETIMEDOUT
                                    | nix::errno::Errno::ENODEV
                            )
                        );
                    if !retry || Instant::now() + RECONNECT_PAUSE >= deadline {
                        return Err(Error::Unreachable {
                            address: address.to_string(),
                            source,
                        });
                    }
                    std::thread::sleep(RECONNECT_PAUSE);
                }
            }
        }
    }

    /// Whether the connection is synchronised (no timeout or garbage since the last sync).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// A client over an already connected socket, synchronised by `deadline`
    /// (scripted peers in tests use socket pairs).
    pub fn from_fd(
        fd: std::os::fd::OwnedFd,
        address: Address,
        deadline: Instant,
    ) -> Result<Client, Error> {
        let mut client = Client::adopt(fd, address)?;
        client.handshake(deadline, Instant::now())?;
        Ok(client)
    }

    /// A connection handed over by its last owner after a successful command (every reply
    /// read): used as it is when nothing arrived on it since, which saves a round trip
    /// inside a freeze window; replies are matched by id in any case. Anything pending
    /// (stale output, a hangup) gets the full handshake of [`from_fd`](Self::from_fd).
    pub fn from_kept_fd(
        fd: std::os::fd::OwnedFd,
        address: Address,
        deadline: Instant,
    ) -> Result<Client, Error> {
        let mut client = Client::adopt(fd, address)?;
        if client.stream.is_quiet() {
            client.synced = true;
        } else {
            client.handshake(deadline, Instant::now())?;
        }
        Ok(client)
    }

    fn adopt(fd: std::os::fd::OwnedFd, address: Address) -> Result<Client, Error> {
        let stream = Stream::from_fd(fd).map_err(|source| Error::Unreachable {
            address: address.to_string(),
            source,
        })?;
        Ok(Client::new(stream, address))
    }

    /// The connection itself, for handing it over (see [`from_kept_fd`](Self::from_kept_fd)).
    pub fn into_fd(self) -> std::os::fd::OwnedFd {
        self.stream.into_fd()
    }

    fn new(stream: Stream, address: Address) -> Client {
        Client {
            stream,
            address,
            buf: Vec::new(),
            scanned: 0,
            timeout: DEFAULT_TIMEOUT,
            max_reply: DEFAULT_MAX_REPLY,
            next_id: random_id(),
            synced: false,
        }
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The time each command gets by default ([`DEFAULT_TIMEOUT`] unless set).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Caps the length of one reply ([`DEFAULT_MAX_REPLY`] unless set).
    pub fn set_max_reply(&mut self, bytes: usize) {
        self.max_reply = bytes;
    }

    fn fresh_id(&mut self) -> i64 {
        self.next_id = (self.next_id + 1) & ((1 << 52) - 1);
        self.next_id
    }

    fn timeout_error(&self, command: &str, started: Instant) -> Error {
        Error::Timeout {
            address: self.address.to_string(),
            command: command.to_string(),
            after: started.elapsed(),
        }
    }

    /// (Re-)synchronises the connection, retrying while the agent is silent, by `deadline`.
    pub fn sync(&mut self, deadline: Instant) -> Result<(), Error> {
        self.handshake(deadline, Instant::now())
    }

    /// Runs a command with the client's default timeout.
    pub fn execute<C: qapi_spec::Command>(&mut self, command: C) -> Result<C::Ok, Error> {
        let timeout = self.timeout;
        self.execute_within(command, timeout)
    }

    /// Runs a command; `timeout` covers re-synchronising (if needed), sending and the reply.
    pub fn execute_within<C: qapi_spec::Command>(
        &mut self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok, Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        if !self.synced {
            self.handshake(deadline, started)?;
        }
        self.send_and_await(command, deadline, started, false)
    }

    /// Runs a command without re-synchronising first, even after a timeout: for a
    /// rescue thaw to an agent that does not answer (a paused VM). The command is queued
    /// behind whatever is pending and runs when the agent reads on; this waits for its
    /// own reply (by id) until `timeout`.
    pub fn execute_unsynced<C: qapi_spec::Command>(
        &mut self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok, Error> {
        let started = Instant::now();
        self.send_and_await(command, started + timeout, started, true)
    }

    // --- Commands the tools use, typed. ---

    pub fn ping(&mut self) -> Result<(), Error> {
        self.execute(qga::guest_ping {}).map(drop)
    }

    pub fn info(&mut self) -> Result<qga::GuestAgentInfo, Error> {
        self.execute(qga::guest_info {})
    }

    pub fn fsfreeze_status(&mut self) -> Result<qga::GuestFsfreezeStatus, Error> {
        self.execute(qga::guest_fsfreeze_status {})
    }

    /// `guest-get-fsinfo`: the guest's mounted filesystems and their disks.
    pub fn fsinfo(&mut self) -> Result<Vec<qga::GuestFilesystemInfo>, Error> {
        self.execute(qga::guest_get_fsinfo {})
    }

    /// The guest's clock (`CLOCK_REALTIME`), in nanoseconds since the epoch.
    pub fn guest_time_ns(&mut self) -> Result<i64, Error> {
        self.execute(qga::guest_get_time {})
    }
}

pub(crate) fn fmt_seconds(d: Duration) -> String {
    seconds(d)
}
