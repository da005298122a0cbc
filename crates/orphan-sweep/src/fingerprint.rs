//! How logs name a token without showing it: a masked form (at most its first 4 characters) and a
//! keyed HMAC-SHA256 fingerprint, so operators can correlate lines without seeing the token.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use keel_audit::Token;
use keel_provision::TokenDigest;
use sha2::Sha256;

/// The key fingerprints are computed with. Its `Debug` never shows it.
///
/// The HMAC state keyed with it is kept, so a fingerprint costs the hash of its message only
/// (a tick fingerprints every candidate).
#[derive(Clone)]
pub struct FingerprintKey(Hmac<Sha256>);

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC-SHA256 takes a key of any length")
}

/// A fingerprint key shorter than 16 bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the fingerprint key must be at least 16 bytes (its value is not shown)")]
pub struct WeakKey;

impl FingerprintKey {
    /// A key from configuration (for example `KEEL_ORPHAN_SWEEP_FINGERPRINT_KEY`).
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, WeakKey> {
        let key = key.into();
        if key.len() < 16 {
            return Err(WeakKey);
        }
        Ok(Self(keyed(&key)))
    }

    /// A random key for this process only: fingerprints correlate within one process's lines.
    pub fn ephemeral() -> Self {
        let mut key = Vec::with_capacity(32);
        key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self(keyed(&key))
    }

    /// The first 12 hex digits of HMAC-SHA256(key, token).
    pub fn fingerprint(&self, token: &Token) -> String {
        self.fingerprint_bytes(token.expose().as_bytes())
    }

    /// The first 12 hex digits of HMAC-SHA256(key, digest): how a log line correlates an object
    /// known by its [`TokenDigest`].
    pub fn fingerprint_digest(&self, digest: &TokenDigest) -> String {
        self.fingerprint_bytes(digest.as_str().as_bytes())
    }

    fn fingerprint_bytes(&self, bytes: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut mac = self.0.clone();
        mac.update(bytes);
        let mut hex = String::with_capacity(12);
        for &b in mac.finalize().into_bytes().iter().take(6) {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        hex
    }

    /// How a log line names `token`: `abcd… (fp 0123456789ab)`.
    pub fn describe(&self, token: &Token) -> String {
        format!("{} (fp {})", token.masked(), self.fingerprint(token))
    }
}

impl fmt::Debug for FingerprintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FingerprintKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_stable_and_never_show_the_token() {
        let token = Token::parse("a1b2c3d4e5f6a7b8").unwrap();
        let key = FingerprintKey::new(*b"0123456789abcdef").unwrap();
        let other = FingerprintKey::new(*b"fedcba9876543210").unwrap();
        assert_eq!(key.fingerprint(&token), key.fingerprint(&token));
        assert_ne!(key.fingerprint(&token), other.fingerprint(&token));
        assert_eq!(key.fingerprint(&token).len(), 12);
        let shown = key.describe(&token);
        assert!(shown.starts_with("a1b2…"), "{shown}");
        assert!(!shown.contains(token.expose()));
        assert!(!format!("{key:?}").contains("0123"));
        assert_eq!(FingerprintKey::new(*b"short").unwrap_err(), WeakKey);
    }
}
