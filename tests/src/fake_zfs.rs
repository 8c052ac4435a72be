//! A fake `zfs` over a JSON state file (`bins/snap-orchestrate/tests/support/fake-zfs.py`):
//! enough of OpenZFS 2.x and zfs-fuse for the flow and the tools' own records, without a
//! pool or root.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use evesnap::zfs::Zfs;
use serde_json::{json, Value};

/// The Python behind `python3` (a version manager's shim on `PATH` costs ~0.3 s a call).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 on PATH");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

/// A pool `tank` holding `datasets` (volumes, 64 KiB written, 1 GiB free) and the
/// filesystems above them, no snapshots, as OpenZFS 2.x.
pub fn pool(datasets: &[&str]) -> Value {
    let space = |kind: &str| {
        json!({"type": kind, "available": 1u64 << 30, "referenced": 65536, "usedbydataset": 65536,
               "refreservation": 0, "usedbyrefreservation": 0})
    };
    let mut all = json!({"tank": space("filesystem"), "tank/vm0": space("filesystem")});
    for d in datasets {
        all[*d] = space("volume");
    }
    json!({"flavour": "openzfs", "txg": 100, "datasets": all, "snapshots": {}, "bookmarks": {},
           "faults": {}})
}

/// Adds the snapshot `name` to a [`pool`] state, taken at `txg`, with user `props`.
pub fn add_snapshot(state: &mut Value, name: &str, txg: u64, props: Value) {
    state["snapshots"][name] = json!({"guid": (txg * 7919).to_string(), "createtxg": txg,
        "creation": 1764099000 + txg, "userrefs": 0, "used": 0, "referenced": 65536,
        "props": props});
}

/// The fake over its own state, run through a `zfs` wrapper; the folder
/// goes when dropped.
#[derive(Debug)]
pub struct FakeZfs {
    dir: PathBuf,
}

impl FakeZfs {
    pub fn new(state: &Value) -> FakeZfs {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{}-{}",
            crate::unique("evesnap-fake-zfs"),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("fake zfs folder");
        std::fs::write(dir.join("state.json"), state.to_string()).expect("state");
        let script = crate::repo_root().join("bins/snap-orchestrate/tests/support/fake-zfs.py");
        let wrapper = format!(
            "#!/bin/sh\nexec '{}' -S '{}' '{}' \"$@\"\n",
            python().display(),
            script.display(),
            dir.display()
        );
        let path = dir.join("zfs");
        std::fs::write(&path, wrapper).expect("wrapper");
        let mut perms = std::fs::metadata(&path).expect("wrapper").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).expect("chmod wrapper");
        FakeZfs { dir }
    }

    /// The zfs layer over this fake; it probes the capabilities as with a real `zfs`.
    pub fn zfs(&self) -> Zfs {
        Zfs::with_path(self.dir.join("zfs"))
    }

    /// The `zfs` wrapper, for a process (`--zfs`).
    pub fn path(&self) -> PathBuf {
        self.dir.join("zfs")
    }

    pub fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.join("state.json")).expect("state");
        serde_json::from_str(&text).expect("state is JSON")
    }

    /// The snapshots that exist, by name.
    pub fn snapshots(&self) -> Vec<String> {
        let state = self.state();
        let all = state["snapshots"].as_object().expect("snapshots");
        all.keys().cloned().collect()
    }

    /// Every call's argv (without the program), in order.
    pub fn calls(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a logged argv"))
            .collect()
    }

    /// The calls of one subcommand, without the capability probe (`zfs snapshot` alone).
    pub fn calls_of(&self, sub: &str) -> Vec<Vec<String>> {
        calls_of(self.calls(), sub)
    }
}

/// Of logged `zfs` argvs, those of one subcommand, without the capability probe (`zfs
/// snapshot` alone).
pub fn calls_of(calls: Vec<Vec<String>>, sub: &str) -> Vec<Vec<String>> {
    calls
        .into_iter()
        .filter(|c| c.len() > 1 && c[0] == sub)
        .collect()
}

impl Drop for FakeZfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
