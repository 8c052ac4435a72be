//! The guest end of the request channel: a vsock connection to the host (the default:
//! CID 2, one connection per request), the virtio-serial port (a character device), or a
//! Unix socket whose server plays the host (tests, and guests where a proxy listens).
//!
//! vsock: the connection is made by `deadline`; a host that resets it (nothing listens on
//! the port yet) is retried until then. A guest without a vsock device cannot open the
//! socket or reach CID 2 at all: that is told apart (exit 3 both).
//!
//! A virtio-serial port has no connection of its own: the Linux driver reports whether
//! the host end is open. While it is not, `poll` says `POLLHUP` and writes would block;
//! when the host closes its end, reads return 0. So: open non-blocking, wait for the port
//! to become writable (the host listener is there) within the connect timeout, write the
//! request, then read lines until the reply with our id arrives, the host goes away, or
//! the deadline passes. Lines that are not JSON, too long, or carry another id are
//! dropped.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use serde_json::Value;

use crate::target::Target;
use crate::vsock;

/// Pause between checks while the host end of the port is not open.
pub(crate) const HOST_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no request channel at {0} (is the VM configured with the port org.lfedge.eve.snapshot.0?)"
    )]
    Missing(PathBuf, #[source] io::Error),
    #[error("another request is using the channel {0}")]
    Busy(PathBuf),
    #[error("cannot open the request channel {0}")]
    Open(PathBuf, #[source] io::Error),
    #[error("no listener on the host end of {path} within {:.1}s", after.as_secs_f64())]
    NoListener { path: PathBuf, after: Duration },
    #[error("the host listener went away before answering (the request may or may not have been carried out)")]
    HostGone,
    #[error("no reply from the host within {:.1}s (it may still carry the request out)", after.as_secs_f64())]
    Timeout { after: Duration },
    #[error("the request channel failed")]
    Io(#[source] io::Error),
    #[error("no vsock transport to the host in this guest (does the VM have a vsock device?)")]
    NoVsock(#[source] io::Error),
    #[error("no listener on vsock port {port} of CID {cid} within {:.1}s", after.as_secs_f64())]
    NoVsockListener {
        cid: u32,
        port: u32,
        after: Duration,
    },
}

impl evesnap::exit::HasExit for Error {
    fn exit(&self) -> evesnap::exit::Exit {
        use evesnap::exit::Exit;
        match self {
            Error::Busy(_) => Exit::Busy,
            Error::Timeout { .. } => Exit::AgentTimeout,
            Error::Missing(..)
            | Error::Open(..)
            | Error::NoListener { .. }
            | Error::HostGone
            | Error::Io(_)
            | Error::NoVsock(_)
            | Error::NoVsockListener { .. } => Exit::AgentUnreachable,
        }
    }
}

/// An open channel to the host.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// Inside a line longer than the limit: drop up to its end.
    discarding: bool,
}

pub(crate) fn poll(fd: &OwnedFd, events: PollFlags, wait: Duration) -> io::Result<PollFlags> {
    let millis = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd.as_fd(), events)];
    loop {
        match nix::poll::poll(
            &mut fds,
            PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => return Ok(PollFlags::empty()),
            Ok(_) => return Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl Channel {
    /// Opens the channel to `target` and waits until the host end is there, by `deadline`.
    pub fn open(target: &Target, deadline: Instant) -> Result<Channel, Error> {
        match target {
            Target::Vsock { cid, port } => {
                Ok(Channel::over(vsock::connect(*cid, *port, deadline)?))
            }
            Target::Path(path) => Channel::open_path(path, deadline),
        }
    }

    fn over(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            buf: Vec::new(),
            discarding: false,
        }
    }

    /// Opens a virtio-serial port or a Unix socket.
    fn open_path(path: &Path, deadline: Instant) -> Result<Channel, Error> {
        let started = Instant::now();
        let is_socket = std::fs::metadata(path)
            .map_err(|e| Error::Missing(path.to_path_buf(), e))?
            .file_type()
            .is_socket();
        let fd: OwnedFd = if is_socket {
            let stream = std::os::unix::net::UnixStream::connect(path)
                .map_err(|e| Error::Open(path.to_path_buf(), e))?;
            stream.set_nonblocking(true).map_err(Error::Io)?;
            stream.into()
        } else {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).bits())
                .open(path)
                .map_err(|e| match e.raw_os_error().map(Errno::from_raw) {
                    // virtio_console lets one process at a time open a port.
                    Some(Errno::EBUSY) => Error::Busy(path.to_path_buf()),
                    Some(Errno::ENOENT) | Some(Errno::ENXIO) | Some(Errno::ENODEV) => {
                        Error::Missing(path.to_path_buf(), e)
                    }
                    _ => Error::Open(path.to_path_buf(), e),
                })?;
            file.into()
        };
        // Writable means the host end is open; POLLHUP alone means it is not (yet).
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let events = poll(&fd, PollFlags::POLLOUT, left.min(HOST_POLL)).map_err(Error::Io)?;
            if events.contains(PollFlags::POLLOUT) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::NoListener {
                    path: path.to_path_buf(),
                    after: started.elapsed(),
                });
            }
            if events.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                if is_socket {
                    return Err(Error::HostGone);
                }
                std::thread::sleep(HOST_POLL.min(left));
            }
        }
        Ok(Channel::over(fd))
    }

    /// Writes all of `data` by `deadline`.
    pub fn send(&mut self, mut data: &[u8], deadline: Instant) -> Result<(), Error> {
        let started = Instant::now();
        while !data.is_empty() {
            match nix::unistd::write(&self.fd, data) {
                Ok(n) => data = &data[n..],
                Err(Errno::EAGAIN) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout {
                            after: started.elapsed(),
                        });
                    }
                    let events = poll(&self.fd, PollFlags::POLLOUT, left.min(HOST_POLL))
                        .map_err(Error::Io)?;
                    if events.contains(PollFlags::POLLHUP) && !events.contains(PollFlags::POLLOUT) {
                        return Err(Error::HostGone);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(Error::HostGone),
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
        Ok(())
    }

    /// Reads lines until one is a JSON object whose `id` is `id`; returns it.
    pub fn await_reply(
        &mut self,
        id: &str,
        max_line: usize,
        deadline: Instant,
    ) -> Result<Value, Error> {
        let started = Instant::now();
        loop {
            while let Some(line) = self.next_line(max_line) {
                if let Ok(value @ Value::Object(_)) = serde_json::from_slice::<Value>(&line) {
                    if value.get("id").and_then(Value::as_str) == Some(id) {
                        return Ok(value);
                    }
                }
                // A stale reply, a reply to garbage, or garbage: not ours.
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    after: started.elapsed(),
                });
            }
            let events = poll(&self.fd, PollFlags::POLLIN, left).map_err(Error::Io)?;
            if events.contains(PollFlags::POLLIN) {
                let mut chunk = [0u8; 64 * 1024];
                match nix::unistd::read(&self.fd, &mut chunk) {
                    Ok(0) => return Err(Error::HostGone),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
                    Err(Errno::ECONNRESET) => return Err(Error::HostGone),
                    Err(e) => return Err(Error::Io(e.into())),
                }
            } else if events.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                return Err(Error::HostGone);
            }
        }
    }

    /// The next complete line in the buffer, dropping lines longer than `max_line`.
    fn next_line(&mut self, max_line: usize) -> Option<Vec<u8>> {
        loop {
            match self.buf.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let line: Vec<u8> = self.buf.drain(..=end).collect();
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    return Some(line.to_vec());
                }
                None => {
                    if self.buf.len() > max_line {
                        self.buf.clear();
                        self.discarding = true;
                    }
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    fn socket_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("evesnap-chan-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn stale_replies_garbage_and_long_lines_are_skipped() {
        let dir = socket_dir("stale");
        let path = dir.join("host.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let host = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut got = [0u8; 256];
            let n = s.read(&mut got).expect("read request");
            s.write_all(b"{\"id\":\"old\",\"ok\":true}\n\xff\xfe garbage\n")
                .expect("write");
            s.write_all(&vec![b'x'; 300]).expect("long");
            s.write_all(b"\n{\"id\":\"mine\"").expect("half");
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(b",\"ok\":false}\n").expect("rest");
            got[..n].to_vec()
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut channel = Channel::open(&Target::Path(path.clone()), deadline).expect("open");
        channel
            .send(b"\n{\"id\":\"mine\"}\n", deadline)
            .expect("send");
        let reply = channel.await_reply("mine", 100, deadline).expect("reply");
        assert_eq!(reply["ok"], false);
        assert_eq!(host.join().expect("host"), b"\n{\"id\":\"mine\"}\n");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_host_that_leaves_or_stays_silent_is_told_apart() {
        let dir = socket_dir("gone");
        let path = dir.join("host.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let host = std::thread::spawn(move || {
            let (first, _) = listener.accept().expect("accept");
            drop(first);
            let (second, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_millis(600));
            drop(second);
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut channel = Channel::open(&Target::Path(path.clone()), deadline).expect("open");
        let err = channel.await_reply("x", 100, deadline).expect_err("gone");
        assert!(matches!(err, Error::HostGone), "{err}");
        let mut channel = Channel::open(&Target::Path(path.clone()), deadline).expect("open");
        let err = channel
            .await_reply("x", 100, Instant::now() + Duration::from_millis(200))
            .expect_err("silent");
        assert!(matches!(err, Error::Timeout { .. }), "{err}");
        host.join().expect("host");
        let err = Channel::open(&Target::Path(dir.join("none")), deadline).expect_err("missing");
        assert!(matches!(err, Error::Missing(..)), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
