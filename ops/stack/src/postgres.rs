//! A real PostgreSQL cluster made with Debian's `initdb` and run with `pg_ctl`, for `ferry up` and tests.
//!
//! The cluster lives in a directory of its own (a temp dir for tests,
//! `.ferry/postgres` for `ferry up`), listens on 127.0.0.1 only (no Unix
//! socket, so nothing needs `/var/run/postgresql`), and has one password
//! user `ferry` owning one database `ferry`. PostgreSQL refuses to run as
//! root; when this process is root, every server program runs as the
//! `postgres` user (through `runuser`) and the cluster's directory is
//! handed to that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::StackError;
use crate::{free_port, install};

/// The role and database Ferry uses in a cluster it made.
pub const DB_USER: &str = "ferry";
/// The database name.
pub const DB_NAME: &str = "ferry";

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct PgServerOptions {
    /// Where the cluster lives; a temp dir when `None`. An existing cluster
    /// there is started as it is.
    pub dir: Option<PathBuf>,
    /// Port on 127.0.0.1; a free one when `None`.
    pub port: Option<u16>,
    /// The `ferry` role's password; required for an existing cluster,
    /// generated for a new one when `None`.
    pub password: Option<String>,
    /// Turn off `fsync`: for throwaway test clusters only, never for data
    /// anyone keeps.
    pub unsafe_fast: bool,
    /// A directory made by [`crate::tls::Ca`] with a server certificate:
    /// the server then offers TLS with it (`ssl = on`), for clients that
    /// ask with `sslmode=require`.
    pub tls: Option<PathBuf>,
}

/// A running PostgreSQL cluster. Dropping it stops the server (immediate
/// mode, like a crash) and removes a temp dir.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
    unsafe_fast: bool,
    /// The server offers TLS (its certificate is in the data directory).
    tls: bool,
    running: bool,
    /// Run the server programs as `postgres` (this process is root).
    as_postgres: bool,
    _temp: Option<tempfile::TempDir>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// Finds the directory of `initdb`/`pg_ctl`: on `PATH`, else Debian's
/// `/usr/lib/postgresql/<newest>/bin`; installs `postgresql` when allowed.
pub fn bin_dir() -> Result<PathBuf, StackError> {
    if let Some(dir) = debian_bin_dir() {
        return Ok(dir);
    }
    if let Some(p) = install::find("pg_ctl") {
        if let Some(dir) = p.canonicalize().ok().and_then(|c| c.parent().map(Path::to_path_buf)) {
            return Ok(dir);
        }
    }
    install::ensure_package("postgresql", "initdb", debian_bin_dir)
}

fn debian_bin_dir() -> Option<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

/// A server program, run as `postgres` when `as_postgres`.
fn server_command(bin: &Path, as_postgres: bool, program: &str) -> Command {
    let path = bin.join(program);
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// Stops a cluster under `dir` (as [`PgServer`] lays it out) that some
/// earlier process left running, e.g. a `ferry up` killed with SIGKILL.
/// Returns whether one was running.
pub fn stop_existing(dir: &Path) -> Result<bool, StackError> {
    let data = dir.join("data");
    if !data.join("postmaster.pid").is_file() {
        return Ok(false);
    }
    let bin = bin_dir()?;
    let as_postgres = nix::unistd::Uid::effective().is_root();
    let status = server_command(&bin, as_postgres, "pg_ctl")
        .arg("-D")
        .arg(&data)
        .arg("status")
        .stdin(Stdio::null())
        .output()
        .map_err(io("run pg_ctl status"))?;
    if !status.status.success() {
        return Ok(false);
    }
    let out = server_command(&bin, as_postgres, "pg_ctl")
        .arg("-D")
        .arg(&data)
        .args(["stop", "-m", "fast", "-w", "-t", "60"])
        .stdin(Stdio::null())
        .output()
        .map_err(io("run pg_ctl stop"))?;
    if !out.status.success() {
        return Err(StackError::Exited {
            program: "pg_ctl stop".into(),
            status: out.status.to_string(),
            log_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(true)
}

impl PgServer {
    /// A fresh cluster in a temp dir on a free port, tuned for tests.
    pub fn start_temp() -> Result<Self, StackError> {
        Self::start(PgServerOptions {
            unsafe_fast: true,
            ..Default::default()
        })
    }

    /// Creates the cluster when its directory holds none, then starts it.
    pub fn start(opts: PgServerOptions) -> Result<Self, StackError> {
        let bin = bin_dir()?;
        let as_postgres = nix::unistd::Uid::effective().is_root();
        let (temp, dir) = match opts.dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("ferry-pg-")
                    .tempdir()
                    .map_err(io("create temp dir"))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let port = match opts.port {
            Some(p) => p,
            None => free_port().map_err(io("find a free port"))?,
        };
        let fresh = !dir.join("data").join("PG_VERSION").is_file();
        let password = match (opts.password, fresh) {
            (Some(p), _) => p,
            (None, true) => crate::secrets::generate_password(),
            (None, false) => return Err(StackError::PgPassword { dir: dir.clone() }),
        };
        let mut pg = Self {
            bin,
            dir,
            port,
            password,
            unsafe_fast: opts.unsafe_fast,
            tls: false,
            running: false,
            as_postgres,
            _temp: temp,
        };
        if fresh {
            pg.initdb()?;
        }
        if let Some(dir) = &opts.tls {
            pg.install_tls(dir)?;
        }
        // A cluster left running by a killed `ferry up` holds the port and
        // its postmaster.pid: stop it first so this start owns the server.
        if !fresh && pg.pg_ctl(&["status"]).map(|o| o.status.success()).unwrap_or(false) {
            tracing::info!(dir = %pg.data_dir().display(), "stopping a PostgreSQL left running by an earlier run");
            let _ = pg.pg_ctl(&["stop", "-m", "fast", "-w"]);
        }
        let chose_port = opts.port.is_none();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match pg.start_server() {
                Err(StackError::Exited { ref log_tail, .. })
                    if chose_port && attempts < 5 && log_tail.contains("already in use") =>
                {
                    pg.port = free_port().map_err(io("find a free port"))?;
                }
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        if fresh {
            pg.create_database()?;
        }
        Ok(pg)
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("data").join("server.log")
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn command(&self, program: &str) -> Command {
        server_command(&self.bin, self.as_postgres, program)
    }

    /// Copies the server certificate and key from `dir` into the data
    /// directory, readable by the server's user only (PostgreSQL refuses a
    /// key others can read).
    fn install_tls(&mut self, dir: &Path) -> Result<(), StackError> {
        use std::os::unix::fs::PermissionsExt as _;
        for (from, to) in [(crate::tls::SERVER_CERT, "server.crt"), (crate::tls::SERVER_KEY, "server.key")] {
            let (from, to) = (dir.join(from), self.data_dir().join(to));
            std::fs::copy(&from, &to).map_err(io(format!("copy {} to {}", from.display(), to.display())))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("chmod {}", to.display())))?;
            self.chown_to_postgres(&to)?;
        }
        self.tls = true;
        Ok(())
    }

    fn chown_to_postgres(&self, path: &Path) -> Result<(), StackError> {
        if !self.as_postgres {
            return Ok(());
        }
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or_else(|| StackError::Missing {
                program: "the postgres user".into(),
                command: "sudo apt-get install -y postgresql".into(),
            })?;
        nix::unistd::chown(path, Some(user.uid), Some(user.gid)).map_err(|e| StackError::Io {
            what: format!("chown {} to postgres", path.display()),
            source: std::io::Error::from(e),
        })
    }

    fn initdb(&mut self) -> Result<(), StackError> {
        use std::os::unix::fs::PermissionsExt;
        // The postgres user must be able to reach the cluster directory.
        if self.as_postgres {
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io(format!("chmod {}", self.dir.display())))?;
        }
        let data = self.data_dir();
        std::fs::create_dir_all(&data).map_err(io(format!("create {}", data.display())))?;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("chmod {}", data.display())))?;
        self.chown_to_postgres(&data)?;
        let pwfile = self.dir.join("initdb.pw");
        std::fs::write(&pwfile, &self.password).map_err(io(format!("write {}", pwfile.display())))?;
        self.chown_to_postgres(&pwfile)?;
        let out = self
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", DB_USER, "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()
            .map_err(io("run initdb"));
        let _ = std::fs::remove_file(&pwfile);
        let out = out?;
        if !out.status.success() {
            return Err(StackError::Exited {
                program: "initdb".into(),
                status: out.status.to_string(),
                log_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<std::process::Output, StackError> {
        self.command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io("run pg_ctl"))
    }

    fn start_server(&mut self) -> Result<(), StackError> {
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200",
            self.port
        );
        if self.tls {
            // Relative to the data directory, where `install_tls` put them.
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        if self.unsafe_fast {
            // Safe against a crash of the server process (what tests do), not of
            // the machine. `synchronous_commit` stays on: with it off, an
            // immediate stop loses commits already acknowledged.
            opts.push_str(" -c fsync=off -c full_page_writes=off");
        }
        let log = self.log_path();
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "-l"])
            .arg(&log)
            .args(["-o", &opts, "start"])
            .stdin(Stdio::null())
            .output()
            .map_err(io("run pg_ctl start"))?;
        if !out.status.success() {
            return Err(StackError::Exited {
                program: "postgres".into(),
                status: out.status.to_string(),
                log_tail: format!("{}\n{}", String::from_utf8_lossy(&out.stderr), self.log_tail(20)),
            });
        }
        self.running = true;
        Ok(())
    }

    fn create_database(&self) -> Result<(), StackError> {
        self.createdb(&["-O", DB_USER, DB_NAME])
    }

    /// Runs `createdb` as the `ferry` role with `args`.
    fn createdb(&self, args: &[&str]) -> Result<(), StackError> {
        let out = Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", DB_USER])
            .args(args)
            .env("PGPASSWORD", &self.password)
            .stdin(Stdio::null())
            .output()
            .map_err(io("run createdb"))?;
        if !out.status.success() {
            return Err(StackError::Exited {
                program: "createdb".into(),
                status: out.status.to_string(),
                log_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// `postgres://ferry:<password>@127.0.0.1:<port>/ferry`.
    pub fn url(&self) -> String {
        self.url_for(DB_NAME)
    }

    /// The URL of another database on this server.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{DB_USER}:{}@127.0.0.1:{}/{db}", self.password, self.port)
    }

    /// Creates another empty database owned by `ferry` and returns its URL.
    pub fn create_extra_database(&self, name: &str) -> Result<String, StackError> {
        self.createdb(&[name])?;
        Ok(self.url_for(name))
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `ferry` role's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The directory that holds the cluster.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the server cleanly (fast mode: open transactions roll back).
    pub fn stop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "30"]);
            self.running = false;
        }
    }

    /// Stops the server the way a crash would (immediate mode: no
    /// checkpoint; the next start replays the WAL).
    pub fn kill(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w", "-t", "30"]);
            self.running = false;
        }
    }

    /// Starts the server again after [`stop`](Self::stop) or
    /// [`kill`](Self::kill), on the same port.
    pub fn restart(&mut self) -> Result<(), StackError> {
        self.stop();
        self.start_server()
    }

    /// Whether the server is running (as far as this handle knows).
    pub fn is_running(&self) -> bool {
        self.running
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self._temp.is_some() {
            self.kill();
        } else {
            self.stop();
        }
    }
}
