//! What zrollback writes on stdout parses back strictly as its step records, with the field
//! names its readers know; over the fake zfs (no pool, no root).

use std::path::Path;

use evesnap::document::Step;
use evesnap::steps::{Failed, RollbackReport, RolledBack};
use evesnap::zfs::Problem;
use evesnap_tests::fake_zfs::{add_snapshot, pool, FakeZfs};
use evesnap_tests::run::{code, doc_of, run, stderr, RunDir};

const DS0: &str = "tank/vm0/disk0";

/// One run's exit code and its step.
fn zrollback(fake: &FakeZfs, args: &[&str]) -> (i32, Step) {
    let dir = RunDir::new("zrollback-records");
    let zfs = fake.path();
    let mut all = vec!["--zfs", zfs.to_str().expect("utf-8 path")];
    all.extend(args);
    let out = run(Path::new(env!("CARGO_BIN_EXE_zrollback")), &all, None, &dir);
    let mut doc = doc_of(&out);
    assert_eq!(doc.steps.len(), 1, "{}", stderr(&out));
    (code(&out), doc.steps.remove(0))
}

fn keys(step: &Step) -> Vec<&str> {
    step.fields.keys().map(String::as_str).collect()
}

#[test]
fn refused_planned_and_done_rollbacks_parse_back_strictly() {
    let mut state = pool(&[DS0]);
    add_snapshot(&mut state, &format!("{DS0}@s1"), 101, serde_json::json!({}));
    add_snapshot(&mut state, &format!("{DS0}@s2"), 102, serde_json::json!({}));
    let fake = FakeZfs::new(&state);
    let newer = vec![format!("{DS0}@s2")];

    let (code, step) = zrollback(&fake, &["-d", DS0, "--to", "s1"]);
    assert_eq!(code, 7);
    let failed: Failed =
        serde_json::from_value(serde_json::Value::Object(step.fields)).expect("a strict Failed");
    assert!(
        matches!(&failed.problems[..], [Problem::NewerSnapshots { newer: n, .. }] if *n == newer),
        "{failed:?}"
    );

    let (code, step) = zrollback(
        &fake,
        &["-d", DS0, "--to", "s1", "--destroy-newer", "--dry-run"],
    );
    assert_eq!(code, 0);
    assert_eq!(keys(&step), ["dry_run", "plan", "rolled_back", "destroyed"]);
    let planned: RollbackReport = step.record().expect("a strict RollbackReport");
    let plan = planned.plan.expect("the plan");
    assert!(planned.dry_run && planned.rolled_back.is_empty());
    assert_eq!(plan.targets[0].newer, newer);

    let (code, step) = zrollback(&fake, &["-d", DS0, "--to", "s1", "--destroy-newer"]);
    assert_eq!(code, 0);
    assert_eq!(keys(&step), ["dry_run", "rolled_back", "destroyed"]);
    let done: RollbackReport = step.record().expect("a strict RollbackReport");
    assert!(!done.dry_run && done.plan.is_none());
    assert_eq!(
        done.rolled_back,
        [RolledBack {
            dataset: DS0.into(),
            to: format!("{DS0}@s1")
        }]
    );
    assert_eq!(done.destroyed, newer);
}
