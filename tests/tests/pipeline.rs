//! A pipeline broken after the freeze thaws the guest at once, not at the watchdog's
//! deadline: a mistyped middle or last step, a middle step killed while it works or right
//! after it read, a next step that exits without reading. Each
//! pipeline runs on the lab VM through bash (argv passed as positional parameters, never
//! interpolated) with a 60 s watchdog, so a thaw within seconds can only be the prompt one.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use evesnap::qga::commands::GuestFsfreezeStatus;
use evesnap::qga::{Address, Client};
use evesnap_tests::bin;
use evesnap_tests::lab::{test_lab, test_lab_vsock, vm_lock, Lab};
use evesnap_tests::run::RunDir;

/// A broken pipeline must have thawed the guest within this long after it broke.
const PROMPT: Duration = Duration::from_secs(2);

/// Runs `script` in bash with `args` as $1…, and returns its output; the script echoes
/// `${PIPESTATUS[@]}` last on stdout.
fn bash(script: &str, args: &[&str], run_dir: &Path) -> Command {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(script)
        .arg("pipeline")
        .args(args)
        .env("EVESNAP_RUN_DIR", run_dir)
        .stdin(Stdio::null());
    command
}

fn codes(out: &Output) -> Vec<i32> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    last.split_whitespace()
        .map(|c| c.parse().unwrap_or(-1))
        .collect()
}

fn freeze_state(agent: &str) -> GuestFsfreezeStatus {
    let address: Address = agent.parse().expect("agent address");
    let mut client =
        Client::connect(&address, Instant::now() + Duration::from_secs(10)).expect("agent");
    client.fsfreeze_status().expect("guest-fsfreeze-status")
}

/// Waits up to [`PROMPT`] for the guest to be thawed; says how long it took.
fn thawed_within_prompt(agent: &str) -> Duration {
    let started = Instant::now();
    loop {
        if freeze_state(agent) == GuestFsfreezeStatus::thawed {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < PROMPT,
            "the guest is still frozen {PROMPT:?} after the pipeline broke"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long after `marker` was written the guest was seen thawed (waiting up to [`PROMPT`]
/// from now): the marker is touched when the step that broke the pipeline exited.
fn thawed_after(agent: &str, marker: &Path) -> Duration {
    thawed_within_prompt(agent);
    let exited = std::fs::metadata(marker)
        .and_then(|m| m.modified())
        .expect("the breaking step's exit marker");
    std::time::SystemTime::now()
        .duration_since(exited)
        .unwrap_or_default()
}

/// A pipeline with a 60 s watchdog must end well before it.
const WELL_BEFORE_THE_DEADLINE: Duration = Duration::from_secs(10);

fn tools() -> [String; 3] {
    ["qga-freeze", "zsnap", "qga-thaw"].map(|t| bin(t).display().to_string())
}

#[test]
fn a_mistyped_middle_step_thaws_at_once_and_every_exit_says_so() {
    a_mistyped_middle_step_thaws_at_once_and_every_exit_says_so_on(test_lab());
}

/// The same over vsock: the guest's second agent, through the hybrid vsock device.
#[test]
fn over_vsock_a_mistyped_middle_step_thaws_at_once() {
    a_mistyped_middle_step_thaws_at_once_and_every_exit_says_so_on(test_lab_vsock());
}

fn a_mistyped_middle_step_thaws_at_once_and_every_exit_says_so_on(lab: &Lab) {
    let _vm = vm_lock();
    let run_dir = RunDir::new("typo-middle");
    let [freeze, zsnap, thaw] = tools();
    let marker = run_dir.path().join("middle-exited");
    let marker_text = marker.display().to_string();
    let started = Instant::now();
    let out = bash(
        r#""$1" --agent "$4" --thaw-after 60 | { "$2" --datset "$5" --name typo; s=$?; : > "$6"; exit $s; } | "$3"; echo "${PIPESTATUS[@]}""#,
        &[&freeze, &zsnap, &thaw, &lab.agent, &lab.datasets[0], &marker_text],
        run_dir.path(),
    )
    .output()
    .expect("bash");
    let ended = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended < WELL_BEFORE_THE_DEADLINE, "took {ended:?}: {stderr}");
    let codes = codes(&out);
    assert_eq!(codes.len(), 3, "{stderr}");
    assert_eq!(codes[1], 2, "the mistyped zsnap: {stderr}");
    assert_ne!(
        codes[0], 0,
        "qga-freeze could not pass its document on: {stderr}"
    );
    assert_ne!(codes[2], 0, "qga-thaw got nothing: {stderr}");
    assert!(stderr.contains("the guest was thawed"), "{stderr}");
    let took = thawed_after(&lab.agent, &marker);
    assert!(
        took < PROMPT,
        "thawed {took:?} after the mistyped zsnap exited"
    );
}

#[test]
fn a_mistyped_last_step_thaws_at_once() {
    let lab = test_lab();
    let _vm = vm_lock();
    let run_dir = RunDir::new("typo-last");
    let [freeze, zsnap, thaw] = tools();
    let name = format!("pipeline-last-{}", std::process::id());
    let marker = run_dir.path().join("last-exited");
    let marker_text = marker.display().to_string();
    let started = Instant::now();
    let out = bash(
        r#""$1" --agent "$4" --thaw-after 60 | "$2" --dataset "$5" --name "$6" | { "$3" --agnt x; s=$?; : > "$7"; exit $s; }; echo "${PIPESTATUS[@]}""#,
        &[&freeze, &zsnap, &thaw, &lab.agent, &lab.datasets[0], &name, &marker_text],
        run_dir.path(),
    )
    .output()
    .expect("bash");
    let ended = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended < WELL_BEFORE_THE_DEADLINE, "took {ended:?}: {stderr}");
    let codes = codes(&out);
    assert_eq!(codes.get(2), Some(&2), "the mistyped qga-thaw: {stderr}");
    assert_ne!(
        codes.get(1),
        Some(&0),
        "zsnap could not pass its document on: {stderr}"
    );
    let took = thawed_after(&lab.agent, &marker);
    // The mistyped qga-thaw exits at once; zsnap's snapshot and the thaw follow it.
    assert!(
        took < PROMPT,
        "thawed {took:?} after the mistyped qga-thaw exited"
    );
    let _ = Command::new("zfs")
        .args(["destroy", &format!("{}@{name}", lab.datasets[0])])
        .status();
}

#[test]
fn a_middle_step_that_exits_right_after_reading_thaws_at_once() {
    let lab = test_lab();
    let _vm = vm_lock();
    let run_dir = RunDir::new("read-exit");
    let [freeze, _, thaw] = tools();
    let marker = run_dir.path().join("middle-exited");
    let marker_text = marker.display().to_string();
    let started = Instant::now();
    // One read takes the whole document in, then the step ends before it could register
    // with the watchdog or pass anything on: a zsnap killed in that instant.
    let out = bash(
        r#""$1" --agent "$3" --thaw-after 60 | { dd bs=65536 count=1 of=/dev/null status=none; s=$?; : > "$4"; exit $s; } | "$2"; echo "${PIPESTATUS[@]}""#,
        &[&freeze, &thaw, &lab.agent, &marker_text],
        run_dir.path(),
    )
    .output()
    .expect("bash");
    let ended = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended < WELL_BEFORE_THE_DEADLINE, "took {ended:?}: {stderr}");
    let codes = codes(&out);
    assert_eq!(codes.first(), Some(&0), "the document was read: {stderr}");
    assert_ne!(codes.get(2), Some(&0), "qga-thaw got nothing: {stderr}");
    let took = thawed_after(&lab.agent, &marker);
    assert!(
        took < PROMPT,
        "thawed {took:?} after the middle step exited"
    );
    eprintln!("thawed {took:?} after the middle step exited; the pipeline took {ended:?}");
}

#[test]
fn a_next_step_that_exits_without_reading_fails_the_freeze_and_thaws_at_once() {
    let lab = test_lab();
    let _vm = vm_lock();
    let run_dir = RunDir::new("unread");
    let [freeze, _, _] = tools();
    let marker = run_dir.path().join("reader-exited");
    let marker_text = marker.display().to_string();
    let started = Instant::now();
    // The reader is there when the document is written, and exits without reading it.
    let out = bash(
        r#""$1" --agent "$2" --thaw-after 60 | { python3 -c 'import select, sys; select.select([sys.stdin], [], [])'; : > "$3"; }; echo "${PIPESTATUS[@]}""#,
        &[&freeze, &lab.agent, &marker_text],
        run_dir.path(),
    )
    .output()
    .expect("bash");
    let ended = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(ended < WELL_BEFORE_THE_DEADLINE, "took {ended:?}: {stderr}");
    assert_eq!(codes(&out), [1, 0], "{stderr}");
    assert!(
        stderr.contains("the next step exited without reading the document")
            && stderr.contains("the watchdog thawed the guest"),
        "{stderr}"
    );
    let took = thawed_after(&lab.agent, &marker);
    assert!(took < PROMPT, "thawed {took:?} after the reader exited");
    eprintln!("thawed {took:?} after the reader exited; the pipeline took {ended:?}");
}

#[test]
fn a_middle_step_killed_while_it_snapshots_thaws_at_once() {
    a_middle_step_killed_while_it_snapshots_thaws_at_once_on(test_lab());
}

/// The same over vsock: the guest's second agent, through the hybrid vsock device.
#[test]
fn over_vsock_a_middle_step_killed_while_it_snapshots_thaws_at_once() {
    a_middle_step_killed_while_it_snapshots_thaws_at_once_on(test_lab_vsock());
}

fn a_middle_step_killed_while_it_snapshots_thaws_at_once_on(lab: &Lab) {
    let _vm = vm_lock();
    let run_dir = RunDir::new("killed-middle");
    // A zfs whose `snapshot` hangs: the marker says zsnap is inside it, with its pid group.
    let marker = run_dir.path().join("snapshot-started");
    let shim = run_dir.path().join("zfs");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nif [ \"$1\" = snapshot ] && [ $# -gt 1 ]; then echo $$ > '{}'; exec sleep 600; fi\nexec zfs \"$@\"\n",
            marker.display()
        ),
    )
    .expect("shim");
    let mut perms = std::fs::metadata(&shim).expect("shim").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&shim, perms).expect("chmod");
    let [freeze, zsnap, thaw] = tools();
    let shim_text = shim.display().to_string();
    let pipeline = bash(
        r#""$1" --agent "$4" --thaw-after 60 | "$2" --zfs "$6" --dataset "$5" --name killed | "$3"; echo "${PIPESTATUS[@]}""#,
        &[&freeze, &zsnap, &thaw, &lab.agent, &lab.datasets[0], &shim_text],
        run_dir.path(),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("bash");
    let started = Instant::now();
    let shim_pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "zsnap never reached zfs snapshot"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(freeze_state(&lab.agent), GuestFsfreezeStatus::frozen);
    // zsnap is the shim's parent.
    let status = std::fs::read_to_string(format!("/proc/{shim_pid}/status")).expect("status");
    let zsnap_pid: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("zsnap's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(zsnap_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill zsnap");
    let took = thawed_within_prompt(&lab.agent);
    // The hung zfs is the test's to end (zsnap died before its deadline could).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let out = pipeline.wait_with_output().expect("pipeline");
    let codes = codes(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(codes.get(1), Some(&137), "zsnap was killed: {stderr}");
    assert_ne!(codes.get(2), Some(&0), "qga-thaw got nothing: {stderr}");
    eprintln!("thawed {took:?} after zsnap was killed");
}

#[test]
fn a_snapshot_orphaned_by_a_killed_zsnap_and_finished_after_the_thaw_claims_no_freeze() {
    let lab = test_lab();
    let _vm = vm_lock();
    let run_dir = RunDir::new("orphan");
    // A zfs whose `snapshot` waits 2 s, then runs: killing zsnap meanwhile leaves it to
    // finish on its own (its own process group), after the watchdog's prompt thaw, with
    // the argv zsnap gave it. That is what a `zfs snapshot` stuck in its kernel call does.
    let marker = run_dir.path().join("snapshot-started");
    let shim = run_dir.path().join("zfs");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\nif [ \"$1\" = snapshot ] && [ $# -gt 1 ]; then echo $$ > '{}'; sleep 2; exec zfs \"$@\"; fi\nexec zfs \"$@\"\n",
            marker.display()
        ),
    )
    .expect("shim");
    let mut perms = std::fs::metadata(&shim).expect("shim").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&shim, perms).expect("chmod");
    let [freeze, zsnap, thaw] = tools();
    let shim_text = shim.display().to_string();
    let name = format!("orphan-{}", std::process::id());
    let snapshot = format!("{}@{name}", lab.datasets[0]);
    let pipeline = bash(
        r#""$1" --agent "$4" --thaw-after 60 | "$2" --zfs "$6" --dataset "$5" --name "$7" | "$3"; echo "${PIPESTATUS[@]}""#,
        &[&freeze, &zsnap, &thaw, &lab.agent, &lab.datasets[0], &shim_text, &name],
        run_dir.path(),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("bash");
    let started = Instant::now();
    let shim_pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&marker)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "zsnap never reached zfs snapshot"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = std::fs::read_to_string(format!("/proc/{shim_pid}/status")).expect("status");
    let zsnap_pid: i32 = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("zsnap's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(zsnap_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill zsnap");
    let took = thawed_within_prompt(&lab.agent);
    let out = pipeline.wait_with_output().expect("pipeline");
    // The orphan finishes by itself (its pid is gone once it did).
    let orphan_started = Instant::now();
    while std::path::Path::new(&format!("/proc/{shim_pid}")).exists() {
        assert!(
            orphan_started.elapsed() < Duration::from_secs(60),
            "the orphaned zfs did not finish"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let frozen = evesnap_tests::zfs::zfs_get("org.lfedge.evesnap:frozen", &snapshot);
    let _ = Command::new("zfs").args(["destroy", &snapshot]).status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(codes(&out).get(1), Some(&137), "zsnap was killed: {stderr}");
    assert_eq!(
        frozen, "false",
        "{snapshot} was created by a zfs that outlived zsnap, ~2 s after the thaw ({took:?} after \
         the kill): it must not claim a freeze"
    );
    eprintln!("thawed {took:?} after zsnap was killed; the orphan's snapshot says frozen={frozen}");
}
