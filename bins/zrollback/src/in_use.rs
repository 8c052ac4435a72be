//! Who uses a zvol: a rollback that keeps the newer snapshots renames it, and OpenZFS renames
//! an open or mounted zvol without complaint (measured in the OpenZFS lab: `zfs rename`
//! exits 0), so whoever had it open (a QEMU, a mount) would go on with the kept state. This
//! looks through `/proc` for the zvol's device: mounts (`/proc/self/mountinfo`), processes
//! with it open (`/proc/<pid>/fd`), and devices stacked on it (`/sys/dev/block/*/holders`).
//! A zvol without a device node (`volmode=none`) cannot be open.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// What uses the zvol `dataset` (empty: nothing); read from this machine's `/proc`.
pub fn zvol_users(dataset: &str) -> Vec<String> {
    let Some(rdev) = device_of(&Path::new("/dev/zvol").join(dataset)) else {
        return Vec::new();
    };
    let (major, minor) = split_dev(rdev);
    let mut users = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    users.extend(mounts_of(&mountinfo, major, minor));
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let opened = std::fs::read_dir(entry.path().join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| device_of(&fd.path()) == Some(rdev));
        if opened {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            users.push(format!("process {pid} ({}) has it open", comm.trim()));
        }
    }
    let holders = format!("/sys/dev/block/{major}:{minor}/holders");
    for holder in std::fs::read_dir(holders).into_iter().flatten().flatten() {
        users.push(format!(
            "device {} is stacked on it",
            holder.file_name().to_string_lossy()
        ));
    }
    users
}

/// The block device `path` is (following links), if it is one.
fn device_of(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| meta.rdev())
}

/// Linux's `dev_t` split into major and minor (glibc's `gnu_dev_major`/`gnu_dev_minor`).
fn split_dev(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & 0xffff_f000);
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    (major, minor)
}

/// The mountpoints of `major:minor` in a mountinfo text (field 3 is the device, 5 the
/// mountpoint).
fn mounts_of(mountinfo: &str, major: u64, minor: u64) -> Vec<String> {
    let device = format!("{major}:{minor}");
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            (fields.get(2) == Some(&device.as_str()))
                .then(|| format!("mounted at {}", fields.get(4).unwrap_or(&"?")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// glibc's `gnu_dev_makedev`.
    fn makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xfff) << 8) | ((major & !0xfff) << 32) | (minor & 0xff) | ((minor & !0xff) << 12)
    }

    #[test]
    fn device_numbers_split_as_glibc_does() {
        for (major, minor) in [(230, 32), (259, 1_048_577), (4099, 7)] {
            assert_eq!(split_dev(makedev(major, minor)), (major, minor));
        }
    }

    #[test]
    fn mounts_are_found_by_device_number() {
        let info = "36 25 230:32 / /mnt/vol rw,relatime shared:1 - ext4 /dev/zd32 rw\n\
                    37 25 230:48 / /mnt/other rw,relatime shared:2 - ext4 /dev/zd48 rw\n";
        assert_eq!(mounts_of(info, 230, 32), ["mounted at /mnt/vol"]);
        assert!(mounts_of(info, 230, 16).is_empty());
    }

    #[test]
    fn a_zvol_without_a_device_node_has_no_users() {
        assert!(zvol_users("no-such-pool/no-such-zvol").is_empty());
    }
}
