//! Sign-in sessions: an operator API key opens a session whose cookie is random (only its
//! SHA-256 is stored, in `provision_api.console_sessions`), with a CSRF token of its own that
//! every form carries. A revoked key ends its sessions at the next request.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_audit::{Actor, AuditEvent, AuditKind};
use keel_provision_http::keys::{self, KeyId, Principal, Scope};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::ConsoleError;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "keel_console_session";
/// The cookie holding the sign-in form's CSRF token (before any session exists).
pub const SIGN_IN_COOKIE: &str = "keel_console_sign_in";

/// A signed-in operator: the key's id and the session's CSRF token.
#[derive(Clone, Debug)]
pub struct Session {
    key_id: KeyId,
    csrf: String,
    digest: Vec<u8>,
}

impl Session {
    /// The audit actor: `operator:key-<id>`, as the provisioning API names an operator key.
    pub fn actor(&self) -> Actor {
        Principal::new(self.key_id.clone(), Scope::Operator).actor()
    }

    /// The key's id.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The session's CSRF token (put in every form).
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        same(self.csrf.as_bytes(), presented.as_bytes())
    }
}

/// 32 random bytes, unpadded base64url (43 characters).
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Constant-time equality of two byte strings.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn digest(cookie: &str) -> Vec<u8> {
    Sha256::digest(cookie.as_bytes()).to_vec()
}

fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> ConsoleError {
    move |e| ConsoleError::Store {
        operation,
        source: Box::new(e),
    }
}

/// Why a sign-in was refused (the page says which, without telling a wrong key from an unknown
/// one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignInRefusal {
    /// Not a live API key.
    NotAKey,
    /// A live key, but a team's: the console is for operators.
    NotAnOperator,
}

/// Opens a session for the operator key `presented`, recording `console.signed_in` in the same
/// transaction. Returns the cookie value (shown to the browser once; only its digest is kept).
pub async fn sign_in(
    pool: &PgPool,
    presented: &str,
    ttl: time::Duration,
    now: OffsetDateTime,
) -> Result<Result<(String, Session), SignInRefusal>, ConsoleError> {
    let principal = keys::authenticate(pool, presented.trim())
        .await
        .map_err(|e| ConsoleError::Store {
            operation: "look up an API key",
            source: Box::new(e),
        })?;
    let Some(principal) = principal else {
        return Ok(Err(SignInRefusal::NotAKey));
    };
    if !principal.is_operator() {
        return Ok(Err(SignInRefusal::NotAnOperator));
    }
    let cookie = random_token();
    let session = Session {
        key_id: principal.key_id().clone(),
        csrf: random_token(),
        digest: digest(&cookie),
    };
    let event = AuditEvent::new(AuditKind::ConsoleSignedIn, principal.actor(), now)
        .attr("key_id", principal.key_id().as_str())?;
    let mut tx = pool.begin().await.map_err(db("begin a transaction"))?;
    // Sessions over for a day are of no use to anyone: each sign-in clears them (indexed).
    sqlx::query("DELETE FROM provision_api.console_sessions WHERE expires_at < $1")
        .bind(now - time::Duration::days(1))
        .execute(&mut *tx)
        .await
        .map_err(db("clear ended console sessions"))?;
    sqlx::query(
        "INSERT INTO provision_api.console_sessions \
           (id_sha256, key_id, csrf_token, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&session.digest)
    .bind(session.key_id.as_str())
    .bind(&session.csrf)
    .bind(now)
    .bind(now + ttl)
    .execute(&mut *tx)
    .await
    .map_err(db("open a console session"))?;
    keel_audit::postgres::insert(&mut tx, &event)
        .await
        .map_err(|e| ConsoleError::Store {
            operation: "record console.signed_in",
            source: Box::new(e),
        })?;
    tx.commit().await.map_err(db("commit a console session"))?;
    Ok(Ok((cookie, session)))
}

/// The live session of `cookie`: not signed out, not expired (by the database's clock), and its
/// key still a live operator key.
pub async fn lookup(pool: &PgPool, cookie: &str) -> Result<Option<Session>, ConsoleError> {
    if cookie.len() != 43 {
        return Ok(None);
    }
    let digest = digest(cookie);
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT s.key_id, s.csrf_token FROM provision_api.console_sessions s \
         JOIN provision_api.api_keys k ON k.id = s.key_id \
         WHERE s.id_sha256 = $1 AND s.signed_out_at IS NULL AND s.expires_at > now() \
           AND k.revoked_at IS NULL AND k.scope = 'operator'",
    )
    .bind(&digest)
    .fetch_optional(pool)
    .await
    .map_err(db("look up a console session"))?;
    Ok(row.and_then(|(key_id, csrf)| {
        Some(Session {
            key_id: KeyId::parse(&key_id)?,
            csrf,
            digest,
        })
    }))
}

/// Ends `session`, recording `console.signed_out` in the same transaction.
pub async fn sign_out(
    pool: &PgPool,
    session: &Session,
    now: OffsetDateTime,
) -> Result<(), ConsoleError> {
    let event = AuditEvent::new(AuditKind::ConsoleSignedOut, session.actor(), now)
        .attr("key_id", session.key_id.as_str())?;
    let mut tx = pool.begin().await.map_err(db("begin a transaction"))?;
    let ended = sqlx::query(
        "UPDATE provision_api.console_sessions SET signed_out_at = $2 \
         WHERE id_sha256 = $1 AND signed_out_at IS NULL",
    )
    .bind(&session.digest)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(db("end a console session"))?;
    if ended.rows_affected() == 1 {
        keel_audit::postgres::insert(&mut tx, &event)
            .await
            .map_err(|e| ConsoleError::Store {
                operation: "record console.signed_out",
                source: Box::new(e),
            })?;
    }
    tx.commit().await.map_err(db("commit a sign-out"))?;
    Ok(())
}

/// The value of cookie `name` in a request's `Cookie` headers: `None` when it is absent, and
/// also when the request carries it twice with different values. A site on a sibling domain can
/// set a cookie of the same name for the parent domain, and the browser then sends both, in an
/// order the console does not choose; taking the first would let that site choose the session
/// (or the sign-in token) the console acts on.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    let mut values = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        });
    let first = values.next()?;
    values.all(|other| other == first).then_some(first)
}

/// A `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Path=/`, and `Secure` when `secure`.
pub fn set_cookie(name: &str, value: &str, max_age: Option<i64>, secure: bool) -> String {
    let mut out = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age {
        out.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        out.push_str("; Secure");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cookie_is_found_by_its_exact_name() {
        let mut headers = axum::http::HeaderMap::new();
        headers.append(
            axum::http::header::COOKIE,
            "a=1; keel_console_session=abc; keel_console_session_x=zzz"
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, "a"), Some("1"));
        assert_eq!(cookie(&headers, "b"), None);
        // On a second Cookie line (as HTTP/2 sends them) it is found the same way.
        headers.append(axum::http::header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&headers, "b"), Some("2"));
    }

    /// A cookie sent twice with different values (one set for a parent domain by a sibling
    /// site) names no session and no sign-in token; sent twice alike, it is that value.
    #[test]
    fn a_cookie_sent_twice_with_different_values_names_nothing() {
        for lines in [
            &["keel_console_session=mine; keel_console_session=tossed"][..],
            &["keel_console_session=tossed", "keel_console_session=mine"][..],
        ] {
            let mut headers = axum::http::HeaderMap::new();
            for line in lines {
                headers.append(axum::http::header::COOKIE, line.parse().unwrap());
            }
            assert_eq!(cookie(&headers, SESSION_COOKIE), None, "{lines:?}");
        }
        let mut alike = axum::http::HeaderMap::new();
        alike.append(
            axum::http::header::COOKIE,
            "keel_console_session=v; keel_console_session=v"
                .parse()
                .unwrap(),
        );
        assert_eq!(cookie(&alike, SESSION_COOKIE), Some("v"));
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_when_asked() {
        let plain = set_cookie(SESSION_COOKIE, "v", None, false);
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(!plain.contains("Secure"));
        assert!(set_cookie(SESSION_COOKIE, "v", Some(0), true).ends_with("Max-Age=0; Secure"));
    }

    #[test]
    fn random_tokens_are_43_url_safe_characters_and_differ() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }
}
