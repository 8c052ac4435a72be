//! zrollback (being written).

use evesnap::cli::Outcome;

pub fn command() -> clap::Command {
    clap::Command::new("zrollback")
}

pub fn run(_matches: &clap::ArgMatches) -> Outcome {
    Outcome::error(anyhow::anyhow!("not yet implemented"))
}
