//! What every evesnap tool shares: the job document, the exit-code table, the edge that
//! prints errors, and the layers that talk to the guest agent and to ZFS.
//!
//! Each tool crate in `bins/` is a library (`command()` + `run()`) and a thin `main`; the
//! orchestrator calls the same library functions the small binaries call.

pub mod cancel;
pub mod cli;
pub mod document;
pub mod eve_api;
pub mod exit;
pub mod log;
pub mod qga;
pub mod qmp;
pub mod report;
pub mod request;
#[cfg(test)]
mod request_tests;
pub mod runtime;
pub mod signals;
pub mod steps;
pub mod time;
pub mod zfs;

/// Its old place: callers say `evesnap::pending`.
pub use qga::pending;
