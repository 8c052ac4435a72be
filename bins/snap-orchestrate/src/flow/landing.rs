//! Whether the volumes already are at a rollback's target, so that the same rollback handled
//! again (EVE after a reboot) touches nothing.
//!
//! A volume is at its newest snapshot when nothing was written since: `written` is 0. Right
//! after `zfs rollback` of a zvol holding data, OpenZFS 2.3 reports `written` 1024, not 0,
//! with nothing written (docs/lab.md#a-rolled-back-zvol-is-not-written-0), so each rollback
//! records where it left the volume on the dataset: the target's guid
//! (`org.lfedge.evesnap:rolled-back-to`) and `written` just after
//! (`org.lfedge.evesnap:written-after-rollback`). Any write by the guest allocates new
//! blocks and changes `written`. zfs-fuse has no `written`: there every rollback is done.

use evesnap::steps::RolledBack;

use super::Run;
use evesnap::zfs::parse::Table;

/// The target's guid, recorded on the dataset by the rollback that went there.
pub const ROLLED_BACK_TO: &str = "org.lfedge.evesnap:rolled-back-to";
/// `written` of the dataset just after that rollback.
pub const WRITTEN_AFTER: &str = "org.lfedge.evesnap:written-after-rollback";

impl Run<'_> {
    /// Every volume at the target already: it is the newest snapshot (nothing to destroy)
    /// and nothing was written since (`written` is 0, or what it was right after the
    /// rollback that went there). `None` when not, or when it cannot be told.
    pub(super) fn already_there(
        &self,
        target: &zrollback::RollbackPlan,
    ) -> Option<Vec<RolledBack>> {
        // A rollback that keeps the newer snapshots (its plan is `keep`, not `targets`)
        // always switches: the state it would leave is kept, so doing it again loses nothing.
        if target.targets.is_empty()
            || target
                .targets
                .iter()
                .any(|t| !t.newer.is_empty() || !t.newer_bookmarks.is_empty())
        {
            return None;
        }
        let (datasets, missing) = self
            .zfs
            .get(
                &self.plan.datasets,
                &["written", ROLLED_BACK_TO, WRITTEN_AFTER],
            )
            .ok()?;
        let snapshots: Vec<String> = target.targets.iter().map(|t| t.to.clone()).collect();
        let (guids, missing_snapshots) = self.zfs.get(&snapshots, &["guid"]).ok()?;
        if !missing.is_empty() || !missing_snapshots.is_empty() {
            return None;
        }
        let at = target.targets.iter().all(|t| {
            let written = property(&datasets, &t.dataset, "written");
            let landed = property(&datasets, &t.dataset, ROLLED_BACK_TO);
            let guid = property(&guids, &t.to, "guid");
            written.as_deref() == Some("0")
                || (written.is_some()
                    && landed.is_some()
                    && landed == guid
                    && property(&datasets, &t.dataset, WRITTEN_AFTER) == written)
        });
        at.then(|| {
            target
                .targets
                .iter()
                .map(|t| RolledBack {
                    dataset: t.dataset.clone(),
                    to: t.to.clone(),
                })
                .collect()
        })
    }

    /// After a rollback, before anything else touches the volumes: where it left each one.
    /// Best effort: without it, the same rollback is simply done again.
    pub(super) fn record_landing(&self, target: &zrollback::RollbackPlan) {
        let snapshots: Vec<String> = target.targets.iter().map(|t| t.to.clone()).collect();
        let read = self
            .zfs
            .get(&self.plan.datasets, &["written"])
            .and_then(|(written, _)| Ok((written, self.zfs.get(&snapshots, &["guid"])?.0)));
        let Ok((written, guids)) = read else {
            return; // zfs-fuse: no `written`
        };
        for t in &target.targets {
            let (Some(w), Some(guid)) = (
                property(&written, &t.dataset, "written"),
                property(&guids, &t.to, "guid"),
            ) else {
                continue;
            };
            let props = [
                (ROLLED_BACK_TO.to_string(), guid),
                (WRITTEN_AFTER.to_string(), w),
            ];
            for prop in props {
                // One property per call: zfs-fuse's `set` takes one.
                if let Err(e) = self.zfs.set(&t.dataset, std::slice::from_ref(&prop)) {
                    evesnap::warn!(
                        "cannot record the rollback on {} ({}): the same rollback will be done again",
                        t.dataset,
                        evesnap::exit::chain(&evesnap::exit::wrap(e))
                    );
                    return;
                }
            }
        }
    }
}

/// One property of one name in a `zfs get` table.
fn property(table: &Table, name: &str, prop: &str) -> Option<String> {
    table
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, p)| p.get(prop).cloned().flatten())
}
