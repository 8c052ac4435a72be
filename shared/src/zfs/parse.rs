//! Parsers for `zfs` output: `-H` (tab-separated, no header) with `-p` (exact numbers),
//! checked column by column; usage texts for capability detection.

use std::collections::BTreeMap;

use super::Error;

/// The rows of `zfs list -H ... -o <cols>` / `zfs get -H -o <cols>`: every row must have
/// exactly `columns` fields. A last field may hold tabs only when `columns` is the count of
/// `splitn` (see [`get_rows`]).
pub fn rows(command: &str, stdout: &str, columns: usize) -> Result<Vec<Vec<String>>, Error> {
    stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let fields: Vec<String> = line.split('\t').map(str::to_string).collect();
            if fields.len() != columns {
                return Err(Error::BadOutput {
                    command: command.to_string(),
                    detail: format!(
                        "expected {columns} tab-separated columns, got {}: {line:?}",
                        fields.len()
                    ),
                });
            }
            Ok(fields)
        })
        .collect()
}

/// One `zfs get -H -p -o name,property,value` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRow {
    pub name: String,
    pub property: String,
    /// `None` for ZFS' `-` (not set / not applicable).
    pub value: Option<String>,
}

/// Rows of `zfs get -H -p -o name,property,value ...` (a value may contain tabs; it is the rest
/// of the line).
pub fn get_rows(command: &str, stdout: &str) -> Result<Vec<GetRow>, Error> {
    stdout
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut it = line.splitn(3, '\t');
            match (it.next(), it.next(), it.next()) {
                (Some(name), Some(property), Some(value))
                    if !name.is_empty() && !property.is_empty() =>
                {
                    Ok(GetRow {
                        name: name.to_string(),
                        property: property.to_string(),
                        value: dash(value),
                    })
                }
                _ => Err(Error::BadOutput {
                    command: command.to_string(),
                    detail: format!("expected name<TAB>property<TAB>value, got {line:?}"),
                }),
            }
        })
        .collect()
}

/// Property values per object name, objects in output order.
pub type Table = Vec<(String, BTreeMap<String, Option<String>>)>;

/// Groups `zfs get` rows by object, keeping the order zfs printed them in.
pub fn pivot(rows: Vec<GetRow>) -> Table {
    let mut table: Table = Vec::new();
    for row in rows {
        match table.last_mut() {
            Some((name, props)) if *name == row.name => {
                props.insert(row.property, row.value);
            }
            _ => {
                let mut props = BTreeMap::new();
                props.insert(row.property, row.value);
                table.push((row.name, props));
            }
        }
    }
    table
}

/// ZFS prints `-` for "none / not applicable".
pub fn dash(value: &str) -> Option<String> {
    (value != "-").then(|| value.to_string())
}

/// An exact number from `-p` output; `-` or `none` is `None`.
pub fn number(command: &str, what: &str, value: Option<&str>) -> Result<Option<u64>, Error> {
    match value {
        None | Some("-") | Some("none") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| Error::BadOutput {
            command: command.to_string(),
            detail: format!("{what} is not an exact number: {v:?} (was -p honoured?)"),
        }),
    }
}

/// Whether a `zfs snapshot` usage text offers several snapshots in one call: OpenZFS prints
/// `snapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...`, zfs-fuse
/// `snapshot [-r] [-o property=value] ... <filesystem@snapname|volume@snapname>`.
pub fn usage_snapshot_multi(usage: &str) -> bool {
    snapshot_usage_line(usage).is_some_and(|l| l.trim_end().ends_with("..."))
}

/// Whether `zfs snapshot` takes `-o property=value`.
pub fn usage_snapshot_props(usage: &str) -> bool {
    snapshot_usage_line(usage).is_some_and(|l| l.contains("-o property=value"))
}

fn snapshot_usage_line(usage: &str) -> Option<&str> {
    usage
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("snapshot "))
}

/// The names in `cannot open '<name>': dataset does not exist` lines, if every `cannot` line
/// of `stderr` is one of those (a `zfs get` over several names reports each missing one
/// and goes on with the rest).
pub fn only_missing(stderr: &str) -> Option<Vec<String>> {
    let mut missing = Vec::new();
    for line in stderr.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = line
            .strip_prefix("cannot open '")?
            .strip_suffix("': dataset does not exist")?;
        missing.push(name.to_string());
    }
    (!missing.is_empty()).then_some(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// zfs-fuse 0.7.0, verbatim (`zfs snapshot` without arguments, on stderr, exit 2).
    const FUSE_SNAPSHOT_USAGE: &str =
        "missing snapshot argument\nusage:\n\tsnapshot [-r] [-o property=value] ... \
        <filesystem@snapname|volume@snapname>\n\nFor the property list, run: zfs set|get\n\n\
        For the delegated permission list, run: zfs allow|unallow\n";
    /// OpenZFS 2.1–2.3 (`zfs_main.c`, HELP_SNAPSHOT).
    const OPENZFS_SNAPSHOT_USAGE: &str =
        "missing snapshot argument\nusage:\n\tsnapshot [-r] [-o property=value] ... \
        <filesystem|volume>@<snap> ...\n\nFor the property list, run: zfs set|get\n\n\
        For the delegated permission list, run: zfs allow|unallow\n";

    #[test]
    fn snapshot_usage() {
        assert!(!usage_snapshot_multi(FUSE_SNAPSHOT_USAGE));
        assert!(usage_snapshot_props(FUSE_SNAPSHOT_USAGE));
        assert!(usage_snapshot_multi(OPENZFS_SNAPSHOT_USAGE));
        assert!(usage_snapshot_props(OPENZFS_SNAPSHOT_USAGE));
        assert!(!usage_snapshot_multi(
            "connect: No such file or directory\n"
        ));
    }

    /// zfs-fuse 0.7.0, verbatim: `zfs get -H -p -o name,property,value guid,createtxg,creation,
    /// userrefs,available,referenced,used,refreservation,type,usedbyrefreservation,org.x:k P/fs1 P/fs1@s1`
    const FUSE_GET: &str = "evz-a/fs1\tguid\t9452208271511437719\nevz-a/fs1\tcreatetxg\t7\n\
        evz-a/fs1\tcreation\t1795635033\nevz-a/fs1\tuserrefs\t-\nevz-a/fs1\tavailable\t227860480\n\
        evz-a/fs1\treferenced\t114688\nevz-a/fs1\tused\t114688\nevz-a/fs1\trefreservation\t0\n\
        evz-a/fs1\ttype\tfilesystem\nevz-a/fs1\tusedbyrefreservation\t0\nevz-a/fs1\torg.x:k\t-\n\
        evz-a/fs1@s1\tguid\t1582571642232723897\nevz-a/fs1@s1\tcreatetxg\t14\n\
        evz-a/fs1@s1\tcreation\t1795635033\nevz-a/fs1@s1\tuserrefs\t0\nevz-a/fs1@s1\tavailable\t-\n\
        evz-a/fs1@s1\treferenced\t114688\nevz-a/fs1@s1\tused\t0\nevz-a/fs1@s1\trefreservation\t-\n\
        evz-a/fs1@s1\ttype\tsnapshot\nevz-a/fs1@s1\tusedbyrefreservation\t-\nevz-a/fs1@s1\torg.x:k\tv\n";

    #[test]
    fn zfs_fuse_get() {
        let table = pivot(get_rows("zfs get", FUSE_GET).expect("rows"));
        assert_eq!(table.len(), 2);
        let (name, props) = &table[1];
        assert_eq!(name, "evz-a/fs1@s1");
        assert_eq!(props["guid"].as_deref(), Some("1582571642232723897"));
        assert_eq!(props["available"], None);
        assert_eq!(props["org.x:k"].as_deref(), Some("v"));
        assert_eq!(
            number("zfs get", "guid", props["guid"].as_deref()).expect("ok"),
            Some(1582571642232723897)
        );
        assert_eq!(
            number("zfs get", "userrefs", table[0].1["userrefs"].as_deref()).expect("ok"),
            None
        );
    }

    /// OpenZFS 2.x `zfs get -H -p -o name,property,value` has the same shape; a guid ≥ 2^63
    /// stays exact (unlike `zfs list -j --json-int`).
    #[test]
    fn openzfs_get_and_big_guid() {
        let out = "tank/vol@a\tguid\t17870393407298424331\ntank/vol@a\tcreatetxg\t2049\n\
                   tank/vol@a\tuserrefs\t1\ntank/vol@a\torg.lfedge.evesnap:note\ttab\there\n";
        let table = pivot(get_rows("zfs get", out).expect("rows"));
        assert_eq!(
            number("g", "guid", table[0].1["guid"].as_deref()).expect("ok"),
            Some(17870393407298424331)
        );
        assert_eq!(
            table[0].1["org.lfedge.evesnap:note"].as_deref(),
            Some("tab\there")
        );
    }

    #[test]
    fn list_columns_are_checked() {
        // OpenZFS 2.x `zfs list -H -p -o name,used,referenced,creation,guid,createtxg -t snapshot`.
        let out = "tank/vol@a\t0\t1073741824\t1764099000\t17870393407298424331\t2049\n\
                   tank/vol@b\t12288\t1073741824\t1764099012\t2345\t2061\n";
        let parsed = rows("zfs list", out, 6).expect("rows");
        assert_eq!(parsed[1][5], "2061");
        // Without -p (zfs-fuse) sizes are humanised: the number check catches it.
        let human = "evz-a/fs1@s2\t0\t112K\tWed Nov 25 19:33 2026\t1\t2\n";
        let parsed = rows("zfs list", human, 6).expect("shape is fine");
        assert!(number("zfs list", "referenced", Some(&parsed[0][2])).is_err());
        assert!(rows("zfs list", "a\tb\n", 3).is_err());
        assert!(get_rows("zfs get", "only-two\tcolumns\n").is_err());
    }

    #[test]
    fn missing_names() {
        let fuse = "cannot open 'evz-a/nope': dataset does not exist\ncannot open 'evz-a/nope2': dataset does not exist\n";
        assert_eq!(
            only_missing(fuse),
            Some(vec!["evz-a/nope".to_string(), "evz-a/nope2".to_string()])
        );
        assert_eq!(only_missing("cannot open 'a': dataset does not exist\nbad property list: invalid property 'x'\n"), None);
        assert_eq!(only_missing(""), None);
    }
}
