//! SIGINT, SIGTERM and SIGHUP become events a tool reads at its own pace, so a signal
//! never cuts a step in half: the tool thaws, runs what must run, reports, and exits. A
//! second signal is just another event: nothing skips the thaw. The one signal mechanism
//! of every tool (qga-freeze, snap-orchestrate and its listener).
//!
//! A signal also cancels [`Events::cancel`]'s token at once, from the signal thread, so a
//! call that watches it (a `zfs` call through [`Zfs::with_cancel`](crate::zfs::Zfs::with_cancel))
//! ends even while the tool's own thread is blocked in it.

use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cancel::Cancel;

/// Something a tool waits for: a signal, or a step running on a worker thread.
#[derive(Debug)]
pub enum Event<T> {
    Signal(i32),
    Done(T),
}

/// A tool's event queue; signals arrive in it from installation on.
#[derive(Debug)]
pub struct Events<T> {
    tx: Sender<Event<T>>,
    rx: Receiver<Event<T>>,
    /// The first signal seen, kept once read.
    pub interrupted: Option<i32>,
    /// Cancelled by the first signal.
    cancel: Cancel,
}

impl<T: Send + 'static> Events<T> {
    /// Starts catching the signals (their default action, dying, no longer happens).
    pub fn install() -> std::io::Result<Events<T>> {
        let (tx, rx) = mpsc::channel();
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        let cancel = Cancel::new()?;
        let forward = tx.clone();
        let on_signal = cancel.clone();
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            for signal in signals.forever() {
                crate::warn!("caught signal {signal}: finishing safely (the guest is thawed before exit)");
                on_signal.cancel();
                if forward.send(Event::Signal(signal)).is_err() {
                    break;
                }
            }
        })?;
        Ok(Events {
            tx,
            rx,
            interrupted: None,
            cancel,
        })
    }

    /// The token the first signal cancels (a clone shares it).
    pub fn cancel(&self) -> Cancel {
        self.cancel.clone()
    }

    /// A sender for a worker's result.
    pub fn sender(&self) -> Sender<Event<T>> {
        self.tx.clone()
    }

    /// True once a signal arrived (checked between steps, without waiting).
    pub fn poll_signal(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Event::Signal(s)) => {
                    self.interrupted.get_or_insert(s);
                }
                // Results are only awaited through `wait`; none is pending between steps.
                Ok(Event::Done(_)) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        self.interrupted.is_some()
    }

    /// The next event; signals are also remembered in `interrupted`.
    pub fn wait(&mut self) -> Option<Event<T>> {
        let event = self.rx.recv().ok()?;
        if let Event::Signal(s) = event {
            self.interrupted.get_or_insert(s);
        }
        Some(event)
    }

    /// Like [`wait`](Self::wait), but gives up after `timeout`.
    pub fn wait_timeout(&mut self, timeout: std::time::Duration) -> Option<Event<T>> {
        let event = self.rx.recv_timeout(timeout).ok()?;
        if let Event::Signal(s) = event {
            self.interrupted.get_or_insert(s);
        }
        Some(event)
    }
}
