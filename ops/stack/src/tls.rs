//! A local certificate authority and the certificates Ferry's TLS needs, made with `rcgen`.
//!
//! One directory holds them all: `ca.pem` and `ca-key.pem` (made once,
//! reused by later calls; keep the key off the servers), `server.pem` and
//! `server-key.pem` (for nats-server, valid for the names and addresses
//! asked for), and `client-<name>.pem` / `client-<name>-key.pem` for
//! clients of a server that verifies them. Keys are written with mode 0600.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use chrono::Datelike as _;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// The CA's certificate.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY: &str = "ca-key.pem";
/// The server's certificate.
pub const SERVER_CERT: &str = "server.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";

/// How long the CA is valid, in years.
const CA_YEARS: i32 = 10;
/// How long a server or client certificate is valid, in years.
const LEAF_YEARS: i32 = 2;

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused (a bad name, an unreadable key).
    #[error("{what}: {source}")]
    Cert {
        /// What was being made or read.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A client name that cannot be a file name.
    #[error("client name {0:?}: use letters, digits, `-` and `_` only")]
    BadName(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io { path: path.to_path_buf(), source }
}

fn cert_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> TlsError {
    let what = what.into();
    move |source| TlsError::Cert { what, source }
}

/// Writes `text` to `path` (mode 0600 when `secret`), replacing it whole:
/// written beside, then renamed.
fn write(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&partial)
        .map_err(io(&partial))?;
    f.write_all(text.as_bytes()).map_err(io(&partial))?;
    f.sync_all().map_err(io(&partial))?;
    std::fs::rename(&partial, path).map_err(io(path))
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = chrono::Utc::now();
    let (y, m, d) = (now.year(), now.month() as u8, now.day().min(28) as u8);
    // A day of slack before now, for clocks a little behind.
    params.not_before = rcgen::date_time_ymd(y, m, d.saturating_sub(1).max(1));
    params.not_after = rcgen::date_time_ymd(y + years, m, d);
}

/// A certificate authority that signs Ferry's certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    dir: PathBuf,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "Ferry local CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

impl Ca {
    /// The CA in `dir`, made (with `dir`) when it has none. A CA that
    /// exists is kept: certificates it signed before stay valid.
    pub fn open_or_create(dir: &Path) -> Result<Self, TlsError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let mut params = ca_params();
        if key_path.is_file() && cert_path.is_file() {
            let pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&pem).map_err(cert_err(format!("reading {}", key_path.display())))?;
            // The same name and key as the stored certificate: what it
            // signs verifies against that certificate.
            let cert = params.self_signed(&key).map_err(cert_err("the CA"))?;
            return Ok(Self { cert, key, dir: dir.to_path_buf() });
        }
        let key = KeyPair::generate().map_err(cert_err("the CA's key"))?;
        validity(&mut params, CA_YEARS);
        let cert = params.self_signed(&key).map_err(cert_err("the CA"))?;
        write(&key_path, &key.serialize_pem(), true)?;
        write(&cert_path, &cert.pem(), false)?;
        Ok(Self { cert, key, dir: dir.to_path_buf() })
    }

    /// The CA's certificate file, what clients trust.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    fn sign(&self, names: &[String], purpose: ExtendedKeyUsagePurpose, cn: &str) -> Result<(String, String), TlsError> {
        let mut params = CertificateParams::new(names.to_vec()).map_err(cert_err(format!("names {names:?}")))?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_YEARS);
        let key = KeyPair::generate().map_err(cert_err("a key"))?;
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(cert_err(format!("certificate for {cn}")))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Writes `server.pem` and `server-key.pem`, valid for `names` (host
    /// names and IP addresses; `localhost` and `127.0.0.1` are always
    /// added), replacing earlier ones. Returns the certificate's path.
    pub fn server(&self, names: &[String]) -> Result<PathBuf, TlsError> {
        let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        all.extend(names.iter().filter(|n| !all.contains(n)).cloned().collect::<Vec<_>>());
        let (cert, key) = self.sign(&all, ExtendedKeyUsagePurpose::ServerAuth, &all[all.len() - 1])?;
        write(&self.dir.join(SERVER_KEY), &key, true)?;
        let path = self.dir.join(SERVER_CERT);
        write(&path, &cert, false)?;
        Ok(path)
    }

    /// Writes `client-<name>.pem` and `client-<name>-key.pem`, a client
    /// certificate with `name` as its common name and its DNS name: a
    /// server with `verify_and_map` ([`mapped_server_block`]) logs it in
    /// as the user `name`. Returns both paths.
    pub fn client(&self, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(TlsError::BadName(name.to_string()));
        }
        let (cert, key) = self.sign(&[name.to_string()], ExtendedKeyUsagePurpose::ClientAuth, name)?;
        let (c, k) = (self.dir.join(format!("client-{name}.pem")), self.dir.join(format!("client-{name}-key.pem")));
        write(&k, &key, true)?;
        write(&c, &cert, false)?;
        Ok((c, k))
    }
}

/// A server's TLS files in a directory made by [`Ca`], as nats.conf's
/// `tls` block names them: the server requires TLS of every client.
pub fn server_block(dir: &Path) -> String {
    format!(
        "\ntls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  timeout: 2\n}}\n",
        dir.join(SERVER_CERT).display(),
        dir.join(SERVER_KEY).display(),
        dir.join(CA_CERT).display()
    )
}

/// Like [`server_block`], and every client must also present a
/// certificate this CA signed, which logs it in as the user its DNS name
/// names (`verify_and_map`): no password is asked, and one is not enough.
pub fn mapped_server_block(dir: &Path) -> String {
    server_block(dir).replace("  timeout: 2\n", "  timeout: 2\n  verify_and_map: true\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_ca_is_made_once_and_keys_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open_or_create(dir.path()).unwrap();
        let first = std::fs::read_to_string(ca.cert_path()).unwrap();
        ca.server(&["nats.example.com".into(), "10.0.0.5".into()]).unwrap();
        ca.client("desk-1").unwrap();
        let again = Ca::open_or_create(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(again.cert_path()).unwrap(), first, "the CA is kept");
        for key in [CA_KEY, SERVER_KEY, "client-desk-1-key.pem"] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert!(matches!(ca.client("../x"), Err(TlsError::BadName(_))));
    }
}
