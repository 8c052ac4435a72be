//! Name checks done before any `zfs` call, so a bad name never reaches the command line
//! (where a leading `-` would read as an option).
//!
//! The rules follow OpenZFS' `zfs_namecheck.c`, a little stricter: snapshot names (the part
//! after `@`) and dataset components take `[A-Za-z0-9_.:-]`; OpenZFS also accepts a space,
//! evesnap does not (names end up in logs, paths and EVE's reports).

use super::Error;

/// Longest full name ZFS accepts (`ZFS_MAX_DATASET_NAME_LEN` minus the NUL).
pub const MAX_NAME_LEN: usize = 255;

/// Longest user property name (`ZAP_MAXNAMELEN` minus the NUL).
pub const MAX_PROPERTY_NAME_LEN: usize = 255;

/// Longest user property value (`ZAP_MAXVALUELEN`).
pub const MAX_PROPERTY_VALUE_LEN: usize = 8191;

fn invalid(name: &str, reason: impl Into<String>) -> Error {
    Error::InvalidName {
        name: name.to_string(),
        reason: reason.into(),
    }
}

fn check_component(whole: &str, component: &str, what: &str) -> Result<(), Error> {
    if component.is_empty() {
        return Err(invalid(whole, format!("empty {what}")));
    }
    if component == "." || component == ".." {
        return Err(invalid(whole, format!("{what} may not be '{component}'")));
    }
    if let Some(c) = component
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.:-".contains(*c)))
    {
        return Err(invalid(whole, format!("invalid character {c:?} in {what}")));
    }
    Ok(())
}

/// A filesystem or volume name: `pool/a/b`.
pub fn check_dataset(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(invalid(name, "empty dataset name"));
    }
    if name.contains('@') || name.contains('#') {
        return Err(invalid(
            name,
            "a dataset name has no '@' or '#' (this is a snapshot or bookmark)",
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(name, format!("longer than {MAX_NAME_LEN} bytes")));
    }
    for component in name.split('/') {
        check_component(name, component, "dataset name component")?;
    }
    // The pool name starts with a letter (also keeps a leading '-' away from zfs' options).
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(invalid(name, "the pool name must start with a letter"));
    }
    Ok(())
}

/// The part of a snapshot name after `@`.
pub fn check_snapshot_name(short: &str) -> Result<(), Error> {
    check_component(short, short, "snapshot name")?;
    if short.starts_with('-') {
        return Err(invalid(short, "a snapshot name may not start with '-'"));
    }
    Ok(())
}

/// A set of datasets and the snapshot name they share: the datasets without repeats (in
/// their order), at least one, every name valid.
pub fn check_set(datasets: &[String], name: &str) -> Result<Vec<String>, Error> {
    let mut seen = std::collections::BTreeSet::new();
    let datasets: Vec<String> = datasets
        .iter()
        .filter(|d| seen.insert(d.as_str()))
        .cloned()
        .collect();
    if datasets.is_empty() {
        return Err(invalid("", "no dataset given"));
    }
    for d in &datasets {
        check_dataset(d)?;
    }
    check_snapshot_name(name)?;
    Ok(datasets)
}

/// A full snapshot name `dataset@name`; returns its two halves.
pub fn split_snapshot(full: &str) -> Result<(&str, &str), Error> {
    let Some((dataset, short)) = full.split_once('@') else {
        return Err(invalid(full, "a snapshot name has the form dataset@name"));
    };
    check_dataset(dataset).map_err(|_| invalid(full, "invalid dataset part"))?;
    check_snapshot_name(short).map_err(|e| match e {
        Error::InvalidName { reason, .. } => invalid(full, reason),
        other => other,
    })?;
    if full.len() > MAX_NAME_LEN {
        return Err(invalid(full, format!("longer than {MAX_NAME_LEN} bytes")));
    }
    Ok((dataset, short))
}

/// `dataset@name`, checked.
pub fn snapshot(dataset: &str, short: &str) -> Result<String, Error> {
    check_dataset(dataset)?;
    check_snapshot_name(short)?;
    let full = format!("{dataset}@{short}");
    if full.len() > MAX_NAME_LEN {
        return Err(invalid(&full, format!("longer than {MAX_NAME_LEN} bytes")));
    }
    Ok(full)
}

/// A user property `module:name=value` as given on a command line; returns its halves.
pub fn split_user_property(text: &str) -> Result<(&str, &str), Error> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(Error::InvalidProperty {
            property: text.to_string(),
            reason: "expected key=value".into(),
        });
    };
    check_user_property(key, value)?;
    Ok((key, value))
}

/// A user property: the name contains `:` and only `[a-z0-9:._-]`; the value has no tab or
/// newline (they would break `zfs get -H` output) and fits ZFS' limit.
pub fn check_user_property(key: &str, value: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::InvalidProperty {
        property: key.to_string(),
        reason: reason.to_string(),
    };
    if !key.contains(':') {
        return Err(bad("a user property name contains ':' (module:name)"));
    }
    if key.starts_with(':') || key.starts_with('-') {
        return Err(bad("a user property name starts with its module"));
    }
    if key.len() > MAX_PROPERTY_NAME_LEN {
        return Err(bad("name too long"));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ":._-".contains(c))
    {
        return Err(bad("a user property name takes only [a-z0-9:._-]"));
    }
    if value.len() > MAX_PROPERTY_VALUE_LEN {
        return Err(bad("value too long"));
    }
    if value.contains(['\t', '\n', '\r', '\0']) {
        return Err(bad("the value may not contain tabs, newlines or NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datasets() {
        for ok in [
            "tank",
            "tank/a",
            "persist/vault/volumes/0b5a-11.1",
            "p/a:b_c.d-e",
        ] {
            assert!(check_dataset(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/tank", "tank/", "tank//a", "tank/a@b", "-tank", "1tank", "tank/a b", "tank/..",
            "tank/a#b",
        ] {
            assert!(
                matches!(check_dataset(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(check_dataset(&format!("t/{}", "a".repeat(300))).is_err());
    }

    #[test]
    fn snapshots() {
        assert_eq!(
            snapshot("tank/a", "20261125-193000123").expect("ok"),
            "tank/a@20261125-193000123"
        );
        for bad in ["", "a#b", "a@b", "a b", "-r", "a/b", ".."] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(split_snapshot("tank/a@s1").expect("ok"), ("tank/a", "s1"));
        assert!(split_snapshot("tank/a").is_err());
        assert!(split_snapshot("tank/a@").is_err());
        assert!(split_snapshot("tank/a@b@c").is_err());
        let err = split_snapshot("tank/a@with#hash").expect_err("an error");
        assert!(err.to_string().contains("tank/a@with#hash"), "{err}");
    }

    #[test]
    fn user_properties() {
        assert_eq!(
            split_user_property("org.lfedge.evesnap:id=abc=d").expect("ok"),
            ("org.lfedge.evesnap:id", "abc=d")
        );
        assert!(split_user_property("org.x:k=").is_ok());
        for bad in [
            "nocolon=1",
            "Org.X:k=1",
            "org.x:k",
            "org.x:k=a\tb",
            ":k=1",
            "org.x:k=a\nb",
        ] {
            assert!(
                matches!(split_user_property(bad), Err(Error::InvalidProperty { .. })),
                "{bad:?}"
            );
        }
    }
}
