//! The VM-initiated snapshot protocol: requests a guest sends on the virtio-serial port
//! [`PORT_NAME`] (`eve-guest-agent` in the guest) and the replies of the listener on the
//! host (`snap-orchestrate serve`).
//!
//! # Wire
//! A virtio-serial port is a byte stream without message boundaries, and the host end
//! sees no end of file when the guest process goes away (nor the guest when the host
//! listener restarts, until it reconnects). So every message is **one JSON object on one
//! line** (`\n`-terminated, UTF-8):
//!
//! - The guest starts every request with a bare `\n`, which ends whatever half line an
//!   earlier, killed requester left on the host's side; empty lines are ignored.
//! - The host reads at most [`MAX_REQUEST_LINE`] bytes per line; a longer line is
//!   dropped up to its end and answered with a `bad-request` error. A line that is not a
//!   valid request (not JSON, an unknown field, a wrong type, a bad name) gets a
//!   `bad-request` error reply, carrying the request's `id` when one could be read.
//! - Every reply carries the `id` of its request. A guest drops replies with another id
//!   (or none): a reply to an earlier request that timed out may still be in the pipe
//!   when the next requester opens the port.
//!
//! # Request (guest → host)
//! ```json
//! {"version": 1, "id": "5f0c2a9d81e4b7c3", "op": "create",
//!  "disk": {"path": "/data0", "device": "/dev/vda", "mountpoint": "/data0",
//!           "serial": "disk0", "pci": "0000:00:07.0"},
//!  "name": "before-upgrade"}
//! ```
//! `op` is `create` (optional `name`), `list`, or `rollback` (`to` required). `disk` says
//! what the user named (`path`) and what the guest found out about it: the block device,
//! its mountpoint when mounted, its virtio serial (`/sys/block/<dev>/serial`) and its PCI
//! address (from the sysfs device path). The host trusts none of it beyond choosing among
//! **its own** map of this VM's volumes: it identifies a mounted disk through the guest
//! agent's `guest-get-fsinfo`, an unmounted one by serial and PCI address, and refuses
//! anything that is not exactly one entry of its map. No dataset name, host path or pool
//! ever comes from the guest.
//!
//! # Reply (host → guest)
//! ```json
//! {"version": 1, "id": "5f0c2a9d81e4b7c3", "ok": true, "op": "create",
//!  "disks": ["disk0"], "snapshot": "before-upgrade",
//!  "snapshots": [{"disk": "disk0", "name": "before-upgrade", "guid": "1234…",
//!                 "creation": 1764099000}],
//!  "consistency": "filesystem", "freeze_window_ms": 61.4}
//! {"version": 1, "id": "5f0c2a9d81e4b7c3", "ok": false, "op": "create", "disks": ["disk0"],
//!  "error": {"kind": "preflight-failed", "code": 7, "step": "preflight",
//!            "message": "preflight failed, nothing was changed: disk0: 524288 bytes missing (…)",
//!            "problems": [{"problem": "no-room", "dataset": "disk0", "needed": 1048576,
//!                          "available": 524288, "missing": 524288}]}}
//! ```
//! Disks are named by their guest-visible label (serial, else `pci:<address>`); host
//! dataset and pool names are replaced by it (or by `(host dataset)`) in every message.
//! `error.code` is the host's exit code for the failure (see [`crate::exit`]); `kind` is
//! its name, or one of the listener's own: `bad-request` (2), `unknown-disk` (7), and the
//! guest budget's (see `snap-orchestrate serve --help`):
//! ```json
//! {"kind": "quota-exceeded", "code": 7, "step": "budget", "message": "…",
//!  "quota": {"snapshots": 8, "max_snapshots": 8, "bytes": 52428800, "max_bytes": 209715200}}
//! {"kind": "rate-limited", "code": 8, "step": "budget", "message": "…", "retry_after_s": 18}
//! ```
//! `expired` (4: the request's `deadline_ms` had passed on the guest's clock when the host
//! took it up; nothing was done); `no-room` (7, with `quota`) says the host has no room now; no reply says anything about
//! the pool beyond the guest's own quota.
//!
//! # What a `create` claims
//! `consistency` is what the host can prove, never more:
//! - `application`: the guest sent `quiesced: true`, its filesystems on the disk were
//!   frozen and the freeze verified, and `zfs snapshot` returned before the request's
//!   `deadline_ms` (read on the guest's clock): the guest was still waiting, so its
//!   application was still quiesced. A request without `deadline_ms` has no such bound.
//! - `filesystem`: the disk's mounted filesystems were frozen and the freeze verified,
//!   but the guest did not say it quiesced its application, or its deadline passed
//!   before the snapshot returned (the application may have resumed; the freeze held).
//! - `crash`: nothing was frozen: the disk had no filesystem mounted when the host asked
//!   (a raw-device writer, or a mount in between, is not excluded), so the snapshot is
//!   only as consistent as a power cut. Or the request said `accept_crash: true` and the
//!   freeze failed: the guest was thawed and verified thawed, then the snapshot taken
//!   unfrozen; the reply's `crash_reason` says why the freeze failed.

use crate::report::Consistency;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The name of the virtio-serial port.
pub const PORT_NAME: &str = "org.lfedge.eve.snapshot.0";

/// Where the guest finds the port (a udev rule, or the lab's init, makes the link).
pub const SERIAL_CHANNEL: &str = "/dev/virtio-ports/org.lfedge.eve.snapshot.0";

/// The host's vsock CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = 2;

/// The vsock port of the host's listener: the guest connects to CID 2 on it, one
/// connection per request.
pub const VSOCK_PORT: u32 = 10001;

/// The guest's default channel: the host over vsock.
pub const DEFAULT_CHANNEL: &str = "vsock:2:10001";

/// The protocol version of requests and replies.
pub const VERSION: u32 = 1;

/// Longest request line the host reads (bytes, without the newline).
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// Longest reply line the guest reads (a `list` of many snapshots is long).
pub const MAX_REPLY_LINE: usize = 4 * 1024 * 1024;

/// Longest request id.
pub const MAX_ID_LEN: usize = 64;

/// Longest text field of a request (paths, serials).
pub const MAX_FIELD_LEN: usize = 4096;

/// What the guest asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Create,
    List,
    Rollback,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::List => "list",
            Op::Rollback => "rollback",
        }
    }
}

/// One request, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    /// Chosen by the guest, echoed in the reply: `[A-Za-z0-9._-]`, 1–64 characters.
    pub id: String,
    pub op: Op,
    pub disk: DiskRef,
    /// `create`: the snapshot name (the part after `@`); the host picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `rollback`: the snapshot to go back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// `create`: the guest quiesced its application before asking and keeps it quiesced
    /// until the reply comes (or `deadline_ms` passes). Only then may the snapshot claim
    /// `application` consistency; otherwise a verified freeze gives `filesystem`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quiesced: bool,
    /// When the guest stops waiting for the reply, in milliseconds since the epoch **on
    /// the guest's clock** (`CLOCK_REALTIME`). The host reads the guest's clock through the
    /// guest agent (`guest-get-time`) when it takes the request up, refuses a request
    /// already past it (`expired`) and claims `application` only for a snapshot that
    /// returned before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// `create`: should the freeze fail (refused, timed out, partial, not verified) and the
    /// guest be thawed again, take the snapshot anyway, unfrozen: it is then
    /// `crash`-consistent and the reply says why (`crash_reason`). Without it such a
    /// request fails and nothing is taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub accept_crash: bool,
}

/// The disk a request is about, as the guest sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    /// What the user named: a device or a mountpoint.
    pub path: String,
    /// The block device, e.g. `/dev/vda` (a partition's disk, not the partition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Where it is mounted, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoint: Option<String>,
    /// The virtio serial (`/sys/block/<dev>/serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The PCI address `domain:bus:slot.function`, e.g. `0000:00:07.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<String>,
}

/// Why a request is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// Is `id` an acceptable request id?
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn check_text(what: &str, text: &str) -> Result<(), Invalid> {
    if text.is_empty() {
        return Err(Invalid(format!("`{what}` is empty")));
    }
    if text.len() > MAX_FIELD_LEN {
        return Err(Invalid(format!(
            "`{what}` is longer than {MAX_FIELD_LEN} bytes"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(Invalid(format!("`{what}` contains control characters")));
    }
    Ok(())
}

impl Request {
    /// Parses one line strictly and checks it ([`Request::check`]).
    pub fn from_line(line: &[u8]) -> Result<Request, Invalid> {
        let request: Request = serde_json::from_slice(line)
            .map_err(|e| Invalid(format!("not a valid request: {e}")))?;
        request.check()?;
        Ok(request)
    }

    /// Version, id, names (ZFS rules), and the fields each `op` takes.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.version != VERSION {
            return Err(Invalid(format!(
                "request version {} is not supported (this host speaks version {VERSION})",
                self.version
            )));
        }
        if !valid_id(&self.id) {
            return Err(Invalid(format!(
                "`id` must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-]"
            )));
        }
        let disk = &self.disk;
        check_text("disk.path", &disk.path)?;
        for (what, value) in [
            ("disk.device", &disk.device),
            ("disk.mountpoint", &disk.mountpoint),
            ("disk.serial", &disk.serial),
            ("disk.pci", &disk.pci),
        ] {
            if let Some(value) = value {
                check_text(what, value)?;
            }
        }
        for (what, value) in [
            ("disk.path", Some(&disk.path)),
            ("disk.device", disk.device.as_ref()),
            ("disk.mountpoint", disk.mountpoint.as_ref()),
        ] {
            if value.is_some_and(|v| !v.starts_with('/')) {
                return Err(Invalid(format!("`{what}` must be an absolute guest path")));
            }
        }
        let name_ok = |what: &str, name: &str| {
            crate::zfs::names::check_snapshot_name(name)
                .map_err(|e| Invalid(format!("`{what}`: {e}")))
        };
        match self.op {
            Op::Create => {
                if self.to.is_some() {
                    return Err(Invalid("`to` is only for op `rollback`".into()));
                }
                if let Some(name) = &self.name {
                    name_ok("name", name)?;
                }
            }
            Op::List | Op::Rollback if self.quiesced => {
                return Err(Invalid("`quiesced` is only for op `create`".into()));
            }
            Op::List | Op::Rollback if self.accept_crash => {
                return Err(Invalid("`accept_crash` is only for op `create`".into()));
            }
            Op::List => {
                if self.name.is_some() || self.to.is_some() {
                    return Err(Invalid("op `list` takes no `name` or `to`".into()));
                }
            }
            Op::Rollback => {
                if self.name.is_some() {
                    return Err(Invalid(
                        "`name` is only for op `create` (rollback takes `to`)".into(),
                    ));
                }
                match &self.to {
                    Some(to) => name_ok("to", to)?,
                    None => return Err(Invalid("op `rollback` needs `to`".into())),
                }
            }
        }
        Ok(())
    }

    /// The request as one wire line, with the leading newline that resets the host's
    /// line reader.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = b"\n".to_vec();
        // Plain data: serialising cannot fail.
        line.extend(serde_json::to_vec(self).unwrap_or_default());
        line.push(b'\n');
        line
    }
}

/// The id of a line that failed to parse as a request, when it has a valid one, so that
/// the error reply reaches the requester.
pub fn salvage_id(line: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let id = value.get("id")?.as_str()?;
    valid_id(id).then(|| id.to_string())
}

/// One snapshot in a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// The disk's label (serial, else `pci:<address>`).
    pub disk: String,
    /// The snapshot name (after `@`).
    pub name: String,
    /// Exact, as a string (64-bit).
    pub guid: String,
    /// Seconds since the epoch.
    pub creation: u64,
    /// What the snapshot can claim (`application`, `filesystem`, `crash`), when recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
}

/// A failure, as the guest is told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyError {
    /// `bad-request`, `unknown-disk`, `expired` (the request's `deadline_ms` had passed
    /// when the host took it up; nothing was done), the guest budget's `quota-exceeded` (7),
    /// `no-room` (7) and `rate-limited` (8), or the host's exit-code name
    /// (`preflight-failed`, `step-failed`, `busy`, `agent-unreachable`, `agent-timeout`,
    /// `thaw-failed`).
    pub kind: String,
    /// The host's exit code for it ([`crate::exit::Exit`]).
    pub code: u8,
    pub message: String,
    /// The step of the flow that failed (`preflight`, `freeze`, `snapshot`, `thaw`,
    /// `unmounted`, `rollback`), when the flow ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The preflight's findings (no room with the numbers, name taken, newer snapshots…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<crate::zfs::Problem>,
    /// `quota-exceeded`, `no-room`: this VM's guest snapshots against its budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Box<GuestQuota>>,
    /// `rate-limited`, `busy`: seconds after which the same request may succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u32>,
}

/// A VM's guest snapshots against the listener's budget (only the guest's own numbers:
/// nothing about the pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuestQuota {
    /// Guest snapshot sets of this VM (one per name across its disks).
    pub snapshots: u64,
    pub max_snapshots: u64,
    /// The space they hold: the sum of their `used` as zfs reports it.
    pub bytes: u64,
    /// The byte quota, when the host set it in bytes; absent when it is a share of the
    /// pool, which it would tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// One reply, as sent on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub version: u32,
    /// The request's id; `null` when the request had none that could be read.
    pub id: Option<String>,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<Op>,
    /// Labels of the disks the request was found to be about.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<String>,
    /// `create`: the name taken; `rollback`: the name rolled back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// `create`: the snapshots taken; `list`: every snapshot, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotEntry>>,
    /// `create`: `application`, `filesystem` or `crash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// `create`: from the freeze returning to the thaw returning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_ms: Option<f64>,
    /// `create` with `accept_crash`: why the snapshot is only `crash`-consistent (the
    /// freeze failed; the guest was thawed before it was taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_reason: Option<String>,
    /// `rollback`: snapshots destroyed because they were newer (none unless allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
}

impl Reply {
    /// A reply with nothing filled in but what every reply has.
    fn base(id: Option<String>, ok: bool, op: Option<Op>) -> Reply {
        Reply {
            version: VERSION,
            id,
            ok,
            op,
            disks: Vec::new(),
            snapshot: None,
            snapshots: None,
            consistency: None,
            freeze_window_ms: None,
            crash_reason: None,
            destroyed: None,
            error: None,
        }
    }

    /// A successful reply to `request`, its results still to fill in.
    pub fn success(request: &Request) -> Reply {
        Reply::base(Some(request.id.clone()), true, Some(request.op))
    }

    /// A failure reply.
    pub fn failure(id: Option<String>, op: Option<Op>, error: ReplyError) -> Reply {
        Reply {
            error: Some(error),
            ..Reply::base(id, false, op)
        }
    }

    /// The reply as one wire line.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}
