//! Taking a snapshot: [`preflight`] checks and plans everything, [`PreparedSnapshot::take`]
//! is the only part that belongs inside a guest's freeze window (one `zfs` call when the
//! set is atomic), [`PreparedSnapshot::finish`] reads back what was created (and tidies up)
//! after the thaw.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use evesnap::zfs::{self, names, Capabilities, Error, Problem, Zfs};

pub use evesnap::steps::Method;

/// How long the snapshots of a cut-short `zfs snapshot` may take to appear on zfs-fuse (its
/// daemon goes on with a request whose client was killed).
pub const ZFS_FUSE_SETTLE: Duration = Duration::from_secs(3);

/// Everything checked and decided; nothing created yet.
#[derive(Debug)]
pub struct PreparedSnapshot<'z> {
    zfs: &'z Zfs,
    caps: Capabilities,
    /// The datasets, in the order given (duplicates removed).
    pub datasets: Vec<String>,
    /// The part after `@`.
    pub name: String,
    /// `dataset@name`, one per dataset.
    pub snapshots: Vec<String>,
    /// User properties set on every snapshot.
    pub properties: Vec<(String, String)>,
    /// Claims about the freeze (`frozen`, `consistency`): never written by the `zfs
    /// snapshot` call itself, only by [`confirm_claims`](Self::confirm_claims) once the
    /// caller knows the snapshot returned while the freeze held. A `zfs snapshot` whose
    /// caller died (SIGKILL) may still complete in the kernel after the thaw; it then
    /// carries no claim at all.
    pub claims: Vec<(String, String)>,
    pub method: Method,
    /// The space facts the preflight looked at.
    pub space: Vec<zfs::Space>,
}

/// What [`PreparedSnapshot::take`] did: the snapshots exist.
#[derive(Debug, Clone)]
pub struct Taken {
    /// Every snapshot created, `extra` included.
    pub created: Vec<String>,
    /// Wall time of the `zfs snapshot` call(s).
    pub elapsed: Duration,
    /// Number of `zfs` calls made.
    pub calls: usize,
}

pub use evesnap::steps::{SnapshotEntry, SnapshotReport};

/// Checks that every dataset exists, that `name` is free on all of them and that there is
/// room, and decides how to take the set. Creates nothing. `min_free` is the space each
/// dataset (and each pool) must keep free beyond what the snapshot itself needs.
pub fn preflight<'z>(
    zfs: &'z Zfs,
    datasets: &[String],
    name: &str,
    properties: &[(String, String)],
    min_free: u64,
) -> Result<PreparedSnapshot<'z>, Error> {
    let datasets = names::check_set(datasets, name)?;
    for (k, v) in properties {
        names::check_user_property(k, v)?;
    }
    let snapshots: Vec<String> = datasets
        .iter()
        .map(|d| names::snapshot(d, name))
        .collect::<Result<_, _>>()?;
    let caps = zfs.capabilities()?;

    let pools: Vec<String> = datasets
        .iter()
        .map(|d| zfs::pool_of(d).to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut problems = Vec::new();
    let mut asked = datasets.clone();
    asked.extend(pools.iter().filter(|p| !datasets.contains(p)).cloned());
    let (space, missing) = zfs.space(&asked)?;
    // A missing pool makes its datasets missing too: name the datasets only.
    for d in missing.iter().filter(|d| datasets.contains(d)) {
        problems.push(Problem::Missing { dataset: d.clone() });
    }
    if !missing.is_empty() {
        return Err(Error::Preflight { problems });
    }

    let method = choose_method(zfs, caps, &datasets, &pools, name)?;
    let mut probe = snapshots.clone();
    if let Method::Recursive { extra, between, .. } = &method {
        probe.extend(extra.iter().chain(between).cloned());
    }
    for taken in zfs.existing(&probe)? {
        problems.push(Problem::NameTaken { snapshot: taken });
    }

    let by_name: BTreeMap<&str, &zfs::Space> =
        space.iter().map(|s| (s.dataset.as_str(), s)).collect();
    let mut pool_needs: BTreeMap<&str, u64> = BTreeMap::new();
    for d in &datasets {
        let Some(s) = by_name.get(d.as_str()) else {
            continue;
        };
        let needed = s.snapshot_needs().saturating_add(min_free);
        let available = s.available_outside_reservation();
        if needed > available {
            problems.push(Problem::NoRoom {
                dataset: d.clone(),
                needed,
                available,
                missing: needed - available,
            });
        }
        *pool_needs.entry(zfs::pool_of(d)).or_default() += s.snapshot_needs();
    }
    // Several thick volumes of one pool each fit alone but not together.
    for (pool, needs) in pool_needs {
        let Some(s) = by_name.get(pool) else { continue };
        let needed = needs.saturating_add(min_free);
        let available = s.available_outside_reservation();
        // Said already when one of its datasets alone does not fit.
        let already = problems
            .iter()
            .any(|p| matches!(p, Problem::NoRoom { dataset, .. } if zfs::pool_of(dataset) == pool));
        if needed > available && !already && datasets.len() > 1 {
            problems.push(Problem::NoRoom {
                dataset: pool.to_string(),
                needed,
                available,
                missing: needed - available,
            });
        }
    }
    if !problems.is_empty() {
        return Err(Error::Preflight { problems });
    }
    Ok(PreparedSnapshot {
        zfs,
        caps,
        datasets,
        name: name.to_string(),
        snapshots,
        properties: properties.to_vec(),
        claims: Vec::new(),
        method,
        space,
    })
}

fn choose_method(
    zfs: &Zfs,
    caps: Capabilities,
    datasets: &[String],
    pools: &[String],
    name: &str,
) -> Result<Method, Error> {
    if datasets.len() == 1 {
        return Ok(Method::Single);
    }
    if pools.len() > 1 {
        // Neither implementation snapshots across pools atomically.
        return Ok(Method::OneByOne);
    }
    if caps.multi_snapshot {
        return Ok(Method::Multi);
    }
    let parent = common_parent(datasets);
    let below = zfs.descendants(&parent)?;
    let set: BTreeSet<&str> = datasets.iter().map(String::as_str).collect();
    // A dataset between the parent and the set (an ancestor of one of them) is snapshotted
    // by the recursive call too, and destroyed again; any other is not ours to snapshot.
    let holds_one = |d: &str| {
        datasets
            .iter()
            .any(|s| s.strip_prefix(d).is_some_and(|rest| rest.starts_with('/')))
    };
    let mut between = Vec::new();
    for d in below
        .iter()
        .filter(|d| !set.contains(d.as_str()) && **d != parent)
    {
        if !holds_one(d) {
            return Ok(Method::OneByOne);
        }
        between.push(format!("{d}@{name}"));
    }
    let extra = (!set.contains(parent.as_str())).then(|| format!("{parent}@{name}"));
    Ok(Method::Recursive {
        parent,
        extra,
        between,
    })
}

/// The deepest dataset that is or contains every one of `datasets` (same pool assumed).
pub fn common_parent(datasets: &[String]) -> String {
    let mut prefix: Vec<&str> = datasets[0].split('/').collect();
    for d in &datasets[1..] {
        let parts: Vec<&str> = d.split('/').collect();
        let same = prefix
            .iter()
            .zip(&parts)
            .take_while(|(a, b)| a == b)
            .count();
        prefix.truncate(same);
    }
    prefix.join("/")
}

impl<'z> PreparedSnapshot<'z> {
    /// Adds or replaces a user property before [`take`](Self::take) (e.g. `frozen` once the
    /// freeze result is known). No `zfs` call.
    pub fn set_property(&mut self, key: &str, value: &str) -> Result<(), Error> {
        names::check_user_property(key, value)?;
        self.properties.retain(|(k, _)| k != key);
        self.properties.push((key.to_string(), value.to_string()));
        self.claims.retain(|(k, _)| k != key);
        Ok(())
    }

    /// A claim: `key` is created with `unproven` and set to `value` only by
    /// [`confirm_claims`](Self::confirm_claims), once the caller knows the snapshot
    /// returned while the guest was frozen. No `zfs` call.
    pub fn claim(&mut self, key: &str, unproven: &str, value: &str) -> Result<(), Error> {
        self.set_property(key, unproven)?;
        names::check_user_property(key, value)?;
        self.claims.push((key.to_string(), value.to_string()));
        Ok(())
    }

    /// Drops a claim: `key` keeps the value it is created with.
    pub fn drop_claim(&mut self, key: &str) {
        self.claims.retain(|(k, _)| k != key);
    }

    /// Writes the claims on every snapshot of the set (one `zfs set` per claim).
    pub fn confirm_claims(&self) -> Result<(), Error> {
        confirm_claims(self.zfs, &self.snapshots, &self.claims)
    }

    /// The snapshots the recursive call makes beyond the set: the parent's own, when it is
    /// not one of the datasets, and those of the datasets between.
    fn extra(&self) -> Vec<String> {
        match &self.method {
            Method::Recursive { extra, between, .. } => {
                extra.iter().chain(between).cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Properties for `zfs snapshot -o`, when this zfs takes them.
    fn inline_props(&self) -> &[(String, String)] {
        if self.caps.snapshot_props {
            &self.properties
        } else {
            &[]
        }
    }

    /// Runs the later calls (the snapshot, the claims, the finish) through `zfs` instead of
    /// the one the preflight ran on: e.g. a view whose cancel token a freeze window's owner
    /// holds, rather than the one a signal cancels at once.
    pub fn use_zfs(&mut self, zfs: &'z Zfs) {
        self.zfs = zfs;
    }

    /// Creates the snapshots: the one part meant for a freeze window. One `zfs` call unless
    /// the method is [`Method::OneByOne`]; on a failure there, what this call created is
    /// destroyed again and the error says so. So is what a `zfs snapshot` cut short (killed
    /// at its deadline, cancelled) created before it died.
    pub fn take(&self) -> Result<Taken, Error> {
        let start = Instant::now();
        let props = self.inline_props();
        let (names, recursive, mut created) = match &self.method {
            Method::Single | Method::Multi => {
                (self.snapshots.clone(), false, self.snapshots.clone())
            }
            Method::Recursive { parent, .. } => {
                let mut created = self.snapshots.clone();
                created.extend(self.extra());
                (vec![format!("{parent}@{}", self.name)], true, created)
            }
            Method::OneByOne => {
                let mut created: Vec<String> = Vec::new();
                for snapshot in &self.snapshots {
                    let one = std::slice::from_ref(snapshot);
                    if let Err(e) = self.zfs.snapshot(one, props, false) {
                        created.extend(self.created_anyway(&e, one));
                        return Err(self.undo(created, e, "taking the snapshots one by one"));
                    }
                    created.push(snapshot.clone());
                }
                return Ok(Taken {
                    created,
                    elapsed: start.elapsed(),
                    calls: self.snapshots.len(),
                });
            }
        };
        if let Err(e) = self.zfs.snapshot(&names, props, recursive) {
            created = self.created_anyway(&e, &created);
            return Err(if created.is_empty() {
                e
            } else {
                self.undo(created, e, "taking the snapshots")
            });
        }
        Ok(Taken {
            created,
            elapsed: start.elapsed(),
            calls: 1,
        })
    }

    /// Which of `attempted` a failed `zfs snapshot` created all the same: none, unless the
    /// call was cut short. OpenZFS's `zfs` dies only once its kernel call returns, so one
    /// look tells; zfs-fuse's `zfs` is a client of the daemon, which finishes a request
    /// whose client was killed on its own, later: its snapshots get [`ZFS_FUSE_SETTLE`] to
    /// show up.
    fn created_anyway(&self, error: &Error, attempted: &[String]) -> Vec<String> {
        if !matches!(error, Error::TimedOut { .. } | Error::Cancelled { .. }) {
            return Vec::new();
        }
        let zfs = self.zfs.for_cleanup();
        let settle = if self.caps.multi_snapshot {
            Duration::ZERO
        } else {
            ZFS_FUSE_SETTLE
        };
        let until = Instant::now() + settle;
        loop {
            match zfs.existing(attempted) {
                Ok(found) if found.len() == attempted.len() || Instant::now() >= until => {
                    return found
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => {
                    evesnap::warn!(
                        "cannot tell whether the cut short `zfs snapshot` created {}: {e}",
                        attempted.join(", ")
                    );
                    return Vec::new();
                }
            }
        }
    }

    fn undo(&self, created: Vec<String>, error: Error, what: &str) -> Error {
        let zfs = self.zfs.for_cleanup();
        let mut undone = Vec::new();
        let mut left = Vec::new();
        for snapshot in created.iter().rev() {
            match zfs.destroy_snapshot(snapshot) {
                Ok(()) => undone.push(snapshot.clone()),
                Err(e) => {
                    evesnap::warn!("cannot destroy {snapshot} after a failed snapshot: {e}");
                    left.push(snapshot.clone());
                }
            }
        }
        Error::Partial {
            what: what.to_string(),
            undone,
            left,
            source: Box::new(error),
        }
    }

    /// After the freeze window: destroys the recursive parent's own snapshot, sets the
    /// properties where `snapshot -o` is missing, and reads back guid, createtxg, creation.
    pub fn finish(&self, taken: Taken) -> Result<SnapshotReport, Error> {
        let mut left_behind = Vec::new();
        for extra in self.extra() {
            if let Err(e) = self.zfs.destroy_snapshot(&extra) {
                evesnap::warn!("cannot destroy {extra}, made by the recursive snapshot: {e}");
                left_behind.push(extra);
            }
        }
        let mut report = self.report(taken)?;
        report.left_behind = left_behind;
        Ok(report)
    }

    /// [`finish`](Self::finish) for a tool in a pipeline, which may still be inside the
    /// freeze window: what can wait (destroying a recursive parent's own snapshot) is left
    /// in `destroy_after_output` for [`destroy_after_output`] once the document is out.
    pub fn finish_for_output(&self, taken: Taken) -> Result<SnapshotReport, Error> {
        let mut report = self.report(taken)?;
        report.destroy_after_output = self.extra();
        Ok(report)
    }

    fn report(&self, taken: Taken) -> Result<SnapshotReport, Error> {
        if !self.caps.snapshot_props {
            self.zfs.set_each(&self.snapshots, &self.properties)?;
        }
        let info = self.zfs.snapshot_info(&self.snapshots, &[])?;
        let snapshots = info
            .into_iter()
            .map(|s| SnapshotEntry {
                name: s.name,
                guid: s.guid,
                createtxg: s.createtxg,
                creation: s.creation,
            })
            .collect();
        Ok(SnapshotReport {
            snapshots,
            atomic: self.method.atomic(),
            method: self.method.clone(),
            snapshot_ms: evesnap::time::millis(taken.elapsed),
            calls: taken.calls,
            properties: self.properties.iter().cloned().collect(),
            left_behind: Vec::new(),
            destroy_after_output: Vec::new(),
        })
    }

    /// [`take`](Self::take) then [`finish_for_output`](Self::finish_for_output).
    pub fn take_for_output(&self) -> Result<SnapshotReport, Error> {
        let taken = self.take()?;
        self.finish_for_output(taken)
    }
}

/// [`PreparedSnapshot::confirm_claims`] for a caller that no longer holds the prepared set
/// (a pipeline tool, after its document is out).
pub fn confirm_claims(
    zfs: &Zfs,
    snapshots: &[String],
    claims: &[(String, String)],
) -> Result<(), Error> {
    // Each claim is true once written, so a call cut short only under-claims.
    zfs.set_each(snapshots, claims)
}

/// Destroys what [`PreparedSnapshot::finish_for_output`] left for after the output.
pub fn destroy_after_output(zfs: &Zfs, snapshots: &[String]) -> Result<(), Error> {
    for snapshot in snapshots {
        zfs.destroy_snapshot(snapshot)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "take_tests.rs"]
mod tests;
