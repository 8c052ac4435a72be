//! `zsnap`: takes one named snapshot of a set of ZFS datasets (atomically where ZFS allows),
//! with evesnap's metadata as user properties; `list`, `destroy`, `prune` handle the rest of
//! a snapshot's life.
//!
//! The orchestrator calls the same functions: [`preflight`] (before the guest freeze),
//! [`PreparedSnapshot::take`] (inside the freeze window: one `zfs` call when atomic),
//! [`PreparedSnapshot::finish`] (after the thaw), and [`list`], [`destroy`], [`prune`].
//!
//! Step fields written to the job document (`tool: "zsnap"`):
//! - take: `snapshots: [{name, guid, createtxg, creation}]`, `atomic`, `method`,
//!   `snapshot_ms`, `calls`, `properties`; the document's `datasets` and `snapshot` are set.
//!   With the recursive method (zfs without multi-name `zfs snapshot`) also
//!   `destroy_after_output: [parent@name]`: the parent's own snapshot, destroyed after the
//!   document was written and stdout closed, so a thaw downstream does not wait for it (a
//!   failure there is a warning on stderr; the exit status stays).
//! - `list`: `action: "list"`, `snapshots: [{name, guid, createtxg, creation, userrefs, used,
//!   referenced, properties}]`.
//! - `destroy`/`prune`: `action`, `destroyed`, `kept`, `failed`, `dry_run`; `prune` also
//!   `keep`. A destroy that failed on some snapshots still lists them all.
//! - on failure: `error` (the message) and, for a failed preflight, `problems`.

mod cli;
mod manage;
pub mod meta;
mod take;

use std::time::Duration;

use clap::CommandFactory;
use evesnap::cli::Outcome;
use evesnap::document::{fields_of, Document, StepTimer};
use evesnap::exit::{coded, Exit};
use evesnap::steps::{self, ActionFailed, ActionReport, SnapshotPlan};
use evesnap::zfs::{self, Zfs};
use serde_json::{Map, Value};

use crate::cli::{Action, TakeArgs};

pub use cli::Cli;
pub use manage::{destroy, list, prune, DestroyReport, Kept};
pub use meta::Metadata;
pub use take::{
    common_parent, confirm_claims, preflight, Method, PreparedSnapshot, SnapshotEntry,
    SnapshotReport, Taken,
};

pub const TOOL: &str = "zsnap";

/// Space every dataset must keep free beyond what the snapshot needs, by default (1 MiB).
pub const DEFAULT_MIN_FREE: u64 = 1 << 20;

/// The command line of `zsnap`.
pub fn command() -> clap::Command {
    Cli::command()
        .after_help(Exit::table())
        .mut_subcommands(|s| s.after_help(Exit::table()))
}

/// Runs `zsnap` as parsed by [`command`].
pub fn run(cli: Cli) -> Outcome {
    let located = Zfs::locate(cli.zfs.as_deref())
        .map(|zfs| zfs.with_timeout(Duration::from_secs(cli.zfs_timeout)));
    let (zfs, locate_error) = match located {
        Ok(zfs) => (Some(zfs), None),
        Err(e) => (None, Some(e)),
    };
    // What the command line alone decides is checked before the upstream document arrives:
    // in `qga-freeze | zsnap --dataset … --name …`, the guest is frozen while the document
    // travels, and only the snapshot call is left for that window.
    let early = match (&zfs, &cli.action) {
        (Some(zfs), None) if !cli.take.dataset.is_empty() && cli.take.name.is_some() => {
            Some(prepare(
                zfs,
                &cli.take,
                &cli.take.dataset,
                cli.take.name.clone().unwrap_or_default(),
                None,
            ))
        }
        _ => None,
    };
    let doc = match evesnap::document::read_stdin() {
        Ok(upstream) => upstream.into_document().unwrap_or_default(),
        Err(e) => return Outcome::error(evesnap::exit::wrap(e)),
    };
    // Between a live freeze and its thaw: should this process die before its document is
    // out, the freeze's watchdog thaws at once.
    let relay = meta::relay(&doc);
    let timer = StepTimer::start(TOOL);
    let mut outcome = if let Some(reason) = doc.upstream_failure() {
        Outcome::skipped(doc, TOOL, timer, format!("{reason}: {TOOL} did nothing"))
    } else {
        match (&zfs, locate_error, cli.action) {
            (Some(zfs), _, None) => run_take(zfs, cli.take, doc, timer, early),
            (Some(zfs), _, Some(action)) => run_action(zfs, action, doc, timer),
            (None, error, _) => {
                let error = error.map_or_else(
                    || anyhow::anyhow!("zfs was not located"),
                    evesnap::exit::wrap,
                );
                failed(doc, timer, Map::new(), error)
            }
        }
    };
    outcome.relay = relay;
    outcome
}

/// The metadata and user properties of a snapshot taken by `args`, with what the upstream
/// document says (the id it carries, whether the guest is frozen) when there is one.
fn properties(args: &TakeArgs, doc: Option<&Document>) -> anyhow::Result<Vec<(String, String)>> {
    let id = args
        .id
        .clone()
        .or_else(|| doc?.snapshot_id.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let metadata = Metadata {
        id,
        kind: args.kind.clone(),
        frozen: doc.is_some_and(meta::guest_frozen),
        origin: args
            .origin
            .parse()
            .map_err(|e: String| coded(Exit::Usage, e))?,
    };
    let mut properties = Vec::new();
    for text in &args.property {
        let (k, v) = zfs::names::split_user_property(text).map_err(evesnap::exit::wrap)?;
        properties.push((k.to_string(), v.to_string()));
    }
    properties.extend(metadata.properties());
    Ok(properties)
}

fn prepare<'z>(
    zfs: &'z Zfs,
    args: &TakeArgs,
    datasets: &[String],
    name: String,
    doc: Option<&Document>,
) -> anyhow::Result<PreparedSnapshot<'z>> {
    let properties = properties(args, doc)?;
    preflight(zfs, datasets, &name, &properties, args.min_free).map_err(evesnap::exit::wrap)
}

/// Records a failed step (with the error and, for a preflight, its problems) and fails.
fn failed(
    doc: Document,
    timer: StepTimer,
    fields: Map<String, Value>,
    error: anyhow::Error,
) -> Outcome {
    Outcome::failed_step(doc, TOOL, timer, fields, error)
}

fn datasets_or_document(given: Vec<String>, doc: &Document) -> anyhow::Result<Vec<String>> {
    let datasets = if given.is_empty() {
        doc.datasets.clone()
    } else {
        given
    };
    if datasets.is_empty() {
        return Err(coded(
            Exit::Usage,
            "no dataset: give --dataset or a document with `datasets`",
        ));
    }
    Ok(datasets)
}

fn run_take<'z>(
    zfs: &'z Zfs,
    args: TakeArgs,
    mut doc: Document,
    timer: StepTimer,
    early: Option<anyhow::Result<PreparedSnapshot<'z>>>,
) -> Outcome {
    let prepared = match early {
        // Checked before the document came: only what the document adds is set now.
        Some(Ok(mut prepared)) => match properties(&args, Some(&doc)).and_then(|props| {
            props
                .iter()
                .try_for_each(|(k, v)| prepared.set_property(k, v))
                .map_err(evesnap::exit::wrap)
        }) {
            Ok(()) => prepared,
            Err(e) => return failed(doc, timer, Map::new(), e),
        },
        Some(Err(e)) => return failed(doc, timer, Map::new(), e),
        None => {
            let datasets = match datasets_or_document(args.dataset.clone(), &doc) {
                Ok(d) => d,
                Err(e) => return failed(doc, timer, Map::new(), e),
            };
            let name = args
                .name
                .clone()
                .or_else(|| doc.snapshot.clone())
                .unwrap_or_else(|| evesnap::time::eve_timestamp(time_now()));
            match prepare(zfs, &args, &datasets, name, Some(&doc)) {
                Ok(p) => p,
                Err(e) => return failed(doc, timer, Map::new(), e),
            }
        }
    };
    let mut prepared = prepared;
    // `frozen=true` is a claim: the snapshot is created with `frozen=false` and the claim is
    // written only after `zfs snapshot` returned before the upstream freeze's watchdog
    // deadline (after that it may postdate the watchdog's thaw). A `zfs snapshot` that
    // outlives this process (SIGKILL: the kernel call completes anyway) claims nothing.
    let claims_frozen = prepared
        .properties
        .iter()
        .any(|(k, v)| k == meta::FROZEN && v == "true");
    let deadline = claims_frozen
        .then(|| meta::watchdog_deadline_ms(&doc))
        .flatten();
    let freeze_watchdog = doc
        .last_ok::<evesnap::steps::FreezeReport>()
        .and_then(|(_, freeze)| freeze.watchdog);
    if claims_frozen {
        if let Err(e) = prepared.claim(meta::FROZEN, "false", "true") {
            return failed(doc, timer, Map::new(), evesnap::exit::wrap(e));
        }
    }
    if deadline.is_some_and(|d| meta::now_ms() >= d) {
        evesnap::warn!(
            "the freeze's watchdog deadline has passed: the snapshot cannot claim a frozen guest"
        );
        prepared.drop_claim(meta::FROZEN);
    }
    let name = prepared.name.clone();
    let plan = SnapshotPlan {
        method: prepared.method.clone(),
        atomic: prepared.method.atomic(),
        planned: prepared.snapshots.clone(),
        dry_run: args.dry_run,
    };
    if args.dry_run {
        doc.push(timer.finish_with(true, &plan));
        return Outcome::success(doc);
    }
    match prepared.take_for_output() {
        Ok(mut report) => {
            if deadline.is_some_and(|d| meta::now_ms() >= d) && !prepared.claims.is_empty() {
                evesnap::warn!(
                    "the snapshot returned after the freeze's watchdog deadline, so it may postdate the \
                     watchdog's thaw: it keeps {}=false",
                    meta::FROZEN
                );
                prepared.drop_claim(meta::FROZEN);
            }
            // Proven now (returned inside the freeze); written once the document is out, so
            // that the `zfs set` stays out of the freeze window.
            let claims = prepared.claims.clone();
            report.properties.extend(claims.iter().cloned());
            evesnap::note!(
                "took {} snapshot(s) @{name} in {:.1} ms ({})",
                report.snapshots.len(),
                report.snapshot_ms,
                if report.atomic {
                    "atomic"
                } else {
                    "not atomic"
                }
            );
            doc.datasets = prepared.datasets.clone();
            doc.snapshot = Some(name);
            doc.push(timer.finish_with(true, &report));
            let mut outcome = Outcome::success(doc);
            if !report.destroy_after_output.is_empty() || !claims.is_empty() {
                // The next tool (a thaw) must not wait for this, nor compete with it: in a
                // pipeline, this waits (at most THAW_WAIT) for the freeze's watchdog to stand
                // down, which the thaw does. A document stored in a file is not waited on.
                let zfs = zfs.clone();
                let extra = report.destroy_after_output;
                let snapshots = prepared.snapshots.clone();
                let thaw_to_come = evesnap::cli::stdout_pipe()
                    .and(freeze_watchdog.clone())
                    .filter(|_| !claims.is_empty() || !extra.is_empty());
                outcome.after_output = Some(evesnap::cli::AfterOutput(Box::new(move || {
                    if let Some(watchdog) = thaw_to_come {
                        evesnap::qga::watchdog::wait_stood_down(&watchdog, THAW_WAIT);
                    }
                    take::confirm_claims(&zfs, &snapshots, &claims).map_err(|e| {
                        evesnap::exit::wrap(e).context(format!(
                            "cannot record on {} that it was taken frozen",
                            snapshots.join(", ")
                        ))
                    })?;
                    take::destroy_after_output(&zfs, &extra).map_err(|e| {
                        evesnap::exit::wrap(e).context(format!(
                            "cannot destroy {}, made by the recursive snapshot",
                            extra.join(", ")
                        ))
                    })
                })));
            }
            outcome
        }
        Err(e) => failed(doc, timer, fields_of(&plan), evesnap::exit::wrap(e)),
    }
}

/// How long zsnap's work after its document waits for the thaw downstream.
const THAW_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn run_action(zfs: &Zfs, action: Action, mut doc: Document, timer: StepTimer) -> Outcome {
    let (name, result): (steps::ZsnapAction, anyhow::Result<ActionReport>) = match action {
        Action::List {
            dataset,
            evesnap_only,
        } => (
            steps::ZsnapAction::List,
            datasets_or_document(dataset, &doc).and_then(|d| {
                let snapshots = list(zfs, &d, evesnap_only).map_err(evesnap::exit::wrap)?;
                Ok(ActionReport::List { snapshots })
            }),
        ),
        Action::Destroy {
            snapshots,
            dataset,
            name,
            defer,
            dry_run,
        } => (
            steps::ZsnapAction::Destroy,
            destroy_targets(snapshots, dataset, name, &doc).and_then(|targets| {
                let report = destroy(zfs, &targets, defer, dry_run).map_err(evesnap::exit::wrap)?;
                Ok(ActionReport::Destroy(report))
            }),
        ),
        Action::Prune {
            keep,
            dataset,
            all,
            dry_run,
        } => (
            steps::ZsnapAction::Prune,
            datasets_or_document(dataset, &doc).and_then(|d| {
                let report = prune(zfs, &d, keep, all, dry_run).map_err(evesnap::exit::wrap)?;
                Ok(ActionReport::Prune(DestroyReport {
                    keep: Some(keep),
                    ..report
                }))
            }),
        ),
    };
    match result {
        Ok(report) => match destroys_failed(&report) {
            // The step still says what was destroyed and what was not.
            Some(error) => failed(doc, timer, fields_of(&report), error),
            None => {
                doc.push(timer.finish_with(true, &report));
                Outcome::success(doc)
            }
        },
        Err(e) => failed(doc, timer, fields_of(&ActionFailed { action: name }), e),
    }
}

/// A destroy or prune whose destroys partly failed is an error.
fn destroys_failed(report: &ActionReport) -> Option<anyhow::Error> {
    let (ActionReport::Destroy(report) | ActionReport::Prune(report)) = report else {
        return None;
    };
    let first = report.failed.first()?;
    Some(coded(
        Exit::StepFailed,
        format!(
            "{} snapshot(s) could not be destroyed, first {}: {}",
            report.failed.len(),
            first.snapshot,
            first.reason
        ),
    ))
}

fn destroy_targets(
    snapshots: Vec<String>,
    dataset: Vec<String>,
    name: Option<String>,
    doc: &Document,
) -> anyhow::Result<Vec<String>> {
    if !snapshots.is_empty() {
        if !dataset.is_empty() || name.is_some() {
            return Err(coded(
                Exit::Usage,
                "give full snapshot names or --dataset/--name, not both",
            ));
        }
        return Ok(snapshots);
    }
    let datasets = datasets_or_document(dataset, doc)?;
    let name = name.or_else(|| doc.snapshot.clone()).ok_or_else(|| {
        coded(
            Exit::Usage,
            "no snapshot: give SNAPSHOT..., --name or a document with `snapshot`",
        )
    })?;
    Ok(datasets.iter().map(|d| format!("{d}@{name}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_is_complete() {
        evesnap::cli::assert_help(command(), &["--dataset"]);
    }
}
