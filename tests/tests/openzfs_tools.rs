//! The tools on real OpenZFS 2.3 with zvols (issue #9). `zsnap`, `zrollback`, `qga-freeze`,
//! `qga-thaw` and `snap-orchestrate` run *inside* the OpenZFS lab guest (the static build,
//! shared at `/opt/evesnap/bin`), started from the host through the control agent
//! (`guest-exec` with argv); their JSON job documents are read back and checked against
//! what `zfs` itself says. Tools inside the guest reach the guest's own second agent on
//! AF_VSOCK loopback (`vsock:1:10000`), so a freeze freezes the guest's zvol-backed ext4.
//!
//! Timings go to stderr (`TIMING …` lines): `cargo test --test openzfs_tools -- --nocapture`.

use std::time::{Duration, Instant};

use evesnap_tests::lab::OpenZfsLab;
use evesnap_tests::openzfs::{forget, remount, Guest};
use evesnap_tests::unique;
use serde_json::{json, Value};

const TOOLS: [&str; 5] = [
    "qga-freeze",
    "qga-thaw",
    "zsnap",
    "zrollback",
    "snap-orchestrate",
];

/// The guest with the tools, or `None` (a loud skip) when they are not built for it.
fn guest() -> Option<Guest> {
    Guest::start("the tools in the OpenZFS guest", &TOOLS)
}

/// The tools of a snap-orchestrate report's steps, in order.
fn tools(report: &Value) -> Vec<&str> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["tool"].as_str().unwrap_or("?"))
        .collect()
}

/// The step of `tool` in a snap-orchestrate report, or null.
fn step_of(report: &Value, tool: &str) -> Value {
    report["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["tool"] == tool))
        .cloned()
        .unwrap_or(Value::Null)
}

/// `args`, then `--dataset <zvol>` for each of the lab's zvols.
fn with_zvols<'a>(lab: &'a OpenZfsLab, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    for z in &lab.zvols {
        all.extend(["--dataset", z.as_str()]);
    }
    all
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn ms(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

#[test]
fn zsnap_takes_one_atomic_snapshot_of_both_zvols_and_reads_it_back() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let name = unique("zsnap-multi");
    g.on_drop(forget(&name));
    let id = "5b3c1f9e-8a5e-4c2a-9d7b-0e4f1a2b3c4d";
    let mut args = with_zvols(lab, &[]);
    args.extend([
        "--name",
        &name,
        "--id",
        id,
        "--type",
        "APP_UPDATE",
        "-o",
        "org.example:note=multi zvol",
    ]);
    let run = g.tool("zsnap", &args, None);
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    let step = run.step().clone();
    assert_eq!(step["atomic"], true, "{step}");
    assert_eq!(step["method"], json!({"kind": "multi"}), "{step}");
    assert_eq!(step["calls"], 1, "{step}");
    let snaps = step["snapshots"].as_array().expect("snapshots");
    assert_eq!(snaps.len(), 2, "{step}");

    // What zsnap read back (-H -p) is what zfs says, and both share one transaction group.
    let now: u64 = g.sh("date +%s").trim().parse().expect("guest clock");
    for (snap, zvol) in snaps.iter().zip(&lab.zvols) {
        let full = format!("{zvol}@{name}");
        assert_eq!(snap["name"], full.as_str());
        assert_eq!(
            snap["createtxg"], snaps[0]["createtxg"],
            "not atomic: {step}"
        );
        // A guid is a string: 64-bit values do not survive JSON doubles.
        let guid = snap["guid"].as_str().expect("guid is a string");
        assert_eq!(guid, g.zfs_get("guid", &full));
        assert!(guid.parse::<u64>().is_ok(), "{guid}");
        assert_eq!(
            snap["createtxg"].as_u64().expect("createtxg").to_string(),
            g.zfs_get("createtxg", &full)
        );
        let creation = snap["creation"].as_u64().expect("creation");
        assert_eq!(creation.to_string(), g.zfs_get("creation", &full));
        assert!(
            now.abs_diff(creation) < 300,
            "creation {creation}, now {now}"
        );
    }

    // The metadata are local user properties of each snapshot, as `zfs get` shows them.
    let full: Vec<String> = lab.zvols.iter().map(|z| format!("{z}@{name}")).collect();
    let props = g.sh(&format!(
        "zfs get -H -o name,property,value,source \
         org.lfedge.evesnap:id,org.lfedge.evesnap:type,org.lfedge.evesnap:frozen,org.lfedge.evesnap:version,org.example:note {}",
        full.join(" ")
    ));
    for snapshot in &full {
        for (key, value) in [
            ("org.lfedge.evesnap:id", id),
            ("org.lfedge.evesnap:type", "APP_UPDATE"),
            ("org.lfedge.evesnap:frozen", "false"),
            ("org.example:note", "multi zvol"),
        ] {
            let line = format!("{snapshot}\t{key}\t{value}\tlocal");
            assert!(
                props.lines().any(|l| l == line),
                "{line:?} not in:\n{props}"
            );
        }
    }

    // `zsnap list --evesnap-only` finds them with their metadata.
    let list_args = with_zvols(lab, &["list", "--evesnap-only"]);
    let listed = g.tool("zsnap", &list_args, None);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let ours: Vec<&Value> = listed.step()["snapshots"]
        .as_array()
        .expect("list")
        .iter()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(&format!("@{name}")))
        })
        .collect();
    assert_eq!(ours.len(), 2, "{}", listed.doc);
    assert_eq!(ours[0]["properties"]["org.lfedge.evesnap:id"], id);

    // Destroyed again through zsnap, using the document the take printed.
    let destroyed = g.tool("zsnap", &["destroy"], Some(&run.doc.to_string()));
    assert_eq!(destroyed.code, 0, "{}\n{}", destroyed.doc, destroyed.stderr);
    assert_eq!(strings(&destroyed.step()["destroyed"]), full);
    assert!(!g
        .snapshots_and_bookmarks()
        .iter()
        .any(|s| s.contains(&name)));
    eprintln!(
        "TIMING zsnap (2 zvols, multi) in the guest: zfs snapshot {:.0} ms, whole step {:.0} ms, guest-exec {} ms",
        ms(&step["snapshot_ms"]),
        ms(&step["duration_ms"]),
        run.took.as_millis()
    );
}

#[test]
fn held_snapshots_stop_zsnap_destroy_and_zrollback_destroy_newer() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("held");
    let (older, newer) = (format!("{tag}-a"), format!("{tag}-b"));
    g.on_drop(forget(&tag));
    let mut sets = vec![];
    for name in [&older, &newer] {
        let args = with_zvols(lab, &["--name", name.as_str()]);
        let run = g.tool("zsnap", &args, None);
        assert_eq!(run.code, 0, "{}", run.stderr);
        sets.push(run.doc);
    }
    let held = format!("{}@{newer}", lab.zvols[1]);
    g.sh(&format!("zfs hold evesnap-test {held}"));
    let holds = g.sh(&format!("zfs holds -H -p {held}"));
    assert!(
        holds.starts_with(&format!("{held}\tevesnap-test\t")),
        "{holds:?}"
    );
    let before = g.snapshots_and_bookmarks();

    // destroy: all or none; the held member keeps the unheld one alive too.
    let run = g.tool("zsnap", &["destroy"], Some(&sets[1].to_string()));
    assert_eq!(run.code, 7, "{}\n{}", run.doc, run.stderr);
    let problems = &run.step()["problems"];
    assert_eq!(
        problems,
        &json!([{"problem": "held", "snapshot": held, "userrefs": 1}]),
        "{}",
        run.doc
    );
    assert_eq!(
        g.snapshots_and_bookmarks(),
        before,
        "zsnap destroy changed something"
    );

    // zrollback without --destroy-newer: refuses and lists the newer snapshots.
    let mut args = with_zvols(lab, &["--to", older.as_str()]);
    let run = g.tool("zrollback", &args, None);
    assert_eq!(run.code, 7, "{}", run.stderr);
    let problems = run.step()["problems"].as_array().expect("problems").clone();
    assert_eq!(problems.len(), 2, "{}", run.doc);
    for (p, zvol) in problems.iter().zip(&lab.zvols) {
        assert_eq!(p["problem"], "newer-snapshots");
        assert_eq!(strings(&p["newer"]), [format!("{zvol}@{newer}")]);
    }

    // With --destroy-newer: the held newer snapshot refuses the whole plan; nothing is destroyed.
    args.push("--destroy-newer");
    let run = g.tool("zrollback", &args, None);
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert_eq!(
        run.step()["problems"],
        json!([{"problem": "held", "snapshot": held, "userrefs": 1}]),
        "{}",
        run.doc
    );
    assert_eq!(
        g.snapshots_and_bookmarks(),
        before,
        "zrollback destroyed something"
    );

    // Released, zsnap destroy goes through.
    g.sh(&format!("zfs release evesnap-test {held}"));
    let run = g.tool("zsnap", &["destroy"], Some(&sets[1].to_string()));
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    assert_eq!(strings(&run.step()["destroyed"]).len(), 2);
}

/// The refusals that come from `zfs rollback` itself, with OpenZFS 2.3's own texts: a newer
/// snapshot appearing between zrollback's checks and its `zfs rollback` (a `zfs` shim makes
/// one, as a concurrent snapshotter would), and newer bookmarks, which only OpenZFS has.
#[test]
fn zrollback_reports_openzfs_refusals_and_newer_bookmarks() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("zrb");
    let zvol = lab.zvols[1].clone();
    let mnt = lab.guest_mounts[&zvol].clone();
    g.on_drop(forget(&tag));
    g.on_drop(remount(lab));
    let (target, racer, later) = (
        format!("{tag}-a"),
        format!("{tag}-race"),
        format!("{tag}-b"),
    );
    g.sh(&format!("zfs snapshot {zvol}@{target}"));
    let shim = format!("/tmp/zfs-race-{tag}");
    g.sh(&format!(
        "printf '#!/bin/sh\\n[ \"$1\" = rollback ] && /sbin/zfs snapshot {zvol}@{racer}\\nexec /sbin/zfs \"$@\"\\n' > {shim} && chmod 755 {shim}"
    ));
    g.on_drop(format!("rm -f {shim}"));

    let run = g.tool(
        "zrollback",
        &["--zfs", &shim, "--dataset", &zvol, "--to", &target],
        None,
    );
    assert_eq!(run.code, 1, "{}\n{}", run.doc, run.stderr);
    let error = run.step()["error"].as_str().expect("error").to_string();
    assert!(
        error.contains(&format!(
            "more recent snapshots than {zvol}@{target} exist: {zvol}@{racer}"
        )),
        "{error}"
    );
    assert!(
        error.contains("more recent snapshots or bookmarks exist"),
        "the 2.3 text is not in the cause: {error}"
    );
    assert_eq!(run.step()["rolled_back"], json!([]));
    assert_eq!(run.step()["destroyed"], json!([]));
    g.sh(&format!("zfs destroy {zvol}@{racer}"));

    // A bookmark of a newer snapshot blocks a rollback too (the snapshot itself is gone).
    g.sh(&format!(
        "zfs snapshot {zvol}@{later} && zfs bookmark {zvol}@{later} {zvol}#{later} && zfs destroy {zvol}@{later}"
    ));
    let run = g.tool("zrollback", &["--dataset", &zvol, "--to", &target], None);
    assert_eq!(run.code, 7, "{}", run.stderr);
    assert_eq!(
        run.step()["problems"][0]["newer"],
        json!([format!("{zvol}#{later}")]),
        "{}",
        run.doc
    );
    // --destroy-newer removes it and rolls back (the ext4 unmounted, as a rollback needs).
    let probe = format!("{mnt}/after-{tag}");
    g.sh(&format!("echo after > {probe} && sync && umount {mnt}"));
    let run = g.tool(
        "zrollback",
        &["--dataset", &zvol, "--to", &target, "--destroy-newer"],
        None,
    );
    g.sh(&remount(lab));
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    assert_eq!(
        strings(&run.step()["destroyed"]),
        [format!("{zvol}#{later}")]
    );
    assert_eq!(
        run.step()["rolled_back"],
        json!([{"dataset": zvol, "to": format!("{zvol}@{target}")}])
    );
    let (code, _, _) = g.exec(&["test", "-e", &probe]);
    assert_eq!(code, 1, "{probe} survived the rollback");
    eprintln!(
        "TIMING zrollback (1 zvol, 1 bookmark destroyed) in the guest: step {:.0} ms, guest-exec {} ms",
        ms(&run.step()["duration_ms"]),
        run.took.as_millis()
    );
}

/// A thick zvol's snapshot needs room outside its refreservation for the data it holds
/// (OpenZFS `dsl_dataset_snapshot_check`): on a nearly full pool zsnap's preflight refuses
/// it, names the missing bytes and creates nothing, and `zfs snapshot` agrees.
#[test]
fn a_thick_zvol_on_a_nearly_full_pool_is_refused_before_anything_is_created() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("full");
    let (thick, sparse) = (lab.zvols[0].clone(), lab.zvols[1].clone());
    let mnt = lab.guest_mounts[&thick].clone();
    assert!(
        g.zfs_get("refreservation", &thick)
            .parse::<u64>()
            .expect("refreservation")
            > 0
    );
    let fill = format!("{mnt}/fill-{tag}");
    let filler = format!("persist/filler-{tag}");
    g.on_drop(forget(&tag));
    // Give the pool and the zvol their room back (fstrim returns the freed blocks to ZFS).
    g.on_drop(format!(
        "zfs destroy {filler} 2>/dev/null; rm -f {fill}; sync; fstrim {mnt}; zpool sync persist; true"
    ));

    // 32 MiB the thick zvol holds (random: the pool compresses), then a reservation that
    // leaves the pool ~8 MiB.
    // `zpool sync`: space accounting shows only data of synced transaction groups.
    g.sh(&format!(
        "dd if=/dev/urandom of={fill} bs=1M count=32 2>/dev/null && sync && zpool sync persist"
    ));
    let unique_bytes: u64 = g
        .zfs_get("usedbydataset", &thick)
        .parse()
        .expect("usedbydataset");
    assert!(unique_bytes > 32 << 20, "{unique_bytes}");
    let pool_avail: u64 = g
        .zfs_get("available", "persist")
        .parse()
        .expect("available");
    let reserve = pool_avail - (8 << 20);
    g.sh(&format!(
        "zfs create -o reservation={reserve} {filler} && zpool sync persist"
    ));
    let left: u64 = g
        .zfs_get("available", "persist")
        .parse()
        .expect("available");
    assert!(left < 16 << 20, "the pool still has {left} bytes");

    let name = format!("{tag}-both");
    let run = g.tool(
        "zsnap",
        &["--dataset", &thick, "--dataset", &sparse, "--name", &name],
        None,
    );
    assert_eq!(run.code, 7, "{}\n{}", run.doc, run.stderr);
    let problems = run.step()["problems"].as_array().expect("problems").clone();
    assert_eq!(
        problems.len(),
        1,
        "only the thick zvol lacks room: {}",
        run.doc
    );
    let p = &problems[0];
    assert_eq!(p["problem"], "no-room");
    assert_eq!(p["dataset"], thick.as_str());
    let (needed, available, missing) = (
        p["needed"].as_u64().expect("needed"),
        p["available"].as_u64().expect("available"),
        p["missing"].as_u64().expect("missing"),
    );
    assert_eq!(missing, needed - available);
    // What it needs: the bytes it holds (capped by its refreservation) plus --min-free (1 MiB).
    assert!(
        needed >= unique_bytes,
        "needed {needed} < unique {unique_bytes}"
    );
    assert!(
        available <= left + (1 << 20),
        "available {available}, pool {left}"
    );
    assert!(
        run.step()["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("{missing} bytes missing"))),
        "{}",
        run.doc
    );
    assert!(
        !g.snapshots_and_bookmarks()
            .iter()
            .any(|s| s.contains(&name)),
        "something was created"
    );

    // OpenZFS agrees: the same snapshot, asked of zfs directly, is out of space.
    let (code, _, err) = g.exec(&["zfs", "snapshot", &format!("{thick}@{tag}-direct")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("out of space"), "{err}");
    // The sparse zvol alone still fits: the refreservation rule, not a full pool, refused.
    let run = g.tool(
        "zsnap",
        &["--dataset", &sparse, "--name", &format!("{tag}-sparse")],
        None,
    );
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    eprintln!(
        "NOTE thick zvol on a nearly full pool: needed {needed}, available {available}, missing {missing} bytes"
    );
}

/// qga-freeze and qga-thaw in the guest over AF_VSOCK: the guest's own zvol-backed ext4s
/// are frozen (a write blocks) until the thaw.
#[test]
fn qga_freeze_and_thaw_over_vsock_block_writes_on_the_zvols() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("frz");
    let mnt = lab.guest_mounts[&lab.zvols[1]].clone();
    let (written, probe) = (format!("/tmp/written-{tag}"), format!("{mnt}/frozen-{tag}"));
    g.on_drop(format!("rm -f {written} {probe}"));
    g.on_drop(g.qga_client(r#"{"execute":"guest-fsfreeze-thaw"}"#));
    assert_eq!(g.freeze_status(), "thawed");

    let frozen = g.tool("qga-freeze", &["--agent", &lab.guest_agent], None);
    assert_eq!(frozen.code, 0, "{}\n{}", frozen.doc, frozen.stderr);
    let freeze = frozen.step().clone();
    assert_eq!(freeze["frozen"], 2, "the two zvol ext4s: {freeze}");
    assert_eq!(g.freeze_status(), "frozen");
    g.sh(&format!(
        "setsid sh -c 'echo x > {probe}; touch {written}' </dev/null >/dev/null 2>&1 &"
    ));
    std::thread::sleep(Duration::from_millis(1500));
    let (code, _, _) = g.exec(&["test", "-e", &written]);
    assert_eq!(code, 1, "a write to a frozen zvol ext4 went through");

    let thawed = g.tool("qga-thaw", &[], Some(&frozen.doc.to_string()));
    assert_eq!(thawed.code, 0, "{}\n{}", thawed.doc, thawed.stderr);
    let thaw = thawed.step().clone();
    assert_eq!(thaw["thawed"], 2, "{thaw}");
    assert!(thaw["watchdog_cancelled"].is_object(), "{thaw}");
    assert_eq!(g.freeze_status(), "thawed");
    g.sh(&format!(
        "i=0; while [ ! -e {written} ]; do i=$((i+1)); [ $i -gt 100 ] && exit 1; sleep 0.05; done"
    ));
    eprintln!(
        "TIMING in the guest over vsock: freeze command {:.1} ms (step {:.0} ms), thaw command {:.1} ms (step {:.0} ms)",
        ms(&freeze["freeze_ms"]),
        ms(&freeze["duration_ms"]),
        ms(&thaw["thaw_ms"]),
        ms(&thaw["duration_ms"])
    );

    // One mountpoint (guest-fsfreeze-freeze-list over vsock): only that ext4 is frozen.
    let frozen = g.tool(
        "qga-freeze",
        &["--agent", &lab.guest_agent, "--mountpoint", &mnt],
        None,
    );
    assert_eq!(frozen.code, 0, "{}\n{}", frozen.doc, frozen.stderr);
    assert_eq!(frozen.step()["frozen"], 1, "{}", frozen.doc);
    let other = &lab.guest_mounts[&lab.zvols[0]];
    g.sh(&format!(
        "echo unfrozen > {other}/unfrozen-{tag} && rm {other}/unfrozen-{tag}"
    ));
    let thawed = g.tool("qga-thaw", &[], Some(&frozen.doc.to_string()));
    assert_eq!(thawed.code, 0, "{}\n{}", thawed.doc, thawed.stderr);
    assert_eq!(thawed.step()["thawed"], 1, "{}", thawed.doc);

    // No listener on a vsock port: the loopback resets the connection; "unreachable" (3).
    let unreachable = g.tool(
        "qga-freeze",
        &["--agent", "vsock:1:10999", "--connect-timeout", "1"],
        None,
    );
    assert_eq!(unreachable.code, 3, "{}", unreachable.doc);
    assert_eq!(unreachable.doc["error"]["kind"], "agent-unreachable");
    assert_eq!(g.freeze_status(), "thawed");
}

/// zsnap's preflight on OpenZFS: a missing zvol and a taken name are named, nothing created.
#[test]
fn zsnap_preflight_names_missing_zvols_and_taken_names() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let name = unique("pre");
    g.on_drop(forget(&name));
    let missing = format!(
        "{}/vault/volumes/00000000-0000-4000-8000-000000000000.1",
        lab.pool
    );
    let run = g.tool(
        "zsnap",
        &[
            "--dataset",
            &lab.zvols[0],
            "--dataset",
            &missing,
            "--name",
            &name,
        ],
        None,
    );
    assert_eq!(run.code, 7, "{}", run.doc);
    assert_eq!(
        run.step()["problems"],
        json!([{"problem": "missing", "dataset": missing}])
    );
    let taken = format!("{}@{name}", lab.zvols[1]);
    g.sh(&format!("zfs snapshot {taken}"));
    let args = with_zvols(lab, &["--name", name.as_str()]);
    let run = g.tool("zsnap", &args, None);
    assert_eq!(run.code, 7, "{}", run.doc);
    assert_eq!(
        run.step()["problems"],
        json!([{"problem": "name-taken", "snapshot": taken}])
    );
    let ours: Vec<String> = g
        .snapshots()
        .into_iter()
        .filter(|s| s.contains(&name))
        .collect();
    assert_eq!(ours, [taken], "zsnap created something");
}

/// The application in the guest: appends to a log on each zvol's ext4 until stopped;
/// `pause` waits until it has stopped writing, syncs and records the logs' checksums.
const APP: &str = r#"#!/bin/sh
# evesnap-app run|pause|resume|stop DIR...
s=/tmp/evesnap-app
cmd=$1; shift
case $cmd in
run)
  rm -f $s.stop $s.stopped $s.pause $s.paused
  i=0
  while [ ! -e $s.stop ]; do
    if [ -e $s.pause ]; then touch $s.paused; sleep 0.05; continue; fi
    i=$((i+1))
    for d in "$@"; do echo "line $i $(date +%s%N)" >> "$d/app.log"; done
    sleep 0.02
  done
  touch $s.stopped ;;
pause)
  touch $s.pause
  n=0; until [ -e $s.paused ]; do n=$((n+1)); [ $n -gt 200 ] && exit 1; sleep 0.05; done
  sync
  for d in "$@"; do sha256sum "$d/app.log"; done > $s.sums ;;
resume)
  rm -f $s.pause $s.paused ;;
stop)
  touch $s.stop
  n=0; until [ -e $s.stopped ]; do n=$((n+1)); [ $n -gt 200 ] && exit 1; sleep 0.05; done ;;
esac
"#;

/// The whole flow in the guest: snap-orchestrate with guest_pre (pause the application),
/// a freeze through the in-guest vsock agent, one atomic snapshot of both zvols, thaw,
/// guest_post (resume); later a rollback, refused while the zvols are mounted (they are
/// matched by `disks.*.dev`, resolved in the guest), done after guest_pre stops the
/// application and unmounts, guest_post remounts; the logs match the snapshot's checksums.
#[test]
fn snap_orchestrate_in_the_guest_snapshots_and_rolls_back_a_running_application() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("orch");
    let mounts: Vec<String> = lab
        .zvols
        .iter()
        .map(|z| lab.guest_mounts[z].clone())
        .collect();
    let app = format!("/tmp/evesnap-app-{tag}");
    g.on_drop(forget(&tag));
    g.on_drop(format!(
        "{}; rm -f {app} {} /tmp/evesnap-app.*",
        remount(lab),
        mounts
            .iter()
            .map(|m| format!("{m}/app.log"))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    g.on_drop(format!(
        "touch /tmp/evesnap-app.stop; sleep 0.3; {}",
        g.qga_client(r#"{"execute":"guest-fsfreeze-thaw"}"#)
    ));
    g.sh(&format!(
        "cat > {app} <<'EOF'\n{APP}EOF\nchmod 755 {app}; rm -f {}",
        mounts
            .iter()
            .map(|m| format!("{m}/app.log"))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    g.sh(&format!(
        "setsid {app} run {} </dev/null >/dev/null 2>&1 &",
        mounts.join(" ")
    ));
    let lines = |g: &mut Guest| -> u64 {
        g.sh(&format!("cat {}/app.log 2>/dev/null | wc -l", mounts[0]))
            .trim()
            .parse()
            .expect("line count")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines(&mut g) < 5 {
        assert!(Instant::now() < deadline, "the application does not write");
        std::thread::sleep(Duration::from_millis(200));
    }

    let name = format!("{tag}-snap");
    let mut pause = vec!["pause".to_string()];
    pause.extend(mounts.iter().cloned());
    let create = json!({
        "version": 1, "type": "app_update", "agent": lab.guest_agent,
        "datasets": lab.zvols, "snapshot": name,
        "freeze": {"timeout_s": 30, "thaw_after_s": 60},
        "guest_pre": [{"path": app, "args": pause}],
        "guest_post": [{"path": app, "args": ["resume"]}],
    });
    let run = g.tool("snap-orchestrate", &[], Some(&create.to_string()));
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    let create_took = run.took;
    let report = run.doc.clone();
    assert_eq!(report["consistency"], "application", "{report}");
    assert_eq!(
        tools(&report),
        [
            "preflight",
            "guest_pre",
            "flush",
            "qga-freeze",
            "zsnap",
            "qga-thaw",
            "guest_post"
        ]
    );
    let step = |tool: &str| step_of(&report, tool);
    assert_eq!(step("qga-freeze")["frozen"], 2, "{report}");
    assert_eq!(step("qga-thaw")["thawed"], 2, "{report}");
    assert_eq!(step("zsnap")["method"], json!({"kind": "multi"}));
    let snaps = report["snapshots"].as_array().expect("snapshots");
    assert_eq!(snaps.len(), 2);
    assert_eq!(snaps[0]["createtxg"], snaps[1]["createtxg"], "not atomic");
    for z in &lab.zvols {
        assert_eq!(
            g.zfs_get("org.lfedge.evesnap:consistency", &format!("{z}@{name}")),
            "application"
        );
    }
    assert_eq!(g.freeze_status(), "thawed");
    let window = ms(&report["freeze_window_ms"]);
    assert!(window > 0.0 && window < 30_000.0, "{report}");
    let sums = g.sh("cat /tmp/evesnap-app.sums");
    assert_eq!(sums.lines().count(), 2, "{sums}");
    g.sh(&format!(
        "cp /tmp/evesnap-app.sums /tmp/evesnap-app.at-{tag}"
    ));

    // The application goes on writing after the snapshot.
    let at_snapshot = lines(&mut g);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines(&mut g) < at_snapshot + 5 {
        assert!(Instant::now() < deadline, "the application did not resume");
        std::thread::sleep(Duration::from_millis(200));
    }

    let disks: serde_json::Map<String, Value> = lab
        .zvols
        .iter()
        .map(|z| (z.clone(), json!({"dev": format!("/dev/zvol/{z}")})))
        .collect();
    // A rollback while the zvols are mounted is refused, and nothing is rolled back.
    let mounted = json!({
        "version": 1, "action": "rollback", "agent": lab.guest_agent,
        "datasets": lab.zvols, "rollback": {"to": name}, "disks": disks,
    });
    let before = g.snapshots_and_bookmarks();
    let run = g.tool("snap-orchestrate", &[], Some(&mounted.to_string()));
    assert_eq!(run.code, 7, "{}\n{}", run.doc, run.stderr);
    assert_eq!(run.doc["error"]["step"], "unmounted", "{}", run.doc);
    let busy = strings(&run.step()["mounted"]);
    assert_eq!(busy.len(), 2, "{}", run.doc);
    for (zvol, mnt) in lab.zvols.iter().zip(&mounts) {
        assert!(
            busy.iter()
                .any(|b| b.starts_with(&format!("{zvol}: {mnt} (zd"))),
            "{busy:?}"
        );
    }
    assert_eq!(g.snapshots_and_bookmarks(), before);
    assert!(
        lines(&mut g) > at_snapshot,
        "the refused rollback changed the data"
    );

    // A `dev` that does not exist in the guest is refused before guest_pre runs: it would
    // make every filesystem look unrelated to the volume.
    let mut typo = disks.clone();
    let wrong = format!("/dev/zvol/{}/vault/volumes/typo.1", lab.pool);
    typo.insert(lab.zvols[0].clone(), json!({ "dev": wrong }));
    let plan = json!({
        "version": 1, "action": "rollback", "agent": lab.guest_agent,
        "datasets": lab.zvols, "rollback": {"to": name}, "disks": typo,
        "guest_pre": [{"path": app, "args": ["stop"]}],
    });
    let run = g.tool("snap-orchestrate", &[], Some(&plan.to_string()));
    assert_eq!(run.code, 7, "{}\n{}", run.doc, run.stderr);
    assert_eq!(run.doc["error"]["step"], "preflight", "{}", run.doc);
    assert!(
        run.doc["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a block device")),
        "{}",
        run.doc
    );
    assert_eq!(g.snapshots_and_bookmarks(), before);
    let (code, _, _) = g.exec(&["test", "-e", "/tmp/evesnap-app.stop"]);
    assert_eq!(code, 1, "guest_pre ran after a failed preflight");

    // Stop the application and unmount (guest_pre); roll back; drop caches and remount
    // (guest_post[i] undoes guest_pre[i]).
    let mut pre = vec![json!({"path": app, "args": ["stop"]})];
    let mut post = vec![json!({"path": "/bin/true"})];
    for (zvol, mnt) in lab.zvols.iter().zip(&mounts) {
        pre.push(json!({"path": "/bin/umount", "args": [mnt]}));
        post.push(json!({"path": "/bin/sh", "args": ["-c", format!(
            "echo 3 > /proc/sys/vm/drop_caches; mount -t ext4 $(readlink -f /dev/zvol/{zvol}) {mnt}"
        )]}));
    }
    let rollback = json!({
        "version": 1, "action": "rollback", "agent": lab.guest_agent,
        "datasets": lab.zvols, "rollback": {"to": name}, "disks": disks,
        "guest_pre": pre, "guest_post": post,
    });
    let run = g.tool("snap-orchestrate", &[], Some(&rollback.to_string()));
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    let report = run.doc.clone();
    assert_eq!(
        tools(&report),
        [
            "preflight",
            "guest_pre",
            "unmounted",
            "zrollback",
            "guest_post"
        ]
    );
    let preflight = &report["steps"][0];
    for zvol in &lab.zvols {
        let dev = preflight["devices"][zvol].as_str().unwrap_or("");
        assert!(dev.starts_with("/dev/zd"), "{preflight}");
    }
    assert_eq!(
        report["rolled_back"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    // Back in the state of the snapshot: the logs match the checksums taken at the pause.
    g.sh(&format!("sha256sum -c /tmp/evesnap-app.at-{tag}"));
    let rolled = lines(&mut g);
    assert!(
        rolled <= at_snapshot,
        "{rolled} lines after the rollback, {at_snapshot} at the snapshot"
    );
    eprintln!(
        "TIMING snap-orchestrate in the guest: create {} ms (freeze window {window:.0} ms: freeze command {:.0} ms, \
         zfs snapshot {:.0} ms, thaw command {:.0} ms), rollback of 2 zvols {} ms (zrollback step {:.0} ms)",
        create_took.as_millis(),
        ms(&step("qga-freeze")["freeze_ms"]),
        ms(&step("zsnap")["snapshot_ms"]),
        ms(&step("qga-thaw")["thaw_ms"]),
        run.took.as_millis(),
        ms(&report["steps"][3]["duration_ms"]),
    );
}

/// Retention and rollback on OpenZFS with a held and a cloned set: `zsnap prune` keeps both
/// (saying why) and prunes only the free old set; `zrollback --destroy-newer` refuses to
/// destroy a newer snapshot that has a clone (read from `origin` of the pool's datasets).
#[test]
fn prune_and_rollback_respect_holds_and_clones_on_openzfs() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("keep");
    let clone = format!("{}/vault/volumes/clone-{tag}", lab.pool);
    g.on_drop(forget(&tag));
    g.on_drop(format!("zfs destroy {clone} 2>/dev/null; true"));
    let names: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|s| format!("{tag}-{s}"))
        .collect();
    for name in &names {
        let args = with_zvols(lab, &["--name", name.as_str()]);
        let run = g.tool("zsnap", &args, None);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let held = format!("{}@{}", lab.zvols[1], names[0]);
    let cloned = format!("{}@{}", lab.zvols[0], names[1]);
    g.sh(&format!(
        "zfs hold evesnap-test {held} && zfs clone {cloned} {clone}"
    ));

    // Only this test's sets count: the zvols carry no other evesnap snapshots here, unless
    // an earlier run left some, which prune may then destroy too (they are evesnap's).
    let args = with_zvols(lab, &["prune", "--keep", "1"]);
    let run = g.tool("zsnap", &args, None);
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    let step = run.step().clone();
    let destroyed = strings(&step["destroyed"]);
    let want: Vec<String> = lab
        .zvols
        .iter()
        .map(|z| format!("{z}@{}", names[2]))
        .collect();
    assert!(
        want.iter().all(|w| destroyed.contains(w)),
        "set c not pruned: {step}"
    );
    assert!(
        !destroyed
            .iter()
            .any(|d| d.contains(&names[0]) || d.contains(&names[1]) || d.contains(&names[3])),
        "{step}"
    );
    let kept = step["kept"].as_array().expect("kept").clone();
    let reason = |snapshot: &str| -> String {
        kept.iter()
            .find(|k| k["snapshot"] == snapshot)
            .and_then(|k| k["reason"].as_str())
            .unwrap_or("")
            .to_string()
    };
    assert!(reason(&held).contains("is held"), "{step}");
    assert!(
        reason(&cloned).contains(&format!("has clones: {clone}")),
        "{step}"
    );

    // zrollback to a (held target is fine) must destroy b, which has a clone: refused.
    let before = g.snapshots_and_bookmarks();
    let run = g.tool(
        "zrollback",
        &[
            "--dataset",
            &lab.zvols[0],
            "--to",
            &names[0],
            "--destroy-newer",
        ],
        None,
    );
    assert_eq!(run.code, 7, "{}\n{}", run.doc, run.stderr);
    assert_eq!(
        run.step()["problems"],
        json!([{"problem": "has-clones", "snapshot": cloned, "clones": [clone]}]),
        "{}",
        run.doc
    );
    assert_eq!(
        g.snapshots_and_bookmarks(),
        before,
        "zrollback changed something"
    );
}

/// The pool fills up between snapshot-orchestrate's preflight and its `zfs snapshot` (a `zfs`
/// shim takes the space just before the real snapshot, as a busy neighbour would): OpenZFS
/// refuses the whole multi-snapshot ("no snapshots were created"), the guest is thawed and
/// the application resumed, and the report names the step and the cause.
#[test]
fn snap_orchestrate_in_the_guest_survives_a_pool_filling_up_inside_the_freeze() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("oos");
    let thick = lab.zvols[0].clone();
    let mnt = lab.guest_mounts[&thick].clone();
    let (fill, filler) = (
        format!("{mnt}/fill-{tag}"),
        format!("{}/filler-{tag}", lab.pool),
    );
    let (shim, resumed) = (
        format!("/tmp/zfs-fill-{tag}"),
        format!("/tmp/resumed-{tag}"),
    );
    g.on_drop(forget(&tag));
    g.on_drop(format!(
        "zfs destroy {filler} 2>/dev/null; rm -f {fill} {shim} {resumed}; sync; fstrim {mnt}; zpool sync {pool}; true",
        pool = lab.pool
    ));
    g.on_drop(g.qga_client(r#"{"execute":"guest-fsfreeze-thaw"}"#));
    // 16 MiB the thick zvol holds: its snapshot needs that much outside its refreservation.
    g.sh(&format!(
        "dd if=/dev/urandom of={fill} bs=1M count=16 2>/dev/null && sync && zpool sync {}",
        lab.pool
    ));
    g.sh(&format!(
        "cat > {shim} <<'EOF'\n#!/bin/sh\n\
         case \"$*\" in snapshot*@*)\n  \
         a=$(/sbin/zfs get -H -p -o value available {pool})\n  \
         /sbin/zfs create -o reservation=$((a - 4194304)) {filler} || exit 99\n  \
         /sbin/zpool sync {pool} ;;\nesac\nexec /sbin/zfs \"$@\"\nEOF\nchmod 755 {shim}",
        pool = lab.pool
    ));
    let name = format!("{tag}-snap");
    let plan = json!({
        "version": 1, "agent": lab.guest_agent, "datasets": lab.zvols, "snapshot": name,
        "guest_post": [{"path": "/bin/touch", "args": [resumed]}],
    });
    let run = g.tool(
        "snap-orchestrate",
        &["--zfs", &shim],
        Some(&plan.to_string()),
    );
    assert_eq!(run.code, 1, "{}\n{}", run.doc, run.stderr);
    let report = &run.doc;
    assert_eq!(report["error"]["step"], "snapshot", "{report}");
    let step = |tool: &str| step_of(report, tool);
    let zsnap = step("zsnap");
    assert_eq!(zsnap["ok"], false, "{report}");
    let error = zsnap["error"].as_str().unwrap_or("");
    assert!(
        error.contains("out of space") && error.contains("no snapshots were created"),
        "{error}"
    );
    assert_eq!(step("qga-thaw")["ok"], true, "{report}");
    assert_eq!(step("qga-thaw")["thawed"], 2, "{report}");
    assert_eq!(step("guest_post")["ok"], true, "{report}");
    assert_eq!(g.freeze_status(), "thawed");
    let (code, _, _) = g.exec(&["test", "-e", &resumed]);
    assert_eq!(code, 0, "guest_post did not run");
    assert!(
        !g.snapshots_and_bookmarks()
            .iter()
            .any(|s| s.contains(&name)),
        "part of the set was created"
    );
    eprintln!(
        "NOTE out of space inside the freeze: freeze window {:.0} ms, zsnap error: {error}",
        ms(&report["freeze_window_ms"])
    );
}

/// A `zfs` shim in the guest that fails the `nth` call of `sub` (counting in its own file)
/// and runs the real one otherwise.
fn failing_zfs(g: &mut Guest, tag: &str, sub: &str, nth: u32) -> String {
    let shim = format!("/tmp/zfs-fail-{tag}-{sub}-{nth}");
    let count = format!("{shim}.count");
    g.sh(&format!(
        "printf '#!/bin/sh\\nif [ \"$1\" = {sub} ]; then echo x >> {count}; \
         if [ $(wc -l < {count}) -eq {nth} ]; then echo \"{sub} broke\" >&2; exit 1; fi; fi\\n\
         exec /sbin/zfs \"$@\"\\n' > {shim} && chmod 755 {shim} && rm -f {count}"
    ));
    g.on_drop(format!("rm -f {shim} {count}"));
    shim
}

/// `zfs list` of the zvols' family: names, origins and holds (what a failure must keep).
fn family(g: &mut Guest) -> String {
    g.sh("zfs list -H -t all -r -o name,origin,userrefs,refreservation persist/vault/volumes")
}

/// Mounts `zvol`'s ext4 at `mnt` once udev shows its (renamed) device link.
fn mount_zvol(zvol: &str, mnt: &str) -> String {
    format!(
        "for i in $(seq 50); do [ -e /dev/zvol/{zvol} ] && break; sleep 0.1; done; \
         mkdir -p {mnt} && echo 3 > /proc/sys/vm/drop_caches && \
         mount -t ext4 $(readlink -f /dev/zvol/{zvol}) {mnt}"
    )
}

/// EVE's case: a thick zvol, mounted in the guest, rolled back with `--keep-newer` while
/// unmounted, then forward again. Checksums prove each state: after going back the zvol has
/// the target's file and the kept state (`<zvol>.evesnap-kept-*`) the data it had, with the
/// held newer snapshot; going forward brings the newer snapshot's file and every snapshot
/// back. A mounted zvol is refused before anything changes, and each zfs call failing
/// leaves the family as it was.
#[test]
fn keep_newer_rolls_a_zvol_back_and_forward_on_openzfs() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("kn");
    let zvol = lab.zvols[0].clone();
    let mnt = lab.guest_mounts[&zvol].clone();
    let file = format!("{mnt}/keep-{tag}");
    let look = format!("/tmp/look-{tag}");
    g.on_drop(remount(lab));
    g.on_drop(forget(&tag));
    g.on_drop(format!(
        "umount {look} 2>/dev/null; \
         for k in $(zfs list -H -o name -t volume -r persist | grep -e '.evesnap-kept-' -e '.evesnap-new-'); do \
         for s in $(zfs list -H -o name -t snapshot \"$k\"); do zfs release evesnap-test \"$s\" 2>/dev/null; done; \
         zfs destroy -r \"$k\"; done; true"
    ));
    let write = |g: &mut Guest| -> String {
        g.sh(&format!(
            "dd if=/dev/urandom of={file} bs=64k count=16 2>/dev/null && sync && md5sum {file} | cut -d' ' -f1"
        ))
        .trim()
        .to_string()
    };
    let refreservation = g.zfs_get("refreservation", &zvol);
    let a = write(&mut g);
    g.sh(&format!("zfs snapshot {zvol}@{tag}-a"));
    let b = write(&mut g);
    g.sh(&format!(
        "zfs snapshot {zvol}@{tag}-b && zfs hold evesnap-test {zvol}@{tag}-b"
    ));
    let head = write(&mut g);

    // Mounted: refused before anything changes, naming the mount.
    let before = family(&mut g);
    let back = ["--dataset", zvol.as_str(), "--to", "", "--keep-newer"];
    let mut args = back;
    let to_a = format!("{tag}-a");
    args[3] = &to_a;
    let run = g.tool("zrollback", &args, None);
    assert_eq!(run.code, 7, "{}\n{}", run.doc, run.stderr);
    let error = run.step()["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains("is in use") && error.contains(&format!("mounted at {mnt}")),
        "{error}"
    );
    assert_eq!(family(&mut g), before);

    // Each call failing, unmounted: undone, the family as it was.
    g.sh(&format!("umount {mnt}"));
    for (sub, nth) in [("clone", 1), ("promote", 1), ("rename", 1), ("rename", 2)] {
        let shim = failing_zfs(&mut g, &tag, sub, nth);
        let mut failing = vec!["--zfs", shim.as_str()];
        failing.extend_from_slice(&args);
        let run = g.tool("zrollback", &failing, None);
        assert_eq!(run.code, 1, "{sub} #{nth}: {}\n{}", run.doc, run.stderr);
        let error = run.step()["error"].as_str().unwrap_or("").to_string();
        assert!(
            error.contains(&format!("failed at `zfs {sub}"))
                && error.contains("everything done was undone")
                && error.contains(&format!("{sub} broke")),
            "{sub} #{nth}: {error}"
        );
        assert_eq!(family(&mut g), before, "{sub} #{nth} left a change");
    }
    g.sh(&format!(
        "{} && md5sum {file} | cut -d' ' -f1 > /tmp/md5-{tag} && umount {mnt}",
        mount_zvol(&zvol, &mnt)
    ));
    assert_eq!(
        g.sh(&format!("cat /tmp/md5-{tag}")).trim(),
        head,
        "a failure changed the data"
    );

    // Back to a.
    let run = g.tool("zrollback", &args, None);
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    let kept = run.step()["kept"][0].clone();
    let kept_as = kept["kept_as"].as_str().expect("kept_as").to_string();
    assert!(
        kept_as.starts_with(&format!("{zvol}.evesnap-kept-")),
        "{kept}"
    );
    assert_eq!(strings(&kept["snapshots"]), [format!("{kept_as}@{tag}-b")]);
    eprintln!(
        "TIMING zrollback --keep-newer (thick zvol) in the guest: step {:.0} ms",
        ms(&run.step()["duration_ms"])
    );
    assert_eq!(g.zfs_get("refreservation", &zvol), refreservation);
    assert_eq!(g.zfs_get("userrefs", &format!("{kept_as}@{tag}-b")), "1");
    assert_eq!(g.zfs_get("origin", &kept_as), format!("{zvol}@{tag}-a"));
    let md5 = |g: &mut Guest, zvol: &str, at: &str| -> String {
        g.sh(&format!(
            "{} && md5sum {at}/keep-{tag} | cut -d' ' -f1; umount {at}",
            mount_zvol(zvol, at)
        ))
        .trim()
        .to_string()
    };
    assert_eq!(
        md5(&mut g, &zvol, &mnt),
        a,
        "the zvol does not hold a's data"
    );
    assert_eq!(
        md5(&mut g, &kept_as, &look),
        head,
        "the kept state lost its data"
    );

    // Forward to b, from the kept state, after writing on the rolled-back zvol.
    g.sh(&format!(
        "{} && rm -f {file} && sync && umount {mnt}",
        mount_zvol(&zvol, &mnt)
    ));
    let to_b = format!("{tag}-b");
    args[3] = &to_b;
    let run = g.tool("zrollback", &args, None);
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    assert_eq!(
        run.step()["rolled_back"][0]["to"],
        json!(format!("{kept_as}@{tag}-b"))
    );
    let second = run.step()["kept"][0]["kept_as"]
        .as_str()
        .expect("kept_as")
        .to_string();
    assert_eq!(
        md5(&mut g, &zvol, &mnt),
        b,
        "the zvol does not hold b's data"
    );
    assert_eq!(
        md5(&mut g, &kept_as, &look),
        head,
        "the first kept state lost its data"
    );
    let snaps = g.sh(&format!("zfs list -H -o name -t snapshot {zvol}"));
    assert!(
        snaps.contains(&format!("{zvol}@{tag}-a")) && snaps.contains(&format!("{zvol}@{tag}-b")),
        "{snaps}"
    );
    assert_eq!(g.zfs_get("userrefs", &format!("{zvol}@{tag}-b")), "1");
    assert_eq!(g.zfs_get("origin", &zvol), "-");
    assert_eq!(g.zfs_get("origin", &second), format!("{zvol}@{tag}-a"));
    assert_eq!(g.zfs_get("refreservation", &zvol), refreservation);
}

/// The orchestrator's `keep_newer` where the pool is (EVE's case): `guest_pre` unmounts the
/// zvol, the "unmounted" check and the in-use check pass, the switch runs, `guest_post`
/// mounts the zvol again by its name (now the rolled-back one): the file is the snapshot's,
/// the kept state holds what the zvol held, with the newer snapshot.
#[test]
fn snap_orchestrate_keep_newer_rolls_back_a_mounted_zvol_and_keeps_its_state() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("okn");
    let zvol = lab.zvols[1].clone();
    let mnt = lab.guest_mounts[&zvol].clone();
    let file = format!("{mnt}/keep-{tag}");
    let look = format!("/tmp/look-{tag}");
    g.on_drop(remount(lab));
    g.on_drop(forget(&tag));
    g.on_drop(format!(
        "umount {look} 2>/dev/null; \
         for k in $(zfs list -H -o name -t volume -r persist | grep -e '.evesnap-kept-' -e '.evesnap-new-'); do \
         zfs destroy -r \"$k\"; done; true"
    ));
    let write = |g: &mut Guest| -> String {
        g.sh(&format!(
            "dd if=/dev/urandom of={file} bs=64k count=8 2>/dev/null && sync && md5sum {file} | cut -d' ' -f1"
        ))
        .trim()
        .to_string()
    };
    let at_a = write(&mut g);
    g.sh(&format!("zfs snapshot {zvol}@{tag}-a"));
    write(&mut g);
    g.sh(&format!("zfs snapshot {zvol}@{tag}-b"));
    let head = write(&mut g);

    let plan = json!({
        "version": 1, "action": "rollback", "agent": lab.guest_agent,
        "datasets": [zvol], "rollback": {"to": format!("{tag}-a"), "keep_newer": true},
        "disks": {zvol.as_str(): {"dev": format!("/dev/zvol/{zvol}")}},
        "guest_pre": [{"path": "/bin/umount", "args": [mnt]}],
        "guest_post": [{"path": "/bin/sh", "args": ["-c", mount_zvol(&zvol, &mnt)]}],
    });
    let run = g.tool("snap-orchestrate", &[], Some(&plan.to_string()));
    assert_eq!(run.code, 0, "{}\n{}", run.doc, run.stderr);
    assert_eq!(
        tools(&run.doc),
        [
            "preflight",
            "guest_pre",
            "unmounted",
            "zrollback",
            "guest_post"
        ]
    );
    let kept = step_of(&run.doc, "zrollback")["kept"][0].clone();
    let kept_as = kept["kept_as"].as_str().expect("kept_as").to_string();
    assert_eq!(strings(&kept["snapshots"]), [format!("{kept_as}@{tag}-b")]);
    let now = g.sh(&format!("md5sum {file} | cut -d' ' -f1"));
    assert_eq!(now.trim(), at_a, "the mounted zvol does not hold a's data");
    let kept_data = g.sh(&format!(
        "{} && md5sum {look}/keep-{tag} | cut -d' ' -f1; umount {look}",
        mount_zvol(&kept_as, &look)
    ));
    assert_eq!(
        kept_data.trim(),
        head,
        "the kept state lost the zvol's data"
    );
}

/// A thick zvol's keep-newer rollback needs its `refreservation` again (its clone gets one):
/// with a reservation of another zvol taking the pool's room, the preflight refuses with the
/// missing bytes and nothing is created; without it, the same command goes through.
#[test]
fn keep_newer_of_a_thick_zvol_without_room_is_refused_before_anything_is_created() {
    let Some(mut g) = guest() else { return };
    let lab = g.lab;
    let tag = unique("knroom");
    let zvol = lab.zvols[0].clone();
    let filler = format!("{}/filler-{tag}", lab.pool);
    g.on_drop(forget(&tag));
    g.on_drop(format!("zfs destroy {filler} 2>/dev/null; true"));
    let reservation: u64 = g.zfs_get("refreservation", &zvol).parse().expect("bytes");
    assert!(reservation > 0, "{zvol} is not thick");
    g.sh(&format!("zfs snapshot {zvol}@{tag}-a"));
    // Leave less than the reservation free outside the zvol's own reservation.
    let free: u64 = g.zfs_get("available", &lab.pool).parse().expect("bytes");
    let take = (free - reservation / 2) / (1 << 20);
    g.sh(&format!("zfs create -V {take}M {filler}"));
    let available: u64 = g.zfs_get("available", &lab.pool).parse().expect("bytes");
    assert!(
        available < reservation,
        "{available} free, {reservation} needed"
    );
    let before = family(&mut g);
    let to = format!("{tag}-a");
    let args = [
        "--dataset",
        zvol.as_str(),
        "--to",
        to.as_str(),
        "--keep-newer",
    ];
    let run = g.tool("zrollback", &args, None);
    assert_eq!(run.code, 7, "{}\n{}", run.doc, run.stderr);
    let problem = &run.step()["problems"][0];
    assert_eq!(problem["problem"], "no-room-to-keep", "{}", run.doc);
    assert_eq!(problem["needed"], json!(reservation), "{}", run.doc);
    assert_eq!(
        family(&mut g),
        before,
        "a refused keep-newer changed something"
    );
}
