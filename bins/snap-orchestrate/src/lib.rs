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
//!   freeze returning to the thaw returning);
//! - rollback: `rolled_back: [{dataset, to}]`, `destroyed: [...]`;
//! - `error`: `null`, or `{tool, kind, message, description, severity, step, timestamp}`:
//!   eve-api's `snap_err` fields, so EVE can forward them as they are.
//!
//! Steps: `preflight`, `guest_pre`, `qga-freeze`, `zsnap`, `qga-thaw`, `guest_post`,
//! `retention` (create); `preflight`, `guest_pre`, `unmounted`, `zrollback`, `guest_post`
//! (rollback). Each has `tool`, `ok`, `started_at`, `duration_ms` and its own fields;
//! guest command steps carry each command's exit status and output.

pub mod flow;
pub mod guest;
mod interrupt;
pub mod lock;
pub mod plan;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser};
use evesnap::cli::Outcome;
use evesnap::exit::{coded, Exit};
use evesnap::zfs::{self, Zfs};

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
        and prints one JSON report on stdout whose error fields match eve-api's snap_err.\n\n\
        For action \"rollback\", the volumes are rolled back only when the VM is stopped (QMP or the \
        plan says so) or when guest_pre released them and the guest agent shows no filesystem mounted \
        on them (matched by disk serial, else PCI address, from the plan's `disks`).\n\n\
        One orchestration per VM runs at a time (a lock keyed by the agent address).\n\n\
        The plan is JSON on stdin or in --plan FILE; --print-schema prints its JSON Schema.",
    after_help = Exit::table()
)]
struct Cli {
    /// Read the plan from FILE instead of stdin.
    #[arg(long, value_name = "FILE")]
    plan: Option<PathBuf>,
    /// The zfs program (default: `zfs` on PATH, then /usr/sbin/zfs).
    #[arg(long, env = zfs::ENV, hide_env_values = true, value_name = "PATH")]
    zfs: Option<PathBuf>,
    /// Print the plan's JSON Schema and exit.
    #[arg(long, exclusive = true)]
    print_schema: bool,
}

/// The command line of `snap-orchestrate`.
pub fn command() -> clap::Command {
    Cli::command()
}

pub fn run(matches: &clap::ArgMatches) -> Outcome {
    let cli = match Cli::from_arg_matches(matches) {
        Ok(cli) => cli,
        Err(e) => return Outcome::error(e.into()),
    };
    if cli.print_schema {
        print!("{}", plan::schema());
        return Outcome::default();
    }
    let plan = match read_plan(cli.plan.as_ref()) {
        Ok(plan) => plan,
        Err(e) => return Outcome::error(e),
    };
    let zfs = match Zfs::locate(cli.zfs.as_deref()) {
        Ok(zfs) => zfs,
        Err(e) => return Outcome::error(anyhow::Error::new(e)),
    };
    flow::execute(&plan, &zfs)
}

fn read_plan(path: Option<&PathBuf>) -> anyhow::Result<Plan> {
    let mut text = String::new();
    match path {
        Some(path) => {
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_PLAN_BYTES + 1).read_to_string(&mut text))
                .map_err(|e| evesnap::exit::wrap(plan::Error::Read(path.display().to_string(), e)))?;
        }
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(coded(Exit::Usage, "no plan: give --plan FILE or the plan on stdin"));
            }
            stdin
                .lock()
                .take(MAX_PLAN_BYTES + 1)
                .read_to_string(&mut text)
                .map_err(|e| evesnap::exit::wrap(plan::Error::Read("from stdin".into(), e)))?;
        }
    }
    if text.len() as u64 > MAX_PLAN_BYTES {
        return Err(coded(Exit::Usage, format!("the plan is larger than {MAX_PLAN_BYTES} bytes")));
    }
    if text.trim().is_empty() {
        return Err(coded(Exit::Usage, "the plan is empty"));
    }
    Plan::from_json(&text).map_err(evesnap::exit::wrap)
}
