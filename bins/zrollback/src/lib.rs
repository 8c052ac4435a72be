//! `zrollback`: rolls datasets back to a named snapshot, all of them or none.
//!
//! [`plan`] checks every dataset first: the target snapshot exists, and newer snapshots are
//! either absent or (with `destroy_newer`) all destroyable — no holds, no clones. Only then
//! [`execute`] destroys the newer snapshots itself (newest first) and runs a plain
//! `zfs rollback`, dataset by dataset, reporting exactly what it did. It never uses
//! `zfs rollback -r`: zfs-fuse and OpenZFS destroy some newer snapshots and then fail on a
//! held one.
//!
//! With `--keep-newer` ([`plan_keeping`], module [`keep`]) nothing is destroyed: each
//! dataset's previous state, with its newer snapshots, is kept under
//! `<dataset>.evesnap-kept-<stamp>`, and naming one of those snapshots rolls forward to it.
//!
//! Step fields (`tool: "zrollback"`): `rolled_back: [{dataset, to}]`, `destroyed: [...]`,
//! `kept: [{dataset, kept_as, snapshots}]` (with `--keep-newer`), `dry_run`, and with
//! `--dry-run` the `plan`; on failure `error` and `problems` (preflight) or what was done
//! before the failure.

mod in_use;
pub mod keep;

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use evesnap::cli::Outcome;
use evesnap::document::{fields_of, StepTimer};
use evesnap::exit::{coded, Exit, HasExit};
use evesnap::report::Origin;
use evesnap::zfs::{self, names, Error, Problem, SnapshotInfo, Zfs};
use serde_json::Map;

pub const TOOL: &str = "zrollback";

pub use evesnap::steps::{RollbackPlan, RollbackReport, RolledBack, Target};

/// [`execute`] failed part way; `report` says what had been done.
#[derive(Debug, thiserror::Error)]
#[error("rollback failed after rolling back {} dataset(s) and destroying {} snapshot(s)", report.rolled_back.len(), report.destroyed.len())]
pub struct ExecuteError {
    pub report: RollbackReport,
    #[source]
    pub source: Failure,
}

/// Why [`execute`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Zfs(#[from] Error),
    #[error(transparent)]
    Keep(#[from] Box<keep::KeepError>),
}

impl HasExit for Failure {
    fn exit(&self) -> Exit {
        match self {
            Failure::Zfs(e) => e.exit(),
            Failure::Keep(e) => e.exit(),
        }
    }
}

impl HasExit for ExecuteError {
    fn exit(&self) -> Exit {
        self.source.exit()
    }
}

/// Checks every dataset and plans the rollback to `@name`. With `destroy_newer`, newer
/// snapshots are planned for destruction if none is held or cloned; without it, any newer
/// snapshot refuses the plan (and is listed).
pub fn plan(
    zfs: &Zfs,
    datasets: &[String],
    name: &str,
    destroy_newer: bool,
) -> Result<RollbackPlan, Error> {
    let datasets = names::check_set(datasets, name)?;

    let mut problems = Vec::new();
    let mut targets = Vec::new();
    let mut pending: Vec<(Target, Vec<SnapshotInfo>)> = Vec::new();
    for d in &datasets {
        let snaps = match zfs.snapshots(d, &[Origin::PROPERTY]) {
            Ok(s) => s,
            Err(Error::DoesNotExist { .. }) => {
                problems.push(Problem::Missing { dataset: d.clone() });
                continue;
            }
            Err(e) => return Err(e),
        };
        let to = format!("{d}@{name}");
        let Some(target) = snaps.iter().find(|s| s.name == to) else {
            problems.push(Problem::NoSuchSnapshot { snapshot: to });
            continue;
        };
        let mut newer: Vec<SnapshotInfo> = snaps
            .iter()
            .filter(|s| s.createtxg > target.createtxg)
            .cloned()
            .collect();
        newer.sort_by_key(|s| std::cmp::Reverse(s.createtxg));
        let mut newer_bookmarks: Vec<(String, u64)> = zfs
            .bookmarks(d)?
            .into_iter()
            .filter(|(_, txg)| *txg > target.createtxg)
            .collect();
        newer_bookmarks.sort_by_key(|(_, txg)| std::cmp::Reverse(*txg));
        let newer_bookmarks: Vec<String> = newer_bookmarks.into_iter().map(|(n, _)| n).collect();
        if (!newer.is_empty() || !newer_bookmarks.is_empty()) && !destroy_newer {
            problems.push(Problem::NewerSnapshots {
                dataset: d.clone(),
                to: to.clone(),
                newer: newer
                    .iter()
                    .map(|s| s.name.clone())
                    .chain(newer_bookmarks.iter().cloned())
                    .collect(),
                guest: newer
                    .iter()
                    .filter(|s| Origin::of(&s.properties) == Origin::Guest)
                    .map(|s| s.name.clone())
                    .collect(),
            });
        }
        let newer_names = newer.iter().map(|s| s.name.clone()).collect();
        pending.push((
            Target {
                dataset: d.clone(),
                to,
                newer: newer_names,
                newer_bookmarks,
            },
            newer,
        ));
    }
    if destroy_newer {
        let names: Vec<String> = pending
            .iter()
            .flat_map(|(_, n)| n.iter().map(|s| s.name.clone()))
            .collect();
        let clones = zfs.clones_of(&names)?;
        for (_, newer) in &pending {
            for s in newer {
                problems.extend(s.destroy_blockers(&clones, false));
            }
        }
    }
    if !problems.is_empty() {
        return Err(Error::Preflight { problems });
    }
    targets.extend(pending.into_iter().map(|(t, _)| t));
    Ok(RollbackPlan {
        targets,
        keep: Vec::new(),
    })
}

/// Plans a rollback of every dataset to `@name` that keeps the newer snapshots (see
/// [`keep`]); `@name` may be a snapshot of a dataset's kept state, to roll forward.
pub fn plan_keeping(zfs: &Zfs, datasets: &[String], name: &str) -> Result<RollbackPlan, Error> {
    Ok(RollbackPlan {
        targets: Vec::new(),
        keep: keep::plan(zfs, datasets, name)?,
    })
}

/// Carries out a plan: per dataset, destroys the newer snapshots (newest first), then rolls
/// back. Stops at the first failure and says what had been done.
pub fn execute(zfs: &Zfs, plan: &RollbackPlan) -> Result<RollbackReport, Box<ExecuteError>> {
    let mut report = RollbackReport::default();
    if !plan.keep.is_empty() {
        return keep::execute(zfs, &plan.keep).map_err(|e| {
            Box::new(ExecuteError {
                report,
                source: e.into(),
            })
        });
    }
    match roll_back(zfs, &plan.targets, &mut report) {
        Ok(()) => Ok(report),
        Err(source) => Err(Box::new(ExecuteError {
            report,
            source: source.into(),
        })),
    }
}

/// [`execute`] without a `keep`: what it did goes into `report` as it is done.
fn roll_back(zfs: &Zfs, targets: &[Target], report: &mut RollbackReport) -> Result<(), Error> {
    for target in targets {
        for snapshot in &target.newer {
            zfs.destroy_snapshot(snapshot)?;
            report.destroyed.push(snapshot.clone());
        }
        for bookmark in &target.newer_bookmarks {
            zfs.destroy_bookmark(bookmark)?;
            report.destroyed.push(bookmark.clone());
        }
        zfs.rollback(&target.to)?;
        report.rolled_back.push(RolledBack {
            dataset: target.dataset.clone(),
            to: target.to.clone(),
        });
    }
    Ok(())
}

#[derive(Debug, Parser)]
#[command(
    name = "zrollback",
    version,
    about = "Roll ZFS datasets back to a snapshot, all of them or none",
    long_about = "Rolls every dataset given (or the job document's `datasets`) back to the snapshot \
        --to (or the document's `snapshot`). Checks all datasets before changing any. Refuses when \
        newer snapshots exist and lists them; --destroy-newer destroys them, but only if none is \
        held or cloned; --keep-newer keeps them (and the data the dataset has now) under \
        `<dataset>.evesnap-kept-<stamp>`, from where naming one of them with --keep-newer rolls \
        forward again. Reads the job document on stdin, writes it on stdout. A VM must not have \
        the dataset's filesystem mounted (or the volume open for writing) while it is rolled back."
)]
pub struct Cli {
    /// The zfs program (default: `zfs` on PATH, then /usr/sbin/zfs).
    #[arg(long, env = zfs::ENV, hide_env_values = true, value_name = "PATH")]
    zfs: Option<PathBuf>,
    /// Seconds each zfs call may take; one that takes longer is killed, with whatever it
    /// started, and the step fails.
    #[arg(
        long,
        env = zfs::TIMEOUT_ENV,
        hide_env_values = true,
        value_name = "SECS",
        default_value_t = zfs::DEFAULT_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    zfs_timeout: u64,
    /// A dataset to roll back (repeatable; default: the document's `datasets`).
    #[arg(long, short = 'd', value_name = "DATASET")]
    dataset: Vec<String>,
    /// The snapshot name after `@` (default: the document's `snapshot`).
    #[arg(long, value_name = "NAME")]
    to: Option<String>,
    /// Destroy snapshots newer than the target (refused if any is held or has clones).
    #[arg(long, conflicts_with = "keep_newer")]
    destroy_newer: bool,
    /// Keep the newer snapshots: the dataset's current state, with its snapshots newer than
    /// the target, is renamed to `<dataset>.evesnap-kept-<YYYYMMDD-HHMMSSmmm>` (a clone of
    /// the target, `zfs destroy -r` drops it) and the dataset gets the target's data and
    /// history (zfs clone + promote + rename). With a name found only in a kept state, rolls
    /// forward to it the same way (the state left is kept too). Nothing may use the dataset:
    /// a mounted filesystem in use fails the step, a volume must not be open (stop the VM);
    /// a thick volume needs room for its refreservation a second time.
    #[arg(long)]
    keep_newer: bool,
    /// Check and print the plan; change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The command line of `zrollback`.
pub fn command() -> clap::Command {
    Cli::command().after_help(Exit::table())
}

/// Runs `zrollback` as parsed by [`command`].
pub fn run(cli: Cli) -> Outcome {
    let mut doc = match evesnap::document::read_stdin() {
        Ok(upstream) => upstream.into_document().unwrap_or_default(),
        Err(e) => return Outcome::error(evesnap::exit::wrap(e)),
    };
    let timer = StepTimer::start(TOOL);
    if !doc.ok || doc.failed_step().is_some() {
        let culprit = doc
            .error
            .as_ref()
            .map(|e| e.tool.clone())
            .unwrap_or_else(|| "an upstream step".into());
        let message = format!("{culprit} failed upstream: {TOOL} did nothing");
        return Outcome::skipped(doc, TOOL, timer, message);
    }
    let datasets = if cli.dataset.is_empty() {
        doc.datasets.clone()
    } else {
        cli.dataset
    };
    let target = cli.to.or_else(|| doc.snapshot.clone());
    let prepared = (|| {
        if datasets.is_empty() {
            return Err(coded(
                Exit::Usage,
                "no dataset: give --dataset or a document with `datasets`",
            ));
        }
        let name = target.ok_or_else(|| {
            coded(
                Exit::Usage,
                "no snapshot: give --to or a document with `snapshot`",
            )
        })?;
        let zfs = Zfs::locate(cli.zfs.as_deref())
            .map_err(evesnap::exit::wrap)?
            .with_timeout(Duration::from_secs(cli.zfs_timeout));
        let plan = if cli.keep_newer {
            plan_keeping(&zfs, &datasets, &name)
        } else {
            plan(&zfs, &datasets, &name, cli.destroy_newer)
        }
        .map_err(evesnap::exit::wrap)?;
        Ok((zfs, plan, name))
    })();
    let (zfs, plan, name) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return Outcome::failed_step(doc, TOOL, timer, Map::new(), e),
    };
    if cli.dry_run {
        let planned = RollbackReport {
            dry_run: true,
            plan: Some(plan),
            ..RollbackReport::default()
        };
        doc.push(timer.finish_with(true, &planned));
        return Outcome::success(doc);
    }
    match execute(&zfs, &plan) {
        Ok(report) => {
            evesnap::note!(
                "rolled back {} dataset(s) to @{name}, destroyed {} newer snapshot(s)",
                report.rolled_back.len(),
                report.destroyed.len()
            );
            for kept in &report.kept {
                evesnap::note!(
                    "{} was kept as {} ({} snapshot(s))",
                    kept.dataset,
                    kept.kept_as,
                    kept.snapshots.len()
                );
            }
            doc.datasets = datasets;
            doc.snapshot = Some(name);
            doc.push(timer.finish_with(true, &report));
            Outcome::success(doc)
        }
        Err(e) => {
            let done = fields_of(&e.report);
            Outcome::failed_step(doc, TOOL, timer, done, evesnap::exit::wrap(*e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        evesnap::cli::assert_help(command(), &["--destroy-newer", "--keep-newer"]);
    }

    #[test]
    fn bad_names_fail_before_zfs_runs() {
        let zfs = Zfs::with_path("/nonexistent/zfs");
        let err = plan(&zfs, &["p/a".into()], "-R", true).expect_err("an error");
        assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
        let err = plan(&zfs, &["p/a b".into()], "s", false).expect_err("an error");
        assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
    }

    #[test]
    fn a_partial_failure_keeps_its_exit_code_and_report() {
        let source = Error::Failed(Box::new(zfs::Failure {
            argv: vec!["zfs".into()],
            status: Some(1),
            stderr: String::new(),
            stdout: String::new(),
        }));
        let report = RollbackReport {
            destroyed: vec!["p/a@b".into()],
            ..Default::default()
        };
        let err = evesnap::exit::wrap(ExecuteError {
            report,
            source: source.into(),
        });
        assert_eq!(evesnap::exit::exit_of(&err), Exit::StepFailed);
        assert!(err.to_string().contains("destroying 1 snapshot(s)"));
    }
}
