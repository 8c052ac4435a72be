//! A consistency group on real OpenZFS zvols (issue 18): the VMs' volumes are taken by one
//! `zfs snapshot` of several names, so OpenZFS puts them in one transaction group (equal
//! `createtxg`).
//!
//! The OpenZFS lab has one guest. Two VMs are stood in for by two qemu-ga processes this test
//! starts in it, on vsock ports of their own, each in a mount namespace of its own that shows
//! only its own zvol's ext4: as with two VMs, each agent's freeze state is its own, and
//! neither agent's thaw (qemu-ga thaws every filesystem it can see) reaches the other's
//! filesystem. What the group does on the host (parallel freezes, one snapshot, parallel
//! thaws, a report per VM) is the same as with two guests; two real guests are the zfs-fuse
//! group lab tests (bins/snap-orchestrate/tests/group_lab.rs).

use std::time::{Duration, Instant};

use evesnap_tests::openzfs::{forget, Guest};
use evesnap_tests::unique;
use serde_json::{json, Value};

/// The vsock ports of the two agents, beside the lab's own (`vsock:1:10000`).
const PORTS: [u32; 2] = [10071, 10072];

/// Starts qemu-ga in the guest on `port`, in a mount namespace without `hide` (the other
/// agent's filesystem); its address, once it answers.
fn start_agent(g: &mut Guest, tag: &str, port: u32, hide: &str) -> String {
    g.on_drop(format!(
        "kill $(cat /run/qga-{tag}-{port}.pid); rm -rf /run/qga-{tag}-{port}*; true"
    ));
    g.sh(&format!(
        "mkdir -p /run/qga-{tag}-{port}; unshare -m --propagation private sh -c \
         'umount {hide} && exec /usr/bin/qemu-ga -d -f /run/qga-{tag}-{port}.pid \
         -m vsock-listen -p 1:{port} -t /run/qga-{tag}-{port}'"
    ));
    let address = format!("vsock:1:{port}");
    let ping = format!("/usr/bin/qga-client {address} '{{\"execute\":\"guest-ping\"}}'");
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.exec(&["/bin/sh", "-c", &ping]).0 != 0 {
        assert!(
            Instant::now() < deadline,
            "the agent on {address} does not answer"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    address
}

/// The freeze state `address`'s agent reports.
fn freeze_status(g: &mut Guest, address: &str) -> String {
    g.sh(&format!(
        "/usr/bin/qga-client {address} '{{\"execute\":\"guest-fsfreeze-status\"}}'"
    ))
}

#[test]
fn a_group_of_two_agents_freezing_one_zvol_each_is_one_txg_on_openzfs() {
    let Some(mut g) = Guest::start("the group on OpenZFS", &["snap-orchestrate"]) else {
        return;
    };
    let lab = g.lab;
    assert!(lab.zvols.len() >= 2, "the OpenZFS lab has two zvols");
    let tag = unique("group");
    let zvols = &lab.zvols[..2];
    let mounts: Vec<&String> = zvols.iter().map(|z| &lab.guest_mounts[z]).collect();
    g.on_drop(forget(&tag));
    let agents = [
        start_agent(&mut g, &tag, PORTS[0], mounts[1]),
        start_agent(&mut g, &tag, PORTS[1], mounts[0]),
    ];

    let vm = |agent: &str, zvol: &str| {
        let mountpoint = &lab.guest_mounts[zvol];
        json!({"agent": agent, "datasets": [zvol], "mountpoints": [mountpoint]})
    };
    let name = format!("{tag}-snap");
    let plan = json!({
        "version": 1, "snapshot": name,
        "freeze": {"timeout_s": 30, "thaw_after_s": 60},
        "vms": [vm(&agents[0], &zvols[0]), vm(&agents[1], &zvols[1])],
    });
    let (code, report, stderr) = g.orchestrate(&plan);
    assert_eq!(code, 0, "{report}\n{stderr}");
    let vms = report["vms"].as_array().expect("a report per VM");
    assert_eq!(vms.len(), 2, "{report}");
    for (vm, agent) in vms.iter().zip(&agents) {
        assert_eq!(vm["agent"], json!(agent), "{vm}");
        assert_eq!(vm["ok"], true, "{vm}");
        // Each agent froze its own zvol's ext4, not the other's.
        assert_eq!(vm["frozen"], 1, "{vm}");
        assert_eq!(vm["consistency"], "filesystem", "{vm}");
    }
    let snapshots: Vec<String> = zvols.iter().map(|z| format!("{z}@{name}")).collect();
    let txgs: Vec<String> = snapshots
        .iter()
        .map(|s| g.zfs_get("createtxg", s))
        .collect();
    assert_eq!(
        txgs[0], txgs[1],
        "one transaction group: {snapshots:?} {txgs:?}"
    );
    let reported: Vec<&Value> = report["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .collect();
    assert_eq!(reported.len(), 2, "{report}");
    for s in &reported {
        assert_eq!(s["createtxg"].to_string(), txgs[0], "{s}");
    }
    for s in &snapshots {
        assert_eq!(g.zfs_get("org.lfedge.evesnap:frozen", s), "true", "{s}");
    }
    // Both agents say thawed, and both filesystems take writes again.
    for agent in &agents {
        let status = freeze_status(&mut g, agent);
        assert!(status.contains("\"thawed\""), "{agent}: {status}");
    }
    for mnt in &mounts {
        g.sh(&format!(
            "timeout 10 sh -c 'echo {tag} > {mnt}/{tag}.w && rm {mnt}/{tag}.w'"
        ));
    }
}
