//! What zsnap writes on stdout parses back strictly as its step records, with the field
//! names its readers know; over the fake zfs (no pool, no root).

use std::path::Path;

use evesnap::document::Step;
use evesnap::steps::{ActionReport, Method, SnapshotPlan, SnapshotReport};
use evesnap_tests::fake_zfs::{add_snapshot, pool, FakeZfs};
use evesnap_tests::run::{code, doc_of, run, stderr, RunDir};

const DS0: &str = "tank/vm0/disk0";
const DS1: &str = "tank/vm0/disk1";

fn zsnap(fake: &FakeZfs, args: &[&str]) -> Step {
    let dir = RunDir::new("zsnap-records");
    let zfs = fake.path();
    // After a subcommand: `--zfs` is global, but not before one.
    let mut all = args.to_vec();
    all.extend(["--zfs", zfs.to_str().expect("utf-8 path")]);
    let out = run(Path::new(env!("CARGO_BIN_EXE_zsnap")), &all, None, &dir);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let mut doc = doc_of(&out);
    assert_eq!(doc.steps.len(), 1);
    doc.steps.remove(0)
}

fn keys(step: &Step) -> Vec<&str> {
    step.fields.keys().map(String::as_str).collect()
}

#[test]
fn a_dry_run_take_is_a_snapshot_plan() {
    let fake = FakeZfs::new(&pool(&[DS0, DS1]));
    let step = zsnap(&fake, &["-d", DS0, "-d", DS1, "-n", "s1", "--dry-run"]);
    assert_eq!(keys(&step), ["method", "atomic", "planned", "dry_run"]);
    let plan: SnapshotPlan = step.record().expect("a strict SnapshotPlan");
    assert_eq!(
        (plan.method, plan.atomic, plan.dry_run),
        (Method::Multi, true, true)
    );
    assert_eq!(plan.planned, [format!("{DS0}@s1"), format!("{DS1}@s1")]);
    assert!(step.record::<SnapshotReport>().is_none());
}

#[test]
fn a_take_is_a_snapshot_report() {
    let fake = FakeZfs::new(&pool(&[DS0, DS1]));
    let step = zsnap(&fake, &["-d", DS0, "-d", DS1, "-n", "s1"]);
    let report: SnapshotReport = step.record().expect("a strict SnapshotReport");
    assert_eq!(report.snapshots.len(), 2);
    assert!(step.record::<SnapshotPlan>().is_none());
}

#[test]
fn list_destroy_and_prune_are_action_reports() {
    let mut state = pool(&[DS0]);
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        add_snapshot(
            &mut state,
            &format!("{DS0}@{name}"),
            101 + i as u64,
            serde_json::json!({}),
        );
    }
    let fake = FakeZfs::new(&state);

    let step = zsnap(&fake, &["list", "-d", DS0]);
    assert_eq!(keys(&step), ["action", "snapshots"]);
    let Some(ActionReport::List { snapshots }) = step.record() else {
        panic!("not a strict list: {:?}", step.fields)
    };
    assert_eq!(snapshots.len(), 3);

    let step = zsnap(&fake, &["destroy", &format!("{DS0}@a")]);
    assert_eq!(keys(&step), ["action", "destroyed", "dry_run"]);
    let Some(ActionReport::Destroy(report)) = step.record() else {
        panic!("not a strict destroy: {:?}", step.fields)
    };
    assert_eq!(report.destroyed, [format!("{DS0}@a")]);

    let step = zsnap(&fake, &["prune", "--keep", "1", "--all", "-d", DS0]);
    assert_eq!(keys(&step), ["action", "destroyed", "dry_run", "keep"]);
    let Some(ActionReport::Prune(report)) = step.record() else {
        panic!("not a strict prune: {:?}", step.fields)
    };
    assert_eq!(
        (report.destroyed, report.keep),
        (vec![format!("{DS0}@b")], Some(1))
    );
}
