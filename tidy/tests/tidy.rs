//! Tidy checks over the whole workspace (like rust-analyzer's): file headers, names, layout maps, sizes, ARCHITECTURE.md.
//!
//! Each check reads source text only; none builds another crate.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::PathBuf;

use ferry_tidy::{is_test_file, relative, rust_files, workspace};

/// Every `.rs` file of the workspace, with its path relative to the root.
fn sources() -> Vec<(String, PathBuf)> {
    let root = workspace();
    let files = rust_files(&root).unwrap();
    assert!(files.len() > 20, "found only {} files under {}", files.len(), root.display());
    files.into_iter().map(|p| (relative(&root, &p), p)).collect()
}

fn read(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn every_rust_file_starts_with_a_doc_line() {
    let missing: Vec<_> = sources()
        .into_iter()
        .filter(|(_, p)| !read(p).starts_with("//!"))
        .map(|(rel, _)| rel)
        .collect();
    assert!(missing.is_empty(), "files without a //! first line: {missing:#?}");
}

#[test]
fn only_schema_spells_subjects() {
    let offenders: Vec<_> = sources()
        .into_iter()
        .filter(|(rel, _)| ["workers/src/", "agent/src/", "ops/cli/src/", "ops/stack/src/"].iter().any(|d| rel.starts_with(d)))
        .filter(|(_, p)| {
            let text = read(p);
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
        .map(|(rel, _)| rel)
        .collect();
    assert!(offenders.is_empty(), "subject or header literals outside schema: {offenders:#?}");
}

/// The `# Layout` section of a file's `//!` header: from the heading to the
/// next heading or the end of the header.
fn layout_section(text: &str) -> Option<String> {
    let header: Vec<&str> = text.lines().take_while(|l| l.starts_with("//!")).map(|l| l.trim_start_matches("//!").trim()).collect();
    let start = header.iter().position(|l| *l == "# Layout")?;
    let section = header[start + 1..].iter().take_while(|l| !l.starts_with('#')).copied().collect::<Vec<_>>();
    Some(section.join("\n"))
}

/// The child modules a file declares with `mod name;` (any visibility,
/// with or without attributes), except `tests`.
fn declared_modules(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| {
            let rest = l.strip_prefix("pub(crate) ").or_else(|| l.strip_prefix("pub ")).unwrap_or(l);
            let name = rest.strip_prefix("mod ")?.strip_suffix(';')?.trim();
            (name != "tests" && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then(|| name.to_string())
        })
        .collect()
}

#[test]
fn every_layout_section_names_every_module() {
    let mut problems = Vec::new();
    for (rel, p) in sources() {
        let text = read(&p);
        let Some(section) = layout_section(&text) else {
            if rel.ends_with("src/lib.rs") {
                problems.push(format!("{rel}: a crate root without a `# Layout` section"));
            }
            continue;
        };
        for m in declared_modules(&text) {
            if !section.contains(&format!("`{m}`")) {
                problems.push(format!("{rel}: `# Layout` does not name module `{m}`"));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Files outside `schema` that may derive serde traits, each for a format
/// of its own that no other component decodes. A prefix covers a module
/// that becomes a folder.
const LOCAL_FORMATS: &[(&str, &str)] = &[
    ("agent/src/adapter", "the chat adapter's JSON-lines protocol on loopback, not a stream"),
    ("agent/src/collect/mod.rs", "samples and the open span, kept in the agent's own spool and printed by `probe`"),
    ("agent/src/collect/privacy.rs", "the `[privacy]` table of the agent's config file"),
    ("agent/src/config.rs", "the agent's TOML config file"),
    ("agent/src/spool", "`when_full` in the agent's config file"),
    ("ops/cli/src/agent_registry.rs", "the operator's agent registry `agents.toml`"),
    ("ops/cli/src/backup.rs", "a backup folder's `manifest.json`, read back only by `ferry restore`"),
    ("ops/cli/src/dashboard", "the login form of the dashboard's own page"),
    ("workers/src/alerts/config.rs", "the alerts worker's TOML file"),
    ("workers/src/inference/config.rs", "the inference worker's TOML config"),
    ("workers/src/rules/config.rs", "the rules TOML file"),
    ("workers/src/state/kb.rs", "knowledge-base articles imported from JSON lines"),
];

/// Whether `text` has a `#[derive(...)]` naming `Serialize` or `Deserialize`.
fn derives_serde(text: &str) -> bool {
    let mut rest = text;
    while let Some(i) = rest.find("#[derive(") {
        rest = &rest[i + "#[derive(".len()..];
        let end = rest.find(")]").unwrap_or(rest.len());
        let list = &rest[..end];
        if list.split(|c: char| c == ',' || c.is_whitespace()).any(|t| {
            let t = t.rsplit("::").next().unwrap_or(t);
            t == "Serialize" || t == "Deserialize"
        }) {
            return true;
        }
    }
    false
}

#[test]
fn only_schema_derives_wire_serde() {
    let mut offenders = Vec::new();
    let mut used = vec![false; LOCAL_FORMATS.len()];
    for (rel, p) in sources() {
        if rel.starts_with("schema/") || is_test_file(&rel) || !derives_serde(&read(&p)) {
            continue;
        }
        match LOCAL_FORMATS.iter().position(|(prefix, _)| rel.starts_with(prefix)) {
            Some(i) => used[i] = true,
            None => offenders.push(rel),
        }
    }
    assert!(
        offenders.is_empty(),
        "Serialize/Deserialize derived outside schema: {offenders:#?}\n\
         Wire types belong in schema; a format of the file's own goes into LOCAL_FORMATS with its reason."
    );
    let stale: Vec<_> = LOCAL_FORMATS.iter().zip(used).filter(|(_, u)| !u).map(|((p, _), _)| *p).collect();
    assert!(stale.is_empty(), "LOCAL_FORMATS entries that derive nothing any more: {stale:#?}");
}

/// Lines above which a non-test file is reported.
const WARN_LINES: usize = 500;
/// Lines above which a non-test file fails, unless it says why it is long
/// with a `// tidy: long-file because ...` line.
const MAX_LINES: usize = 800;

#[test]
fn source_files_stay_short() {
    let mut too_long = Vec::new();
    for (rel, p) in sources() {
        if is_test_file(&rel) {
            continue;
        }
        let text = read(&p);
        let lines = text.lines().count();
        if lines > WARN_LINES {
            eprintln!("warning: {rel} has {lines} lines (over {WARN_LINES}; {MAX_LINES} fails)");
        }
        if lines > MAX_LINES && !text.contains("// tidy: long-file because") {
            too_long.push(format!("{rel}: {lines} lines"));
        }
    }
    assert!(
        too_long.is_empty(),
        "non-test files over {MAX_LINES} lines (split them, or add `// tidy: long-file because <reason>`): {too_long:#?}"
    );
}

/// `path.rs::fn_name` references in backticks.
fn test_refs(text: &str) -> Vec<(String, String)> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|span| {
            let (path, func) = span.split_once(".rs::")?;
            let ok = !path.is_empty()
                && path.chars().all(|c| c.is_ascii_alphanumeric() || "_-/.".contains(c))
                && !func.is_empty()
                && func.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            ok.then(|| (format!("{path}.rs"), func.to_string()))
        })
        .collect()
}

/// The invariants of ARCHITECTURE.md: the items of its `## Invariants`
/// section, each starting with a numbered line.
fn invariants(doc: &str) -> Vec<String> {
    let mut items: Vec<String> = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            inside = line.trim() == "## Invariants";
            continue;
        }
        if !inside {
            continue;
        }
        let numbered = line.split_once(". ").is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if numbered {
            items.push(String::new());
        }
        if let Some(item) = items.last_mut() {
            item.push_str(line);
            item.push('\n');
        }
    }
    items
}

#[test]
fn every_architecture_invariant_names_a_test_that_exists() {
    let root = workspace();
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let items = invariants(&doc);
    assert!(items.len() >= 10, "ARCHITECTURE.md's `## Invariants` has {} numbered items", items.len());
    let mut problems = Vec::new();
    for item in &items {
        let title = item.lines().next().unwrap_or_default();
        let tests: String = item
            .lines()
            .map(str::trim_start)
            .skip_while(|l| !(l.starts_with("Test: ") || l.starts_with("Tests: ")))
            .collect::<Vec<_>>()
            .join(" ");
        if tests.is_empty() {
            problems.push(format!("no `Test:` line: {title}"));
        } else if test_refs(&tests).is_empty() {
            problems.push(format!("`Test:` names no `path.rs::fn`: {title}"));
        }
    }
    // Every reference anywhere in the document must resolve, not only the
    // invariants' own.
    for (path, func) in test_refs(&doc) {
        match std::fs::read_to_string(root.join(&path)) {
            Err(e) => problems.push(format!("{path}::{func}: {e}")),
            Ok(text) if !text.contains(&format!("fn {func}(")) => problems.push(format!("{path}::{func}: no `fn {func}` in {path}")),
            Ok(_) => {}
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn the_checks_parse_what_they_are_meant_to() {
    assert!(derives_serde("#[derive(Debug, serde::Deserialize)]\nstruct A;"));
    assert!(derives_serde("#[derive(\n    Debug,\n    Serialize,\n)]\nstruct A;"));
    assert!(!derives_serde("#[derive(Debug, Clone)]\nstruct SerializeMe;"));
    assert_eq!(declared_modules("pub mod a;\nmod b;\n#[cfg(test)]\nmod tests;\npub(crate) mod c;\nmod d {\n}"), ["a", "b", "c"]);
    assert_eq!(layout_section("//! x\n//!\n//! # Layout\n//!\n//! - [`a`]: one.\n//!\n//! # Next\n//! `b`\nmod a;").unwrap().trim(), "- [`a`]: one.");
    assert_eq!(test_refs("x `a/b.rs::c_d` and `e.rs` and `f.rs::g`"), [("a/b.rs".into(), "c_d".into()), ("f.rs".into(), "g".into())]);
    let doc = "## Invariants\n\n1. **A.** text\n   Test: `x.rs::y`\n2. **B.**\n\n## Other\n3. not one\n";
    assert_eq!(invariants(doc).len(), 2);
}

/// The packages of `cargo tree -p <package>` (normal, build and dev edges),
/// one name per line.
fn dependency_names(package: &str) -> Vec<String> {
    tree(&["-p", package, "-e", "normal,build,dev"])
}

/// The package names `cargo tree` prints for these arguments.
fn tree(args: &[&str]) -> Vec<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .arg("tree")
        .args(args)
        .args(["--prefix", "none", "--format", "{p}"])
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo tree {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect()
}

#[test]
fn the_cli_and_the_agent_build_without_mistral_rs() {
    // The inference role is a cargo feature of ferry-workers that only the
    // `ferry-worker` binary turns on: `ferry up` runs that binary.
    for package in ["ferry-ops", "ferry-agent"] {
        let names = dependency_names(package);
        assert!(names.iter().any(|n| n == "ferry-workers"), "{package}: the check must see ferry-workers in {names:?}");
        let heavy: Vec<_> = names.iter().filter(|n| n.starts_with("mistralrs") || n.starts_with("candle")).collect();
        assert!(heavy.is_empty(), "{package} depends on {heavy:?}");
    }
}

#[test]
fn the_production_cli_links_no_test_harness() {
    // The Dockerfile builds `ferry` with --no-default-features; the default
    // `harness` feature (cargo from a checkout, Wine) is for working copies.
    let shipped = tree(&["-p", "ferry-ops", "--no-default-features", "-e", "normal,build"]);
    assert!(shipped.iter().any(|n| n == "ferry-stack"), "the check must see ferry-stack in {shipped:?}");
    assert!(!shipped.iter().any(|n| n == "ferry-harness"), "the shipped ferry links ferry-harness");
    let checkout = tree(&["-p", "ferry-ops", "-e", "normal"]);
    assert!(checkout.iter().any(|n| n == "ferry-harness"), "the default build should have the harness: {checkout:?}");
    // And the image is built that way.
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("-p ferry-ops --no-default-features"), "the Dockerfile must build ferry without the harness");
}
