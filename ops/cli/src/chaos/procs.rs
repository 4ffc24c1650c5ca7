//! The processes of a chaos run: worker replicas restarted the way systemd or compose would, agents, and a TCP proxy that cuts an agent off its broker.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, Command};
use tokio_util::sync::CancellationToken;

/// How long the supervisor waits before starting a replica that exited
/// (systemd's `RestartSec=1` in ops/systemd).
pub const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How long a stopping process gets after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

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
    fn command(&self, stdin: Stdio) -> anyhow::Result<Command> {
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

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// An agent process with its stdin (activity events as JSON lines).
#[derive(Debug)]
pub struct AgentProc {
    spec: Spec,
    child: Option<Child>,
}

impl AgentProc {
    /// Starts the agent.
    pub fn start(spec: Spec) -> anyhow::Result<(Self, ChildStdin)> {
        let mut me = Self { spec, child: None };
        let stdin = me.spawn()?;
        Ok((me, stdin))
    }

    fn spawn(&mut self) -> anyhow::Result<ChildStdin> {
        let mut child = self
            .spec
            .command(Stdio::piped())?
            .spawn()
            .with_context(|| format!("starting {}", self.spec.program.display()))?;
        let stdin = child.stdin.take().context("the agent has no stdin")?;
        self.child = Some(child);
        Ok(stdin)
    }

    /// SIGKILL and wait for it.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts it again after [`kill`](Self::kill).
    pub fn restart(&mut self) -> anyhow::Result<ChildStdin> {
        self.spawn()
    }

    /// Stops it with SIGTERM.
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c).await;
        }
    }

    /// Whether it exited on its own (with its status).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

/// Writes activity lines `from..to` to an agent's stdin.
pub async fn feed_activities(stdin: &mut ChildStdin, from: u64, to: u64) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(64 * 1024);
    for n in from..to {
        let line = serde_json::json!({
            "kind": "activity",
            "body": {"app": "erp.exe", "title": super::verdict::activity_title(n), "duration_ms": 1000},
        });
        buf.extend_from_slice(line.to_string().as_bytes());
        buf.push(b'\n');
        if buf.len() > 60 * 1024 {
            stdin.write_all(&buf).await?;
            buf.clear();
        }
    }
    stdin.write_all(&buf).await?;
    stdin.flush().await
}

/// A loopback TCP proxy in front of the broker for one agent: cutting it
/// drops every connection and refuses new ones, as a pulled cable or a dead
/// VPN would look to the agent.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// The port agents connect to.
    pub port: u16,
    open: Arc<AtomicBool>,
    cut: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: u16, stop: CancellationToken) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let me = Self { port, open, cut: Arc::new(cut) };
        let proxy = me.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = stop.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                if !proxy.open.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let mut cut = proxy.cut.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else { return };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Ok(me)
    }

    /// Drops every connection through it and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::Relaxed);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::Relaxed);
    }
}
