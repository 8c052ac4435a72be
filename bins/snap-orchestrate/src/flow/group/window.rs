//! The group's freeze window: one snapshot of every VM's volumes on a worker thread while
//! each VM's freeze is verified in parallel; the early thaw of every VM when a required
//! VM's freeze does not verify, zfs hangs or a signal comes (as in the single-VM window).

use std::time::{Duration, Instant};

use anyhow::anyhow;
use evesnap::cancel::Cancel;
use evesnap::signals::{Event, Events};
use evesnap::zfs::Zfs;

use super::super::window::destroy_late;
use super::super::TakeResult;
use super::member::{in_parallel, Member};

/// What the window ended with: the snapshot, or why there is none (then every VM was
/// thawed and what the call created was destroyed).
pub(super) fn take_while_frozen(
    members: &mut [Member<'_>],
    prepared: &zsnap::PreparedSnapshot<'_>,
    events: &mut Events<TakeResult>,
    zfs: &Zfs,
    window: &Cancel,
    limit: Duration,
) -> Result<zsnap::Taken, anyhow::Error> {
    let sender = events.sender();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = sender.send(Event::Done(prepared.take()));
        });
        let started = Instant::now();
        in_parallel(members, Member::verify);
        let unverified = members
            .iter()
            .find(|m| m.required && m.error.is_some())
            .map(|m| m.run.plan.agent.clone());
        let mut deadline = started + limit;
        let mut why = match &unverified {
            Some(agent) => format!("the freeze of the VM behind {agent} did not verify"),
            None => format!(
                "`zfs snapshot` did not return within {:.1} s",
                limit.as_secs_f64()
            ),
        };
        if unverified.is_some() {
            deadline = Instant::now();
        }
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match events.wait_timeout(wait) {
                Some(Event::Done(result)) if unverified.is_none() => {
                    return result.map_err(evesnap::exit::wrap);
                }
                Some(Event::Done(result)) => {
                    // Taken, but the group failed: nothing is left.
                    let created = result.map(|t| t.created).unwrap_or_default();
                    in_parallel(members, Member::thaw);
                    let destroyed = destroy(zfs, &created);
                    return Err(anyhow!(
                        "{why}: every VM was thawed and the group's snapshot destroyed ({destroyed})"
                    ));
                }
                Some(Event::Signal(signal)) => {
                    super::super::window::cut_short(signal, &mut deadline, &mut why)
                }
                None => {
                    if Instant::now() < deadline {
                        continue;
                    }
                    in_parallel(members, Member::thaw);
                    window.cancel();
                    let destroyed = destroy_late(events, zfs);
                    return Err(anyhow!(
                        "{why}: every VM was thawed without waiting for the snapshot, and what it created \
                         was destroyed ({destroyed})"
                    ));
                }
            }
        }
    })
}

/// Destroys a snapshot set the group cannot keep; says what was destroyed.
fn destroy(zfs: &Zfs, created: &[String]) -> String {
    let zfs = zfs.for_cleanup();
    let mut destroyed = Vec::new();
    for snapshot in created {
        match zfs.destroy_snapshot(snapshot) {
            Ok(()) => destroyed.push(snapshot.clone()),
            Err(e) => evesnap::warn!("cannot destroy {snapshot} of a failed group: {e}"),
        }
    }
    if destroyed.is_empty() {
        "nothing".to_string()
    } else {
        destroyed.join(", ")
    }
}
