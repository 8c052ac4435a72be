//! One orchestration per VM at a time: an exclusive, non-blocking lock keyed by the agent
//! address ([`evesnap::runtime::lock`]), normalised (`unix:/x`, `/x` and a relative path to
//! it are one VM).
//!
//! **The controller goes first.** A controller run that finds the VM busy leaves a marker
//! next to the lock (`<key>.controller-waiting`, its time refreshed while it waits, up to
//! the plan's `lock_wait_s`) and removes it once it holds the lock. A guest request
//! (`serve`) is refused as `busy` while a marker is younger than [`WAITING_FRESH`], so the
//! waiting run, or one that retries after exit 8 within that time, is served before the
//! next guest request. A dead waiter stops counting after [`WAITING_FRESH`].

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use evesnap::qga::Address;
use evesnap::report::Origin;
use evesnap::runtime::{self, Lock, LockError};

/// How long a controller's marker keeps guest requests away after its last refresh.
pub const WAITING_FRESH: Duration = Duration::from_secs(10);
/// How often a waiting controller tries the lock again (and refreshes its marker).
const WAIT_TICK: Duration = Duration::from_millis(100);

/// Takes the VM's lock or fails at once with [`LockError::Busy`] (exit 8).
pub fn lock_vm(agent: &Address) -> Result<Lock, LockError> {
    runtime::lock(&key(agent), || {
        format!("another snapshot operation on the VM behind agent {agent}")
    })
}

fn key(agent: &Address) -> String {
    runtime::file_key(&agent.to_string())
}

fn marker(agent: &Address) -> PathBuf {
    runtime::dir()
        .join("locks")
        .join(format!("{}.controller-waiting", key(agent)))
}

/// Whether a controller run is waiting for this VM now.
pub fn controller_waiting(agent: &Address) -> bool {
    std::fs::metadata(marker(agent))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < WAITING_FRESH)
}

/// The VM's lock for a run of `origin`: a guest's is refused while a controller waits; a
/// controller's waits up to `wait` (marking that it waits) before failing with
/// [`LockError::Busy`].
pub fn lock_vm_for(agent: &Address, origin: Origin, wait: Duration) -> Result<Lock, LockError> {
    if origin == Origin::Guest {
        if controller_waiting(agent) {
            return Err(LockError::Busy {
                what: "a controller operation waiting for this VM (it goes first)".into(),
                path: marker(agent),
            });
        }
        return lock_vm(agent);
    }
    let deadline = Instant::now() + wait;
    loop {
        match lock_vm(agent) {
            Ok(lock) => {
                let _ = std::fs::remove_file(marker(agent));
                return Ok(lock);
            }
            Err(LockError::Busy { what, path }) => {
                // Created or its time refreshed: serve reads the age.
                let _ = std::fs::write(marker(agent), b"");
                if Instant::now() >= deadline {
                    return Err(LockError::Busy { what, path });
                }
                std::thread::sleep(WAIT_TICK.min(deadline - Instant::now()));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evesnap::exit::{Exit, HasExit};

    #[test]
    fn second_lock_on_the_same_agent_is_busy() {
        let dir = std::env::temp_dir().join(format!("evesnap-lock-test-{}", std::process::id()));
        std::env::set_var("EVESNAP_RUN_DIR", &dir);
        let address = |text: &str| text.parse::<Address>().expect("address");
        let first = lock_vm(&address("unix:/tmp/a.sock")).expect("first lock");
        let err = lock_vm(&address("/tmp/a.sock")).unwrap_err();
        assert_eq!(
            err.exit(),
            Exit::Busy,
            "the same socket written another way"
        );
        assert!(err.to_string().contains("in progress"));
        let other = lock_vm(&address("unix:/tmp/b.sock")).expect("another VM is independent");
        drop((first, other));
        // A hybrid vsock address: a relative path and its absolute form are one VM; another
        // guest port of the same device is another agent, hence another key.
        let cwd = std::env::current_dir().expect("cwd");
        let hybrid = lock_vm(&address("hvsock:v.sock:10000")).expect("hvsock lock");
        let err = lock_vm(&address(&format!(
            "hvsock:{}:10000",
            cwd.join("v.sock").display()
        )))
        .unwrap_err();
        assert_eq!(
            err.exit(),
            Exit::Busy,
            "the same device written another way"
        );
        let port = lock_vm(&address("hvsock:v.sock:10001")).expect("another guest port");
        drop((hybrid, port));
        lock_vm(&address("unix:/tmp/a.sock")).expect("released on drop");

        // The controller goes first: a controller that found the VM busy (and waits, or
        // retries) keeps guest requests away until it holds the lock.
        let vm = address("unix:/tmp/c.sock");
        let held = lock_vm(&vm).expect("held");
        let waited = Instant::now();
        let err = lock_vm_for(&vm, Origin::Controller, Duration::from_millis(300)).unwrap_err();
        assert!(waited.elapsed() >= Duration::from_millis(300));
        assert_eq!(err.exit(), Exit::Busy);
        drop(held);
        assert!(controller_waiting(&vm));
        let err = lock_vm_for(&vm, Origin::Guest, Duration::ZERO).unwrap_err();
        assert_eq!(err.exit(), Exit::Busy);
        assert!(err.to_string().contains("goes first"), "{err}");
        let controller = lock_vm_for(&vm, Origin::Controller, Duration::ZERO).expect("free");
        assert!(!controller_waiting(&vm), "the marker goes with the wait");
        drop(controller);
        lock_vm_for(&vm, Origin::Guest, Duration::ZERO).expect("the guest's turn");
        let _ = std::fs::remove_dir_all(dir);
    }
}
