//! The rest of a snapshot's life: [`list`], [`destroy`], [`prune`].
//!
//! A "snapshot" of a VM spans its datasets under one name; [`prune`] works on such groups so
//! that it never leaves half a set behind.

use std::collections::BTreeMap;

use evesnap::zfs::{names, Error, Problem, SnapshotInfo, Zfs};

use crate::meta;

/// Every snapshot of `datasets`, oldest first per dataset, with evesnap's metadata.
/// `only_evesnap` keeps those that carry an `org.lfedge.evesnap:id`.
pub fn list(
    zfs: &Zfs,
    datasets: &[String],
    only_evesnap: bool,
) -> Result<Vec<SnapshotInfo>, Error> {
    let mut out = Vec::new();
    for d in datasets {
        let snaps = zfs.snapshots(d, &meta::KEYS)?;
        out.extend(
            snaps
                .into_iter()
                .filter(|s| !only_evesnap || s.properties.contains_key(meta::ID)),
        );
    }
    Ok(out)
}

pub use evesnap::steps::{DestroyReport, Kept};

/// Records one `zfs destroy`'s outcome in `report`.
fn record(report: &mut DestroyReport, snapshot: &str, done: Result<(), Error>) {
    match done {
        Ok(()) => report.destroyed.push(snapshot.to_string()),
        Err(e) => {
            let reason = evesnap::exit::chain(&evesnap::exit::wrap(e));
            evesnap::warn!("cannot destroy {snapshot}: {reason}");
            report.failed.push(Kept {
                snapshot: snapshot.to_string(),
                reason,
            });
        }
    }
}

/// Destroys the named snapshots (`dataset@name`), all or none: every one must exist, be
/// unheld (`defer` uses `zfs destroy -d` instead, which destroys it when the last hold is
/// released) and have no clones, or nothing is destroyed.
pub fn destroy(
    zfs: &Zfs,
    snapshots: &[String],
    defer: bool,
    dry_run: bool,
) -> Result<DestroyReport, Error> {
    for s in snapshots {
        names::split_snapshot(s)?;
    }
    let existing = zfs.existing(snapshots)?;
    let mut problems: Vec<Problem> = snapshots
        .iter()
        .filter(|s| !existing.contains(s))
        .map(|s| Problem::NoSuchSnapshot {
            snapshot: s.clone(),
        })
        .collect();
    let infos = zfs.snapshot_info(&existing, &[])?;
    let clones = zfs.clones_of(&existing)?;
    for info in &infos {
        problems.extend(info.destroy_blockers(&clones, defer));
    }
    if !problems.is_empty() {
        return Err(Error::Preflight { problems });
    }
    let mut report = DestroyReport {
        dry_run,
        ..Default::default()
    };
    for s in snapshots {
        let done = if dry_run {
            Ok(())
        } else if defer {
            zfs.run(&["destroy".into(), "-d".into(), s.clone()], s)
                .map(drop)
        } else {
            zfs.destroy_snapshot(s)
        };
        record(&mut report, s, done);
    }
    Ok(report)
}

/// Keeps the `keep` newest snapshot sets of `datasets` and destroys the older ones, oldest
/// first (by `createtxg`). A set is the snapshots of one name across the datasets. An old
/// set with a held or cloned member is never destroyed: it stays (reported in `kept`), and
/// no newer set is destroyed in its place, so more than `keep` sets may remain. Unless
/// `all`, only evesnap's snapshots (with `org.lfedge.evesnap:id`) are counted and touched.
/// Snapshots the guest asked for (`org.lfedge.evesnap:origin=guest`) are never counted or
/// touched, even with `all`: they have their own budget (`snap-orchestrate serve`).
/// EVE's `max_snapshots` is `keep`.
pub fn prune(
    zfs: &Zfs,
    datasets: &[String],
    keep: usize,
    all: bool,
    dry_run: bool,
) -> Result<DestroyReport, Error> {
    let snaps = list(zfs, datasets, !all)?
        .into_iter()
        .filter(|s| meta::Origin::of(&s.properties) != meta::Origin::Guest);
    // Group by name; order groups by their oldest member.
    let mut groups: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
    for s in snaps {
        groups
            .entry(s.short_name().to_string())
            .or_default()
            .push(s);
    }
    let mut ordered: Vec<(u64, String, Vec<SnapshotInfo>)> = groups
        .into_iter()
        .map(|(name, members)| {
            (
                members.iter().map(|m| m.createtxg).min().unwrap_or(0),
                name,
                members,
            )
        })
        .collect();
    ordered.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let names: Vec<String> = ordered
        .iter()
        .flat_map(|(_, _, m)| m.iter().map(|s| s.name.clone()))
        .collect();
    let clones = zfs.clones_of(&names)?;

    let mut report = DestroyReport {
        dry_run,
        ..Default::default()
    };
    let excess = ordered.len().saturating_sub(keep);
    for (_, _, members) in &ordered[..excess] {
        let problems: Vec<Problem> = members
            .iter()
            .flat_map(|m| m.destroy_blockers(&clones, false))
            .collect();
        if !problems.is_empty() {
            let reason = problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            for m in members {
                report.kept.push(Kept {
                    snapshot: m.name.clone(),
                    reason: reason.clone(),
                });
            }
            continue;
        }
        for m in members {
            let done = if dry_run {
                Ok(())
            } else {
                zfs.destroy_snapshot(&m.name)
            };
            record(&mut report, &m.name, done);
        }
    }
    Ok(report)
}
