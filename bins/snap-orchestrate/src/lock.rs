//! One orchestration per VM at a time: an exclusive, non-blocking lock keyed by the agent
//! address ([`evesnap::runtime::lock`]).

use evesnap::runtime::{self, Lock, LockError};

/// Takes the VM's lock or fails at once with [`LockError::Busy`] (exit 8).
pub fn lock_vm(agent: &str) -> Result<Lock, LockError> {
    runtime::lock(&runtime::file_key(agent), || {
        format!("another snapshot operation on the VM behind agent {agent}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use evesnap::exit::{Exit, HasExit};

    #[test]
    fn second_lock_on_the_same_agent_is_busy() {
        let dir = std::env::temp_dir().join(format!("evesnap-lock-test-{}", std::process::id()));
        std::env::set_var("EVESNAP_RUN_DIR", &dir);
        let first = lock_vm("unix:/tmp/a.sock").expect("first lock");
        let err = lock_vm("unix:/tmp/a.sock").unwrap_err();
        assert_eq!(err.exit(), Exit::Busy);
        assert!(err.to_string().contains("in progress"));
        let other = lock_vm("unix:/tmp/b.sock").expect("another VM is independent");
        drop((first, other));
        lock_vm("unix:/tmp/a.sock").expect("released on drop");
        let _ = std::fs::remove_dir_all(dir);
    }
}
