//! One orchestration per VM at a time: an exclusive, non-blocking flock on a file keyed
//! by the agent address. The kernel drops it when the process dies, so a killed
//! orchestrator never leaves a stale lock behind.

use std::fs::File;
use std::path::PathBuf;

use evesnap::exit::{Exit, HasExit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "another snapshot operation on the VM behind agent {agent} is in progress (lock {path})"
    )]
    Busy { agent: String, path: PathBuf },
    #[error("cannot open the lock file {0}")]
    Open(PathBuf, #[source] std::io::Error),
}

impl HasExit for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Busy { .. } => Exit::Busy,
            Error::Open(..) => Exit::StepFailed,
        }
    }
}

/// Held for the whole operation; released on drop or process death.
#[derive(Debug)]
pub struct VmLock {
    _flock: nix::fcntl::Flock<File>,
}

/// Takes the VM's lock or fails at once with [`Error::Busy`].
pub fn lock_vm(agent: &str) -> Result<VmLock, Error> {
    let dir = evesnap::runtime_dir().join("locks");
    let path = dir.join(format!("{}.lock", key(agent)));
    std::fs::create_dir_all(&dir).map_err(|e| Error::Open(dir.clone(), e))?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::Open(path.clone(), e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(flock) => Ok(VmLock { _flock: flock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(Error::Busy {
            agent: agent.to_string(),
            path,
        }),
        Err((_, e)) => Err(Error::Open(path, e.into())),
    }
}

/// A file name for an address: readable, and unique per address.
fn key(agent: &str) -> String {
    let readable: String = agent
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    // FNV-1a keeps two addresses that differ only in punctuation apart.
    let hash = agent.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let tail: String = readable
        .chars()
        .rev()
        .take(48)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{tail}-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
