//! The test lab: one QEMU VM with the real qemu-ga and a zfs-fuse pool, brought up once
//! per test process by `scripts/lab up` in its own folder and pool, so it never collides
//! with a user's lab.
//!
//! The agent socket serves one client at a time: every test that talks to the VM holds
//! [`vm_lock`] (in-process mutex plus an flock shared by all test processes).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use serde::Deserialize;

/// What `scripts/lab up` prints.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lab {
    pub dir: PathBuf,
    pub agent: String,
    pub qmp: PathBuf,
    pub request_channel: PathBuf,
    pub pool: String,
    pub datasets: Vec<String>,
    pub guest_mounts: BTreeMap<String, String>,
    pub qemu_pid: u32,
}

/// The test lab's folder: `EVESNAP_TEST_LAB_DIR` or `target/lab-test`.
pub fn test_lab_dir() -> PathBuf {
    std::env::var_os("EVESNAP_TEST_LAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target/lab-test"))
}

/// The test lab's pool: `EVESNAP_TEST_LAB_POOL` or `evesnap-test`.
pub fn test_lab_pool() -> String {
    std::env::var("EVESNAP_TEST_LAB_POOL").unwrap_or_else(|_| "evesnap-test".into())
}

/// Runs `scripts/lab <args>` for the test lab and returns its stdout.
pub fn lab_command(args: &[&str]) -> std::process::Output {
    Command::new(crate::repo_root().join("scripts/lab"))
        .args(args)
        .env("EVESNAP_LAB_DIR", test_lab_dir())
        .env("EVESNAP_LAB_POOL", test_lab_pool())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/lab")
}

/// Brings the test lab up (once per process; `up` is idempotent across processes).
pub fn test_lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let _guard = cross_process_lock("up.lock");
        let out = lab_command(&["up"]);
        assert!(
            out.status.success(),
            "scripts/lab up failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("scripts/lab up printed no lab object ({e}):\n{}", String::from_utf8_lossy(&out.stdout))
        })
    })
}

/// Exclusive use of the lab VM (its agent socket, its frozen/thawed state).
#[derive(Debug)]
pub struct VmLock {
    _file: nix::fcntl::Flock<File>,
    _guard: MutexGuard<'static, ()>,
}

/// Takes exclusive use of the VM for the rest of the caller's scope.
pub fn vm_lock() -> VmLock {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    // A test that panicked while holding the lock poisons it; the VM is still usable.
    let guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    VmLock { _file: cross_process_lock("vm.lock"), _guard: guard }
}

fn cross_process_lock(name: &str) -> nix::fcntl::Flock<File> {
    let dir = test_lab_dir();
    std::fs::create_dir_all(&dir).expect("create the test lab folder");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(name))
        .expect("open lock file");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {name}: {e}"))
}
