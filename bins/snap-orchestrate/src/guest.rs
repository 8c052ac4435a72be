//! What the orchestrator does inside the guest besides freezing: the plan's commands
//! (`guest-exec`, argv only) and the question "is a filesystem on this disk mounted?".

use std::time::{Duration, Instant};

use evesnap::qga::commands as qga;
use evesnap::qga::Client;
use serde::Serialize;

use crate::plan::{GuestCommand, GuestDisk};

/// The outcome of one guest command, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct CommandRun {
    pub path: String,
    pub args: Vec<String>,
    pub ok: bool,
    pub fatal: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    pub stdout: String,
    pub stderr: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub output_truncated: bool,
    /// Why it did not succeed (agent error, timeout, exit status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub duration_ms: f64,
}

/// Runs one command in the guest and waits for it up to its timeout.
pub fn run_command(client: &mut Client, command: &GuestCommand) -> CommandRun {
    let started = Instant::now();
    let args: Vec<&str> = command.args.iter().map(String::as_str).collect();
    let result = client.guest_exec(&command.path, &args, Duration::from_secs_f64(command.timeout_s));
    let mut run = CommandRun {
        path: command.path.clone(),
        args: command.args.clone(),
        ok: false,
        fatal: command.fatal,
        exitcode: None,
        signal: None,
        stdout: String::new(),
        stderr: String::new(),
        output_truncated: false,
        error: None,
        duration_ms: 0.0,
    };
    match result {
        Ok(done) => {
            run.ok = done.success();
            run.exitcode = done.exitcode;
            run.signal = done.signal;
            run.stdout = String::from_utf8_lossy(&done.stdout).into_owned();
            run.stderr = String::from_utf8_lossy(&done.stderr).into_owned();
            run.output_truncated = done.stdout_truncated || done.stderr_truncated;
            if !run.ok {
                run.error = Some(match (done.exitcode, done.signal) {
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    (Some(code), None) => format!("exited with status {code}"),
                    (None, None) => "ended without an exit status".into(),
                });
            }
        }
        Err(e) => run.error = Some(evesnap::cli::chain(&anyhow::Error::new(e))),
    }
    run.duration_ms = evesnap::time::millis(started.elapsed());
    run
}

impl CommandRun {
    /// `path arg…: why`, for error messages.
    pub fn describe(&self) -> String {
        let mut argv = self.path.clone();
        for a in &self.args {
            argv.push(' ');
            argv.push_str(a);
        }
        format!("`{argv}` {}", self.error.as_deref().unwrap_or("succeeded"))
    }
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

/// Does the agent's description of a disk designate `disk`? By serial where both sides
/// have one, else by PCI address; `None` when nothing can tell.
fn same_disk(address: &qga::GuestDiskAddress, disk: &GuestDisk) -> Option<bool> {
    if let (Some(want), Some(have)) = (&disk.serial, &address.serial) {
        return Some(want == have);
    }
    let (domain, bus, slot, function) = parse_pci(disk.pci.as_deref()?)?;
    let pci = &address.pci_controller;
    Some(pci.domain == domain && pci.bus == bus && pci.slot == slot && pci.function == function)
}

/// The guest's mountpoints that sit on `disk`, from `guest-get-fsinfo`. An entry that
/// cannot be told apart from `disk` counts as on it: a rollback must never guess.
pub fn mounts_on(filesystems: &[qga::GuestFilesystemInfo], disk: &GuestDisk) -> Vec<String> {
    filesystems
        .iter()
        .filter(|fs| fs.disk.iter().any(|address| same_disk(address, disk) != Some(false)))
        .map(|fs| format!("{} ({})", fs.mountpoint, fs.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fsinfo(json: &str) -> Vec<qga::GuestFilesystemInfo> {
        serde_json::from_str(json).expect("fsinfo")
    }

    // Verbatim from qemu-ga 7.2 in the lab guest (no udev: no serial).
    const LAB: &str = r#"[{"name": "vdb", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 8, "domain": 0, "function": 0}, "dev": "/dev/vdb", "target": 0}], "used-bytes": 14336, "type": "ext4"}, {"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 7, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}]"#;

    #[test]
    fn matches_by_pci_when_the_agent_reports_no_serial() {
        let fs = fsinfo(LAB);
        let disk0 = GuestDisk { serial: Some("disk0".into()), pci: Some("0000:00:07.0".into()) };
        assert_eq!(mounts_on(&fs, &disk0), vec!["/data0 (vda)"]);
        let elsewhere = GuestDisk { serial: None, pci: Some("0000:00:09.0".into()) };
        assert!(mounts_on(&fs, &elsewhere).is_empty());
    }

    #[test]
    fn serial_wins_and_unknown_counts_as_mounted() {
        let with_serial = LAB.replace(r#""dev": "/dev/vda""#, r#""dev": "/dev/vda", "serial": "disk0""#);
        let fs = fsinfo(&with_serial);
        // The serial says disk0 even though the PCI address given is another one.
        let disk0 = GuestDisk { serial: Some("disk0".into()), pci: Some("0000:00:09.0".into()) };
        assert_eq!(mounts_on(&fs, &disk0), vec!["/data0 (vda)"]);
        // Nothing to compare: both filesystems may be on it.
        let unknown = GuestDisk { serial: Some("diskX".into()), pci: None };
        assert_eq!(mounts_on(&fsinfo(LAB), &unknown).len(), 2);
    }

    #[test]
    fn pci_addresses_parse() {
        assert_eq!(parse_pci("0000:00:07.0"), Some((0, 0, 7, 0)));
        assert_eq!(parse_pci("0000:0a:1f.3"), Some((0, 10, 31, 3)));
        assert_eq!(parse_pci("00:07.0"), None);
        assert_eq!(parse_pci("0000:00:07"), None);
    }
}
