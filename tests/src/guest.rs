//! Driving the lab guest from tests: the agent client, guest shell commands, and a guard
//! that leaves the VM running and thawed whatever happens in the test.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use evesnap::qga::commands::{guest_fsfreeze_thaw, GuestFsfreezeStatus};
use evesnap::qga::{Address, Client};
use evesnap::qmp::Qmp;

use crate::lab::Lab;
use crate::run::RunDir;
pub use crate::run::{code, doc_of, stderr};

pub fn address(lab: &Lab) -> Address {
    lab.agent.parse().expect("the lab's agent address")
}

pub fn connect(lab: &Lab) -> Client {
    Client::connect(&address(lab), Instant::now() + Duration::from_secs(30))
        .expect("connect to the lab agent")
}

pub fn status(lab: &Lab) -> GuestFsfreezeStatus {
    connect(lab)
        .fsfreeze_status()
        .expect("guest-fsfreeze-status")
}

/// Runs a shell command line in the guest (busybox sh), expecting success; its stdout.
pub fn guest_sh(client: &mut Client, script: &str) -> String {
    let result = client
        .guest_exec("/bin/sh", &["-c", script], Duration::from_secs(30))
        .expect("guest-exec");
    assert!(
        result.success(),
        "guest `{script}` failed: {result:?} {}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8_lossy(&result.stdout).into_owned()
}

/// Starts `script` in the background in the guest (detached from guest-exec's pipes).
pub fn guest_background(client: &mut Client, script: &str) {
    guest_sh(
        client,
        &format!("( {script} ) </dev/null >/dev/null 2>&1 &"),
    );
}

/// Resumes the VM and thaws the guest on drop: no test leaves the lab frozen or paused.
/// Tools run through it get their own runtime folder (watchdogs, locks), cleaned up too.
#[derive(Debug)]
pub struct ThawGuard<'a> {
    pub lab: &'a Lab,
    pub run_dir: RunDir,
}

impl<'a> ThawGuard<'a> {
    pub fn new(lab: &'a Lab, name: &str) -> ThawGuard<'a> {
        ThawGuard {
            lab,
            run_dir: RunDir::new(name),
        }
    }

    /// A tool of this workspace with this guard's runtime folder.
    pub fn command(&self, bin: &str) -> Command {
        let mut command = Command::new(crate::bin(bin));
        command.env("EVESNAP_RUN_DIR", self.run_dir.path());
        command
    }

    /// Runs a tool to completion, `stdin` piped in (or `/dev/null`).
    pub fn run(&self, bin: &str, args: &[&str], stdin: Option<&str>) -> Output {
        crate::run::run(&crate::bin(bin), args, stdin, &self.run_dir)
    }
}

impl Drop for ThawGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut qmp) = Qmp::connect(&self.lab.qmp, Duration::from_secs(5)) {
            let _ = qmp.cont();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut thawed = false;
        while !thawed && Instant::now() < deadline {
            if let Ok(mut client) =
                Client::connect(&address(self.lab), Instant::now() + Duration::from_secs(20))
            {
                let _ = client.execute(guest_fsfreeze_thaw {});
                thawed = client
                    .fsfreeze_status()
                    .is_ok_and(|s| s == GuestFsfreezeStatus::thawed);
            }
        }
        // The run folder's drop then stops this test's watchdogs.
        if !thawed && !std::thread::panicking() {
            panic!("ThawGuard could not verify that the lab guest is thawed");
        }
    }
}

/// Copies a host file into the guest (`guest-file-open/write/close`, 512 KiB chunks).
pub fn guest_upload(client: &mut Client, local: &std::path::Path, remote: &str) {
    use evesnap::qga::commands::{guest_file_close, guest_file_open, guest_file_write};
    let data = std::fs::read(local).expect("read the file to upload");
    let handle = client
        .execute(guest_file_open {
            path: remote.into(),
            mode: Some("w".into()),
        })
        .expect("guest-file-open");
    for chunk in data.chunks(512 * 1024) {
        client
            .execute_within(
                guest_file_write {
                    handle,
                    buf_b64: chunk.to_vec(),
                    count: None,
                },
                Duration::from_secs(60),
            )
            .expect("guest-file-write");
    }
    client
        .execute(guest_file_close { handle })
        .expect("guest-file-close");
}
