//! The OpenZFS lab is real: OpenZFS 2.3 inside the guest, with EVE-style zvols (one thick,
//! one sparse) carrying mounted ext4 filesystems, atomic multi-snapshots, holds, rollback,
//! a second agent inside the guest on AF_VSOCK loopback, and the host's bin folder shared
//! into the guest. Everything is driven through the control agent (`guest-exec`).

use std::time::{Duration, Instant};

use evesnap::qga::{Address, Client};
use evesnap_tests::guest::guest_exec;
use evesnap_tests::lab::{openzfs_lab, openzfs_vm_lock, OpenZfsLab};
use evesnap_tests::unique;

fn control_agent(lab: &OpenZfsLab) -> Client {
    let address: Address = lab.agent.parse().expect("agent address");
    Client::connect(&address, Instant::now() + Duration::from_secs(30))
        .expect("the control agent answers")
}

/// Runs `argv` in the guest and returns its stdout; panics with its stderr on failure.
fn guest(agent: &mut Client, argv: &[&str]) -> String {
    let res = guest_status(agent, argv);
    assert!(
        res.0 == 0,
        "{argv:?} in the guest exited {}:\n{}",
        res.0,
        res.2
    );
    res.1
}

/// Runs `argv` in the guest: (exit code, stdout, stderr).
fn guest_status(agent: &mut Client, argv: &[&str]) -> (i64, String, String) {
    guest_exec(agent, argv, Duration::from_secs(120))
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

#[test]
fn zvols_are_thick_and_sparse_and_hold_mounted_ext4() {
    let lab = openzfs_lab();
    let _vm = openzfs_vm_lock();
    let mut agent = control_agent(lab);
    assert_eq!(lab.zvols.len(), 2, "{lab:?}");
    for zvol in &lab.zvols {
        assert!(
            zvol.starts_with(&format!("{}/vault/volumes/", lab.pool)) && zvol.ends_with(".1"),
            "{zvol}"
        );
    }

    let listing = guest(
        &mut agent,
        &[
            "zfs",
            "list",
            "-H",
            "-p",
            "-o",
            "name,volsize,refreservation",
            "-t",
            "volume",
        ],
    );
    let row = |zvol: &str| -> (u64, u64) {
        let line = listing
            .lines()
            .find(|l| l.split('\t').next() == Some(zvol))
            .unwrap_or_else(|| panic!("{zvol} not in zfs list:\n{listing}"));
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{line}");
        (
            cols[1].parse().expect("volsize"),
            cols[2].parse().expect("refreservation"),
        )
    };
    let (thick_size, thick_reserved) = row(&lab.zvols[0]);
    assert!(
        thick_reserved >= thick_size,
        "thick zvol: refreservation {thick_reserved} < volsize {thick_size}"
    );
    let (sparse_size, sparse_reserved) = row(&lab.zvols[1]);
    assert!(sparse_size > 0);
    assert_eq!(sparse_reserved, 0, "the sparse zvol has a refreservation");

    let mounts = guest(&mut agent, &["cat", "/proc/mounts"]);
    for (zvol, mountpoint) in &lab.guest_mounts {
        let line = mounts
            .lines()
            .find(|l| l.split(' ').nth(1) == Some(mountpoint.as_str()))
            .unwrap_or_else(|| panic!("{mountpoint} not mounted in the guest:\n{mounts}"));
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields[2], "ext4", "{line}");
        assert!(fields[0].starts_with("/dev/zd"), "{line}");
        let dev = guest(
            &mut agent,
            &["readlink", "-f", &format!("/dev/zvol/{zvol}")],
        );
        assert_eq!(
            dev.trim(),
            fields[0],
            "/dev/zvol/{zvol} is not the mounted device"
        );
    }
}

#[test]
fn a_multi_snapshot_is_atomic() {
    let lab = openzfs_lab();
    let _vm = openzfs_vm_lock();
    let mut agent = control_agent(lab);
    let name = unique("atomic");
    let snaps: Vec<String> = lab.zvols.iter().map(|z| format!("{z}@{name}")).collect();
    let mut argv = vec!["zfs", "snapshot"];
    argv.extend(snaps.iter().map(String::as_str));
    let (_, took) = timed(|| guest(&mut agent, &argv));
    eprintln!(
        "zfs snapshot of {} zvols in one call: {} ms (guest-exec included)",
        snaps.len(),
        took.as_millis()
    );

    let mut argv = vec!["zfs", "get", "-H", "-p", "-o", "name,value", "createtxg"];
    argv.extend(snaps.iter().map(String::as_str));
    let txgs = guest(&mut agent, &argv);
    let values: Vec<&str> = txgs
        .lines()
        .map(|l| l.split('\t').nth(1).expect("value column"))
        .collect();
    assert_eq!(values.len(), snaps.len(), "{txgs}");
    assert!(
        values.iter().all(|v| *v == values[0]),
        "snapshots in different txgs:\n{txgs}"
    );

    let mut argv = vec!["zfs", "destroy"];
    argv.push(&snaps[0]);
    guest(&mut agent, &argv);
    guest(&mut agent, &["zfs", "destroy", &snaps[1]]);
}

#[test]
fn a_held_snapshot_is_listed_and_cannot_be_destroyed() {
    let lab = openzfs_lab();
    let _vm = openzfs_vm_lock();
    let mut agent = control_agent(lab);
    let snap = format!("{}@{}", lab.zvols[1], unique("held"));
    guest(&mut agent, &["zfs", "snapshot", &snap]);
    guest(&mut agent, &["zfs", "hold", "evesnap-test", &snap]);

    let holds = guest(&mut agent, &["zfs", "holds", "-H", "-p", &snap]);
    let cols: Vec<&str> = holds.trim_end().split('\t').collect();
    assert_eq!(cols.len(), 3, "{holds:?}");
    assert_eq!(cols[0], snap);
    assert_eq!(cols[1], "evesnap-test");
    assert!(
        cols[2].parse::<u64>().is_ok(),
        "hold time is not epoch seconds: {holds:?}"
    );

    let (code, _, err) = guest_status(&mut agent, &["zfs", "destroy", &snap]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("it's being held"), "{err}");

    guest(&mut agent, &["zfs", "release", "evesnap-test", &snap]);
    guest(&mut agent, &["zfs", "destroy", &snap]);
}

#[test]
fn rollback_of_an_unmounted_zvol_restores_its_ext4() {
    let lab = openzfs_lab();
    let _vm = openzfs_vm_lock();
    let mut agent = control_agent(lab);
    let zvol = &lab.zvols[0];
    let mountpoint = &lab.guest_mounts[zvol];
    let file = format!("{mountpoint}/rollback-probe");
    let snap = format!("{zvol}@{}", unique("rollback"));

    guest(
        &mut agent,
        &["sh", "-c", &format!("echo before > {file} && sync")],
    );
    let (_, snap_took) = timed(|| guest(&mut agent, &["zfs", "snapshot", &snap]));
    guest(
        &mut agent,
        &["sh", "-c", &format!("echo after > {file} && sync")],
    );
    // A mounted ext4 keeps showing its cached data after a rollback
    // (docs/lab.md#rolling-back-a-mounted-zvol): unmount first.
    guest(&mut agent, &["umount", mountpoint]);
    let (rolled, rollback_took) = timed(|| guest_status(&mut agent, &["zfs", "rollback", &snap]));
    let dev = guest(
        &mut agent,
        &["readlink", "-f", &format!("/dev/zvol/{zvol}")],
    );
    guest(&mut agent, &["mount", "-t", "ext4", dev.trim(), mountpoint]);
    assert_eq!(rolled.0, 0, "zfs rollback: {}", rolled.2);
    eprintln!(
        "zfs snapshot {} ms, zfs rollback {} ms (guest-exec included)",
        snap_took.as_millis(),
        rollback_took.as_millis()
    );

    assert_eq!(guest(&mut agent, &["cat", &file]), "before\n");
    guest(&mut agent, &["rm", "-f", &file]);
    guest(&mut agent, &["zfs", "destroy", &snap]);
}

#[test]
fn the_in_guest_agent_answers_on_vsock_loopback() {
    let lab = openzfs_lab();
    let _vm = openzfs_vm_lock();
    assert!(
        lab.guest_agent.starts_with("vsock:1:"),
        "{}",
        lab.guest_agent
    );
    let mut agent = control_agent(lab);
    // qga-client is the lab's tiny static client (busybox has no AF_VSOCK client).
    let out = guest(
        &mut agent,
        &[
            "/usr/bin/qga-client",
            &lab.guest_agent,
            r#"{"execute":"guest-ping"}"#,
            r#"{"execute":"guest-fsfreeze-status"}"#,
        ],
    );
    let replies: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON reply"))
        .collect();
    assert_eq!(replies.len(), 2, "{out}");
    assert_eq!(replies[0], serde_json::json!({"return": {}}));
    assert_eq!(replies[1], serde_json::json!({"return": "thawed"}));
}

#[test]
fn the_host_bin_folder_is_live_in_the_guest() {
    let lab = openzfs_lab();
    let _vm = openzfs_vm_lock();
    let mut agent = control_agent(lab);
    let name = format!("{}.sh", unique("probe"));
    let host = lab.guest_bin_host.join(&name);
    std::fs::write(&host, "#!/bin/sh\necho probe ran\n").expect("write the probe");
    let mut perms = std::fs::metadata(&host).expect("probe").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&host, perms).expect("chmod the probe");
    let out = guest_status(&mut agent, &[&format!("{}/{name}", lab.guest_bin)]);
    std::fs::remove_file(&host).expect("remove the probe");
    assert_eq!(out.0, 0, "{}", out.2);
    assert_eq!(out.1, "probe ran\n");

    // The project's own binaries, when a static build is there (scripts/test makes one).
    let tools = [
        "qga-freeze",
        "qga-thaw",
        "zsnap",
        "zrollback",
        "snap-orchestrate",
    ];
    let present: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| lab.guest_bin_host.join(t).exists())
        .collect();
    if present.is_empty() {
        eprintln!(
            "SKIP the project's binaries in the guest: none built in {} (RUSTFLAGS='-C target-feature=+crt-static' \
             cargo build --bins --target x86_64-unknown-linux-gnu --target-dir target/static)",
            lab.guest_bin_host.display()
        );
        return;
    }
    for tool in present {
        let out = guest_status(
            &mut agent,
            &[&format!("{}/{tool}", lab.guest_bin), "--help"],
        );
        assert_eq!(
            out.0, 0,
            "{tool} --help in the guest (is it statically linked?): {}",
            out.2
        );
    }
}

#[test]
fn the_tools_run_in_the_guest_against_the_vsock_agent() {
    let lab = openzfs_lab();
    let _vm = openzfs_vm_lock();
    let tools = ["qga-freeze", "zsnap", "qga-thaw"];
    if let Some(missing) = tools.iter().find(|t| !lab.guest_bin_host.join(t).exists()) {
        eprintln!(
            "SKIP the in-guest pipeline: {missing} is not built in {} (static build: see scripts/test)",
            lab.guest_bin_host.display()
        );
        return;
    }
    let mut agent = control_agent(lab);
    let name = unique("inguest");
    let bin = &lab.guest_bin;
    let datasets: Vec<String> = lab.zvols.iter().map(|z| format!("--dataset {z}")).collect();
    let pipeline = format!(
        "cd /tmp && {bin}/qga-freeze --agent {} </dev/null | {bin}/zsnap --name {name} {} | {bin}/qga-thaw",
        lab.guest_agent,
        datasets.join(" ")
    );
    let (code, out, err) = guest_status(&mut agent, &["sh", "-c", &pipeline]);
    assert_eq!(code, 0, "{pipeline}\n{err}\n{out}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("job document");
    assert_eq!(doc["ok"], true, "{out}");
    assert_eq!(doc["agent"], lab.guest_agent.as_str(), "{out}");
    eprint!("{err}");

    let snaps: Vec<String> = lab.zvols.iter().map(|z| format!("{z}@{name}")).collect();
    let mut argv = vec!["zfs", "get", "-H", "-p", "-o", "value", "createtxg"];
    argv.extend(snaps.iter().map(String::as_str));
    let txgs = guest(&mut agent, &argv);
    let values: Vec<&str> = txgs.lines().collect();
    assert_eq!(values.len(), 2, "{txgs}");
    assert_eq!(values[0], values[1], "not one transaction group:\n{txgs}");
    for snap in &snaps {
        guest(&mut agent, &["zfs", "destroy", snap]);
    }
    assert_eq!(
        guest(
            &mut agent,
            &[
                "/usr/bin/qga-client",
                &lab.guest_agent,
                r#"{"execute":"guest-fsfreeze-status"}"#
            ]
        )
        .trim(),
        r#"{"return": "thawed"}"#
    );
}

/// The pool disk is attached in EVE's shape (unless EVESNAP_LAB_SHAPE=serial): no serial,
/// behind its own root port, and QEMU places it where the guest sees the pool's disk.
#[test]
fn the_pool_disk_is_attached_in_eves_shape() {
    let lab = openzfs_lab();
    if lab.shape != "eve" {
        eprintln!("SKIPPED: the OpenZFS lab is in the {} shape", lab.shape);
        return;
    }
    let _vm = openzfs_vm_lock();
    let disk = &lab.disks[&lab.pool];
    assert!(disk.get("serial").is_none(), "{disk}");
    let topology = evesnap::qmp::Qmp::connect(&lab.qmp, Duration::from_secs(5))
        .and_then(|mut q| q.topology())
        .expect("QMP topology");
    let place = topology
        .place_behind_port(disk["port"].as_str().expect("port"))
        .expect("placed");
    assert_ne!(place.pci.bus, 0, "behind a root port");
    // The guest's pool disk sits at that PCI address (its sysfs path ends there).
    let mut agent = control_agent(lab);
    let pool_disk = guest(
        &mut agent,
        &[
            "/bin/sh",
            "-c",
            &format!(
                "zpool status -P {} | grep -o '/dev/[a-z]*' | head -n1",
                lab.pool
            ),
        ],
    );
    let name = pool_disk.trim().trim_start_matches("/dev/");
    let sysfs = guest(
        &mut agent,
        &["/bin/readlink", "-f", &format!("/sys/block/{name}")],
    );
    let pci = format!(
        "{:04x}:{:02x}:{:02x}.{:x}",
        place.pci.domain, place.pci.bus, place.pci.slot, place.pci.function
    );
    assert!(sysfs.contains(&pci), "{name}: {sysfs} is not behind {pci}");
    let serial = guest(
        &mut agent,
        &[
            "/bin/sh",
            "-c",
            &format!("cat /sys/block/{name}/serial 2>/dev/null; true"),
        ],
    );
    assert_eq!(serial.trim(), "", "the pool disk has a serial");
}
