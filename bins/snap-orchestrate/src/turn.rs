//! Freeze windows on one pool take turns, node-wide.
//!
//! Every `zfs snapshot` waits for a sync of its pool's transaction group, and that sync
//! also writes whatever else the pool was asked meanwhile: other VMs' snapshots and
//! property writes. When several VMs of one pool are snapshotted at once (a fleet-wide
//! schedule, several apps), their windows overlap and each VM stays frozen for the others'
//! work too. Taken in turn, each window is as short as alone; a VM waits for its turn
//! before its freeze (the guest still writes meanwhile), after its `guest_pre`.
//!
//! A turn is an exclusive lock per pool in the runtime folder (`locks/pool-….lock`), taken
//! in pool-name order (a group spanning pools takes them all), from just before the flush
//! and freeze to after the snapshot's claims are written. A run that does not get its turn
//! within the wait goes on without it: overlapping windows are slower, never unsafe.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use evesnap::runtime::{self, Lock, LockError};
use evesnap::zfs;

/// How long a run waits for its turn at most: tens of other windows (each tens to a few
/// hundred milliseconds) on one pool. It also bounds what a guest whose own window drags
/// (its agent answers the thaw slowly) costs the other VMs: this delay before their freeze.
pub const WAIT: Duration = Duration::from_secs(5);

/// How often a waiting run tries the pool's lock again.
const TICK: Duration = Duration::from_millis(2);

/// The turns a run holds (released on drop), and how long it waited for them.
#[derive(Debug)]
pub struct Turn {
    _held: Vec<Lock>,
    /// How long it waited.
    pub waited: Duration,
    /// Whether it went on without every turn (the wait ran out, or a lock file failed).
    pub skipped: bool,
}

/// The pools of `datasets`, each once, in order.
pub fn pools<'a>(datasets: impl IntoIterator<Item = &'a String>) -> BTreeSet<&'a str> {
    datasets.into_iter().map(|d| zfs::pool_of(d)).collect()
}

/// Takes the turn of every pool of `datasets`, waiting up to `wait` in all, or until
/// `interrupted` says so (a signal: the caller then stops before its freeze).
pub fn take<'a>(
    datasets: impl IntoIterator<Item = &'a String>,
    wait: Duration,
    mut interrupted: impl FnMut() -> bool,
) -> Turn {
    let started = Instant::now();
    let deadline = started + wait;
    let mut held = Vec::new();
    let mut skipped = false;
    for pool in pools(datasets) {
        let name = format!("pool-{}", runtime::file_key(pool));
        loop {
            match runtime::lock(&name, || format!("a freeze window on pool {pool}")) {
                Ok(lock) => {
                    held.push(lock);
                    break;
                }
                Err(LockError::Busy { .. }) if interrupted() => {
                    skipped = true;
                    break;
                }
                Err(LockError::Busy { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(TICK.min(deadline - Instant::now()))
                }
                Err(LockError::Busy { .. }) => {
                    evesnap::warn!(
                        "pool {pool}: another freeze window did not end within {:.1} s; freezing without waiting for it",
                        wait.as_secs_f64()
                    );
                    skipped = true;
                    break;
                }
                Err(e) => {
                    evesnap::warn!("pool {pool}: freezing without taking turns: {e}");
                    skipped = true;
                    break;
                }
            }
        }
    }
    Turn {
        _held: held,
        waited: started.elapsed(),
        skipped,
    }
}
