//! Connection settings shared by the agent, the workers and the `ferry` CLI.
//!
//! One place decides how Ferry connects: which credentials, which inbox
//! prefix, and the reconnect back-off (exponential with full jitter, so a
//! fleet of agents does not reconnect in lock-step after a broker restart).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};
use rand::Rng;

/// How a client proves who it is.
#[derive(Clone, Default)]
pub enum Auth {
    /// No credentials (only for brokers that allow anonymous access; Ferry's
    /// `nats.conf` does not).
    #[default]
    None,
    /// A user and password from `nats.conf`.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// A NATS credentials file (user JWT and nkey seed).
    CredsFile(PathBuf),
    /// An nkey user: the seed (`SU...`) whose public key `nats.conf` lists
    /// (what `ferry agent add` creates). Read one with [`Auth::nkey_file`].
    Nkey {
        /// The user's seed; secret.
        seed: String,
    },
}

impl Auth {
    /// Reads an nkey seed file (`ferry agent add` writes `<id>.nk`): the
    /// first line that is not empty and not a `#` comment is the seed, and
    /// it must be a user seed.
    pub fn nkey_file(path: &std::path::Path) -> Result<Self, NkeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| NkeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let seed = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or_default();
        let invalid = |reason: String| NkeyFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let pair = nkeys::KeyPair::from_seed(seed).map_err(|e| invalid(e.to_string()))?;
        if !matches!(pair.key_pair_type(), nkeys::KeyPairType::User) {
            return Err(invalid(format!(
                "it holds a {:?} seed, not a user seed (SU...)",
                pair.key_pair_type()
            )));
        }
        Ok(Self::Nkey {
            seed: seed.to_string(),
        })
    }
}

/// Why an nkey seed file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NkeyFileError {
    /// The file could not be read.
    #[error("cannot read nkey seed file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no valid user seed.
    #[error("nkey seed file {path} holds no valid user seed: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::UserPassword { user, .. } => write!(f, "UserPassword({user}, ***)"),
            Self::CredsFile(p) => write!(f, "CredsFile({})", p.display()),
            Self::Nkey { .. } => f.write_str("Nkey(***)"),
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma separated, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Credentials.
    pub auth: Auth,
    /// Connection name shown by `nats server report connections`.
    pub name: String,
    /// Inbox prefix; agents use `_INBOX.<id>` so the broker can confine them.
    pub inbox_prefix: Option<String>,
    /// Keep retrying the first connect instead of failing at once.
    pub retry_initial_connect: bool,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// Capacity of each subscription's buffer (bounded queue in the client).
    pub subscription_capacity: usize,
    /// TLS settings; `None`: TLS only if the URL says `tls://` or the
    /// server requires it, trusting the system's roots.
    pub tls: Option<TlsFiles>,
}

/// The files of a TLS connection to NATS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA (PEM) that signed the server's certificate, trusted on top
    /// of the system's roots. `None`: the system's roots only.
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM) for servers that verify clients
    /// (`verify` / `verify_and_map`); goes with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// The settings of the `--tls-ca`, `--tls-cert` and `--tls-key` flags
    /// (or config keys): `None` when none is given.
    pub fn from_parts(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Option<Self> {
        (ca.is_some() || cert.is_some() || key.is_some()).then_some(Self { ca, cert, key })
    }
}

impl NatsConfig {
    /// Settings for `url` with no credentials and Ferry's defaults.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            auth: Auth::None,
            name: name.into(),
            inbox_prefix: None,
            retry_initial_connect: false,
            connect_timeout: Duration::from_secs(5),
            subscription_capacity: 8192,
            tls: None,
        }
    }

    /// The same settings, requiring TLS and trusting `ca` for the server's
    /// certificate.
    pub fn with_tls_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.tls.get_or_insert_with(TlsFiles::default).ca = Some(ca.into());
        self
    }

    /// The same settings with a user and password.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.auth = Auth::UserPassword {
            user: user.into(),
            password: password.into(),
        };
        self
    }

    /// Connects, with Ferry's reconnect back-off.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        self.connect_with(ConnectOptions::new()).await
    }

    /// Connects like [`connect`](Self::connect), and calls `on_error` with
    /// each error the server reports on this connection (a permission
    /// violation, say), as the server worded it.
    pub async fn connect_reporting(
        &self,
        on_error: impl Fn(String) + Send + Sync + 'static,
    ) -> Result<Client, ConnectError> {
        let on_error = std::sync::Arc::new(on_error);
        let opts = ConnectOptions::new().event_callback(move |event| {
            let on_error = on_error.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    on_error(e.to_string());
                }
            }
        });
        self.connect_with(opts).await
    }

    /// Connects for a publisher that must keep its order: when this
    /// connection breaks, the client does not reconnect, and the commands
    /// queued on it are dropped with it. (A client that reconnects sends
    /// what was queued at the break on the new connection, ahead of the
    /// earlier publishes the break lost: their order in the stream is then
    /// broken for good.) The caller opens a new connection and sends again,
    /// in order, what was not acknowledged.
    pub async fn connect_once(&self) -> Result<Client, ConnectError> {
        let connected = Arc::new(AtomicBool::new(false));
        let seen = connected.clone();
        let servers = self.servers();
        // After the first connection, every reconnect is sent to an address
        // nothing listens on, until the attempts run out and the client
        // closes; before it, the servers are tried as usual.
        let opts = ConnectOptions::new()
            .max_reconnects(servers.len() + 1)
            .reconnect_to_server_callback(move |_pool, _info| {
                let seen = seen.clone();
                async move {
                    if !seen.load(Ordering::Relaxed) {
                        return None;
                    }
                    let addr = NOWHERE.parse().ok()?;
                    Some(async_nats::ReconnectToServer { addr, delay: Some(Duration::ZERO) })
                }
            });
        let mut pool = servers;
        pool.push(NOWHERE);
        let client = self.connect_to(opts, &pool, false).await?;
        connected.store(true, Ordering::Relaxed);
        Ok(client)
    }

    /// The server URLs: several (a cluster) are comma separated; async-nats
    /// reads a single string as one URL.
    fn servers(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
    }

    async fn connect_with(&self, opts: ConnectOptions) -> Result<Client, ConnectError> {
        let servers = self.servers();
        self.connect_to(opts, &servers, self.retry_initial_connect).await
    }

    async fn connect_to(&self, opts: ConnectOptions, servers: &[&str], retry_initial: bool) -> Result<Client, ConnectError> {
        install_crypto_provider();
        let mut opts = opts
            .name(&self.name)
            .connection_timeout(self.connect_timeout)
            .subscription_capacity(self.subscription_capacity)
            .reconnect_delay_callback(reconnect_delay);
        match &self.auth {
            Auth::None => {}
            Auth::UserPassword { user, password } => {
                opts = opts.user_and_password(user.clone(), password.clone());
            }
            Auth::CredsFile(path) => {
                opts = opts.credentials_file(path).await.map_err(|source| {
                    ConnectError::Credentials {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            Auth::Nkey { seed } => {
                opts = opts.nkey(seed.clone());
            }
        }
        if let Some(prefix) = &self.inbox_prefix {
            opts = opts.custom_inbox_prefix(prefix);
        }
        if let Some(tls) = &self.tls {
            // Never fall back to plaintext once TLS is configured.
            opts = opts.require_tls(true);
            if let Some(ca) = &tls.ca {
                if !ca.is_file() {
                    return Err(ConnectError::TlsFile { what: "tls_ca", path: ca.clone() });
                }
                opts = opts.add_root_certificates(ca.clone());
            }
            match (&tls.cert, &tls.key) {
                (Some(cert), Some(key)) => {
                    for (what, path) in [("tls_cert", cert), ("tls_key", key)] {
                        if !path.is_file() {
                            return Err(ConnectError::TlsFile { what, path: path.clone() });
                        }
                    }
                    opts = opts.add_client_certificate(cert.clone(), key.clone());
                }
                (None, None) => {}
                _ => return Err(ConnectError::TlsPair),
            }
        }
        if retry_initial {
            opts = opts.retry_on_initial_connect();
        }
        // The client connects to one server and fails over to the others.
        opts.connect(servers)
            .await
            .map_err(|source| ConnectError::Connect {
                url: self.url.clone(),
                source,
            })
    }
}

/// async-nats builds rustls with both of its crypto back-ends, so rustls
/// cannot pick one itself and panics on the first TLS handshake: choose
/// `ring` for the whole process, once, unless something else already did.
/// Every TLS client in Ferry (NATS, PostgreSQL) calls this first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = async_nats::rustls::crypto::ring::default_provider().install_default();
    });
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A TLS file named in the settings is not there.
    #[error("{what} {path} is not a readable file")]
    TlsFile {
        /// The setting (`tls_ca`, `tls_cert`, `tls_key`).
        what: &'static str,
        /// The path given.
        path: PathBuf,
    },
    /// A client certificate without its key, or the other way round.
    #[error("tls_cert and tls_key go together: give both or neither")]
    TlsPair,
    /// The credentials file could not be read.
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The server refused or could not be reached.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// The client's error.
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Where a connection that must not come back reconnects: port 0, which
/// nothing listens on, so the attempt fails at once.
const NOWHERE: &str = "nats://127.0.0.1:0";

/// Smallest reconnect delay.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay.
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// Delay before reconnect attempt `attempt` (0 = first): exponential from
/// 100 ms to 10 s, with full jitter in the upper half (so never zero).
pub fn reconnect_delay(attempt: usize) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    let ceiling = exp.min(BACKOFF_CAP);
    if attempt == 0 {
        return Duration::ZERO;
    }
    let half = ceiling / 2;
    half + rand::thread_rng().gen_range(Duration::ZERO..=half)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(reconnect_delay(0), Duration::ZERO);
        for attempt in 1..40 {
            let d = reconnect_delay(attempt);
            let ceiling = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_CAP);
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
        assert!(reconnect_delay(30) >= BACKOFF_CAP / 2);
    }

    #[test]
    fn nkey_file_reads_a_user_seed_and_hides_it() {
        let dir = std::env::temp_dir().join(format!("ferry-nkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let path = dir.join("a.nk");
        std::fs::write(&path, format!("# desk-7\n\n{seed}\n")).unwrap();
        let auth = Auth::nkey_file(&path).unwrap();
        assert!(matches!(&auth, Auth::Nkey { seed: s } if *s == seed));
        assert_eq!(format!("{auth:?}"), "Nkey(***)");

        let account = nkeys::KeyPair::new_account().seed().unwrap();
        std::fs::write(&path, account).unwrap();
        let err = Auth::nkey_file(&path).unwrap_err().to_string();
        assert!(err.contains("not a user seed"), "{err}");
        std::fs::write(&path, "SUNOTASEED").unwrap();
        let err = Auth::nkey_file(&path).unwrap_err().to_string();
        assert!(err.contains("holds no valid user seed"), "{err}");
        let err = Auth::nkey_file(&dir.join("missing.nk")).unwrap_err().to_string();
        assert!(err.contains("cannot read nkey seed file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn debug_hides_password() {
        let c = NatsConfig::new("nats://x", "t").with_user("u", "secret");
        assert!(!format!("{c:?}").contains("secret"));
    }
}
