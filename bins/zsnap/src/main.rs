use std::process::ExitCode;

fn main() -> ExitCode {
    evesnap::cli::main("zsnap", zsnap::command(), zsnap::run)
}
