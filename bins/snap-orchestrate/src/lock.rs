//! One orchestration per VM at a time: an exclusive, non-blocking lock keyed by the agent
//! address ([`evesnap::runtime::lock`]), normalised (`unix:/x`, `/x` and a relative path to
//! it are one VM).

use evesnap::qga::Address;
use evesnap::runtime::{self, Lock, LockError};

/// Takes the VM's lock or fails at once with [`LockError::Busy`] (exit 8).
pub fn lock_vm(agent: &Address) -> Result<Lock, LockError> {
    runtime::lock(&runtime::file_key(&agent.to_string()), || {
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
        lock_vm(&address("unix:/tmp/a.sock")).expect("released on drop");
        let _ = std::fs::remove_dir_all(dir);
    }
}
