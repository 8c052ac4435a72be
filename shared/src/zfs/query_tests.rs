//! The zfs layer's reads: space rules, a stand-in OpenZFS's listings, clones, destroy blockers.

use super::*;
use crate::zfs::Capabilities;
use std::path::{Path, PathBuf};

#[test]
fn space_rules() {
    // Measured on zfs-fuse: 60M refreservation, 50M written; `zfs snapshot` said "out of space".
    let s = Space {
        dataset: "evz-b/rr".into(),
        kind: "filesystem".into(),
        available: 42061824,
        referenced: 51822592,
        unique: 51822592,
        refreservation: 62914560,
        usedbyrefreservation: 11091968,
    };
    assert_eq!(s.snapshot_needs(), 51822592);
    assert_eq!(s.available_outside_reservation(), 30969856);
    assert!(s.snapshot_needs() > s.available_outside_reservation());
}

/// A stand-in for OpenZFS 2.x' `zfs` (this machine has only zfs-fuse): answers the
/// capability probes and a `zfs list -p` the way OpenZFS does, records other calls.
fn fake_openzfs(dir: &Path) -> PathBuf {
    let log = dir.join("calls");
    let script = format!(
        r#"#!/bin/sh
echo "$*" >> '{log}'
case "$*" in
  snapshot) printf 'missing snapshot argument\nusage:\n\tsnapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...\n' >&2; exit 2;;
  "list -H -p -o name -d 0") echo tank; exit 0;;
  "list -H -p -o name,guid,createtxg,creation,userrefs,used,referenced,org.x:k -t snapshot -d 1 -s createtxg tank/vol")
    printf 'tank/vol@b\t17870393407298424331\t2061\t1764099012\t1\t12288\t1073741824\tv\n'
    printf 'tank/vol@a\t2345\t2049\t1764099000\t0\t0\t1073741824\t-\n'; exit 0;;
  "list -H -p -o name,createtxg -t bookmark -d 1 -s createtxg tank/vol") printf 'tank/vol#bm\t2050\n'; exit 0;;
  snapshot\ *) exit 0;;
  "get -H -p -o name,property,value -r origin tank")
    printf 'tank\torigin\t-\ntank/vol\torigin\t-\ntank/c1\torigin\ttank/vol@a\ntank/c2\torigin\ttank/vol@a\n'; exit 0;;
esac
echo "unexpected: $*" >&2; exit 1
"#,
        log = log.display()
    );
    let path = dir.join("zfs");
    std::fs::write(&path, script).expect("write fake");
    let mut perms = std::fs::metadata(&path).expect("fake").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).expect("chmod fake");
    path
}

#[test]
fn openzfs_capabilities_and_parsable_list() {
    let dir = std::env::temp_dir().join(format!("evesnap-fake-openzfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let zfs = Zfs::with_path(fake_openzfs(&dir));
    assert_eq!(zfs.capabilities().expect("caps"), Capabilities::OPENZFS);
    let snaps = zfs.snapshots("tank/vol", &["org.x:k"]).expect("list");
    assert_eq!(
        snaps.iter().map(|s| s.short_name()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(snaps[1].guid, "17870393407298424331");
    assert_eq!((snaps[1].userrefs, snaps[1].used), (1, 12288));
    assert_eq!(snaps[1].properties["org.x:k"], "v");
    assert!(snaps[0].properties.is_empty());
    assert_eq!(
        zfs.bookmarks("tank/vol").expect("bookmarks"),
        [("tank/vol#bm".to_string(), 2050)]
    );
    let fuse = Zfs::with_path("/nonexistent/zfs").with_capabilities(Capabilities::ZFS_FUSE);
    assert!(
        fuse.bookmarks("tank/vol").expect("none").is_empty(),
        "zfs-fuse has no bookmarks"
    );
    let props = vec![("org.x:k".to_string(), "v".to_string())];
    zfs.snapshot(&["tank/a@s".into(), "tank/b@s".into()], &props, false)
        .expect("multi");
    let calls = std::fs::read_to_string(dir.join("calls")).expect("calls");
    assert!(
        calls
            .lines()
            .any(|l| l == "snapshot -o org.x:k=v tank/a@s tank/b@s"),
        "{calls}"
    );
    // One `zfs get` per pool, however many names are in it.
    let clones = zfs
        .clones_of(&["tank/vol@a".into(), "tank/vol@b".into(), "tank".into()])
        .expect("clones");
    let calls = std::fs::read_to_string(dir.join("calls")).expect("calls");
    assert_eq!(calls.lines().filter(|l| l.contains(" origin ")).count(), 1);
    assert_eq!(clones["tank/vol@a"], ["tank/c1", "tank/c2"]);
    assert_eq!(clones.len(), 1);
    assert!(snaps[0]
        .destroy_blockers(&clones, true)
        .iter()
        .any(|p| matches!(
            p,
            Problem::HasClones { snapshot, clones } if snapshot == "tank/vol@a" && clones.len() == 2
        )));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn destroy_blockers_are_holds_unless_deferred_and_clones() {
    let held = SnapshotInfo {
        name: "tank/v@a".into(),
        guid: "1".into(),
        createtxg: 1,
        creation: 1,
        userrefs: 2,
        used: 0,
        referenced: 0,
        properties: BTreeMap::new(),
    };
    let none = BTreeMap::new();
    assert!(matches!(
        held.destroy_blockers(&none, false)[..],
        [Problem::Held { userrefs: 2, .. }]
    ));
    assert!(
        held.destroy_blockers(&none, true).is_empty(),
        "-d waits for the holds"
    );
    let cloned = BTreeMap::from([("tank/v@a".to_string(), vec!["tank/c".to_string()])]);
    assert!(matches!(
        held.destroy_blockers(&cloned, true)[..],
        [Problem::HasClones { .. }]
    ));
    assert_eq!(held.destroy_blockers(&cloned, false).len(), 2);
}
