//! The processes of a chaos run beside its worker replicas ([`crate::procs`]): agents, and a TCP proxy that cuts an agent off its broker.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin};
use tokio_util::sync::CancellationToken;

use crate::procs::{terminate, Spec};

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
