//! Worker replicas as processes of the shipped `ferry-worker`, restarted the way systemd or compose would: `ferry up` and `ferry chaos` run them.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How long the supervisor waits before starting a replica that exited
/// (the units in ops/systemd wait 2 s, 5 s for inference; shorter here so
/// `ferry chaos` sees more restarts in its window).
pub const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How long a stopping process gets after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// `--worker-bin`; else, in a checkout, the workspace's `ferry-worker`
/// brought up to date by cargo; else the one beside this program.
pub fn worker_binary(explicit: Option<&std::path::Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "--worker-bin {}: no such file", p.display());
        return Ok(p.to_path_buf());
    }
    if let Some(built) = crate::checkout::sibling_binary("ferry-worker")
        .context("or pass --worker-bin PATH to use a built ferry-worker")?
    {
        return Ok(built);
    }
    let me = std::env::current_exe().context("finding this program")?;
    let beside = me.with_file_name("ferry-worker");
    anyhow::ensure!(
        beside.is_file(),
        "no ferry-worker beside {}: install it there or pass --worker-bin PATH",
        me.display()
    );
    Ok(beside)
}

/// A command line to start again and again.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Environment added to ours (passwords go here, not on the command line).
    pub env: Vec<(String, String)>,
    /// Where its stdout and stderr go (appended, across restarts).
    pub log: PathBuf,
}

impl Spec {
    pub(crate) fn command(&self, stdin: Stdio) -> anyhow::Result<Command> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(stdin)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        Ok(cmd)
    }
}

/// A worker replica under a supervisor: started again [`RESTART_DELAY`]
/// after it exits, for whatever reason, until stopped.
#[derive(Debug)]
pub struct Supervised {
    /// Its name in the report (`rules-1`).
    pub name: String,
    pid: Arc<AtomicU32>,
    starts: Arc<AtomicU32>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// Starts `spec` and keeps it running.
    pub fn start(name: String, spec: Spec) -> anyhow::Result<Self> {
        let pid = Arc::new(AtomicU32::new(0));
        let starts = Arc::new(AtomicU32::new(0));
        let stop = CancellationToken::new();
        // The first start fails loudly; later ones are retried.
        let first = spec.command(Stdio::null())?.spawn().with_context(|| format!("starting {}", spec.program.display()))?;
        pid.store(first.id().unwrap_or(0), Ordering::Relaxed);
        let task = {
            let (pid, starts, stop, name) = (pid.clone(), starts.clone(), stop.clone(), name.clone());
            tokio::spawn(async move {
                let mut child = Some(first);
                loop {
                    if let Some(mut c) = child.take() {
                        starts.fetch_add(1, Ordering::Relaxed);
                        pid.store(c.id().unwrap_or(0), Ordering::Relaxed);
                        tokio::select! {
                            status = c.wait() => {
                                tracing::debug!(replica = %name, ?status, "replica exited");
                            }
                            () = stop.cancelled() => {
                                terminate(&mut c).await;
                                return;
                            }
                        }
                        pid.store(0, Ordering::Relaxed);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(RESTART_DELAY) => {}
                        () = stop.cancelled() => return,
                    }
                    match spec.command(Stdio::null()).and_then(|mut c| Ok(c.spawn()?)) {
                        Ok(c) => child = Some(c),
                        Err(error) => tracing::warn!(replica = %name, %error, "restart failed; trying again"),
                    }
                }
            })
        };
        Ok(Self { name, pid, starts, stop, task })
    }

    /// SIGKILL, as a crash or the OOM killer would; false when it was not running.
    pub fn kill(&self) -> bool {
        let pid = self.pid.load(Ordering::Relaxed);
        pid != 0 && i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), Signal::SIGKILL).is_ok())
    }

    /// Its pid now; 0 between a crash and its restart.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Times it was started.
    pub fn starts(&self) -> u32 {
        self.starts.load(Ordering::Relaxed)
    }

    /// Stops it (SIGTERM, then SIGKILL) and its supervisor.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

pub(crate) async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

