//! `eve-guest-agent` on this machine, with the test as the host end of the channel (a Unix
//! socket: the tool takes one where a virtio-serial port would be). The guest side on the
//! real port runs in the lab tests of `snap-orchestrate serve`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::process::{Command, Output};
use std::time::Duration;

use evesnap_tests::run::{code, stderr, RunDir};
use serde_json::{json, Value};

fn tool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eve-guest-agent"))
        .args(args)
        .output()
        .expect("run eve-guest-agent")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {:?}; stderr: {}",
            out.stdout,
            stderr(out)
        )
    })
}

/// A block device of this machine that sysfs knows (only stat'ed, never opened).
fn some_block_device() -> Option<String> {
    let entries = std::fs::read_dir("/sys/dev/block").ok()?;
    for entry in entries.flatten() {
        let target = std::fs::canonicalize(entry.path()).ok()?;
        let name = target.file_name()?.to_string_lossy().into_owned();
        let dev = format!("/dev/{name}");
        if std::fs::metadata(&dev).is_ok_and(|m| m.file_type().is_block_device()) {
            return Some(dev);
        }
    }
    None
}

#[test]
fn help_documents_the_exit_codes() {
    let out = tool(&["snapshot", "--help"]);
    assert_eq!(code(&out), 0);
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--create",
        "--rollback",
        "--channel",
        "3   the host is unreachable",
        "4   no reply",
        "8   another request",
    ] {
        assert!(help.contains(needle), "{needle}: {help}");
    }
}

#[test]
fn usage_and_unidentifiable_disks_exit_2() {
    for args in [
        &["snapshot"][..],
        &["snapshot", "--rollback", "/dev/vda"],
        &["snapshot", "--list", "/dev/vda", "--name", "x"],
        &["snapshot", "--create", "/a", "--list", "/b"],
    ] {
        assert_eq!(code(&tool(args)), 2, "{args:?}");
    }
    let dir = RunDir::new("ega-usage");
    for (target, needle) in [
        ("data0", "not an absolute path"),
        ("/nonexistent/evesnap", "cannot read"),
        (
            dir.path().to_str().expect("utf-8"),
            "neither a block device nor a mountpoint",
        ),
    ] {
        let out = tool(&["snapshot", "--create", target, "--channel", "/nonexistent"]);
        assert_eq!(code(&out), 2, "{target}: {}", stderr(&out));
        let reply = stdout_json(&out);
        assert_eq!(
            (reply["ok"].as_bool(), reply["error"]["kind"].as_str()),
            (Some(false), Some("bad-input")),
            "{reply}"
        );
        // The reply's own shape: `id` null, no `op`, an error of kind, code and message.
        let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(
            keys(&reply),
            Some(vec![
                "version".into(),
                "id".into(),
                "ok".into(),
                "error".into()
            ])
        );
        assert_eq!(
            keys(&reply["error"]),
            Some(vec!["kind".into(), "code".into(), "message".into()])
        );
        let strict: evesnap::request::Reply =
            serde_json::from_value(reply).expect("a strict Reply");
        assert_eq!((strict.id, strict.error.map(|e| e.code)), (None, Some(2)));
        assert!(stderr(&out).contains(needle), "{target}: {}", stderr(&out));
    }
}

#[test]
fn the_host_answers_refuses_is_missing_or_stays_silent() {
    let Some(device) = some_block_device() else {
        eprintln!("SKIP the_host_answers_refuses_is_missing_or_stays_silent: no block device in /sys/dev/block here");
        return;
    };
    let dir = RunDir::new("ega-host");
    let channel = dir.path().join("request.sock");

    // No channel at all: 3.
    let out = tool(&[
        "snapshot",
        "--list",
        &device,
        "--channel",
        channel.to_str().expect("utf-8"),
    ]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["error"]["kind"], "host-unreachable");

    let listener = UnixListener::bind(&channel).expect("bind");
    let host = |answer: fn(&Value) -> Vec<u8>, close: bool, args: Vec<String>| {
        let child = Command::new(env!("CARGO_BIN_EXE_eve-guest-agent"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let (stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        while line.trim().is_empty() {
            line.clear();
            assert!(
                reader.read_line(&mut line).expect("read the request") > 0,
                "no request"
            );
        }
        let request: Value = serde_json::from_str(&line).expect("the request is JSON");
        let mut writer = stream;
        let _ = writer.write_all(&answer(&request));
        let keep = (!close).then_some((writer, reader));
        let out = child.wait_with_output().expect("wait");
        drop(keep);
        (request, out)
    };
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = ["snapshot", "--channel", channel.to_str().expect("utf-8")]
            .map(String::from)
            .to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // Answered after a stale reply and garbage: 0, and the request is what the protocol says.
    let (request, out) = host(
        |r| {
            format!(
                "{}\n\u{1}garbage\n{}\n",
                json!({"version": 1, "id": "stale", "ok": false}),
                json!({"version": 1, "id": r["id"], "ok": true, "op": "create", "snapshot": "s1"})
            )
            .into_bytes()
        },
        false,
        args(&["--create", &device, "--name", "s1"]),
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["snapshot"], "s1");
    let parsed: evesnap::request::Request =
        serde_json::from_value(request.clone()).expect("a strict request");
    parsed.check().expect("valid");
    assert_eq!(
        (parsed.op, parsed.name.as_deref()),
        (evesnap::request::Op::Create, Some("s1"))
    );
    assert_eq!(
        parsed.disk.device.as_deref(),
        Some(device.as_str()),
        "{request}"
    );

    // Refused: 1, the host's reply on stdout.
    let (_, out) = host(
        |r| {
            format!(
                "{}\n",
                json!({"version": 1, "id": r["id"], "ok": false,
                       "error": {"kind": "unknown-disk", "code": 7, "message": "not one of this VM's volumes"}})
            )
            .into_bytes()
        },
        false,
        args(&["--rollback", &device, "--to", "s1"]),
    );
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["error"]["kind"], "unknown-disk");
    assert!(
        stderr(&out).contains("the host refused the request (unknown-disk)"),
        "{}",
        stderr(&out)
    );

    // Silent: 4.
    let (request, out) = host(
        |_| Vec::new(),
        false,
        args(&["--list", &device, "--timeout", "0.5"]),
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let reply = stdout_json(&out);
    assert_eq!(
        (reply["error"]["kind"].as_str(), &reply["id"]),
        (Some("host-timeout"), &request["id"])
    );

    // Gone before answering: 3.
    let (_, out) = host(
        |_| b"{\"id\": \"other\"}\n".to_vec(),
        true,
        args(&["--list", &device]),
    );
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(stderr(&out).contains("went away"), "{}", stderr(&out));
}

#[test]
fn a_bad_vsock_channel_is_usage_and_no_vsock_host_is_unreachable() {
    let out = tool(&["snapshot", "--list", "/dev/vda", "--channel", "vsock:x:1"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("vsock:<cid>:<port>"),
        "{}",
        stderr(&out)
    );
    let Some(device) = some_block_device() else {
        eprintln!("SKIP a_bad_vsock_channel_is_usage_and_no_vsock_host_is_unreachable: no block device in /sys/dev/block here");
        return;
    };
    // This machine is no guest: whether it has a vsock transport or not, nothing listens
    // for a guest on CID 2 here. The default channel is vsock; the tool gives up by its
    // connect timeout with exit 3.
    let started = std::time::Instant::now();
    let out = tool(&["snapshot", "--list", &device, "--connect-timeout", "1"]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    let reply = stdout_json(&out);
    assert_eq!(reply["error"]["kind"], "host-unreachable", "{reply}");
    assert!(stderr(&out).contains("vsock"), "{}", stderr(&out));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
