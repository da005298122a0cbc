//! Platform-held reclaim protection (feature `postgres`): [`protect`] and [`unprotect`] add and
//! remove a row of `reclaim_protections` (keyed by the token's digest, never the token) and
//! record `resource.reclaim_protected` / `resource.reclaim_unprotected` with the operator as
//! actor in the same transaction. The operator console and `keel-orphan-sweep protections`
//! call these same functions, so both write the same rows. Nothing here destroys anything.

use keel_audit::{Actor, AuditEvent, AuditKind};
use keel_provision::TokenDigest;
use sqlx::PgPool;
use time::OffsetDateTime;

/// One protection as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    /// The protected token's digest (48 hex digits).
    pub digest: String,
    /// Why it is protected.
    pub reason: String,
    /// Who protected it.
    pub protected_by: String,
    /// When.
    pub created_at: OffsetDateTime,
}

/// Why a protection change failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtectionError {
    /// The reason is empty, longer than 200 characters, or holds a control character (a line
    /// break or a terminal escape would forge lines of the listings that show it).
    #[error("give a reason of 1 to 200 characters, without control characters")]
    BadReason,
    /// The audit row could not be built (the reason looks like a secret).
    #[error("the audit row could not be built: {0}")]
    Audit(#[from] keel_audit::AuditFieldError),
    /// The database failed.
    #[error("the database failed to {operation}")]
    Store {
        /// What was being attempted.
        operation: &'static str,
        /// The database error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ProtectionError {
    /// Whether the caller's input was refused (fix it and retry), rather than the database
    /// failing.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ProtectionError::BadReason | ProtectionError::Audit(_) => true,
            ProtectionError::Store { .. } => false,
        }
    }
}

fn store<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> ProtectionError {
    move |e| ProtectionError::Store {
        operation,
        source: Box::new(e),
    }
}

fn checked_reason(reason: &str) -> Result<&str, ProtectionError> {
    let reason = reason.trim();
    let len = reason.chars().count();
    if len == 0 || len > 200 || reason.chars().any(char::is_control) {
        return Err(ProtectionError::BadReason);
    }
    Ok(reason)
}

/// Protects the backend objects of the token with `digest` from reclamation, audited as
/// `resource.reclaim_protected` by `actor`. `false` (and nothing written) when it already was.
pub async fn protect(
    pool: &PgPool,
    digest: &TokenDigest,
    reason: &str,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<bool, ProtectionError> {
    let reason = checked_reason(reason)?;
    let event = AuditEvent::new(AuditKind::ReclaimProtected, actor.clone(), now)
        .attr("digest", digest.as_str())?
        .attr("reason", reason)?;
    let mut tx = pool.begin().await.map_err(store("begin a transaction"))?;
    let inserted = sqlx::query(
        "INSERT INTO reclaim_protections (token_digest, reason, protected_by, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (token_digest) DO NOTHING",
    )
    .bind(digest.as_str())
    .bind(reason)
    .bind(actor.as_str())
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(store("insert a reclaim protection"))?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    keel_audit::postgres::insert(&mut tx, &event)
        .await
        .map_err(store("record resource.reclaim_protected"))?;
    tx.commit()
        .await
        .map_err(store("commit a reclaim protection"))?;
    Ok(true)
}

/// Removes the protection of the token with `digest`, audited as `resource.reclaim_unprotected`
/// by `actor` with `reason`. `false` (and nothing written) when it was not protected.
pub async fn unprotect(
    pool: &PgPool,
    digest: &TokenDigest,
    reason: &str,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<bool, ProtectionError> {
    let reason = checked_reason(reason)?;
    let event = AuditEvent::new(AuditKind::ReclaimUnprotected, actor.clone(), now)
        .attr("digest", digest.as_str())?
        .attr("reason", reason)?;
    let mut tx = pool.begin().await.map_err(store("begin a transaction"))?;
    let deleted = sqlx::query("DELETE FROM reclaim_protections WHERE token_digest = $1")
        .bind(digest.as_str())
        .execute(&mut *tx)
        .await
        .map_err(store("delete a reclaim protection"))?;
    if deleted.rows_affected() == 0 {
        return Ok(false);
    }
    keel_audit::postgres::insert(&mut tx, &event)
        .await
        .map_err(store("record resource.reclaim_unprotected"))?;
    tx.commit()
        .await
        .map_err(store("commit a reclaim unprotection"))?;
    Ok(true)
}

/// Every protection, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<Protection>, ProtectionError> {
    let rows: Vec<(String, String, String, OffsetDateTime)> = sqlx::query_as(
        "SELECT token_digest, reason, protected_by, created_at FROM reclaim_protections \
         ORDER BY created_at DESC, token_digest",
    )
    .fetch_all(pool)
    .await
    .map_err(store("list reclaim protections"))?;
    Ok(rows
        .into_iter()
        .map(|(digest, reason, protected_by, created_at)| Protection {
            digest,
            reason,
            protected_by,
            created_at,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reason is 1 to 200 characters once trimmed, and never holds a control character: a
    /// line break or a terminal escape in it would forge lines of the listings that show it.
    #[test]
    fn a_reason_is_one_to_two_hundred_printable_characters() {
        assert_eq!(
            checked_reason("  kept for the audit  ").unwrap(),
            "kept for the audit"
        );
        assert!(checked_reason(&"r".repeat(200)).is_ok());
        for refused in [
            String::new(),
            "   ".to_owned(),
            "r".repeat(201),
            "ok\nprotected  operator:admin".to_owned(),
            "red\u{1b}[31m".to_owned(),
        ] {
            assert!(
                matches!(checked_reason(&refused), Err(ProtectionError::BadReason)),
                "{refused:?}"
            );
        }
    }
}
