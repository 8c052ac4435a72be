//! What every evesnap tool shares: the job document, the exit-code table, the edge that
//! prints errors, and the layers that talk to the guest agent and to ZFS.
//!
//! Each tool crate in `bins/` is a library (`command()` + `run()`) and a thin `main`; the
//! orchestrator calls the same library functions the small binaries call.

pub mod cancel;
pub mod cli;
pub mod document;
pub mod exit;
pub mod log;
pub mod qga;
pub mod qmp;
pub mod request;
pub mod time;
pub mod zfs;

/// Where the tools keep runtime state (watchdogs, locks): `EVESNAP_RUN_DIR`, else
/// `/run/evesnap` for root and `$XDG_RUNTIME_DIR/evesnap` (or `/tmp/evesnap-<uid>`) otherwise.
pub fn runtime_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("EVESNAP_RUN_DIR") {
        return dir.into();
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return "/run/evesnap".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => std::path::PathBuf::from(dir).join("evesnap"),
        None => std::env::temp_dir().join(format!("evesnap-{uid}")),
    }
}
