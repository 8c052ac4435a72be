//! zrollback against real ZFS (the test lab's zfs-fuse pool), each test in its own tree.

#[path = "../../zsnap/tests/support/mod.rs"]
mod support;

use std::path::Path;

use evesnap_tests::zfs::{real_zfs, snapshots};
use support::{checksum, run, write_file, zfs, Shim, Tree};

fn zrollback() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_zrollback"))
}

#[test]
fn newer_snapshots_refuse_unless_destroyed_and_the_data_comes_back() {
    let tree = Tree::new("zrollback-newer");
    let a = tree.create("a");
    let file = tree.mountpoint(&a).join("disk.img");
    write_file(&file, 1, 1 << 20);
    let original = checksum(&file);
    zfs(&["snapshot", &format!("{a}@s1")]);
    write_file(&file, 2, 1 << 20);
    zfs(&["snapshot", &format!("{a}@s2")]);
    write_file(&file, 3, 1 << 20);
    zfs(&["snapshot", &format!("{a}@s3")]);
    let changed = checksum(&file);
    assert_ne!(original, changed);

    let shim = Shim::new("rb-newer", None);
    let out = run(zrollback(), &["-d", &a, "--to", "s1"], None, &shim.path);
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert_eq!(
        out.step()["problems"][0]["newer"],
        serde_json::json!([format!("{a}@s3"), format!("{a}@s2")])
    );
    assert!(
        out.stderr.contains(&format!("{a}@s3, {a}@s2")),
        "{}",
        out.stderr
    );
    assert!(shim.calls_of("rollback").is_empty() && shim.calls_of("destroy").is_empty());
    assert_eq!(checksum(&file), changed);

    // The dry run plans, changes nothing.
    let out = run(
        zrollback(),
        &["-d", &a, "--to", "s1", "--destroy-newer", "--dry-run"],
        None,
        &shim.path,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.step()["plan"]["targets"][0]["newer"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(snapshots(&a).len(), 3);

    let doc = r#"{"version":1,"ok":true,"steps":[],"datasets":[],"snapshot":"s1"}"#;
    let out = run(
        zrollback(),
        &["-d", &a, "--destroy-newer"],
        Some(doc),
        &shim.path,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.step()["rolled_back"],
        serde_json::json!([{"dataset": a, "to": format!("{a}@s1")}])
    );
    assert_eq!(
        out.step()["destroyed"],
        serde_json::json!([format!("{a}@s3"), format!("{a}@s2")])
    );
    assert_eq!(snapshots(&a), [format!("{a}@s1")]);
    assert_eq!(
        checksum(&file),
        original,
        "the file is back to the snapshot's content"
    );
    // Never `rollback -r`.
    assert!(shim
        .calls_of("rollback")
        .iter()
        .all(|c| !c.contains(&"-r".to_string())));
}

#[test]
fn a_held_newer_snapshot_refuses_and_nothing_is_destroyed() {
    let tree = Tree::new("zrollback-held");
    let a = tree.create("a");
    let file = tree.mountpoint(&a).join("f");
    write_file(&file, 1, 4096);
    for s in ["s1", "s2", "s3"] {
        zfs(&["snapshot", &format!("{a}@{s}")]);
    }
    write_file(&file, 2, 4096);
    let before = checksum(&file);
    // The newest is held: zfs' own `rollback -r` would destroy s2 and then fail on s3.
    tree.hold("evesnap-test", &format!("{a}@s3"));
    let shim = Shim::new("rb-held", None);
    let out = run(
        zrollback(),
        &["-d", &a, "--to", "s1", "--destroy-newer"],
        None,
        &shim.path,
    );
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert_eq!(out.step()["problems"][0]["problem"], "held");
    assert_eq!(out.step()["problems"][0]["snapshot"], format!("{a}@s3"));
    assert_eq!(snapshots(&a).len(), 3, "nothing destroyed");
    assert!(shim.calls_of("destroy").is_empty() && shim.calls_of("rollback").is_empty());
    assert_eq!(checksum(&file), before);
}

#[test]
fn a_clone_of_a_newer_snapshot_refuses() {
    let tree = Tree::new("zrollback-clone");
    let a = tree.create("a");
    zfs(&["snapshot", &format!("{a}@s1")]);
    zfs(&["snapshot", &format!("{a}@s2")]);
    let clone = format!("{}/c", tree.root);
    zfs(&["clone", &format!("{a}@s2"), &clone]);
    let out = run(
        zrollback(),
        &["-d", &a, "--to", "s1", "--destroy-newer"],
        None,
        &real_zfs(),
    );
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert_eq!(out.step()["problems"][0]["problem"], "has-clones");
    assert_eq!(
        out.step()["problems"][0]["clones"],
        serde_json::json!([clone])
    );
    assert_eq!(snapshots(&a).len(), 2);
}

#[test]
fn several_datasets_are_all_checked_before_any_is_rolled_back() {
    let tree = Tree::new("zrollback-multi");
    let a = tree.create("a");
    let b = tree.create("b");
    let fa = tree.mountpoint(&a).join("f");
    let fb = tree.mountpoint(&b).join("f");
    write_file(&fa, 1, 8192);
    write_file(&fb, 2, 8192);
    let (a1, b1) = (checksum(&fa), checksum(&fb));
    zfs(&["snapshot", &format!("{a}@s1")]);
    zfs(&["snapshot", &format!("{b}@s1")]);
    write_file(&fa, 3, 8192);
    write_file(&fb, 4, 8192);
    let a2 = checksum(&fa);
    // b has a newer snapshot: without --destroy-newer, a must not be rolled back either.
    zfs(&["snapshot", &format!("{b}@s2")]);
    let shim = Shim::new("rb-multi", None);
    let out = run(
        zrollback(),
        &["-d", &a, "-d", &b, "--to", "s1"],
        None,
        &shim.path,
    );
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert!(shim.calls_of("rollback").is_empty());
    assert_eq!(checksum(&fa), a2);

    // A dataset without the snapshot refuses as well.
    let c = tree.create("c");
    let out = run(
        zrollback(),
        &["-d", &a, "-d", &c, "--to", "s1"],
        None,
        &shim.path,
    );
    assert_eq!(out.code, 7);
    assert_eq!(out.step()["problems"][0]["problem"], "no-such-snapshot");

    let out = run(
        zrollback(),
        &["-d", &a, "-d", &b, "--to", "s1", "--destroy-newer"],
        None,
        &shim.path,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.step()["rolled_back"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        out.step()["destroyed"],
        serde_json::json!([format!("{b}@s2")])
    );
    assert_eq!((checksum(&fa), checksum(&fb)), (a1, b1));
}

#[test]
fn an_upstream_failure_rolls_nothing_back() {
    let shim = Shim::new("rb-upstream", None);
    let doc = r#"{"version":1,"ok":false,"steps":[],"error":{"tool":"zsnap","kind":"preflight-failed","message":"x"},
                  "datasets":["evesnap-test/t/none"],"snapshot":"s1"}"#;
    let out = run(zrollback(), &[], Some(doc), &shim.path);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert_eq!(out.step()["skipped"], true);
    assert!(shim.calls().is_empty());
}

#[test]
fn a_hung_zfs_is_killed_at_the_zfs_timeout() {
    let fake = support::hanging_zfs("zrollback");
    let start = std::time::Instant::now();
    let out = run(
        zrollback(),
        &["--zfs-timeout", "1", "-d", "p/a", "--to", "s"],
        None,
        &fake,
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    assert!(
        out.stderr
            .contains("did not finish within 1.0 s and was killed"),
        "{}",
        out.stderr
    );
    let _ = std::fs::remove_dir_all(fake.parent().expect("its folder"));
}

/// A `zfs` that fails the `nth` call of `sub` ("<sub> broke") and runs the real one
/// otherwise; its folder goes with the tree's test.
fn failing_zfs(dir: &Path, sub: &str, nth: u32) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("shim folder");
    let count = dir.join(format!("{sub}-{nth}.count"));
    let path = dir.join(format!("zfs-{sub}-{nth}"));
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = {sub} ]; then echo x >> '{count}'; \
         if [ $(wc -l < '{count}') -eq {nth} ]; then echo '{sub} broke' >&2; exit 1; fi; fi\n\
         exec '{real}' \"$@\"\n",
        count = count.display(),
        real = real_zfs().display(),
    );
    std::fs::write(&path, script).expect("write the shim");
    let mut perms = std::fs::metadata(&path).expect("shim").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).expect("chmod the shim");
    path
}

/// Names, origins, holds and mounts of the tree (what a failed switch must leave as it was).
fn layout(root: &str) -> String {
    zfs(&[
        "list",
        "-H",
        "-t",
        "all",
        "-r",
        "-o",
        "name,origin,userrefs,mounted",
        root,
    ])
}

/// `--keep-newer` on zfs-fuse filesystems: back to s1 keeps the current data and the held s2
/// under `<a>.evesnap-kept-*`; forward to s2 from there brings s2's data and every snapshot
/// back. Checksums prove each state. Each zfs call failing in turn, and a file held open in
/// the filesystem, leave the tree as it was with a clear error.
#[test]
fn keep_newer_goes_back_and_forward_with_every_snapshot_kept() {
    let tree = Tree::new("zrollback-keep");
    let a = tree.create("a");
    let file = |dataset: &str| tree.mountpoint(dataset).join("disk.img");
    write_file(&file(&a), 1, 1 << 20);
    let at_s1 = checksum(&file(&a));
    zfs(&["snapshot", &format!("{a}@s1")]);
    write_file(&file(&a), 2, 1 << 20);
    let at_s2 = checksum(&file(&a));
    zfs(&["snapshot", &format!("{a}@s2")]);
    tree.hold("evesnap-test", &format!("{a}@s2"));
    write_file(&file(&a), 3, 1 << 20);
    let head = checksum(&file(&a));
    let back = ["-d", a.as_str(), "--to", "s1", "--keep-newer"];

    let before = layout(&tree.root);
    let shims = std::env::temp_dir().join(format!("evesnap-keep-{}", std::process::id()));
    for (sub, nth) in [
        ("clone", 1),
        ("promote", 1),
        ("unmount", 1),
        ("unmount", 2),
        ("rename", 1),
        ("rename", 2),
        ("mount", 1),
        ("mount", 2),
    ] {
        let shim = failing_zfs(&shims, sub, nth);
        let out = run(zrollback(), &back, None, &shim);
        assert_eq!(out.code, 1, "{sub} #{nth}: {}", out.stderr);
        let error = out.step()["error"].as_str().unwrap_or("").to_string();
        assert!(
            error.contains(&format!("failed at `zfs {sub}"))
                && error.contains("everything done was undone")
                && error.contains(&format!("{sub} broke")),
            "{sub} #{nth}: {error}"
        );
        assert_eq!(layout(&tree.root), before, "{sub} #{nth} left a change");
        assert_eq!(checksum(&file(&a)), head, "{sub} #{nth} changed the data");
    }
    let _ = std::fs::remove_dir_all(&shims);

    // A file open in the filesystem: its unmount fails, nothing changes.
    let open = std::fs::File::open(file(&a)).expect("open the file");
    let out = run(zrollback(), &back, None, real_zfs().as_path());
    drop(open);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("failed at `zfs unmount") && out.stderr.contains("stop the VM"),
        "{}",
        out.stderr
    );
    assert_eq!(layout(&tree.root), before);

    // Back to s1.
    let out = run(zrollback(), &back, None, real_zfs().as_path());
    assert_eq!(out.code, 0, "{}", out.stderr);
    let kept_as = out.step()["kept"][0]["kept_as"]
        .as_str()
        .expect("kept_as")
        .to_string();
    assert!(
        kept_as.starts_with(&format!("{a}.evesnap-kept-")),
        "{kept_as}"
    );
    assert_eq!(checksum(&file(&a)), at_s1, "a has s1's data");
    assert_eq!(
        checksum(&file(&kept_as)),
        head,
        "the kept state has the data a had"
    );
    assert_eq!(snapshots(&a), [format!("{a}@s1")]);
    assert_eq!(snapshots(&kept_as), [format!("{kept_as}@s2")]);
    assert_eq!(support::get(&format!("{kept_as}@s2"), "userrefs"), "1");

    // Write on, then forward to s2 (found in the kept state).
    write_file(&file(&a), 4, 1 << 20);
    let after_rollback = checksum(&file(&a));
    let out = run(
        zrollback(),
        &["-d", &a, "--to", "s2", "--keep-newer"],
        None,
        real_zfs().as_path(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let second = out.step()["kept"][0]["kept_as"]
        .as_str()
        .expect("kept_as")
        .to_string();
    assert_eq!(checksum(&file(&a)), at_s2, "a has s2's data");
    assert_eq!(snapshots(&a), [format!("{a}@s1"), format!("{a}@s2")]);
    assert_eq!(support::get(&format!("{a}@s2"), "userrefs"), "1");
    assert_eq!(
        checksum(&file(&kept_as)),
        head,
        "the first kept state is intact"
    );
    assert_eq!(
        checksum(&file(&second)),
        after_rollback,
        "what was written after the rollback is kept"
    );
    assert_eq!(support::get(&a, "origin"), "-");
}
