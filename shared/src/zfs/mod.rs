//! The zfs layer: runs the `zfs` program (argv, never a shell), parses its `-H -p` output
//! and turns its failures into typed [`Error`]s.
//!
//! Two implementations are targeted: OpenZFS 2.1–2.3 (production) and zfs-fuse 0.7 (what
//! the tests run against). They differ in what a call may ask for; [`Zfs::capabilities`]
//! probes the installed program once instead of guessing:
//!
//! | capability                 | OpenZFS 2.x | zfs-fuse 0.7 | probe                                   |
//! |----------------------------|-------------|--------------|-----------------------------------------|
//! | `multi_snapshot` (`a@s b@s`, atomic) | yes | no          | `zfs snapshot` usage ends in `...`      |
//! | `snapshot_props` (`snapshot -o k=v`) | yes | yes         | `zfs snapshot` usage has `-o`           |
//! | `list_parsable` (`zfs list -p`)      | yes | no (exit 2) | `zfs list -H -p -o name -d 0`           |
//!
//! Where `zfs list -p` is missing, the same facts come from `zfs get -H -p`, which both have.
//! Holds are read from `userrefs` (zfs-fuse has no working `zfs holds`), clones from the
//! `origin` of every dataset in the pool (zfs-fuse has no `clones` property).

mod error;
pub mod names;
pub mod parse;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use error::{classify, Error, Failure, Problem};

/// The environment variable naming the `zfs` program.
pub const ENV: &str = "EVESNAP_ZFS";

/// What the installed `zfs` can do; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capabilities {
    /// `zfs snapshot a@s b@s ...` (atomic, one transaction group).
    pub multi_snapshot: bool,
    /// `zfs snapshot -o property=value`.
    pub snapshot_props: bool,
    /// `zfs list -p`.
    pub list_parsable: bool,
}

impl Capabilities {
    /// OpenZFS 2.x.
    pub const OPENZFS: Capabilities = Capabilities {
        multi_snapshot: true,
        snapshot_props: true,
        list_parsable: true,
    };
    /// zfs-fuse 0.7.
    pub const ZFS_FUSE: Capabilities = Capabilities {
        multi_snapshot: false,
        snapshot_props: true,
        list_parsable: false,
    };
}

/// The `zfs` program and what it can do.
#[derive(Debug)]
pub struct Zfs {
    program: PathBuf,
    caps: OnceLock<Capabilities>,
}

/// Output of one successful run.
#[derive(Debug, Clone)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Space facts of a filesystem or volume, from `zfs get -H -p`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Space {
    pub dataset: String,
    /// `filesystem` or `volume`.
    pub kind: String,
    pub available: u64,
    pub referenced: u64,
    /// Bytes only this dataset holds (`usedbydataset`).
    pub unique: u64,
    pub refreservation: u64,
    pub usedbyrefreservation: u64,
}

impl Space {
    pub(crate) const PROPS: &'static [&'static str] = &[
        "type",
        "available",
        "referenced",
        "usedbydataset",
        "refreservation",
        "usedbyrefreservation",
    ];

    /// Bytes a new snapshot of this dataset needs outside its own reservation: ZFS
    /// (`dsl_dataset_snapshot_check`) requires `min(unique, refreservation)` to be free,
    /// because the reservation must stay guaranteed once those blocks are shared with the
    /// snapshot. Zero without a `refreservation`.
    pub fn snapshot_needs(&self) -> u64 {
        self.unique.min(self.refreservation)
    }

    /// Bytes available outside this dataset's unused reservation.
    pub fn available_outside_reservation(&self) -> u64 {
        self.available.saturating_sub(self.usedbyrefreservation)
    }
}

/// One snapshot and its properties.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotInfo {
    /// `dataset@name`.
    pub name: String,
    /// Exact, as a string: JSON readers that use doubles (jq, JavaScript) corrupt 64-bit guids.
    pub guid: String,
    pub createtxg: u64,
    /// Seconds since the epoch.
    pub creation: u64,
    /// Number of holds.
    #[serde(default)]
    pub userrefs: u64,
    #[serde(default)]
    pub used: u64,
    #[serde(default)]
    pub referenced: u64,
    /// The user properties asked for that are set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

impl SnapshotInfo {
    const PROPS: &'static [&'static str] = &[
        "guid",
        "createtxg",
        "creation",
        "userrefs",
        "used",
        "referenced",
    ];

    pub fn dataset(&self) -> &str {
        self.name
            .split_once('@')
            .map_or(self.name.as_str(), |(d, _)| d)
    }

    pub fn short_name(&self) -> &str {
        self.name.split_once('@').map_or("", |(_, s)| s)
    }

    fn from_props(
        command: &str,
        name: &str,
        props: &BTreeMap<String, Option<String>>,
        user: &[&str],
    ) -> Result<Self, Error> {
        let get = |p: &str| props.get(p).and_then(|v| v.as_deref());
        let required = |p: &str| -> Result<u64, Error> {
            parse::number(command, p, get(p))?.ok_or_else(|| Error::BadOutput {
                command: command.to_string(),
                detail: format!("{name} has no {p}"),
            })
        };
        Ok(SnapshotInfo {
            name: name.to_string(),
            guid: required("guid")?.to_string(),
            createtxg: required("createtxg")?,
            creation: required("creation")?,
            userrefs: parse::number(command, "userrefs", get("userrefs"))?.unwrap_or(0),
            used: parse::number(command, "used", get("used"))?.unwrap_or(0),
            referenced: parse::number(command, "referenced", get("referenced"))?.unwrap_or(0),
            properties: user
                .iter()
                .filter_map(|p| get(p).map(|v| (p.to_string(), v.to_string())))
                .collect(),
        })
    }
}

impl Zfs {
    /// The program given (`--zfs`), else `$EVESNAP_ZFS`, else `zfs` on `PATH`.
    pub fn locate(explicit: Option<&Path>) -> Result<Zfs, Error> {
        if let Some(path) = explicit {
            return Ok(Zfs::with_path(path));
        }
        if let Some(path) = std::env::var_os(ENV).filter(|v| !v.is_empty()) {
            return Ok(Zfs::with_path(path));
        }
        // Debian keeps zfs in /usr/sbin, which a user's PATH may lack.
        let path = which::which("zfs")
            .or_else(|e| {
                ["/usr/sbin/zfs", "/sbin/zfs", "/usr/local/sbin/zfs"]
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.is_file())
                    .ok_or(e)
            })
            .map_err(Error::NotInstalled)?;
        Ok(Zfs::with_path(path))
    }

    pub fn with_path(program: impl Into<PathBuf>) -> Zfs {
        Zfs {
            program: program.into(),
            caps: OnceLock::new(),
        }
    }

    /// Fixes the capabilities instead of probing (tests, or a caller that knows).
    pub fn with_capabilities(self, caps: Capabilities) -> Zfs {
        let _ = self.caps.set(caps);
        self
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Runs `zfs <args>`, collecting stdout and stderr (both read as they come, so neither
    /// pipe can fill up and block the child). A non-zero exit is a [`Failure`].
    pub fn run_raw(&self, args: &[String]) -> Result<Result<Output, Failure>, Error> {
        let start = Instant::now();
        let output = Command::new(&self.program)
            .args(args)
            // Messages are matched by text: keep them untranslated.
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| Error::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let status = output.status;
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if status.success() {
            return Ok(Ok(Output {
                stdout,
                stderr,
                elapsed: start.elapsed(),
            }));
        }
        let mut argv = vec![self.program.display().to_string()];
        argv.extend(args.iter().cloned());
        Ok(Err(Failure {
            argv,
            status: status.code(),
            stderr,
            stdout,
        }))
    }

    /// Runs `zfs <args>`; a failure becomes a typed error about `subject`.
    pub fn run(&self, args: &[String], subject: &str) -> Result<Output, Error> {
        self.run_raw(args)?.map_err(|f| classify(f, subject))
    }

    /// Probes (once) what this `zfs` can do.
    pub fn capabilities(&self) -> Result<Capabilities, Error> {
        if let Some(caps) = self.caps.get() {
            return Ok(*caps);
        }
        // `zfs snapshot` without an argument prints its usage and exits 2.
        let usage = match self.run_raw(&args(&["snapshot"]))? {
            Ok(out) => out.stderr,
            Err(f) if f.status == Some(2) => f.stderr,
            Err(f) => return Err(Error::Failed(Box::new(f))),
        };
        if !usage.contains("snapshot") {
            return Err(Error::BadOutput {
                command: "zfs snapshot".into(),
                detail: format!("no usage text: {:?}", usage.trim()),
            });
        }
        let list_parsable =
            match self.run_raw(&args(&["list", "-H", "-p", "-o", "name", "-d", "0"]))? {
                Ok(_) => true,
                Err(f) if f.status == Some(2) => false,
                Err(f) => return Err(Error::Failed(Box::new(f))),
            };
        let caps = Capabilities {
            multi_snapshot: parse::usage_snapshot_multi(&usage),
            snapshot_props: parse::usage_snapshot_props(&usage),
            list_parsable,
        };
        Ok(*self.caps.get_or_init(|| caps))
    }

    /// `zfs get -H -p -o name,property,value <props> <names>`; names that do not exist are
    /// returned apart instead of failing the call.
    pub fn get(
        &self,
        names: &[String],
        props: &[&str],
    ) -> Result<(parse::Table, Vec<String>), Error> {
        if names.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut argv = args(&[
            "get",
            "-H",
            "-p",
            "-o",
            "name,property,value",
            &props.join(","),
        ]);
        argv.extend(names.iter().cloned());
        let (stdout, missing) = match self.run_raw(&argv)? {
            Ok(out) => (out.stdout, Vec::new()),
            Err(f) => match parse::only_missing(&f.stderr) {
                Some(missing) if f.status == Some(1) => (f.stdout, missing),
                _ => return Err(classify(f, &names[0])),
            },
        };
        Ok((parse::pivot(parse::get_rows("zfs get", &stdout)?), missing))
    }

    /// Space facts of filesystems/volumes; the missing ones apart.
    pub fn space(&self, datasets: &[String]) -> Result<(Vec<Space>, Vec<String>), Error> {
        let (table, missing) = self.get(datasets, Space::PROPS)?;
        let cmd = "zfs get";
        let mut out = Vec::new();
        for (name, props) in &table {
            let get = |p: &str| props.get(p).and_then(|v| v.as_deref());
            let num = |p: &str| parse::number(cmd, p, get(p)).map(Option::unwrap_or_default);
            out.push(Space {
                dataset: name.clone(),
                kind: get("type").unwrap_or("-").to_string(),
                available: num("available")?,
                referenced: num("referenced")?,
                unique: parse::number(cmd, "usedbydataset", get("usedbydataset"))?
                    .unwrap_or(num("referenced")?),
                refreservation: num("refreservation")?,
                usedbyrefreservation: num("usedbyrefreservation")?,
            });
        }
        Ok((out, missing))
    }

    /// Which of these full snapshot names exist.
    pub fn existing(&self, snapshots: &[String]) -> Result<Vec<String>, Error> {
        let (table, _) = self.get(snapshots, &["type"])?;
        Ok(table.into_iter().map(|(name, _)| name).collect())
    }

    /// Facts about the named snapshots, in the order given; `user` names the user properties
    /// to read as well.
    pub fn snapshot_info(
        &self,
        snapshots: &[String],
        user: &[&str],
    ) -> Result<Vec<SnapshotInfo>, Error> {
        let mut props: Vec<&str> = SnapshotInfo::PROPS.to_vec();
        props.extend_from_slice(user);
        let (table, missing) = self.get(snapshots, &props)?;
        if let Some(name) = missing.first() {
            return Err(Error::BadOutput {
                command: "zfs get".into(),
                detail: format!("{name} vanished"),
            });
        }
        let by_name: BTreeMap<&String, &BTreeMap<String, Option<String>>> =
            table.iter().map(|(n, p)| (n, p)).collect();
        snapshots
            .iter()
            .map(|name| match by_name.get(name) {
                Some(p) => SnapshotInfo::from_props("zfs get", name, p, user),
                None => Err(Error::BadOutput {
                    command: "zfs get".into(),
                    detail: format!("no output for {name}"),
                }),
            })
            .collect()
    }

    /// The snapshots of one dataset, oldest first (by `createtxg`: `creation` ties within a
    /// second), with the user properties named in `user`.
    pub fn snapshots(&self, dataset: &str, user: &[&str]) -> Result<Vec<SnapshotInfo>, Error> {
        names::check_dataset(dataset)?;
        let mut props: Vec<&str> = SnapshotInfo::PROPS.to_vec();
        props.extend_from_slice(user);
        let mut list = if self.capabilities()?.list_parsable {
            let cols = std::iter::once("name")
                .chain(props.iter().copied())
                .collect::<Vec<_>>();
            let argv = args(&[
                "list",
                "-H",
                "-p",
                "-o",
                &cols.join(","),
                "-t",
                "snapshot",
                "-d",
                "1",
                "-s",
                "createtxg",
                dataset,
            ]);
            let out = self.run(&argv, dataset)?;
            let command = "zfs list";
            parse::rows(command, &out.stdout, cols.len())?
                .into_iter()
                .map(|row| {
                    let props: BTreeMap<String, Option<String>> = cols
                        .iter()
                        .skip(1)
                        .zip(row.iter().skip(1))
                        .map(|(c, v)| (c.to_string(), parse::dash(v)))
                        .collect();
                    SnapshotInfo::from_props(command, &row[0], &props, user)
                })
                .collect::<Result<Vec<_>, _>>()?
        } else {
            // zfs-fuse: no `list -p`, no `get -t`; `get -d 1` returns the dataset, its
            // snapshots and its children: keep `dataset@*`.
            let argv = args(&[
                "get",
                "-H",
                "-p",
                "-o",
                "name,property,value",
                "-d",
                "1",
                &props.join(","),
                dataset,
            ]);
            let out = self.run(&argv, dataset)?;
            let prefix = format!("{dataset}@");
            parse::pivot(parse::get_rows("zfs get", &out.stdout)?)
                .iter()
                .filter(|(name, _)| name.starts_with(&prefix))
                .map(|(name, p)| SnapshotInfo::from_props("zfs get", name, p, user))
                .collect::<Result<Vec<_>, _>>()?
        };
        list.sort_by_key(|s| s.createtxg);
        Ok(list)
    }

    /// The filesystems and volumes under `dataset`, itself first.
    pub fn descendants(&self, dataset: &str) -> Result<Vec<String>, Error> {
        names::check_dataset(dataset)?;
        let out = self.run(
            &args(&[
                "list",
                "-H",
                "-o",
                "name",
                "-r",
                "-t",
                "filesystem,volume",
                dataset,
            ]),
            dataset,
        )?;
        Ok(parse::rows("zfs list", &out.stdout, 1)?
            .into_iter()
            .map(|mut r| r.remove(0))
            .collect())
    }

    /// Clones per origin snapshot, for every dataset of `pool` (read from `origin`, which
    /// both implementations have).
    pub fn clones(&self, pool: &str) -> Result<BTreeMap<String, Vec<String>>, Error> {
        names::check_dataset(pool)?;
        let out = self.run(
            &args(&[
                "get",
                "-H",
                "-p",
                "-o",
                "name,property,value",
                "-r",
                "origin",
                pool,
            ]),
            pool,
        )?;
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in parse::get_rows("zfs get", &out.stdout)? {
            if let Some(origin) = row.value {
                map.entry(origin).or_default().push(row.name);
            }
        }
        Ok(map)
    }

    /// One `zfs snapshot [-r] [-o k=v]... <names>` call. Names and properties are checked
    /// first; several names need [`Capabilities::multi_snapshot`].
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

    /// The bookmarks of a dataset with their `createtxg`, oldest first. Only OpenZFS has
    /// bookmarks (and `zfs list -p`); on a zfs without `list -p` (zfs-fuse, pool version 23)
    /// the list is empty.
    pub fn bookmarks(&self, dataset: &str) -> Result<Vec<(String, u64)>, Error> {
        names::check_dataset(dataset)?;
        if !self.capabilities()?.list_parsable {
            return Ok(Vec::new());
        }
        let argv = args(&[
            "list",
            "-H",
            "-p",
            "-o",
            "name,createtxg",
            "-t",
            "bookmark",
            "-d",
            "1",
            "-s",
            "createtxg",
            dataset,
        ]);
        let out = self.run(&argv, dataset)?;
        parse::rows("zfs list", &out.stdout, 2)?
            .into_iter()
            .map(|row| {
                let txg = parse::number("zfs list", "createtxg", Some(&row[1]))?.unwrap_or(0);
                Ok((row[0].clone(), txg))
            })
            .collect()
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

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The pool of a dataset or snapshot name.
pub fn pool_of(name: &str) -> &str {
    let end = name.find(['/', '@', '#']).unwrap_or(name.len());
    &name[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools() {
        assert_eq!(pool_of("tank/a/b@c"), "tank");
        assert_eq!(pool_of("tank@c"), "tank");
        assert_eq!(pool_of("tank"), "tank");
    }

    #[test]
    fn space_rules() {
        // Measured on zfs-fuse: 60M refreservation, 50M written; `zfs snapshot` said "out of space".
        let s = Space {
            dataset: "evz-b/rr".into(),
            kind: "filesystem".into(),
            available: 42061824,
            referenced: 51822592,
            unique: 51822592,
            refreservation: 62914560,
            usedbyrefreservation: 11091968,
        };
        assert_eq!(s.snapshot_needs(), 51822592);
        assert_eq!(s.available_outside_reservation(), 30969856);
        assert!(s.snapshot_needs() > s.available_outside_reservation());
    }

    /// A stand-in for OpenZFS 2.x' `zfs` (this machine has only zfs-fuse): answers the
    /// capability probes and a `zfs list -p` the way OpenZFS does, records other calls.
    fn fake_openzfs(dir: &Path) -> PathBuf {
        let log = dir.join("calls");
        let script = format!(
            r#"#!/bin/sh
echo "$*" >> '{log}'
case "$*" in
  snapshot) printf 'missing snapshot argument\nusage:\n\tsnapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...\n' >&2; exit 2;;
  "list -H -p -o name -d 0") echo tank; exit 0;;
  "list -H -p -o name,guid,createtxg,creation,userrefs,used,referenced,org.x:k -t snapshot -d 1 -s createtxg tank/vol")
    printf 'tank/vol@b\t17870393407298424331\t2061\t1764099012\t1\t12288\t1073741824\tv\n'
    printf 'tank/vol@a\t2345\t2049\t1764099000\t0\t0\t1073741824\t-\n'; exit 0;;
  "list -H -p -o name,createtxg -t bookmark -d 1 -s createtxg tank/vol") printf 'tank/vol#bm\t2050\n'; exit 0;;
  snapshot\ *) exit 0;;
esac
echo "unexpected: $*" >&2; exit 1
"#,
            log = log.display()
        );
        let path = dir.join("zfs");
        std::fs::write(&path, script).expect("write fake");
        let mut perms = std::fs::metadata(&path).expect("fake").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).expect("chmod fake");
        path
    }

    #[test]
    fn openzfs_capabilities_and_parsable_list() {
        let dir = std::env::temp_dir().join(format!("evesnap-fake-openzfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let zfs = Zfs::with_path(fake_openzfs(&dir));
        assert_eq!(zfs.capabilities().expect("caps"), Capabilities::OPENZFS);
        let snaps = zfs.snapshots("tank/vol", &["org.x:k"]).expect("list");
        assert_eq!(
            snaps.iter().map(|s| s.short_name()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(snaps[1].guid, "17870393407298424331");
        assert_eq!((snaps[1].userrefs, snaps[1].used), (1, 12288));
        assert_eq!(snaps[1].properties["org.x:k"], "v");
        assert!(snaps[0].properties.is_empty());
        assert_eq!(
            zfs.bookmarks("tank/vol").expect("bookmarks"),
            [("tank/vol#bm".to_string(), 2050)]
        );
        let fuse = Zfs::with_path("/nonexistent/zfs").with_capabilities(Capabilities::ZFS_FUSE);
        assert!(
            fuse.bookmarks("tank/vol").expect("none").is_empty(),
            "zfs-fuse has no bookmarks"
        );
        let props = vec![("org.x:k".to_string(), "v".to_string())];
        zfs.snapshot(&["tank/a@s".into(), "tank/b@s".into()], &props, false)
            .expect("multi");
        let calls = std::fs::read_to_string(dir.join("calls")).expect("calls");
        assert!(
            calls
                .lines()
                .any(|l| l == "snapshot -o org.x:k=v tank/a@s tank/b@s"),
            "{calls}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let zfs = Zfs::with_path("/nonexistent/zfs");
        assert!(matches!(zfs.capabilities(), Err(Error::Spawn { .. })));
    }

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
