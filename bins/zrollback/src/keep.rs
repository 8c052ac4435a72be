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
use serde::Serialize;

/// Infix of a kept state's name: `<dataset>.evesnap-kept-<YYYYMMDD-HHMMSSmmm>`.
pub const KEPT_INFIX: &str = ".evesnap-kept-";
/// Infix of the temporary clone's name, renamed to the dataset's at the end.
pub const NEW_INFIX: &str = ".evesnap-new-";

/// One dataset's switch to the data of `to`.
#[derive(Debug, Clone, Serialize)]
pub struct Switch {
    pub dataset: String,
    /// `dataset@name`, or `<kept state>@name` to roll forward.
    pub to: String,
    /// Where the dataset's current state goes.
    pub kept_as: String,
    /// The temporary clone that becomes `dataset`.
    pub clone: String,
    /// The clone's `refreservation` (a thick volume's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refreservation: Option<u64>,
    /// The dataset is a volume (checked for users before anything changes).
    pub volume: bool,
    /// `dataset` and its kept states: the clone is promoted while its origin is one of them.
    pub family: Vec<String>,
}

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

/// How long a call zfs calls busy is retried: zfs-fuse calls a filesystem it has just
/// mounted or unmounted busy for a moment (docs/lab.md#zfs-fuse); one in use stays busy.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `call`, again while it fails with [`Error::Busy`], for up to [`BUSY_RETRY`].
fn patiently(mut call: impl FnMut() -> Result<(), Error>) -> Result<(), Error> {
    let until = std::time::Instant::now() + BUSY_RETRY;
    loop {
        match call() {
            Err(Error::Busy { .. }) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            result => return result,
        }
    }
}

/// A change made, and how to take it back.
#[derive(Debug, Clone)]
enum Done {
    Cloned(String),
    Promoted { clone: String, demoted: String },
    Unmounted(String),
    Renamed { from: String, to: String },
    Mounted(String),
}

impl Done {
    fn undo(&self, zfs: &Zfs) -> Result<(), Error> {
        patiently(|| match self {
            Done::Cloned(clone) => zfs.destroy_dataset(clone),
            Done::Promoted { demoted, .. } => zfs.promote(demoted),
            Done::Unmounted(fs) => zfs.mount(fs),
            Done::Renamed { from, to } => zfs.rename(to, from),
            Done::Mounted(fs) => zfs.unmount(fs),
        })
    }

    fn describe(&self) -> String {
        match self {
            Done::Cloned(clone) => format!("created {clone}"),
            Done::Promoted { clone, demoted } => format!("promoted {clone} over {demoted}"),
            Done::Unmounted(fs) => format!("unmounted {fs}"),
            Done::Renamed { from, to } => format!("renamed {from} to {to}"),
            Done::Mounted(fs) => format!("mounted {fs}"),
        }
    }
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

type Failed = (String, Error);

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

/// Journals a change that was made; for a failed call, checks whether it was made anyway
/// (a call cut short may have finished in the kernel) and journals it then.
fn record(
    zfs: &Zfs,
    journal: &mut Vec<Done>,
    result: Result<(), Error>,
    done: Done,
    step: String,
) -> Result<(), Failed> {
    match result {
        Ok(()) => {
            journal.push(done);
            Ok(())
        }
        Err(e) => {
            if took_effect(&zfs.for_cleanup(), &done) {
                journal.push(done);
            }
            Err((step, e))
        }
    }
}

/// Whether a change a failed call was to make is there (unknown counts as not made).
fn took_effect(zfs: &Zfs, done: &Done) -> bool {
    let lineage = |d: &str| zfs.lineage(d).ok().flatten();
    match done {
        Done::Cloned(clone) => lineage(clone).is_some(),
        // After a promote, the demoted dataset is a clone of the promoted one.
        Done::Promoted { clone, demoted } => {
            lineage(demoted).is_some_and(|l| l.origin_dataset() == Some(clone.as_str()))
        }
        Done::Unmounted(fs) => lineage(fs).is_some_and(|l| !l.mounted),
        Done::Renamed { from, to } => lineage(to).is_some() && lineage(from).is_none(),
        Done::Mounted(fs) => lineage(fs).is_some_and(|l| l.mounted),
    }
}

/// Takes the journal back, newest first, with calls no signal cuts short.
fn undo(
    zfs: &Zfs,
    mut journal: Vec<Done>,
    dataset: &str,
    step: String,
    source: Error,
) -> KeepError {
    let zfs = zfs.for_cleanup();
    while let Some(done) = journal.pop() {
        if let Err(undo_error) = done.undo(&zfs) {
            journal.push(done.clone());
            let left = journal
                .iter()
                .map(Done::describe)
                .collect::<Vec<_>>()
                .join(", ");
            let undo_error = evesnap::exit::chain_of(&undo_error);
            evesnap::note!("undoing `{}` failed: {undo_error}", done.describe());
            return KeepError::UndoFailed {
                dataset: dataset.to_string(),
                step,
                cause: evesnap::exit::chain_of(&source),
                undo_step: done.describe(),
                undo_error,
                left,
            };
        }
    }
    let busy = matches!(source, Error::Busy { .. })
        || source.failure().is_some_and(|f| f.stderr.contains("busy"));
    let hint = if busy {
        " (something uses it: a VM with the volume open, a process in the mounted filesystem; \
         stop the VM)"
    } else {
        ""
    };
    KeepError::Undone {
        dataset: dataset.to_string(),
        step,
        hint,
        source,
    }
}
