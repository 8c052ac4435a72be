//! What the guest knows about the disk the user named: its block device, where it is
//! mounted, its virtio serial and its PCI address, from `/proc/self/mounts` and sysfs
//! (no udev needed). The host decides which of its volumes that is, if any.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use evesnap::request::DiskRef;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is not an absolute path")]
    Relative(String),
    #[error("cannot read {0}")]
    Stat(String, #[source] std::io::Error),
    #[error("{0} is neither a block device nor a mountpoint (name an unmounted disk by its device, e.g. /dev/vdb)")]
    NotADisk(String),
    #[error("{path} is mounted from {source_name}, which is not a block device")]
    NotBlockBacked { path: String, source_name: String },
    #[error("cannot find {0} in sysfs")]
    Sysfs(String, #[source] std::io::Error),
}

impl evesnap::exit::HasExit for Error {
    fn exit(&self) -> evesnap::exit::Exit {
        evesnap::exit::Exit::Usage
    }
}

/// One line of `/proc/self/mounts`: source and mountpoint (octal escapes undone).
fn mounts(table: &str) -> Vec<(String, String)> {
    table
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((unescape(fields.next()?), unescape(fields.next()?)))
        })
        .collect()
}

/// `\040` → space, as the kernel escapes mount table fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|o| o.bytes().all(|c| (b'0'..=b'7').contains(&c)));
        if bytes[i] == b'\\' {
            if let Some(value) = octal.and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Is `text` a PCI address `dddd:bb:ss.f`?
pub fn is_pci_address(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit())
}

/// The PCI address of a sysfs device path: its last PCI component (the device itself,
/// behind any bridges).
pub fn pci_of(sysfs_path: &Path) -> Option<String> {
    sysfs_path
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .rfind(|c| is_pci_address(c))
        .map(str::to_ascii_lowercase)
}

/// Describes the disk behind `target`, a block device or a mountpoint.
pub fn describe(target: &str) -> Result<DiskRef, Error> {
    describe_in(target, Path::new("/"))
}

/// [`describe`] with `/proc` and `/sys` under `root` (tests).
fn describe_in(target: &str, root: &Path) -> Result<DiskRef, Error> {
    if !target.starts_with('/') {
        return Err(Error::Relative(target.to_string()));
    }
    let table = std::fs::read_to_string(root.join("proc/self/mounts"))
        .map_err(|e| Error::Stat("/proc/self/mounts".into(), e))?;
    let table = mounts(&table);
    let meta = std::fs::metadata(target).map_err(|e| Error::Stat(target.to_string(), e))?;
    let (rdev, mountpoint) = if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        // Mounted? Any mount whose source is the same device (or a partition of it is
        // not: a partition is its own device).
        let mountpoint = table.iter().find_map(|(source, mnt)| {
            let same = source.starts_with('/')
                && std::fs::metadata(source)
                    .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev);
            same.then(|| mnt.clone())
        });
        (rdev, mountpoint)
    } else if meta.is_dir() {
        let canonical = std::fs::canonicalize(target)
            .map_err(|e| Error::Stat(target.to_string(), e))?
            .to_string_lossy()
            .into_owned();
        // The last mount on that directory is the visible one.
        let Some((source, _)) = table.iter().rev().find(|(_, mnt)| *mnt == canonical) else {
            return Err(Error::NotADisk(target.to_string()));
        };
        let block = std::fs::metadata(source)
            .ok()
            .filter(|m| m.file_type().is_block_device());
        let Some(block) = block else {
            return Err(Error::NotBlockBacked {
                path: target.to_string(),
                source_name: source.clone(),
            });
        };
        (block.rdev(), Some(canonical))
    } else {
        return Err(Error::NotADisk(target.to_string()));
    };
    let major = nix::sys::stat::major(rdev);
    let minor = nix::sys::stat::minor(rdev);
    let link = root.join(format!("sys/dev/block/{major}:{minor}"));
    let mut dir: PathBuf =
        std::fs::canonicalize(&link).map_err(|e| Error::Sysfs(link.display().to_string(), e))?;
    // A partition: its disk is the parent folder.
    if dir.join("partition").exists() {
        if let Some(parent) = dir.parent() {
            dir = parent.to_path_buf();
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let serial = std::fs::read_to_string(dir.join("serial"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.chars().any(char::is_control));
    Ok(DiskRef {
        path: target.to_string(),
        device: (!name.is_empty()).then(|| format!("/dev/{name}")),
        mountpoint,
        serial,
        pci: pci_of(&dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_in_sysfs_paths() {
        let p = Path::new("/sys/devices/pci0000:00/0000:00:07.0/virtio2/block/vda");
        assert_eq!(pci_of(p), Some("0000:00:07.0".into()));
        let bridged =
            Path::new("/sys/devices/pci0000:00/0000:00:1c.0/0000:01:00.0/virtio3/block/vdb");
        assert_eq!(pci_of(bridged), Some("0000:01:00.0".into()));
        assert_eq!(pci_of(Path::new("/sys/devices/virtual/block/loop0")), None);
        assert!(!is_pci_address("pci0000:00"));
        assert!(is_pci_address("0000:00:1F.3"));
    }

    #[test]
    fn mount_table_fields_are_unescaped() {
        let t = mounts("/dev/vda /data0 ext4 rw 0 0\n/dev/vdb /mnt/with\\040space ext4 rw 0 0\n");
        assert_eq!(t[0], ("/dev/vda".to_string(), "/data0".to_string()));
        assert_eq!(t[1].1, "/mnt/with space");
        assert_eq!(unescape("a\\\\b\\"), "a\\\\b\\");
    }

    #[test]
    fn relative_and_missing_targets_are_refused() {
        assert!(matches!(describe("data0"), Err(Error::Relative(_))));
        assert!(matches!(
            describe("/nonexistent/evesnap"),
            Err(Error::Stat(..))
        ));
        // A plain directory that is not a mountpoint.
        let dir = std::env::temp_dir().join(format!("evesnap-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let err = describe(&dir.to_string_lossy()).expect_err("not a mountpoint");
        assert!(
            matches!(err, Error::NotADisk(_) | Error::NotBlockBacked { .. }),
            "{err}"
        );
        let _ = std::fs::remove_dir(dir);
    }
}
