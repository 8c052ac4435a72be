//! Helpers for the zfs tests of zsnap and zrollback (zrollback includes this file): a
//! dataset tree per test on the test lab's zfs-fuse pool, a logging `zfs` shim, running a
//! tool with a document on stdin.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use evesnap_tests::zfs::real_zfs;
use serde_json::Value;

/// The pool the tests work in: `EVESNAP_TEST_ZFS_POOL` (a scratch pool, for quick runs
/// without the VM), else the test lab's pool (which `test_lab()` brings up, zfs-fuse
/// daemon included).
pub fn pool() -> String {
    match std::env::var("EVESNAP_TEST_ZFS_POOL") {
        Ok(p) if !p.is_empty() => p,
        _ => evesnap_tests::lab::test_lab().pool.clone(),
    }
}

/// Runs the real zfs; panics with its stderr on failure.
pub fn zfs(args: &[&str]) -> String {
    let out = evesnap_tests::zfs::zfs(args);
    assert!(
        out.status.success(),
        "zfs {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the real zfs, retrying while zfs-fuse says "dataset is busy" (it does for about a
/// second after a dataset is created or mounted).
pub fn zfs_retry(args: &[&str]) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..40 {
        let out = evesnap_tests::zfs::zfs(args);
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if !last.contains("busy") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(last)
}

/// `zfs get -H -p -o value <prop> <name>`.
pub fn get(name: &str, prop: &str) -> String {
    zfs(&["get", "-H", "-p", "-o", "value", prop, name])
        .trim()
        .to_string()
}

/// Serialises dataset creation within a test process.
static CREATE: Mutex<()> = Mutex::new(());

/// Whether a dataset exists.
pub fn exists(name: &str) -> bool {
    evesnap_tests::zfs::zfs(&["list", "-H", "-o", "name", name])
        .status
        .success()
}

/// A test's own dataset tree `<pool>/t/<name>`, destroyed (holds released first) on drop.
#[derive(Debug)]
pub struct Tree {
    pub root: String,
    holds: Mutex<Vec<(String, String)>>,
}

impl Tree {
    pub fn new(name: &str) -> Tree {
        Tree::in_pool(&pool(), name)
    }

    pub fn in_pool(pool: &str, name: &str) -> Tree {
        let _serial = CREATE.lock().unwrap_or_else(|p| p.into_inner());
        let parent = format!("{pool}/t");
        // zfs-fuse mishandles concurrent creates under one parent ("already exists" for
        // `-p`, "cannot mount ... Input/output error"): make the parent on its own, tolerantly.
        if !exists(&parent) {
            let _ = Command::new(real_zfs()).args(["create", &parent]).output();
        }
        assert!(exists(&parent), "cannot create {parent}");
        let root = format!("{parent}/{name}");
        // Leftovers of an interrupted run.
        if exists(&root) {
            zfs_retry(&["destroy", "-r", "-R", &root]).expect("remove leftovers");
        }
        zfs_retry(&["create", &root]).expect("create the test's tree");
        Tree {
            root,
            holds: Mutex::new(Vec::new()),
        }
    }

    /// Creates `<root>/<rel>` (parents too) and returns its name.
    pub fn create(&self, rel: &str) -> String {
        let _serial = CREATE.lock().unwrap_or_else(|p| p.into_inner());
        let name = format!("{}/{rel}", self.root);
        zfs_retry(&["create", "-p", &name]).expect("create a dataset");
        name
    }

    pub fn hold(&self, tag: &str, snapshot: &str) {
        zfs(&["hold", tag, snapshot]);
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((tag.into(), snapshot.into()));
    }

    pub fn release(&self, tag: &str, snapshot: &str) {
        zfs(&["release", tag, snapshot]);
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(t, s)| !(t == tag && s == snapshot));
    }

    pub fn mountpoint(&self, dataset: &str) -> PathBuf {
        PathBuf::from(get(dataset, "mountpoint"))
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        for (tag, snapshot) in self
            .holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = Command::new(real_zfs())
                .args(["release", &tag, &snapshot])
                .output();
        }
        if let Err(e) = zfs_retry(&["destroy", "-r", "-R", &self.root]) {
            eprintln!("cannot clean up {}: {e}", self.root);
        }
    }
}

/// A `zfs` that never answers: a shell waiting for a `sleep 1000` it started.
pub fn hanging_zfs(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("evesnap-hung-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("fake zfs dir");
    let path = dir.join("zfs");
    std::fs::write(&path, "#!/bin/sh\nsleep 1000 &\nwait\n").expect("write fake zfs");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod fake zfs");
    path
}

/// A `zfs` that records each call's argv (one line, fields separated by 0x1f) and then
/// runs the real one; `fail_on` makes `zfs snapshot` fail with zfs' "out of space" text
/// when an argument contains it (before running anything).
#[derive(Debug)]
pub struct Shim {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub log: PathBuf,
}

impl Shim {
    pub fn new(test: &str, fail_on: Option<&str>) -> Shim {
        let dir = std::env::temp_dir().join(format!("evesnap-shim-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("shim dir");
        let log = dir.join("calls.log");
        let path = dir.join("zfs");
        let fail = match fail_on {
            Some(marker) => format!(
                "if [ \"$1\" = snapshot ]; then for a in \"$@\"; do case \"$a\" in *{marker}*) \
                 echo \"cannot create snapshot '$a': out of space\" >&2; exit 1;; esac; done; fi\n"
            ),
            None => String::new(),
        };
        let script = format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\037' \"$a\"; done >> '{log}'\necho >> '{log}'\n{fail}exec '{real}' \"$@\"\n",
            log = log.display(),
            real = real_zfs().display(),
        );
        std::fs::write(&path, script).expect("write shim");
        let mut perms = std::fs::metadata(&path).expect("shim").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).expect("chmod shim");
        Shim { dir, path, log }
    }

    /// Every recorded call's argv (without the program).
    pub fn calls(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                l.split('\u{1f}')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    }

    /// The calls of one subcommand, without the capability probe (`zfs snapshot` alone).
    pub fn calls_of(&self, sub: &str) -> Vec<Vec<String>> {
        evesnap_tests::fake_zfs::calls_of(self.calls(), sub)
    }

    pub fn clear(&self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a tool run gave back.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub doc: Value,
    pub stderr: String,
}

impl Run {
    /// The tool's own (last) step.
    pub fn step(&self) -> &Value {
        self.doc["steps"]
            .as_array()
            .and_then(|s| s.last())
            .unwrap_or(&Value::Null)
    }
}

/// Runs a tool binary with `args`, a document (or nothing: /dev/null) on stdin, and `zfs`
/// as its zfs program (EVESNAP_ZFS).
pub fn run(bin: &Path, args: &[&str], stdin: Option<&str>, zfs: &Path) -> Run {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("EVESNAP_ZFS", zfs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("spawn tool");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait tool");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    Run {
        code: out.status.code().unwrap_or(-1),
        doc,
        stderr,
    }
}

/// A file's SHA-256 (via sha256sum).
pub fn checksum(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Writes `bytes` pseudo-random bytes (seeded) to `path` and flushes them.
pub fn write_file(path: &Path, seed: u64, bytes: usize) {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut data = Vec::with_capacity(bytes);
    while data.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(bytes);
    let mut f = std::fs::File::create(path).expect("create file");
    f.write_all(&data).expect("write file");
    f.sync_all().expect("sync file");
}
