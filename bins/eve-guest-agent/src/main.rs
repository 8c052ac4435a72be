use std::process::ExitCode;

fn main() -> ExitCode {
    evesnap::cli::main(
        "eve-guest-agent",
        eve_guest_agent::command(),
        eve_guest_agent::run,
    )
}
