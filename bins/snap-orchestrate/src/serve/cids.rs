//! The CID → VM map of a listener on kernel AF_VSOCK (`--listen-vsock PORT --cid-map FILE`):
//! one port on the host serves every VM, and the peer's CID (which the host kernel sets,
//! the guest cannot forge it) says which VM a connection comes from. A connection from a
//! CID not in the map is refused before anything is read from it.
//!
//! The file: `{"<cid>": {"agent": "<agent address>", "volumes": "<volumes map file>",
//! "qmp": "<QMP socket>"}, …}` (`qmp` optional: with it, volumes may be named by QEMU device
//! id or root port, as with `--qmp`). CIDs 0, 1, 2 (hypervisor, local, host) and 4294967295
//! (any) are refused; two VMs may share neither an agent, a QMP socket nor a volume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use evesnap::exit::{coded, Exit};
use evesnap::qga::Address;
use serde::Deserialize;

use super::volumes::{load_volumes, Volumes};

/// Largest CID map read.
const MAX_CID_MAP_BYTES: u64 = 1024 * 1024;

/// One VM of the map, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub agent: String,
    pub volumes: PathBuf,
    #[serde(default)]
    pub qmp: Option<PathBuf>,
}

/// One VM of the map, checked: its agent parsed, its volumes loaded.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub agent_text: String,
    pub agent: Address,
    pub volumes: Volumes,
    pub qmp: Option<PathBuf>,
}

/// A connection from a CID the map does not name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a vsock connection from CID {0}, which is no VM of the CID map: refused")]
pub struct UnknownPeer(pub u32);

/// The VM behind `cid`.
pub fn vm_for<T>(map: &BTreeMap<u32, T>, cid: u32) -> Result<&T, UnknownPeer> {
    map.get(&cid).ok_or(UnknownPeer(cid))
}

/// Parses the map's text (entries unchecked beyond their CIDs).
pub fn parse_cid_map(text: &str) -> Result<BTreeMap<u32, Entry>, String> {
    let raw: BTreeMap<String, Entry> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if raw.is_empty() {
        return Err("it names no VM".into());
    }
    let mut map = BTreeMap::new();
    for (key, entry) in raw {
        let cid: u32 = key
            .parse()
            .ok()
            .filter(|k: &u32| k.to_string() == key)
            .ok_or_else(|| format!("{key:?} is not a CID (a decimal number)"))?;
        if cid <= 2 || cid == u32::MAX {
            return Err(format!("CID {cid} is reserved, no VM has it"));
        }
        map.insert(cid, entry);
    }
    Ok(map)
}

/// Checks the parsed map: each agent an address of its own, each volume one VM's.
pub fn check_cid_map(
    map: BTreeMap<u32, Entry>,
    load: impl Fn(&Path) -> Result<Volumes, anyhow::Error>,
) -> Result<BTreeMap<u32, VmConfig>, String> {
    let mut checked: BTreeMap<u32, VmConfig> = BTreeMap::new();
    for (cid, entry) in map {
        let agent: Address = entry.agent.parse().map_err(|e| format!("CID {cid}: {e}"))?;
        let volumes = load(&entry.volumes).map_err(|e| format!("CID {cid}: {e:#}"))?;
        for (other, vm) in &checked {
            if vm.agent == agent {
                return Err(format!(
                    "CIDs {other} and {cid} have the same agent {agent}"
                ));
            }
            if entry.qmp.is_some() && vm.qmp == entry.qmp {
                return Err(format!(
                    "CIDs {other} and {cid} have the same QMP socket {}",
                    entry.qmp.as_deref().unwrap_or(Path::new("")).display()
                ));
            }
            if let Some(dataset) = volumes.keys().find(|d| vm.volumes.contains_key(*d)) {
                return Err(format!(
                    "CIDs {other} and {cid} both name the volume {dataset}"
                ));
            }
        }
        checked.insert(
            cid,
            VmConfig {
                agent_text: entry.agent,
                agent,
                volumes,
                qmp: entry.qmp,
            },
        );
    }
    Ok(checked)
}

/// Reads and checks the CID map file.
pub fn load_cid_map(path: &Path) -> Result<BTreeMap<u32, VmConfig>, anyhow::Error> {
    let bad = |why: String| {
        coded(
            Exit::Usage,
            format!("the CID map {}: {why}", path.display()),
        )
    };
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_CID_MAP_BYTES {
        return Err(bad(format!("larger than {MAX_CID_MAP_BYTES} bytes")));
    }
    let text = String::from_utf8(text).map_err(|_| bad("not UTF-8".into()))?;
    check_cid_map(parse_cid_map(&text).map_err(bad)?, load_volumes).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::GuestDisk;

    fn volumes(datasets: &[&str]) -> Volumes {
        datasets
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let disk: GuestDisk =
                    serde_json::from_value(serde_json::json!({"serial": format!("disk{i}")}))
                        .expect("a disk");
                (d.to_string(), disk)
            })
            .collect()
    }

    /// Volume maps by file name: `a.json` → pool/a, `b.json` → pool/b, `ab.json` both.
    fn load(path: &Path) -> Result<Volumes, anyhow::Error> {
        match path.to_str() {
            Some("a.json") => Ok(volumes(&["pool/a"])),
            Some("b.json") => Ok(volumes(&["pool/b"])),
            Some("ab.json") => Ok(volumes(&["pool/a", "pool/b"])),
            _ => Err(anyhow::anyhow!("no such file")),
        }
    }

    fn checked(text: &str) -> Result<BTreeMap<u32, VmConfig>, String> {
        check_cid_map(parse_cid_map(text)?, load)
    }

    #[test]
    fn each_cid_is_its_vm_and_an_unknown_cid_is_refused() {
        let map = checked(
            r#"{"3": {"agent": "unix:/run/vm3/qga.sock", "volumes": "a.json"},
                "7": {"agent": "vsock:7:10000", "volumes": "b.json"}}"#,
        )
        .expect("a valid map");
        let vm3 = vm_for(&map, 3).expect("CID 3");
        assert_eq!(vm3.agent, Address::Unix("/run/vm3/qga.sock".into()));
        assert!(vm3.volumes.contains_key("pool/a") && !vm3.volumes.contains_key("pool/b"));
        let vm7 = vm_for(&map, 7).expect("CID 7");
        assert_eq!(
            vm7.agent,
            Address::Vsock {
                cid: 7,
                port: 10000
            }
        );
        assert!(vm7.volumes.contains_key("pool/b"));
        for stranger in [0, 1, 2, 4, 8, u32::MAX] {
            let err = vm_for(&map, stranger).expect_err("not in the map");
            assert_eq!(err, UnknownPeer(stranger));
            assert!(
                err.to_string().contains(&format!("CID {stranger}")),
                "{err}"
            );
        }
    }

    #[test]
    fn reserved_or_malformed_cids_and_fields_are_refused() {
        for (text, why) in [
            (r#"{}"#, "names no VM"),
            (r#"{"2": {"agent": "/q", "volumes": "a.json"}}"#, "reserved"),
            (r#"{"1": {"agent": "/q", "volumes": "a.json"}}"#, "reserved"),
            (
                r#"{"4294967295": {"agent": "/q", "volumes": "a.json"}}"#,
                "reserved",
            ),
            (
                r#"{"x": {"agent": "/q", "volumes": "a.json"}}"#,
                "not a CID",
            ),
            (
                r#"{"03": {"agent": "/q", "volumes": "a.json"}}"#,
                "not a CID",
            ),
            (
                r#"{"-3": {"agent": "/q", "volumes": "a.json"}}"#,
                "not a CID",
            ),
            (r#"{"3": {"agent": "/q"}}"#, "missing field"),
            (
                r#"{"3": {"agent": "/q", "volumes": "a.json", "cid": 3}}"#,
                "unknown field",
            ),
            (
                r#"{"3": {"agent": "tcp:x:1", "volumes": "a.json"}}"#,
                "unknown scheme",
            ),
            (
                r#"{"3": {"agent": "/q", "volumes": "none.json"}}"#,
                "no such file",
            ),
            (r#"[]"#, "invalid type"),
        ] {
            let err = checked(text).expect_err(text);
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn two_vms_share_neither_an_agent_nor_a_volume() {
        let err = checked(
            r#"{"3": {"agent": "unix:/run/q.sock", "volumes": "a.json"},
                "4": {"agent": "/run/q.sock", "volumes": "b.json"}}"#,
        )
        .expect_err("one agent, two CIDs");
        assert!(err.contains("same agent"), "{err}");
        let err = checked(
            r#"{"3": {"agent": "/run/q3.sock", "volumes": "a.json"},
                "4": {"agent": "/run/q4.sock", "volumes": "ab.json"}}"#,
        )
        .expect_err("one volume, two CIDs");
        assert!(err.contains("pool/a"), "{err}");
        let err = checked(
            r#"{"3": {"agent": "/run/q3.sock", "volumes": "a.json", "qmp": "/run/qmp.sock"},
                "4": {"agent": "/run/q4.sock", "volumes": "b.json", "qmp": "/run/qmp.sock"}}"#,
        )
        .expect_err("one QMP socket, two CIDs");
        assert!(err.contains("same QMP socket /run/qmp.sock"), "{err}");
    }

    #[test]
    fn each_vm_may_have_its_own_qmp_socket() {
        let map = checked(
            r#"{"3": {"agent": "/run/q3.sock", "volumes": "a.json", "qmp": "/run/vm3/qmp.sock"},
                "4": {"agent": "/run/q4.sock", "volumes": "b.json"}}"#,
        )
        .expect("a valid map");
        assert_eq!(
            vm_for(&map, 3).expect("CID 3").qmp.as_deref(),
            Some(Path::new("/run/vm3/qmp.sock"))
        );
        assert_eq!(vm_for(&map, 4).expect("CID 4").qmp, None);
    }
}
