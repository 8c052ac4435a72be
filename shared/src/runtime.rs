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

/// Why the runtime folder cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot create the runtime folder {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the runtime folder {} {why}: refusing to use it (another user could read or replace \
         the tools' sockets and locks); remove it or set EVESNAP_RUN_DIR",
        path.display()
    )]
    NotPrivate { path: PathBuf, why: String },
}

impl HasExit for DirError {
    fn exit(&self) -> Exit {
        Exit::StepFailed
    }
}

/// The runtime folder, created private (0700) if missing; one that another user owns (a
/// `/tmp/evesnap-<uid>` someone made first), that is a symbolic link, or that others may
/// enter is refused: a file planted there (a pending `guest_post` record) would be run in
/// the guest later. Closing a loose folder would not undo what was planted before.
pub fn ensure_dir() -> Result<PathBuf, DirError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let path = dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&path)
        .map_err(|source| DirError::Create {
            path: path.clone(),
            source,
        })?;
    let refuse = |why: String| DirError::NotPrivate {
        path: path.clone(),
        why,
    };
    let meta = std::fs::symlink_metadata(&path).map_err(|source| DirError::Create {
        path: path.clone(),
        source,
    })?;
    if !meta.file_type().is_dir() {
        return Err(refuse("is not a folder (a symbolic link?)".into()));
    }
    let uid = nix::unistd::geteuid().as_raw();
    if meta.uid() != uid {
        return Err(refuse(format!("belongs to uid {}, not {uid}", meta.uid())));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refuse(format!(
            "is open to other users (mode {:04o}; only 0700 is used)",
            meta.mode() & 0o7777
        )));
    }
    Ok(path)
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
    #[error(transparent)]
    Dir(#[from] DirError),
}

impl HasExit for LockError {
    fn exit(&self) -> Exit {
        match self {
            LockError::Busy { .. } => Exit::Busy,
            LockError::Open(..) | LockError::Dir(_) => Exit::StepFailed,
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
    let dir = ensure_dir()?.join("locks");
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
    fn the_runtime_folder_is_private_or_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("evesnap-rt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).expect("base");
        let loose = base.join("loose");
        std::fs::create_dir(&loose).expect("loose");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let link = base.join("link");
        std::os::unix::fs::symlink(&loose, &link).expect("symlink");
        // EVESNAP_RUN_DIR is process-wide: one test sets it, in turn.
        std::env::set_var("EVESNAP_RUN_DIR", &loose);
        let err = ensure_dir().expect_err("ours, but open to others");
        assert!(matches!(err, DirError::NotPrivate { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&loose.display().to_string()), "{text}");
        assert!(text.contains("mode 0777"), "{text}");
        let mode = std::fs::metadata(&loose)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o777, "refused, not chmodded");
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        assert!(ensure_dir().is_err(), "group may enter: refused");
        let fresh = base.join("fresh").join("run");
        std::env::set_var("EVESNAP_RUN_DIR", &fresh);
        assert_eq!(ensure_dir().expect("created"), fresh);
        let mode = std::fs::metadata(&fresh)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "created private");
        assert!(ensure_dir().is_ok(), "and used again");
        std::env::set_var("EVESNAP_RUN_DIR", &link);
        assert!(matches!(ensure_dir(), Err(DirError::NotPrivate { .. })));
        if nix::unistd::geteuid().is_root() {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).expect("theirs");
            nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None)
                .expect("chown");
            std::env::set_var("EVESNAP_RUN_DIR", &theirs);
            let err = ensure_dir().expect_err("another user's folder");
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }
        std::env::remove_var("EVESNAP_RUN_DIR");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn keys_are_readable_and_apart() {
        let a = file_key("unix:/run/a.sock");
        assert!(a.starts_with("unix__run_a_sock-"), "{a}");
        assert_ne!(file_key("unix:/a_b"), file_key("unix:/a/b"));
        assert!(file_key(&"x".repeat(200)).len() < 70);
    }
}
