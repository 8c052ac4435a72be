//! A VM that is not running, on the zfs-fuse lab (issue 16): its images, held open by a
//! live QEMU, are refused; an image nobody holds is snapshotted as `halted`, and refused
//! again once a process opens it.

use std::process::Output;

use evesnap::report::{Consistency, Report};
use evesnap_tests::guest::{code, stderr, ThawGuard};
use evesnap_tests::zfs::{zfs, zfs_get};
use serde_json::{json, Value};

fn orchestrate(guard: &ThawGuard<'_>, plan: &Value) -> (Output, Report) {
    let out = guard.run("snap-orchestrate", &[], Some(&plan.to_string()));
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a report ({e}):\n{}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        )
    });
    (out, report)
}

/// A plan whose QMP socket nothing listens on: the VM is not running.
fn halted_plan(guard: &ThawGuard<'_>, datasets: &[String]) -> Value {
    json!({"version": 1, "agent": guard.lab.agent, "datasets": datasets,
           "qmp": guard.run_dir.path().join("no-qemu.sock"),
           "freeze": {"timeout_s": 5, "thaw_after_s": 60}})
}

#[test]
fn images_a_live_qemu_holds_open_are_refused_for_a_vm_said_halted() {
    let guard = ThawGuard::lock("orch-halted-held");
    let lab = guard.lab;
    let before: Vec<String> = lab
        .datasets
        .iter()
        .map(|d| zfs_get("written", d) + &zfs_get("createtxg", d))
        .collect();
    let (out, report) = orchestrate(&guard, &halted_plan(&guard, &lab.datasets));

    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let message = &report.error.as_ref().expect("an error").message;
    assert!(
        message.contains(&format!("process {} (qemu", lab.qemu_pid)),
        "{message}"
    );
    assert!(report.snapshots.is_none());
    let after: Vec<String> = lab
        .datasets
        .iter()
        .map(|d| zfs_get("written", d) + &zfs_get("createtxg", d))
        .collect();
    assert_eq!(before, after);
}

/// A dataset of the lab's pool of this test's own, destroyed (with its snapshots) on drop.
struct Scratch(String);

impl Drop for Scratch {
    fn drop(&mut self) {
        let out = zfs(&["destroy", "-r", &self.0]);
        if !out.status.success() {
            eprintln!("cannot destroy {}: {}", self.0, stderr(&out));
        }
    }
}

#[test]
fn an_image_nobody_holds_is_snapshotted_as_halted_and_refused_once_opened() {
    let guard = ThawGuard::lock("orch-halted-free");
    let lab = guard.lab;
    let scratch = Scratch(format!("{}/lab/halted-{}", lab.pool, std::process::id()));
    let out = zfs(&["create", &scratch.0]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mountpoint = zfs_get("mountpoint", &scratch.0);
    let image = std::path::Path::new(&mountpoint).join("disk.img");
    std::fs::write(&image, vec![7u8; 1 << 16]).expect("write the image");
    let datasets = vec![scratch.0.clone()];

    let (out, report) = orchestrate(&guard, &halted_plan(&guard, &datasets));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(report.consistency, Some(Consistency::Halted));
    let tools: Vec<&str> = report.steps.iter().map(|s| s.tool.as_str()).collect();
    assert_eq!(tools, ["vm_state", "preflight", "zsnap"]);
    let taken = &report.snapshots.as_ref().expect("snapshots")[0].name;
    assert_eq!(zfs_get("org.lfedge.evesnap:consistency", taken), "halted");

    // This test process opens the image: refused, naming it.
    let held = std::fs::File::open(&image).expect("open the image");
    let (out, report) = orchestrate(&guard, &halted_plan(&guard, &datasets));
    assert_eq!(code(&out), 7, "{}", stderr(&out));
    let message = &report.error.as_ref().expect("an error").message;
    assert!(
        message.contains(&format!("process {}", std::process::id()))
            && message.contains("disk.img"),
        "{message}"
    );
    drop(held);
}
