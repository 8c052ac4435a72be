//! The keeper socket: the freezing tool hands its agent connection to the watchdog
//! ([`hand_over`]), the thaw takes it back ([`take_over`]), one line and at most one
//! descriptor (SCM_RIGHTS) each way. Why: see the [watchdog](super) documentation.
//!
//! It also lets the watchdog thaw at once when a pipeline breaks after the freeze instead
//! of at its deadline. A tool that wrote the document of a live freeze asks the watchdog
//! to [`watch`] the pipe it wrote it into: if the next step exits without reading it (a
//! mistyped command line, a crash), the watchdog thaws. A tool in the middle of the
//! pipeline ([`Relay`], zsnap) holds a connection from reading that document until it has
//! written its own (then has its own pipe watched), and the thaw (qga-thaw) from reading
//! it until its thaw is verified: if it dies in between, the connection closes unfinished
//! and the watchdog thaws. A watched pipe whose reader exits after reading and before it
//! registered (a step killed in that instant, or one that is not an evesnap tool) is
//! also thawed at once.

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
    let (socket, path) = connect(watchdog)?;
    request(
        &socket,
        &format!("hold {}\n", watchdog.token),
        Some(connection.as_fd()),
    )
    .map_err(|source| Error::Handover { path, source })
}

/// Takes the agent connection the watchdog for `address` keeps, if it keeps one.
pub fn take_over(address: &Address) -> Result<Option<OwnedFd>, Error> {
    Ok(ask_for_connection(address, "take")?.and_then(|(_, _, fd)| fd))
}

/// Sends `verb <token>` to the keeper of the watchdog armed for `address`, if one is
/// armed and listening, and reads its answer: `ok` with the kept connection, or `none`.
fn ask_for_connection(
    address: &Address,
    verb: &str,
) -> Result<Option<(UnixStream, Watchdog, Option<OwnedFd>)>, Error> {
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
    send_with_fd(&socket, &format!("{verb} {}\n", watchdog.token), None).map_err(handover)?;
    let (reply, fd) = receive_with_fd(&socket).map_err(handover)?;
    match reply.as_str() {
        "ok" => Ok(Some((socket, watchdog, fd))),
        "none" => Ok(Some((socket, watchdog, None))),
        other => Err(handover(io::Error::other(format!(
            "the watchdog answered {other:?}"
        )))),
    }
}

/// Sends one request and reads the watchdog's one-line answer, which must be `ok`.
fn request(socket: &UnixStream, line: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    send_with_fd(socket, line, fd)?;
    let (reply, _) = receive_with_fd(socket)?;
    if reply != "ok" {
        return Err(io::Error::other(format!("the watchdog answered {reply:?}")));
    }
    Ok(())
}

fn connect(watchdog: &Watchdog) -> Result<(UnixStream, PathBuf), Error> {
    let address: Address = watchdog.agent.parse().map_err(|e| Error::Handover {
        path: PathBuf::new(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let path = keeper_path(&address);
    let socket = UnixStream::connect(&path)
        .and_then(|s| s.set_read_timeout(Some(Duration::from_secs(2))).map(|()| s))
        .map_err(|source| Error::Handover {
            path: path.clone(),
            source,
        })?;
    Ok((socket, path))
}

/// Asks the watchdog to watch `pipe`, the write end of the pipe a document of this freeze
/// was just written into: if its reader exits without reading it, the watchdog thaws.
pub fn watch(watchdog: &Watchdog, pipe: BorrowedFd<'_>) -> Result<(), Error> {
    let (socket, path) = connect(watchdog)?;
    request(&socket, &format!("watch {}\n", watchdog.token), Some(pipe))
        .map_err(|source| Error::Handover { path, source })
}

/// A pipeline step after the freeze, registered with the freeze's watchdog from reading
/// its document until it passed its own on (zsnap) or verified its thaw (qga-thaw):
/// dropped without [`Relay::delivered`], the watchdog thaws at once.
#[derive(Debug)]
pub struct Relay {
    socket: UnixStream,
    path: PathBuf,
    token: String,
}

impl Relay {
    /// Registers as the relay of `watchdog`'s freeze.
    pub fn start(watchdog: &Watchdog) -> Result<Relay, Error> {
        let (socket, path) = connect(watchdog)?;
        let relay = Relay {
            socket,
            path,
            token: watchdog.token.clone(),
        };
        request(&relay.socket, &format!("relay {}\n", relay.token), None)
            .map_err(|e| relay.error(e))?;
        Ok(relay)
    }

    /// Registers a thaw of the freeze armed for `address` as its relay, and takes the
    /// agent connection the watchdog keeps, if it keeps one: should the thaw end before it
    /// is verified, the watchdog thaws at once. `None`: no watchdog is armed and listening.
    pub fn thaw(address: &Address) -> Result<Option<(Relay, Option<OwnedFd>)>, Error> {
        let Some((socket, watchdog, fd)) = ask_for_connection(address, "thaw")? else {
            return Ok(None);
        };
        let relay = Relay {
            socket,
            path: keeper_path(address),
            token: watchdog.token,
        };
        Ok(Some((relay, fd)))
    }

    fn error(&self, source: io::Error) -> Error {
        Error::Handover {
            path: self.path.clone(),
            source,
        }
    }

    /// This step's document was written into `pipe` (watched from now on; `None` when
    /// stdout is not a pipe): the relay is done.
    pub fn delivered(self, pipe: Option<BorrowedFd<'_>>) -> Result<(), Error> {
        if let Some(pipe) = pipe {
            request(&self.socket, &format!("watch {}\n", self.token), Some(pipe))
                .map_err(|e| self.error(e))?;
        }
        request(&self.socket, &format!("done {}\n", self.token), None).map_err(|e| self.error(e))
    }
}

/// What a keeper request asks the watchdog loop to do.
pub(super) enum Asked {
    Nothing,
    /// Watch this pipe (see [`watch`]).
    Watch(OwnedFd),
    /// Keep this connection: a [`Relay`].
    Relay(UnixStream),
}

/// Serves one keeper connection: `hold <token>` (with a descriptor), `take <token>`,
/// `watch <token>` (with a pipe), `relay <token>` or `thaw <token>` (a take by a relay).
pub(super) fn serve_keeper(
    listener: &UnixListener,
    token: &str,
    held: &mut Option<(OwnedFd, Instant)>,
) -> Asked {
    let Ok((socket, _)) = listener.accept() else {
        return Asked::Nothing;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = socket.set_write_timeout(Some(Duration::from_secs(2)));
    let Ok((line, fd)) = receive_with_fd(&socket) else {
        return Asked::Nothing;
    };
    let mut asked = Asked::Nothing;
    let reply = match (line.split_once(' '), fd) {
        (Some(("hold", t)), Some(fd)) if t == token => {
            *held = Some((fd, Instant::now()));
            send_with_fd(&socket, "ok\n", None)
        }
        (Some(("take", t)), None) if t == token => match held.take() {
            Some((fd, _)) => send_with_fd(&socket, "ok\n", Some(fd.as_fd())),
            None => send_with_fd(&socket, "none\n", None),
        },
        (Some(("watch", t)), Some(fd)) if t == token => {
            asked = Asked::Watch(fd);
            send_with_fd(&socket, "ok\n", None)
        }
        (Some(("thaw", t)), None) if t == token => {
            let sent = match held.take() {
                Some((fd, _)) => send_with_fd(&socket, "ok\n", Some(fd.as_fd())),
                None => send_with_fd(&socket, "none\n", None),
            };
            if sent.is_ok() {
                asked = Asked::Relay(socket);
            }
            sent
        }
        (Some(("relay", t)), None) if t == token => {
            let sent = send_with_fd(&socket, "ok\n", None);
            if sent.is_ok() {
                asked = Asked::Relay(socket);
            }
            sent
        }
        _ => send_with_fd(&socket, "refused\n", None),
    };
    if let Err(e) = reply {
        crate::warn!("watchdog keeper: {e}");
    }
    asked
}

/// A message on a relay's connection: `watch` (with a pipe), `done`, or the end of the
/// connection, which means the relay died before it was done.
pub(super) enum RelaySaid {
    Watch(OwnedFd),
    Done,
    Died,
    Other,
}

/// Reads one message from a relay and answers it.
pub(super) fn read_relay(relay: &UnixStream, token: &str) -> RelaySaid {
    let (line, fd) = match receive_with_fd(relay) {
        Ok((line, _)) if line.is_empty() => return RelaySaid::Died,
        Ok(message) => message,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return RelaySaid::Other,
        Err(_) => return RelaySaid::Died,
    };
    let said = match (line.split_once(' '), fd) {
        (Some(("watch", t)), Some(fd)) if t == token => RelaySaid::Watch(fd),
        (Some(("done", t)), None) if t == token => RelaySaid::Done,
        _ => {
            let _ = send_with_fd(relay, "refused\n", None);
            return RelaySaid::Other;
        }
    };
    let _ = send_with_fd(relay, "ok\n", None);
    said
}
