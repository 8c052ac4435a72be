//! The man pages in `man/` are generated from the tools' clap definitions; this test fails
//! when a checked-in page differs from a fresh render. `scripts/mangen` rewrites them
//! (it runs this test with `EVESNAP_UPDATE_MAN=1`).

use std::path::PathBuf;

/// Every tool's command, as its `--help` is built.
fn commands() -> Vec<clap::Command> {
    vec![
        qga_freeze::command(),
        qga_thaw::command(),
        zsnap::command(),
        zrollback::command(),
        snap_orchestrate::command(),
        eve_guest_agent::command(),
    ]
}

/// `(file name, page)` for a command and, as `tool-sub.1`, each of its subcommands.
fn render(command: clap::Command) -> Vec<(String, Vec<u8>)> {
    let mut command = command;
    command.build();
    let name = command.get_name().to_string();
    let mut pages = vec![(format!("{name}.1"), page(command.clone()))];
    for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
        let full = format!("{name}-{}", sub.get_name());
        let sub = sub.clone().name(full.clone());
        pages.push((format!("{full}.1"), page(sub)));
    }
    pages
}

fn page(command: clap::Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut out)
        .expect("render to memory");
    out
}

#[test]
fn man_pages_match_the_clap_definitions() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../man");
    let update = std::env::var_os("EVESNAP_UPDATE_MAN").is_some();
    let mut stale = Vec::new();
    let mut expected = std::collections::BTreeSet::new();
    for command in commands() {
        for (file, fresh) in render(command) {
            let path = dir.join(&file);
            expected.insert(file.clone());
            if std::fs::read(&path).ok().as_deref() != Some(&fresh[..]) {
                if update {
                    std::fs::write(&path, &fresh).expect("write man page");
                } else {
                    stale.push(file);
                }
            }
        }
    }
    let extra: Vec<String> = std::fs::read_dir(&dir)
        .expect("man/ exists")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|f| f.ends_with(".1") && !expected.contains(f))
        .collect();
    if update {
        for file in &extra {
            std::fs::remove_file(dir.join(file)).expect("remove stale page");
        }
        return;
    }
    assert!(
        stale.is_empty(),
        "man pages out of date: {stale:?}; run scripts/mangen"
    );
    assert!(
        extra.is_empty(),
        "man pages for no command: {extra:?}; run scripts/mangen"
    );
}
