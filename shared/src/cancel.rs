//! A cancel token: one side calls [`Cancel::cancel`] (a signal handler thread, an
//! orchestrator that thaws early), every call that watches the token stops as soon as it
//! can. Cloning shares the token. Cancelling is for good: a cancelled token stays
//! cancelled, and a call started through it afterwards stops at once.
//!
//! The waker is a pipe that gets one byte on the cancel and is never read: its read end
//! ([`Cancel::fd`]) stays readable from then on, so a waiter puts it into the same `poll`
//! as its own descriptors and wakes without a timer or a thread.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::fcntl::OFlag;

/// A shared, one-way cancel switch; see the module documentation.
#[derive(Debug, Clone)]
pub struct Cancel(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    cancelled: AtomicBool,
    wake_read: OwnedFd,
    wake_write: OwnedFd,
}

impl Cancel {
    /// A token that is not cancelled. Fails only when no file descriptor is left.
    pub fn new() -> io::Result<Cancel> {
        let (wake_read, wake_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Cancel(Arc::new(Inner {
            cancelled: AtomicBool::new(false),
            wake_read,
            wake_write,
        })))
    }

    /// Cancels: wakes every call waiting on this token and stops every later one. Idempotent;
    /// an atomic swap and one `write(2)`, so a signal handler may call it as well.
    pub fn cancel(&self) {
        if !self.0.cancelled.swap(true, Ordering::SeqCst) {
            // Cannot block (O_NONBLOCK) and cannot find the pipe full (one byte, once).
            let _ = nix::unistd::write(&self.0.wake_write, &[1]);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Readable once cancelled, for `poll` (never read it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.wake_read.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::time::Duration;

    fn readable(cancel: &Cancel, within: Duration) -> bool {
        let mut fds = [PollFd::new(cancel.fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(within).expect("short timeout");
        poll(&mut fds, timeout).expect("poll") == 1
    }

    #[test]
    fn cancel_wakes_a_waiter_in_another_thread_and_stays_cancelled() {
        let cancel = Cancel::new().expect("pipe");
        assert!(!cancel.is_cancelled());
        assert!(!readable(&cancel, Duration::ZERO));
        let remote = cancel.clone();
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            remote.cancel();
            remote.cancel();
        });
        assert!(readable(&cancel, Duration::from_secs(10)), "not woken");
        canceller.join().expect("canceller");
        assert!(cancel.is_cancelled());
        assert!(
            readable(&cancel, Duration::ZERO),
            "later waiters wake at once"
        );
    }
}
