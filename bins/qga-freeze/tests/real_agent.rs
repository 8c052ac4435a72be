//! `qga-freeze`, `qga-thaw` and the QGA client against the lab VM's real qemu-ga.
//!
//! Every test holds a [`ThawGuard::lock`]: the VM to itself while it talks to it, and the
//! guest resumed and thawed when the test ends, however it ends.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evesnap::document::Document;
use evesnap::exit::{Exit, HasExit};
use evesnap::qga::commands::{guest_fsfreeze_thaw, GuestFsfreezeStatus};
use evesnap::qga::Address;
use evesnap::qmp::Qmp;
use evesnap_tests::guest::{
    address, code, connect, doc_of, guest_background, guest_sh, guest_upload, status, stderr,
    try_connect, ThawGuard,
};
use evesnap_tests::lab::Lab;

fn seconds(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not an uptime: {text:?}"))
}

#[test]
fn fsinfo_and_guest_exec_work_on_the_real_agent() {
    let guard = ThawGuard::lock("fsinfo");
    let lab = guard.lab;
    let mut client = connect(lab);
    let info = client.info().expect("guest-info");
    assert!(info.version.starts_with("7."), "{}", info.version);
    let fs = client.fsinfo().expect("guest-get-fsinfo parses as typed");
    for mount in lab.guest_mounts.values() {
        assert!(
            fs.iter().any(|f| &f.mountpoint == mount),
            "{mount} in {fs:?}"
        );
    }
    let out = guest_sh(&mut client, "echo hello; echo oops >&2; exit 0");
    assert_eq!(out, "hello\n");
    let r = client
        .guest_exec("/bin/sh", &["-c", "exit 3"], Duration::from_secs(10))
        .expect("exec");
    assert_eq!(r.exitcode, Some(3));
}

#[test]
fn freeze_all_blocks_a_guest_write_until_the_thaw() {
    freeze_all_blocks_a_guest_write_until_the_thaw_through(ThawGuard::lock("all"));
}

/// The same over vsock: the guest's second agent, through the hybrid vsock device.
#[test]
fn freeze_all_over_vsock_blocks_a_guest_write_until_the_thaw() {
    freeze_all_blocks_a_guest_write_until_the_thaw_through(ThawGuard::lock_vsock("all-vsock"));
}

fn freeze_all_blocks_a_guest_write_until_the_thaw_through(guard: ThawGuard<'static>) {
    let lab = guard.lab;
    {
        let mut client = connect(lab);
        guest_sh(&mut client, "rm -f /run/ev-t0 /run/ev-t1 /data0/ev-blocked");
        // Starts writing 1 s from now, i.e. while frozen.
        guest_background(
            &mut client,
            "sleep 1; cat /proc/uptime > /run/ev-t0; echo data > /data0/ev-blocked; cat /proc/uptime > /run/ev-t1",
        );
    }
    let out = guard.run(
        "qga-freeze",
        &["--agent", &lab.agent, "--thaw-after", "60"],
        None,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(
        doc.steps[0].fields["frozen"].as_i64(),
        Some(lab.guest_mounts.len() as i64)
    );
    {
        let mut client = connect(lab);
        assert_eq!(
            client.fsfreeze_status().expect("status"),
            GuestFsfreezeStatus::frozen
        );
        let err = client
            .guest_exec("/bin/true", &[], Duration::from_secs(5))
            .expect_err("disabled while frozen");
        assert!(
            matches!(err, evesnap::qga::Error::Disabled { .. }),
            "{err:?}"
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    let out = guard.run("qga-thaw", &[], Some(&doc.to_json()));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[1].fields["thawed"], doc.steps[0].fields["frozen"]);
    assert!(doc.steps[1].fields["watchdog_cancelled"]["pid"].is_u64());

    let mut client = connect(lab);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stamps = String::new();
    while Instant::now() < deadline {
        stamps = guest_sh(&mut client, "cat /run/ev-t0 /run/ev-t1 2>/dev/null; true");
        if stamps.lines().count() == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let lines: Vec<&str> = stamps.lines().collect();
    assert_eq!(lines.len(), 2, "both stamps: {stamps:?}");
    let (t0, t1) = (seconds(lines[0]), seconds(lines[1]));
    assert!(
        t1 - t0 >= 1.5,
        "the write waited for the thaw: started {t0}, done {t1}"
    );
    assert_eq!(
        guest_sh(
            &mut client,
            "cat /data0/ev-blocked; rm -f /data0/ev-blocked"
        ),
        "data\n"
    );
}

#[test]
fn freezing_data0_leaves_data1_writable() {
    let guard = ThawGuard::lock("list");
    let lab = guard.lab;
    {
        let mut client = connect(lab);
        guest_sh(
            &mut client,
            "rm -f /run/ev-a /run/ev-b /data1/ev-free /data0/ev-held",
        );
        guest_background(
            &mut client,
            "sleep 1; echo free > /data1/ev-free; cat /proc/uptime > /run/ev-a; \
             echo held > /data0/ev-held; cat /proc/uptime > /run/ev-b",
        );
    }
    let out = guard.run(
        "qga-freeze",
        &[
            "--agent",
            &lab.agent,
            "--mountpoint",
            "/data0",
            "--thaw-after",
            "60",
        ],
        None,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    assert_eq!(doc.steps[0].fields["frozen"], 1);
    assert_eq!(
        doc.steps[0].fields["mountpoints"],
        serde_json::json!(["/data0"])
    );
    let frozen_at = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let out = guard.run("qga-thaw", &[], Some(&doc.to_json()));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let thaw_after = frozen_at.elapsed().as_secs_f64();

    let mut client = connect(lab);
    let uptime_at_thaw = seconds(&guest_sh(&mut client, "cat /proc/uptime"));
    std::thread::sleep(Duration::from_millis(500));
    let stamps = guest_sh(&mut client, "cat /run/ev-a /run/ev-b");
    let lines: Vec<&str> = stamps.lines().collect();
    assert_eq!(lines.len(), 2, "{stamps:?}");
    let (a, b) = (seconds(lines[0]), seconds(lines[1]));
    assert!(
        uptime_at_thaw - a >= 1.0,
        "/data1 was written while /data0 was frozen: at {a}, thaw ~{uptime_at_thaw}"
    );
    assert!(
        b - a >= 1.5,
        "/data0 waited for the thaw: {a} → {b} (frozen ~{thaw_after:.1}s)"
    );
    assert_eq!(
        guest_sh(
            &mut client,
            "cat /data1/ev-free /data0/ev-held; rm -f /data1/ev-free /data0/ev-held"
        ),
        "free\nheld\n"
    );
}

#[test]
fn a_mountpoint_that_does_not_exist_fails_and_leaves_the_guest_thawed() {
    let guard = ThawGuard::lock("nomount");
    let lab = guard.lab;
    let out = guard.run(
        "qga-freeze",
        &["--agent", &lab.agent, "--mountpoint", "/no/such/mount"],
        None,
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("froze no filesystem"),
        "{}",
        stderr(&out)
    );
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
}

#[test]
fn stale_input_on_the_channel_does_not_break_the_next_run() {
    let guard = ThawGuard::lock("stale");
    let lab = guard.lab;
    let Address::Unix(path) = address(lab) else {
        panic!("the lab agent is a Unix socket")
    };
    // A client that asks and leaves before the reply; one that leaves half an object.
    for junk in [
        &b"{\"execute\": \"guest-get-fsinfo\", \"id\": 31337}\n"[..],
        b"{\"execute\": \"guest-ping\", \"argu",
    ] {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(junk).expect("write");
        drop(s);
    }
    // One that reads a little and leaves the rest (a reply of unknown length).
    {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(b"{\"execute\": \"guest-info\"}\n")
            .expect("write");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut some = [0u8; 10];
        let _ = s.read(&mut some);
    }
    let out = guard.run(
        "qga-freeze",
        &["--agent", &lab.agent, "--thaw-after", "60"],
        None,
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let doc = doc_of(&out);
    // Leave half an object again, between freeze and thaw.
    {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(b"{\"execute\": \"guest-fsfreeze-st")
            .expect("write");
    }
    let out = guard.run("qga-thaw", &[], Some(&doc.to_json()));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);
}

#[test]
fn a_paused_vm_times_out_with_the_timeout_code_and_is_thawed_after_resuming() {
    let guard = ThawGuard::lock("paused");
    let lab = guard.lab;
    let mut qmp = Qmp::connect(&lab.qmp, Duration::from_secs(10)).expect("qmp");

    // The binary, paused before it connects: the agent never answers.
    qmp.stop().expect("stop");
    let started = Instant::now();
    let out = guard.run(
        "qga-freeze",
        &["--agent", &lab.agent, "--timeout", "2"],
        None,
    );
    let took = started.elapsed();
    assert_eq!(
        code(&out),
        Exit::AgentTimeout.code() as i32,
        "{}",
        stderr(&out)
    );
    assert!(
        took < Duration::from_secs(5),
        "failed within the timeout: {took:?}"
    );
    let out = guard.run("qga-thaw", &["--agent", &lab.agent, "--timeout", "1"], None);
    assert_eq!(
        code(&out),
        Exit::ThawFailed.code() as i32,
        "a thaw that cannot be verified: {}",
        stderr(&out)
    );
    qmp.cont().expect("cont");
    assert_eq!(status(lab), GuestFsfreezeStatus::thawed);

    // The library, paused between connecting and freezing: the freeze request is queued
    // and runs when the VM resumes, and so does the thaw queued behind it.
    let mut client = connect(lab);
    qmp.stop().expect("stop");
    let opts = qga_freeze::FreezeOptions {
        timeout: Duration::from_secs(2),
        thaw_after: None,
        ..Default::default()
    };
    let started = Instant::now();
    let err = qga_freeze::freeze(&mut client, &opts).expect_err("no answer while paused");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.exit(), Exit::AgentTimeout, "{err}");
    let aftermath = err.aftermath().cloned();
    drop(client);
    qmp.cont().expect("cont");
    // guest-info (preflight) already timed out while paused, or the freeze did; either way
    // the guest must end thawed without anyone else's help.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = status(lab);
    while last != GuestFsfreezeStatus::thawed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        last = status(lab);
    }
    assert_eq!(
        last,
        GuestFsfreezeStatus::thawed,
        "after cont the guest is thawed ({aftermath:?})"
    );
}

#[test]
fn a_freeze_whose_reply_is_lost_is_thawed_by_the_queued_thaw() {
    let guard = ThawGuard::lock("lost");
    let lab = guard.lab;
    let mut qmp = Qmp::connect(&lab.qmp, Duration::from_secs(10)).expect("qmp");
    let mut client = connect(lab);
    // Preflight done by hand, then pause right before the freeze goes out.
    assert_eq!(
        client.fsfreeze_status().expect("status"),
        GuestFsfreezeStatus::thawed
    );
    qmp.stop().expect("stop");
    let err = client
        .execute_within(
            evesnap::qga::commands::guest_fsfreeze_freeze {},
            Duration::from_secs(2),
        )
        .expect_err("paused");
    assert!(err.is_timeout(), "{err:?}");
    let queued = client.execute_unsynced(guest_fsfreeze_thaw {}, Duration::from_secs(1));
    assert!(queued.as_ref().is_err_and(|e| e.is_timeout()), "{queued:?}");
    qmp.cont().expect("cont");
    // Same connection: the late freeze reply (other id) is skipped, the thaw's is ours.
    let thawed = client.execute_unsynced(
        evesnap::qga::commands::guest_fsfreeze_status {},
        Duration::from_secs(20),
    );
    assert_eq!(
        thawed.expect("status after resume"),
        GuestFsfreezeStatus::thawed,
        "freeze then queued thaw ran"
    );
}

#[test]
fn the_watchdog_thaws_after_qga_freeze_is_killed() {
    let guard = ThawGuard::lock("sigkill");
    let lab = guard.lab;
    let mut child = Command::new(evesnap_tests::bin("qga-freeze"))
        .args(["--agent", &lab.agent, "--thaw-after", "5"])
        .env("EVESNAP_RUN_DIR", guard.run_dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Read until the document is complete (the freeze is done), then SIGKILL at once.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut text = Vec::new();
    let mut chunk = [0u8; 4096];
    while Document::from_json(&String::from_utf8_lossy(&text)).is_err() {
        let n = stdout.read(&mut chunk).expect("read");
        assert!(n > 0, "qga-freeze ended without a document");
        text.extend_from_slice(&chunk[..n]);
    }
    let frozen_at = Instant::now();
    let _ = child.kill();
    let _ = child.wait();
    let doc = Document::from_json(&String::from_utf8_lossy(&text)).expect("doc");
    assert!(doc.ok, "{doc:?}");
    let pid = doc.steps[0].fields["watchdog"]["pid"]
        .as_u64()
        .expect("watchdog pid") as u32;
    assert_eq!(
        status(lab),
        GuestFsfreezeStatus::frozen,
        "still frozen after the kill"
    );
    let deadline = frozen_at + Duration::from_secs(5 + 20);
    let mut last = GuestFsfreezeStatus::frozen;
    while last == GuestFsfreezeStatus::frozen && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        last = status(lab);
    }
    let thawed_after = frozen_at.elapsed();
    assert_eq!(last, GuestFsfreezeStatus::thawed, "the watchdog thawed");
    assert!(
        thawed_after >= Duration::from_secs(4),
        "not before its deadline: {thawed_after:?}"
    );
    eprintln!(
        "watchdog thawed {:.1} s after the freeze (deadline 5 s)",
        thawed_after.as_secs_f64()
    );
    let gone = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the watchdog exited"
    );
}

#[test]
fn freeze_and_thaw_timings() {
    let guard = ThawGuard::lock("timing");
    let lab = guard.lab;
    let mut client = connect(lab);
    let opts = qga_freeze::FreezeOptions {
        thaw_after: None,
        ..Default::default()
    };
    let mut freeze_ms = Vec::new();
    let mut window_ms = Vec::new();
    let mut thaw_ms = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let report = qga_freeze::freeze(&mut client, &opts).expect("freeze");
        let frozen = Instant::now();
        let thaw = qga_thaw::thaw(
            &mut client,
            &qga_thaw::ThawOptions {
                expected: report.frozen,
                cancel_watchdog: false,
                ..Default::default()
            },
        )
        .expect("thaw");
        window_ms.push(evesnap::time::millis(frozen.duration_since(started)));
        freeze_ms.push(report.freeze_ms);
        thaw_ms.push(thaw.thaw_ms);
    }
    eprintln!("freeze command ms {freeze_ms:?}; freeze() incl. preflight+verify ms {window_ms:?}; thaw command ms {thaw_ms:?}");
}

/// Stops the second agent of the vsock test; qemu-ga thaws what it froze when it exits.
struct SecondAgent<'a>(&'a Lab);

impl Drop for SecondAgent<'_> {
    fn drop(&mut self) {
        if let Ok(mut client) = try_connect(self.0, Duration::from_secs(30)) {
            // By its pid file; it may ignore SIGTERM while idle, so SIGKILL follows (the
            // ThawGuard, dropped after this, thaws every mount through the main agent).
            let script = "p=$(cat /run/ev-qga2.pid 2>/dev/null) || exit 0; kill $p; sleep 1; \
                          kill -9 $p 2>/dev/null; rm -f /run/ev-qga2.pid; true";
            let _ = client.guest_exec("/bin/sh", &["-c", script], Duration::from_secs(20));
        }
    }
}

#[test]
fn the_vsock_transport_reaches_an_agent_inside_the_guest() {
    let guard = ThawGuard::lock("vsock");
    let lab = guard.lab;
    // Before the client: dropped after it, as it needs the agent socket to itself.
    let _second = SecondAgent(lab);
    let mut client = connect(lab);
    let probe = guest_sh(
        &mut client,
        "test -e /dev/vsock && grep -q '^vsock_loopback ' /proc/modules && command -v qemu-ga; true",
    );
    let Some(qemu_ga) = probe.lines().next().map(str::to_string) else {
        eprintln!("SKIP the_vsock_transport_reaches_an_agent_inside_the_guest: the lab guest has no /dev/vsock with vsock_loopback");
        return;
    };
    // The tools, stripped, into the guest (same Debian userland: same libc).
    let mut copies = Vec::new();
    for tool in ["qga-freeze", "qga-thaw"] {
        let stripped = guard.run_dir.path().join(tool);
        let strip = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(evesnap_tests::bin(tool))
            .status();
        if !strip.is_ok_and(|s| s.success()) {
            eprintln!("SKIP the_vsock_transport_reaches_an_agent_inside_the_guest: no `strip` on this host (binutils) to shrink {tool}");
            return;
        }
        copies.push((stripped, format!("/run/ev-{tool}")));
    }
    // Rust's unwinder library: the guest's initramfs has only what qemu-ga needs.
    let libgcc = Path::new("/lib/x86_64-linux-gnu/libgcc_s.so.1");
    if !libgcc.exists() {
        eprintln!("SKIP the_vsock_transport_reaches_an_agent_inside_the_guest: no {} to copy into the guest", libgcc.display());
        return;
    }
    guest_sh(&mut client, "mkdir -p /run/ev-lib");
    copies.push((libgcc.to_path_buf(), "/run/ev-lib/libgcc_s.so.1".into()));
    for (local, remote) in &copies {
        // Kept in the guest between runs: uploading through TCG takes a while.
        let size = std::fs::metadata(local).map(|m| m.len()).unwrap_or(0);
        let there = guest_sh(
            &mut client,
            &format!("stat -c %s {remote} 2>/dev/null; true"),
        );
        if there.trim() != size.to_string() {
            guest_upload(&mut client, local, remote);
        }
    }
    // A second qemu-ga in the guest, listening on vsock port 4444 of the local CID (1).
    guest_sh(
        &mut client,
        "chmod 755 /run/ev-qga-freeze /run/ev-qga-thaw; mkdir -p /run/ev-qga2",
    );
    guest_sh(
        &mut client,
        &format!("{qemu_ga} -d -m vsock-listen -p 1:4444 -t /run/ev-qga2 -f /run/ev-qga2.pid -l /run/ev-qga2.log"),
    );
    let out = guest_sh(
        &mut client,
        "LD_LIBRARY_PATH=/run/ev-lib /run/ev-qga-freeze --agent vsock:1:4444 --mountpoint /data1 --thaw-after 0 --connect-timeout 20 </dev/null",
    );
    let doc = Document::from_json(&out)
        .unwrap_or_else(|e| panic!("no document from the guest ({e}): {out}"));
    assert_eq!(doc.agent.as_deref(), Some("vsock:1:4444"));
    assert_eq!(doc.steps[0].fields["frozen"], 1, "{doc:?}");
    let out = guest_sh(
        &mut client,
        &format!(
            "echo '{}' | LD_LIBRARY_PATH=/run/ev-lib /run/ev-qga-thaw",
            doc.to_json().replace('\'', "")
        ),
    );
    let doc = Document::from_json(&out)
        .unwrap_or_else(|e| panic!("no document from the guest ({e}): {out}"));
    assert_eq!(doc.steps[1].fields["thawed"], 1, "{doc:?}");
    assert!(doc.ok);
    eprintln!(
        "vsock (in-guest loopback): freeze {} ms, thaw {} ms",
        doc.steps[0].fields["freeze_ms"], doc.steps[1].fields["thaw_ms"]
    );
}
