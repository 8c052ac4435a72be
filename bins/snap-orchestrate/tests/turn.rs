//! Freeze windows on one pool take turns (`snap_orchestrate::turn`): one test, since the
//! runtime folder is process-wide.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snap_orchestrate::turn;

#[test]
fn windows_of_one_pool_take_turns_and_other_pools_do_not_wait() {
    let dir = std::env::temp_dir().join(format!("evesnap-turn-test-{}", std::process::id()));
    std::env::set_var("EVESNAP_RUN_DIR", &dir);
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let never = || false;

    let vm0 = names(&["tank/vm0/disk0", "tank/vm0/disk1"]);
    let held = turn::take(&vm0, Duration::ZERO, never);
    assert!(!held.skipped, "{held:?}");

    // Another pool is another turn.
    let other = turn::take(&names(&["persist/vm9/disk0"]), Duration::ZERO, never);
    assert!(!other.skipped, "{other:?}");

    // The same pool: a run that cannot wait goes on without its turn (never fails).
    let vm1 = names(&["tank/vm1/disk0"]);
    assert!(turn::take(&vm1, Duration::ZERO, never).skipped);
    // Nor does a run that is interrupted while it waits.
    assert!(turn::take(&vm1, Duration::from_secs(60), || true).skipped);

    // A waiting run gets its turn once the holder's window is over, not before.
    let released = Arc::new(AtomicBool::new(false));
    let waiter = {
        let released = released.clone();
        let vm1 = vm1.clone();
        std::thread::spawn(move || {
            let got = turn::take(&vm1, Duration::from_secs(60), || false);
            (got.skipped, released.load(Ordering::SeqCst))
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    released.store(true, Ordering::SeqCst);
    drop(held);
    let (skipped, after_release) = waiter.join().expect("waiter");
    assert!(!skipped);
    assert!(after_release, "the turn came before the holder released it");

    // A group over both pools takes both, in order, whoever holds one.
    drop(other);
    let both = turn::take(
        &names(&["tank/vm0/disk0", "persist/vm9/disk0"]),
        Duration::ZERO,
        never,
    );
    assert!(!both.skipped, "{both:?}");
    assert!(turn::take(&names(&["persist/x"]), Duration::ZERO, never).skipped);
    drop(both);
    let _ = std::fs::remove_dir_all(dir);
}
