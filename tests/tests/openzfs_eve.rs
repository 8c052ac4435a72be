//! Plans in EVE's terms on real OpenZFS zvols named as EVE names them
//! (`persist/vault/volumes/<uuid>.<generation>`, issue 16): create by app and volume UUIDs,
//! the same create twice, a half-made set repaired, rollback and delete by id, EVE's
//! per-app retention with a held and a foreign snapshot present, and a halted VM's snapshot
//! (refused while its zvol is mounted or open). `snap-orchestrate` runs inside the OpenZFS
//! lab guest (the static build at `/opt/evesnap/bin`), where the pool is.

use evesnap_tests::lab::OpenZfsLab;
use evesnap_tests::openzfs::{forget, remount, Guest};
use evesnap_tests::unique;
use serde_json::{json, Value};

/// The guest with `snap-orchestrate`, or `None` (a loud skip) when it is not built for it.
fn guest() -> Option<Guest> {
    Guest::start("EVE plans in the OpenZFS guest", &["snap-orchestrate"])
}

/// The lab's zvols as EVE volumes: (uuid, zvol).
fn volumes(lab: &OpenZfsLab) -> Vec<(String, String)> {
    lab.zvols
        .iter()
        .map(|z| {
            let file = z.rsplit('/').next().expect("zvol name");
            let uuid = file.strip_suffix(".1").expect("generation 1");
            (uuid.to_string(), z.clone())
        })
        .collect()
}

/// A plan for the lab's zvols in EVE's terms; `extra` merged in.
fn plan(lab: &OpenZfsLab, app: &str, id: &str, extra: Value) -> Value {
    let volumes: Vec<Value> = volumes(lab)
        .iter()
        .map(|(uuid, _)| json!({"uuid": uuid, "generation": 1}))
        .collect();
    let mut plan = json!({"version": 1, "id": id, "type": "app_update", "app": app,
        "agent": lab.guest_agent, "volumes": volumes,
        "volume_root": format!("{}/vault/volumes", lab.pool),
        "freeze": {"timeout_s": 30, "thaw_after_s": 60}});
    for (k, v) in extra.as_object().expect("object") {
        plan[k] = v.clone();
    }
    plan
}

fn unmount_all(g: &mut Guest) {
    let mounts: Vec<String> = g.lab.guest_mounts.values().cloned().collect();
    for m in mounts {
        g.sh(&format!("sync; umount {m}"));
    }
}

fn new_uuid() -> String {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid").expect("a uuid");
    String::from_utf8_lossy(&bytes).trim().to_string()
}

fn tools(report: &Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["tool"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn step<'a>(report: &'a Value, tool: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["tool"] == tool))
        .unwrap_or_else(|| panic!("no {tool} step: {report}"))
}

#[test]
fn eve_plans_create_repair_roll_back_and_delete_by_id_on_zvols() {
    let Some(mut g) = guest() else { return };
    let (app, id) = (new_uuid(), new_uuid());
    g.on_drop(remount(g.lab));
    g.on_drop(forget(&id));
    let volumes = volumes(g.lab);
    let name = format!("evesnap-{id}");
    let member = |zvol: &str| format!("{zvol}@{name}");

    // Create by app and volume UUIDs.
    let create = plan(g.lab, &app, &id, json!({}));
    let (code, first, err) = g.orchestrate(&create);
    assert_eq!(code, 0, "{first}\n{err}");
    assert_eq!(first["consistency"], "filesystem", "{first}");
    assert_eq!(first["app"], app.as_str());
    for (uuid, zvol) in &volumes {
        assert_eq!(first["volume_snapshots"][uuid], member(zvol), "{first}");
        assert_eq!(g.zfs_get("org.lfedge.evesnap:id", &member(zvol)), id);
    }
    let before = g.snapshots();

    // The same create again: the first set, nothing frozen or taken.
    let (code, second, err) = g.orchestrate(&create);
    assert_eq!(code, 0, "{second}\n{err}");
    assert_eq!(second["existing"], true, "{second}");
    assert_eq!(tools(&second), ["existing"]);
    assert_eq!(second["snapshots"], first["snapshots"]);
    assert_eq!(second["consistency"], "filesystem");
    assert_eq!(second["create_time"], first["create_time"]);
    assert_eq!(g.snapshots(), before);

    // Half a set (one member destroyed by hand): removed and taken again whole.
    let (_, zvol1) = &volumes[1];
    g.sh(&format!("zfs destroy '{}'", member(zvol1)));
    let (code, repaired, err) = g.orchestrate(&create);
    assert_eq!(code, 0, "{repaired}\n{err}");
    assert_eq!(repaired["existing"], Value::Null, "{repaired}");
    let existing = step(&repaired, "existing");
    assert_eq!(existing["complete"], false, "{repaired}");
    assert_eq!(existing["removed"], json!([member(&volumes[0].1)]));
    let txgs: Vec<String> = volumes
        .iter()
        .map(|(_, z)| g.zfs_get("createtxg", &member(z)))
        .collect();
    assert_eq!(txgs[0], txgs[1], "the repaired set is not one snapshot");

    // Rollback by id (EVE's active_snapshot) with the volumes unmounted in guest_pre, left
    // unmounted; then the same rollback again finds them there and touches nothing.
    let disks: serde_json::Map<String, Value> = volumes
        .iter()
        .map(|(_, z)| (z.clone(), json!({"dev": format!("/dev/zvol/{z}")})))
        .collect();
    let umounts: Vec<Value> = g
        .lab
        .guest_mounts
        .values()
        .map(|m| json!({"path": "/bin/umount", "args": [m]}))
        .collect();
    let rollback = plan(
        g.lab,
        &app,
        &new_uuid(),
        json!({"action": "rollback", "rollback": {"to": id}, "disks": disks,
               "guest_pre": umounts}),
    );
    let (code, rolled, err) = g.orchestrate(&rollback);
    assert_eq!(code, 0, "{rolled}\n{err}");
    assert_eq!(rolled["snapshot"], name.as_str());
    assert_eq!(rolled["rolled_back"].as_array().map(Vec::len), Some(2));
    for (uuid, zvol) in &volumes {
        assert_eq!(rolled["volume_snapshots"][uuid], member(zvol), "{rolled}");
    }
    let mut again = rollback.clone();
    again["guest_pre"] = json!([]);
    let (code, there, err) = g.orchestrate(&again);
    assert_eq!(code, 0, "{there}\n{err}");
    assert_eq!(there["existing"], true, "{there}");
    assert_eq!(tools(&there), ["preflight"]);
    g.sh(&remount(g.lab));

    // Delete by id, twice.
    let delete = plan(g.lab, &app, &id, json!({"action": "delete"}));
    let (code, deleted, err) = g.orchestrate(&delete);
    assert_eq!(code, 0, "{deleted}\n{err}");
    assert_eq!(deleted["deleted"].as_array().map(Vec::len), Some(2));
    assert!(!g.snapshots().iter().any(|s| s.contains(&id)));
    let (code, gone, err) = g.orchestrate(&delete);
    assert_eq!(code, 0, "{gone}\n{err}");
    assert_eq!(gone["deleted"], json!([]));
}

#[test]
fn eves_retention_counts_the_apps_sets_but_never_a_held_or_foreign_snapshot() {
    let Some(mut g) = guest() else { return };
    let app = new_uuid();
    let [held, a, b, c] = [new_uuid(), new_uuid(), new_uuid(), new_uuid()];
    let foreign = unique("foreign");
    for tag in [&held, &a, &b, &c, &foreign] {
        g.on_drop(forget(tag));
    }
    let volumes = volumes(g.lab);
    g.sh(&format!("zfs snapshot '{}@{foreign}'", volumes[0].1));
    for id in [&held, &a, &b] {
        let (code, report, err) = g.orchestrate(&plan(g.lab, &app, id, json!({})));
        assert_eq!(code, 0, "{report}\n{err}");
    }
    g.sh(&format!(
        "zfs hold evesnap-test '{}@evesnap-{held}'",
        volumes[1].1
    ));

    let (code, report, err) = g.orchestrate(&plan(g.lab, &app, &c, json!({"max_snapshots": 2})));
    assert_eq!(code, 0, "{report}\n{err}");
    assert_eq!(tools(&report)[0], "retention", "{report}");
    let snapshots = g.snapshots();
    let has = |id: &str| {
        volumes
            .iter()
            .all(|(_, z)| snapshots.contains(&format!("{z}@evesnap-{id}")))
    };
    // Counted: a and b (and any set an earlier run left); one kept before the create.
    assert!(!snapshots.iter().any(|s| s.contains(&a)), "{snapshots:?}");
    assert!(has(&b) && has(&c) && has(&held), "{snapshots:?}");
    assert!(snapshots.contains(&format!("{}@{foreign}", volumes[0].1)));
    let destroyed = step(&report, "retention")["destroyed"].clone();
    assert!(
        !destroyed.to_string().contains(&held) && !destroyed.to_string().contains(&foreign),
        "{destroyed}"
    );
}

#[test]
fn a_halted_vms_zvols_are_snapshotted_as_halted_unless_mounted_or_open() {
    let Some(mut g) = guest() else { return };
    let (app, id) = (new_uuid(), new_uuid());
    let tag = unique("halted");
    let pidfile = format!("/tmp/{tag}.pid");
    g.on_drop(remount(g.lab));
    g.on_drop(format!(
        "kill $(cat {pidfile}) 2>/dev/null; rm -f {pidfile}; true"
    ));
    g.on_drop(forget(&id));
    // No QEMU answers on this socket: the VM is not running.
    let plan = plan(
        g.lab,
        &app,
        &id,
        json!({"qmp": format!("/tmp/{tag}-qmp.sock")}),
    );

    let (code, mounted, err) = g.orchestrate(&plan);
    assert_eq!(code, 7, "{mounted}\n{err}");
    let message = mounted["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("mounted at"), "{message}");
    assert_eq!(step(&mounted, "vm_state")["in_use"], true);

    unmount_all(&mut g);
    let zvol0 = volumes(g.lab)[0].1.clone();
    g.sh(&format!(
        "setsid sleep 600 < /dev/zvol/{zvol0} > /dev/null 2>&1 & echo $! > {pidfile}"
    ));
    let (code, open, err) = g.orchestrate(&plan);
    assert_eq!(code, 7, "{open}\n{err}");
    let message = open["error"]["message"].as_str().unwrap_or("").to_string();
    assert!(message.contains("(sleep) has /dev/zd"), "{message}");
    assert!(g.snapshots().iter().all(|s| !s.contains(&id)));

    g.sh(&format!(
        "kill $(cat {pidfile}); rm -f {pidfile}; sleep 0.5"
    ));
    let (code, report, err) = g.orchestrate(&plan);
    assert_eq!(code, 0, "{report}\n{err}");
    assert_eq!(report["consistency"], "halted", "{report}");
    assert_eq!(tools(&report), ["vm_state", "preflight", "zsnap"]);
    assert_eq!(
        g.zfs_get(
            "org.lfedge.evesnap:consistency",
            &format!("{zvol0}@evesnap-{id}")
        ),
        "halted"
    );
}
