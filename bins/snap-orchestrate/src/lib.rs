//! `snap-orchestrate`: the controller-initiated flow in one command. Reads a plan (JSON,
//! schema in `plan.schema.json`), runs it with the same step functions the small tools
//! use, and writes one report on stdout.
//!
//! The report is a job document (see [`evesnap::document`]) with these fields besides
//! `version`, `ok`, `steps`, `agent`, `datasets`, `snapshot`:
//!
//! - `id`, `type`, `action`: from the plan;
//! - create: `create_time` (RFC 3339), `snapshots: [{name, guid, createtxg, creation}]`,
//!   `consistency` (`application` | `filesystem` | `crash`), `freeze_window_ms` (from the
//!   freeze returning to the thaw returning), `warnings: [{kind, step, message}]` when the
//!   run went on from a failure (`crash-fallback`: the freeze failed, the plan's
//!   `freeze.on_failure` is `crash`, the snapshot was taken unfrozen);
//! - rollback: `rolled_back: [{dataset, to}]`, `destroyed: [...]`;
//! - a consistency group (a plan with `vms`, [`GroupPlan`]): `vms: [{agent, datasets,
//!   required, ok, steps, frozen, consistency, freeze_window_ms, guest_post, error}]`, each
//!   VM's own steps; `agent` is then empty and `freeze_window_ms` the group's;
//! - `error`: `null`, or `{tool, kind, message, description, step, timestamp}`;
//! - `zinfo_snapshot`: eve-api's `ZInfoSnapshot` of the run (`id`, `config_id`,
//!   `config_version`, `create_time`, `type`, and on failure `snap_err` with its severity,
//!   entities and retry condition), in protojson, so EVE can forward it as it is
//!   ([`evesnap::eve_api`]).
//!
//! Steps: `preflight`, `guest_pre`, `qga-freeze`, `zsnap`, `qga-thaw`, `guest_post`,
//! `retention` (create); `preflight`, `guest_pre`, `unmounted`, `zrollback`, `guest_post`
//! (rollback). Each has `tool`, `ok`, `started_at`, `duration_ms` and its own fields;
//! guest command steps carry each command's exit status and output.
//!
//! `snap-orchestrate serve` ([`serve`]) is the host end of VM-initiated snapshots: it serves
//! the requests of `eve-guest-agent` in the guest with the same flow.

pub mod flow;
pub mod group_plan;
pub mod guest;
pub mod lock;
pub mod placement;
pub mod plan;
pub mod recover;
pub mod schema;
pub mod serve;
pub mod turn;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use evesnap::cli::Outcome;
use evesnap::exit::{coded, Exit};
use evesnap::zfs::{self, Zfs};

pub use group_plan::{AnyPlan, GroupPlan};
pub use plan::Plan;

/// Upper bound on a plan, so a runaway producer cannot exhaust memory.
const MAX_PLAN_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Parser)]
#[command(
    name = "snap-orchestrate",
    version,
    about = "Take (or roll back) an application-consistent snapshot of a VM, end to end",
    long_about = "Runs a plan from the controller: preflight (agent, freeze state, datasets, room), the \
        plan's guest_pre commands in the guest, freeze, one atomic ZFS snapshot of every volume, thaw \
        (always, also on errors and SIGINT/SIGTERM), guest_post commands, retention (max_snapshots), \
        and prints one JSON report on stdout whose zinfo_snapshot is eve-api's ZInfoSnapshot (snap_err \
        included), ready to forward.\n\n\
        For action \"rollback\", the volumes are rolled back only when the VM is stopped (QMP or the \
        plan says so) or when guest_pre released them and the guest agent shows no filesystem mounted \
        on them (a filesystem the agent cannot place counts as mounted). Which guest disk each \
        volume is comes from the plan's `disks`: the QEMU device id (`qdev`), root port id (`port`) \
        or WWN, placed in the guest through `qmp` (query-pci: the bus numbers the guest gave the \
        root ports), or a serial, PCI address or device path (`dev`, resolved in the guest, for \
        zvols). With `qmp`, a volume left out of `disks` is the QEMU disk whose image or zvol is \
        on it (query-block).\n\n\
        One orchestration per VM runs at a time (a lock keyed by the agent address).\n\n\
        A plan with `vms` is a consistency group: every VM is frozen in parallel, one atomic snapshot \
        covers all their volumes (one pool), every VM is thawed in parallel; a required VM that fails \
        fails the group with every VM thawed and no snapshot left.\n\n\
        The plan is JSON on stdin or in --plan FILE; --print-schema prints its JSON Schema (--print-schema group-plan|report|request|reply: of a group plan, the report, and the VM wire).\n\n\
        `snap-orchestrate serve` is the host end of VM-initiated snapshots (eve-guest-agent in the guest).",
    after_help = Exit::table(),
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Read the plan from FILE instead of stdin.
    #[arg(long, value_name = "FILE")]
    plan: Option<PathBuf>,
    /// The zfs program (default: `zfs` on PATH, then /usr/sbin/zfs).
    #[arg(long, env = zfs::ENV, hide_env_values = true, value_name = "PATH")]
    zfs: Option<PathBuf>,
    /// Print a JSON Schema and exit: of the plan (the default), the report, or the VM wire's
    /// request or reply.
    #[arg(
        long,
        exclusive = true,
        value_name = "WHICH",
        num_args = 0..=1,
        default_missing_value = "plan"
    )]
    print_schema: Option<schema::Kind>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Serve snapshot requests from inside a VM (eve-guest-agent) on its virtio-serial port.
    #[command(
        long_about = "Connects to the host end of a VM's virtio-serial port org.lfedge.eve.snapshot.0 \
            (QEMU's `-chardev socket,server=on`; reconnects when QEMU restarts) and serves the JSON-line \
            requests of eve-guest-agent in the guest, one at a time: create (freeze through the guest \
            agent, one snapshot, thaw; refused without room, with the preflight's numbers), list, and \
            rollback (refused while the disk is mounted in the guest). The guest can only name disks of \
            --volumes, identified through guest-get-fsinfo (mounted) or by the PCI address and serial \
            the guest read from sysfs (unmounted), against where --qmp says the guest sees each volume; \
            it never names a dataset. Garbage, unknown fields and lines over 64 KiB get an \
            error reply; the listener reads on.\n\n\
            A create claims what was proven: `application` only when the guest said it quiesced its \
            application (eve-guest-agent --quiesced) and the snapshot returned before the guest's \
            deadline (read on the guest's clock through the agent), `filesystem` after a verified freeze \
            of the disk's own mounted filesystems, `crash` for a disk with none mounted (nothing is \
            frozen) or, when the guest accepts it (eve-guest-agent --accept-crash), after a freeze that \
            failed and was thawed again (the reply's `crash_reason` says why). A request already past its deadline when taken up is refused (`expired`).\n\n\
            Each request is recorded as one JSON line on stdout: {at, request, reply, report}, report \
            being the flow's full report. Exits 0 on SIGINT/SIGTERM/SIGHUP; a signal during a request \
            stops its flow as it stops the orchestrator's (the guest is thawed), the guest gets the error \
            reply, then the listener exits.",
        after_help = Exit::table()
    )]
    Serve(Box<serve::ServeArgs>),
    /// Run the guest_post commands a run left pending for an agent (the agent was lost).
    #[command(
        long_about = "When a run cannot run its guest_post commands because the guest agent was lost or \
            silent (it ends with exit 3, 4 or 6 after guest_pre ran; its report says `guest_post: \
            \"pending\"`), they are recorded in the runtime folder (pending-post-<hash>.json, keyed by the \
            agent address) and run once the agent answers again: by the watchdog, by `serve` before its \
            next request, or by this command. Each command runs once: it is removed from the record once \
            it ran, whatever its result.\n\n\
            Prints a JSON report: `agent`, `id` (the run that left them), `guest_post` (`ran`, `pending` \
            when the agent still does not answer, absent when nothing was pending) and a `guest_post` \
            step with each command's result. Exit 0: nothing pending, or all succeeded; 1: a command \
            failed (it is not run again); 3/4: the agent is unreachable or silent (the commands stay \
            recorded); 8: another operation holds the VM.",
        after_help = Exit::table()
    )]
    Recover(recover::RecoverArgs),
}

/// The command line of `snap-orchestrate`.
pub fn command() -> clap::Command {
    Cli::command()
}

pub fn run(cli: Cli) -> Outcome {
    match &cli.command {
        Some(Sub::Serve(args)) => return serve::run(args),
        Some(Sub::Recover(args)) => return recover::run(args),
        None => {}
    }
    if let Some(kind) = cli.print_schema {
        print!("{}", kind.text());
        return Outcome::default();
    }
    let plan = match read_plan(cli.plan.as_ref()) {
        Ok(plan) => plan,
        Err(e) => return Outcome::error(e),
    };
    let zfs = match Zfs::locate(cli.zfs.as_deref()) {
        Ok(zfs) => zfs,
        Err(e) => return Outcome::error(evesnap::exit::wrap(e)),
    };
    match plan {
        AnyPlan::Single(plan) => flow::execute(&plan, &zfs),
        AnyPlan::Group(plan) => flow::execute_group(&plan, &zfs),
    }
    .into_outcome()
}

fn read_plan(path: Option<&PathBuf>) -> anyhow::Result<AnyPlan> {
    let mut text = String::new();
    match path {
        Some(path) => {
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_PLAN_BYTES + 1).read_to_string(&mut text))
                .map_err(|e| {
                    evesnap::exit::wrap(plan::Error::Read(path.display().to_string(), e))
                })?;
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(coded(
                    Exit::Usage,
                    "no plan: give --plan FILE or the plan on stdin",
                ));
            }
            stdin
                .lock()
                .take(MAX_PLAN_BYTES + 1)
                .read_to_string(&mut text)
                .map_err(|e| evesnap::exit::wrap(plan::Error::Read("from stdin".into(), e)))?;
        }
    }
    if text.len() as u64 > MAX_PLAN_BYTES {
        return Err(coded(
            Exit::Usage,
            format!("the plan is larger than {MAX_PLAN_BYTES} bytes"),
        ));
    }
    if text.trim().is_empty() {
        return Err(coded(Exit::Usage, "the plan is empty"));
    }
    AnyPlan::from_json(&text).map_err(evesnap::exit::wrap)
}
