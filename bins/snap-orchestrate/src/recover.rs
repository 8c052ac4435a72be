//! `snap-orchestrate recover --agent A`: runs the `guest_post` commands a run left pending
//! for that agent (see [`evesnap::pending`]) and prints what became of them.
//!
//! The report is a job document with one step, `guest_post` (each command's result, as
//! in a run's report), and `id` (the run that left them) and `guest_post`: `ran` (they
//! ran, whatever their results), `pending` (the agent did not answer: they stay recorded)
//! or absent (nothing was pending). Exit codes from the table: 0 nothing pending or every
//! command succeeded, 1 a command failed (it is not run again), 3/4 the agent is
//! unreachable or silent (the record stays), 8 another operation holds the VM.

use std::time::{Duration, Instant};

use evesnap::cli::Outcome;
use evesnap::document::{Document, StepTimer};
use evesnap::exit::{coded, Exit};
use evesnap::qga::{Address, Client};
use evesnap::report::{GuestPost, Origin};
use evesnap::steps::GuestCommands;
use serde::Serialize;

/// `snap-orchestrate recover`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// The guest agent: `unix:PATH` (QEMU's chardev socket), `vsock:CID:PORT` (AF_VSOCK) or
    /// `hvsock:PATH:PORT` (guest vsock port PORT through a hybrid vsock device's Unix socket).
    #[arg(long, value_name = "ADDRESS")]
    pub agent: String,
    /// Seconds to wait for the agent (to connect and for each call).
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = evesnap::time::parse_timeout)]
    pub timeout: Duration,
    /// Seconds to wait for another operation on the VM to finish.
    #[arg(long, value_name = "SECONDS", default_value = "0", value_parser = evesnap::time::parse_seconds)]
    pub lock_wait: Duration,
}

/// The fields `recover` adds to the job document.
#[derive(Debug, Serialize)]
struct Fields<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_post: Option<GuestPost>,
}

fn document(agent: &str, id: Option<&str>, state: Option<GuestPost>) -> Document {
    let mut document = Document::new();
    document.agent = Some(agent.to_string());
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(Fields {
        id,
        guest_post: state,
    }) {
        document.extra = fields;
    }
    document
}

pub fn run(args: &RecoverArgs) -> Outcome {
    let address: Address = match args.agent.parse() {
        Ok(a) => a,
        Err(e) => return Outcome::error(coded(Exit::Usage, format!("--agent: {e}"))),
    };
    let agent = address.to_string();
    let pending = match evesnap::pending::load(&address) {
        Ok(p) => p,
        Err(e) => return Outcome::error(evesnap::exit::wrap(e)),
    };
    let Some(pending) = pending else {
        evesnap::note!("nothing pending for {agent}");
        return Outcome {
            document: Some(document(&agent, None, None)),
            ..Outcome::default()
        };
    };
    let id = pending.id.clone();
    let still = |e: anyhow::Error| {
        Outcome::failed(
            document(&agent, Some(&id), Some(GuestPost::Pending)),
            crate::flow::TOOL,
            e,
        )
    };
    let _lock = match crate::lock::lock_vm_for(&address, Origin::Controller, args.lock_wait) {
        Ok(lock) => lock,
        Err(e) => return still(evesnap::exit::wrap(e)),
    };
    let timeout = args.timeout;
    let mut client = match Client::connect(&address, Instant::now() + timeout) {
        Ok(mut client) => {
            client.set_timeout(timeout);
            client
        }
        Err(e) => {
            return still(
                evesnap::exit::wrap(e).context("the pending guest_post commands stay recorded"),
            )
        }
    };
    // The agent must answer before anything is taken from the record.
    if let Err(e) = client.info() {
        return still(
            evesnap::exit::wrap(e).context("the pending guest_post commands stay recorded"),
        );
    }
    let timer = StepTimer::start("guest_post");
    let ran = match evesnap::pending::run(&mut client, &address) {
        Ok(Some(ran)) => ran,
        Ok(None) => {
            // Someone else (the watchdog, serve) ran them meanwhile.
            return Outcome {
                document: Some(document(&agent, Some(&id), None)),
                ..Outcome::default()
            };
        }
        Err(e) => return still(evesnap::exit::wrap(e)),
    };
    let all_ok = ran.commands.iter().all(|c| c.ok) && ran.put_back == 0;
    let failed: Vec<String> = ran
        .commands
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.describe())
        .collect();
    let step = timer.finish_with(
        all_ok,
        &GuestCommands {
            commands: ran.commands,
        },
    );
    let state = if ran.put_back > 0 {
        GuestPost::Pending
    } else {
        GuestPost::Ran
    };
    let mut doc = document(&agent, Some(&ran.id), Some(state));
    doc.ok = all_ok;
    doc.steps.push(step);
    if all_ok {
        return Outcome {
            document: Some(doc),
            ..Outcome::default()
        };
    }
    let error = if ran.put_back > 0 {
        coded(
            Exit::AgentUnreachable,
            format!(
                "the agent was lost: {} command(s) stay recorded ({})",
                ran.put_back,
                failed.join("; ")
            ),
        )
    } else {
        coded(
            Exit::StepFailed,
            format!("pending guest_post command {}", failed.join("; ")),
        )
    };
    Outcome::failed(doc, crate::flow::TOOL, error)
}
