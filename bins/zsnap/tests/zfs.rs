//! zsnap against real ZFS (the test lab's zfs-fuse pool), each test in its own dataset tree.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use evesnap_tests::zfs::{all_snapshots, real_zfs, snapshots};
use serde::Deserialize;
use support::{get, run, zfs, Shim, Tree};

fn zsnap() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_zsnap"))
}

/// The zsnap step, parsed strictly.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TakeStep {
    tool: String,
    ok: bool,
    #[allow(dead_code)]
    started_at: String,
    #[allow(dead_code)]
    duration_ms: f64,
    snapshots: Vec<Entry>,
    atomic: bool,
    method: serde_json::Value,
    snapshot_ms: f64,
    calls: usize,
    properties: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    destroy_after_output: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    guid: String,
    createtxg: u64,
    creation: u64,
}

const FROZEN_DOC: &str = r#"{"version":1,"ok":true,"steps":[
  {"tool":"qga-freeze","ok":true,"started_at":"2026-11-25T19:30:00.000Z","duration_ms":3.0,"frozen":2,
   "mountpoints":null,"adopted":false,"agent_version":"7.2.0","freeze_ms":2.5,
   "frozen_at_unix_us":1795635000000000,"watchdog":null}],
  "error":null,"agent":"unix:/nowhere","snapshot_id":"6f1c4a7e-0000-4000-8000-000000000001"}"#;

#[test]
fn multi_dataset_snapshot_is_one_call_with_metadata_and_a_second_run_fails_cleanly() {
    let tree = Tree::new("zsnap-multi");
    let vm = tree.create("vm");
    let a = tree.create("vm/a");
    let b = tree.create("vm/b");
    let shim = Shim::new("multi", None);

    let out = run(
        zsnap(),
        &["-d", &a, "-d", &b, "-n", "s1"],
        Some(FROZEN_DOC),
        &shim.path,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let step: TakeStep = serde_json::from_value(out.step().clone()).expect("strict step");
    assert!(step.ok && step.tool == "zsnap");
    assert!(
        step.atomic,
        "the children of one parent are taken atomically: {:?}",
        step.method
    );
    assert_eq!(step.calls, 1);
    let names: Vec<&str> = step.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [format!("{a}@s1"), format!("{b}@s1")]);
    assert_eq!(
        step.snapshots[0].createtxg, step.snapshots[1].createtxg,
        "one transaction group"
    );
    for s in &step.snapshots {
        assert_eq!(get(&s.name, "guid"), s.guid);
        assert_eq!(get(&s.name, "createtxg"), s.createtxg.to_string());
        assert_eq!(get(&s.name, "creation"), s.creation.to_string());
        assert_eq!(get(&s.name, "org.lfedge.evesnap:frozen"), "true");
        assert_eq!(
            get(&s.name, "org.lfedge.evesnap:id"),
            "6f1c4a7e-0000-4000-8000-000000000001"
        );
        assert_eq!(get(&s.name, "org.lfedge.evesnap:type"), "IMMEDIATE");
        assert!(get(&s.name, "org.lfedge.evesnap:version").starts_with("zsnap "));
    }
    assert_eq!(step.properties["org.lfedge.evesnap:frozen"], "true");
    assert!(step.snapshot_ms > 0.0);
    // The recursive parent's own snapshot is gone again (once the document was out).
    assert_eq!(step.destroy_after_output, [format!("{vm}@s1")]);
    assert!(snapshots(&vm).is_empty(), "{:?}", snapshots(&vm));
    assert_eq!(out.doc["snapshot"], "s1");
    assert_eq!(out.doc["datasets"], serde_json::json!([a, b]));
    // Exactly one `zfs snapshot`, with the metadata in it but no claim of a freeze: that is
    // set once it returned inside the freeze (a call outliving zsnap claims nothing).
    let snaps = shim.calls_of("snapshot");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert!(
        snaps[0]
            .iter()
            .any(|a| a == "org.lfedge.evesnap:frozen=false"),
        "{:?}",
        snaps[0]
    );
    let sets = shim.calls_of("set");
    assert_eq!(sets.len(), 2, "one per snapshot: {sets:?}");
    assert!(
        sets.iter()
            .all(|c| c.iter().any(|a| a == "org.lfedge.evesnap:frozen=true")),
        "{sets:?}"
    );

    // The same name again: a preflight failure naming the snapshot, no zfs snapshot call.
    shim.clear();
    let again = run(zsnap(), &["-d", &a, "-d", &b, "-n", "s1"], None, &shim.path);
    assert_eq!(again.code, 7, "{}", again.stderr);
    assert!(
        again
            .stderr
            .contains(&format!("snapshot {a}@s1 exists already")),
        "{}",
        again.stderr
    );
    assert_eq!(again.step()["problems"][0]["problem"], "name-taken");
    assert_eq!(again.doc["error"]["kind"], "preflight-failed");
    assert!(shim.calls_of("snapshot").is_empty());
    assert_eq!(all_snapshots(&tree.root).len(), 2);
}

#[test]
fn unrelated_datasets_are_taken_one_by_one_and_a_failure_undoes_them() {
    let tree = Tree::new("zsnap-onebyone");
    let a = tree.create("x/a");
    let b = tree.create("y/b");
    tree.create("y/other");

    let out = run(
        zsnap(),
        &["-d", &a, "-d", &b, "-n", "s1"],
        None,
        &real_zfs(),
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.step()["atomic"], false);
    assert_eq!(out.step()["method"]["kind"], "one-by-one");
    assert_eq!(
        all_snapshots(&tree.root),
        [format!("{a}@s1"), format!("{b}@s1")]
    );

    // The second snapshot fails (out of space, injected): the first is destroyed again.
    let shim = Shim::new("onebyone", Some("/y/b@s2"));
    let out = run(zsnap(), &["-d", &a, "-d", &b, "-n", "s2"], None, &shim.path);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("failed part way"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("undone: [{a}@s2]")),
        "{}",
        out.stderr
    );
    assert_eq!(
        all_snapshots(&tree.root),
        [format!("{a}@s1"), format!("{b}@s1")]
    );
    let destroys = shim.calls_of("destroy");
    assert_eq!(destroys, [vec!["destroy".to_string(), format!("{a}@s2")]]);
}

#[test]
fn invalid_names_fail_before_zfs_is_called() {
    let shim = Shim::new("names", None);
    for args in [
        vec!["-d", "evesnap-test/t/x", "-n", "with#hash"],
        vec!["-d", "evesnap-test/t/x", "--name=-r"],
        vec!["-d", "evesnap-test/t/x y", "-n", "ok"],
        vec!["--dataset=-evil", "-n", "ok"],
        vec!["-d", "evesnap-test/t/x", "-n", "ok", "-o", "NoColon=1"],
    ] {
        let out = run(zsnap(), &args, None, &shim.path);
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("invalid"), "{}", out.stderr);
    }
    assert!(
        shim.calls().is_empty(),
        "zfs was called: {:?}",
        shim.calls()
    );
}

#[test]
fn an_upstream_failure_takes_no_snapshot() {
    let tree = Tree::new("zsnap-upstream");
    let a = tree.create("a");
    let shim = Shim::new("upstream", None);
    let doc = r#"{"version":1,"ok":false,"steps":[
      {"tool":"qga-freeze","ok":false,"started_at":"2026-11-25T19:30:00.000Z","duration_ms":10000.0,"frozen":0}],
      "error":{"tool":"qga-freeze","kind":"agent-timeout","message":"no answer"}}"#;
    let out = run(zsnap(), &["-d", &a, "-n", "s1"], Some(doc), &shim.path);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert_eq!(out.step()["skipped"], true);
    assert_eq!(
        out.doc["error"]["tool"], "qga-freeze",
        "the first failure stays the one reported"
    );
    // The command-line preflight may have read (it runs before the document arrives);
    // nothing was written.
    for sub in ["snapshot", "destroy", "set", "rollback"] {
        assert!(
            shim.calls_of(sub).is_empty(),
            "zfs {sub} was called: {:?}",
            shim.calls()
        );
    }
    assert!(snapshots(&a).is_empty());
}

#[test]
fn list_destroy_and_prune_real_snapshots() {
    let tree = Tree::new("zsnap-life");
    let a = tree.create("vm/a");
    let b = tree.create("vm/b");
    let zfs_path = real_zfs();
    for n in ["p1", "p2", "p3", "p4", "p5"] {
        let out = run(zsnap(), &["-d", &a, "-d", &b, "-n", n], None, &zfs_path);
        assert_eq!(out.code, 0, "{}", out.stderr);
    }
    // A snapshot not taken by evesnap is never counted nor pruned.
    zfs(&["snapshot", &format!("{a}@manual")]);

    let out = run(
        zsnap(),
        &["list", "-d", &a, "--evesnap-only"],
        None,
        &zfs_path,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let listed = out.step()["snapshots"].as_array().expect("list").clone();
    let names: Vec<&str> = listed.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(
        names,
        ["p1", "p2", "p3", "p4", "p5"].map(|n| format!("{a}@{n}"))
    );
    assert!(listed
        .iter()
        .all(|s| s["properties"]["org.lfedge.evesnap:id"].is_string()));
    let all = run(zsnap(), &["list", "-d", &a], None, &zfs_path);
    assert_eq!(all.step()["snapshots"].as_array().map(Vec::len), Some(6));

    // A held snapshot is refused, and nothing of the set is destroyed.
    tree.hold("keep", &format!("{b}@p1"));
    let out = run(
        zsnap(),
        &["destroy", "-d", &a, "-d", &b, "-n", "p1"],
        None,
        &zfs_path,
    );
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert_eq!(out.step()["problems"][0]["problem"], "held");
    assert!(snapshots(&a).contains(&format!("{a}@p1")));

    // Destroy a whole set.
    let out = run(
        zsnap(),
        &["destroy", &format!("{a}@p3"), &format!("{b}@p3")],
        None,
        &zfs_path,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.step()["destroyed"].as_array().map(Vec::len), Some(2));

    // Prune to 2 sets: p1 is held (kept, and no newer set dies in its place), p2 goes.
    let dry = run(
        zsnap(),
        &["prune", "--keep", "2", "-d", &a, "-d", &b, "--dry-run"],
        None,
        &zfs_path,
    );
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert_eq!(
        dry.step()["destroyed"],
        serde_json::json!([format!("{a}@p2"), format!("{b}@p2")])
    );
    assert!(
        snapshots(&a).contains(&format!("{a}@p2")),
        "dry run destroyed something"
    );
    let out = run(
        zsnap(),
        &["prune", "--keep", "2", "-d", &a, "-d", &b],
        None,
        &zfs_path,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.step()["kept"][0]["snapshot"], format!("{a}@p1"));
    assert_eq!(
        snapshots(&a),
        ["p1", "p4", "p5", "manual"]
            .map(|n| format!("{a}@{n}"))
            .to_vec()
    );
    assert_eq!(
        snapshots(&b),
        ["p1", "p4", "p5"].map(|n| format!("{b}@{n}")).to_vec()
    );
}

/// A pool of its own on a small file, so it can be made too full.
struct ScratchPool {
    name: String,
    file: PathBuf,
    mnt: PathBuf,
}

impl ScratchPool {
    fn new(tag: &str) -> ScratchPool {
        support::pool(); // the zfs-fuse daemon runs
        let dir = evesnap_tests::repo_root().join("target/zfs-scratch");
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let name = format!("evz-{tag}{}", std::process::id());
        let file = dir.join(format!("{name}.img"));
        let file_f = std::fs::File::create(&file).expect("pool file");
        file_f.set_len(128 << 20).expect("sparse file");
        let mnt = dir.join(format!("mnt-{name}"));
        let out = Command::new("zpool")
            .args([
                "create",
                "-m",
                &mnt.display().to_string(),
                &name,
                &file.display().to_string(),
            ])
            .output()
            .expect("zpool");
        assert!(
            out.status.success(),
            "zpool create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ScratchPool { name, file, mnt }
    }
}

impl Drop for ScratchPool {
    fn drop(&mut self) {
        for _ in 0..20 {
            let out = Command::new("zpool").args(["destroy", &self.name]).output();
            if out.is_ok_and(|o| o.status.success()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

#[test]
fn a_pool_too_full_fails_the_preflight_and_creates_nothing() {
    let pool = ScratchPool::new("full");
    let tree = Tree::in_pool(&pool.name, "zsnap-full");
    // A thick "volume": 60 MiB reserved, 50 MiB written. A snapshot must find those 50 MiB
    // free outside the reservation; the 128 MiB pool has about 30 MiB.
    let rr = format!("{}/rr", tree.root);
    zfs(&["create", "-o", "refreservation=60M", &rr]);
    let plain = tree.create("plain");
    support::write_file(&tree.mountpoint(&rr).join("disk.img"), 1, 50 << 20);
    std::thread::sleep(std::time::Duration::from_secs(2)); // let the txg settle the accounting

    let shim = Shim::new("full", None);
    let out = run(
        zsnap(),
        &["-d", &plain, "-d", &rr, "-n", "s1"],
        None,
        &shim.path,
    );
    assert_eq!(out.code, 7, "{}", out.stderr);
    let problem = &out.step()["problems"][0];
    assert_eq!(problem["problem"], "no-room", "{problem}");
    assert_eq!(problem["dataset"], rr.as_str());
    let missing = problem["missing"].as_u64().expect("missing bytes");
    assert!(missing > 10 << 20, "{missing}");
    assert!(
        out.stderr
            .contains(&format!("{rr}: {missing} bytes missing")),
        "{}",
        out.stderr
    );
    assert!(shim.calls_of("snapshot").is_empty());
    assert!(all_snapshots(&tree.root).is_empty());
    // The preflight agrees with ZFS itself.
    let real = Command::new(real_zfs())
        .args(["snapshot", &format!("{rr}@s1")])
        .output()
        .expect("zfs");
    assert!(
        String::from_utf8_lossy(&real.stderr).contains("out of space"),
        "{real:?}"
    );

    // A plain filesystem in a pool without free space: refused for want of --min-free.
    zfs(&["set", "refreservation=none", &rr]);
    zfs(&["set", "quota=1M", &plain]);
    support::write_file(&tree.mountpoint(&plain).join("f"), 2, 900 << 10);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let out = run(
        zsnap(),
        &["-d", &plain, "-n", "s2", "--min-free", "1048576"],
        None,
        &shim.path,
    );
    assert_eq!(out.code, 7, "{}", out.stderr);
    assert_eq!(out.step()["problems"][0]["dataset"], plain.as_str());
    assert!(all_snapshots(&tree.root).is_empty());
    drop(tree);
}

/// The orchestrator's path: everything prepared before the freeze, one call inside it.
#[test]
fn the_library_prepares_first_and_takes_with_one_call() {
    let tree = Tree::new("zsnap-api");
    let a = tree.create("vm/a");
    let b = tree.create("vm/b");
    let shim = Shim::new("api", None);
    let zfs = evesnap::zfs::Zfs::with_path(&shim.path);
    let datasets = vec![a.clone(), b.clone()];
    let meta = zsnap::Metadata {
        id: "id-1".into(),
        kind: "IMMEDIATE".into(),
        frozen: false,
        origin: zsnap::meta::Origin::Controller,
    };
    let mut prepared =
        zsnap::preflight(&zfs, &datasets, "api1", &meta.properties(), 0).expect("preflight");
    prepared
        .set_property(zsnap::meta::FROZEN, "true")
        .expect("property");
    shim.clear();
    let taken = prepared.take().expect("take");
    assert_eq!(
        shim.calls().len(),
        1,
        "inside the window: {:?}",
        shim.calls()
    );
    let report = prepared.finish(taken).expect("finish");
    assert!(report.atomic);
    assert_eq!(report.snapshots.len(), 2);
    assert_eq!(
        get(&format!("{b}@api1"), "org.lfedge.evesnap:frozen"),
        "true"
    );
    eprintln!(
        "zfs snapshot of 2 datasets took {:.1} ms",
        report.snapshot_ms
    );

    // Not there: a preflight error, typed.
    let err = zsnap::preflight(&zfs, &[format!("{}/nope", tree.root)], "x", &[], 0)
        .expect_err("an error");
    assert!(
        matches!(err, evesnap::zfs::Error::Preflight { .. }),
        "{err:?}"
    );
}

#[test]
fn the_recursive_parents_own_snapshot_is_destroyed_after_the_document_is_out() {
    // In `qga-freeze | zsnap | qga-thaw` the thaw waits for zsnap's document: cleanup
    // that can wait must come after it. A zfs whose destroy takes 2 s shows the order.
    let tree = Tree::new("zsnap-after");
    let vm = tree.create("vm");
    let a = tree.create("vm/a");
    let b = tree.create("vm/b");
    let dir = std::env::temp_dir().join(format!("zsnap-after-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("shim folder");
    let shim = dir.join("zfs");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\n[ \"$1\" = destroy ] && sleep 2\nexec '{}' \"$@\"\n",
            real_zfs().display()
        ),
    )
    .expect("write shim");
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");

    let mut child = Command::new(zsnap())
        .args(["-d", &a, "-d", &b, "-n", "s1"])
        .env("EVESNAP_ZFS", &shim)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn zsnap");
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut stdout)
        .expect("read the document");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the document ended while zsnap still destroys the parent's snapshot"
    );
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(
        doc["steps"][0]["destroy_after_output"],
        serde_json::json!([format!("{vm}@s1")])
    );
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(snapshots(&vm).is_empty(), "{:?}", snapshots(&vm));
    assert_eq!(snapshots(&a), [format!("{a}@s1")]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_hung_zfs_is_killed_at_the_zfs_timeout() {
    let fake = support::hanging_zfs("zsnap");
    let start = std::time::Instant::now();
    let out = run(
        zsnap(),
        &["--zfs-timeout", "1", "-d", "p/a", "-n", "s"],
        None,
        &fake,
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    assert!(
        out.stderr.contains(&format!(
            "`{} snapshot` did not finish within 1.0 s and was killed",
            fake.display()
        )),
        "{}",
        out.stderr
    );
    assert_eq!(out.step()["ok"], false);
    let _ = std::fs::remove_dir_all(fake.parent().expect("its folder"));
}
