//! Postgres adapters (feature `postgres`): the live-token lookup on `resources`, the inventory
//! of customer databases on the shared cluster, and the single-flight tick lock.

use std::collections::{BTreeMap, HashSet};

use keel_provision::postgres::comment_keys;
use keel_provision::{DATABASE_PREFIX, TokenDigest};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ports::{
    Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens, LiveTokensError,
};

/// Which tokens are live, read from `resources` in one query per batch.
#[derive(Clone, Debug)]
pub struct PgLiveTokens {
    pool: PgPool,
}

impl PgLiveTokens {
    /// A lookup over `pool` (the platform database).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl LiveTokens for PgLiveTokens {
    async fn live_among(
        &self,
        digests: &[TokenDigest],
    ) -> Result<HashSet<TokenDigest>, LiveTokensError> {
        if digests.is_empty() {
            return Ok(HashSet::new());
        }
        let wanted: Vec<&str> = digests.iter().map(TokenDigest::as_str).collect();
        // One set-based read by digest (no token is sent), served by
        // resources_live_token_digest_ix.
        let live: Vec<String> = sqlx::query_scalar(
            "SELECT token_digest FROM resources \
              WHERE token_digest = ANY($1) \
                AND status IN ('pending', 'active', 'paused', 'suspended')",
        )
        .bind(&wanted)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| LiveTokensError(Box::new(e)))?;
        Ok(live
            .iter()
            .filter_map(|digest| TokenDigest::parse(digest))
            .collect())
    }
}

/// The customer databases (`cust_*`) on the shared cluster.
///
/// Labels and annotations come from the database's `COMMENT` (a JSON document keel-provision
/// writes: `{"labels": {…}, "annotations": {…}}`); an operator protects a database by adding
/// `"keel.dev/protect": "true"` to its annotations. The creation time is the
/// `keel.dev/created-at` annotation, else (when the role may call `pg_stat_file`) the time of
/// the database's `PG_VERSION` file, else unknown — and an item of unknown age is never a
/// candidate.
#[derive(Clone, Debug)]
pub struct PgDatabaseInventory {
    admin: PgPool,
}

impl PgDatabaseInventory {
    /// An inventory over `admin` (any database on the shared cluster).
    pub fn new(admin: PgPool) -> Self {
        Self { admin }
    }
}

#[derive(serde::Deserialize, Default)]
struct Comment {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Inventory for PgDatabaseInventory {
    fn source(&self) -> InventorySource {
        InventorySource::Postgres
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        let page_error = |e: sqlx::Error| InventoryError::Page {
            page: 1,
            source: Box::new(e),
        };
        let can_stat: bool = sqlx::query_scalar(
            "SELECT has_function_privilege('pg_stat_file(text, boolean)', 'execute')",
        )
        .fetch_one(&self.admin)
        .await
        .map_err(page_error)?;
        let rows: Vec<(String, Option<String>, Option<OffsetDateTime>)> = sqlx::query_as(
            "SELECT d.datname::text, shobj_description(d.oid, 'pg_database'), \
                    CASE WHEN $2 THEN (pg_stat_file('base/' || d.oid || '/PG_VERSION', true)).modification END \
               FROM pg_database d \
              WHERE starts_with(d.datname, $1) \
              ORDER BY d.datname",
        )
        .bind(DATABASE_PREFIX)
        .bind(can_stat)
        .fetch_all(&self.admin)
        .await
        .map_err(page_error)?;
        Ok(rows
            .into_iter()
            .map(|(name, comment, file_time)| {
                let comment: Comment = comment
                    .as_deref()
                    .and_then(|c| serde_json::from_str(c).ok())
                    .unwrap_or_default();
                let created_at = comment
                    .annotations
                    .get(comment_keys::CREATED_AT)
                    .and_then(|at| OffsetDateTime::parse(at, &Rfc3339).ok())
                    .or(file_time);
                InventoryItem {
                    name,
                    created_at,
                    labels: comment.labels,
                    annotations: comment.annotations,
                }
            })
            .collect())
    }
}

/// The advisory lock key that makes a tick single-flight across replicas.
pub const TICK_LOCK_KEY: i64 = 0x6b65_656c_6f72_7068; // "keelorph"

/// Holds the single-flight tick lock on a dedicated connection; dropping it (or calling
/// [`TickLock::release`]) frees it.
#[derive(Debug)]
pub struct TickLock {
    conn: PgConnection,
}

impl TickLock {
    /// Takes the lock if no other replica holds it; `Ok(None)` when one does.
    pub async fn try_acquire(options: &PgConnectOptions) -> Result<Option<Self>, sqlx::Error> {
        let mut conn =
            PgConnection::connect_with(&options.clone().application_name("keel-orphan-sweep-lock"))
                .await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(TICK_LOCK_KEY)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Self { conn }))
        } else {
            conn.close().await?;
            Ok(None)
        }
    }

    /// Releases the lock and closes its connection.
    pub async fn release(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(TICK_LOCK_KEY)
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await
    }
}
