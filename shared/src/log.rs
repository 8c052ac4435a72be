//! Human messages on stderr. Stdout carries the JSON document only.
//!
//! `EVESNAP_LOG=quiet` silences notes; errors are always printed (by [`crate::cli`]).

use std::sync::OnceLock;

static TOOL: OnceLock<String> = OnceLock::new();

/// Names the running tool; messages are prefixed with it.
pub fn set_tool(name: &str) {
    let _ = TOOL.set(name.to_string());
}

pub fn tool() -> &'static str {
    TOOL.get().map(String::as_str).unwrap_or("evesnap")
}

fn quiet() -> bool {
    std::env::var_os("EVESNAP_LOG").is_some_and(|v| v == "quiet")
}

/// Prints `tool: message` on stderr unless quiet.
pub fn note(message: std::fmt::Arguments<'_>) {
    if !quiet() {
        eprintln!("{}: {}", tool(), message);
    }
}

/// Prints `tool: warning: message` on stderr, always.
pub fn warn(message: std::fmt::Arguments<'_>) {
    eprintln!("{}: warning: {}", tool(), message);
}

/// `note!("froze {} filesystems", n)`
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => { $crate::log::note(format_args!($($arg)*)) };
}

/// `warn!("guest may still be frozen")`
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::warn(format_args!($($arg)*)) };
}
