//! Fault injection on the lab: one trial injects one fault into a snapshot (or rollback)
//! of the lab VM and then checks what must hold whatever happened:
//!
//! 1. **thawed in time**: the guest reports `thawed` no later than the freeze plus the
//!    configured `thaw_after` (plus a slack for TCG and the watchdog's polling); where
//!    nothing was left to the watchdog, at once when the tool exits;
//! 2. **no false claim**: every snapshot left behind that says `org.lfedge.evesnap:frozen =
//!    true` (or a `consistency` other than `crash`) really holds frozen filesystems: the ext4
//!    image inside it is clean (a frozen ext4 has no `needs_recovery`; a mounted, unfrozen
//!    one always has), and the two properties agree with each other and with the report;
//! 3. **the report says what happened**: the exit code matches the report (`ok`, `error.kind`,
//!    a named `error.step` and a description), and faults with a known outcome get it
//!    (e.g. a failing `zfs` is exit 1 at step `snapshot` with no snapshot left);
//! 4. **no data lost**: after a rollback to a snapshot, the files equal the ones written
//!    before it (md5 in the guest); after an interrupted rollback each volume holds either
//!    the old or the snapshot's data, and a second rollback restores the snapshot's.
//!
//! `zfs` is a shim ([`Shim`]) in front of the real one: it records calls, touches markers
//! when a snapshot or rollback starts and ends (to time kills), and can delay, fail or
//! hide the pool's free space, as each trial asks. The soak (`scripts/soak`) draws random
//! faults and timings from [`Fault::random`]; `tests/tests/faults.rs` runs a fixed quick
//! subset.
//!
//! The parts: `model` (the fault families, the generator, drawing a fault), `shim` (the
//! `zfs` shim), `trial` (one trial: plans, processes, dispatch, cleanup), `checks` (the
//! invariants above, checked after every fault), and `scenarios` (one method per fault
//! family: `tools`, `agent`, `pool`, `rollback`). Guest access is `crate::guest`'s, zfs
//! access `crate::zfs`'s.

mod checks;
mod model;
mod scenarios;
mod shim;
mod trial;

use std::time::Duration;

use crate::lab::Lab;

pub use model::{Fault, HungCall, Phase, Rng, Sig, Tool};
pub use shim::Shim;
pub use trial::{Outcome, Trial};

/// The watchdog deadline every trial configures.
pub const THAW_AFTER: Duration = Duration::from_secs(5);
/// What the lab may need beyond the deadline: the watchdog polls every 0.5 s, retries every
/// 2 s, and a TCG guest answers slowly.
pub const SLACK: Duration = Duration::from_secs(8);
/// What a freeze window measured by the tool itself may exceed `thaw_after` by.
pub const WINDOW_SLACK: Duration = Duration::from_millis(1500);
/// A thaw that owes nothing to the watchdog's deadline (a broken pipeline's, a signalled
/// run's): 2 s, and 1 s more for a TCG guest on a loaded host.
pub const PROMPT: Duration = Duration::from_secs(3);
/// A trial whose tool runs longer than this has hung.
const HANG: Duration = Duration::from_secs(120);

/// Runs one trial of `fault` (the caller holds the VM lock).
pub fn trial(lab: &Lab, index: usize, fault: &Fault, verify_rollback: bool) -> Outcome {
    Trial::new(lab, index, fault).run(fault, verify_rollback)
}
