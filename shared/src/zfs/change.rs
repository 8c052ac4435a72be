//! What the zfs layer changes: snapshots taken, properties set, snapshots and bookmarks
//! destroyed, rollbacks. Names and properties are checked before anything runs.

use super::{args, names, Error, Output, Zfs};

impl Zfs {
    /// One `zfs snapshot [-r] [-o k=v]... <names>` call. Names and properties are checked
    /// first; several names need [`super::Capabilities::multi_snapshot`].
    pub fn snapshot(
        &self,
        snapshots: &[String],
        props: &[(String, String)],
        recursive: bool,
    ) -> Result<Output, Error> {
        for name in snapshots {
            names::split_snapshot(name)?;
        }
        for (k, v) in props {
            names::check_user_property(k, v)?;
        }
        let first = snapshots.first().ok_or_else(|| Error::InvalidName {
            name: String::new(),
            reason: "no snapshot to take".into(),
        })?;
        let caps = self.capabilities()?;
        if snapshots.len() > 1 && !caps.multi_snapshot {
            return Err(Error::Unsupported(
                "take several snapshots in one call".into(),
            ));
        }
        let mut argv = args(&["snapshot"]);
        if recursive {
            argv.push("-r".into());
        }
        for (k, v) in props {
            argv.push("-o".into());
            argv.push(format!("{k}={v}"));
        }
        argv.extend(snapshots.iter().cloned());
        self.run(&argv, first)
    }

    /// `zfs set k=v... <snapshot>` (for a zfs without `snapshot -o`).
    pub fn set(&self, name: &str, props: &[(String, String)]) -> Result<(), Error> {
        let mut argv = args(&["set"]);
        for (k, v) in props {
            names::check_user_property(k, v)?;
            argv.push(format!("{k}={v}"));
        }
        argv.push(name.to_string());
        self.run(&argv, name).map(drop)
    }

    /// `zfs destroy <snapshot>` (one snapshot; never `-r`/`-R`).
    pub fn destroy_snapshot(&self, snapshot: &str) -> Result<(), Error> {
        names::split_snapshot(snapshot)?;
        self.run(&args(&["destroy", snapshot]), snapshot).map(drop)
    }

    /// `zfs destroy <dataset#bookmark>`.
    pub fn destroy_bookmark(&self, bookmark: &str) -> Result<(), Error> {
        let Some((dataset, short)) = bookmark.split_once('#') else {
            return Err(Error::InvalidName {
                name: bookmark.into(),
                reason: "a bookmark name has the form dataset#name".into(),
            });
        };
        names::check_dataset(dataset)?;
        names::check_snapshot_name(short).map_err(|_| Error::InvalidName {
            name: bookmark.into(),
            reason: "invalid bookmark name".into(),
        })?;
        self.run(&args(&["destroy", bookmark]), bookmark).map(drop)
    }

    /// `zfs rollback <snapshot>` (the latest snapshot only; never `-r`/`-R`).
    pub fn rollback(&self, snapshot: &str) -> Result<(), Error> {
        names::split_snapshot(snapshot)?;
        self.run(&args(&["rollback", snapshot]), snapshot).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zfs::Capabilities;

    #[test]
    fn names_are_checked_before_running() {
        // The program does not exist: reaching it would be a Spawn error.
        let zfs = Zfs::with_path("/nonexistent/zfs").with_capabilities(Capabilities::ZFS_FUSE);
        assert!(matches!(
            zfs.snapshot(&["p/a@-r".into()], &[], false),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            zfs.destroy_snapshot("p/a"),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(zfs.rollback("-R"), Err(Error::InvalidName { .. })));
        assert!(matches!(
            zfs.snapshots("p/a b", &[]),
            Err(Error::InvalidName { .. })
        ));
        let props = vec![("bad".to_string(), "1".to_string())];
        assert!(matches!(
            zfs.snapshot(&["p/a@s".into()], &props, false),
            Err(Error::InvalidProperty { .. })
        ));
    }
}
