use std::process::ExitCode;

fn main() -> ExitCode {
    evesnap::cli::main("qga-freeze", qga_freeze::command(), qga_freeze::run)
}
