use std::process::ExitCode;

fn main() -> ExitCode {
    evesnap::cli::main("qga-thaw", qga_thaw::command(), qga_thaw::run)
}
