//! A non-blocking stream socket to the agent with deadlines on every operation, and the
//! hybrid vsock handshake (`CONNECT <port>\n` → `OK <n>\n`) that opens a guest port
//! through a userspace vsock device's Unix socket.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, VsockAddr};

use super::Address;

/// How a wait on the socket ended without data.
#[derive(Debug)]
pub(crate) enum WaitError {
    /// The deadline passed.
    Timeout,
    /// The socket failed or the peer closed it.
    Io(io::Error),
}

impl From<io::Error> for WaitError {
    fn from(e: io::Error) -> Self {
        WaitError::Io(e)
    }
}

impl From<Errno> for WaitError {
    fn from(e: Errno) -> Self {
        WaitError::Io(e.into())
    }
}

/// The longest hybrid vsock reply line accepted (`OK 4294967295`, with room to spare).
const MAX_HYBRID_REPLY: usize = 64;

/// A hybrid vsock device that did not open the guest port: it closed the connection
/// (nothing listens on the port in the guest, or the guest is not running) or answered
/// something other than `OK <n>`.
#[derive(Debug, thiserror::Error)]
#[error("{} did not open guest vsock port {port}: {}", path.display(), if reply.is_empty() {
    "it closed the connection without OK (nothing listens on that port in the guest?)".to_string()
} else {
    format!("it answered {reply:?} instead of OK <n>")
})]
pub(crate) struct HybridRefused {
    pub path: PathBuf,
    pub port: u32,
    pub reply: String,
}

/// Whether `error` is a hybrid vsock device's refusal of a guest port: the device (and so
/// the VM) is there, the port in the guest does not answer (its agent restarting, the VM
/// paused).
pub(crate) fn is_hybrid_refusal(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<HybridRefused>())
}

/// A connected stream socket (AF_UNIX or AF_VSOCK), non-blocking, close-on-exec.
#[derive(Debug)]
pub(crate) struct Stream {
    fd: OwnedFd,
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Waits until `fd` has `events` or the deadline passes. Interrupted waits resume.
fn wait(fd: &OwnedFd, events: PollFlags, deadline: Instant) -> Result<PollFlags, WaitError> {
    loop {
        let Some(left) = remaining(deadline) else {
            return Err(WaitError::Timeout);
        };
        // Round up so that a sub-millisecond remainder still waits instead of spinning.
        let millis = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let timeout = PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd.as_fd(), events)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => return Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Stream {
    /// Opens a connection; fails with the socket error (ENOENT, ECONNREFUSED, …) or
    /// [`WaitError::Timeout`] when a vsock connect (or a hybrid vsock `CONNECT`) does not
    /// complete by the deadline. A hybrid vsock device that does not answer `OK` (nothing
    /// listens on the port in the guest) is an [`io::ErrorKind::ConnectionRefused`] error
    /// carrying a [`HybridRefused`].
    pub(crate) fn connect(address: &Address, deadline: Instant) -> Result<Stream, WaitError> {
        let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
        let (fd, result) = match address {
            Address::Unix(path) | Address::HybridVsock { path, .. } => {
                let addr = UnixAddr::new(path.as_path())?;
                let fd = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
                let result = socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr);
                (fd, result)
            }
            Address::Vsock { cid, port } => {
                let addr = VsockAddr::new(*cid, *port);
                let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, flags, None)?;
                let result = socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr);
                (fd, result)
            }
        };
        match result {
            Ok(()) => {}
            Err(Errno::EINPROGRESS) | Err(Errno::EINTR) => {
                wait(&fd, PollFlags::POLLOUT, deadline)?;
                let error = socket::getsockopt(&fd, socket::sockopt::SocketError)?;
                if error != 0 {
                    return Err(WaitError::Io(io::Error::from_raw_os_error(error)));
                }
            }
            Err(e) => return Err(e.into()),
        }
        let stream = Stream { fd };
        if let Address::HybridVsock { path, port } = address {
            stream.hybrid_connect(path, *port, deadline)?;
        }
        Ok(stream)
    }

    /// Asks the hybrid vsock device for guest port `port`: `CONNECT <port>\n`, answered
    /// `OK <host port>\n`. The reply is read a byte at a time so that nothing of the guest's
    /// stream after it is consumed.
    fn hybrid_connect(&self, path: &Path, port: u32, deadline: Instant) -> Result<(), WaitError> {
        self.write_all(format!("CONNECT {port}\n").as_bytes(), deadline)?;
        let mut reply = Vec::new();
        let refused = |reply: &[u8]| {
            WaitError::Io(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                HybridRefused {
                    path: path.to_path_buf(),
                    port,
                    reply: String::from_utf8_lossy(reply).into_owned(),
                },
            ))
        };
        loop {
            let mut byte = [0u8];
            match self.read_some(&mut byte, deadline) {
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if reply.len() < MAX_HYBRID_REPLY => reply.push(byte[0]),
                Ok(_) => return Err(refused(&reply)),
                Err(WaitError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Err(refused(&reply))
                }
                Err(e) => return Err(e),
            }
        }
        match reply.strip_prefix(b"OK ") {
            Some(n) if !n.is_empty() && n.iter().all(u8::is_ascii_digit) => Ok(()),
            _ => Err(refused(&reply)),
        }
    }

    /// A stream over an already connected socket (tests use socket pairs).
    pub(crate) fn from_fd(fd: OwnedFd) -> io::Result<Stream> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Stream { fd })
    }

    /// Nothing to read and no hangup right now: a handed-over connection that is as its
    /// last owner left it (every reply read).
    pub(crate) fn is_quiet(&self) -> bool {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }

    /// The connected socket, for handing the connection to another process.
    pub(crate) fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Writes all of `data` by the deadline.
    pub(crate) fn write_all(&self, mut data: &[u8], deadline: Instant) -> Result<(), WaitError> {
        while !data.is_empty() {
            match nix::unistd::write(&self.fd, data) {
                Ok(0) => return Err(WaitError::Io(io::ErrorKind::WriteZero.into())),
                Ok(n) => data = &data[n..],
                Err(Errno::EAGAIN) => {
                    let events = wait(&self.fd, PollFlags::POLLOUT, deadline)?;
                    if events.intersects(PollFlags::POLLERR | PollFlags::POLLNVAL)
                        && !events.contains(PollFlags::POLLOUT)
                    {
                        return Err(WaitError::Io(io::ErrorKind::BrokenPipe.into()));
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads what is available, waiting for at least one byte until the deadline.
    /// End of stream is an [`io::ErrorKind::UnexpectedEof`] error.
    pub(crate) fn read_some(&self, buf: &mut [u8], deadline: Instant) -> Result<usize, WaitError> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                Ok(0) => {
                    return Err(WaitError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the agent closed the connection",
                    )))
                }
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN) => {
                    wait(&self.fd, PollFlags::POLLIN, deadline)?;
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
