//! What a `ferry` run from a Ferry checkout can do that an installed one cannot: build its sibling binaries, find the repository's files, run the Windows agent under Wine.
//!
//! All of it comes from the `ferry-harness` crate behind this crate's
//! default `harness` feature. The production build leaves the feature out,
//! and then [`root`] and [`sibling_binary`] answer `None`, so callers fall
//! back to what an installed `ferry` has: flags and the binaries beside it.

use std::path::PathBuf;

/// The root of the checkout this `ferry` was started in (found from the
/// current directory or cargo's `CARGO_MANIFEST_DIR`); `None` outside one,
/// or in a build without the harness.
pub fn root() -> Option<PathBuf> {
    #[cfg(feature = "harness")]
    return ferry_harness::cargo::workspace_root();
    #[cfg(not(feature = "harness"))]
    return None;
}

/// In a checkout, when this `ferry` runs from its cargo target dir: the
/// workspace binary `name` of the same build, brought up to date by cargo
/// (`cargo test --workspace --no-run`, the tests' build, so both share it).
/// `Ok(None)` when not run that way, or in a build without the harness.
pub fn sibling_binary(name: &str) -> anyhow::Result<Option<PathBuf>> {
    #[cfg(feature = "harness")]
    {
        use anyhow::Context as _;
        use ferry_harness::cargo;
        if cargo::workspace_root().is_none() || cargo::current_target_dir().is_none() {
            return Ok(None);
        }
        let me = std::env::current_exe().context("finding this program")?;
        eprintln!("ferry: bringing {name} up to date (cargo test --workspace --no-run; the first time takes a while) ...");
        let built = cargo::workspace_binary(&me, name).with_context(|| format!("building {name}"))?;
        Ok(Some(built))
    }
    #[cfg(not(feature = "harness"))]
    {
        let _ = name;
        Ok(None)
    }
}

/// `ferry-agent.exe`, cross-built with mingw into this `ferry`'s target
/// dir, and a fresh Wine prefix in `work` to run it in.
#[cfg(feature = "harness")]
pub fn windows_agent_under_wine(work: &std::path::Path) -> anyhow::Result<(PathBuf, ferry_harness::Wine)> {
    use anyhow::Context as _;
    let target = ferry_harness::cargo::current_target_dir().context("cannot tell this ferry's target dir")?;
    let exe = ferry_harness::wine::build_windows_agent(&target)?;
    let wine = ferry_harness::Wine::start(work)?;
    Ok((exe, wine))
}
