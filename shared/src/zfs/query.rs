//! What the zfs layer reads: space facts, snapshots and their properties, descendants,
//! clones, bookmarks.

use std::collections::{BTreeMap, BTreeSet};

use super::{args, classify, names, parse, Error, Problem, Zfs};

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
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
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

    /// What forbids destroying this snapshot: holds (unless `defer`, for `zfs destroy -d`,
    /// which destroys it when the last hold goes) and clones (`clones` from
    /// [`Zfs::clones_of`]).
    pub fn destroy_blockers(
        &self,
        clones: &BTreeMap<String, Vec<String>>,
        defer: bool,
    ) -> Vec<Problem> {
        let mut problems = Vec::new();
        if self.userrefs > 0 && !defer {
            problems.push(Problem::Held {
                snapshot: self.name.clone(),
                userrefs: self.userrefs,
            });
        }
        if let Some(c) = clones.get(&self.name) {
            problems.push(Problem::HasClones {
                snapshot: self.name.clone(),
                clones: c.clone(),
            });
        }
        problems
    }

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
            let argv = children_argv(&cols.join(","), "snapshot", dataset);
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

    /// Clones per origin snapshot, for every pool that one of `names` (datasets or
    /// snapshots) is in.
    pub fn clones_of(&self, names: &[String]) -> Result<BTreeMap<String, Vec<String>>, Error> {
        let pools: BTreeSet<&str> = names.iter().map(|n| super::pool_of(n)).collect();
        let mut all = BTreeMap::new();
        for pool in pools {
            all.extend(self.clones(pool)?);
        }
        Ok(all)
    }

    /// Clones per origin snapshot, for every dataset of `pool` (read from `origin`, which
    /// both implementations have).
    fn clones(&self, pool: &str) -> Result<BTreeMap<String, Vec<String>>, Error> {
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

    /// The bookmarks of a dataset with their `createtxg`, oldest first. Only OpenZFS has
    /// bookmarks (and `zfs list -p`); on a zfs without `list -p` (zfs-fuse, pool version 23)
    /// the list is empty.
    pub fn bookmarks(&self, dataset: &str) -> Result<Vec<(String, u64)>, Error> {
        names::check_dataset(dataset)?;
        if !self.capabilities()?.list_parsable {
            return Ok(Vec::new());
        }
        let argv = children_argv("name,createtxg", "bookmark", dataset);
        let out = self.run(&argv, dataset)?;
        parse::rows("zfs list", &out.stdout, 2)?
            .into_iter()
            .map(|row| {
                let txg = parse::number("zfs list", "createtxg", Some(&row[1]))?.unwrap_or(0);
                Ok((row[0].clone(), txg))
            })
            .collect()
    }
}

/// `zfs list -H -p -o <columns> -t <kind> -d 1 -s createtxg <dataset>`: a dataset's
/// snapshots or bookmarks, oldest first.
fn children_argv(columns: &str, kind: &str, dataset: &str) -> Vec<String> {
    args(&[
        "list",
        "-H",
        "-p",
        "-o",
        columns,
        "-t",
        kind,
        "-d",
        "1",
        "-s",
        "createtxg",
        dataset,
    ])
}

#[cfg(test)]
#[path = "query_tests.rs"]
mod tests;
