//! The edge of every tool: parse the command line, run, print the document on stdout,
//! print the error chain once on stderr as `tool: error: cause: cause`, map it to an
//! exit code from [`crate::exit`].

use std::io::Write;
use std::os::fd::AsFd;
use std::process::ExitCode;

use serde_json::{Map, Value};

use crate::document::{Document, StepTimer};
use crate::exit::{chain, chain_of, exit_of, Exit};
use crate::qga::watchdog;

/// What a tool's `run` hands back to [`main`].
#[derive(Debug, Default)]
pub struct Outcome {
    /// Printed on stdout when present, even on failure: downstream tools (a thaw above
    /// all) need the context of a failed pipeline.
    pub document: Option<Document>,
    /// Printed on stderr; decides the exit code.
    pub error: Option<anyhow::Error>,
    /// Work that must not delay the next tool in a pipeline: done after the document was
    /// written and stdout closed. Its failure is a warning: the document already went out.
    pub after_output: Option<AfterOutput>,
    /// This tool relays a live freeze's document ([`watchdog::Relay`]): told once the
    /// document is out, or dropped (the watchdog thaws at once) when it cannot be written.
    pub relay: Option<watchdog::Relay>,
}

/// See [`Outcome::after_output`].
pub struct AfterOutput(pub Box<dyn FnOnce() -> anyhow::Result<()>>);

impl std::fmt::Debug for AfterOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AfterOutput(..)")
    }
}

impl Outcome {
    pub fn success(document: Document) -> Self {
        Outcome {
            document: Some(document),
            ..Outcome::default()
        }
    }

    /// A failure without a document to pass on (bad input, bad usage).
    pub fn error(error: anyhow::Error) -> Self {
        Outcome {
            error: Some(error),
            ..Outcome::default()
        }
    }

    /// A failure of `tool`'s step: recorded in the document, which is still passed on.
    pub fn failed(mut document: Document, tool: &str, error: anyhow::Error) -> Self {
        document.record_failure(tool, exit_of(&error), &chain(&error));
        Outcome {
            document: Some(document),
            error: Some(error),
            ..Outcome::default()
        }
    }

    /// A failed step of `tool`: the step is recorded with `partial` (what it did before it
    /// failed), the error and, for a failed zfs preflight, its problems; the document still
    /// goes downstream.
    pub fn failed_step(
        mut document: Document,
        tool: &str,
        timer: StepTimer,
        partial: Map<String, Value>,
        error: anyhow::Error,
    ) -> Self {
        let failed = crate::steps::Failed {
            error: chain(&error),
            problems: crate::zfs::preflight_problems(&error).to_vec(),
        };
        let mut fields = partial;
        fields.extend(crate::document::fields_of(&failed));
        document.push(timer.finish(false, fields));
        Outcome::failed(document, tool, error)
    }

    /// `tool` did nothing because an upstream step failed (`message` says which).
    pub fn skipped(mut document: Document, tool: &str, timer: StepTimer, message: String) -> Self {
        let skipped = crate::steps::Skipped {
            skipped: true,
            reason: message.clone(),
        };
        document.push(timer.finish_with(false, &skipped));
        let error = crate::exit::coded(Exit::UpstreamFailed, message);
        Outcome::failed(document, tool, error)
    }

    pub fn exit(&self) -> Exit {
        self.error.as_ref().map_or(Exit::Success, exit_of)
    }
}

/// Runs a tool: `fn main() -> ExitCode { evesnap::cli::main("zsnap", zsnap::command(), zsnap::run) }`,
/// where `command` is the clap command of `run`'s typed command line `T` (its derive, with
/// whatever help the tool adds).
pub fn main<T: clap::FromArgMatches>(
    tool: &str,
    command: clap::Command,
    run: impl FnOnce(T) -> Outcome,
) -> ExitCode {
    crate::log::set_tool(tool);
    let parsed = command
        .try_get_matches()
        .and_then(|matches| T::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version on stdout and usage errors on stderr itself.
            let _ = e.print();
            return if e.use_stderr() {
                Exit::Usage.into()
            } else {
                Exit::Success.into()
            };
        }
    };
    finish(tool, run(cli))
}

/// For each tool's unit tests: `command` is consistent (clap's debug checks), and its long
/// help ends with the exit-code table and names each of `needles`. The help, for more.
#[doc(hidden)]
pub fn assert_help(mut command: clap::Command, needles: &[&str]) -> String {
    command.clone().debug_assert();
    let help = command.render_long_help().to_string();
    for needle in ["Exit status:"].iter().chain(needles) {
        assert!(
            help.contains(needle),
            "{needle} missing from --help:\n{help}"
        );
    }
    help
}

/// Prints an outcome and returns its exit code.
pub fn finish(tool: &str, mut outcome: Outcome) -> ExitCode {
    let written = outcome.document.as_ref().map(write_document);
    if let Some(relay) = outcome.relay.take() {
        match &written {
            Some(Ok(())) => {
                let pipe = stdout_pipe();
                if let Err(e) = relay.delivered(pipe.as_ref().map(|p| p.as_fd())) {
                    eprintln!("{tool}: warning: {}", chain_of(&e));
                }
            }
            // Dropped unfinished: the watchdog thaws now, since nothing downstream will.
            _ => {
                drop(relay);
                outcome.error.get_or_insert_with(|| {
                    crate::exit::coded(
                        Exit::StepFailed,
                        "the document could not be passed on (the next step is gone): the \
                         watchdog thaws the guest now",
                    )
                });
            }
        }
    }
    // A reader that went away (broken pipe) is not our crash; anything else is worth a line.
    if let Some(Err(e)) = &written {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("{tool}: error: cannot write the document to stdout: {e}");
        }
    }
    if let Some(error) = &outcome.error {
        eprintln!("{tool}: error: {}", chain(error));
    }
    let exit = outcome.exit();
    if let Some(AfterOutput(work)) = outcome.after_output {
        // The reader sees the end of the document now, not when this process exits.
        close_stdout();
        if let Err(e) = work() {
            eprintln!("{tool}: warning: {}", chain(&e));
        }
    }
    exit.into()
}

/// Writes a document on stdout in one piece, so that a reader that took it in took all of
/// it (the watchdog watches a pipe until nothing is left unread in it).
pub fn write_document(document: &Document) -> std::io::Result<()> {
    let mut text = document.to_json();
    text.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// A copy of stdout, when it is a pipe (the next step of a pipeline reads it).
pub fn stdout_pipe() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    let stdout = std::io::stdout();
    let stat = nix::sys::stat::fstat(stdout.as_fd()).ok()?;
    let is_pipe = stat.st_mode & nix::libc::S_IFMT == nix::libc::S_IFIFO;
    is_pipe.then(|| stdout.as_fd().try_clone_to_owned().ok())?
}

/// Points stdout at /dev/null, which closes the pipe to the next tool.
fn close_stdout() {
    use std::os::fd::AsRawFd;
    match std::fs::OpenOptions::new().write(true).open("/dev/null") {
        Ok(null) => {
            let _ = nix::unistd::dup2_stdout(&null);
        }
        Err(_) => {
            let _ = nix::unistd::close(std::io::stdout().as_raw_fd());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_outcome_records_the_error_in_the_document() {
        let out = Outcome::failed(
            Document::new(),
            "zsnap",
            crate::exit::coded(Exit::Preflight, "no room"),
        );
        let doc = out.document.as_ref().expect("document");
        assert!(!doc.ok);
        assert_eq!(
            doc.error.as_ref().map(|e| e.kind.as_str()),
            Some("preflight-failed")
        );
        assert_eq!(out.exit(), Exit::Preflight);
    }
}
