//! `--keep-newer`: a rollback that keeps the newer snapshots, so that one can roll forward
//! again.
//!
//! `zfs rollback` destroys every snapshot newer than its target. Instead, for each dataset
//! `D` and target `X@s` (`X` is `D`, or to roll forward a kept state of `D`):
//!
//! 1. `zfs clone [-o refreservation=R] X@s D.evesnap-new-<stamp>` (a thick volume's clone
//!    would be sparse: it gets `D`'s `refreservation`);
//! 2. `zfs unmount` the clone, `D` and `D`'s kept states where mounted (never forced: a
//!    filesystem in use fails here; zfs-fuse renames no mounted filesystem, and keeps one
//!    promoted over while mounted busy for seconds);
//! 3. `zfs promote` the clone while its origin is `D` or one of `D`'s kept states: it takes
//!    the snapshots up to `s`, so `D`'s name ends up owning its whole history again;
//! 4. `zfs rename D D.evesnap-kept-<stamp>`, `zfs rename` the clone to `D`;
//! 5. `zfs mount` both where `D` was mounted, and the kept states unmounted in 2.
//!
//! `D` then holds `s`'s data and the snapshots up to `s`; its previous state (its data and
//! the snapshots newer than `s`, holds and properties with them) is the clone of `D@s`
//! named `D.evesnap-kept-<stamp>` beside it, which `zfs destroy -r` drops when not needed.
//! Every step is journalled; a failure undoes the journal in reverse (mount ↔ unmount,
//! rename back, promote back, destroy the clone), across all datasets, so each is left as it
//! was. A call cut short (deadline, signal) is checked for what it did before undoing.

use evesnap::exit::{Exit, HasExit};
use evesnap::steps::{KeptState, RollbackReport, RolledBack};
use evesnap::zfs::{self, names, Error, Lineage, Problem, Zfs};

mod journal;

use journal::{patiently, record, undo, Done, Failed};

/// Infix of a kept state's name: `<dataset>.evesnap-kept-<YYYYMMDD-HHMMSSmmm>`.
pub const KEPT_INFIX: &str = ".evesnap-kept-";
/// Infix of the temporary clone's name, renamed to the dataset's at the end.
pub const NEW_INFIX: &str = ".evesnap-new-";

pub use evesnap::steps::Switch;

/// Plans switching each dataset to `@name`, found on the dataset itself or, to roll forward,
/// on exactly one of its kept states. Checks names, the room a thick volume's
/// `refreservation` needs again, and that the new names are free.
pub fn plan(zfs: &Zfs, datasets: &[String], name: &str) -> Result<Vec<Switch>, Error> {
    let datasets = names::check_set(datasets, name)?;
    let stamp = evesnap::time::now_eve_timestamp();
    let mut problems = Vec::new();
    let mut switches = Vec::new();
    let mut needed_in_pool: std::collections::BTreeMap<&str, u64> = Default::default();
    for d in &datasets {
        let Some((parent, _)) = d.rsplit_once('/') else {
            return Err(Error::Unsupported(format!(
                "keep the newer snapshots of {d}: a pool's root dataset cannot be renamed"
            )));
        };
        let siblings = match zfs.descendants(parent) {
            Ok(s) => s,
            Err(Error::DoesNotExist { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let named = |infix: &str| -> Vec<String> {
            siblings
                .iter()
                .filter(|c| {
                    c.strip_prefix(d.as_str())
                        .and_then(|rest| rest.strip_prefix(infix))
                        .is_some_and(|stamp| !stamp.contains('/'))
                })
                .cloned()
                .collect()
        };
        // A run killed half way (nothing undoes a SIGKILL) left its clone: repair first.
        let leftovers = named(NEW_INFIX);
        if !leftovers.is_empty() {
            problems.push(Problem::Interrupted {
                dataset: d.clone(),
                clones: leftovers,
            });
            continue;
        }
        let Some(lineage) = zfs.lineage(d)? else {
            problems.push(Problem::Missing { dataset: d.clone() });
            continue;
        };
        let kept = named(KEPT_INFIX);
        let mut found = Vec::new();
        for place in std::iter::once(d).chain(&kept) {
            let wanted = format!("{place}@{name}");
            if zfs.snapshots(place, &[])?.iter().any(|s| s.name == wanted) {
                found.push(wanted);
            }
        }
        let to = match found.len() {
            0 => {
                problems.push(Problem::NoSuchSnapshot {
                    snapshot: format!("{d}@{name}"),
                });
                continue;
            }
            1 => found.remove(0),
            _ => {
                problems.push(Problem::Ambiguous {
                    snapshot: name.to_string(),
                    found,
                });
                continue;
            }
        };
        let kept_as = format!("{d}{KEPT_INFIX}{stamp}");
        let clone = format!("{d}{NEW_INFIX}{stamp}");
        for new in [&kept_as, &clone] {
            names::check_dataset(new)?;
            if zfs.lineage(new)?.is_some() {
                problems.push(Problem::DatasetExists {
                    dataset: new.clone(),
                });
            }
        }
        let refreservation =
            (lineage.is_volume() && lineage.refreservation > 0).then_some(lineage.refreservation);
        if let Some(bytes) = refreservation {
            let needed = needed_in_pool.entry(zfs::pool_of(d)).or_default();
            *needed += bytes;
            let available = lineage
                .available
                .saturating_sub(lineage.usedbyrefreservation);
            if *needed > available {
                problems.push(Problem::NoRoomToKeep {
                    dataset: d.clone(),
                    needed: *needed,
                    available,
                    missing: *needed - available,
                });
            }
        }
        switches.push(Switch {
            dataset: d.clone(),
            to,
            kept_as,
            clone,
            refreservation,
            volume: lineage.is_volume(),
            family: std::iter::once(d.clone()).chain(kept).collect(),
        });
    }
    if !problems.is_empty() {
        return Err(Error::Preflight { problems });
    }
    Ok(switches)
}

/// A switch failed; what was done was undone, or could not be.
#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    #[error("{dataset} is in use ({}): its state would stay with whoever has it open; stop the VM (nothing was changed)", users.join("; "))]
    InUse { dataset: String, users: Vec<String> },
    #[error("keeping the newer snapshots of {dataset} failed at `{step}`{hint}; everything done was undone, every dataset is as it was")]
    Undone {
        dataset: String,
        step: String,
        /// What a busy dataset most likely means.
        hint: &'static str,
        #[source]
        source: Error,
    },
    #[error(
        "keeping the newer snapshots of {dataset} failed at `{step}` ({cause}), and undoing it \
         failed at `{undo_step}` ({undo_error}); still done, to repair by hand: {left}"
    )]
    UndoFailed {
        dataset: String,
        step: String,
        /// The failure's error chain.
        cause: String,
        undo_step: String,
        /// The undo's error chain.
        undo_error: String,
        left: String,
    },
}

impl HasExit for KeepError {
    fn exit(&self) -> Exit {
        match self {
            KeepError::Undone { source, .. } => source.exit(),
            KeepError::UndoFailed { .. } => Exit::StepFailed,
            KeepError::InUse { .. } => Exit::Preflight,
        }
    }
}

/// Carries out the switches, all or none; first checks that no volume is in use here.
pub fn execute(zfs: &Zfs, switches: &[Switch]) -> Result<RollbackReport, Box<KeepError>> {
    for switch in switches.iter().filter(|s| s.volume) {
        let users = crate::in_use::zvol_users(&switch.dataset);
        if !users.is_empty() {
            return Err(Box::new(KeepError::InUse {
                dataset: switch.dataset.clone(),
                users,
            }));
        }
    }
    let mut journal = Vec::new();
    for switch in switches {
        if let Err((step, source)) = switch_one(zfs, switch, &mut journal) {
            return Err(Box::new(undo(zfs, journal, &switch.dataset, step, source)));
        }
    }
    let mut report = RollbackReport::default();
    for switch in switches {
        report.rolled_back.push(RolledBack {
            dataset: switch.dataset.clone(),
            to: switch.to.clone(),
        });
        // The switch is done: a failure to list is reported as an empty list, not undone.
        let snapshots = zfs
            .snapshots(&switch.kept_as, &[])
            .map(|s| s.into_iter().map(|s| s.name).collect())
            .unwrap_or_default();
        report.kept.push(KeptState {
            dataset: switch.dataset.clone(),
            kept_as: switch.kept_as.clone(),
            snapshots,
        });
    }
    Ok(report)
}

fn switch_one(zfs: &Zfs, s: &Switch, journal: &mut Vec<Done>) -> Result<(), Failed> {
    let step = |argv: &[&str]| format!("zfs {}", argv.join(" "));
    // 1. The clone.
    let reservation = s.refreservation.map(|r| format!("refreservation={r}"));
    let mut argv = vec!["clone"];
    if let Some(r) = &reservation {
        argv.extend(["-o", r]);
    }
    argv.extend([s.to.as_str(), s.clone.as_str()]);
    let result = zfs.clone_snapshot(&s.to, &s.clone, s.refreservation);
    record(
        zfs,
        journal,
        result,
        Done::Cloned(s.clone.clone()),
        step(&argv),
    )?;
    // 2. Unmount the clone, the dataset and its kept states: zfs-fuse keeps a filesystem
    //    promoted over while mounted busy for seconds (measured: up to 28 s).
    let (mut remount, mut dataset_mounted) = (Vec::new(), false);
    for fs in std::iter::once(&s.clone).chain(&s.family) {
        if lineage_of(zfs, fs)?.mounted {
            dataset_mounted |= *fs == s.dataset;
            let result = patiently(|| zfs.unmount(fs));
            let done = Done::Unmounted(fs.clone());
            record(zfs, journal, result, done, step(&["unmount", fs]))?;
            if *fs != s.clone && *fs != s.dataset {
                remount.push(fs);
            }
        }
    }
    // 3. Promote the clone over the dataset and its kept states.
    for _ in 0..=s.family.len() {
        let origin = lineage_of(zfs, &s.clone)?;
        let Some(demoted) = origin
            .origin_dataset()
            .filter(|o| s.family.iter().any(|f| f == o))
        else {
            break;
        };
        let demoted = demoted.to_string();
        let result = zfs.promote(&s.clone);
        let done = Done::Promoted {
            clone: s.clone.clone(),
            demoted,
        };
        record(zfs, journal, result, done, step(&["promote", &s.clone]))?;
    }
    // 4. Rename, 5. mount what was mounted.
    for (from, to) in [(&s.dataset, &s.kept_as), (&s.clone, &s.dataset)] {
        let result = patiently(|| zfs.rename(from, to));
        let done = Done::Renamed {
            from: from.clone(),
            to: to.clone(),
        };
        record(zfs, journal, result, done, step(&["rename", from, to]))?;
    }
    let mounts = if dataset_mounted {
        vec![&s.dataset, &s.kept_as]
    } else {
        Vec::new()
    };
    for fs in mounts.into_iter().chain(remount) {
        let result = patiently(|| zfs.mount(fs));
        let done = Done::Mounted(fs.clone());
        record(zfs, journal, result, done, step(&["mount", fs]))?;
    }
    Ok(())
}

fn lineage_of(zfs: &Zfs, dataset: &str) -> Result<Lineage, Failed> {
    let step = format!("zfs get {dataset}");
    match zfs.lineage(dataset) {
        Ok(Some(l)) => Ok(l),
        Ok(None) => Err((
            step,
            Error::BadOutput {
                command: "zfs get".into(),
                detail: format!("{dataset} does not exist any more"),
            },
        )),
        Err(e) => Err((step, e)),
    }
}
