//! The freeze window of a create: the snapshot on a worker thread while the freeze is
//! verified, and the early thaw when zfs hangs, a signal comes or the freeze did not verify.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use evesnap::cancel::Cancel;
use evesnap::exit::{chain, coded, HasExit};
use evesnap::qga::Client;
use evesnap::signals::{Event, Events};
use evesnap::steps::FreezeReport;
use evesnap::zfs::Zfs;

use super::{thaw_step, Run, SIGNAL_GRACE};

impl Run<'_> {
    /// The snapshot inside the freeze window, on a worker thread so that neither a hung
    /// zfs nor a signal keeps the guest frozen: the thaw follows as soon as `zfs snapshot`
    /// returns, or after the agent timeout (after [`SIGNAL_GRACE`] once a signal came) at
    /// the latest. The freeze is verified while `zfs snapshot` runs, which keeps that round
    /// trip out of the window. A snapshot that returns only after an early thaw (the
    /// freeze did not verify, zfs hung, a signal) is destroyed: it may postdate the thaw.
    pub(super) fn take_while_frozen<'z>(
        &mut self,
        client: &mut Client,
        prepared: &mut zsnap::PreparedSnapshot<'z>,
        window_zfs: &'z Zfs,
        window: &Cancel,
        frozen: &FreezeReport,
    ) -> WhileFrozen {
        // Not the run's view, which a signal cancels at once: the grace below decides.
        prepared.use_zfs(window_zfs);
        let prepared = &*prepared;
        let sender = self.events.sender();
        let Run {
            events,
            report,
            timeout,
            zfs,
            plan,
            ..
        } = self;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let _ = sender.send(Event::Done(prepared.take()));
            });
            if let Err(e) = qga_freeze::verify_frozen(client, frozen, *timeout) {
                // verify_frozen thawed already; its aftermath says whether that worked.
                let thawed = match e.aftermath() {
                    Some(a) if a.possibly_frozen => None,
                    _ => Some(evesnap::time::now_unix_us()),
                };
                let exit = e.exit();
                window.cancel();
                let destroyed = destroy_late(events, zfs);
                let error = evesnap::exit::wrap(e).context(format!(
                    "the freeze did not verify, so the snapshot taken meanwhile cannot be trusted and was \
                     destroyed ({destroyed})"
                ));
                let (thawed, taken) = match thawed {
                    Some(at) => (Ok(at), error),
                    // The guest may still be frozen: that is the run's outcome, with the code
                    // the freeze step gives it; the snapshot's step only tells the same story.
                    None => {
                        let told = coded(exit, chain(&error));
                        (Err(error), told)
                    }
                };
                return WhileFrozen {
                    thawed: Some(thawed),
                    taken: Err(taken),
                    unverified: true,
                };
            }
            // A zfs that hangs must not keep the guest frozen: the snapshot gets the same
            // time as an agent call, a signal shortens that to the grace. Never longer than
            // the watchdog's deadline: while this holds the agent's one connection, the
            // watchdog cannot get through to thaw.
            let started = Instant::now();
            let limit = match plan.freeze.thaw_after_s {
                t if t > 0.0 => (*timeout).min(Duration::from_secs_f64(t)),
                _ => *timeout,
            };
            let mut deadline = started + limit;
            let mut why = format!(
                "`zfs snapshot` did not return within {:.1} s",
                limit.as_secs_f64()
            );
            loop {
                match events.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Some(Event::Done(result)) => {
                        return WhileFrozen {
                            taken: result.map_err(evesnap::exit::wrap),
                            thawed: None,
                            unverified: false,
                        }
                    }
                    Some(Event::Signal(signal)) => cut_short(signal, &mut deadline, &mut why),
                    None => {
                        if Instant::now() < deadline {
                            continue;
                        }
                        let thawed = thaw_step(report, client, *timeout, frozen);
                        // What it makes from now on postdates the thaw: stop it.
                        window.cancel();
                        let destroyed = destroy_late(events, zfs);
                        let error = anyhow!(
                            "{why}: the guest was thawed without waiting for it, and what it created later was \
                             destroyed, since it may postdate the thaw ({destroyed})"
                        );
                        return WhileFrozen {
                            taken: Err(error),
                            thawed: Some(thawed),
                            unverified: false,
                        };
                    }
                }
            }
        })
    }
}

/// What [`Run::take_while_frozen`] ended with.
pub(super) struct WhileFrozen {
    pub(super) taken: Result<zsnap::Taken, anyhow::Error>,
    /// Set when the guest was thawed before the snapshot was waited for: when that thaw
    /// returned (µs since the epoch), or why it may not have worked.
    pub(super) thawed: Option<Result<u64, anyhow::Error>>,
    /// The freeze did not verify (`taken` holds why).
    pub(super) unverified: bool,
}

/// After an early thaw: waits for the snapshot worker (cancelled, so it ends at once) and
/// destroys what it created, since it may postdate the thaw. A signal does not stop this
/// cleanup; each call's deadline bounds it. Says what was destroyed.
pub(super) fn destroy_late(events: &mut Events<super::TakeResult>, zfs: &Zfs) -> String {
    let zfs = zfs.for_cleanup();
    // No result (the worker is gone): it created nothing. A cut-short take destroyed what
    // its call created all the same itself (zsnap's undo): that is what was destroyed.
    let created = loop {
        match events.wait() {
            Some(Event::Done(Ok(taken))) => break taken.created,
            Some(Event::Done(Err(evesnap::zfs::Error::Partial { undone, .. }))) => {
                return described(&undone)
            }
            Some(Event::Done(Err(_))) | None => break Vec::new(),
            Some(Event::Signal(_)) => {}
        }
    };
    let mut destroyed = Vec::new();
    for snapshot in &created {
        match zfs.destroy_snapshot(snapshot) {
            Ok(()) => destroyed.push(snapshot.clone()),
            Err(e) => evesnap::warn!("cannot destroy {snapshot}, taken after an early thaw: {e}"),
        }
    }
    described(&destroyed)
}

fn described(destroyed: &[String]) -> String {
    if destroyed.is_empty() {
        "nothing".to_string()
    } else {
        destroyed.join(", ")
    }
}

/// A signal while `zfs snapshot` runs in the freeze window: the thaw comes at most
/// [`SIGNAL_GRACE`] from now (the one rule for one VM and for a group).
pub(super) fn cut_short(signal: i32, deadline: &mut Instant, why: &mut String) {
    let grace = Instant::now() + SIGNAL_GRACE;
    if grace < *deadline {
        *deadline = grace;
        *why = format!(
            "interrupted by signal {signal} while `zfs snapshot` ran, which did not return within {} s",
            SIGNAL_GRACE.as_secs()
        );
    }
}
