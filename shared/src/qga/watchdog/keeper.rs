//! The keeper socket: the freezing tool hands its agent connection to the watchdog
//! ([`hand_over`]), the thaw takes it back ([`take_over`]), one line and at most one
//! descriptor (SCM_RIGHTS) each way. Why: see the [watchdog](super) documentation.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

use super::{current, keeper_path, Error, Watchdog};
use crate::qga::Address;

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
pub(super) fn serve_keeper(
    listener: &UnixListener,
    token: &str,
    held: &mut Option<(OwnedFd, Instant)>,
) {
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
