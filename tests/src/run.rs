//! Running the workspace's tools from tests: a private runtime folder per test, the
//! tool's output, the document it printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use evesnap::document::Document;

/// A private runtime folder (`EVESNAP_RUN_DIR`: watchdogs, locks), so parallel tests
/// never meet; on drop, stops the watchdogs a failed test left behind ([`stop_watchdogs`]).
#[derive(Debug)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn new(name: &str) -> RunDir {
        let dir = std::env::temp_dir().join(format!("evesnap-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Private, or the tools refuse it.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .expect("run dir");
        RunDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        stop_watchdogs(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops (SIGTERM) the watchdogs whose state files are in the runtime folder `dir`.
pub fn stop_watchdogs(dir: &Path) {
    for pid in live_watchdogs(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// The pids of the watchdogs whose state files are in the runtime folder `dir` and that
/// still run: a recorded pid counts only while its process carries the watchdog's token
/// (not a reused pid).
pub fn live_watchdogs(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let text = std::fs::read(entry.path()).unwrap_or_default();
            let w = serde_json::from_slice::<evesnap::qga::watchdog::Watchdog>(&text).ok()?;
            let pid = w.pid?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline)
                .contains(&w.token)
                .then_some(pid)
        })
        .collect()
}

/// Runs `bin` to completion with `run_dir` as its runtime folder, `stdin` piped in (or
/// `/dev/null`).
pub fn run(bin: &Path, args: &[&str], stdin: Option<&str>, run_dir: &RunDir) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .env("EVESNAP_RUN_DIR", run_dir.path())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(text) = stdin {
        let _ = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes());
    }
    child.wait_with_output().expect("wait")
}

/// Starts `command` with `input` written to its stdin (then closed), stdout and stderr piped.
pub fn spawn_with_stdin(mut command: Command, input: &str) -> Child {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child
}

/// The document a tool printed; panics with its stderr when there is none.
pub fn doc_of(out: &Output) -> Document {
    let text = String::from_utf8_lossy(&out.stdout);
    Document::from_json(&text).unwrap_or_else(|e| {
        panic!(
            "no document ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}
