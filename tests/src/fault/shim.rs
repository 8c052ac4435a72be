//! The `zfs` shim of a trial: records calls, marks when a snapshot or rollback starts and
//! ends (to time kills), and delays, fails or hides free space as the trial asks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::trial::wait_for;
use crate::zfs::real_zfs;

/// The `zfs` shim of one trial: a script in `dir` in front of the real `zfs`.
#[derive(Debug)]
pub struct Shim {
    pub dir: PathBuf,
    pub program: PathBuf,
}

impl Shim {
    pub fn new(dir: &Path) -> Shim {
        let real = real_zfs();
        let d = dir.display();
        let r = real.display();
        // Config files in `dir`: snapshot.before / snapshot.after / rollback.before /
        // destroy.before / get.before (seconds to sleep; destroy.before only for a destroy
        // naming destroy.match), snapshot.fail / clone.fail (stderr to fail with), noroom
        // (report 4 KiB available).
        let script = format!(
            r#"#!/bin/sh
d='{d}'
echo "$*" >> "$d/calls"
touch "$d/active.$$"
trap 'rm -f "$d/active.$$"' EXIT
case "$1" in
  snapshot)
    if [ $# -gt 1 ]; then
      touch "$d/snapshot-started"
      [ -f "$d/snapshot.before" ] && sleep "$(cat "$d/snapshot.before")"
      if [ -f "$d/snapshot.fail" ]; then cat "$d/snapshot.fail" >&2; exit 1; fi
      '{r}' "$@"; rc=$?
      touch "$d/snapshot-done"
      [ -f "$d/snapshot.after" ] && sleep "$(cat "$d/snapshot.after")"
      exit $rc
    fi;;
  destroy)
    touch "$d/destroy-started"
    if [ -f "$d/destroy.before" ]; then
      case "$*" in *"$(cat "$d/destroy.match")"*) sleep "$(cat "$d/destroy.before")";; esac
    fi;;
  clone)
    if [ -f "$d/clone.fail" ]; then cat "$d/clone.fail" >&2; exit 1; fi;;
  rollback)
    touch "$d/rollback-started"
    [ -f "$d/rollback.before" ] && sleep "$(cat "$d/rollback.before")"
    '{r}' "$@"; rc=$?
    touch "$d/rollback-done"
    exit $rc;;
  get)
    touch "$d/get-started"
    [ -f "$d/get.before" ] && sleep "$(cat "$d/get.before")"
    if [ -f "$d/noroom" ]; then
      '{r}' "$@" > "$d/get.$$"; rc=$?
      sed 's/\tavailable\t[0-9][0-9]*$/\tavailable\t4096/' "$d/get.$$"; rm -f "$d/get.$$"
      exit $rc
    fi;;
esac
'{r}' "$@"
"#
        );
        let program = dir.join("zfs");
        std::fs::write(&program, script).expect("write the zfs shim");
        std::fs::set_permissions(
            &program,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod the zfs shim");
        Shim {
            dir: dir.to_path_buf(),
            program,
        }
    }

    pub fn set(&self, name: &str, value: &str) {
        std::fs::write(self.dir.join(name), value).expect("write shim config");
    }

    pub fn marker(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// When marker `name` was made (its mtime), if it was.
    pub fn marked_at(&self, name: &str) -> Option<Instant> {
        let made = std::fs::metadata(self.marker(name)).ok()?.modified().ok()?;
        let ago = std::time::SystemTime::now()
            .duration_since(made)
            .unwrap_or_default();
        Instant::now().checked_sub(ago)
    }

    /// Waits (up to a minute) until a `zfs snapshot` starts; when it was seen.
    pub fn snapshot_started(&self) -> Option<Instant> {
        wait_for(&self.marker("snapshot-started"), Duration::from_secs(60))
    }

    /// Waits until no shim call runs any more (an orphaned `zfs` after a SIGKILL). A marker
    /// whose shell is gone is stale: a call cut short is killed with its process group, so
    /// its EXIT trap never ran, and nothing of it runs any more.
    pub fn wait_idle(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let busy = std::fs::read_dir(&self.dir)
                .map(|entries| {
                    entries.flatten().any(|e| {
                        let name = e.file_name();
                        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("active."))
                        else {
                            return false;
                        };
                        let alive = pid.parse::<i32>().is_ok_and(|pid| {
                            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                        });
                        if !alive {
                            let _ = std::fs::remove_file(e.path());
                        }
                        alive
                    })
                })
                .unwrap_or(false);
            if !busy {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
