//! The snapshot id as the handle (EVE addresses snapshots by UUID, and handles the same
//! config again after a reboot): a create whose set exists is reported, not repeated; a
//! delete of a set that is gone succeeds; a rollback finds its target by id; and EVE's
//! retention counts the app's sets by id.

use std::collections::BTreeMap;

use evesnap::document::StepTimer;
use evesnap::exit::{coded, Exit};
use evesnap::report::{Consistency, Origin};
use evesnap::steps::{DestroyReport, Kept, SnapshotEntry};
use evesnap::zfs::SnapshotInfo;
use serde::Serialize;
use zsnap::meta;

use super::{Run, StepError, CONSISTENCY_PROPERTY};

/// The properties read back from each snapshot.
const KEYS: [&str; 6] = [
    meta::ID,
    meta::TYPE,
    meta::FROZEN,
    meta::VERSION,
    meta::ORIGIN,
    CONSISTENCY_PROPERTY,
];

/// The `existing` step's record: what was found of the plan's id.
#[derive(Debug, Serialize)]
struct Existing<'a> {
    /// Every volume has the set: it is reported, nothing is taken.
    complete: bool,
    found: Vec<&'a str>,
    /// A partial set's members, destroyed before the set is taken again.
    removed: Vec<String>,
}

impl Run<'_> {
    /// Every snapshot of the plan's datasets, oldest first per dataset, with evesnap's
    /// properties. A dataset that does not exist has none (the create's preflight, the
    /// rollback's plan refuse it, naming it).
    fn all_snapshots(&self) -> Result<Vec<SnapshotInfo>, evesnap::zfs::Error> {
        let mut all = Vec::new();
        for dataset in &self.plan.datasets {
            match self.zfs.snapshots(dataset, &KEYS) {
                Ok(snapshots) => all.extend(snapshots),
                Err(evesnap::zfs::Error::DoesNotExist { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(all)
    }

    /// The plan's set: the snapshots with its id, or (for a plan that names its snapshot)
    /// with its name.
    fn members(&self, all: Vec<SnapshotInfo>) -> Vec<SnapshotInfo> {
        let id = self.plan.id().to_string();
        let name = self.plan.snapshot_name();
        all.into_iter()
            .filter(|s| {
                s.properties.get(meta::ID) == Some(&id)
                    || (self.plan.snapshot.is_some() && s.short_name() == name)
            })
            .collect()
    }

    /// Create, first: the set with the plan's id. On every volume: reported as it was taken
    /// (`Ok(true)`: the run is done). On some: those members are destroyed and the set is
    /// taken again whole, since members taken at another moment would not be one
    /// consistent point in time (a half set comes from a run killed between its destroys,
    /// a delete cut short, or a volume added to the app since). On none: `Ok(false)`.
    pub(super) fn existing(&mut self) -> Result<bool, StepError> {
        let timer = StepTimer::start("existing");
        let id = self.plan.id().to_string();
        let found = match self.all_snapshots() {
            Ok(all) => all
                .into_iter()
                .filter(|s| s.properties.get(meta::ID) == Some(&id))
                .collect::<Vec<_>>(),
            Err(e) => {
                self.failed(timer);
                return Err(("preflight", evesnap::exit::wrap(e)));
            }
        };
        if found.is_empty() {
            return Ok(false);
        }
        let complete = self
            .plan
            .datasets
            .iter()
            .all(|d| found.iter().any(|s| s.dataset() == d));
        if complete {
            self.report_existing(&found);
            self.done(
                timer,
                &Existing {
                    complete,
                    found: found.iter().map(|s| s.name.as_str()).collect(),
                    removed: Vec::new(),
                },
            );
            return Ok(true);
        }
        let names: Vec<String> = found.iter().map(|s| s.name.clone()).collect();
        let problems = match self.zfs.clones_of(&names) {
            Ok(clones) => found
                .iter()
                .flat_map(|s| s.destroy_blockers(&clones, false))
                .collect::<Vec<_>>(),
            Err(e) => {
                self.failed(timer);
                return Err(("preflight", evesnap::exit::wrap(e)));
            }
        };
        if !problems.is_empty() {
            self.failed(timer);
            return Err((
                "preflight",
                evesnap::exit::wrap(evesnap::zfs::Error::Preflight { problems }).context(
                    format!("id {id} exists on only some volumes, and a held or cloned member cannot be removed to take it again"),
                ),
            ));
        }
        let mut removed = Vec::new();
        for s in &found {
            if let Err(e) = self.zfs.destroy_snapshot(&s.name) {
                self.report.push(timer.finish_with(
                    false,
                    &Existing {
                        complete,
                        found: found.iter().map(|s| s.name.as_str()).collect(),
                        removed,
                    },
                ));
                return Err((
                    "preflight",
                    evesnap::exit::wrap(e).context("cannot remove a partial set"),
                ));
            }
            removed.push(s.name.clone());
        }
        evesnap::warn!(
            "id {id} existed on only some volumes ({}): removed, the set is taken again whole",
            removed.join(", ")
        );
        self.done(
            timer,
            &Existing {
                complete,
                found: found.iter().map(|s| s.name.as_str()).collect(),
                removed,
            },
        );
        Ok(false)
    }

    /// The report of a set found whole: its snapshots, creation and consistency as recorded.
    fn report_existing(&mut self, found: &[SnapshotInfo]) {
        let entries: Vec<SnapshotEntry> = self
            .plan
            .datasets
            .iter()
            .filter_map(|d| found.iter().find(|s| s.dataset() == d))
            .map(|s| SnapshotEntry {
                name: s.name.clone(),
                guid: s.guid.clone(),
                createtxg: s.createtxg,
                creation: s.creation,
            })
            .collect();
        // A set claims the least of its members' claims; no claim is `crash`.
        let consistency = found
            .iter()
            .map(|s| {
                s.properties
                    .get(CONSISTENCY_PROPERTY)
                    .and_then(|c| c.parse::<Consistency>().ok())
                    .unwrap_or(Consistency::Crash)
            })
            .min_by_key(|c| rank(*c))
            .unwrap_or(Consistency::Crash);
        if let Some(first) = entries.first() {
            self.report.snapshot = first.short_name().to_string();
        }
        self.report.existing = true;
        self.report.consistency = Some(consistency);
        self.record_snapshots_of(entries);
        evesnap::note!(
            "the set with id {} already exists ({}): reported, nothing taken",
            self.plan.id(),
            consistency.as_str()
        );
    }

    /// `action: delete`: the plan's set destroyed, all members or none (a held or cloned
    /// member refuses it, exit 7); a set already gone is success.
    pub(super) fn delete(&mut self) -> Result<(), StepError> {
        let timer = StepTimer::start("delete");
        let members = match self.all_snapshots() {
            Ok(all) => self.members(all),
            Err(e) => {
                self.failed(timer);
                return Err(("delete", evesnap::exit::wrap(e)));
            }
        };
        if let Some(first) = members.first() {
            self.report.snapshot = first.short_name().to_string();
        }
        self.report.volume_snapshots = self.by_volume(members.iter().map(|s| s.name.as_str()));
        let names: Vec<String> = members.iter().map(|s| s.name.clone()).collect();
        if names.is_empty() {
            evesnap::note!("nothing to delete: the set is already gone");
        }
        match zsnap::destroy(self.zfs, &names, false, false) {
            Ok(report) => {
                let failed = !report.failed.is_empty();
                self.report.deleted = Some(report.destroyed.clone());
                self.report.push(timer.finish_with(!failed, &report));
                if failed {
                    return Err((
                        "delete",
                        coded(
                            Exit::StepFailed,
                            format!(
                                "{} of the set's snapshot(s) could not be destroyed",
                                report.failed.len()
                            ),
                        ),
                    ));
                }
                Ok(())
            }
            Err(e) => {
                self.failed(timer);
                Err(("delete", evesnap::exit::wrap(e)))
            }
        }
    }

    /// The name of the snapshot a rollback's `to` means: from the controller, a UUID is an
    /// id, found by its `org.lfedge.evesnap:id` (one name across the volumes); anything
    /// else, and whatever the guest sends (`serve`), is a name.
    pub(super) fn rollback_name(&self, to: &str) -> Result<String, anyhow::Error> {
        let parsed = to.parse::<uuid::Uuid>();
        let (Ok(id), Origin::Controller) = (parsed, self.plan.origin) else {
            return Ok(to.to_string());
        };
        let id = id.to_string();
        let all = self.all_snapshots().map_err(evesnap::exit::wrap)?;
        let mut names: Vec<&str> = all
            .iter()
            .filter(|s| s.properties.get(meta::ID) == Some(&id))
            .map(|s| s.short_name())
            .collect();
        names.sort_unstable();
        names.dedup();
        match names.as_slice() {
            [] => Ok(to.to_string()), // a snapshot may be named so; zrollback says if not
            [one] => Ok(one.to_string()),
            many => Err(coded(
                Exit::Preflight,
                format!(
                    "id {id} names snapshots of different names ({}): refusing to guess",
                    many.join(", ")
                ),
            )),
        }
    }

    /// EVE's retention for a plan with an `app`: its sets (snapshots of its volumes sharing
    /// an id) are counted, oldest removed first until `keep` remain. Sets with a held member,
    /// snapshots without evesnap's id and the guest's are never counted or removed; a set
    /// with a clone is counted and kept (reported).
    pub(super) fn app_retention(
        &mut self,
        keep: usize,
    ) -> Result<DestroyReport, evesnap::zfs::Error> {
        let all = self.all_snapshots()?;
        let mut sets: BTreeMap<String, Vec<SnapshotInfo>> = BTreeMap::new();
        for s in all {
            let Some(id) = s.properties.get(meta::ID).cloned() else {
                continue;
            };
            if Origin::of(&s.properties) == Origin::Controller {
                sets.entry(id).or_default().push(s);
            }
        }
        let mut counted: Vec<Vec<SnapshotInfo>> = sets
            .into_values()
            .filter(|members| members.iter().all(|m| m.userrefs == 0))
            .collect();
        counted.sort_by_key(|members| members.iter().map(|m| m.createtxg).min());
        let mut report = DestroyReport::default();
        let excess = counted.len().saturating_sub(keep);
        for members in &counted[..excess] {
            for m in members {
                match self.zfs.destroy_snapshot(&m.name) {
                    Ok(()) => report.destroyed.push(m.name.clone()),
                    Err(e) => report.failed.push(Kept {
                        snapshot: m.name.clone(),
                        reason: evesnap::exit::chain(&evesnap::exit::wrap(e)),
                    }),
                }
            }
        }
        Ok(report)
    }

    /// `volume uuid → dataset@name` for a plan in EVE's terms.
    pub(super) fn by_volume<'s>(
        &self,
        snapshots: impl Iterator<Item = &'s str>,
    ) -> Option<BTreeMap<uuid::Uuid, String>> {
        if self.plan.volumes.is_empty() {
            return None;
        }
        Some(
            snapshots
                .filter_map(|s| {
                    let dataset = s.split_once('@').map_or(s, |(d, _)| d);
                    self.plan.volume_of(dataset).map(|v| (v, s.to_string()))
                })
                .collect(),
        )
    }
}

/// Lower is weaker: a set claims its weakest member's consistency.
fn rank(c: Consistency) -> u8 {
    match c {
        Consistency::Crash => 0,
        Consistency::Halted => 1,
        Consistency::Filesystem | Consistency::HaltedClean => 2,
        Consistency::Application => 3,
    }
}
