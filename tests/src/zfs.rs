//! The host's real `zfs`, as tests call it to set up and to check what the tools did.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The real `zfs` on the host: the one on `PATH`, else `/usr/sbin/zfs`. Never
/// `EVESNAP_ZFS`, which may name a test's shim.
pub fn real_zfs() -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "command -v zfs || echo /usr/sbin/zfs"])
        .output()
        .expect("sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs the real `zfs` (stdin `/dev/null`); its output, whatever the exit.
pub fn zfs(args: &[&str]) -> Output {
    Command::new(real_zfs())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run zfs")
}

/// One property of a dataset or snapshot, exact (`zfs get -H -p`); empty if unreadable.
pub fn zfs_get(property: &str, name: &str) -> String {
    let out = zfs(&["get", "-H", "-p", "-o", "value", property, name]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The snapshots (full names) of `dataset` alone, or with `recursive` of every dataset
/// below it too, oldest first; `Err` with zfs' stderr when `zfs list` fails.
pub fn list_snapshots(dataset: &str, recursive: bool) -> Result<Vec<String>, String> {
    let depth: &[&str] = if recursive { &["-r"] } else { &["-d", "1"] };
    let mut args = vec![
        "list",
        "-H",
        "-o",
        "name",
        "-t",
        "snapshot",
        "-s",
        "createtxg",
    ];
    args.extend(depth);
    args.push(dataset);
    let out = zfs(&args);
    if !out.status.success() {
        return Err(format!(
            "zfs {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// The snapshots of `dataset` itself, oldest first; panics when `zfs list` fails.
pub fn snapshots(dataset: &str) -> Vec<String> {
    list_snapshots(dataset, false).unwrap_or_else(|e| panic!("{e}"))
}

/// Every snapshot of `dataset` and of the datasets below it; panics when `zfs list` fails.
pub fn all_snapshots(dataset: &str) -> Vec<String> {
    list_snapshots(dataset, true).unwrap_or_else(|e| panic!("{e}"))
}
