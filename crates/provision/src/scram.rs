//! SCRAM-SHA-256 password verifiers (RFC 5802, RFC 7677), computed on the client the way
//! `psql \password` does, so the server only ever receives the verifier: a `CREATE ROLE …
//! PASSWORD 'SCRAM-SHA-256$…'` statement that reaches a server log (`log_statement`,
//! `log_min_error_statement`) does not reveal the password.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{KeyInit as _, Mac as _};
use sha2::{Digest as _, Sha256};

use crate::secret::Password;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The iteration count PostgreSQL uses by default (`scram_iterations`).
pub const ITERATIONS: u32 = 4096;

/// A SCRAM-SHA-256 verifier in PostgreSQL's stored format,
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`. It is not the password, and it
/// cannot be used to log in, but it still allows an offline guessing attack: it is only ever
/// sent to the server, never logged by Keel.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier(String);

impl Verifier {
    /// The verifier for `password` with `salt` (16 random bytes in practice).
    pub fn compute(password: &Password, salt: &[u8], iterations: u32) -> Self {
        let salted = hi(password.expose().as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(client_key);
        let server_key = hmac(&salted, b"Server Key");
        Self(format!(
            "SCRAM-SHA-256${iterations}:{}${}:{}",
            STANDARD.encode(salt),
            STANDARD.encode(stored_key),
            STANDARD.encode(server_key)
        ))
    }

    /// The verifier text, for the one statement that sets it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(<redacted>)")
    }
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// `Hi(password, salt, i)` of RFC 5802 (PBKDF2 with HMAC-SHA-256 and one block).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(password).expect("HMAC accepts keys of any length");
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut result = u;
    for _ in 1..iterations.max(1) {
        u = hmac(password, &u);
        for (r, x) in result.iter_mut().zip(u.iter()) {
            *r ^= x;
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verifier_matches_rfc7677_test_vector_keys() {
        // RFC 7677 section 3: user "user", password "pencil", salt "W22ZaJ0SNY7soEsUEjb6gQ==",
        // 4096 iterations. The ServerSignature in the RFC follows from ServerKey; StoredKey and
        // ServerKey below are what PostgreSQL stores for that password and salt.
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let verifier = Verifier::compute(&Password::new("pencil"), &salt, 4096);
        assert_eq!(
            verifier.expose(),
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
             WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
             wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
        assert!(!verifier.expose().contains("pencil"));
        assert!(!format!("{verifier:?}").contains("SCRAM"));
    }
}
