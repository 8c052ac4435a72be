//! Driving the lab guest from tests: the agent client, guest shell commands, pausing and
//! resuming the VM, and a guard that leaves the VM running and thawed whatever happens in
//! the test. The `try_` forms return why they failed instead of panicking: the fault
//! harness records a failure and goes on to its cleanup.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use evesnap::qga::commands::{guest_fsfreeze_thaw, GuestFsfreezeStatus};
use evesnap::qga::{Address, Client};
use evesnap::qmp::Qmp;

use crate::lab::{test_lab, test_lab_vsock, vm_lock, Lab, VmLock};
use crate::run::RunDir;
pub use crate::run::{code, doc_of, stderr};

pub fn address(lab: &Lab) -> Address {
    lab.agent.parse().expect("the lab's agent address")
}

/// A connection to the lab's agent, waiting up to `within` for it (the agent serves one
/// client at a time); why not, for callers that must not panic.
pub fn try_connect(lab: &Lab, within: Duration) -> Result<Client, evesnap::qga::Error> {
    Client::connect(&address(lab), Instant::now() + within)
}

/// A connection to the lab's agent; panics when there is none within 30 s.
pub fn connect(lab: &Lab) -> Client {
    try_connect(lab, Duration::from_secs(30)).expect("connect to the lab agent")
}

pub fn status(lab: &Lab) -> GuestFsfreezeStatus {
    connect(lab)
        .fsfreeze_status()
        .expect("guest-fsfreeze-status")
}

/// Polls the guest (short connections) until it reports thawed or `until` passes; the
/// moment it first did.
pub fn wait_thawed(lab: &Lab, until: Instant) -> Option<Instant> {
    loop {
        let now = try_connect(lab, Duration::from_secs(3)).and_then(|mut c| c.fsfreeze_status());
        if now.is_ok_and(|s| s == GuestFsfreezeStatus::thawed) {
            return Some(Instant::now());
        }
        if Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs a shell command line in the guest (busybox sh); its stdout, or why it failed.
pub fn try_guest_sh(client: &mut Client, script: &str) -> Result<String, String> {
    let r = client
        .guest_exec("/bin/sh", &["-c", script], Duration::from_secs(30))
        .map_err(|e| format!("guest-exec: {}", evesnap::exit::chain_of(&e)))?;
    if !r.success() {
        return Err(format!(
            "guest `{script}` failed ({:?}/{:?}): {}",
            r.exitcode,
            r.signal,
            String::from_utf8_lossy(&r.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&r.stdout).into_owned())
}

/// Runs a shell command line in the guest, expecting success; its stdout.
pub fn guest_sh(client: &mut Client, script: &str) -> String {
    try_guest_sh(client, script).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `argv` in the guest (no shell), waiting up to `timeout`: exit code (128 + the
/// signal when it was killed), stdout and stderr. Panics when guest-exec itself fails.
pub fn guest_exec(client: &mut Client, argv: &[&str], timeout: Duration) -> (i64, String, String) {
    let res = client
        .guest_exec(argv[0], &argv[1..], timeout)
        .expect("guest-exec");
    let code = res
        .exitcode
        .unwrap_or_else(|| 128 + res.signal.unwrap_or(0));
    (
        code,
        String::from_utf8_lossy(&res.stdout).into_owned(),
        String::from_utf8_lossy(&res.stderr).into_owned(),
    )
}

/// Starts `script` in the background in the guest (detached from guest-exec's pipes).
pub fn guest_background(client: &mut Client, script: &str) {
    guest_sh(
        client,
        &format!("( {script} ) </dev/null >/dev/null 2>&1 &"),
    );
}

/// Freezes `mountpoint` from inside the guest (busybox `fsfreeze --freeze`), behind the agent's
/// back: the agent still says `thawed`, and its own freeze of that filesystem then fails
/// (`FIFREEZE`: EBUSY), as a real freeze failure. Any agent thaw thaws it again (qemu-ga
/// repeats `FITHAW` on every filesystem until it fails).
pub fn freeze_behind_the_agent(lab: &Lab, mountpoint: &str) {
    guest_sh(
        &mut connect(lab),
        &format!("sync; fsfreeze --freeze {mountpoint}"),
    );
}

/// Thaws `mountpoint` from inside the guest (`fsfreeze --unfreeze`); whether it was still frozen
/// (`FITHAW` fails on a filesystem that is not).
pub fn unfreeze_in_guest(lab: &Lab, mountpoint: &str) -> bool {
    let (code, _, _) = guest_exec(
        &mut connect(lab),
        &["/bin/fsfreeze", "--unfreeze", mountpoint],
        Duration::from_secs(10),
    );
    code == 0
}

/// Pauses (QMP `stop`) or resumes (`cont`) the lab VM.
pub fn set_paused(lab: &Lab, paused: bool) -> Result<(), String> {
    let mut qmp = Qmp::connect(&lab.qmp, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    if paused { qmp.stop() } else { qmp.cont() }
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Resumes the VM and thaws the guest, retrying for up to a minute; whether the guest
/// then reports thawed.
pub fn resume_and_thaw(lab: &Lab) -> bool {
    let _ = set_paused(lab, false);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(mut client) = try_connect(lab, Duration::from_secs(20)) {
            let _ = client.execute(guest_fsfreeze_thaw {});
            if client
                .fsfreeze_status()
                .is_ok_and(|s| s == GuestFsfreezeStatus::thawed)
            {
                return true;
            }
        }
    }
    false
}

/// Resumes the VM and thaws the guest on drop: no test leaves the lab frozen or paused.
/// Tools run through it get their own runtime folder (watchdogs, locks), cleaned up too.
#[derive(Debug)]
pub struct ThawGuard<'a> {
    pub lab: &'a Lab,
    pub run_dir: RunDir,
    /// Dropped last: the guest is thawed and the watchdogs stopped before another test
    /// gets the VM.
    _vm: Option<VmLock>,
}

impl ThawGuard<'static> {
    /// What a test that drives the lab VM starts with: brings the test lab up and takes
    /// exclusive use of its VM ([`vm_lock`]) until the guard is dropped.
    pub fn lock(name: &str) -> ThawGuard<'static> {
        let lab = test_lab();
        let vm = vm_lock();
        ThawGuard {
            lab,
            run_dir: RunDir::new(name),
            _vm: Some(vm),
        }
    }

    /// [`lock`](Self::lock) with the lab seen over vsock ([`test_lab_vsock`]): its `agent`,
    /// and the thaw on drop, go through the guest's vsock agent.
    pub fn lock_vsock(name: &str) -> ThawGuard<'static> {
        let lab = test_lab_vsock();
        let vm = vm_lock();
        ThawGuard {
            lab,
            run_dir: RunDir::new(name),
            _vm: Some(vm),
        }
    }
}

impl<'a> ThawGuard<'a> {
    /// A guard for a caller that holds the VM lock itself.
    pub fn new(lab: &'a Lab, name: &str) -> ThawGuard<'a> {
        ThawGuard {
            lab,
            run_dir: RunDir::new(name),
            _vm: None,
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
        let thawed = resume_and_thaw(self.lab);
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
