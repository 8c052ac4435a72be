//! The journal of a keep-newer switch: each change made, how to take it back, and taking
//! them all back after a failure (also of a call cut short that did its work anyway).

use evesnap::zfs::{Error, Zfs};

use super::KeepError;

/// A failed step: the call, as a command line, and its error.
pub(super) type Failed = (String, Error);

/// How long a call zfs calls busy is retried: zfs-fuse calls a filesystem it has just
/// mounted or unmounted busy for a moment (docs/lab.md#zfs-fuse); one in use stays busy.
const BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `call`, again while it fails with [`Error::Busy`], for up to [`BUSY_RETRY`].
pub(super) fn patiently(mut call: impl FnMut() -> Result<(), Error>) -> Result<(), Error> {
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
pub(super) enum Done {
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

/// Journals a change that was made; for a failed call, checks whether it was made anyway
/// (a call cut short may have finished in the kernel) and journals it then.
pub(super) fn record(
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
pub(super) fn undo(
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
