//! Ferry's tidy checks live in `tests/tidy.rs`; this library only walks the workspace for them.
//!
//! # Layout
//!
//! This crate has no modules: [`workspace`], [`rust_files`] and
//! [`is_test_file`] are all the tests need.

use std::path::{Path, PathBuf};

/// The checkout under test: the parent of this crate's directory. Read from
/// `CARGO_MANIFEST_DIR` at run time, not `env!`: a target dir shared by two
/// checkouts can hold a binary compiled in the other one.
pub fn workspace() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().map_or_else(|| manifest.clone(), Path::to_path_buf)
}

/// Every `.rs` file under `dir`, skipping `target` and hidden directories,
/// sorted so that reports are stable.
pub fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                walk(&p, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(p);
        }
    }
    Ok(())
}

/// Whether `rel` (a path relative to the workspace, `/`-separated) is test
/// code: under a `tests/` directory, named `tests.rs`, or `*_tests.rs`.
pub fn is_test_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    rel.starts_with("tests/") || rel.contains("/tests/") || name == "tests.rs" || name.ends_with("_tests.rs")
}

/// `path` relative to `root`, with `/` separators.
pub fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_files_are_recognised_by_place_and_name() {
        for (rel, test) in [
            ("workers/tests/rules.rs", true),
            ("workers/tests/common/mod.rs", true),
            ("workers/src/rules/tests.rs", true),
            ("agent/src/spool/spool_tests.rs", true),
            ("agent/src/spool.rs", false),
            ("schema/src/codec/fast.rs", false),
            ("tidy/tests/tidy.rs", true),
        ] {
            assert_eq!(super::is_test_file(rel), test, "{rel}");
        }
    }
}
