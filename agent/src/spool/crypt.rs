//! The spool's key and what it seals: AES-256-GCM records and state, and keyed digests.
//!
//! The key is 32 random bytes made on first use and stored protected beside
//! the database (DPAPI on Windows, a 0600 file elsewhere). A sealed value is
//! a random nonce followed by the ciphertext; its associated data ties it to
//! its place (a record's sequence number, a state entry's name), so sealed
//! values cannot be swapped.

use std::path::Path;

use aes_gcm::aead::{Aead, Generate, Key, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::SpoolError;
use crate::platform;

/// The key's file in the spool directory.
pub(super) const KEY_FILE: &str = "spool.key";
/// Bytes of the random nonce in front of each sealed value.
const NONCE_LEN: usize = 12;

/// Why a sealed value did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unsealed {
    /// Shorter than a nonce.
    TooShort,
    /// The nonce is malformed.
    Nonce,
    /// The ciphertext or its associated data was altered, or the key is another.
    Authentication,
}

/// The spool's cipher and the key of its reference digests.
pub(super) struct Crypt {
    cipher: Aes256Gcm,
    /// Key of the reference digests, derived from the spool's key.
    ref_key: [u8; 32],
}

impl Crypt {
    /// The key in `path`, made and stored there on first use.
    pub(super) fn load_or_create(path: &Path) -> Result<Self, SpoolError> {
        let key = load_or_create_key(path)?;
        Ok(Self {
            cipher: Aes256Gcm::new(&key),
            ref_key: digest_key(key.as_slice(), b"ferry spool: adapter message references"),
        })
    }

    /// `plain` sealed under a fresh nonce, bound to `aad`.
    pub(super) fn seal(&self, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SpoolError> {
        let nonce = Nonce::generate();
        let ct = self
            .cipher
            .encrypt(&nonce, Payload { msg: plain, aad })
            .map_err(|_| SpoolError::Corrupt { seq: 0, what: "encryption" })?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// The plain text of `sealed`, which must have been sealed with `aad`.
    pub(super) fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Unsealed> {
        if sealed.len() < NONCE_LEN {
            return Err(Unsealed::TooShort);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_from(nonce).map_err(|_| Unsealed::Nonce)?;
        self.cipher
            .decrypt(&nonce, Payload { msg: ct, aad })
            .map_err(|_| Unsealed::Authentication)
    }

    /// The first 128 bits of the keyed digest of `reference` among those of
    /// `adapter` (length-prefixed, so `("wx", "auto1")` is not `("wxauto", "1")`).
    pub(super) fn ref_digest(&self, adapter: &str, reference: &str) -> u128 {
        let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(&self.ref_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(&(adapter.len() as u64).to_le_bytes());
        mac.update(adapter.as_bytes());
        mac.update(reference.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut first = [0u8; 16];
        first.copy_from_slice(&digest[..16]);
        u128::from_le_bytes(first)
    }
}

/// A key for `purpose` derived from the spool's key.
fn digest_key(key: &[u8], purpose: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(purpose);
    mac.finalize().into_bytes().into()
}

/// The spool key: 32 random bytes, stored protected (DPAPI on Windows, a
/// 0600 file elsewhere); made on first use.
fn load_or_create_key(path: &Path) -> Result<Key<Aes256Gcm>, SpoolError> {
    let key_err = |message: String| SpoolError::Key {
        path: path.to_path_buf(),
        message,
    };
    match std::fs::read(path) {
        Ok(stored) => {
            let raw = platform::unprotect_key(&stored).map_err(|e| key_err(e.to_string()))?;
            Key::<Aes256Gcm>::try_from(raw.as_slice())
                .map_err(|_| key_err(format!("expected 32 bytes, found {}", raw.len())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::<Aes256Gcm>::generate();
            let stored = platform::protect_key(&key).map_err(|e| key_err(e.to_string()))?;
            platform::write_private_file(path, &stored).map_err(|e| key_err(e.to_string()))?;
            Ok(key)
        }
        Err(source) => Err(SpoolError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
