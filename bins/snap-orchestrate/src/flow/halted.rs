//! A VM that is not running (EVE takes `app_update` snapshots with the app halted): whether
//! it runs, and whether anything on the host still holds its volumes open.
//!
//! Not running: no QEMU (the QMP socket is gone or refuses), or QEMU with its guest stopped
//! (run state `shutdown`, `guest-panicked`, `prelaunch`). A paused VM is running: it
//! resumes with its caches. Held open, checked in `/proc`: a process with the zvol
//! (`/dev/zvol/<dataset>` or its `/dev/zdN`) or a file under the dataset's mountpoint (an
//! image on zfs-fuse) open, the zvol mounted, or a block device stacked on it. The VM's own
//! QEMU, seen stopped through QMP, may keep its volumes open: it writes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use evesnap::exit::{coded, Exit};
use evesnap::report::Consistency;

use super::Run;

/// What QMP (or its absence) says about the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum VmState {
    Running,
    /// Not running; `clean` when the guest powered itself off (or the plan says so);
    /// `qemu`: the pids of the VM's own QEMU, still there with its guest stopped.
    Halted {
        clean: bool,
        qemu: BTreeSet<u32>,
    },
}

impl VmState {
    /// The consistency a snapshot of the halted VM claims.
    pub(super) fn consistency(&self) -> Option<Consistency> {
        match self {
            VmState::Running => None,
            VmState::Halted { clean: true, .. } => Some(Consistency::HaltedClean),
            VmState::Halted { clean: false, .. } => Some(Consistency::Halted),
        }
    }
}

impl Run<'_> {
    /// The VM's state from the plan's `qmp`; without one it is taken to run.
    pub(super) fn vm_state(&self) -> Result<VmState, anyhow::Error> {
        let Some(qmp) = &self.plan.qmp else {
            return Ok(VmState::Running);
        };
        let path = Path::new(qmp);
        let said_clean = self.plan.shutdown_clean;
        let status = match evesnap::qmp::Qmp::connect(path, self.timeout) {
            Ok(mut q) => q.status(),
            Err(evesnap::qmp::Error::Connect(_, e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                evesnap::note!("no QEMU answers on {qmp} ({e}): the VM is not running");
                return Ok(VmState::Halted {
                    clean: said_clean,
                    qemu: BTreeSet::new(),
                });
            }
            Err(e) => Err(e),
        }
        .map_err(|e| evesnap::exit::wrap(e).context("plan field `qmp`"))?;
        let clean = match status.state.as_str() {
            "shutdown" => true,
            "guest-panicked" => false,
            "prelaunch" => said_clean,
            _ => return Ok(VmState::Running),
        };
        Ok(VmState::Halted {
            clean,
            qemu: socket_owners(path),
        })
    }

    /// Refuses (exit 7) when a process other than the VM's own stopped QEMU holds one of
    /// the plan's volumes open.
    pub(super) fn check_unheld(&self, qemu: &BTreeSet<u32>) -> Result<(), anyhow::Error> {
        let mountpoints = self
            .zfs
            .get(&self.plan.datasets, &["mountpoint"])
            .map_err(evesnap::exit::wrap)?
            .0;
        let files = open_files();
        let mut held = Vec::new();
        for dataset in &self.plan.datasets {
            let zvol = Path::new("/dev/zvol").join(dataset);
            let device = std::fs::canonicalize(&zvol).ok();
            let mountpoint = mountpoints
                .iter()
                .find(|(name, _)| name == dataset)
                .and_then(|(_, p)| p.get("mountpoint").cloned().flatten())
                .filter(|m| m.starts_with('/'))
                .map(PathBuf::from);
            let uses = |target: &Path| {
                device.as_deref() == Some(target)
                    || target == zvol
                    || mountpoint.as_deref().is_some_and(|m| target.starts_with(m))
            };
            for (pid, target) in &files {
                if !qemu.contains(pid) && uses(target) {
                    held.push(format!(
                        "{dataset}: process {pid} ({}) has {} open",
                        command_name(*pid),
                        target.display()
                    ));
                }
            }
            if let Some(device) = &device {
                held.extend(mounted_or_stacked(device).map(|why| format!("{dataset}: {why}")));
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        Err(coded(
            Exit::Preflight,
            format!(
                "the VM is not running, but its volumes are in use on the host ({}): refusing to touch them",
                held.join("; ")
            ),
        ))
    }
}

/// Every open file of every process whose `/proc/<pid>/fd` can be read, as (pid, target).
fn open_files() -> Vec<(u32, PathBuf)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue; // gone, or not ours to read (the orchestrator runs as root on EVE)
        };
        out.extend(
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .map(|target| (pid, target)),
        );
    }
    out
}

fn command_name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Why a zvol's device is busy without an open file: mounted, or a device stacked on it.
fn mounted_or_stacked(device: &Path) -> impl Iterator<Item = String> {
    let mut why = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        if std::fs::canonicalize(source).is_ok_and(|s| s == device) {
            why.push(format!("mounted at {target}"));
        }
    }
    if let Some(name) = device.file_name() {
        let holders = Path::new("/sys/class/block").join(name).join("holders");
        if let Ok(entries) = std::fs::read_dir(holders) {
            for h in entries.flatten() {
                why.push(format!("held by {}", h.file_name().to_string_lossy()));
            }
        }
    }
    why.into_iter()
}

/// The processes that have the listening socket at `path` (the VM's QEMU for its QMP
/// socket), through `/proc/net/unix` and the `socket:[inode]` links of their fds.
fn socket_owners(path: &Path) -> BTreeSet<u32> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let wanted = path.to_string_lossy();
    let inodes: BTreeSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 8 && fields[7] == wanted).then(|| format!("socket:[{}]", fields[6]))
        })
        .collect();
    open_files()
        .into_iter()
        .filter(|(_, target)| inodes.contains(target.to_string_lossy().as_ref()))
        .map(|(pid, _)| pid)
        .collect()
}
