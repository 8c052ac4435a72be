//! The plan's parsing: defaults, refusals naming the field, EVE's volume addressing.

use super::*;

const MINIMAL: &str = r#"{"version":1,"agent":"unix:/a","datasets":["p/a"]}"#;

#[test]
fn minimal_plan_gets_defaults() {
    let plan = Plan::from_json(MINIMAL).expect("valid");
    assert_eq!(plan.action, Action::Create);
    assert_eq!(plan.kind, SnapshotType::Immediate);
    assert!(plan.freeze.required);
    assert_eq!(plan.freeze.on_failure, OnFreezeFailure::Fail);
    assert_eq!(plan.snapshot_name(), format!("evesnap-{}", plan.id()));
}

#[test]
fn on_failure_is_fail_or_crash() {
    let with = |value: &str| {
        Plan::from_json(&format!(
            r#"{{"version":1,"agent":"a","datasets":["p/a"],"freeze":{{"on_failure":{value}}}}}"#
        ))
    };
    assert_eq!(
        with(r#""crash""#).expect("valid").freeze.on_failure,
        OnFreezeFailure::Crash
    );
    assert_eq!(
        with(r#""fail""#).expect("valid").freeze.on_failure,
        OnFreezeFailure::Fail
    );
    let err = with(r#""skip""#).unwrap_err();
    let cause = std::error::Error::source(&err).expect("cause").to_string();
    assert!(cause.contains("skip"), "{cause}");
}

#[test]
fn eves_volumes_become_datasets_under_the_root() {
    let v0 = "1b3e4f5a-6c7d-4e8f-9a0b-1c2d3e4f5a6b";
    let v1 = "2c4d6e8f-0a1b-4c3d-8e5f-6a7b8c9d0e1f";
    let text = format!(
        r#"{{"version":1,"agent":"a","app":"8a5c0f4e-2d35-4c1f-9d27-0b7c3c1e9a11",
            "volumes":[{{"uuid":"{v0}"}},{{"uuid":"{v1}","generation":2}}]}}"#
    );
    let plan = Plan::from_json(&text).expect("valid");
    assert_eq!(
        plan.datasets,
        [
            format!("persist/vault/volumes/{v0}.1"),
            format!("persist/vault/volumes/{v1}.2")
        ]
    );
    assert_eq!(
        plan.volume_of(&plan.datasets[1]).map(|u| u.to_string()),
        Some(v1.to_string())
    );
    assert_eq!(plan.retention_order(), RetentionOrder::BeforeCreate);
    let rooted = text.replacen('{', r#"{"volume_root":"lab/vols","#, 1);
    let plan = Plan::from_json(&rooted).expect("valid");
    assert_eq!(plan.datasets[0], format!("lab/vols/{v0}.1"));
    assert_eq!(
        Plan::from_json(MINIMAL).expect("valid").retention_order(),
        RetentionOrder::AfterCreate
    );
    for (bad, needle) in [
        (text.replacen('{', r#"{"datasets":["p/a"],"#, 1), "one way"),
        (
            text.replacen('{', r#"{"volume_root":"/x","#, 1),
            "volume_root",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"volume_root":"p"}"#.into(),
            "volumes",
        ),
        (text.replace(v0, "vol0"), "UUID parsing failed"),
    ] {
        let err = Plan::from_json(&bad).unwrap_err();
        let all = format!("{err}: {:?}", std::error::Error::source(&err));
        assert!(all.contains(needle), "{bad}: {all}");
    }
}

#[test]
fn unknown_fields_are_named() {
    let err =
        Plan::from_json(r#"{"version":1,"agent":"a","datasets":["p/a"],"freez":{}}"#).unwrap_err();
    let cause = std::error::Error::source(&err).expect("cause").to_string();
    assert!(cause.contains("unknown field `freez`"), "{cause}");
    let err =
        Plan::from_json(r#"{"version":1,"agent":"a","datasets":["p/a"],"freeze":{"timeout":1}}"#)
            .unwrap_err();
    assert!(std::error::Error::source(&err)
        .expect("cause")
        .to_string()
        .contains("`timeout`"));
}

#[test]
fn wrong_values_are_refused() {
    for (plan, needle) in [
        (r#"{"version":1,"agent":"a","datasets":[]}"#, "datasets"),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a","p/a"]}"#,
            "twice",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"action":"rollback"}"#,
            "rollback.to",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"guest_pre":[{"path":"sync"}]}"#,
            "absolute",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"max_snapshots":0}"#,
            "max_snapshots",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"disks":{"p/b":{"serial":"x"}}}"#,
            "p/b",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"action":"rollback","rollback":{"to":"s"},
                "disks":{"p/a":{"qdev":"virtio-disk0"}}}"#,
            "needs `qmp`",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"disks":{"p/a":{"wwn":"0xgg"}}}"#,
            "disks.p/a.wwn",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"disks":{"p/a":{"dev":"zd0"}}}"#,
            "disks.p/a.dev",
        ),
        (
            r#"{"version":1,"agent":"a","datasets":["p/a"],"disks":{"p/a":{"dev":"-f /x"}}}"#,
            "absolute",
        ),
    ] {
        let err = Plan::from_json(plan).unwrap_err().to_string();
        assert!(err.contains(needle), "{plan}: {err}");
    }
    assert!(matches!(
        Plan::from_json(r#"{"version":2,"agent":"a","datasets":["p/a"]}"#),
        Err(Error::Version(2))
    ));
    // Regression: these were accepted, then panicked converting to a Duration/deadline.
    for plan in [
        r#"{"version":1,"agent":"a","datasets":["p/a"],"freeze":{"timeout_s":1e300}}"#,
        r#"{"version":1,"agent":"a","datasets":["p/a"],"freeze":{"thaw_after_s":1e20}}"#,
        r#"{"version":1,"agent":"a","datasets":["p/a"],"guest_pre":[{"path":"/x","timeout_s":1e30}]}"#,
    ] {
        let err = Plan::from_json(plan).unwrap_err().to_string();
        assert!(
            err.contains("timeout_s") || err.contains("thaw_after_s"),
            "{plan}: {err}"
        );
    }
    let err = Plan::from_json(r#"{"version":1,"agent":"a","datasets":["p/a"],"type":"weekly"}"#)
        .unwrap_err();
    assert!(std::error::Error::source(&err)
        .expect("cause")
        .to_string()
        .contains("weekly"));
}

#[test]
fn freeze_options_follow_the_plan() {
    let mut freeze = FreezePlan {
        mountpoints: vec!["/data".into()],
        timeout_s: 2.5,
        thaw_after_s: 30.0,
        ..FreezePlan::default()
    };
    let options = freeze.options();
    assert_eq!(options.mountpoints, ["/data"]);
    assert_eq!(options.timeout, Duration::from_millis(2500));
    assert_eq!(options.thaw_after, Some(Duration::from_secs(30)));
    assert!(!options.adopt_frozen && options.watchdog_program.is_none());
    freeze.thaw_after_s = 0.0;
    assert_eq!(freeze.options().thaw_after, None, "0 arms no watchdog");
}
