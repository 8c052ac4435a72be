//! zsnap (being written).

use evesnap::cli::Outcome;

pub fn command() -> clap::Command {
    clap::Command::new("zsnap")
}

pub fn run(_matches: &clap::ArgMatches) -> Outcome {
    Outcome::error(anyhow::anyhow!("not yet implemented"))
}
