//! Passing the document of a successful freeze on, and what happens when the next step
//! does not take it: nobody downstream will thaw, so the guest is thawed now, by this tool
//! or by the watchdog, and the tool exits non-zero.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use evesnap::cli::Outcome;
use evesnap::document::Document;
use evesnap::exit::{coded, Exit};
use evesnap::qga::watchdog::{self, Delivery, Watchdog};
use evesnap::qga::{Address, Client};

use crate::aftermath::{abort, Aftermath};
use crate::step::FreezeReport;

/// Writes `doc` on stdout and, when stdout is a pipe, has the watchdog watch it and waits
/// (at most [`watchdog::WATCH_FOR`]) until the next step read it. `client` is the freeze's
/// connection unless it was handed to the watchdog. A failure is the outcome to exit with.
pub(crate) fn pass_on(
    doc: &Document,
    client: Option<Client>,
    address: &Address,
    report: &FreezeReport,
    timeout: Duration,
) -> Option<Outcome> {
    if let Err(e) = evesnap::cli::write_document(doc) {
        let why = format!("cannot pass the document on ({e}): the next step is gone");
        return Some(thaw_here(why, client, address, report, timeout));
    }
    let pipe = evesnap::cli::stdout_pipe()?;
    // A next step that exits without reading the document, or dies right after it read
    // it, makes the watchdog thaw at once instead of at its deadline.
    let watching = report.watchdog.as_ref().is_some_and(|w| {
        let watched = watchdog::watch(w, pipe.as_fd());
        if let Err(e) = &watched {
            // A thaw downstream may have cancelled it already.
            if watchdog::current(address).is_ok_and(|now| now.is_some_and(|n| n.token == w.token)) {
                evesnap::warn!(
                    "the watchdog does not watch the document (a broken pipeline is thawed at its deadline): {}",
                    evesnap::exit::chain_of(e)
                );
            }
        }
        watched.is_ok()
    });
    match watchdog::await_read(&pipe, watchdog::WATCH_FOR) {
        Delivery::Read => None,
        Delivery::Pending => {
            evesnap::note!(
                "the next step has not read the document after {} s: the guest stays frozen until it \
                 passes the document on to qga-thaw, or until the watchdog's deadline",
                watchdog::WATCH_FOR.as_secs()
            );
            None
        }
        Delivery::Unread(n) => {
            let why =
                format!("the next step exited without reading the document ({n} bytes unread)");
            Some(match (&report.watchdog, watching) {
                (Some(w), true) => thawed_by_watchdog(why, w, timeout),
                _ => thaw_here(why, client, address, report, timeout),
            })
        }
    }
}

/// The watchdog saw the document left unread too and thaws: waits for it to say so.
fn thawed_by_watchdog(why: String, watchdog: &Watchdog, timeout: Duration) -> Outcome {
    // Its thaw is one agent round trip or two, each given this long.
    let limit = timeout + Duration::from_secs(2);
    if watchdog::wait_stood_down(watchdog, limit) {
        return Outcome::error(coded(
            Exit::StepFailed,
            format!("{why}: the watchdog thawed the guest"),
        ));
    }
    Outcome::error(coded(
        Exit::ThawFailed,
        format!(
            "{why}: the watchdog (pid {}) is thawing the guest, which may still be frozen; see {}",
            watchdog.pid.unwrap_or(0),
            watchdog.log_file.display()
        ),
    ))
}

/// Thaws through the freeze's connection (taken back from the watchdog) or a new one.
fn thaw_here(
    why: String,
    client: Option<Client>,
    address: &Address,
    report: &FreezeReport,
    timeout: Duration,
) -> Outcome {
    let deadline = Instant::now() + timeout;
    let client = client
        .or_else(|| {
            let fd = watchdog::take_over(address).ok().flatten()?;
            Client::from_kept_fd(fd, address.clone(), deadline).ok()
        })
        .or_else(|| Client::connect(address, deadline).ok());
    let aftermath = match client {
        Some(mut client) => abort(&mut client, report, timeout),
        None => Aftermath {
            possibly_frozen: true,
            thaw: None,
            watchdog: report.watchdog.clone(),
        },
    };
    let exit = if aftermath.possibly_frozen {
        Exit::ThawFailed
    } else {
        Exit::StepFailed
    };
    Outcome::error(coded(exit, format!("{why}; {aftermath}")))
}
