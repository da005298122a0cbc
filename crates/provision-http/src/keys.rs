//! API keys: who is calling, and for whom it may act.
//!
//! A key reads `keel_<id>_<secret>`: `<id>` is 12 lowercase hex digits, public, and the lookup
//! prefix (it names the key in listings, logs and the audit actor); `<secret>` is 32 random
//! bytes in unpadded base64url (256 bits of entropy). The key is shown once, when it is created;
//! the table `api_keys` keeps only the SHA-256 of the secret. A fast hash is enough for a
//! high-entropy secret (no password to guess), and the stored digests are compared in constant
//! time.
//!
//! A key is scoped to one team ([`Scope::Team`]) or to the operators ([`Scope::Operator`]).
//! Creating and revoking keys records `api_key.created` / `api_key.revoked` in the same
//! transaction as the change.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keel_audit::{Actor, AuditEvent, AuditKind, TeamId};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use time::OffsetDateTime;

/// The public id of a key: 12 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    /// Parses an id; `None` unless it is exactly 12 lowercase hex digits.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 12 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(s.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// For whom a key acts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One team: it sees and changes only that team's resources.
    Team(TeamId),
    /// The platform's operators: every team, and the `operator` and `expired` delete reasons.
    Operator,
}

impl Scope {
    /// The stored name (`team` or `operator`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Scope::Team(_) => "team",
            Scope::Operator => "operator",
        }
    }
}

/// An authenticated caller: the key it presented and that key's scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    key_id: KeyId,
    scope: Scope,
}

impl Principal {
    /// A principal (the API builds them only from a verified key; tests and embedders may
    /// build their own).
    pub fn new(key_id: KeyId, scope: Scope) -> Self {
        Self { key_id, scope }
    }

    /// The key's id.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The key's scope.
    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Whether this principal may see and change `team`'s resources.
    pub fn may_act_for(&self, team: TeamId) -> bool {
        match self.scope {
            Scope::Team(own) => own == team,
            Scope::Operator => true,
        }
    }

    /// Whether this is an operator key.
    pub fn is_operator(&self) -> bool {
        match self.scope {
            Scope::Team(_) => false,
            Scope::Operator => true,
        }
    }

    /// The audit actor: `key:<id>` for a team key, `operator:key-<id>` for an operator key.
    pub fn actor(&self) -> Actor {
        let name = match self.scope {
            Scope::Team(_) => format!("key:{}", self.key_id),
            Scope::Operator => format!("operator:key-{}", self.key_id),
        };
        Actor::parse(&name).expect("a key id is lowercase hex, a valid actor")
    }

    /// What an `Idempotency-Key` is scoped to: the team (so a key rotated mid-retry still
    /// finds its outcome), or the operators.
    pub fn idempotency_scope(&self) -> String {
        match self.scope {
            Scope::Team(team) => format!("team:{team}"),
            Scope::Operator => "operator".to_owned(),
        }
    }
}

/// A whole API key (id and secret). Shown once; its `Debug` and `Display` redact the secret.
pub struct ApiKey(String);

impl ApiKey {
    /// The key in full, to hand to its holder once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl Drop for ApiKey {
    fn drop(&mut self) {
        zero(&mut self.0);
    }
}

fn zero(s: &mut String) {
    // Overwrite in place: the bytes stay valid UTF-8 (all zero).
    let len = s.len();
    s.clear();
    s.extend(std::iter::repeat_n('\0', len));
    s.clear();
}

const PREFIX: &str = "keel_";

/// Splits a presented key into its id and secret; `None` when it is not of the key's shape.
fn split(presented: &str) -> Option<(KeyId, &str)> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id = KeyId::parse(id)?;
    (secret.len() == 43
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    .then_some((id, secret))
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    bytes
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The team of a team key does not exist.
    #[error("the team does not exist; create keys only for existing teams")]
    TeamNotFound,
    /// No key has this id.
    #[error("no API key has this id")]
    NotFound,
    /// The label is longer than 200 characters.
    #[error("the label is longer than 200 characters")]
    LabelTooLong,
    /// The label holds a control character (a line break, an escape sequence): it would let
    /// one line of `keys list` pose as another.
    #[error("the label holds a control character")]
    LabelHasControlCharacter,
    /// The audit event could not be built.
    #[error("the audit event could not be built")]
    Audit(#[from] keel_audit::AuditFieldError),
    /// The database failed (its error never carries a key: keys are bound, never inlined).
    #[error("the database failed to {operation}")]
    Store {
        /// What was being attempted.
        operation: &'static str,
        /// The database error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn store(operation: &'static str) -> impl FnOnce(sqlx::Error) -> KeyError {
    move |e| KeyError::Store {
        operation,
        source: Box::new(e),
    }
}

/// A key as listed: everything but its secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's id.
    pub id: KeyId,
    /// Its scope.
    pub scope: Scope,
    /// A free label (who holds it, what for).
    pub label: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

/// Whether `label` may label a key: at most 200 characters, none of them a control character.
pub fn check_label(label: &str) -> Result<(), KeyError> {
    if label.chars().count() > 200 {
        return Err(KeyError::LabelTooLong);
    }
    if label.chars().any(char::is_control) {
        return Err(KeyError::LabelHasControlCharacter);
    }
    Ok(())
}

/// Creates a key of `scope`, recording `api_key.created` (by `actor`) in the same transaction.
/// The returned [`ApiKey`] is the only copy of the secret.
pub async fn create(
    pool: &PgPool,
    scope: Scope,
    label: &str,
    actor: Actor,
    now: OffsetDateTime,
) -> Result<(KeyInfo, ApiKey), KeyError> {
    check_label(label)?;
    let id = KeyId(random::<6>().iter().map(|b| format!("{b:02x}")).collect());
    let secret = URL_SAFE_NO_PAD.encode(random::<32>());
    let key = ApiKey(format!("{PREFIX}{id}_{secret}"));
    let team = match scope {
        Scope::Team(team) => Some(team),
        Scope::Operator => None,
    };
    let mut audit = AuditEvent::new(AuditKind::ApiKeyCreated, actor, now)
        .attr("key_id", id.as_str())?
        .attr("scope", scope.as_str())?;
    if let Some(team) = team {
        audit = audit.team(team);
    }
    let mut tx = pool.begin().await.map_err(store("begin a transaction"))?;
    let inserted = sqlx::query(
        "INSERT INTO provision_api.api_keys (id, secret_sha256, scope, team_id, label, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id.as_str())
    .bind(digest(&secret))
    .bind(scope.as_str())
    .bind(team.map(|t| t.as_uuid()))
    .bind(label)
    .bind(now)
    .execute(&mut *tx)
    .await;
    if let Err(e) = inserted {
        if e.as_database_error()
            .is_some_and(|d| d.is_foreign_key_violation())
        {
            return Err(KeyError::TeamNotFound);
        }
        return Err(store("insert an API key")(e));
    }
    keel_audit::postgres::insert(&mut tx, &audit)
        .await
        .map_err(|e| KeyError::Store {
            operation: "record api_key.created",
            source: Box::new(e),
        })?;
    tx.commit().await.map_err(store("commit a new API key"))?;
    let info = KeyInfo {
        id,
        scope,
        label: label.to_owned(),
        created_at: now,
        revoked_at: None,
    };
    Ok((info, key))
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: String,
    scope: String,
    team_id: Option<uuid::Uuid>,
    label: String,
    created_at: OffsetDateTime,
    revoked_at: Option<OffsetDateTime>,
}

impl KeyRow {
    fn info(self) -> Option<KeyInfo> {
        let scope = match (self.scope.as_str(), self.team_id) {
            ("team", Some(team)) => Scope::Team(TeamId::from_uuid(team)),
            ("operator", None) => Scope::Operator,
            _ => return None,
        };
        Some(KeyInfo {
            id: KeyId::parse(&self.id)?,
            scope,
            label: self.label,
            created_at: self.created_at,
            revoked_at: self.revoked_at,
        })
    }
}

/// Every key, oldest first (without secrets).
pub async fn list(pool: &PgPool) -> Result<Vec<KeyInfo>, KeyError> {
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, scope, team_id, label, created_at, revoked_at FROM provision_api.api_keys \
         ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await
    .map_err(store("list API keys"))?;
    Ok(rows.into_iter().filter_map(KeyRow::info).collect())
}

/// Revokes a key, recording `api_key.revoked` in the same transaction. Answers `false`, writing
/// nothing, when it was already revoked.
pub async fn revoke(
    pool: &PgPool,
    id: &KeyId,
    actor: Actor,
    now: OffsetDateTime,
) -> Result<bool, KeyError> {
    let mut tx = pool.begin().await.map_err(store("begin a transaction"))?;
    let row: Option<(Option<uuid::Uuid>, Option<OffsetDateTime>)> = sqlx::query_as(
        "SELECT team_id, revoked_at FROM provision_api.api_keys WHERE id = $1 FOR UPDATE",
    )
    .bind(id.as_str())
    .fetch_optional(&mut *tx)
    .await
    .map_err(store("read an API key"))?;
    let Some((team, revoked_at)) = row else {
        return Err(KeyError::NotFound);
    };
    if revoked_at.is_some() {
        return Ok(false);
    }
    sqlx::query("UPDATE provision_api.api_keys SET revoked_at = $2 WHERE id = $1")
        .bind(id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store("revoke an API key"))?;
    let mut audit =
        AuditEvent::new(AuditKind::ApiKeyRevoked, actor, now).attr("key_id", id.as_str())?;
    if let Some(team) = team {
        audit = audit.team(TeamId::from_uuid(team));
    }
    keel_audit::postgres::insert(&mut tx, &audit)
        .await
        .map_err(|e| KeyError::Store {
            operation: "record api_key.revoked",
            source: Box::new(e),
        })?;
    tx.commit()
        .await
        .map_err(store("commit a key revocation"))?;
    Ok(true)
}

/// The principal `presented` authenticates, or `None` when it is not a live key (malformed,
/// unknown, wrong secret or revoked: the caller cannot tell which).
pub async fn authenticate(pool: &PgPool, presented: &str) -> Result<Option<Principal>, KeyError> {
    let Some((id, secret)) = split(presented) else {
        return Ok(None);
    };
    let row: Option<(Vec<u8>, String, Option<uuid::Uuid>)> = sqlx::query_as(
        "SELECT secret_sha256, scope, team_id FROM provision_api.api_keys WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id.as_str())
    .fetch_optional(pool)
    .await
    .map_err(store("look up an API key"))?;
    let Some((stored, scope, team)) = row else {
        return Ok(None);
    };
    if !same(&stored, &digest(secret)) {
        return Ok(None);
    }
    let scope = match (scope.as_str(), team) {
        ("team", Some(team)) => Scope::Team(TeamId::from_uuid(team)),
        ("operator", None) => Scope::Operator,
        _ => return Ok(None),
    };
    Ok(Some(Principal::new(id, scope)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keys_of_the_right_shape_are_split() {
        let secret = "a".repeat(43);
        let good = format!("keel_0123456789ab_{secret}");
        assert_eq!(
            split(&good).map(|(id, _)| id.0),
            Some("0123456789ab".into())
        );
        for bad in [
            String::new(),
            format!("keel_0123456789AB_{secret}"),
            format!("keel_0123456789a_{secret}"),
            format!("kel_0123456789ab_{secret}"),
            format!("keel_0123456789ab_{}", "a".repeat(42)),
            format!("keel_0123456789ab_{}!", "a".repeat(42)),
        ] {
            assert!(split(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_key_never_displays_its_secret() {
        let key = ApiKey("keel_0123456789ab_secretsecret".into());
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
    }

    #[test]
    fn digests_compare_in_full() {
        assert!(same(&digest("x"), &digest("x")));
        assert!(!same(&digest("x"), &digest("y")));
        assert!(!same(&digest("x"), &digest("x")[..31]));
    }
}
