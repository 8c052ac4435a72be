//! snap-orchestrate (being written).

pub mod lock;
pub mod plan;

use evesnap::cli::Outcome;

pub fn command() -> clap::Command {
    clap::Command::new("snap-orchestrate")
}

pub fn run(_matches: &clap::ArgMatches) -> Outcome {
    Outcome::error(anyhow::anyhow!("not yet implemented"))
}
