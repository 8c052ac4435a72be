//! The command line of `zsnap`, as clap parses it: the take arguments and the
//! `list`/`destroy`/`prune` actions ([`crate::command`] adds the exit-status table).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use evesnap::zfs;

use crate::DEFAULT_MIN_FREE;

#[derive(Debug, Parser)]
#[command(
    name = "zsnap",
    version,
    about = "Take an application-consistent ZFS snapshot of a VM's datasets",
    long_about = "Takes one snapshot, under one name, of every dataset given (or of the job document's \
        `datasets`), after checking that they exist, that the name is free and that there is room. \
        The set is atomic where ZFS allows it (`zfs snapshot a@n b@n` on OpenZFS, `zfs snapshot -r` \
        on zfs-fuse when the datasets are exactly one parent's children), else taken one by one \
        (`atomic: false`). Reads the job document on stdin, writes it on stdout.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// The zfs program (default: `zfs` on PATH, then /usr/sbin/zfs).
    #[arg(long, global = true, env = zfs::ENV, hide_env_values = true, value_name = "PATH")]
    pub(crate) zfs: Option<PathBuf>,
    /// Seconds each zfs call may take; one that takes longer is killed, with whatever it
    /// started, and the step fails.
    #[arg(
        long,
        global = true,
        env = zfs::TIMEOUT_ENV,
        hide_env_values = true,
        value_name = "SECS",
        default_value_t = zfs::DEFAULT_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) zfs_timeout: u64,
    #[command(flatten)]
    pub(crate) take: TakeArgs,
    #[command(subcommand)]
    pub(crate) action: Option<Action>,
}

#[derive(Debug, Args)]
pub(crate) struct TakeArgs {
    /// A dataset to snapshot (repeatable; default: the document's `datasets`).
    #[arg(long, short = 'd', value_name = "DATASET")]
    pub(crate) dataset: Vec<String>,
    /// The snapshot name (after `@`; default: the document's `snapshot`, else the UTC time
    /// as EVE names them, YYYYMMDD-HHMMSSmmm).
    #[arg(long, short = 'n', value_name = "NAME")]
    pub(crate) name: Option<String>,
    /// An extra user property `module:key=value` for every snapshot (repeatable).
    #[arg(long, short = 'o', value_name = "KEY=VALUE")]
    pub(crate) property: Vec<String>,
    /// The snapshot id stored as org.lfedge.evesnap:id (default: the document's
    /// `snapshot_id`, else a new UUID).
    #[arg(long, value_name = "ID")]
    pub(crate) id: Option<String>,
    /// The snapshot type stored as org.lfedge.evesnap:type.
    #[arg(long = "type", value_name = "TYPE", default_value = "IMMEDIATE", value_parser = ["IMMEDIATE", "APP_UPDATE"])]
    pub(crate) kind: String,
    /// Who asks for the snapshot, stored as org.lfedge.evesnap:origin: `controller` or `guest`
    /// (`prune` never counts or destroys the guest's).
    #[arg(long, value_name = "ORIGIN", default_value = "controller", value_parser = ["controller", "guest"])]
    pub(crate) origin: String,
    /// Bytes each dataset and pool must keep free beyond what the snapshot needs.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MIN_FREE)]
    pub(crate) min_free: u64,
    /// Run the preflight and print the plan; create nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Action {
    /// List the snapshots of the datasets, oldest first, with evesnap's metadata.
    List {
        /// A dataset (repeatable; default: the document's `datasets`).
        #[arg(long, short = 'd', value_name = "DATASET")]
        dataset: Vec<String>,
        /// Only snapshots taken by evesnap (with org.lfedge.evesnap:id).
        #[arg(long)]
        evesnap_only: bool,
    },
    /// Destroy snapshots, all or none: refuses held snapshots and snapshots with clones.
    Destroy {
        /// Full snapshot names (dataset@name); or use --dataset and --name.
        #[arg(value_name = "SNAPSHOT")]
        snapshots: Vec<String>,
        /// A dataset (repeatable; default: the document's `datasets`).
        #[arg(long, short = 'd', value_name = "DATASET")]
        dataset: Vec<String>,
        /// The snapshot name after `@` (default: the document's `snapshot`).
        #[arg(long, short = 'n', value_name = "NAME")]
        name: Option<String>,
        /// Destroy held snapshots once their last hold is released (`zfs destroy -d`).
        #[arg(long)]
        defer: bool,
        /// Check and print what would be destroyed; destroy nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Keep the N newest snapshot sets and destroy older ones (never a held one).
    Prune {
        /// How many snapshot sets to keep (EVE's max_snapshots).
        #[arg(long, value_name = "N")]
        keep: usize,
        /// A dataset (repeatable; default: the document's `datasets`).
        #[arg(long, short = 'd', value_name = "DATASET")]
        dataset: Vec<String>,
        /// Count and prune every snapshot, not only evesnap's.
        #[arg(long)]
        all: bool,
        /// Print what would be destroyed; destroy nothing.
        #[arg(long)]
        dry_run: bool,
    },
}
