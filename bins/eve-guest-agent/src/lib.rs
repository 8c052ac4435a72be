//! `eve-guest-agent`: runs inside a VM and asks the host, over vsock (CID 2, port
//! [`request::VSOCK_PORT`], one connection per request) or the virtio-serial port
//! `org.lfedge.eve.snapshot.0`, to snapshot one of the VM's disks, list its snapshots, or
//! roll it back. The host (`snap-orchestrate serve`) decides whether the disk is one of
//! this VM's volumes, freezes the guest through qemu-ga, takes the snapshot, thaws, and
//! answers; this tool prints the answer as one JSON line on stdout.
//!
//! The protocol (JSON lines, request ids, limits) is in [`evesnap::request`].

pub mod channel;
pub mod disk;
pub mod target;
mod vsock;

use std::io::Write;
use std::time::{Duration, Instant};

use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use evesnap::cli::Outcome;
use evesnap::exit::{coded, Exit};
use evesnap::request::{self, Op, Reply, ReplyError, Request};

const EXIT_STATUS: &str = "Exit status:
  0   the host did what was asked; its reply is on stdout
  1   the host refused the request or the operation failed; the reply on stdout says why
      (error.kind, error.code: the host's exit code, e.g. 7 preflight such as no room)
  2   bad command line, or the named disk cannot be identified in this guest
  3   the host is unreachable: no channel (no vsock device, no port), no listener on the
      host end, or it went away before answering
  4   no reply within --timeout (the host may still carry the request out)
  8   another request is using the channel in this guest

On codes 2, 3, 4 and 8 stdout carries {\"ok\": false, \"error\": {\"kind\", \"code\", \"message\"}}
written by this tool (kinds host-unreachable, host-timeout, busy, bad-input).";

#[derive(Debug, Parser)]
#[command(
    name = "eve-guest-agent",
    version,
    about = "Ask the host for a snapshot or rollback of one of this VM's disks",
    long_about = "Runs inside the VM. Sends one request to the host's listener (snap-orchestrate \
        serve) over vsock, to the host (CID 2) on port 10001 (one connection per request), or with \
        --channel over the virtio-serial port org.lfedge.eve.snapshot.0; waits for the reply that \
        carries the request's id, and prints it as one JSON line on stdout.\n\n\
        The host only acts on disks that belong to this VM; it identifies a mounted disk \
        through the guest agent (qemu-ga) and an unmounted one by the serial and PCI address \
        this tool reads from sysfs.",
    after_help = EXIT_STATUS
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list or roll back snapshots of one disk.
    #[command(
        group(ArgGroup::new("action").required(true).args(["create", "list", "rollback"])),
        long_about = "Create, list or roll back snapshots of one disk, named by its block device \
            (/dev/vdb) or, when mounted, its mountpoint (/data0).\n\n\
            --create: the host freezes the guest's filesystems on the disk (only those) through \
            qemu-ga for the instant of the snapshot and refuses when the pool lacks room; the \
            snapshot is `filesystem`-consistent. Quiesce the application first (flush, pause \
            writes) and say so with --quiesced for an `application`-consistent one; resume it \
            once this tool has exited. A disk with no filesystem mounted is snapshotted \
            without freezing anything and is only `crash`-consistent. --rollback: unmount the disk first; the host refuses \
            while a filesystem on it is mounted. Afterwards drop the page cache \
            (echo 3 > /proc/sys/vm/drop_caches) and mount it again.",
        after_help = EXIT_STATUS
    )]
    Snapshot(SnapshotArgs),
}

#[derive(Debug, clap::Args)]
struct SnapshotArgs {
    /// Take a snapshot of the disk behind DISK (device or mountpoint).
    #[arg(long, value_name = "DISK")]
    create: Option<String>,
    /// List the snapshots of DISK, oldest first.
    #[arg(long, value_name = "DISK")]
    list: Option<String>,
    /// Roll DISK back to the snapshot --to (DISK must be unmounted).
    #[arg(long, value_name = "DISK", requires = "to")]
    rollback: Option<String>,
    /// Snapshot name for --create (ZFS rules: [A-Za-z0-9_.:-]); the host picks
    /// `guest-YYYYMMDD-HHMMSSmmm` when absent.
    #[arg(long, value_name = "NAME", requires = "create")]
    name: Option<String>,
    /// The snapshot to roll back to.
    #[arg(long, value_name = "NAME", requires = "rollback")]
    to: Option<String>,
    /// For --create: the application is quiesced (flushed, writes paused) and stays so
    /// until this tool exits. Only then may the snapshot claim `application` consistency;
    /// without it a verified freeze gives `filesystem`. Resume the application only after
    /// this tool exited: the host claims `application` only for a snapshot that returned
    /// before --timeout ran out.
    #[arg(long, requires = "create")]
    quiesced: bool,
    /// For --create: should the freeze fail (or time out, or freeze fewer filesystems than
    /// the disk has, or not verify), take the snapshot anyway once the guest is thawed
    /// again. It is then only `crash`-consistent, and the reply says so and why
    /// (`consistency`, `crash_reason`). Without it such a request fails and nothing is taken.
    #[arg(long, requires = "create")]
    accept_crash: bool,
    /// The request channel: vsock:CID:PORT (the host is CID 2), or a path: the
    /// virtio-serial port /dev/virtio-ports/org.lfedge.eve.snapshot.0 (the fallback for VMs
    /// without vsock) or a Unix socket.
    #[arg(long, value_name = "CHANNEL", default_value = request::DEFAULT_CHANNEL)]
    channel: target::Target,
    /// Seconds to wait for the reply (a snapshot takes about a second; a busy host longer).
    #[arg(long, value_name = "SECONDS", default_value_t = 120.0)]
    timeout: f64,
    /// Seconds to wait for a listener on the host end of the channel (vsock: for the
    /// connection to be accepted).
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    connect_timeout: f64,
}

/// The command line of `eve-guest-agent`.
pub fn command() -> clap::Command {
    Cli::command()
}

pub fn run(cli: Cli) -> Outcome {
    let Command::Snapshot(args) = cli.command;
    snapshot(&args)
}

/// A random request id (16 hex digits).
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_ok();
    if !random {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (nanos ^ (u64::from(std::process::id()) << 40)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn seconds(what: &str, value: f64) -> Result<Duration, anyhow::Error> {
    evesnap::time::timeout(value).map_err(|why| coded(Exit::Usage, format!("{what}: {why}")))
}

fn print_line(value: &impl serde::Serialize) {
    let mut stdout = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut stdout, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(stdout))
        .and_then(|()| stdout.flush());
}

/// This tool's own failure, printed on stdout in the reply's shape.
fn local_failure(id: Option<&str>, error: anyhow::Error) -> Outcome {
    let exit = evesnap::exit::exit_of(&error);
    let kind = match exit {
        Exit::AgentUnreachable => "host-unreachable",
        Exit::AgentTimeout => "host-timeout",
        Exit::Busy => "busy",
        Exit::Usage => "bad-input",
        other => other.kind(),
    };
    print_line(&Reply::failure(
        id.map(str::to_string),
        None,
        ReplyError {
            kind: kind.into(),
            code: exit.code(),
            message: evesnap::exit::chain(&error),
            ..ReplyError::default()
        },
    ));
    Outcome::error(error)
}

fn snapshot(args: &SnapshotArgs) -> Outcome {
    let (op, target) = match (&args.create, &args.list, &args.rollback) {
        (Some(t), None, None) => (Op::Create, t),
        (None, Some(t), None) => (Op::List, t),
        (None, None, Some(t)) => (Op::Rollback, t),
        _ => {
            return Outcome::error(coded(
                Exit::Usage,
                "give one of --create, --list, --rollback",
            ))
        }
    };
    let (timeout, connect_timeout) = match (
        seconds("--timeout", args.timeout),
        seconds("--connect-timeout", args.connect_timeout),
    ) {
        (Ok(t), Ok(c)) => (t, c),
        (Err(e), _) | (_, Err(e)) => return local_failure(None, e),
    };
    let disk = match disk::describe(target) {
        Ok(disk) => disk,
        Err(e) => return local_failure(None, evesnap::exit::wrap(e)),
    };
    let request = Request {
        version: request::VERSION,
        id: new_id(),
        op,
        disk,
        name: args.name.clone(),
        to: args.to.clone(),
        quiesced: args.quiesced,
        deadline_ms: None,
        accept_crash: args.accept_crash,
    };
    if let Err(e) = request.check() {
        return local_failure(Some(&request.id), coded(Exit::Usage, e.0));
    }
    evesnap::note!(
        "request {} {} {} (device {}, serial {}, pci {})",
        request.id,
        op.as_str(),
        target,
        request.disk.device.as_deref().unwrap_or("?"),
        request.disk.serial.as_deref().unwrap_or("-"),
        request.disk.pci.as_deref().unwrap_or("-"),
    );
    let started = Instant::now();
    let exchange = (|| {
        let mut channel = channel::Channel::open(&args.channel, started + connect_timeout)?;
        let deadline = Instant::now() + timeout;
        // When this tool gives up, on the guest's clock: the host reads that clock through
        // the guest agent and neither starts nor claims `application` for a request past it.
        let mut sent = request.clone();
        sent.deadline_ms = Some(evesnap::time::now_unix_us() / 1000 + timeout.as_millis() as u64);
        channel.send(&sent.to_line(), deadline)?;
        channel.await_reply(&request.id, request::MAX_REPLY_LINE, deadline)
    })();
    let reply = match exchange {
        Ok(reply) => reply,
        Err(e) => return local_failure(Some(&request.id), evesnap::exit::wrap(e)),
    };
    print_line(&reply);
    let (kind, message) = match serde_json::from_value::<Reply>(reply) {
        Ok(reply) if reply.ok => {
            if let Some(reason) = &reply.crash_reason {
                evesnap::warn!(
                    "the freeze failed, so the snapshot is only crash-consistent (--accept-crash): {reason}"
                );
            }
            evesnap::note!("done in {:.1} s", started.elapsed().as_secs_f64());
            return Outcome::default();
        }
        Ok(Reply {
            error: Some(error), ..
        }) => (error.kind, error.message),
        Ok(_) => ("?".to_string(), "no reason given".to_string()),
        Err(e) => (
            "?".to_string(),
            format!("the host's reply is not a reply: {e}"),
        ),
    };
    Outcome::error(coded(
        Exit::StepFailed,
        format!("the host refused the request ({kind}): {message}"),
    ))
}
