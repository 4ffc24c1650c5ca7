//! Tidy checks over the whole workspace (like rust-analyzer's): every source
//! file says what it is for in its first line, and no worker spells a subject.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&p, out);
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
}

/// The checkout under test: cargo sets `CARGO_MANIFEST_DIR` when it runs
/// this test. Not `env!`: a target dir shared by two checkouts can hold a
/// binary compiled in the other one.
fn workspace() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().unwrap().to_path_buf()
}

#[test]
fn every_rust_file_starts_with_a_doc_line() {
    let mut files = Vec::new();
    rust_files(&workspace(), &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            !text.starts_with("//!")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files without a //! first line: {missing:#?}"
    );
}

#[test]
fn only_schema_spells_subjects() {
    let mut files = Vec::new();
    for dir in ["workers/src", "agent/src", "ops/cli/src", "ops/stack/src"] {
        rust_files(&workspace().join(dir), &mut files);
    }
    let offenders: Vec<_> = files
        .iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            [
                "\"events.",
                "\"replies.",
                "\"work.",
                "\"deadletter.",
                "\"shadow.",
                "\"debug.",
                "\"Nats-Msg-Id\"",
                "\"Content-Type\"",
            ]
            .iter()
            .any(|lit| text.contains(lit))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "subject or header literals outside schema: {offenders:#?}"
    );
}
