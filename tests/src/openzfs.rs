//! The OpenZFS lab guest as the OpenZFS tests drive it: tools run *inside* the guest (the
//! static build shared at `guest_bin`), started from the host through the control agent
//! (`guest-exec` with argv), and `zfs` asked there, where the pool is.

use std::time::{Duration, Instant};

use evesnap::qga::{Address, Client};
use serde_json::Value;

use crate::guest::guest_exec;
use crate::lab::{openzfs_lab, openzfs_vm_lock, OpenZfsLab, VmLock};

/// What a tool run in the guest gave back.
#[derive(Debug)]
pub struct ToolRun {
    pub code: i64,
    pub doc: Value,
    pub stderr: String,
    /// Wall time of the guest-exec round trip (includes the agent's polling).
    pub took: Duration,
}

impl ToolRun {
    /// The tool's own (last) step.
    pub fn step(&self) -> &Value {
        self.doc["steps"]
            .as_array()
            .and_then(|s| s.last())
            .unwrap_or_else(|| panic!("no step in {}", self.doc))
    }
}

/// The guest, through the control agent, and the VM to this test ([`openzfs_vm_lock`]).
/// Cleanup scripts registered with [`Guest::on_drop`] run (newest first) when it goes out
/// of scope, also after a failed assertion, and before the lock is released.
pub struct Guest {
    pub lab: &'static OpenZfsLab,
    agent: Client,
    cleanup: Vec<String>,
    _vm: VmLock,
}

impl Guest {
    /// The guest of the OpenZFS lab, or `None` (a loud skip, naming `what` the test is)
    /// when one of `tools` is not built in the guest's bin folder.
    pub fn start(what: &str, tools: &[&str]) -> Option<Guest> {
        let lab = openzfs_lab();
        if let Some(missing) = tools.iter().find(|t| !lab.guest_bin_host.join(t).exists()) {
            eprintln!(
                "SKIP {what}: {missing} is not built in {} (RUSTFLAGS='-C \
                 target-feature=+crt-static' cargo build --workspace --bins --target \
                 x86_64-unknown-linux-gnu --target-dir target/static)",
                lab.guest_bin_host.display()
            );
            return None;
        }
        let vm = openzfs_vm_lock();
        let address: Address = lab.agent.parse().expect("agent address");
        let agent = Client::connect(&address, Instant::now() + Duration::from_secs(30))
            .expect("the control agent answers");
        Some(Guest {
            lab,
            agent,
            cleanup: Vec::new(),
            _vm: vm,
        })
    }

    pub fn on_drop(&mut self, script: impl Into<String>) {
        self.cleanup.push(script.into());
    }

    /// Runs `argv` in the guest: (exit code, stdout, stderr).
    pub fn exec(&mut self, argv: &[&str]) -> (i64, String, String) {
        guest_exec(&mut self.agent, argv, Duration::from_secs(180))
    }

    /// Runs a busybox sh script in the guest, expecting success; its stdout.
    pub fn sh(&mut self, script: &str) -> String {
        let (code, out, err) = self.exec(&["/bin/sh", "-c", script]);
        assert_eq!(code, 0, "guest `{script}` exited {code}:\n{err}{out}");
        out
    }

    /// Runs one of the project's tools in the guest with `args` (argv, no quoting), the
    /// document `stdin` piped in (or `/dev/null`), and parses the document it prints.
    pub fn tool(&mut self, tool: &str, args: &[&str], stdin: Option<&str>) -> ToolRun {
        let program = format!("{}/{tool}", self.lab.guest_bin);
        // sh -c SCRIPT sh DOC PROGRAM ARGS...: the document and argv stay separate words.
        let script = r#"cd /tmp; doc=$1; shift; if [ -n "$doc" ]; then printf '%s' "$doc" | "$@"; else "$@" </dev/null; fi"#;
        let mut argv = vec!["/bin/sh", "-c", script, "sh", stdin.unwrap_or(""), &program];
        argv.extend_from_slice(args);
        let started = Instant::now();
        let (code, out, stderr) = self.exec(&argv);
        let took = started.elapsed();
        let doc = serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "{tool} {args:?} printed no document ({e}), exit {code}:\n{out}\nstderr:\n{stderr}"
            )
        });
        ToolRun {
            code,
            doc,
            stderr,
            took,
        }
    }

    /// `snap-orchestrate` in the guest with `plan` on stdin: (exit code, report, stderr).
    pub fn orchestrate(&mut self, plan: &Value) -> (i64, Value, String) {
        let run = self.tool("snap-orchestrate", &[], Some(&plan.to_string()));
        (run.code, run.doc, run.stderr)
    }

    /// `zfs get -H -p -o value <property> <name>`.
    pub fn zfs_get(&mut self, property: &str, name: &str) -> String {
        self.sh(&format!("zfs get -H -p -o value {property} '{name}'"))
            .trim()
            .to_string()
    }

    /// The pool's snapshots, by name.
    pub fn snapshots(&mut self) -> Vec<String> {
        self.list("snapshot")
    }

    /// The pool's snapshots and bookmarks, by name.
    pub fn snapshots_and_bookmarks(&mut self) -> Vec<String> {
        self.list("snapshot,bookmark")
    }

    fn list(&mut self, types: &str) -> Vec<String> {
        self.sh(&format!("zfs list -H -o name -t {types} -r persist"))
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A command line that sends `command` to the in-guest agent and prints its reply.
    pub fn qga_client(&self, command: &str) -> String {
        format!("/usr/bin/qga-client {} '{command}'", self.lab.guest_agent)
    }

    /// The in-guest (vsock) agent's freeze state.
    pub fn freeze_status(&mut self) -> String {
        let out = self.sh(&self.qga_client(r#"{"execute":"guest-fsfreeze-status"}"#));
        let reply: Value = serde_json::from_str(out.trim()).expect("JSON reply");
        reply["return"].as_str().unwrap_or("?").to_string()
    }
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("lab", &self.lab.dir)
            .field("cleanup", &self.cleanup)
            .finish_non_exhaustive()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        while let Some(script) = self.cleanup.pop() {
            match self
                .agent
                .guest_exec("/bin/sh", &["-c", &script], Duration::from_secs(120))
            {
                Ok(r) if r.success() => {}
                Ok(r) => eprintln!(
                    "cleanup `{script}` exited {:?}: {}",
                    r.exitcode,
                    String::from_utf8_lossy(&r.stderr)
                ),
                Err(e) => eprintln!("cleanup `{script}`: {e}"),
            }
        }
    }
}

/// A script that destroys every snapshot and bookmark of the pool whose name contains
/// `tag` (holds released first).
pub fn forget(tag: &str) -> String {
    format!(
        "for s in $(zfs list -H -o name -t snapshot,bookmark -r persist | grep -F -- '{tag}'); do \
         zfs release evesnap-test \"$s\" 2>/dev/null; zfs destroy \"$s\"; done; true"
    )
}

/// A script that mounts each zvol's ext4 again where the lab mounts it (by its device
/// node), unless it is mounted.
pub fn remount(lab: &OpenZfsLab) -> String {
    lab.guest_mounts
        .iter()
        .map(|(zvol, mnt)| {
            format!(
                "grep -q ' {mnt} ' /proc/mounts || {{ echo 3 > /proc/sys/vm/drop_caches; \
                 mount -t ext4 $(readlink -f /dev/zvol/{zvol}) {mnt}; }}"
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
