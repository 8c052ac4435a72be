//! What the zfs layer changes: snapshots taken, properties set, snapshots and bookmarks
//! destroyed, rollbacks, and the clone/promote/rename/mount calls of a rollback that keeps
//! the newer snapshots. Names and properties are checked before anything runs.

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

    /// Sets `props` on every one of `names`: one `zfs set k=v... <name>...` call where the
    /// zfs takes several names ([`super::Capabilities::multi_snapshot`]: OpenZFS 2.x takes
    /// several properties and names in one `zfs set`), else one call per property and name
    /// (zfs-fuse's `zfs set` takes one of each). Each call is a transaction-group sync on a
    /// pool shared by every VM of the node, so fewer calls keep other VMs' freezes short.
    pub fn set_each(&self, names: &[String], props: &[(String, String)]) -> Result<(), Error> {
        for (k, v) in props {
            names::check_user_property(k, v)?;
        }
        let (Some(first), false) = (names.first(), props.is_empty()) else {
            return Ok(());
        };
        if self.capabilities()?.multi_snapshot {
            let mut argv = args(&["set"]);
            argv.extend(props.iter().map(|(k, v)| format!("{k}={v}")));
            argv.extend(names.iter().cloned());
            return self.run(&argv, first).map(drop);
        }
        for name in names {
            for prop in props {
                self.set(name, std::slice::from_ref(prop))?;
            }
        }
        Ok(())
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

impl Zfs {
    /// `zfs clone [-o refreservation=N] <snapshot> <target>` (`refreservation`: for a thick
    /// volume, whose clone is otherwise sparse).
    pub fn clone_snapshot(
        &self,
        snapshot: &str,
        target: &str,
        refreservation: Option<u64>,
    ) -> Result<(), Error> {
        names::split_snapshot(snapshot)?;
        names::check_dataset(target)?;
        let mut argv = args(&["clone"]);
        if let Some(bytes) = refreservation {
            argv.push("-o".into());
            argv.push(format!("refreservation={bytes}"));
        }
        argv.push(snapshot.into());
        argv.push(target.into());
        self.run(&argv, target).map(drop)
    }

    /// `zfs promote <clone>`: the clone takes its origin's snapshots up to the origin.
    pub fn promote(&self, clone: &str) -> Result<(), Error> {
        names::check_dataset(clone)?;
        self.run(&args(&["promote", clone]), clone).map(drop)
    }

    /// `zfs rename <from> <to>` (filesystems and volumes; never `-f`, `-p` or `-r`).
    pub fn rename(&self, from: &str, to: &str) -> Result<(), Error> {
        names::check_dataset(from)?;
        names::check_dataset(to)?;
        self.run(&args(&["rename", from, to]), from).map(drop)
    }

    /// `zfs mount <filesystem>`.
    pub fn mount(&self, filesystem: &str) -> Result<(), Error> {
        names::check_dataset(filesystem)?;
        self.run(&args(&["mount", filesystem]), filesystem)
            .map(drop)
    }

    /// `zfs unmount <filesystem>` (never `-f`: a filesystem in use stays mounted and the call
    /// fails).
    pub fn unmount(&self, filesystem: &str) -> Result<(), Error> {
        names::check_dataset(filesystem)?;
        self.run(&args(&["unmount", filesystem]), filesystem)
            .map(drop)
    }

    /// `zfs destroy <filesystem|volume>` (never `-r`/`-R`: one with snapshots or clones
    /// stays and the call fails).
    pub fn destroy_dataset(&self, dataset: &str) -> Result<(), Error> {
        names::check_dataset(dataset)?;
        self.run(&args(&["destroy", dataset]), dataset).map(drop)
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
            zfs.rename("p/a", "-f"),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            zfs.clone_snapshot("p/a", "p/b", None),
            Err(Error::InvalidName { .. })
        ));
        assert!(matches!(
            zfs.promote("p/a@s"),
            Err(Error::InvalidName { .. })
        ));
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
