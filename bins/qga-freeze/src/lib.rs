//! qga-freeze (being written).

use evesnap::cli::Outcome;

pub fn command() -> clap::Command {
    clap::Command::new("qga-freeze")
}

pub fn run(_matches: &clap::ArgMatches) -> Outcome {
    Outcome::error(anyhow::anyhow!("not yet implemented"))
}
