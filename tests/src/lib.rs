//! Helpers for the workspace-level tests: the shared test lab, the tools' binaries.

pub mod fake_zfs;
pub mod fault;
pub mod guest;
pub mod lab;
pub mod openzfs;
pub mod run;
pub mod zfs;

use std::path::PathBuf;

/// The repository's top folder.
pub fn repo_root() -> PathBuf {
    // The parent, not `tests/..`: paths built on it name the lab's pool (`lab_pool_for`),
    // which must match what scripts/test derives from `$PWD/target/lab-test`.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// A tool binary built in this workspace's target folder (`scripts/test` builds them all
/// before the tests run; a missing one is a setup error, not a skip).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A name (of a snapshot, a file) no other test run uses: `<prefix>-<pid>-<nanoseconds>`.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}
