//! Listening for guests that connect, one connection per request: on the Unix socket
//! `<uds>_<port>` where a hybrid vsock device (vhost-device-vsock, Firecracker, Cloud
//! Hypervisor) delivers a guest's connection to the host (CID 2) on `<port>` — one VM's —
//! or on kernel AF_VSOCK, where the peer's CID names the VM ([`super::cids`]).
//!
//! Connections are taken one at a time (a request at a time, across all the VMs of the
//! listener): each gets one reply, then is closed; one that sends no complete line within
//! [`CONNECTION_IDLE`] is closed unanswered, so a guest cannot hold the listener.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

use super::cids::{vm_for, UnknownPeer};
use super::handle::{Server, Vm};
use super::rate::Guest;
use super::session::End;

/// How long a connection may stay without a complete request line.
pub const CONNECTION_IDLE: Duration = Duration::from_secs(10);
/// How often a listener waiting for a connection looks at the signals.
const ACCEPT_TICK: Duration = Duration::from_millis(250);

/// Waits up to [`ACCEPT_TICK`] for a connection; whether one is there.
fn readable(fd: &impl AsFd) -> std::io::Result<bool> {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, PollTimeout::from(ACCEPT_TICK.as_millis() as u16)) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Binds the hybrid vsock listener at `path`, replacing a socket file a dead listener left
/// (the caller holds the listener lock for the path); anything else there is refused.
pub fn bind_hybrid(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the one VM behind a hybrid vsock listener until a signal.
pub fn serve_hybrid(server: &mut Server, listener: &UnixListener) -> std::io::Result<()> {
    let mut guest = Guest::new(&server.rate);
    loop {
        if server.stop_requested() {
            return Ok(());
        }
        if !readable(listener)? {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                if let End::Stop = server.session(stream, true, &mut guest) {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => evesnap::warn!("accept on the vsock listener failed: {e}"),
        }
    }
}

/// Binds kernel AF_VSOCK port `port` on every CID of the host.
pub fn bind_vsock(port: u32) -> std::io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::bind(fd.as_raw_fd(), &VsockAddr::new(cid_any(), port))?;
    socket::listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

/// `VMADDR_CID_ANY`.
fn cid_any() -> u32 {
    u32::MAX
}

/// Takes ownership of a descriptor accept4 returned.
#[allow(unsafe_code)]
fn own_accepted(raw: std::os::fd::RawFd) -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: accept4 just installed `raw` in this process's table; no other owner exists,
    // and it is owned exactly once here.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Serves the VMs of `vms` on an AF_VSOCK listener until a signal; a connection is
/// served as the VM its peer CID names, a stranger's is closed unread.
pub fn serve_vsock(
    server: &mut Server,
    listener: &OwnedFd,
    vms: &BTreeMap<u32, Vm>,
) -> std::io::Result<()> {
    let mut guests: BTreeMap<u32, Guest> = BTreeMap::new();
    loop {
        if server.stop_requested() {
            return Ok(());
        }
        if !readable(listener)? {
            continue;
        }
        let fd = match socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(raw) => own_accepted(raw),
            Err(Errno::EAGAIN) | Err(Errno::EINTR) | Err(Errno::ECONNABORTED) => continue,
            Err(e) => {
                evesnap::warn!("accept on vsock failed: {e}");
                continue;
            }
        };
        let peer = match socket::getpeername::<VsockAddr>(fd.as_raw_fd()) {
            Ok(addr) => addr.cid(),
            Err(e) => {
                evesnap::warn!("a vsock connection without a peer address ({e}): closed");
                continue;
            }
        };
        match vm_for(vms, peer) {
            Ok(vm) => {
                server.vm = vm.clone();
                let rate = server.rate;
                let guest = guests.entry(peer).or_insert_with(|| Guest::new(&rate));
                if let End::Stop = server.session(std::fs::File::from(fd), true, guest) {
                    return Ok(());
                }
            }
            Err(UnknownPeer(cid)) => {
                evesnap::warn!("{}", UnknownPeer(cid));
            }
        }
    }
}
