//! `snap-orchestrate serve`: the host end of VM-initiated snapshots.
//!
//! QEMU serves the VM's virtio-serial port `org.lfedge.eve.snapshot.0` as a Unix socket
//! (`-chardev socket,server=on`); this listener connects to it as the one client, keeps the
//! connection, and reconnects when QEMU restarts. It reads JSON-line requests from
//! `eve-guest-agent` in the guest (protocol in [`evesnap::request`]) and serves them one at
//! a time:
//!
//! 1. The request is parsed strictly (unknown fields, wrong types, names against ZFS
//!    rules, at most [`MAX_REQUEST_LINE`] bytes); anything else gets a `bad-request`
//!    reply and the listener reads on.
//! 2. The disk is identified against **this VM's volumes map** only (`--volumes`: dataset →
//!    `{serial, pci}`, the shape of the plan's `disks`): a mounted disk through the guest
//!    agent's `guest-get-fsinfo` (serial where reported, else PCI address; the guest's own
//!    claims must agree), an unmounted one by the serial and PCI address the guest read
//!    from sysfs. Exactly one entry must match, else `unknown-disk`. The guest never names
//!    a dataset: the worst it can do is ask for its own volumes.
//! 3. `create` and `rollback` build a [`Plan`] and run the orchestrator's own flow
//!    ([`flow::execute_with`]): preflight with the space check, freeze (the disk's
//!    filesystems through qemu-ga), one snapshot, thaw; or zrollback's checks, "not mounted
//!    in the guest", rollback (newer snapshots are never destroyed for a guest). `list`
//!    reads the snapshots.
//! 4. The reply goes back with the request's id; host dataset and pool names in it are
//!    replaced by the disk's guest-visible label. One JSON line per request (request,
//!    reply, the flow's full report) goes to stdout for the host's records.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evesnap::cli::Outcome;
use evesnap::document::Document;
use evesnap::exit::{coded, Exit};
use evesnap::qga::commands::{GuestDiskAddress, GuestFilesystemInfo};
use evesnap::qga::{Address, Client};
use evesnap::request::{
    self, DiskRef, Op, Reply, ReplyError, Request, SnapshotEntry, MAX_REQUEST_LINE,
};
use evesnap::zfs::{self, Zfs};
use serde_json::{json, Value};

use crate::flow::{self, Signals};
use crate::guest::parse_pci;
use crate::plan::{GuestDisk, Plan};

/// Largest volumes map read.
const MAX_VOLUMES_BYTES: u64 = 1024 * 1024;
/// How often a blocked read looks at the signals.
const READ_TICK: Duration = Duration::from_millis(250);
/// A guest that does not read its replies cannot block the listener longer than this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between connection attempts while QEMU's socket is missing or refuses.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The host end of the VM's request port: QEMU's `-chardev socket,path=PATH,server=on`
    /// behind `virtserialport,name=org.lfedge.eve.snapshot.0`.
    #[arg(long, value_name = "SOCKET")]
    pub channel: PathBuf,
    /// The VM's guest agent: `unix:<path>`, a plain path, or `vsock:<cid>:<port>`.
    #[arg(long, value_name = "ADDRESS")]
    pub agent: String,
    /// JSON map of this VM's volumes: `{"<dataset>": {"serial": "disk0", "pci":
    /// "0000:00:07.0"}, ...}` (the plan's `disks`). Only these can be named by the guest.
    #[arg(long, value_name = "FILE")]
    pub volumes: PathBuf,
    /// The zfs program (default: `zfs` on PATH, then /usr/sbin/zfs).
    #[arg(long, env = zfs::ENV, hide_env_values = true, value_name = "PATH")]
    pub zfs: Option<PathBuf>,
    /// Deadline of each guest agent call, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub timeout: f64,
    /// The auto-thaw watchdog's deadline for a freeze, in seconds (0 = off).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub thaw_after: f64,
}

/// This VM's volumes: dataset → how the guest sees it.
pub type Volumes = BTreeMap<String, GuestDisk>;

/// Reads and checks a volumes map.
pub fn load_volumes(path: &Path) -> Result<Volumes, anyhow::Error> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_VOLUMES_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| {
            coded(
                Exit::Usage,
                format!("cannot read the volumes map {}: {e}", path.display()),
            )
        })?;
    if text.len() as u64 > MAX_VOLUMES_BYTES {
        return Err(coded(
            Exit::Usage,
            format!("the volumes map is larger than {MAX_VOLUMES_BYTES} bytes"),
        ));
    }
    let volumes: Volumes = serde_json::from_str(&text).map_err(|e| {
        coded(
            Exit::Usage,
            format!("the volumes map {} is not valid: {e}", path.display()),
        )
    })?;
    check_volumes(&volumes).map_err(|e| {
        coded(
            Exit::Usage,
            format!("the volumes map {}: {e}", path.display()),
        )
    })?;
    Ok(volumes)
}

/// Every entry names a valid dataset and can be told apart from the others.
pub fn check_volumes(volumes: &Volumes) -> Result<(), String> {
    if volumes.is_empty() {
        return Err("it names no volume".into());
    }
    let mut serials = BTreeSet::new();
    let mut pcis = BTreeSet::new();
    for (dataset, disk) in volumes {
        zfs::names::check_dataset(dataset).map_err(|e| e.to_string())?;
        if disk.serial.is_none() && disk.pci.is_none() {
            return Err(format!("{dataset} has neither `serial` nor `pci`"));
        }
        if let Some(serial) = &disk.serial {
            if serial.is_empty() || serial.chars().any(char::is_control) {
                return Err(format!(
                    "{dataset}: `serial` is empty or has control characters"
                ));
            }
            if !serials.insert(serial.clone()) {
                return Err(format!("serial {serial} is given to two volumes"));
            }
        }
        if let Some(pci) = &disk.pci {
            let Some(address) = parse_pci(pci) else {
                return Err(format!(
                    "{dataset}: `pci` {pci:?} is not domain:bus:slot.function"
                ));
            };
            if !pcis.insert(address) {
                return Err(format!("PCI address {pci} is given to two volumes"));
            }
        }
    }
    Ok(())
}

/// The name a disk has for the guest: its serial, else `pci:<address>`.
pub fn label(disk: &GuestDisk) -> String {
    match (&disk.serial, &disk.pci) {
        (Some(serial), _) => serial.clone(),
        (None, Some(pci)) => format!("pci:{pci}"),
        (None, None) => "?".into(),
    }
}

type Pci = (i64, i64, i64, i64);

/// Does `entry` agree with what is known of a disk? Every identifier both sides have
/// must be equal, and at least one must be compared.
fn designates(entry: &GuestDisk, serial: Option<&str>, pci: Option<Pci>) -> bool {
    let mut compared = false;
    if let (Some(want), Some(have)) = (entry.serial.as_deref(), serial) {
        if want != have {
            return false;
        }
        compared = true;
    }
    if let (Some(want), Some(have)) = (entry.pci.as_deref().and_then(parse_pci), pci) {
        if want != have {
            return false;
        }
        compared = true;
    }
    compared
}

fn agent_pci(address: &GuestDiskAddress) -> Option<Pci> {
    let p = &address.pci_controller;
    let pci = (p.domain, p.bus, p.slot, p.function);
    (pci.0 >= 0 && pci.1 >= 0 && pci.2 >= 0 && pci.3 >= 0).then_some(pci)
}

/// The volumes the request is about, and the guest mountpoints on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    pub datasets: Vec<String>,
    pub mountpoints: Vec<String>,
}

fn refuse(kind: &str, exit: Exit, message: String) -> ReplyError {
    ReplyError {
        kind: kind.into(),
        code: exit.code(),
        message,
        step: None,
        problems: Vec::new(),
    }
}

fn unknown(message: String) -> ReplyError {
    refuse("unknown-disk", Exit::Preflight, message)
}

/// Finds the volumes of `volumes` that the guest's `disk` designates. `fsinfo` is the
/// guest agent's `guest-get-fsinfo` (`None` when it could not be asked: only the guest's
/// sysfs claims are left then).
pub fn identify(
    volumes: &Volumes,
    disk: &DiskRef,
    fsinfo: Option<&[GuestFilesystemInfo]>,
) -> Result<Identified, ReplyError> {
    let claimed_pci = match disk.pci.as_deref() {
        Some(text) => Some(parse_pci(text).ok_or_else(|| {
            refuse(
                "bad-request",
                Exit::Usage,
                format!("`disk.pci` {text:?} is not domain:bus:slot.function"),
            )
        })?),
        None => None,
    };
    let claimed: Vec<&String> = volumes
        .iter()
        .filter(|(_, e)| designates(e, disk.serial.as_deref(), claimed_pci))
        .map(|(d, _)| d)
        .collect();
    let describe_claim = || {
        format!(
            "serial {}, PCI address {}",
            disk.serial.as_deref().unwrap_or("(none)"),
            disk.pci.as_deref().unwrap_or("(none)")
        )
    };

    if let Some(fsinfo) = fsinfo {
        let hits: Vec<&GuestFilesystemInfo> = match (&disk.mountpoint, &disk.device) {
            (Some(mountpoint), _) => fsinfo
                .iter()
                .filter(|fs| fs.mountpoint == *mountpoint)
                .collect(),
            (None, Some(device)) => fsinfo
                .iter()
                .filter(|fs| {
                    format!("/dev/{}", fs.name) == *device
                        || fs.disk.iter().any(|a| a.dev.as_deref() == Some(device))
                })
                .collect(),
            (None, None) => Vec::new(),
        };
        if !hits.is_empty() {
            let mut datasets = BTreeSet::new();
            for fs in &hits {
                if fs.disk.is_empty() {
                    return Err(unknown(format!(
                        "the guest agent reports no disk under {} ({}): it is not one of this VM's volumes",
                        fs.mountpoint, fs.name
                    )));
                }
                for address in &fs.disk {
                    let serial = address.serial.as_deref().filter(|s| !s.is_empty());
                    let pci = agent_pci(address);
                    let found: Vec<&String> = volumes
                        .iter()
                        .filter(|(_, e)| designates(e, serial, pci))
                        .map(|(d, _)| d)
                        .collect();
                    match found.as_slice() {
                        [dataset] => {
                            datasets.insert((*dataset).clone());
                        }
                        _ => {
                            let pci = pci.map_or("(none)".to_string(), |(d, b, s, f)| {
                                format!("{d:04x}:{b:02x}:{s:02x}.{f:x}")
                            });
                            return Err(unknown(format!(
                                "{} is on a disk that is not one of this VM's volumes (the guest agent reports serial {}, PCI address {pci})",
                                disk.path,
                                serial.unwrap_or("(none)"),
                            )));
                        }
                    }
                }
            }
            if (disk.serial.is_some() || disk.pci.is_some())
                && !claimed.iter().any(|d| datasets.contains(*d))
            {
                return Err(unknown(format!(
                    "{}: the disk the guest describes ({}) is not the one the guest agent reports under it",
                    disk.path,
                    describe_claim()
                )));
            }
            let entries: Vec<&GuestDisk> = datasets.iter().filter_map(|d| volumes.get(d)).collect();
            let mountpoints: Vec<String> = fsinfo
                .iter()
                .filter(|fs| {
                    fs.disk.iter().any(|a| {
                        let serial = a.serial.as_deref().filter(|s| !s.is_empty());
                        entries.iter().any(|e| designates(e, serial, agent_pci(a)))
                    })
                })
                .map(|fs| fs.mountpoint.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            return Ok(Identified {
                datasets: datasets.into_iter().collect(),
                mountpoints,
            });
        }
        if let Some(mountpoint) = &disk.mountpoint {
            return Err(unknown(format!(
                "the guest agent does not list {mountpoint} as a mounted filesystem"
            )));
        }
    }
    // Not mounted: the guest's sysfs claims, checked against this VM's map only.
    if disk.serial.is_none() && disk.pci.is_none() {
        return Err(unknown(format!(
            "{} is not mounted and the guest sent neither its serial nor its PCI address",
            disk.path
        )));
    }
    match claimed.as_slice() {
        [dataset] => Ok(Identified {
            datasets: vec![(*dataset).clone()],
            mountpoints: Vec::new(),
        }),
        _ => Err(unknown(format!(
            "{} ({}) is not one of this VM's volumes",
            disk.path,
            describe_claim()
        ))),
    }
}

/// Replaces host dataset and pool names by the guest's labels in text shown to the guest.
#[derive(Debug, Clone)]
pub struct Redactor {
    datasets: BTreeMap<String, String>,
    pools: BTreeSet<String>,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:-/@#".contains(c)
}

impl Redactor {
    pub fn new(volumes: &Volumes) -> Redactor {
        Redactor {
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

    pub fn value(&self, value: Value) -> Value {
        match value {
            Value::String(s) => Value::String(self.text(&s)),
            Value::Array(items) => Value::Array(items.into_iter().map(|v| self.value(v)).collect()),
            Value::Object(map) => {
                Value::Object(map.into_iter().map(|(k, v)| (k, self.value(v))).collect())
            }
            other => other,
        }
    }
}

/// The preflight findings in an error chain, if the flow failed in a preflight.
fn problems_of(error: &anyhow::Error) -> Vec<Value> {
    for cause in error.chain() {
        let zfs_error = cause.downcast_ref::<zfs::Error>().or_else(|| {
            cause
                .downcast_ref::<evesnap::exit::WithExit>()
                .and_then(|w| w.inner().downcast_ref::<zfs::Error>())
        });
        if let Some(zfs::Error::Preflight { problems }) = zfs_error {
            return problems
                .iter()
                .filter_map(|p| serde_json::to_value(p).ok())
                .collect();
        }
    }
    Vec::new()
}

/// What one served request produced, for the host's records on stdout.
#[derive(Debug)]
pub struct Served {
    pub request: Option<Request>,
    pub reply: Reply,
    pub report: Option<Document>,
}

/// The listener's state.
pub struct Server {
    volumes: Volumes,
    agent_text: String,
    agent: Address,
    zfs: Zfs,
    timeout: Duration,
    thaw_after: f64,
    redactor: Redactor,
    signals: Signals,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("agent", &self.agent_text)
            .field("volumes", &self.volumes)
            .finish()
    }
}

impl Server {
    fn bad_request(id: Option<String>, message: String) -> Served {
        Served {
            request: None,
            reply: Reply::failure(id, None, refuse("bad-request", Exit::Usage, message)),
            report: None,
        }
    }

    /// Serves one line read from the channel.
    pub fn handle_line(&mut self, line: &[u8]) -> Served {
        let request = match Request::from_line(line) {
            Ok(request) => request,
            Err(e) => return Server::bad_request(request::salvage_id(line), e.0),
        };
        let (reply, report) = self.handle(&request);
        Served {
            request: Some(request),
            reply,
            report,
        }
    }

    fn fsinfo(&self) -> Result<Vec<GuestFilesystemInfo>, evesnap::qga::Error> {
        let mut client = Client::connect(&self.agent, Instant::now() + self.timeout)?;
        client.set_timeout(self.timeout);
        client.fsinfo()
    }

    fn handle(&mut self, request: &Request) -> (Reply, Option<Document>) {
        let fail =
            |error: ReplyError| Reply::failure(Some(request.id.clone()), Some(request.op), error);
        let fsinfo = match self.fsinfo() {
            Ok(fsinfo) => Some(fsinfo),
            // Listing needs no agent: the guest's own description has to do.
            Err(e) if request.op == Op::List => {
                evesnap::warn!("guest-get-fsinfo failed ({}); identifying the disk by its serial and PCI address", e);
                None
            }
            Err(e) => {
                let error = anyhow::Error::new(e);
                let exit = evesnap::cli::exit_of(&error);
                let message = self.redactor.text(&evesnap::cli::chain(
                    &error.context("cannot ask the guest agent which disk that is"),
                ));
                return (fail(refuse(exit.kind(), exit, message)), None);
            }
        };
        let identified = match identify(&self.volumes, &request.disk, fsinfo.as_deref()) {
            Ok(identified) => identified,
            Err(error) => return (fail(error), None),
        };
        let labels: Vec<String> = identified
            .datasets
            .iter()
            .filter_map(|d| self.volumes.get(d))
            .map(label)
            .collect();
        let (mut reply, report) = match request.op {
            Op::List => (self.list(request, &identified), None),
            Op::Create | Op::Rollback => self.run_flow(request, &identified),
        };
        reply.disks = labels;
        (reply, report)
    }

    fn list(&self, request: &Request, identified: &Identified) -> Reply {
        let mut entries = Vec::new();
        for dataset in &identified.datasets {
            match self.zfs.snapshots(dataset, &[flow::CONSISTENCY_PROPERTY]) {
                Ok(list) => {
                    let disk = self.volumes.get(dataset).map(label).unwrap_or_default();
                    entries.extend(list.into_iter().map(|s| SnapshotEntry {
                        disk: disk.clone(),
                        name: s.short_name().to_string(),
                        guid: s.guid.clone(),
                        createtxg: s.createtxg,
                        creation: s.creation,
                        consistency: s.properties.get(flow::CONSISTENCY_PROPERTY).cloned(),
                    }));
                }
                Err(e) => {
                    let error = anyhow::Error::new(e);
                    let exit = evesnap::cli::exit_of(&error);
                    let message = self.redactor.text(&evesnap::cli::chain(&error));
                    return Reply::failure(
                        Some(request.id.clone()),
                        Some(request.op),
                        refuse(exit.kind(), exit, message),
                    );
                }
            }
        }
        let mut reply = Reply::success(request);
        reply.snapshots = Some(entries);
        reply
    }

    /// The plan for a guest's request: the orchestrator's flow, on the identified volumes.
    fn plan(&self, request: &Request, identified: &Identified) -> Result<Plan, crate::plan::Error> {
        let disks: BTreeMap<&String, &GuestDisk> = identified
            .datasets
            .iter()
            .filter_map(|d| self.volumes.get_key_value(d))
            .collect();
        let mut plan = json!({
            "version": crate::plan::VERSION,
            "id": uuid::Uuid::new_v4(),
            "type": "immediate",
            "action": request.op.as_str(),
            "agent": self.agent_text,
            "datasets": identified.datasets,
            "freeze": {
                "mountpoints": identified.mountpoints,
                "timeout_s": self.timeout.as_secs_f64(),
                "thaw_after_s": self.thaw_after,
                "required": true,
            },
            "disks": disks,
        });
        match request.op {
            Op::Create => {
                let name = request.name.clone().unwrap_or_else(|| {
                    format!(
                        "guest-{}",
                        evesnap::time::eve_timestamp(time::OffsetDateTime::now_utc())
                    )
                });
                plan["snapshot"] = json!(name);
                // The user asked from inside the guest, with the application quiesced.
                plan["application_quiesced"] = json!(true);
            }
            Op::Rollback => plan["rollback"] = json!({"to": request.to, "destroy_newer": false}),
            Op::List => {}
        }
        Plan::from_json(&plan.to_string())
    }

    fn run_flow(
        &mut self,
        request: &Request,
        identified: &Identified,
    ) -> (Reply, Option<Document>) {
        let plan = match self.plan(request, identified) {
            Ok(plan) => plan,
            Err(e) => {
                let message = self
                    .redactor
                    .text(&evesnap::cli::chain(&anyhow::Error::new(e)));
                return (
                    Reply::failure(
                        Some(request.id.clone()),
                        Some(request.op),
                        refuse("bad-request", Exit::Usage, message),
                    ),
                    None,
                );
            }
        };
        evesnap::note!(
            "request {}: {} on {} (plan {})",
            request.id,
            request.op.as_str(),
            identified.datasets.join(", "),
            plan.id()
        );
        let outcome = flow::execute_with(&plan, &self.zfs, &mut self.signals);
        let report = outcome.document;
        let extra = report.as_ref().map(|d| d.extra.clone()).unwrap_or_default();
        if let Some(error) = &outcome.error {
            let exit = evesnap::cli::exit_of(error);
            let step = report
                .as_ref()
                .and_then(|d| d.error.as_ref())
                .and_then(|e| e.extra.get("step"))
                .and_then(Value::as_str)
                .map(str::to_string);
            let problems = problems_of(error)
                .into_iter()
                .map(|p| self.redactor.value(p))
                .collect();
            let mut reply = Reply::failure(
                Some(request.id.clone()),
                Some(request.op),
                ReplyError {
                    kind: exit.kind().into(),
                    code: exit.code(),
                    message: self.redactor.text(&evesnap::cli::chain(error)),
                    step,
                    problems,
                },
            );
            reply.consistency = extra
                .get("consistency")
                .and_then(Value::as_str)
                .map(str::to_string);
            return (reply, report);
        }
        let mut reply = Reply::success(request);
        reply.snapshot = report.as_ref().and_then(|d| d.snapshot.clone());
        match request.op {
            Op::Create => {
                let taken: Vec<zfs::SnapshotInfo> = extra
                    .get("snapshots")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default();
                reply.snapshots = Some(
                    taken
                        .iter()
                        .map(|s| SnapshotEntry {
                            disk: self.volumes.get(s.dataset()).map(label).unwrap_or_default(),
                            name: s.short_name().to_string(),
                            guid: s.guid.clone(),
                            createtxg: s.createtxg,
                            creation: s.creation,
                            consistency: extra
                                .get("consistency")
                                .and_then(Value::as_str)
                                .map(str::to_string),
                        })
                        .collect(),
                );
                reply.consistency = extra
                    .get("consistency")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                reply.freeze_window_ms = extra.get("freeze_window_ms").and_then(Value::as_f64);
            }
            Op::Rollback => {
                let destroyed: Vec<String> = extra
                    .get("destroyed")
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .unwrap_or_default();
                reply.destroyed = Some(destroyed.iter().map(|s| self.redactor.text(s)).collect());
            }
            Op::List => {}
        }
        (reply, report)
    }

    fn stop_requested(&mut self) -> bool {
        self.signals.caught().is_some()
    }
}

/// How a session on one connection ended.
enum End {
    Stop,
    Closed,
    Broken(std::io::Error),
}

fn record(served: &Served, line: &[u8]) {
    let request = match &served.request {
        Some(r) => json!(r),
        None => {
            let text = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
            json!({"unparsed": text, "bytes": line.len()})
        }
    };
    let entry = json!({
        "at": evesnap::time::now_rfc3339(),
        "request": request,
        "reply": served.reply,
        "report": served.report.as_ref().map(|d| serde_json::from_str::<Value>(&d.to_json()).unwrap_or(Value::Null)),
    });
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{entry}").and_then(|()| stdout.flush());
    match &served.reply.error {
        None => evesnap::note!(
            "request {}: {} done",
            served.reply.id.as_deref().unwrap_or("-"),
            served.reply.op.map_or("?", Op::as_str)
        ),
        Some(e) => evesnap::note!(
            "request {}: refused ({}): {}",
            served.reply.id.as_deref().unwrap_or("-"),
            e.kind,
            e.message
        ),
    }
}

fn oversized() -> Served {
    let message = format!("request line longer than {MAX_REQUEST_LINE} bytes: dropped");
    Served {
        request: None,
        reply: Reply::failure(None, None, refuse("bad-request", Exit::Usage, message)),
        report: None,
    }
}

fn send(stream: &mut UnixStream, reply: &Reply) -> std::io::Result<()> {
    // The leading newline ends any half line an interrupted write left in the pipe.
    let mut bytes = b"\n".to_vec();
    bytes.extend(reply.to_line());
    stream.write_all(&bytes)?;
    stream.flush()
}

impl Server {
    fn session(&mut self, mut stream: UnixStream) -> End {
        if let Err(e) = stream
            .set_read_timeout(Some(READ_TICK))
            .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)))
        {
            return End::Broken(e);
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut discarding = false;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if self.stop_requested() {
                return End::Stop;
            }
            let n = match stream.read(&mut chunk) {
                Ok(0) => return End::Closed,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return End::Broken(e),
            };
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                if std::mem::take(&mut discarding) {
                    continue; // the end of an oversized line, answered already
                }
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let served = if line.len() > MAX_REQUEST_LINE {
                    oversized()
                } else {
                    self.handle_line(line)
                };
                record(&served, line);
                if let Err(e) = send(&mut stream, &served.reply) {
                    return End::Broken(e);
                }
                if self.stop_requested() {
                    return End::Stop;
                }
            }
            if buf.len() > MAX_REQUEST_LINE && !discarding {
                let served = oversized();
                record(&served, &buf);
                buf.clear();
                discarding = true;
                if let Err(e) = send(&mut stream, &served.reply) {
                    return End::Broken(e);
                }
            } else if discarding {
                buf.clear();
            }
        }
    }
}

/// One listener per channel on this host: a second would connect and never be served.
fn lock_channel(channel: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, anyhow::Error> {
    let dir = evesnap::runtime_dir().join("locks");
    std::fs::create_dir_all(&dir).map_err(|e| {
        coded(
            Exit::StepFailed,
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let text = channel.to_string_lossy();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("serve-{hash:016x}.lock"));
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            coded(
                Exit::StepFailed,
                format!("cannot open the lock {}: {e}", path.display()),
            )
        })?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
        coded(
            Exit::Busy,
            format!(
                "another listener serves {} (lock {})",
                channel.display(),
                path.display()
            ),
        )
    })
}

/// Runs the listener until SIGINT, SIGTERM or SIGHUP.
pub fn run(args: &ServeArgs) -> Outcome {
    match serve(args) {
        Ok(()) => Outcome::default(),
        Err(e) => Outcome::error(e),
    }
}

fn serve(args: &ServeArgs) -> Result<(), anyhow::Error> {
    let agent: Address = args
        .agent
        .parse()
        .map_err(|e| coded(Exit::Usage, format!("--agent {}: {e}", args.agent)))?;
    for (what, value) in [
        ("--timeout", args.timeout),
        ("--thaw-after", args.thaw_after),
    ] {
        if !value.is_finite() || value < 0.0 || (what == "--timeout" && value == 0.0) {
            return Err(coded(
                Exit::Usage,
                format!("{what} must be a positive number of seconds"),
            ));
        }
    }
    let volumes = load_volumes(&args.volumes)?;
    let zfs = Zfs::locate(args.zfs.as_deref()).map_err(anyhow::Error::new)?;
    let _lock = lock_channel(&args.channel)?;
    let signals = Signals::install()
        .map_err(|e| anyhow::Error::new(e).context("cannot install signal handlers"))?;
    let mut server = Server {
        redactor: Redactor::new(&volumes),
        volumes,
        agent_text: args.agent.clone(),
        agent,
        zfs,
        timeout: Duration::from_secs_f64(args.timeout),
        thaw_after: args.thaw_after,
        signals,
    };
    evesnap::note!(
        "serving {} for {} volume(s): {}",
        args.channel.display(),
        server.volumes.len(),
        server
            .volumes
            .iter()
            .map(|(d, disk)| format!("{} = {d}", label(disk)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut waiting = false;
    loop {
        if server.stop_requested() {
            evesnap::note!("stopping on a signal");
            return Ok(());
        }
        match UnixStream::connect(&args.channel) {
            Ok(stream) => {
                evesnap::note!("connected to {}", args.channel.display());
                waiting = false;
                match server.session(stream) {
                    End::Stop => {
                        evesnap::note!("stopping on a signal");
                        return Ok(());
                    }
                    End::Closed => {
                        evesnap::note!("the channel closed (QEMU stopped?); reconnecting")
                    }
                    End::Broken(e) => evesnap::warn!("the channel failed ({e}); reconnecting"),
                }
            }
            Err(e) => {
                if !waiting {
                    evesnap::note!("waiting for {} ({e})", args.channel.display());
                    waiting = true;
                }
                let until = Instant::now() + RECONNECT_PAUSE;
                while Instant::now() < until && !server.stop_requested() {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volumes() -> Volumes {
        serde_json::from_str(
            r#"{"pool/vm0/disk0": {"serial": "disk0", "pci": "0000:00:07.0"},
                "pool/vm0/disk1": {"serial": "disk1", "pci": "0000:00:08.0"}}"#,
        )
        .expect("volumes")
    }

    // Verbatim from qemu-ga 7.2 in the lab guest (no udev: no serial).
    const LAB: &str = r#"[{"name": "vdb", "total-bytes": 52685824, "mountpoint": "/data1", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 8, "domain": 0, "function": 0}, "dev": "/dev/vdb", "target": 0}], "used-bytes": 14336, "type": "ext4"}, {"name": "vda", "total-bytes": 52685824, "mountpoint": "/data0", "disk": [{"bus-type": "virtio", "bus": 0, "unit": 0, "pci-controller": {"bus": 0, "slot": 7, "domain": 0, "function": 0}, "dev": "/dev/vda", "target": 0}], "used-bytes": 14336, "type": "ext4"}]"#;

    fn fsinfo(json: &str) -> Vec<GuestFilesystemInfo> {
        serde_json::from_str(json).expect("fsinfo")
    }

    fn disk(
        path: &str,
        device: &str,
        mountpoint: Option<&str>,
        serial: Option<&str>,
        pci: Option<&str>,
    ) -> DiskRef {
        DiskRef {
            path: path.into(),
            device: Some(device.into()),
            mountpoint: mountpoint.map(str::to_string),
            serial: serial.map(str::to_string),
            pci: pci.map(str::to_string),
        }
    }

    #[test]
    fn a_mounted_disk_is_found_through_the_agent() {
        let fs = fsinfo(LAB);
        let d = disk(
            "/data0",
            "/dev/vda",
            Some("/data0"),
            Some("disk0"),
            Some("0000:00:07.0"),
        );
        let id = identify(&volumes(), &d, Some(&fs)).expect("identified");
        assert_eq!(
            id,
            Identified {
                datasets: vec!["pool/vm0/disk0".into()],
                mountpoints: vec!["/data0".into()]
            }
        );
        // By device, without claims.
        let d = disk("/dev/vdb", "/dev/vdb", None, None, None);
        assert_eq!(
            identify(&volumes(), &d, Some(&fs))
                .expect("identified")
                .datasets,
            ["pool/vm0/disk1"]
        );
    }

    #[test]
    fn claims_that_contradict_the_agent_are_refused() {
        let fs = fsinfo(LAB);
        let d = disk("/data0", "/dev/vda", Some("/data0"), Some("disk1"), None);
        let e = identify(&volumes(), &d, Some(&fs)).expect_err("contradiction");
        assert_eq!((e.kind.as_str(), e.code), ("unknown-disk", 7));
        assert!(
            e.message.contains("not the one the guest agent reports"),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_unmounted_disk_is_found_by_its_claims_within_the_map_only() {
        let fs = fsinfo(
            &LAB.replace("/data0", "/elsewhere")
                .replace("\"vda\"", "\"vdz\"")
                .replace("/dev/vda", "/dev/vdz"),
        );
        let d = disk(
            "/dev/vda",
            "/dev/vda",
            None,
            Some("disk0"),
            Some("0000:00:07.0"),
        );
        assert_eq!(
            identify(&volumes(), &d, Some(&fs))
                .expect("identified")
                .datasets,
            ["pool/vm0/disk0"]
        );
        // Serial of one volume, PCI address of the other: no.
        let d = disk(
            "/dev/vda",
            "/dev/vda",
            None,
            Some("disk0"),
            Some("0000:00:08.0"),
        );
        assert_eq!(
            identify(&volumes(), &d, Some(&fs)).expect_err("mixed").kind,
            "unknown-disk"
        );
        // Another VM's serial: no.
        let d = disk("/dev/vdc", "/dev/vdc", None, Some("other-vm-disk"), None);
        assert!(identify(&volumes(), &d, Some(&fs))
            .expect_err("foreign")
            .message
            .contains("not one of this VM's volumes"));
        // Nothing to go by: no.
        let d = disk("/dev/vdc", "/dev/vdc", None, None, None);
        assert_eq!(
            identify(&volumes(), &d, None).expect_err("nothing").kind,
            "unknown-disk"
        );
        // A mountpoint the agent does not know: no.
        let d = disk("/data9", "/dev/vda", Some("/data9"), Some("disk0"), None);
        assert!(identify(&volumes(), &d, Some(&fs))
            .expect_err("unknown mount")
            .message
            .contains("/data9"));
        let d = disk("/dev/vda", "/dev/vda", None, None, Some("07"));
        assert_eq!(
            identify(&volumes(), &d, None).expect_err("bad pci").kind,
            "bad-request"
        );
    }

    #[test]
    fn a_filesystem_on_a_foreign_disk_is_refused() {
        let fs = fsinfo(&LAB.replace("\"slot\": 8", "\"slot\": 9"));
        let d = disk("/data1", "/dev/vdb", Some("/data1"), None, None);
        let e = identify(&volumes(), &d, Some(&fs)).expect_err("foreign");
        assert!(e.message.contains("0000:00:09.0"), "{}", e.message);
    }

    #[test]
    fn volumes_maps_are_checked() {
        assert!(check_volumes(&volumes()).is_ok());
        for (json, needle) in [
            (r#"{}"#, "no volume"),
            (r#"{"pool/a": {}}"#, "neither"),
            (
                r#"{"pool/a": {"serial": "x"}, "pool/b": {"serial": "x"}}"#,
                "two volumes",
            ),
            (
                r#"{"pool/a": {"pci": "0000:00:07.0"}, "pool/b": {"pci": "00:07.0"}}"#,
                "not domain",
            ),
            (
                r#"{"pool/a": {"pci": "0000:00:07.0"}, "pool/b": {"pci": "0000:00:07.0"}}"#,
                "two volumes",
            ),
            (r#"{"pool/a@s": {"serial": "x"}}"#, "no '@'"),
        ] {
            let v: Volumes = serde_json::from_str(json).expect(json);
            let e = check_volumes(&v).expect_err(json);
            assert!(e.contains(needle), "{json}: {e}");
        }
        assert!(
            serde_json::from_str::<Volumes>(r#"{"pool/a": {"serial": "x", "dataset": "y"}}"#)
                .is_err()
        );
    }

    #[test]
    fn host_names_are_replaced_by_labels() {
        let r = Redactor::new(&volumes());
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
        let v = r.value(json!({"problem": "no-room", "dataset": "pool/vm0/disk0", "needed": 5}));
        assert_eq!(
            v,
            json!({"problem": "no-room", "dataset": "disk0", "needed": 5})
        );
    }
}
