//! The test lab: QEMU VMs (two by default) with the real qemu-ga and a zfs-fuse pool, brought up once
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

use serde::de::DeserializeOwned;
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
    /// How the disks are attached: `eve` (q35, a root port each, no serial) or `serial`.
    pub shape: String,
    /// Each dataset's disk as the host knows it: `{"qdev": "virtio-disk0", "port": "pci.8"}`
    /// (a SCSI disk adds `wwn`), or `{"serial": "disk0", "pci": "0000:00:07.0"}`.
    pub disks: BTreeMap<String, serde_json::Value>,
    /// The VM's volumes map for `snap-orchestrate serve --volumes` (`disks` as a file).
    #[serde(default)]
    pub volumes: Option<PathBuf>,
    pub qemu_pid: u32,
    /// In `vms`: the VM's name (`vm0`, `vm1`, …).
    #[serde(default)]
    pub name: Option<String>,
    /// Every VM of the lab (`EVESNAP_LAB_VMS`), VM 0 first (the top-level fields are its
    /// own), each with its own agent, QMP, request channel, folder and datasets.
    #[serde(default)]
    pub vms: Vec<Lab>,
    /// The guest's second qemu-ga, on vsock, through the hybrid vsock device:
    /// `hvsock:<dir>/vsock.sock:10000`.
    pub agent_vsock: String,
    pub vsock: Vsock,
}

/// The lab VM's vsock device (vhost-device-vsock behind vhost-user-vsock-pci).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    /// The device's Unix socket: `CONNECT <port>` reaches a guest listener.
    pub uds: PathBuf,
    /// Where the guest's second qemu-ga listens.
    pub agent_port: u32,
    /// The port VM-initiated requests go to (guest → CID 2).
    pub request_port: u32,
    /// Where the host listens for them: `<uds>_<request_port>`.
    pub request_listener: PathBuf,
}

/// How many VMs the test lab boots: `EVESNAP_TEST_LAB_VMS`, default 2 (the consistency
/// group tests freeze two at once).
pub fn test_lab_vms() -> String {
    std::env::var("EVESNAP_TEST_LAB_VMS").unwrap_or_else(|_| "2".into())
}

/// The test lab's folder: `EVESNAP_TEST_LAB_DIR` or `target/lab-test`.
pub fn test_lab_dir() -> PathBuf {
    env_path("EVESNAP_TEST_LAB_DIR", "target/lab-test")
}

/// The folder named by the environment variable `var`, else `default` in the repository.
fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(default))
}

/// The test lab's pool: `EVESNAP_TEST_LAB_POOL`, else the test lab folder's own pool name.
pub fn test_lab_pool() -> String {
    std::env::var("EVESNAP_TEST_LAB_POOL")
        .unwrap_or_else(|_| lab_pool_for("evesnap-test", &test_lab_dir()))
}

/// `prefix-xxxxxxxx`, a pool name of the lab folder's own (as `lab_pool_for` in
/// scripts/lib/test-lab.sh): two checkouts on one machine share the zfs-fuse daemon and its
/// pool cache, never a pool.
pub fn lab_pool_for(prefix: &str, dir: &std::path::Path) -> String {
    let hash = evesnap::runtime::fnv1a(&dir.to_string_lossy());
    format!("{prefix}-{:08x}", hash & 0xffff_ffff)
}

/// Runs `scripts/lab <args>` for the test lab and returns its stdout.
pub fn lab_command(args: &[&str]) -> std::process::Output {
    Command::new(crate::repo_root().join("scripts/lab"))
        .args(args)
        .env("EVESNAP_LAB_DIR", test_lab_dir())
        .env("EVESNAP_LAB_POOL", test_lab_pool())
        .env("EVESNAP_LAB_VMS", test_lab_vms())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/lab")
}

/// Brings the test lab up (once per process; `up` is idempotent across processes).
pub fn test_lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let _guard = lock_in(&test_lab_dir(), "up.lock");
        lab_object("scripts/lab up", &lab_command(&["up"]))
    })
}

/// The test lab seen through its vsock agent: the same VM, with `agent` the guest's second
/// qemu-ga reached through the hybrid vsock device (`agent_vsock`). Everything that takes a
/// [`Lab`] (guards, the fault harness) then talks to the guest over vsock; the two agents
/// keep their own freeze state, so a test uses one of them throughout.
pub fn test_lab_vsock() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let lab = test_lab();
        Lab {
            agent: lab.agent_vsock.clone(),
            ..lab.clone()
        }
    })
}

/// The lab object `scripts/lab up` printed; panics with its output when it failed.
fn lab_object<T: DeserializeOwned>(what: &str, out: &std::process::Output) -> T {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no lab object ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
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
    vm_lock_in(&IN_PROCESS, &test_lab_dir())
}

/// The in-process mutex, then the flock of `<dir>/vm.lock` shared by all test processes.
fn vm_lock_in(in_process: &'static Mutex<()>, dir: &std::path::Path) -> VmLock {
    // A test that panicked while holding the lock poisons it; the VM is still usable.
    let guard = in_process.lock().unwrap_or_else(|p| p.into_inner());
    VmLock {
        _file: lock_in(dir, "vm.lock"),
        _guard: guard,
    }
}

fn lock_in(dir: &std::path::Path, name: &str) -> nix::fcntl::Flock<File> {
    std::fs::create_dir_all(dir).expect("create the test lab folder");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(name))
        .expect("open lock file");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {name}: {e}"))
}

/// What `scripts/lab up --openzfs` prints: a VM running OpenZFS 2.3 with pool `pool` on its
/// own disk, EVE-style zvols (`<pool>/vault/volumes/<uuid>.1`, the first thick, the second
/// sparse) each holding an ext4 mounted in the guest, a control agent reached from the host
/// and a second agent inside the guest on AF_VSOCK loopback for tools run in the guest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenZfsLab {
    pub dir: PathBuf,
    /// The control agent, from the host: `unix:<path>`.
    pub agent: String,
    pub qmp: PathBuf,
    /// The pool inside the guest.
    pub pool: String,
    pub zvols: Vec<String>,
    /// Zvol → its ext4 mountpoint in the guest.
    pub guest_mounts: BTreeMap<String, String>,
    /// The guest folder that shows `guest_bin_host` (read-only, live).
    pub guest_bin: String,
    /// The host folder shared as `guest_bin`.
    pub guest_bin_host: PathBuf,
    /// The agent address tools inside the guest use, e.g. `vsock:1:10000`.
    pub guest_agent: String,
    /// How the pool disk is attached: `eve` or `serial`.
    pub shape: String,
    /// The pool disk as the host knows it, keyed by the pool.
    pub disks: BTreeMap<String, serde_json::Value>,
    pub qemu_pid: u32,
}

/// The OpenZFS test lab's folder: `EVESNAP_TEST_OPENZFS_LAB_DIR` or `target/lab-openzfs-test`.
pub fn openzfs_lab_dir() -> PathBuf {
    env_path("EVESNAP_TEST_OPENZFS_LAB_DIR", "target/lab-openzfs-test")
}

/// The host folder the OpenZFS test lab shares as its `guest_bin`: `EVESNAP_GUEST_BIN_DIR`
/// or the statically linked build `target/static/x86_64-unknown-linux-gnu/debug` (see
/// `scripts/test`; the folder is created empty when nothing was built there).
pub fn openzfs_guest_bin_dir() -> PathBuf {
    env_path(
        "EVESNAP_GUEST_BIN_DIR",
        "target/static/x86_64-unknown-linux-gnu/debug",
    )
}

/// Runs `scripts/lab <args> --openzfs` for the OpenZFS test lab.
pub fn openzfs_lab_command(args: &[&str]) -> std::process::Output {
    let bin_dir = openzfs_guest_bin_dir();
    std::fs::create_dir_all(&bin_dir).expect("create the guest bin folder");
    Command::new(crate::repo_root().join("scripts/lab"))
        .args(args)
        .arg("--openzfs")
        .env("EVESNAP_LAB_DIR", openzfs_lab_dir())
        .env_remove("EVESNAP_LAB_POOL")
        .env("EVESNAP_GUEST_BIN_DIR", bin_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run scripts/lab")
}

/// Brings the OpenZFS test lab up (once per process). The first run on a machine builds the
/// OpenZFS modules for the guest kernel (~3–6 min); later runs take ~25 s.
pub fn openzfs_lab() -> &'static OpenZfsLab {
    static LAB: OnceLock<OpenZfsLab> = OnceLock::new();
    LAB.get_or_init(|| {
        let _guard = lock_in(&openzfs_lab_dir(), "up.lock");
        // `up` talks to the control agent, which serves one client at a time.
        let _vm = openzfs_vm_lock();
        lab_object("scripts/lab up --openzfs", &openzfs_lab_command(&["up"]))
    })
}

/// Exclusive use of the OpenZFS lab VM (its control agent socket serves one client at a
/// time; tests also change the pool).
pub fn openzfs_vm_lock() -> VmLock {
    static IN_PROCESS: Mutex<()> = Mutex::new(());
    vm_lock_in(&IN_PROCESS, &openzfs_lab_dir())
}

/// Snapshots of the lab's datasets named `name`; panics when `zfs list` fails.
pub fn snapshots_named(lab: &Lab, name: &str) -> Vec<String> {
    let suffix = format!("@{name}");
    crate::zfs::all_snapshots(&format!("{}/lab", lab.pool))
        .into_iter()
        .filter(|s| s.ends_with(&suffix))
        .collect()
}

/// Destroys every snapshot of the lab's datasets named `name` (test cleanup: quietly, and
/// never a panic, as it runs in `Drop`).
pub fn destroy_snapshots_named(lab: &Lab, name: &str) {
    let suffix = format!("@{name}");
    let listed = crate::zfs::list_snapshots(&format!("{}/lab", lab.pool), true);
    for snapshot in listed.unwrap_or_default() {
        if snapshot.ends_with(&suffix) {
            let _ = crate::zfs::zfs(&["destroy", &snapshot]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_and_the_tests_name_a_lab_folders_pool_alike() {
        for dir in [
            "/work/main/target/lab-test",
            "/check/work/main/target/lab-test",
            "/é x",
        ] {
            let script =
                format!("source scripts/lib/test-lab.sh && lab_pool_for evesnap-test '{dir}'");
            let out = Command::new("bash")
                .args(["-c", &script])
                .current_dir(crate::repo_root())
                .output()
                .expect("run bash");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let from_script = String::from_utf8(out.stdout).unwrap();
            let from_tests = lab_pool_for("evesnap-test", std::path::Path::new(dir));
            assert_eq!(from_script.trim(), from_tests);
        }
        assert_ne!(
            lab_pool_for("evesnap-test", "/work/main/target/lab-test".as_ref()),
            lab_pool_for("evesnap-test", "/check/work/main/target/lab-test".as_ref())
        );
    }
}
