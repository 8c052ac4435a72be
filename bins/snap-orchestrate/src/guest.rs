//! What the orchestrator does inside the guest besides freezing: the plan's commands
//! (`guest-exec`, argv only) and the question "is a filesystem on this disk mounted?".

use std::time::Duration;

use evesnap::qga::commands as qga;
use evesnap::qga::Client;

use crate::placement::{compare_address, Located};
use crate::plan::GuestCommand;

pub use evesnap::steps::{CommandRun, FlushReport};

/// Runs one command in the guest and waits for it up to its timeout.
pub fn run_command(client: &mut Client, command: &GuestCommand) -> CommandRun {
    run_command_checked(client, command).0
}

/// [`run_command`], and whether the agent was lost (unreachable or silent) doing so.
pub fn run_command_checked(client: &mut Client, command: &GuestCommand) -> (CommandRun, bool) {
    let args: Vec<&str> = command.args.iter().map(String::as_str).collect();
    let timeout = Duration::from_secs_f64(command.timeout_s);
    evesnap::pending::exec_checked(client, &command.path, &args, timeout, command.fatal)
}

/// A PCI address written `domain:bus:slot.function` in hex (`0000:00:07.0`).
pub fn parse_pci(text: &str) -> Option<(i64, i64, i64, i64)> {
    let (rest, function) = text.rsplit_once('.')?;
    let mut parts = rest.split(':');
    let (domain, bus, slot) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let hex = |s: &str| i64::from_str_radix(s, 16).ok();
    Some((hex(domain)?, hex(bus)?, hex(slot)?, hex(function)?))
}

/// Runs the first of `programs` (same program, usual places) the guest can start.
fn guest_run(
    client: &mut Client,
    programs: &[&str],
    args: &[&str],
    timeout: Duration,
) -> Result<(String, evesnap::qga::ExecResult), String> {
    let mut tried = Vec::new();
    for program in programs {
        match client.guest_exec(program, args, timeout) {
            Ok(done) => return Ok((program.to_string(), done)),
            // Not there (or not runnable): the next one.
            Err(e) => tried.push(format!("{program}: {}", evesnap::exit::chain_of(&e))),
        }
    }
    Err(format!("cannot run it in the guest ({})", tried.join("; ")))
}

/// Flushes the filesystems about to be frozen: `sync -f <mountpoints>…` (a `syncfs` of
/// each), or `sync` when `mountpoints` is empty (every filesystem is frozen). Linux's
/// freeze writes out what is dirty after it has blocked the writers (`freeze_super`:
/// `sync_filesystem` once writes are refused), so what is written here, while the guest
/// still writes, is not written inside anyone's stall. Argv only; a failure is reported,
/// never fatal (the freeze flushes anyway).
pub fn flush(client: &mut Client, mountpoints: &[String], timeout: Duration) -> FlushReport {
    let mut args: Vec<&str> = Vec::new();
    if !mountpoints.is_empty() {
        args.push("-f");
        args.extend(mountpoints.iter().map(String::as_str));
    }
    let ran = guest_run(client, &["/bin/sync", "/usr/bin/sync"], &args, timeout);
    let (program, error) = match ran {
        Ok((program, done)) if done.success() => (program, None),
        Ok((program, done)) => {
            let error = format!(
                "`{program}` exited {:?}: {}",
                done.exitcode,
                String::from_utf8_lossy(&done.stderr).trim()
            );
            (program, Some(error))
        }
        Err(e) => ("sync".to_string(), Some(e)),
    };
    let mut command = vec![program];
    command.extend(args.iter().map(|a| a.to_string()));
    FlushReport {
        command,
        flushed: error.is_none(),
        error,
    }
}

/// Seconds after which the guest puts its RCU setting back by itself, should the run that
/// changed it never get to restore it (killed, agent gone).
pub const RCU_RESTORE_AFTER_S: u32 = 10;

/// Sets `/sys/kernel/rcu_expedited` to 1. The marker file keeps the setting from before
/// (the baseline; one left by an earlier run that never restored it stays the baseline)
/// and this run's token, so the guest's own fallback restore (after `$1` seconds) acts
/// only if this run did not, and never undoes a later run's setting. Argv only: the script
/// is fixed; the delay and the token are its arguments.
const EXPEDITE_RCU: &str = r#"f=/sys/kernel/rcu_expedited; m=/run/evesnap-rcu-expedited; t=$2
if [ -e "$m" ]; then read b old < "$m" || exit 1; else b=$(cat "$f") || exit 1; fi
echo "$b $t" > "$m" || exit 1
echo 1 > "$f" || exit 1
(sleep "$1"; read b2 t2 < "$m" && [ "$t2" = "$t" ] && echo "$b2" > "$f" && rm -f "$m") </dev/null >/dev/null 2>&1 &"#;

/// Puts the baseline from the marker file back and removes it.
const RESTORE_RCU: &str = r#"f=/sys/kernel/rcu_expedited; m=/run/evesnap-rcu-expedited
[ -e "$m" ] || exit 0
read b t < "$m" && echo "$b" > "$f" && rm -f "$m""#;

/// See `freeze.expedite_rcu` in the plan.
pub fn expedite_rcu(client: &mut Client, timeout: Duration) -> Result<(), String> {
    let delay = RCU_RESTORE_AFTER_S.to_string();
    let token = format!("{}-{}", std::process::id(), evesnap::time::now_unix_us());
    run_script(client, EXPEDITE_RCU, &[&delay, &token], timeout)
}

/// Undoes [`expedite_rcu`].
pub fn restore_rcu(client: &mut Client, timeout: Duration) -> Result<(), String> {
    run_script(client, RESTORE_RCU, &[], timeout)
}

fn run_script(
    client: &mut Client,
    script: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<(), String> {
    let mut argv = vec!["-c", script, "sh"];
    argv.extend_from_slice(args);
    let (_, done) = guest_run(client, &["/bin/sh"], &argv, timeout)?;
    if done.success() {
        Ok(())
    } else {
        Err(format!(
            "the guest's sh exited {:?}: {}",
            done.exitcode,
            String::from_utf8_lossy(&done.stderr).trim()
        ))
    }
}

/// Resolves the plan's `disks.*.dev` in the guest to the block device it names, e.g.
/// `/dev/zvol/persist/vault/volumes/v.1` → `/dev/zd16`: `readlink -f`, then `test -b` (a
/// `readlink -f` of a path whose last part does not exist prints the path and succeeds,
/// and a mistyped path must not make every filesystem look unrelated). Argv only.
pub fn resolve_dev(client: &mut Client, dev: &str, timeout: Duration) -> Result<String, String> {
    let (program, done) = guest_run(
        client,
        &["/bin/readlink", "/usr/bin/readlink"],
        &["-f", dev],
        timeout,
    )
    .map_err(|e| format!("readlink: {e}"))?;
    let out = String::from_utf8_lossy(&done.stdout);
    let path = out.trim();
    if !done.success() || !path.starts_with("/dev/") || path.contains(char::is_whitespace) {
        let err = String::from_utf8_lossy(&done.stderr);
        return Err(format!(
            "`{program} -f {dev}` in the guest gave {path:?} (exit {:?}{}): not a device node",
            done.exitcode,
            if err.trim().is_empty() {
                String::new()
            } else {
                format!(", {}", err.trim())
            }
        ));
    }
    let (program, done) = guest_run(
        client,
        &["/bin/test", "/usr/bin/test"],
        &["-b", path],
        timeout,
    )
    .map_err(|e| format!("test: {e}"))?;
    if !done.success() {
        return Err(format!(
            "{dev} resolves to {path}, which is not a block device in the guest (`{program} -b` exit {:?})",
            done.exitcode
        ));
    }
    Ok(path.to_string())
}

/// Is the kernel device `name` (`zd0`, `vda1`, `zd16p2`) the device `base` (`zd0`, `vda`)
/// or one of its partitions?
fn same_device(name: &str, base: &str) -> bool {
    let Some(rest) = name.strip_prefix(base) else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    // vda → vda1; zd0, nvme0n1 → zd0p1, nvme0n1p1 (a digit before the partition number).
    let digits = if base.ends_with(|c: char| c.is_ascii_digit()) {
        rest.strip_prefix('p')
    } else {
        Some(rest)
    };
    digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The kernel name of a device node: `/dev/zd16` → `zd16`.
fn kernel_name(dev: &str) -> &str {
    dev.rsplit('/').next().unwrap_or(dev)
}

/// May the agent's description of a disk be the volume `located`? Where serial, PCI or
/// SCSI address tell, any of them agreeing says yes; else the device node (`dev`, resolved in
/// the guest) decides; with nothing to compare, yes.
fn may_be_disk(address: &qga::GuestDiskAddress, located: &Located, dev: Option<&str>) -> bool {
    let same_dev = match (dev, address.dev.as_deref()) {
        // The agent names the whole disk; the plan may name one of its partitions.
        (Some(want), Some(have)) => Some(same_device(kernel_name(want), kernel_name(have))),
        _ => None,
    };
    let c = compare_address(located, address);
    if c.agree + c.disagree > 0 {
        return c.may_be() || same_dev == Some(true);
    }
    same_dev.unwrap_or(true)
}

/// The guest's mountpoints that sit on the volume `located` (placed by [`crate::placement`]),
/// from `guest-get-fsinfo`; `dev` is the device node the plan's `disks.*.dev` resolved to in
/// the guest ([`resolve_dev`]). An entry that cannot be told apart from the volume counts as
/// on it: a rollback must never guess.
///
/// The agent reports a filesystem on a device without a bus address (a zvol `zdN`, a loop
/// or zram device) with an empty `disk` list: only its kernel name (`name`) can tie it to
/// `disk`, and only through `dev`. Without `dev`, such a filesystem cannot be told apart,
/// so it counts as on the disk.
pub fn mounts_on(
    filesystems: &[qga::GuestFilesystemInfo],
    located: &Located,
    dev: Option<&str>,
) -> Vec<String> {
    filesystems
        .iter()
        .filter(|fs| match dev {
            Some(dev) if fs.disk.is_empty() => same_device(&fs.name, kernel_name(dev)),
            None if fs.disk.is_empty() => true,
            _ => {
                dev.is_some_and(|dev| same_device(&fs.name, kernel_name(dev)))
                    || fs
                        .disk
                        .iter()
                        .any(|address| may_be_disk(address, located, dev))
            }
        })
        .map(|fs| format!("{} ({})", fs.mountpoint, fs.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::GuestDisk;

    fn at(disk: &GuestDisk) -> Located {
        crate::placement::locate(disk, None).expect("placed")
    }

    fn fsinfo(json: &str) -> Vec<qga::GuestFilesystemInfo> {
        serde_json::from_str(json).expect("fsinfo")
    }

    // Verbatim from qemu-ga 7.2 in the lab guest (no udev: no serial).
    const LAB: &str = r#"[{"name": "vdb", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 8, "domain": 0, "function": 0}, "dev": "/dev/vdb", "target": 0}], "used-bytes": 14336, "type": "ext4"}, {"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 7, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}]"#;

    #[test]
    fn matches_by_pci_when_the_agent_reports_no_serial() {
        let fs = fsinfo(LAB);
        let disk0 = GuestDisk {
            serial: Some("disk0".into()),
            pci: Some("0000:00:07.0".into()),
            dev: None,
            ..GuestDisk::default()
        };
        assert_eq!(mounts_on(&fs, &at(&disk0), None), vec!["/data0 (vda)"]);
        let elsewhere = GuestDisk {
            serial: None,
            pci: Some("0000:00:09.0".into()),
            dev: None,
            ..GuestDisk::default()
        };
        assert!(mounts_on(&fs, &at(&elsewhere), None).is_empty());
    }

    #[test]
    fn serial_wins_and_unknown_counts_as_mounted() {
        let with_serial = LAB.replace(
            r#""dev": "/dev/vda""#,
            r#""dev": "/dev/vda", "serial": "disk0""#,
        );
        let fs = fsinfo(&with_serial);
        // The serial says disk0 even though the PCI address given is another one.
        let disk0 = GuestDisk {
            serial: Some("disk0".into()),
            pci: Some("0000:00:09.0".into()),
            dev: None,
            ..GuestDisk::default()
        };
        assert_eq!(mounts_on(&fs, &at(&disk0), None), vec!["/data0 (vda)"]);
        // Nothing to compare: both filesystems may be on it.
        let unknown = GuestDisk {
            serial: Some("diskX".into()),
            pci: None,
            dev: None,
            ..GuestDisk::default()
        };
        assert_eq!(mounts_on(&fsinfo(LAB), &at(&unknown), None).len(), 2);
    }

    // Verbatim from qemu-ga 7.2 inside the OpenZFS lab guest (vsock agent, udev running): the
    // zvols' ext4 filesystems, with no disk address at all.
    const ZVOLS: &str = r#"[{"name": "zd0", "total-bytes": 110621696, "mountpoint": "/mnt/6f1e0a52-3c8d-4b7a-9e21-5d4c3b2a1f00", "disk": [], "used-bytes": 14336, "type": "ext4"}, {"name": "zd16", "total-bytes": 223465472, "mountpoint": "/mnt/a3b9c7d1-2e4f-4a6b-8c0d-1e2f3a4b5c6d", "disk": [], "used-bytes": 14336, "type": "ext4"}]"#;

    #[test]
    fn zvols_are_matched_by_their_resolved_device() {
        let fs = fsinfo(ZVOLS);
        let thick = GuestDisk {
            serial: None,
            pci: None,
            dev: Some("/dev/zvol/persist/vault/volumes/6f1e.1".into()),
            ..GuestDisk::default()
        };
        assert_eq!(
            mounts_on(&fs, &at(&thick), Some("/dev/zd0")),
            vec!["/mnt/6f1e0a52-3c8d-4b7a-9e21-5d4c3b2a1f00 (zd0)"]
        );
        assert_eq!(
            mounts_on(&fs, &at(&thick), Some("/dev/zd16")),
            vec!["/mnt/a3b9c7d1-2e4f-4a6b-8c0d-1e2f3a4b5c6d (zd16)"]
        );
        // zd1 is not zd16's prefix-sibling; zd0p1 is zd0's partition.
        assert!(mounts_on(&fs, &at(&thick), Some("/dev/zd1")).is_empty());
        let part = fsinfo(&ZVOLS.replace(r#""name": "zd0""#, r#""name": "zd0p1""#));
        assert_eq!(mounts_on(&part, &at(&thick), Some("/dev/zd0")).len(), 1);
    }

    /// Serial and PCI address cannot see a zvol's filesystem (the agent reports it with
    /// `disk: []`): it once let a rollback go ahead under mounted zvols. Without `dev`, such
    /// a filesystem now counts as on the disk; with `dev`, its kernel name decides.
    #[test]
    fn filesystems_without_disk_address_count_unless_dev_tells() {
        let fs = fsinfo(ZVOLS);
        let by_pci = GuestDisk {
            serial: Some("persist0".into()),
            pci: Some("0000:00:07.0".into()),
            dev: None,
            ..GuestDisk::default()
        };
        assert_eq!(mounts_on(&fs, &at(&by_pci), None).len(), fs.len());
        let both = GuestDisk {
            dev: Some("/dev/zvol/p/v".into()),
            ..by_pci
        };
        assert_eq!(mounts_on(&fs, &at(&both), Some("/dev/zd16")).len(), 1);
    }

    #[test]
    fn dev_matches_the_agents_device_node() {
        let fs = fsinfo(LAB);
        let by_id = GuestDisk {
            serial: None,
            pci: None,
            dev: Some("/dev/disk/by-id/virtio-disk1".into()),
            ..GuestDisk::default()
        };
        assert_eq!(
            mounts_on(&fs, &at(&by_id), Some("/dev/vdb")),
            vec!["/data1 (vdb)"]
        );
        assert_eq!(
            mounts_on(&fs, &at(&by_id), Some("/dev/vdb1")),
            vec!["/data1 (vdb)"]
        );
        assert!(mounts_on(&fs, &at(&by_id), Some("/dev/vdc")).is_empty());
    }

    #[test]
    fn device_names() {
        assert!(same_device("zd0", "zd0"));
        assert!(same_device("zd0p1", "zd0"));
        assert!(!same_device("zd16", "zd1"));
        assert!(!same_device("zd1p", "zd1"));
        assert!(same_device("vda1", "vda"));
        assert!(!same_device("vdab", "vda"));
        assert!(same_device("nvme0n1p2", "nvme0n1"));
        assert_eq!(kernel_name("/dev/zd16"), "zd16");
    }

    #[test]
    fn pci_addresses_parse() {
        assert_eq!(parse_pci("0000:00:07.0"), Some((0, 0, 7, 0)));
        assert_eq!(parse_pci("0000:0a:1f.3"), Some((0, 10, 31, 3)));
        assert_eq!(parse_pci("00:07.0"), None);
        assert_eq!(parse_pci("0000:00:07"), None);
    }
}
