//! Taking a snapshot: the method chosen, and what a failed or cut short call leaves.

use super::*;

#[test]
fn parents() {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(common_parent(&v(&["p/a/x", "p/a/y"])), "p/a");
    assert_eq!(common_parent(&v(&["p/a/x", "p/a/x/z"])), "p/a/x");
    assert_eq!(common_parent(&v(&["p/a", "p/ab"])), "p");
    assert_eq!(common_parent(&v(&["p/a/x", "p/b"])), "p");
}

/// A `zfs snapshot` that hangs (after creating its snapshot when `$D/creates` exists),
/// a `zfs get` that sees it, a `zfs destroy` that removes it; every call logged.
fn hanging_snapshot(dir: &std::path::Path) -> std::path::PathBuf {
    let script = format!(
        r#"#!/bin/sh
D='{}'
echo "$*" >> "$D/calls"
case "$1" in
  snapshot) [ -f "$D/creates" ] && touch "$D/created"; exec sleep 1000;;
  get) [ -f "$D/created" ] && printf 'p/a@s\ttype\tsnapshot\n'; exit 0;;
  destroy) rm -f "$D/created"; exit 0;;
esac
exit 1
"#,
        dir.display()
    );
    let path = dir.join("zfs");
    std::fs::write(&path, script).expect("write fake zfs");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod fake zfs");
    path
}

#[test]
fn what_a_snapshot_cut_short_created_is_destroyed() {
    let dir = std::env::temp_dir().join(format!("zsnap-take-cut-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let zfs = Zfs::with_path(hanging_snapshot(&dir))
        .with_capabilities(Capabilities::ZFS_FUSE)
        .with_timeout(Duration::from_secs(1));
    let prepared = PreparedSnapshot {
        zfs: &zfs,
        caps: Capabilities::ZFS_FUSE,
        datasets: vec!["p/a".into()],
        name: "s".into(),
        snapshots: vec!["p/a@s".into()],
        properties: Vec::new(),
        claims: Vec::new(),
        method: Method::Single,
        space: Vec::new(),
    };
    // Killed before it created anything: the deadline's error as it is.
    let error = prepared.take().expect_err("hangs");
    assert!(matches!(error, Error::TimedOut { .. }), "{error:?}");
    // Killed after it created the snapshot: destroyed again, and the error says so.
    std::fs::write(dir.join("creates"), "").expect("config");
    let error = prepared.take().expect_err("hangs");
    match &error {
        Error::Partial {
            undone,
            left,
            source,
            ..
        } => {
            assert_eq!(undone, &["p/a@s"]);
            assert!(left.is_empty());
            assert!(matches!(**source, Error::TimedOut { .. }), "{source:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!dir.join("created").exists(), "the snapshot is left");
    let calls = std::fs::read_to_string(dir.join("calls")).expect("calls");
    assert!(calls.lines().any(|l| l == "destroy p/a@s"), "{calls}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn atomicity() {
    assert!(Method::Multi.atomic());
    assert!(Method::Recursive {
        parent: "p".into(),
        extra: None,
        between: Vec::new()
    }
    .atomic());
    assert!(!Method::OneByOne.atomic());
}

#[test]
fn a_claim_is_created_unproven_and_only_confirmed_later() {
    let zfs = Zfs::with_path("/nonexistent/zfs").with_capabilities(Capabilities::ZFS_FUSE);
    let mut prepared = PreparedSnapshot {
        zfs: &zfs,
        caps: Capabilities::OPENZFS,
        datasets: vec!["p/a".into()],
        name: "s".into(),
        snapshots: vec!["p/a@s".into()],
        properties: vec![("org.lfedge.evesnap:id".into(), "x".into())],
        claims: Vec::new(),
        method: Method::Single,
        space: Vec::new(),
    };
    prepared
        .claim("org.lfedge.evesnap:frozen", "false", "true")
        .expect("claim");
    // What `zfs snapshot -o` writes: the unproven value.
    assert_eq!(
        prepared.inline_props(),
        [
            ("org.lfedge.evesnap:id".to_string(), "x".to_string()),
            ("org.lfedge.evesnap:frozen".to_string(), "false".to_string())
        ]
    );
    assert_eq!(
        prepared.claims,
        [("org.lfedge.evesnap:frozen".to_string(), "true".to_string())]
    );
    // A property set later wins over the claim; a dropped claim is never written.
    prepared
        .set_property("org.lfedge.evesnap:frozen", "false")
        .expect("set");
    assert!(prepared.claims.is_empty());
    assert!(
        prepared.confirm_claims().is_ok(),
        "nothing to write, no zfs call"
    );
    assert!(prepared.claim("bad key", "a", "b").is_err());
}
