//! `StackError`: why a part of the stack could not be started, for every module of this crate.

use std::path::PathBuf;
use std::time::Duration;

/// Why a part of the stack could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A required program is not installed and could not be installed.
    #[error("{program} is not installed; install it with: {command}")]
    Missing {
        /// The program.
        program: String,
        /// The command that installs it.
        command: String,
    },
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The secrets file is unreadable.
    #[error("secrets file {path} is invalid: {reason}; delete it to generate new passwords")]
    Secrets {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The program exited right after starting.
    /// An existing PostgreSQL cluster was to be started without its password.
    #[error("the PostgreSQL cluster in {dir} exists, but no password for its `ferry` role was given (ferry up keeps it as FERRY_POSTGRES_PASSWORD in .ferry/secrets.env)")]
    PgPassword {
        /// The cluster's directory.
        dir: PathBuf,
    },
    #[error("{program} exited during start-up ({status}); its log ends with:\n{log_tail}")]
    Exited {
        /// The program.
        program: String,
        /// Its exit status.
        status: String,
        /// The last lines of its log.
        log_tail: String,
    },
    /// A command ran and failed.
    #[error("{what} failed ({status}): {command}\n{output_tail}")]
    Failed {
        /// The step, e.g. `cross-building ferry-agent.exe`.
        what: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its output.
        output_tail: String,
    },
    /// A command did not finish in time and was killed.
    #[error("{what} did not finish within {waited:?} and was killed: {command}\n{output_tail}")]
    TimedOut {
        /// The step.
        what: String,
        /// The command line.
        command: String,
        /// How long it ran.
        waited: Duration,
        /// The last lines of its output.
        output_tail: String,
    },
    /// The program did not become ready in time.
    #[error("{program} did not accept connections within {waited:?}; its log ends with:\n{log_tail}")]
    NotReady {
        /// The program.
        program: String,
        /// How long we waited.
        waited: Duration,
        /// The last lines of its log.
        log_tail: String,
    },
}
