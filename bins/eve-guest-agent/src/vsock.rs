//! A vsock connection from the guest to the host, made by a deadline.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};

use crate::channel::{poll, Error, HOST_POLL};

/// Errors of a guest that has no way to the host over vsock at all (no device, no driver).
fn no_transport(e: Errno) -> bool {
    matches!(
        e,
        Errno::EAFNOSUPPORT
            | Errno::ENODEV
            | Errno::EADDRNOTAVAIL
            | Errno::ENETUNREACH
            | Errno::EHOSTUNREACH
            | Errno::ESOCKTNOSUPPORT
    )
}

/// Errors of a host that is there but has no listener on the port (yet).
fn no_listener(e: Errno) -> bool {
    matches!(
        e,
        Errno::ECONNRESET | Errno::ECONNREFUSED | Errno::ETIMEDOUT
    )
}

/// One attempt: the connected socket, or why not (`Ok(Err)`: try again).
fn attempt(cid: u32, port: u32, deadline: Instant) -> Result<Result<OwnedFd, Errno>, Error> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket::socket(AddressFamily::Vsock, SockType::Stream, flags, None)
        .map_err(|e| Error::NoVsock(e.into()))?;
    match socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
        Ok(()) => return Ok(Ok(fd)),
        Err(Errno::EINPROGRESS) | Err(Errno::EINTR) => {}
        Err(e) => return Ok(Err(e)),
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let events = poll(&fd, PollFlags::POLLOUT, left).map_err(Error::Io)?;
    if events.is_empty() {
        return Ok(Err(Errno::ETIMEDOUT));
    }
    match socket::getsockopt(&fd, socket::sockopt::SocketError).map_err(|e| Error::Io(e.into()))? {
        0 => Ok(Ok(fd)),
        errno => Ok(Err(Errno::from_raw(errno))),
    }
}

/// Connects to `cid`:`port`, retrying while the host has no listener there, until
/// `deadline`.
pub fn connect(cid: u32, port: u32, deadline: Instant) -> Result<OwnedFd, Error> {
    let started = Instant::now();
    loop {
        match attempt(cid, port, deadline)? {
            Ok(fd) => return Ok(fd),
            Err(e) if no_transport(e) => return Err(Error::NoVsock(io::Error::from(e))),
            Err(e) if no_listener(e) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::NoVsockListener {
                        cid,
                        port,
                        after: started.elapsed(),
                    });
                }
                std::thread::sleep(HOST_POLL.min(left));
            }
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
}
