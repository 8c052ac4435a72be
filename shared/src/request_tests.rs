//! Tests of the VM wire (shared/src/request.rs).

use crate::request::*;

fn request(json: &str) -> Result<Request, Invalid> {
    Request::from_line(json.as_bytes())
}

const DISK: &str =
    r#""disk":{"path":"/data0","device":"/dev/vda","serial":"disk0","pci":"0000:00:07.0"}"#;

#[test]
fn valid_requests_round_trip() {
    for json in [
        format!(r#"{{"version":1,"id":"a1","op":"create",{DISK}}}"#),
        format!(r#"{{"version":1,"id":"a1","op":"create",{DISK},"name":"before-upgrade"}}"#),
        format!(r#"{{"version":1,"id":"a.b_c-9","op":"list",{DISK}}}"#),
        format!(r#"{{"version":1,"id":"x","op":"rollback",{DISK},"to":"s1"}}"#),
    ] {
        let r = request(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
        let line = r.to_line();
        assert_eq!(line[0], b'\n');
        assert_eq!(
            request(std::str::from_utf8(&line[1..]).expect("utf-8").trim()),
            Ok(r)
        );
    }
}

#[test]
fn bad_requests_are_refused_with_a_reason() {
    for (json, needle) in [
        (
            r#"{"version":1,"id":"a","op":"create","disk":{"path":"/d"},"dataset":"pool/other"}"#
                .to_string(),
            "unknown field `dataset`",
        ),
        (
            r#"{"version":1,"id":"a","op":"create","disk":{"path":"/d","dataset":"p/x"}}"#
                .to_string(),
            "unknown field `dataset`",
        ),
        (
            r#"{"version":2,"id":"a","op":"list","disk":{"path":"/d"}}"#.to_string(),
            "version 2",
        ),
        (
            r#"{"version":1,"id":"a b","op":"list","disk":{"path":"/d"}}"#.to_string(),
            "`id`",
        ),
        (
            format!(
                r#"{{"version":1,"id":"{}","op":"list","disk":{{"path":"/d"}}}}"#,
                "a".repeat(65)
            ),
            "`id`",
        ),
        (
            r#"{"version":1,"id":"a","op":"destroy","disk":{"path":"/d"}}"#.to_string(),
            "destroy",
        ),
        (
            r#"{"version":1,"id":"a","op":"create","disk":{"path":"/d"},"name":"x@y"}"#.to_string(),
            "`name`",
        ),
        (
            r#"{"version":1,"id":"a","op":"create","disk":{"path":"/d"},"name":"-x"}"#.to_string(),
            "`name`",
        ),
        (
            r#"{"version":1,"id":"a","op":"create","disk":{"path":"/d"},"name":"a/b"}"#.to_string(),
            "`name`",
        ),
        (
            r#"{"version":1,"id":"a","op":"rollback","disk":{"path":"/d"}}"#.to_string(),
            "needs `to`",
        ),
        (
            r#"{"version":1,"id":"a","op":"rollback","disk":{"path":"/d"},"to":"../x"}"#
                .to_string(),
            "`to`",
        ),
        (
            r#"{"version":1,"id":"a","op":"list","disk":{"path":"/d"},"name":"x"}"#.to_string(),
            "list",
        ),
        (
            r#"{"version":1,"id":"a","op":"list","disk":{"path":"/d"},"quiesced":true}"#
                .to_string(),
            "`quiesced`",
        ),
        (
            r#"{"version":1,"id":"a","op":"rollback","disk":{"path":"/d"},"to":"x","accept_crash":true}"#
                .to_string(),
            "`accept_crash`",
        ),
        (
            r#"{"version":1,"id":"a","op":"create","disk":{"path":"/d"},"deadline_ms":-1}"#
                .to_string(),
            "expected u64",
        ),
        (
            r#"{"version":1,"id":"a","op":"list","disk":{"path":"data0"}}"#.to_string(),
            "absolute",
        ),
        (
            r#"{"version":1,"id":"a","op":"list","disk":{"path":"/d","serial":"a\nb"}}"#
                .to_string(),
            "control",
        ),
        (
            r#"{"version":1,"id":"a","op":"list","disk":{"path":"/d","serial":""}}"#.to_string(),
            "empty",
        ),
        ("not json".to_string(), "not a valid request"),
        (
            r#"{"version":1,"id":"a","op":"list"}"#.to_string(),
            "missing field `disk`",
        ),
    ] {
        let err = request(&json).expect_err(&json);
        assert!(err.0.contains(needle), "{json}: {err}");
    }
}

#[test]
fn ids_are_salvaged_only_when_valid() {
    assert_eq!(
        salvage_id(br#"{"id":"abc","op":"nope"}"#),
        Some("abc".into())
    );
    assert_eq!(salvage_id(br#"{"id":"a b"}"#), None);
    assert_eq!(salvage_id(br#"{"id":7}"#), None);
    assert_eq!(salvage_id(b"\xff\xfe garbage"), None);
}

#[test]
fn replies_parse_back_strictly() {
    let r = request(&format!(
        r#"{{"version":1,"id":"a1","op":"create",{DISK}}}"#
    ))
    .expect("valid");
    let mut reply = Reply::success(&r);
    reply.disks = vec!["disk0".into()];
    reply.snapshots = Some(vec![SnapshotEntry {
        disk: "disk0".into(),
        name: "s".into(),
        guid: "18446744073709551615".into(),
        creation: 1,
        consistency: None,
    }]);
    let line = reply.to_line();
    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    let back: Reply = serde_json::from_slice(&line).expect("reply");
    assert_eq!(back, reply);
    let failure = Reply::failure(
        None,
        None,
        ReplyError {
            kind: "bad-request".into(),
            code: 2,
            message: "x".into(),
            step: None,
            problems: vec![],
            ..Default::default()
        },
    );
    let text = String::from_utf8(failure.to_line()).expect("utf-8");
    assert_eq!(text, "{\"version\":1,\"id\":null,\"ok\":false,\"error\":{\"kind\":\"bad-request\",\"code\":2,\"message\":\"x\"}}\n");
}
