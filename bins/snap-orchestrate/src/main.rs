use std::process::ExitCode;

fn main() -> ExitCode {
    evesnap::cli::main(
        "snap-orchestrate",
        snap_orchestrate::command(),
        snap_orchestrate::run,
    )
}
