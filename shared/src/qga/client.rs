//! The connection to one guest agent and its framing (see the module documentation of
//! [`crate::qga`] for the wire rules this follows).

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use qapi::qga;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::stream::{Stream, WaitError};
use super::{Address, AgentError, Error};

/// The default time an agent gets to answer one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default cap on one reply line. `guest-exec-status` may carry 16 MiB of output
/// and as much of errors, base64-encoded: 48 MiB fits both.
pub const DEFAULT_MAX_REPLY: usize = 48 * 1024 * 1024;

/// Byte that resets the agent's JSON parser and precedes a `guest-sync-delimited` reply.
const DELIMITER: u8 = 0xFF;

/// The first wait for a sync reply; doubled up to [`MAX_SYNC_ATTEMPT`] while the agent
/// is silent (guest booting, agent restarting).
const FIRST_SYNC_ATTEMPT: Duration = Duration::from_millis(500);
const MAX_SYNC_ATTEMPT: Duration = Duration::from_secs(2);

/// Pause between connection attempts while the socket is missing or refuses.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// What a program run through `guest-exec` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The exit code, when it exited normally.
    pub exitcode: Option<i64>,
    /// The signal that ended it, if one did.
    pub signal: Option<i64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The agent caps captured output (16 MiB in qemu-ga 7.2) and says so only here.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl ExecResult {
    /// Exited normally with status 0.
    pub fn success(&self) -> bool {
        self.exitcode == Some(0) && self.signal.is_none()
    }
}

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

/// Why reading a reply stopped.
enum ReadError {
    Wait(WaitError),
    TooLong,
}

impl From<WaitError> for ReadError {
    fn from(e: WaitError) -> Self {
        ReadError::Wait(e)
    }
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
                    let retry = matches!(
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

    fn wait_error(&mut self, e: WaitError, command: &str, started: Instant) -> Error {
        self.synced = false;
        match e {
            WaitError::Timeout => self.timeout_error(command, started),
            WaitError::Io(source) => Error::Disconnected {
                command: command.to_string(),
                source,
            },
        }
    }

    fn read_error(&mut self, e: ReadError, command: &str, started: Instant) -> Error {
        match e {
            ReadError::Wait(e) => self.wait_error(e, command, started),
            ReadError::TooLong => {
                self.synced = false;
                Error::ReplyTooLong {
                    command: command.to_string(),
                    limit: self.max_reply,
                }
            }
        }
    }

    /// Reads more bytes into the buffer.
    fn fill(&mut self, deadline: Instant) -> Result<(), WaitError> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.stream.read_some(&mut chunk, deadline)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// The next non-empty line (without delimiters and the line end).
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, ReadError> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                self.scanned = 0;
                let line: Vec<u8> = line.into_iter().filter(|&b| b != DELIMITER).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(line);
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_reply {
                // Drop what we have; the rest of the line is dropped by the next sync.
                self.buf.clear();
                self.scanned = 0;
                return Err(ReadError::TooLong);
            }
            self.fill(deadline)?;
        }
    }

    /// Drops everything up to and including the next delimiter byte.
    fn skip_to_delimiter(&mut self, deadline: Instant) -> Result<(), WaitError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == DELIMITER) {
                self.buf.drain(..=pos);
                self.scanned = 0;
                return Ok(());
            }
            self.buf.clear();
            self.scanned = 0;
            self.fill(deadline)?;
        }
    }

    fn request<C: qapi_spec::Command>(command: C, id: i64) -> Vec<u8> {
        let execute = qapi_spec::Execute::<C, i64>::with_id(command, id);
        // Commands are plain data: serialising them cannot fail.
        let mut bytes = serde_json::to_vec(&execute).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    /// Resets the agent's parser and waits for the reply to a fresh
    /// `guest-sync-delimited`, skipping stale output; repeats while the agent is silent.
    fn handshake(&mut self, deadline: Instant, started: Instant) -> Result<(), Error> {
        const SYNC: &str = "guest-sync-delimited";
        let mut attempt = FIRST_SYNC_ATTEMPT;
        loop {
            // Only the newest sync counts: the agent answers in order, so once its reply
            // is here, every older reply has been read and skipped.
            let id = self.fresh_id();
            let mut message = vec![DELIMITER];
            message.extend(Self::request(qga::guest_sync_delimited { id }, id));
            self.stream
                .write_all(&message, deadline)
                .map_err(|e| self.wait_error(e, SYNC, started))?;
            let attempt_deadline = deadline.min(Instant::now() + attempt);
            match self.await_sync(id, attempt_deadline) {
                Ok(()) => {
                    self.synced = true;
                    return Ok(());
                }
                Err(ReadError::Wait(WaitError::Timeout)) if Instant::now() < deadline => {
                    attempt = (attempt * 2).min(MAX_SYNC_ATTEMPT);
                }
                Err(e) => return Err(self.read_error(e, SYNC, started)),
            }
        }
    }

    fn await_sync(&mut self, id: i64, deadline: Instant) -> Result<(), ReadError> {
        loop {
            self.skip_to_delimiter(deadline)?;
            let line = match self.read_line(deadline) {
                Ok(line) => line,
                // A runaway line after a stray delimiter: dropped, keep looking.
                Err(ReadError::TooLong) => continue,
                Err(e) => return Err(e),
            };
            if let Ok(Value::Object(reply)) = serde_json::from_slice::<Value>(&line) {
                if reply.get("return").and_then(Value::as_i64) == Some(id) {
                    return Ok(());
                }
            }
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

    fn send_and_await<C: qapi_spec::Command>(
        &mut self,
        command: C,
        deadline: Instant,
        started: Instant,
        reset_parser: bool,
    ) -> Result<C::Ok, Error> {
        let id = self.fresh_id();
        let mut message = Vec::new();
        if reset_parser {
            // Ends whatever half request a timed-out write may have left; the agent
            // answers the stray byte with an error without our id, which is skipped.
            message.push(DELIMITER);
        }
        message.extend(Self::request(command, id));
        self.stream
            .write_all(&message, deadline)
            .map_err(|e| self.wait_error(e, C::NAME, started))?;
        let reply = self.await_reply(id, C::NAME, deadline, started)?;
        self.decode::<C>(reply)
    }

    fn await_reply(
        &mut self,
        id: i64,
        command: &str,
        deadline: Instant,
        started: Instant,
    ) -> Result<Value, Error> {
        loop {
            let line = self
                .read_line(deadline)
                .map_err(|e| self.read_error(e, command, started))?;
            let value: Value = match serde_json::from_slice(&line) {
                Ok(value) => value,
                Err(source) => {
                    self.synced = false;
                    return Err(Error::Protocol {
                        command: command.to_string(),
                        detail: format!("not JSON: {}", excerpt(&line)),
                        source: Some(source),
                    });
                }
            };
            match value.get("id") {
                Some(v) if v.as_i64() == Some(id) => return Ok(value),
                // A reply to someone else's request, or to one of ours that timed out.
                _ => continue,
            }
        }
    }

    fn decode<C: qapi_spec::Command>(&mut self, reply: Value) -> Result<C::Ok, Error> {
        if let Some(error) = reply.get("error") {
            let agent = AgentError {
                class: error
                    .get("class")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                desc: error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            };
            return Err(Error::from_agent(C::NAME, agent));
        }
        let text = excerpt(reply.to_string().as_bytes());
        match serde_json::from_value::<qapi_spec::Response<C::Ok>>(reply) {
            Ok(response) => response.result().map_err(|e| {
                Error::from_agent(
                    C::NAME,
                    AgentError {
                        class: format!("{:?}", e.class),
                        desc: e.desc,
                    },
                )
            }),
            Err(source) => Err(Error::Protocol {
                command: C::NAME.to_string(),
                detail: format!("unexpected reply {text}"),
                source: Some(source),
            }),
        }
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

    /// Runs `path args…` in the guest (`guest-exec`, output captured) and polls
    /// `guest-exec-status` until it exits or `timeout` passes.
    ///
    /// A program still running at the timeout is left running (the agent has no kill).
    pub fn guest_exec(
        &mut self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecResult, Error> {
        let started = Instant::now();
        let deadline = started + timeout;
        let command = qga::guest_exec {
            path: path.to_string(),
            arg: Some(args.iter().map(|a| a.to_string()).collect()),
            env: None,
            input_data: None,
            capture_output: Some(qga::GuestExecCaptureOutput::flag(true)),
        };
        let pid = self.execute_within(command, timeout)?.pid;
        let mut pause = Duration::from_millis(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error(&format!("guest-exec {path} (pid {pid})"), started));
            }
            let status = self.execute_within(qga::guest_exec_status { pid }, left)?;
            if status.exited {
                return Ok(ExecResult {
                    exitcode: status.exitcode,
                    signal: status.signal,
                    stdout: status.out_data.unwrap_or_default(),
                    stderr: status.err_data.unwrap_or_default(),
                    stdout_truncated: status.out_truncated.unwrap_or(false),
                    stderr_truncated: status.err_truncated.unwrap_or(false),
                });
            }
            std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

/// The start of a reply, for messages.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 120;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    if bytes.len() > MAX {
        format!("{text:?}…")
    } else {
        format!("{text:?}")
    }
}

pub(crate) fn fmt_seconds(d: Duration) -> String {
    seconds(d)
}
