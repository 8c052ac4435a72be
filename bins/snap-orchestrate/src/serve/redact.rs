//! Host dataset and pool names never reach the guest: they are replaced by the disk's
//! label. Neither do the host's own paths (the agent's and the channel's sockets, the
//! runtime folder, the zfs program), which error messages name, nor the names of the
//! files in the runtime folder: a busy VM lock's message is a fixed one.

use std::collections::{BTreeMap, BTreeSet};

use evesnap::runtime::LockError;
use evesnap::zfs::{self, Problem};

use super::volumes::{label, Volumes};

/// Replaces host dataset and pool names by the guest's labels in text shown to the guest.
#[derive(Debug, Clone)]
pub struct Redactor {
    datasets: BTreeMap<String, String>,
    pools: BTreeSet<String>,
    /// Longest first, so that a path is replaced before a prefix of it.
    host_paths: Vec<String>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:-/@#".contains(c)
}

impl Redactor {
    /// `host_paths`: the host's own paths (and addresses) that may appear in messages.
    pub fn new(volumes: &Volumes, host_paths: &[String]) -> Redactor {
        let mut host_paths: Vec<String> =
            host_paths.iter().filter(|p| p.len() > 1).cloned().collect();
        host_paths.sort_by_key(|p| std::cmp::Reverse(p.len()));
        Redactor {
            host_paths,
            datasets: volumes
                .iter()
                .map(|(d, disk)| (d.clone(), label(disk)))
                .collect(),
            pools: volumes
                .keys()
                .map(|d| zfs::pool_of(d).to_string())
                .collect(),
        }
    }

    fn token(&self, token: &str) -> String {
        // "pool/ds:" at the end of a phrase: the colon or dot is punctuation.
        let core = token.trim_end_matches([':', '.']);
        let tail = &token[core.len()..];
        let (base, rest) = match core.find(['@', '#']) {
            Some(at) => core.split_at(at),
            None => (core, ""),
        };
        if let Some(label) = self.datasets.get(base) {
            return format!("{label}{rest}{tail}");
        }
        let pool = base.split('/').next().unwrap_or("");
        // Any other name in a pool of this VM's volumes (a parent, the pool itself).
        if self.pools.contains(pool) {
            return format!("(host dataset){rest}{tail}");
        }
        token.to_string()
    }

    pub fn text(&self, text: &str) -> String {
        let mut text = text.to_string();
        for path in &self.host_paths {
            text = text.replace(path.as_str(), "(host path)");
        }
        let mut out = String::with_capacity(text.len());
        let mut token = String::new();
        for c in text.chars() {
            if is_name_char(c) {
                token.push(c);
            } else {
                out.push_str(&self.token(&token));
                token.clear();
                out.push(c);
            }
        }
        out.push_str(&self.token(&token));
        out
    }

    /// A preflight finding with its names replaced as in [`Redactor::text`].
    pub fn problem(&self, problem: &Problem) -> Problem {
        problem.renamed(|name| self.text(name))
    }

    /// A failed run's error as the guest may read it. A busy VM lock names its lock file,
    /// whose name is the host's agent address made readable: the guest gets a fixed busy
    /// message instead.
    pub fn error(&self, error: &anyhow::Error) -> String {
        match evesnap::exit::find::<LockError>(error) {
            Some(LockError::Busy { .. }) => {
                "another snapshot operation on this VM is in progress: retry later".into()
            }
            _ => self.text(&evesnap::exit::chain(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::volumes::tests::volumes;
    use serde_json::json;

    #[test]
    fn host_names_are_replaced_by_labels() {
        let r = Redactor::new(
            &volumes(),
            &["unix:/run/vm0/qga.sock".into(), "/run/vm0/qga.sock".into()],
        );
        assert_eq!(
            r.text("preflight failed, nothing was changed: pool/vm0/disk0: 5 bytes missing"),
            "preflight failed, nothing was changed: disk0: 5 bytes missing"
        );
        assert_eq!(
            r.text("cannot open 'pool/vm0/disk1@s1': dataset does not exist"),
            "cannot open 'disk1@s1': dataset does not exist"
        );
        assert_eq!(
            r.text("pool/vm0@x and pool/other, pool: full."),
            "(host dataset)@x and (host dataset), (host dataset): full."
        );
        assert_eq!(r.text("pooling disk0 nothing"), "pooling disk0 nothing");
        assert_eq!(
            r.text("cannot connect to the guest agent at unix:/run/vm0/qga.sock: refused; /run/vm0/qga.sock gone"),
            "cannot connect to the guest agent at (host path): refused; (host path) gone"
        );
        let p = r.problem(&Problem::NewerSnapshots {
            dataset: "pool/vm0/disk0".into(),
            to: "pool/vm0/disk0@a".into(),
            newer: vec!["pool/vm0/disk0@b".into()],
            guest: vec!["pool/vm0/disk1@c".into()],
        });
        assert_eq!(
            serde_json::to_value(p).expect("json"),
            json!({"problem": "newer-snapshots", "dataset": "disk0", "to": "disk0@a",
                   "newer": ["disk0@b"], "guest": ["disk1@c"]})
        );
    }

    #[test]
    fn a_busy_lock_reaches_the_guest_without_its_file_name() {
        let run = "/run/evesnap";
        let r = Redactor::new(&volumes(), &["unix:/run/vm0/qga.sock".into(), run.into()]);
        let lock = format!("{run}/locks/unix__run_vm0_qga_sock-0123456789abcdef.lock");
        let busy = LockError::Busy {
            what: "another snapshot operation on the VM behind agent unix:/run/vm0/qga.sock".into(),
            path: lock.into(),
        };
        let error = anyhow::Error::new(busy).context("cannot lock the VM");
        let message = r.error(&error);
        for host in ["qga", "vm0", "locks", ".lock", "(host path)"] {
            assert!(!message.contains(host), "{host}: {message}");
        }
        assert!(message.contains("in progress"), "{message}");
        let other = anyhow::anyhow!("pool/vm0/disk0: out of space");
        assert_eq!(r.error(&other), "disk0: out of space");
    }
}
