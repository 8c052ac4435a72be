//! What the watchdog knows of the pipeline after the freeze: the pipe the last document
//! was written into and the steps registered as relays ([`super::Relay`]). It thaws at
//! once when a document is left unread by a reader that exits, when a reader exits after
//! reading without registering (it died before it could pass the document on or thaw),
//! or when a relay ends without saying it is done.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

/// How long an unread document's pipe is watched: its reader takes the document in at
/// once, or exits without it (a mistyped command line) at once. A reader that is alive and
/// does not read is left to the deadline.
pub const WATCH_FOR: Duration = Duration::from_secs(2);

/// How long a pipe whose document was read is still watched for its reader's exit, unless
/// the reader registers first (`zsnap` and `qga-thaw` do, right after reading). It is also
/// how long a reader that reads to the end of the pipe (`| cat`, `$(…)`) waits for that
/// end: the watchdog holds a copy of the write end while it watches.
pub const WATCH_READ_FOR: Duration = Duration::from_millis(500);

/// What is in a pipe, seen from its write end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipeState {
    /// Bytes written and not read yet.
    pub unread: usize,
    /// No process has the read end open any more.
    pub reader_gone: bool,
}

/// Looks at the pipe whose write end is `pipe`, without waiting.
pub fn pipe_state(pipe: impl AsFd) -> PipeState {
    let fd = pipe.as_fd();
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    let reader_gone = nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok()
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP));
    let unread = rustix::io::ioctl_fionread(fd).map_or(0, |n| n as usize);
    PipeState {
        unread,
        reader_gone,
    }
}

/// What became of a document written into a pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Its reader took all of it in.
    Read,
    /// Its reader exited and left this many bytes unread.
    Unread(usize),
    /// Neither, yet.
    Pending,
}

/// Waits at most `limit` until the document just written into the pipe `pipe` (its write
/// end) was read, or its reader exited without reading it. Returns as soon as it was
/// read: it looks at once, then after 20 µs, doubling up to 5 ms.
pub fn await_read(pipe: impl AsFd, limit: Duration) -> Delivery {
    let started = Instant::now();
    let mut pause = Duration::from_micros(20);
    loop {
        match pipe_state(pipe.as_fd()) {
            PipeState { unread: 0, .. } => return Delivery::Read,
            PipeState {
                unread,
                reader_gone: true,
            } => return Delivery::Unread(unread),
            PipeState { .. } if started.elapsed() >= limit => return Delivery::Pending,
            PipeState { .. } => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
        }
    }
}

/// A pipe holding a document of this freeze, watched until a later step holds the freeze.
struct Watched {
    pipe: OwnedFd,
    since: Instant,
    /// When it was first seen read.
    read_at: Option<Instant>,
    /// A relay registered after its document was written: a later step holds the freeze.
    taken: bool,
}

/// A registered relay and its place in the order of registration.
struct Relay {
    socket: UnixStream,
    seq: u64,
}

/// The watched pipe and the relays.
#[derive(Default)]
pub(super) struct Pipeline {
    watched: Option<Watched>,
    relays: Vec<Relay>,
    registered: u64,
}

impl Pipeline {
    /// Whether anything needs a look every tick.
    pub(super) fn busy(&self) -> bool {
        self.watched.is_some() || !self.relays.is_empty()
    }

    /// The relays' sockets, to poll.
    pub(super) fn relay_sockets(&self) -> impl Iterator<Item = &UnixStream> {
        self.relays.iter().map(|r| &r.socket)
    }

    /// Watches `pipe`, written by the relay at `relay` (an index into
    /// [`relay_sockets`](Self::relay_sockets)) or by the freezing tool (`None`). A relay
    /// registered after that writer did was its reader, or a step after it.
    pub(super) fn watch(&mut self, pipe: OwnedFd, relay: Option<usize>) {
        let after = relay.and_then(|i| self.relays.get(i)).map_or(0, |r| r.seq);
        self.watched = Some(Watched {
            pipe,
            since: Instant::now(),
            read_at: None,
            taken: self.registered > after,
        });
    }

    pub(super) fn register(&mut self, socket: UnixStream) {
        self.registered += 1;
        self.relays.push(Relay {
            socket,
            seq: self.registered,
        });
        if let Some(watched) = &mut self.watched {
            watched.taken = true;
        }
    }

    /// The relay at `index` is done (its document is out, or its thaw was verified).
    pub(super) fn done(&mut self, index: usize) {
        if index < self.relays.len() {
            self.relays.remove(index);
        }
    }

    /// Looks at the watched pipe: `Err` says why the pipeline broke.
    pub(super) fn look(&mut self) -> Result<(), String> {
        let Some(watched) = &mut self.watched else {
            return Ok(());
        };
        let state = pipe_state(&watched.pipe);
        let verdict = match state {
            PipeState {
                unread: 0,
                reader_gone,
            } => {
                let read_at = *watched.read_at.get_or_insert_with(Instant::now);
                match (watched.taken, reader_gone) {
                    (false, true) => Some(Err(
                        "the next step of the pipeline read the document and exited before \
                         passing it on or thawing"
                            .to_string(),
                    )),
                    (true, _) => Some(Ok(())),
                    (false, false) => (read_at.elapsed() > WATCH_READ_FOR).then_some(Ok(())),
                }
            }
            PipeState {
                unread,
                reader_gone: true,
            } => Some(Err(format!(
                "the next step of the pipeline exited without reading the document ({unread} bytes unread)"
            ))),
            PipeState { .. } => (watched.since.elapsed() > WATCH_FOR).then_some(Ok(())),
        };
        match verdict {
            Some(result) => {
                self.watched = None;
                result
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        nix::unistd::pipe().expect("pipe")
    }

    #[test]
    fn a_document_read_by_a_reader_that_exits_unregistered_breaks_the_pipeline() {
        let (read, write) = pipe();
        let mut pipeline = Pipeline::default();
        pipeline.watch(write.try_clone().expect("dup"), None);
        nix::unistd::write(&write, b"{}\n").expect("write");
        assert_eq!(pipe_state(&write).unread, 3);
        assert_eq!(pipeline.look(), Ok(()));
        assert!(pipeline.busy(), "still watched while unread");
        let mut buf = [0u8; 3];
        nix::unistd::read(&read, &mut buf).expect("read");
        assert_eq!(pipeline.look(), Ok(()));
        assert!(pipeline.busy(), "still watched after it was read");
        drop(read);
        assert!(pipeline
            .look()
            .is_err_and(|e| e.contains("read the document")));
        assert!(!pipeline.busy());
    }

    #[test]
    fn a_reader_that_registers_takes_the_freeze_and_ends_the_watch() {
        let (read, write) = pipe();
        let mut pipeline = Pipeline::default();
        pipeline.watch(write, None);
        let (socket, _peer) = UnixStream::pair().expect("pair");
        pipeline.register(socket);
        assert_eq!(pipeline.look(), Ok(()));
        drop(read);
        assert_eq!(pipeline.look(), Ok(()), "no longer watched");
        assert_eq!(pipeline.relay_sockets().count(), 1);
        pipeline.done(0);
        assert!(!pipeline.busy());
    }

    #[test]
    fn a_relays_pipe_is_taken_only_by_a_relay_registered_after_it() {
        let (zsnap, _a) = UnixStream::pair().expect("pair");
        let (thaw, _b) = UnixStream::pair().expect("pair");
        let mut pipeline = Pipeline::default();
        pipeline.register(zsnap);
        let (read, write) = pipe();
        pipeline.watch(write.try_clone().expect("dup"), Some(0));
        drop(read);
        assert!(
            pipeline.look().is_err(),
            "zsnap's own registration does not count"
        );
        // The thaw registered before zsnap asked for the watch: it read the document.
        pipeline.register(thaw);
        let (read, write) = pipe();
        pipeline.watch(write, Some(0));
        drop(read);
        assert_eq!(pipeline.look(), Ok(()));
    }

    #[test]
    fn await_read_returns_as_soon_as_the_document_is_read_or_left() {
        let (read, write) = pipe();
        assert_eq!(await_read(&write, Duration::ZERO), Delivery::Read);
        nix::unistd::write(&write, b"{}\n").expect("write");
        assert_eq!(
            await_read(&write, Duration::from_millis(30)),
            Delivery::Pending
        );
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let mut buf = [0u8; 3];
            nix::unistd::read(&read, &mut buf).expect("read");
            Instant::now()
        });
        assert_eq!(await_read(&write, Duration::from_secs(5)), Delivery::Read);
        let late = reader.join().expect("reader").elapsed();
        assert!(
            late < Duration::from_millis(100),
            "seen {late:?} after the read"
        );

        let (read, write) = pipe();
        nix::unistd::write(&write, b"{}\n").expect("write");
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(read);
        });
        assert_eq!(
            await_read(&write, Duration::from_secs(5)),
            Delivery::Unread(3)
        );
        reader.join().expect("reader");
    }

    #[test]
    fn an_unread_document_breaks_the_pipeline_when_its_reader_exits() {
        let (read, write) = pipe();
        nix::unistd::write(&write, b"{}\n").expect("write");
        let mut pipeline = Pipeline::default();
        pipeline.watch(write, None);
        drop(read);
        assert!(pipeline.look().is_err_and(|e| e.contains("3 bytes unread")));
    }
}
