use std::process::ExitCode;

fn main() -> ExitCode {
    evesnap::cli::main("zrollback", zrollback::command(), zrollback::run)
}
