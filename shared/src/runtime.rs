//! The tools' runtime state on the host: the folder (watchdogs, locks), stable names for
//! addresses in it, and the one kind of lock.

use std::fs::File;
use std::path::PathBuf;

use crate::exit::{Exit, HasExit};

/// Where the tools keep runtime state (watchdogs, locks): `EVESNAP_RUN_DIR`, else
/// `/run/evesnap` for root and `$XDG_RUNTIME_DIR/evesnap` (or `/tmp/evesnap-<uid>`) otherwise.
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EVESNAP_RUN_DIR") {
        return dir.into();
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return "/run/evesnap".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("evesnap"),
        None => std::env::temp_dir().join(format!("evesnap-{uid}")),
    }
}

/// FNV-1a: a stable hash, so every build names the same address the same way.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A file name for `text` (an address, a path): its last 48 characters made readable,
/// and its hash, which keeps two texts that differ only in punctuation apart.
pub fn file_key(text: &str) -> String {
    let readable: Vec<char> = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let tail: String = readable[readable.len().saturating_sub(48)..]
        .iter()
        .collect();
    format!("{tail}-{:016x}", fnv1a(text))
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} is in progress (lock {})", path.display())]
    Busy { what: String, path: PathBuf },
    #[error("cannot open the lock file {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
}

impl HasExit for LockError {
    fn exit(&self) -> Exit {
        match self {
            LockError::Busy { .. } => Exit::Busy,
            LockError::Open(..) => Exit::StepFailed,
        }
    }
}

/// An exclusive flock, held until dropped; the kernel drops it when the process dies, so a
/// killed tool never leaves a stale lock behind.
#[derive(Debug)]
pub struct Lock {
    _flock: nix::fcntl::Flock<File>,
}

/// Takes the lock `<runtime>/locks/<name>.lock` or fails at once with
/// [`LockError::Busy`], which says `what` holds it ("another … on …").
pub fn lock(name: &str, what: impl FnOnce() -> String) -> Result<Lock, LockError> {
    let dir = dir().join("locks");
    let path = dir.join(format!("{name}.lock"));
    std::fs::create_dir_all(&dir).map_err(|e| LockError::Open(dir.clone(), e))?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LockError::Open(path.clone(), e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(flock) => Ok(Lock { _flock: flock }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(LockError::Busy { what: what(), path }),
        Err((_, e)) => Err(LockError::Open(path, e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_readable_and_apart() {
        let a = file_key("unix:/run/a.sock");
        assert!(a.starts_with("unix__run_a_sock-"), "{a}");
        assert_ne!(file_key("unix:/a_b"), file_key("unix:/a/b"));
        assert!(file_key(&"x".repeat(200)).len() < 70);
    }
}
