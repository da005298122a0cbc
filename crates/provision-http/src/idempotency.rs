//! `Idempotency-Key` for `POST /v1/resources`, on the table `idempotency_keys`.
//!
//! A key is scoped to the caller ([`crate::Principal::idempotency_scope`]) and kept for a
//! retention period (24 h by default). The first request with a key claims it (`in flight`:
//! no outcome yet) with the SHA-256 of its parameters; then:
//! - the same key with other parameters answers `idempotency_key_reused` (422), in flight or not;
//! - the same key while the first is in flight answers `idempotency_key_in_use` (409);
//! - the same key after a 201 replays that 201 (without the password, which is stored nowhere:
//!   `POST /v1/resources/{id}/rotate-credentials` issues a new one);
//! - an error whose attempt is settled releases the key (an error changed nothing to replay; a
//!   compensated 503 is never stored), so a retry runs anew; one whose reservation was left
//!   `pending` (the store failed while compensating, so its finalize may have committed unheard)
//!   keeps the key in flight until [`release_abandoned`] settles it by the row's fate.
//!
//! The claim is one `INSERT … ON CONFLICT`, so of concurrent requests with one key exactly one
//! claims it. The outcome is written by the provisioning task itself, so a client that timed
//! out (or a POST answered `provision_pending`) still leaves its outcome for the retry.

use sha2::{Digest as _, Sha256};
use sqlx::PgPool;

use keel_audit::ResourceId;

/// The most characters an `Idempotency-Key` may have.
pub const MAX_KEY_LEN: usize = 255;

/// A client's idempotency key: 1 to 255 visible ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Parses a header value; `None` when empty, too long or not visible ASCII.
    pub fn parse(s: &str) -> Option<Self> {
        (!s.is_empty() && s.len() <= MAX_KEY_LEN && s.bytes().all(|b| b.is_ascii_graphic()))
            .then(|| Self(s.to_owned()))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The fingerprint of a request's parameters: the same parameters give the same fingerprint,
/// whatever their JSON spelling.
pub fn fingerprint(parts: &[&str]) -> Vec<u8> {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize().to_vec()
}

/// What claiming a key found.
#[derive(Debug, PartialEq)]
pub enum Claim {
    /// This request owns the key: run it, then [`complete`] or [`release`].
    Claimed,
    /// The key already has an outcome for these parameters: answer it again.
    Replay {
        /// The stored status.
        status: u16,
        /// The stored body.
        body: serde_json::Value,
    },
    /// The first request with this key is still being processed.
    InFlight {
        /// The resource it reserved, once it has.
        resource_id: Option<ResourceId>,
    },
    /// The key was used with other parameters.
    Mismatch,
    /// The key holds an outcome this API never stores (only a 201 naming its resource is):
    /// another writer changed it. It is not replayed.
    Unreadable,
}

/// Whether a stored outcome is one [`complete`] writes: a 201 whose body is an object naming
/// a resource id in its canonical form.
fn replayable(status: i32, body: &serde_json::Value) -> bool {
    status == 201
        && body
            .get("id")
            .and_then(serde_json::Value::as_str)
            .and_then(|id| {
                id.parse::<ResourceId>()
                    .ok()
                    .filter(|r| r.to_string() == id)
            })
            .is_some()
}

/// A stored key: its fingerprint, resource, and outcome (status and body) once it has one.
type Held = (
    Vec<u8>,
    Option<uuid::Uuid>,
    Option<i32>,
    Option<serde_json::Value>,
);

/// Where a key lives: the caller's scope and the key.
#[derive(Clone, Debug)]
pub struct Slot {
    /// The caller's scope.
    pub scope: String,
    /// The key.
    pub key: IdempotencyKey,
}

/// Claims `slot` for a request with `fingerprint`, or reports what holds it. An expired key is
/// claimed anew.
pub async fn claim(
    pool: &PgPool,
    slot: &Slot,
    fingerprint: &[u8],
    retention: std::time::Duration,
) -> Result<Claim, sqlx::Error> {
    // A row released between our INSERT and SELECT is claimed on the next round.
    for _ in 0..3 {
        let claimed: Option<bool> = sqlx::query_scalar(
            "INSERT INTO provision_api.idempotency_keys AS k (scope, key, request_sha256, expires_at) \
             VALUES ($1, $2, $3, now() + make_interval(secs => $4)) \
             ON CONFLICT (scope, key) DO UPDATE \
                SET request_sha256 = EXCLUDED.request_sha256, resource_id = NULL, \
                    response_status = NULL, response_body = NULL, created_at = now(), \
                    expires_at = EXCLUDED.expires_at \
              WHERE k.expires_at <= now() \
             RETURNING true",
        )
        .bind(&slot.scope)
        .bind(slot.key.as_str())
        .bind(fingerprint)
        .bind(retention.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        if claimed.is_some() {
            return Ok(Claim::Claimed);
        }
        let held: Option<Held> = sqlx::query_as(
            "SELECT request_sha256, resource_id, response_status, response_body \
                   FROM provision_api.idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(&slot.scope)
        .bind(slot.key.as_str())
        .fetch_optional(pool)
        .await?;
        let Some((stored, resource_id, status, body)) = held else {
            continue;
        };
        if stored != fingerprint {
            return Ok(Claim::Mismatch);
        }
        return Ok(match (status, body) {
            (Some(status), Some(body)) if replayable(status, &body) => {
                Claim::Replay { status: 201, body }
            }
            (Some(_), Some(_)) => Claim::Unreadable,
            _ => Claim::InFlight {
                resource_id: resource_id.map(ResourceId::from_uuid),
            },
        });
    }
    // Claimed and released three times over in a few milliseconds: report it as in flight.
    Ok(Claim::InFlight { resource_id: None })
}

/// Notes the resource the claimed request reserved (an in-flight answer names it).
pub async fn note_resource(
    pool: &PgPool,
    slot: &Slot,
    resource: ResourceId,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE provision_api.idempotency_keys SET resource_id = $3 \
          WHERE scope = $1 AND key = $2 AND response_status IS NULL",
    )
    .bind(&slot.scope)
    .bind(slot.key.as_str())
    .bind(resource.as_uuid())
    .execute(pool)
    .await?;
    Ok(())
}

/// Stores the outcome to replay.
pub async fn complete(
    pool: &PgPool,
    slot: &Slot,
    status: u16,
    body: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE provision_api.idempotency_keys SET response_status = $3, response_body = $4 \
          WHERE scope = $1 AND key = $2 AND response_status IS NULL",
    )
    .bind(&slot.scope)
    .bind(slot.key.as_str())
    .bind(i32::from(status))
    .bind(body)
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives the key up: the request failed and changed nothing a retry should see.
pub async fn release(pool: &PgPool, slot: &Slot) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM provision_api.idempotency_keys \
          WHERE scope = $1 AND key = $2 AND response_status IS NULL",
    )
    .bind(&slot.scope)
    .bind(slot.key.as_str())
    .execute(pool)
    .await?;
    Ok(())
}

/// Settles keys still in flight after `older_than` (a crash or a shutdown cut their request
/// short, its outcome could not be written, or its reservation was left `pending`): one whose
/// resource went live (`active`, or since `paused` or `suspended`) gets that resource's 201 to
/// replay, with its status (without a password, like every replay); one that reserved nothing,
/// or whose reservation was settled `failed` or `deleted` by the reconciler, is released, so the
/// retry runs anew. Either way the retry stops answering 409 until the key expires. Answers how
/// many were settled.
pub async fn release_abandoned(
    pool: &PgPool,
    older_than: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let completed = sqlx::query(
        "UPDATE provision_api.idempotency_keys k \
            SET response_status = 201, \
                response_body = jsonb_build_object( \
                    'ok', true, 'id', r.id::text, 'team_id', r.team_id::text, \
                    'resource_type', r.resource_type, 'tier', r.tier, 'status', r.status, \
                    'request_id', '', 'credentials', $2::text) \
           FROM resources r \
          WHERE r.id = k.resource_id AND r.status IN ('active', 'paused', 'suspended') \
            AND k.response_status IS NULL \
            AND k.created_at < now() - make_interval(secs => $1)",
    )
    .bind(older_than.as_secs_f64())
    .bind(CREDENTIALS_NOTE)
    .execute(pool)
    .await?;
    let released = sqlx::query(
        "DELETE FROM provision_api.idempotency_keys k \
          WHERE k.response_status IS NULL \
            AND k.created_at < now() - make_interval(secs => $1) \
            AND (k.resource_id IS NULL OR EXISTS ( \
                 SELECT 1 FROM resources r \
                  WHERE r.id = k.resource_id AND r.status IN ('failed', 'deleted')))",
    )
    .bind(older_than.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(completed.rows_affected() + released.rows_affected())
}

/// What a replayed 201 says in place of the connection URL.
pub const CREDENTIALS_NOTE: &str =
    "shown only in the first answer; POST /v1/resources/{id}/rotate-credentials issues new ones";

/// Deletes expired keys; answers how many.
pub async fn purge_expired(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM provision_api.idempotency_keys WHERE expires_at <= now()")
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_visible_ascii_of_bounded_length() {
        assert!(IdempotencyKey::parse("agent-attempt-42").is_some());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_some());
        for bad in ["", " a", "ä", &"k".repeat(256)] {
            assert!(IdempotencyKey::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn fingerprints_separate_their_parts() {
        assert_ne!(fingerprint(&["ab", "c"]), fingerprint(&["a", "bc"]));
        assert_eq!(fingerprint(&["a", "b"]), fingerprint(&["a", "b"]));
    }
}
