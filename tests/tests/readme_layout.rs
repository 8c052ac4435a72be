//! README's "Layout" is true of the tree: every file it names exists, and every source file
//! of the crates, the test harness and the scripts is named in it (by its name or its
//! folder's), so a new file cannot slip in unmentioned.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The block under `## Layout`.
fn layout() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("read README.md");
    let section = readme
        .split_once("\n## Layout\n")
        .expect("README.md has a `## Layout` section")
        .1;
    let block = section.split_once("```\n").expect("a code block").1;
    block
        .split_once("```")
        .expect("a closed code block")
        .0
        .to_string()
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
}

fn tracked() -> Vec<String> {
    let out = Command::new("git")
        .args(["ls-files"])
        .current_dir(root())
        .output()
        .expect("run git ls-files");
    assert!(out.status.success(), "git ls-files failed");
    String::from_utf8(out.stdout)
        .expect("git ls-files prints UTF-8 paths")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Words of the block: names with their extension and without, folder names with `/`.
fn words(block: &str) -> BTreeSet<String> {
    block
        .split(|c: char| !(c.is_alphanumeric() || "._-/<>".contains(c)))
        .flat_map(|w| w.split('/').map(str::to_string).collect::<Vec<_>>())
        .chain(
            block
                .split(|c: char| !(c.is_alphanumeric() || "._-/".contains(c)))
                .filter(|w| w.ends_with('/'))
                .flat_map(|w| {
                    w.trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .map(|d| format!("{d}/"))
                }),
        )
        .filter(|w| !w.is_empty())
        .collect()
}

/// Files a reader should find named: the crates' sources and tests, the harness, scripts.
fn should_be_named(path: &str) -> bool {
    let source = path.starts_with("shared/src/")
        || path.starts_with("bins/")
        || path.starts_with("tests/src/")
        || path.starts_with("tests/tests/")
        || path.starts_with("scripts/");
    let name = path.rsplit('/').next().unwrap_or(path);
    let boilerplate = matches!(
        name,
        "mod.rs" | "lib.rs" | "main.rs" | "Cargo.toml" | "__init__.py"
    ) || name.ends_with("_tests.rs")
        || name.ends_with(".md");
    source && !boilerplate
}

fn named(path: &str, words: &BTreeSet<String>) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let name = parts[parts.len() - 1];
    let stem = name.split('.').next().unwrap_or(name);
    // A folder named with its `/` covers what is in it, unless it is a crate's src/ or
    // tests/, which every crate has.
    let in_named_folder = parts[..parts.len() - 1].iter().any(|d| {
        !matches!(*d, "src" | "tests" | "bins" | "lib") && words.contains(&format!("{d}/"))
    });
    words.contains(name) || words.contains(stem) || in_named_folder
}

#[test]
fn every_file_the_layout_names_exists() {
    let tracked = tracked();
    let block = layout();
    let missing: Vec<String> = words(&block)
        .into_iter()
        .filter(|w| {
            let ext = w.rsplit_once('.').map(|(_, e)| e);
            matches!(
                ext,
                Some("rs" | "py" | "sh" | "c" | "json" | "toml" | "md" | "lock")
            ) && !w.contains('<')
                && !w.starts_with('.')
        })
        .filter(|w| {
            !tracked
                .iter()
                .any(|t| t == w || t.ends_with(&format!("/{w}")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "README's Layout names files that do not exist: {missing:?}"
    );
}

#[test]
fn every_source_file_is_named_in_the_layout() {
    let words = words(&layout());
    let unnamed: Vec<String> = tracked()
        .into_iter()
        .filter(|p| should_be_named(p) && !named(p, &words))
        .collect();
    assert!(
        unnamed.is_empty(),
        "README's Layout does not name these files (name them, or their folder with a `/`): {unnamed:#?}"
    );
}
