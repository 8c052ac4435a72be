//! `snap-orchestrate serve`: the host end of VM-initiated snapshots.
//!
//! Requests come over one of three transports:
//! - `--channel SOCKET`: QEMU serves the VM's virtio-serial port `org.lfedge.eve.snapshot.0`
//!   as a Unix socket (`-chardev socket,server=on`); this listener connects to it as the one
//!   client, keeps the connection, and reconnects when QEMU restarts.
//! - `--listen-hvsock SOCKET`: the guest connects over vsock to the host (CID 2) on port P
//!   and a hybrid vsock device delivers the connection to the Unix socket `<uds>_P`, where
//!   this listener listens for that one VM ([`listen`]).
//! - `--listen-vsock PORT --cid-map FILE`: kernel AF_VSOCK; the peer's CID names the VM
//!   ([`cids`]), other CIDs are refused.
//!
//! On the vsock transports each connection carries one request and gets one reply. The
//! listener reads JSON-line requests from `eve-guest-agent` in the guest (protocol in
//! [`evesnap::request`]) and serves them one at a time:
//!
//! 1. The request is parsed strictly (unknown fields, wrong types, names against ZFS
//!    rules, at most [`MAX_REQUEST_LINE`](evesnap::request::MAX_REQUEST_LINE) bytes);
//!    anything else gets a `bad-request` reply and the listener reads on. A VM's requests
//!    are rated ([`rate`]: `--guest-request-burst`, `--guest-request-interval`, and
//!    `--guest-min-interval` between creates tried) before anything is asked of the agent,
//!    QEMU or zfs; one past its rate gets `rate-limited` with `retry_after_s`.
//! 2. The disk is identified against **this VM's volumes map** only (`--volumes`: dataset →
//!    `{serial, pci}`, the shape of the plan's `disks`): a mounted disk through the guest
//!    agent's `guest-get-fsinfo` (serial where reported, else PCI address; the guest's own
//!    claims must agree), an unmounted one by the serial and PCI address the guest read
//!    from sysfs. Exactly one entry must match, else `unknown-disk`. The guest never names
//!    a dataset: the worst it can do is ask for its own volumes.
//! 3. `create` and `rollback` build a [`Plan`](crate::plan::Plan) and run the orchestrator's own flow
//!    ([`flow::execute_with`](crate::flow::execute_with)): preflight with the space check, freeze (the disk's
//!    filesystems through qemu-ga), one snapshot, thaw; or zrollback's checks, "not mounted
//!    in the guest", rollback (newer snapshots are never destroyed for a guest). `list`
//!    reads the snapshots.
//! 4. The reply goes back with the request's id; host dataset and pool names in it are
//!    replaced by the disk's guest-visible label. One JSON line per request (request,
//!    reply, the flow's full report) goes to stdout for the host's records.

//!
//! The jobs live apart: [`volumes`] (the map), [`identify`] (which volume a request is
//! about), [`redact`] (no host name reaches the guest), [`handle`] (request → plan → reply),
//! [`session`] (the lines of one connection, each answered and recorded), [`rate`] (a VM's
//! request rates), [`listen`] (the
//! vsock listeners), [`cids`] (the CID → VM map), and this file (the virtio-serial
//! reconnect loop, the choice of source).

mod budget;
pub mod cids;
mod deadline;
mod handle;
mod identify;
mod lines;
mod listen;
mod rate;
mod record;
mod redact;
mod session;
mod volumes;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evesnap::cli::Outcome;
use evesnap::exit::{coded, Exit};
use evesnap::qga::Address;
use evesnap::zfs::{self, Zfs};

use crate::flow::Signals;
pub use budget::{decide, Budget, Facts, PoolSpace, Refusal, Size};
pub use handle::{Served, Server, Vm};
pub use identify::{identify, Identified};
use rate::{Guest, RequestRate};
pub use redact::Redactor;
use session::End;
pub use volumes::{check_volumes, label, load_volumes, Volumes};

/// Pause between connection attempts while QEMU's socket is missing or refuses.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true)
    .args(["channel", "listen_hvsock", "listen_vsock"])))]
pub struct ServeArgs {
    /// The host end of the VM's virtio-serial request port: QEMU's `-chardev
    /// socket,path=PATH,server=on` behind `virtserialport,name=org.lfedge.eve.snapshot.0`.
    #[arg(long, value_name = "SOCKET")]
    pub channel: Option<PathBuf>,
    /// Listen for the VM's vsock connections to the host (CID 2) on the Unix socket a hybrid
    /// vsock device delivers them to: `<uds path>_<port>` (vhost-device-vsock, Firecracker,
    /// Cloud Hypervisor; eve-guest-agent's port is 10001). One request per connection.
    #[arg(long, value_name = "SOCKET")]
    pub listen_hvsock: Option<PathBuf>,
    /// Listen on kernel AF_VSOCK port PORT for every VM of --cid-map, each connection served
    /// as the VM its peer CID names (other CIDs are refused). One request per connection.
    #[arg(long, value_name = "PORT", requires = "cid_map")]
    pub listen_vsock: Option<u32>,
    /// With --listen-vsock: JSON map of the VMs by CID, `{"<cid>": {"agent": "<address>",
    /// "volumes": "<volumes map file>", "qmp": "<QMP socket>"}, ...}` (`qmp` optional, as
    /// --qmp), in place of --agent, --volumes and --qmp.
    #[arg(long, value_name = "FILE", requires = "listen_vsock", conflicts_with_all = ["agent", "volumes"])]
    pub cid_map: Option<PathBuf>,
    /// The VM's guest agent: `unix:<path>`, a plain path, `vsock:<cid>:<port>` (AF_VSOCK) or
    /// `hvsock:<path>:<port>` (guest vsock port through a hybrid vsock device's Unix socket).
    #[arg(long, value_name = "ADDRESS", required_unless_present = "listen_vsock")]
    pub agent: Option<String>,
    /// JSON map of this VM's volumes (the plan's `disks`): `{"<dataset>": {"qdev":
    /// "virtio-disk0", "port": "pci.8"}, ...}` as the host attached them (QEMU device id,
    /// root port id, `wwn` of a SCSI disk: needs --qmp), or by `serial` / `pci`. Only these
    /// can be named by the guest.
    #[arg(long, value_name = "FILE", required_unless_present = "listen_vsock")]
    pub volumes: Option<PathBuf>,
    /// The VM's QMP socket: places the volumes in the guest (the bus numbers the guest gave
    /// the root ports, `query-pci`) for each request, and tells a rollback whether the VM runs.
    #[arg(long, value_name = "SOCKET", conflicts_with = "cid_map")]
    pub qmp: Option<PathBuf>,
    /// The zfs program (default: `zfs` on PATH, then /usr/sbin/zfs).
    #[arg(long, env = zfs::ENV, hide_env_values = true, value_name = "PATH")]
    pub zfs: Option<PathBuf>,
    /// Deadline of each guest agent call, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub timeout: f64,
    /// The auto-thaw watchdog's deadline for a freeze, in seconds (0 = off).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub thaw_after: f64,
    /// Guest budget: at most this many guest snapshot sets per VM (one per name across its
    /// volumes); a create beyond it is refused with `quota-exceeded`. Only the host removes
    /// guest snapshots; controller retention never counts or destroys them.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub guest_max_snapshots: u64,
    /// Guest budget: the space the VM's guest snapshots may hold (the sum of their `used`),
    /// in bytes (K, M, G, T: powers of 1024) or as a percentage of the pool's size; a create
    /// once they hold it is refused with `quota-exceeded`. The guest's replies carry it
    /// (`max_bytes`) only when given in bytes: a percentage would tell the pool's size.
    #[arg(long, value_name = "SIZE", default_value = "10%")]
    pub guest_max_bytes: budget::Size,
    /// Guest budget: seconds between two guest creates of this VM (after its newest guest
    /// snapshot, and after its last create tried, failed or not); a create sooner is
    /// refused with `rate-limited` and `retry_after_s`.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub guest_min_interval: u64,
    /// Guest requests: how many (list, create, rollback) a VM may make at once, before any
    /// is served; each costs the host a guest agent call, QEMU and zfs reads. Past it a
    /// request is refused with `rate-limited` and `retry_after_s`, before any of that.
    #[arg(long, value_name = "N", default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub guest_request_burst: u32,
    /// Guest requests: past the burst, one more request per this many seconds (0 = no
    /// limit). A create also waits --guest-min-interval after the last one tried, failed
    /// or not.
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    pub guest_request_interval: u64,
    /// Guest budget: free space each pool of the disk keeps, in bytes (K, M, G, T), as a
    /// percentage of the pool's size, or both (`10%,1G`: the larger), counting what the new snapshot can pin (the disk's
    /// `referenced`: a full overwrite after it); a create that could take the pool under it
    /// is refused with `no-room`, which tells the guest nothing about the pool.
    #[arg(long, value_name = "SIZE", default_value = "10%")]
    pub pool_floor: budget::Size,
}

/// The host's paths that error messages may name, for the redactor.
fn host_paths(
    source: &Path,
    agent_text: &str,
    agent: &Address,
    qmp: Option<&Path>,
    zfs: &Zfs,
) -> Vec<String> {
    let mut paths = vec![
        agent_text.to_string(),
        agent.to_string(),
        source.display().to_string(),
        evesnap::runtime::dir().display().to_string(),
        zfs.program().display().to_string(),
    ];
    if let Address::Unix(path) | Address::HybridVsock { path, .. } = agent {
        paths.push(path.display().to_string());
    }
    if let Some(qmp) = qmp {
        paths.push(qmp.display().to_string());
    }
    paths
}

/// One listener per channel (or port) on this host: a second would never be served.
fn lock_listener(what: &str) -> Result<evesnap::runtime::Lock, anyhow::Error> {
    let name = format!("serve-{}", evesnap::runtime::file_key(what));
    evesnap::runtime::lock(&name, || format!("another listener on {what}"))
        .map_err(evesnap::exit::wrap)
}

/// Runs the listener until SIGINT, SIGTERM or SIGHUP.
pub fn run(args: &ServeArgs) -> Outcome {
    match serve(args) {
        Ok(()) => Outcome::default(),
        Err(e) => Outcome::error(e),
    }
}

/// A VM from its agent's address, its volumes map and its QMP socket. Volumes named as the
/// host attached them (QEMU device, root port, WWN) can only be placed through QMP.
fn vm_of(
    agent_text: &str,
    agent: Address,
    volumes: Volumes,
    qmp: Option<PathBuf>,
    source: &Path,
    zfs: &Zfs,
) -> Result<Vm, anyhow::Error> {
    if qmp.is_none() {
        if let Some((dataset, _)) = volumes.iter().find(|(_, d)| d.needs_qmp()) {
            return Err(coded(
                Exit::Usage,
                format!(
                    "the volumes map names {dataset} by QEMU device, root port or WWN: a QMP socket (--qmp, or `qmp` in the CID map) is needed to place it"
                ),
            ));
        }
    }
    let paths = host_paths(source, agent_text, &agent, qmp.as_deref(), zfs);
    Ok(Vm {
        redactor: Redactor::new(&volumes, &paths),
        volumes,
        qmp,
        agent_text: agent_text.to_string(),
        agent,
    })
}

fn describe(vm: &Vm) -> String {
    vm.volumes
        .iter()
        .map(|(d, disk)| format!("{} = {d}", label(disk)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn serve(args: &ServeArgs) -> Result<(), anyhow::Error> {
    let timeout = evesnap::time::timeout(args.timeout)
        .map_err(|why| coded(Exit::Usage, format!("--timeout: {why}")))?;
    evesnap::time::seconds(args.thaw_after)
        .map_err(|why| coded(Exit::Usage, format!("--thaw-after: {why}")))?;
    let zfs = Zfs::locate(args.zfs.as_deref()).map_err(evesnap::exit::wrap)?;
    let (vm, vms) = match (&args.listen_vsock, &args.cid_map, &args.agent, &args.volumes) {
        (Some(port), Some(map), _, _) => {
            let source = PathBuf::from(format!("vsock port {port}"));
            let vms: BTreeMap<u32, Vm> = cids::load_cid_map(map)?
                .into_iter()
                .map(|(cid, c)| {
                    let vm = vm_of(&c.agent_text, c.agent, c.volumes, c.qmp, &source, &zfs);
                    vm.map(|vm| (cid, vm))
                })
                .collect::<Result<_, _>>()?;
            let first = vms.values().next().cloned();
            (first.ok_or_else(|| coded(Exit::Usage, "the CID map names no VM"))?, vms)
        }
        (None, None, Some(agent_text), Some(volumes)) => {
            let agent: Address = agent_text
                .parse()
                .map_err(|e| coded(Exit::Usage, format!("--agent {agent_text}: {e}")))?;
            let volumes = load_volumes(volumes)?;
            let source = args
                .channel
                .as_deref()
                .or(args.listen_hvsock.as_deref())
                .unwrap_or(Path::new(""));
            let qmp = args.qmp.clone();
            (vm_of(agent_text, agent, volumes, qmp, source, &zfs)?, BTreeMap::new())
        }
        _ => {
            return Err(coded(
                Exit::Usage,
                "give --channel or --listen-hvsock with --agent and --volumes, or --listen-vsock with --cid-map",
            ))
        }
    };
    let signals = Signals::install()
        .map_err(|e| anyhow::Error::new(e).context("cannot install signal handlers"))?;
    let mut server = Server {
        vm,
        zfs,
        timeout,
        thaw_after: args.thaw_after,
        signals,
        budget: Budget {
            max_snapshots: args.guest_max_snapshots,
            max_bytes: args.guest_max_bytes,
            min_interval_s: args.guest_min_interval,
            pool_floor: args.pool_floor,
        },
        rate: RequestRate {
            burst: args.guest_request_burst,
            interval: Duration::from_secs(args.guest_request_interval),
            create_interval: Duration::from_secs(args.guest_min_interval),
        },
    };
    if let Some(port) = args.listen_vsock {
        let _lock = lock_listener(&format!("vsock port {port}"))?;
        let listener = listen::bind_vsock(port).map_err(|e| {
            coded(
                Exit::AgentUnreachable,
                format!("cannot listen on vsock port {port}: {e}"),
            )
        })?;
        for (cid, vm) in &vms {
            evesnap::note!("serving vsock port {port} for CID {cid}: {}", describe(vm));
        }
        listen::serve_vsock(&mut server, &listener, &vms)
            .map_err(|e| anyhow::Error::new(e).context("the vsock listener failed"))?;
        evesnap::note!("stopping on a signal");
        return Ok(());
    }
    if let Some(path) = &args.listen_hvsock {
        let _lock = lock_listener(&path.to_string_lossy())?;
        let listener = listen::bind_hybrid(path).map_err(|e| {
            coded(
                Exit::AgentUnreachable,
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        evesnap::note!(
            "serving {} for {} volume(s): {}",
            path.display(),
            server.vm.volumes.len(),
            describe(&server.vm)
        );
        let served = listen::serve_hybrid(&mut server, &listener);
        let _ = std::fs::remove_file(path);
        served.map_err(|e| anyhow::Error::new(e).context("the vsock listener failed"))?;
        evesnap::note!("stopping on a signal");
        return Ok(());
    }
    let channel = args.channel.as_deref().unwrap_or(Path::new(""));
    let _lock = lock_listener(&channel.to_string_lossy())?;
    evesnap::note!(
        "serving {} for {} volume(s): {}",
        channel.display(),
        server.vm.volumes.len(),
        describe(&server.vm)
    );
    serve_channel(&mut server, channel);
    Ok(())
}

/// The virtio-serial channel: connect to QEMU's socket, serve, reconnect until a signal.
fn serve_channel(server: &mut Server, channel: &Path) {
    let mut waiting = false;
    // The VM's rates outlive a connection: QEMU restarting does not reset them.
    let mut guest = Guest::new(&server.rate);
    loop {
        if server.stop_requested() {
            evesnap::note!("stopping on a signal");
            return;
        }
        match UnixStream::connect(channel) {
            Ok(stream) => {
                evesnap::note!("connected to {}", channel.display());
                waiting = false;
                match server.session(stream, false, &mut guest) {
                    End::Stop => {
                        evesnap::note!("stopping on a signal");
                        return;
                    }
                    End::Closed => {
                        evesnap::note!("the channel closed (QEMU stopped?); reconnecting")
                    }
                    End::Broken(e) => evesnap::warn!("the channel failed ({e}); reconnecting"),
                }
            }
            Err(e) => {
                if !waiting {
                    evesnap::note!("waiting for {} ({e})", channel.display());
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
