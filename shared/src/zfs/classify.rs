//! The known stderr texts of OpenZFS 2.x and zfs-fuse 0.7, mapped to typed errors
//! ([`classify`]) and tested against verbatim outputs.

use super::error::{Error, Failure};

/// The quoted name in `cannot <verb> '<name>': <reason>`, or OpenZFS' unquoted
/// `cannot destroy snapshot <name>: it's being held...`.
fn subject(line: &str) -> Option<String> {
    let rest = line.strip_prefix("cannot ")?;
    let colon = rest.find(": ")?;
    match rest.find('\'') {
        Some(start) if start < colon => {
            let after = &rest[start + 1..];
            after.find("':").map(|end| after[..end].to_string())
        }
        _ => rest[..colon].rsplit(' ').next().map(str::to_string),
    }
}

/// The names listed after a `use '-r' ...:` / `use '-R' ...:` line.
pub fn listed_after(stderr: &str, marker: &str) -> Vec<String> {
    let mut lines = stderr.lines().skip_while(|l| !l.starts_with(marker));
    if lines.next().is_none() {
        return Vec::new();
    }
    lines
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("cannot ") && !l.starts_with("use '"))
        .map(str::to_string)
        .collect()
}

/// Maps a failed run to a typed error by its stderr; `fallback` names the object when the
/// text does not.
pub fn classify(failure: Failure, fallback: &str) -> Error {
    let text = failure.stderr.clone();
    let failure = Box::new(failure);
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cannot "))
        .unwrap_or("");
    let name = subject(first).unwrap_or_else(|| fallback.to_string());
    let has = |needle: &str| first.contains(needle);
    if has("more recent snapshots") {
        let snapshots = listed_after(&text, "use '-r'");
        return Error::NewerSnapshots {
            target: name,
            snapshots,
            source: failure,
        };
    }
    if has("clones of previous snapshots exist") || has("snapshot has dependent clones") {
        let clones = listed_after(&text, "use '-R'");
        return Error::Clones {
            target: name,
            clones,
            source: failure,
        };
    }
    if has("dataset does not exist") || has("no such pool") || has("could not find any snapshots") {
        return Error::DoesNotExist {
            name,
            source: failure,
        };
    }
    if has("dataset already exists") {
        return Error::AlreadyExists {
            name,
            source: failure,
        };
    }
    if has("out of space") {
        return Error::OutOfSpace {
            name,
            source: failure,
        };
    }
    if has("dataset is busy") || has("it's being held") || has("pool or dataset is busy") {
        return Error::Busy {
            name,
            source: failure,
        };
    }
    if has("invalid character")
        || has("in name")
        || has("name is too long")
        || has("invalid name")
        || has("empty component")
        || has("leading slash")
        || has("trailing slash")
    {
        return Error::NameRejected {
            name,
            source: failure,
        };
    }
    Error::Failed(failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(stderr: &str) -> Failure {
        Failure {
            argv: vec!["zfs".into(), "x".into()],
            status: Some(1),
            stderr: stderr.into(),
            stdout: String::new(),
        }
    }

    // Verbatim texts: zfs-fuse 0.7.0 on this machine, OpenZFS 2.3.2 in the lab VM
    // (docs/lab.md#zfs-fuse-messages, docs/lab.md#openzfs-messages).
    #[test]
    fn zfs_fuse_texts() {
        let e = classify(fail("cannot open 'P/x': dataset does not exist\n"), "?");
        assert!(
            matches!(&e, Error::DoesNotExist { name, .. } if name == "P/x"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot create snapshot 'P/fs@a': dataset already exists\n"),
            "?",
        );
        assert!(
            matches!(&e, Error::AlreadyExists { name, .. } if name == "P/fs@a"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot snapshot 'P/fs@with#hash': invalid character '#' in name\n"),
            "?",
        );
        assert!(
            matches!(&e, Error::NameRejected { name, .. } if name == "P/fs@with#hash"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot snapshot 'evz-a/fs1@a@b': multiple '@' delimiters in name\n"),
            "?",
        );
        assert!(matches!(e, Error::NameRejected { .. }));
        let e = classify(fail("cannot create snapshot 'P/fs@s': out of space\n"), "?");
        assert!(matches!(&e, Error::OutOfSpace { name, .. } if name == "P/fs@s"));
        let e = classify(fail("cannot destroy 'P/fs@x': dataset is busy\n"), "?");
        assert!(matches!(&e, Error::Busy { name, .. } if name == "P/fs@x"));
        let e = classify(
            fail(
                "cannot rollback to 'evz-a/fs1@s1': more recent snapshots exist\n\
                 use '-r' to force deletion of the following snapshots:\n\
                 evz-a/fs1@s3\nevz-a/fs1@s2\n",
            ),
            "?",
        );
        match &e {
            Error::NewerSnapshots {
                target, snapshots, ..
            } => {
                assert_eq!(target, "evz-a/fs1@s1");
                assert_eq!(snapshots, &["evz-a/fs1@s3", "evz-a/fs1@s2"]);
            }
            other => panic!("{other:?}"),
        }
        let e = classify(
            fail(
                "cannot rollback to 'evz-a/fs1@s1': clones of previous snapshots exist\n\
                 use '-R' to force deletion of the following clones and dependents:\nevz-a/c1\n",
            ),
            "?",
        );
        assert!(
            matches!(&e, Error::Clones { clones, .. } if clones == &["evz-a/c1"]),
            "{e:?}"
        );
        let e = classify(
            fail(
                "cannot destroy 'evz-a/fs1@s2': snapshot has dependent clones\n\
                 use '-R' to destroy the following datasets:\nevz-a/c1\n",
            ),
            "?",
        );
        assert!(
            matches!(&e, Error::Clones { clones, .. } if clones == &["evz-a/c1"]),
            "{e:?}"
        );
        let usage = "too many arguments\nusage:\n\tsnapshot [-r] [-o property=value] ... \
                     <filesystem@snapname|volume@snapname>\n\nFor the property list, run: zfs set|get\n";
        let e = classify(
            Failure {
                status: Some(2),
                ..fail(usage)
            },
            "P/a@s",
        );
        assert!(matches!(e, Error::Failed(_)));
        assert!(e
            .failure()
            .expect("failure")
            .to_string()
            .contains("too many arguments"));
    }

    #[test]
    fn openzfs_texts() {
        let e = classify(
            fail(
                "cannot rollback to 'tank/sparse@a': more recent snapshots or bookmarks exist\n\
                 use '-r' to force deletion of the following snapshots and bookmarks:\n\
                 tank/sparse@b\ntank/sparse#bm\n",
            ),
            "?",
        );
        assert!(
            matches!(&e, Error::NewerSnapshots { snapshots, .. } if snapshots == &["tank/sparse@b", "tank/sparse#bm"]),
            "{e:?}"
        );
        let e = classify(
            fail("cannot destroy snapshot tank/vol@a: it's being held. Run 'zfs holds -r tank/vol@a' to see holders.\n"),
            "?",
        );
        assert!(
            matches!(&e, Error::Busy { name, .. } if name == "tank/vol@a"),
            "{e:?}"
        );
        let e = classify(fail("cannot create snapshot 'tank/vol@multi': out of space\nno snapshots were created\n"), "?");
        assert!(
            matches!(&e, Error::OutOfSpace { name, .. } if name == "tank/vol@multi"),
            "{e:?}"
        );
        let e = classify(
            fail("cannot open 'tank/nope': dataset does not exist\n"),
            "?",
        );
        assert!(matches!(e, Error::DoesNotExist { .. }));
        let e = classify(
            fail("The ZFS modules cannot be auto-loaded.\nTry running 'modprobe zfs' as root to manually load them.\n"),
            "tank",
        );
        assert!(matches!(e, Error::Failed(_)));
    }

    #[test]
    fn messages_do_not_repeat_the_cause() {
        let e = classify(
            fail("cannot create snapshot 'P/fs@a': dataset already exists\n"),
            "?",
        );
        assert_eq!(e.to_string(), "P/fs@a exists already");
        let source = std::error::Error::source(&e).expect("source").to_string();
        assert!(
            source.starts_with("`zfs x` exited with status 1 saying: cannot create"),
            "{source}"
        );
    }
}
