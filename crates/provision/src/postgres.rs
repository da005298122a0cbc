//! Postgres adapters (feature `postgres`): the resource store on `resources`, and the backend
//! that creates customer databases on a shared Postgres cluster.
//!
//! [`PgResourceStore`] commits every audit row in the same transaction as the state change it
//! describes, and keeps only the connection *address* (no password) of a resource.
//! [`PgClusterBackend`] creates a role `cust_<digest>` with a generated password and a database
//! of the same name owned by it, and tears both down with `DROP DATABASE … WITH (FORCE)` and
//! `DROP ROLE`. Identifiers are built only from [`DatabaseName`]/[`RoleName`] (prefix plus hex
//! digits, or a legacy token of `[a-z0-9]`) and quoted.
//!
//! **Tokens.** No statement or bound parameter carries a customer token: the store draws the
//! token itself (`RETURNING token`) and finds rows by `token_digest`, and database and role names
//! carry the token's digest ([`crate::TokenDigest`]), so the server's statement and connection
//! logs name no token. Only a legacy database (named `cust_<token>` before digest names) is
//! still named by its token, until it is deprovisioned, and [`register_existing`] binds the
//! token of a resource made outside Keel (see there).
//!
//! **Secrets.** The password (64 hex digits from the operating system's random source) never
//! reaches the server: the role is given a SCRAM-SHA-256 verifier computed here
//! ([`crate::scram`]), so a server that logs every statement (`log_statement = all`) or the
//! statement of an error (`log_min_error_statement`) logs only the verifier. sqlx's own
//! statement logging is off on the backend's connections, and they ask the server for no
//! notices below WARNING (`client_min_messages`), so sqlx never forwards a notice naming a
//! customer object to the log. Database errors are kept with the token masked.
//!
//! **Isolation.** Each customer database refuses `CONNECT` and `TEMPORARY` to `PUBLIC` (only its
//! owner role may connect), each role gets its tier's connection limit and `statement_timeout`
//! ([`keel_audit::TierRoleSettings`]), and [`isolate_platform_database`] removes `PUBLIC`'s
//! access to the platform database, so a customer role reaches nothing but its own database.
//!
//! **Privileges.** The admin role needs `CREATEROLE` and `CREATEDB` (or superuser). On
//! PostgreSQL 15 and older `CREATE DATABASE … OWNER` also needs membership in the owner role; the
//! backend grants the admin role membership in each role it creates (a `CREATEROLE` role may)
//! before creating the database. [`PgClusterBackend::check_privileges`] says at start-up
//! exactly which privilege is missing.

use keel_audit::{AuditEvent, ResourceId, ResourceType, TeamId, Tier, TierRoleSettings, Token};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgConnection, PgPool, Row as _};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::model::{BackendName, BackendObject, ResourceRecord, ResourceStatus};
use crate::names::{DatabaseName, RoleName, TokenDigest};
use crate::ports::{
    Backend, BackendError, Flip, NewReservation, RedactedError, ResourceStore, StaleCursor,
    StalePage, StoreError,
};
use crate::reclaim::{
    INSTALLATION_LABEL, InstallationId, OBJECT_ID_ATTRIBUTE, ObjectFacts, OrphanRecord,
    OrphanStanding, OwnerRow, Preflight, protect_value_protects,
};
use crate::scram::{ITERATIONS, Verifier};
use crate::secret::{ConnectionUrl, Password};

pub use crate::register::{ExistingResource, RegisterError, register_existing, register_team};

/// The statuses that own a backend object, as SQL.
const LIVE_STATUSES: &str = "('pending', 'active', 'paused', 'suspended')";

/// The `resources` table as a [`ResourceStore`].
#[derive(Clone, Debug)]
pub struct PgResourceStore {
    pool: PgPool,
}

impl PgResourceStore {
    /// A store over `pool` (a migrated Keel schema).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn status_of(&self, id: ResourceId) -> Result<Option<ResourceStatus>, StoreError> {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM resources WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| StoreError::unavailable("read a resource's status", e))?;
        Ok(status.and_then(|s| ResourceStatus::parse(&s)))
    }

    async fn wrong_status(&self, id: ResourceId, expected: ResourceStatus) -> StoreError {
        match self.status_of(id).await {
            Ok(Some(actual)) => StoreError::WrongStatus { expected, actual },
            Ok(None) => StoreError::ResourceNotFound,
            Err(e) => e,
        }
    }
}

/// A stored row that does not parse back into a [`ResourceRecord`].
#[derive(Debug, thiserror::Error)]
#[error("resource row {id} is corrupt: {what}")]
struct CorruptRow {
    id: uuid::Uuid,
    what: &'static str,
}

/// Records `audit` in `tx` and commits it: the audit row commits with the state change the
/// transaction made, or neither does.
async fn record_and_commit(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    audit: &AuditEvent,
    op: &'static str,
) -> Result<(), StoreError> {
    keel_audit::postgres::insert(&mut tx, audit)
        .await
        .map_err(audit_error)?;
    tx.commit()
        .await
        .map_err(|e| StoreError::unavailable(op, e))
}

fn audit_error(e: keel_audit::AuditSinkError) -> StoreError {
    StoreError::unavailable("record the audit row", e)
}

impl ResourceStore for PgResourceStore {
    async fn reserve(&self, reservation: &NewReservation) -> Result<Token, StoreError> {
        // The server draws the token (32 hex digits of a v4 UUID, as `new_token`), so no
        // statement or bound parameter ever carries it; only the reply does.
        let inserted: Result<String, sqlx::Error> = sqlx::query_scalar(
            "INSERT INTO resources \
               (id, token, team_id, resource_type, tier, status, created_at, updated_at) \
             VALUES ($1, replace(gen_random_uuid()::text, '-', ''), $2, $3, $4, 'pending', $5, $5) \
             RETURNING token",
        )
        .bind(reservation.id.as_uuid())
        .bind(reservation.team_id.as_uuid())
        .bind(reservation.resource_type.as_str())
        .bind(reservation.tier.as_str())
        .bind(reservation.now)
        .fetch_one(&self.pool)
        .await;
        match inserted {
            Ok(token) => Token::parse(&token).map_err(|e| {
                StoreError::unavailable("reserve a resource", RedactedError::new(e.to_string()))
            }),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23503") => {
                Err(StoreError::TeamNotFound)
            }
            // The token is unique; the database's message would quote it, so it is not kept.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => Err(
                StoreError::unavailable("reserve a resource", "the token is already taken"),
            ),
            Err(e) => Err(StoreError::unavailable("reserve a resource", e)),
        }
    }

    async fn activate(
        &self,
        id: ResourceId,
        object: &BackendObject,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let op = "finalize a resource";
        let row = keel_audit::postgres::encode(audit).map_err(audit_error)?;
        // One statement, so one round trip and one commit: the flip to `active` and its audit
        // row are written together or not at all, and the audit row only when the flip
        // happened (a row no longer `pending` changes nothing and gets no audit row).
        let audited: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH flipped AS ( \
               UPDATE resources \
                  SET status = 'active', provider_resource_id = $2, connection_url = $3, \
                      updated_at = $4 \
                WHERE id = $1 AND status = 'pending' \
                RETURNING id) \
             INSERT INTO audit_events ({}) \
             SELECT $5, $6, $7, $8, $9, $10::jsonb, $11 FROM flipped \
             RETURNING id",
            keel_audit::postgres::COLUMNS
        )))
        .bind(id.as_uuid())
        .bind(&object.provider_id)
        // The address only: the password is shown once, in the 201, and stored nowhere.
        .bind(object.connection_url.address())
        .bind(now)
        .bind(row.kind)
        .bind(&row.actor)
        .bind(row.team_id)
        .bind(row.resource_id)
        .bind(&row.request_id)
        .bind(&row.attributes)
        .bind(row.occurred_at)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable(op, e))?;
        match audited {
            Some(_) => Ok(()),
            None => Err(self.wrong_status(id, ResourceStatus::Pending).await),
        }
    }

    async fn abandon(
        &self,
        id: ResourceId,
        audit: Option<&AuditEvent>,
        now: OffsetDateTime,
    ) -> Result<Flip, StoreError> {
        let op = "mark a failed resource";
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| StoreError::unavailable(op, e))?;
        let flipped: Option<uuid::Uuid> = sqlx::query_scalar(
            "UPDATE resources \
                SET status = 'failed', deleted_at = $2, connection_url = NULL, updated_at = $2 \
              WHERE id = $1 AND status = 'pending' \
             RETURNING id",
        )
        .bind(id.as_uuid())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| StoreError::unavailable(op, e))?;
        if flipped.is_none() {
            drop(tx);
            return match self.status_of(id).await? {
                Some(status) => Ok(Flip::Found(status)),
                None => Err(StoreError::ResourceNotFound),
            };
        }
        if let Some(audit) = audit {
            keel_audit::postgres::insert(&mut tx, audit)
                .await
                .map_err(audit_error)?;
        }
        tx.commit()
            .await
            .map_err(|e| StoreError::unavailable(op, e))?;
        Ok(Flip::Flipped)
    }

    async fn stale_pending(
        &self,
        older_than: std::time::Duration,
        after: Option<StaleCursor>,
        limit: u32,
    ) -> Result<StalePage, StoreError> {
        let op = "list stale pending resources";
        let rows = sqlx::query(
            "SELECT id, token, team_id, resource_type, tier, status, provider_resource_id, \
                    created_at, updated_at, deleted_at \
               FROM resources \
              WHERE status = 'pending' \
                AND created_at < now() - make_interval(secs => $1) \
                AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4)) \
              ORDER BY created_at, id \
              LIMIT $2",
        )
        .bind(older_than.as_secs_f64())
        .bind(i64::from(limit))
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id.as_uuid()))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable(op, e))?;
        // The position of the last row read, decoded or not (its key columns are a timestamp and
        // a uuid, which always decode).
        let next = match rows.last() {
            Some(last) if rows.len() >= limit as usize => Some(StaleCursor {
                created_at: last
                    .try_get("created_at")
                    .map_err(|e| StoreError::unavailable(op, e))?,
                id: ResourceId::from_uuid(
                    last.try_get("id")
                        .map_err(|e| StoreError::unavailable(op, e))?,
                ),
            }),
            _ => None,
        };
        // A row that does not decode is left out (logged at ERROR on every pass until it is
        // repaired), so one row another writer corrupted never holds back the compensation of
        // every other tenant's stale provisioning.
        let mut records = Vec::with_capacity(rows.len());
        for row in &rows {
            match record_from_row(row) {
                Ok(record) => records.push(record),
                Err(e @ StoreError::Corrupt { .. }) => {
                    tracing::error!(error = %crate::flow::ErrorChain(&e), "a stale pending resource row does not decode and is skipped until it is repaired");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(StalePage { records, next })
    }

    async fn retire(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
        now: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let op = "soft-delete a deprovisioned resource";
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| StoreError::unavailable(op, e))?;
        let updated = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE resources \
                SET status = 'deleted', deleted_at = $2, connection_url = NULL, updated_at = $2 \
              WHERE id = $1 AND status IN {LIVE_STATUSES}"
        )))
        .bind(id.as_uuid())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::unavailable(op, e))?;
        if updated.rows_affected() != 1 {
            return Ok(false);
        }
        record_and_commit(tx, audit, op).await?;
        Ok(true)
    }

    async fn record(&self, audit: &AuditEvent) -> Result<(), StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| StoreError::unavailable("record an audit row", e))?;
        keel_audit::postgres::insert(&mut conn, audit)
            .await
            .map(|_| ())
            .map_err(audit_error)
    }

    async fn record_while_active(
        &self,
        id: ResourceId,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| StoreError::unavailable("record an audit row", e))?;
        let active: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM resources WHERE id = $1 AND status = 'active' FOR SHARE)",
        )
        .bind(id.as_uuid())
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| StoreError::unavailable("read a resource", e))?;
        if !active {
            return Ok(false);
        }
        record_and_commit(tx, audit, "commit an audit row").await?;
        Ok(true)
    }

    async fn get(&self, id: ResourceId) -> Result<Option<ResourceRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, token, team_id, resource_type, tier, status, provider_resource_id, \
                    created_at, updated_at, deleted_at \
               FROM resources WHERE id = $1",
        )
        .bind(id.as_uuid())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable("read a resource", e))?;
        row.map(|row| record_from_row(&row)).transpose()
    }

    async fn live_for_digest(
        &self,
        digest: &TokenDigest,
    ) -> Result<Option<(ResourceId, ResourceStatus)>, StoreError> {
        let row: Option<(uuid::Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, status FROM resources WHERE token_digest = $1 AND status IN {LIVE_STATUSES}"
        )))
        .bind(digest.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable("read a token's liveness", e))?;
        Ok(row.and_then(|(id, status)| {
            ResourceStatus::parse(&status).map(|status| (ResourceId::from_uuid(id), status))
        }))
    }

    async fn orphan_standing(&self, digest: &TokenDigest) -> Result<OrphanStanding, StoreError> {
        let op = "read an orphan's standing";
        // One statement: the installation, the newest row for the token (any status: a row
        // proves this installation made the object) and the platform's protection.
        let (installation, id, team_id, status, protected): (
            uuid::Uuid,
            Option<uuid::Uuid>,
            Option<uuid::Uuid>,
            Option<String>,
            bool,
        ) = sqlx::query_as(
            "SELECT keel_installation_id(), r.id, r.team_id, r.status, \
                    EXISTS (SELECT 1 FROM reclaim_protections p WHERE p.token_digest = $1) \
               FROM (SELECT 1) one \
               LEFT JOIN LATERAL ( \
                    SELECT id, team_id, status FROM resources \
                     WHERE token_digest = $1 \
                     ORDER BY (status NOT IN ('deleted', 'failed')) DESC, created_at DESC \
                     LIMIT 1) r ON true",
        )
        .bind(digest.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::unavailable(op, e))?;
        let row = match (id, team_id) {
            (Some(id), Some(team_id)) => Some(OwnerRow {
                id: ResourceId::from_uuid(id),
                team_id: TeamId::from_uuid(team_id),
                status: status.as_deref().and_then(ResourceStatus::parse),
            }),
            (None, _) | (_, None) => None,
        };
        Ok(OrphanStanding {
            installation: InstallationId::from_uuid(installation),
            row,
            protected,
        })
    }

    async fn record_orphan_event(
        &self,
        digest: &TokenDigest,
        audit: &AuditEvent,
    ) -> Result<OrphanRecord, StoreError> {
        let op = "record an orphan's audit row";
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| StoreError::unavailable(op, e))?;
        // Serialises every writer about this object (and any revival, which the status trigger
        // refuses anyway) until the row commits.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('keel-orphan:' || $1, 0))")
            .bind(digest.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::unavailable(op, e))?;
        let (live, recorded): (bool, bool) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM resources \
                             WHERE token_digest = $1 AND status NOT IN ('deleted', 'failed')), \
                    EXISTS (SELECT 1 FROM audit_events \
                             WHERE kind = $2 AND attributes->>'token_fingerprint' = 'sha256:' || $1 \
                               AND attributes->>'refusal' IS NOT DISTINCT FROM $3 \
                               AND attributes->>'object_id' IS NOT DISTINCT FROM $4)",
        )
        .bind(digest.as_str())
        .bind(audit.kind().as_str())
        .bind(audit.attributes().get("refusal"))
        .bind(audit.attributes().get(OBJECT_ID_ATTRIBUTE))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| StoreError::unavailable(op, e))?;
        let kind_is_teardown = audit.kind() == keel_audit::AuditKind::OrphanSweepReclaimed;
        if live && kind_is_teardown {
            return Ok(OrphanRecord::Live);
        }
        if recorded {
            return Ok(OrphanRecord::AlreadyRecorded);
        }
        record_and_commit(tx, audit, op).await?;
        Ok(OrphanRecord::Written)
    }
}

fn record_from_row(row: &sqlx::postgres::PgRow) -> Result<ResourceRecord, StoreError> {
    let read = |e| StoreError::unavailable("read a resource", e);
    let id: uuid::Uuid = row.try_get("id").map_err(read)?;
    let corrupt = |what| StoreError::Corrupt {
        operation: "read a resource",
        source: Box::new(CorruptRow { id, what }),
    };
    let token: String = row.try_get("token").map_err(read)?;
    let resource_type: String = row.try_get("resource_type").map_err(read)?;
    let tier: String = row.try_get("tier").map_err(read)?;
    let status: String = row.try_get("status").map_err(read)?;
    Ok(ResourceRecord {
        id: ResourceId::from_uuid(id),
        token: Token::parse(&token).map_err(|_| corrupt("token"))?,
        team_id: TeamId::from_uuid(row.try_get("team_id").map_err(read)?),
        resource_type: resource_type
            .parse::<ResourceType>()
            .map_err(|_| corrupt("resource_type"))?,
        tier: Tier::parse(&tier).map_err(|_| corrupt("tier"))?,
        status: ResourceStatus::parse(&status).ok_or_else(|| corrupt("status"))?,
        provider_resource_id: row.try_get("provider_resource_id").map_err(read)?,
        created_at: row.try_get("created_at").map_err(read)?,
        updated_at: row.try_get("updated_at").map_err(read)?,
        deleted_at: row.try_get("deleted_at").map_err(read)?,
    })
}

/// A database error's text with the customer's name masked.
fn redacted(e: &sqlx::Error, name: &DatabaseName) -> RedactedError {
    RedactedError::new(name.mask_in(&e.to_string()))
}

/// Where customers reach the shared cluster (the host and port in their connection URLs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicAddress {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// Label and annotation keys written on each customer database (as its `COMMENT`, a JSON
/// document), so an inventory can tell the platform's databases, their kind and their age.
pub mod comment_keys {
    /// Label: who manages the object (`keel`).
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// Label: the resource type.
    pub const RESOURCE_TYPE: &str = "keel.dev/resource-type";
    /// Annotation: when the platform created it (RFC 3339).
    pub const CREATED_AT: &str = "keel.dev/created-at";
    /// Annotation: `true` means never reclaim it.
    pub const PROTECT: &str = "keel.dev/protect";
}

/// The longest database `COMMENT` Keel reads, in bytes. Keel writes about 300; a database's
/// owner (its customer) may write up to a gigabyte, which no read of the platform's carries into
/// its process. A longer comment reads as none: its database carries no labels, annotations or
/// marks (so it is never taken for one the platform made).
pub const COMMENT_MAX_BYTES: i32 = 8192;

/// SQL: the `COMMENT` of the database `d` (an alias of `pg_database`) when it is at most
/// [`COMMENT_MAX_BYTES`] long, else NULL. The server reads it; only a bounded one is sent.
pub fn bounded_database_comment_sql() -> String {
    format!(
        "(SELECT c FROM (SELECT shobj_description(d.oid, 'pg_database') AS c) AS s \
           WHERE octet_length(c) <= {COMMENT_MAX_BYTES})"
    )
}

/// SQL: whether the database `d` has a `COMMENT` longer than [`COMMENT_MAX_BYTES`].
pub fn oversized_database_comment_sql() -> String {
    format!(
        "coalesce(octet_length(shobj_description(d.oid, 'pg_database')) > {COMMENT_MAX_BYTES}, \
                  false)"
    )
}

/// The `sslmode` written into every issued connection URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
pub enum SslMode {
    /// `disable`.
    Disable,
    /// `prefer` (libpq's default: TLS when the server offers it, without verification).
    Prefer,
    /// `require`: TLS, without verifying the server's certificate.
    Require,
    /// `verify-ca`.
    VerifyCa,
    /// `verify-full`: TLS with the certificate and host name verified.
    VerifyFull,
}

impl SslMode {
    /// Every mode.
    pub const ALL: &'static [SslMode] = <Self as strum::VariantArray>::VARIANTS;

    /// The libpq spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Parses the libpq spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|mode| mode.as_str() == s)
    }
}

/// A privilege the cluster admin role lacks (from [`PgClusterBackend::check_privileges`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivilegeError {
    /// The role lacks `CREATEROLE` and/or `CREATEDB`.
    #[error(
        "the cluster admin role {role:?} lacks {missing}; grant it with `ALTER ROLE {role} {missing}` \
         (provisioning needs CREATEROLE and CREATEDB)"
    )]
    Missing {
        /// The admin role.
        role: String,
        /// The missing attributes, e.g. `CREATEROLE CREATEDB`.
        missing: String,
    },
    /// The check itself could not run.
    #[error("could not check the cluster admin role's privileges")]
    Unavailable(#[source] sqlx::Error),
}

/// The platform database still lets `PUBLIC` connect (from [`isolate_platform_database`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IsolationError {
    /// `PUBLIC` keeps `CONNECT` or `TEMPORARY` on the platform database.
    #[error(
        "the platform database {database:?} still grants CONNECT or TEMPORARY to PUBLIC, so every \
         customer role could connect to it; run `REVOKE CONNECT, TEMPORARY ON DATABASE {database} \
         FROM PUBLIC` as its owner (and GRANT CONNECT to the platform's own roles)"
    )]
    PublicCanConnect {
        /// The platform database.
        database: String,
    },
    /// The statements could not run.
    #[error("could not restrict access to the platform database")]
    Unavailable(#[source] sqlx::Error),
}

/// Removes `PUBLIC`'s `CONNECT` and `TEMPORARY` on the platform database `pool` connects to,
/// after granting `CONNECT` and `TEMPORARY` to the role `pool` connects as (so the platform
/// keeps its own access), and verifies the result: customer roles, which live on the same
/// cluster by default, cannot reach the platform database. Run at start-up; it needs the
/// database's owner (or a superuser) the first time and is a no-op check afterwards.
pub async fn isolate_platform_database(pool: &PgPool) -> Result<(), IsolationError> {
    let public_can_connect = || async {
        sqlx::query_as::<_, (String, bool)>(
            "SELECT current_database()::text, \
                    has_database_privilege('public', current_database(), 'CONNECT') \
                    OR has_database_privilege('public', current_database(), 'TEMPORARY')",
        )
        .fetch_one(pool)
        .await
        .map_err(IsolationError::Unavailable)
    };
    let (database, open) = public_can_connect().await?;
    if !open {
        return Ok(());
    }
    // Warnings only (no privilege change) when the role is not the owner: the check below says so.
    sqlx::raw_sql(
        "DO $$ BEGIN \
           EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), current_user); \
           EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()); \
         END $$",
    )
    .execute(pool)
    .await
    .map_err(IsolationError::Unavailable)?;
    match public_can_connect().await? {
        (_, false) => Ok(()),
        (_, true) => Err(IsolationError::PublicCanConnect { database }),
    }
}

/// Creates customer databases on a shared Postgres cluster.
#[derive(Clone, Debug)]
pub struct PgClusterBackend {
    admin: PgPool,
    public: PublicAddress,
    tiers: TierRoleSettings,
    sslmode: SslMode,
    installation: Option<InstallationId>,
}

/// This installation's id, from its platform database (`keel_installation`, created on first use
/// and never changed).
pub async fn installation_id(pool: &PgPool) -> Result<InstallationId, sqlx::Error> {
    sqlx::query_scalar("SELECT keel_installation_id()")
        .fetch_one(pool)
        .await
        .map(InstallationId::from_uuid)
}

/// How long the backend waits for an admin connection before failing the step.
const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl PgClusterBackend {
    /// A backend administering the cluster through `admin` (a role with `CREATEROLE` and
    /// `CREATEDB`), handing out URLs for `public` (default: the admin connection's host and
    /// port) with `sslmode=prefer` and the standard tier settings (see
    /// [`PgClusterBackend::with_sslmode`] and [`PgClusterBackend::with_tier_settings`]).
    /// Connections are opened lazily (call [`PgClusterBackend::check_privileges`] at start-up),
    /// wait at most 5 s for a free connection, and run statements for at most 60 s; statement
    /// logging is off on them and they receive no notices below WARNING.
    pub fn new(
        admin: PgConnectOptions,
        public: Option<PublicAddress>,
        max_connections: u32,
    ) -> Self {
        let public = public.unwrap_or_else(|| PublicAddress {
            host: admin.get_host().to_owned(),
            port: admin.get_port(),
        });
        let admin = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(
                admin
                    .disable_statement_logging()
                    .options([
                        ("client_min_messages", "warning"),
                        ("statement_timeout", "60s"),
                    ])
                    .application_name("keel-provision-backend"),
            );
        Self {
            admin,
            public,
            tiers: TierRoleSettings::standard(),
            sslmode: SslMode::Prefer,
            installation: None,
        }
    }

    /// The same backend stamping `installation` ([`INSTALLATION_LABEL`]) on every database it
    /// creates ([`installation_id`] reads it from the platform database).
    pub fn with_installation(mut self, installation: InstallationId) -> Self {
        self.installation = Some(installation);
        self
    }

    /// The same backend applying `tiers` to the roles it creates.
    pub fn with_tier_settings(mut self, tiers: TierRoleSettings) -> Self {
        self.tiers = tiers;
        self
    }

    /// The same backend writing `sslmode` into the URLs it issues.
    pub fn with_sslmode(mut self, sslmode: SslMode) -> Self {
        self.sslmode = sslmode;
        self
    }

    /// The admin pool (for inventories that read the cluster's catalogue).
    pub fn admin_pool(&self) -> &PgPool {
        &self.admin
    }

    /// `Ok` when a read on a fresh admin connection finds `object` gone (`exists_sql` binds its
    /// name), after a drop of it failed; `Err` while it is there or cannot be looked up.
    async fn gone_after_failed_drop(
        &self,
        exists_sql: &'static str,
        object: &str,
        name: &BackendName,
    ) -> Result<(), ()> {
        let exists: Result<bool, sqlx::Error> = sqlx::query_scalar(exists_sql)
            .bind(object)
            .fetch_one(&self.admin)
            .await;
        if exists.is_ok_and(|exists| !exists) {
            tracing::info!(name = %name, "a drop failed but its object is gone (a concurrent teardown dropped it, or the drop committed before its reply was lost)");
            Ok(())
        } else {
            Err(())
        }
    }

    /// Takes every way in away from the customer role of a database being torn down: no login,
    /// no password, and each of its sessions on the whole cluster ended (waiting up to 5 s for
    /// each, so that a session's temporary objects are gone before the role is dropped). A role
    /// that is already gone is nothing to do; a concurrent teardown that drops it meanwhile is
    /// not a failure.
    async fn lock_out_role(
        &self,
        conn: &mut PgConnection,
        role: &RoleName,
        name: &BackendName,
        db: &DatabaseName,
    ) -> Result<(), BackendError> {
        let exists: bool = sqlx::query_scalar(ROLE_EXISTS)
            .bind(role.expose())
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| {
                BackendError::unavailable("look up the role of", name, redacted(&e, db))
            })?;
        if !exists {
            return Ok(());
        }
        let lock_out = format!("ALTER ROLE \"{}\" NOLOGIN PASSWORD NULL", role.expose());
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(lock_out))
            .execute(&mut *conn)
            .await
        {
            return self
                .gone_after_failed_drop(ROLE_EXISTS, role.expose(), name)
                .await
                .map_err(|()| {
                    BackendError::unavailable("lock out the role of", name, redacted(&e, db))
                });
        }
        sqlx::query(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
              WHERE usename = $1 AND pid <> pg_backend_pid()",
        )
        .bind(role.expose())
        .execute(&mut *conn)
        .await
        .map_err(|e| {
            BackendError::unavailable("end the sessions of the role of", name, redacted(&e, db))
        })?;
        Ok(())
    }

    /// Checks that the admin role may provision: superuser, or `CREATEROLE` and `CREATEDB`.
    /// The error names the role and exactly what to grant.
    pub async fn check_privileges(&self) -> Result<(), PrivilegeError> {
        let (role, superuser, createrole, createdb): (String, bool, bool, bool) = sqlx::query_as(
            "SELECT rolname::text, rolsuper, rolcreaterole, rolcreatedb \
               FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&self.admin)
        .await
        .map_err(PrivilegeError::Unavailable)?;
        if superuser {
            return Ok(());
        }
        let missing: Vec<&str> = [(createrole, "CREATEROLE"), (createdb, "CREATEDB")]
            .into_iter()
            .filter(|(has, _)| !has)
            .map(|(_, name)| name)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(PrivilegeError::Missing {
                role,
                missing: missing.join(" "),
            })
        }
    }

    fn connection_url(&self, name: &DatabaseName, password: &Password) -> ConnectionUrl {
        let host = &self.public.host;
        let port = self.public.port;
        let db = name.expose();
        let sslmode = self.sslmode.as_str();
        let url = if host.starts_with('/') {
            // A Unix socket directory: libpq and sqlx take it as the `host` query parameter.
            format!(
                "postgres://{db}:{}@localhost:{port}/{db}?host={host}&sslmode={sslmode}",
                password.expose()
            )
        } else {
            format!(
                "postgres://{db}:{}@{host}:{port}/{db}?sslmode={sslmode}",
                password.expose()
            )
        };
        ConnectionUrl::new(url)
    }

    async fn create_database(
        &self,
        name: &DatabaseName,
        tier: &Tier,
    ) -> Result<BackendObject, BackendError> {
        let backend_name = BackendName::Database(name.clone());
        let fail = |operation, e: &sqlx::Error| {
            BackendError::unavailable(operation, &backend_name, redacted(e, name))
        };
        let settings = self.tiers.get(tier).ok_or_else(|| {
            BackendError::unavailable(
                "apply the tier to",
                &backend_name,
                RedactedError::new(format!("no role settings are defined for tier {tier}")),
            )
        })?;
        let role = RoleName::for_database(name);
        let password = generate_password();
        let verifier = Verifier::compute(&password, &random_bytes::<16>(), ITERATIONS);
        // Identifiers are prefix + [a-z0-9]; quoting keeps them exact. The verifier is base64
        // and `$`/`:`, never a quote.
        let role_ident = format!("\"{}\"", role.expose());
        let db_ident = format!("\"{}\"", name.expose());
        // Every statement of one create runs on one connection, taken once: taking the pool's
        // connections statement by statement makes concurrent creates queue behind each other
        // at every step, so each finishes only at the end of the burst.
        let mut conn = self
            .admin
            .acquire()
            .await
            .map_err(|e| fail("get an admin connection for", &e))?;
        let role_exists: bool = sqlx::query_scalar(ROLE_EXISTS)
            .bind(role.expose())
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| fail("look up the role of", &e))?;
        // A role the platform creates is never privileged; an existing one (a retried create)
        // keeps its attributes and gets a new password (naming SUPERUSER & co. in an ALTER
        // needs a superuser on PostgreSQL 15).
        let verb = if role_exists { "ALTER" } else { "CREATE" };
        let attributes = if role_exists {
            ""
        } else {
            "NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
        };
        let limit = settings.connection_limit;
        let timeout_ms = settings.statement_timeout_ms;
        // Everything about the role in one simple-query batch (implicitly one transaction): a
        // role never exists without its limits. Only the verifier crosses the wire.
        let set_role = format!(
            "{verb} ROLE {role_ident} WITH LOGIN {attributes}CONNECTION LIMIT {limit} \
             PASSWORD '{}'; \
             ALTER ROLE {role_ident} SET statement_timeout = {timeout_ms}; \
             GRANT {role_ident} TO CURRENT_USER",
            verifier.expose()
        );
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(set_role))
            .execute(&mut *conn)
            .await
        {
            return Err(fail("create the role of", &e));
        }
        let owner: Option<String> = database_owner(&mut conn, name)
            .await
            .map_err(|e| fail("look up", &e))?;
        match owner {
            Some(owner) if owner == role.expose() => {}
            Some(_) => {
                return Err(BackendError::Foreign {
                    name: name.masked(),
                });
            }
            None => {
                let create = format!("CREATE DATABASE {db_ident} OWNER {role_ident}");
                match sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                    .execute(&mut *conn)
                    .await
                {
                    Ok(_) => {}
                    // Created concurrently by a retry of the same reservation: fine.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                    Err(e) => return Err(fail("create", &e)),
                }
            }
        }
        let comment = database_comment(tier, self.installation);
        // Only the owner role may connect or create temporary tables: no other tenant.
        let finish = format!(
            "REVOKE ALL ON DATABASE {db_ident} FROM PUBLIC; \
             GRANT CONNECT, TEMPORARY ON DATABASE {db_ident} TO {role_ident}; \
             COMMENT ON DATABASE {db_ident} IS '{}'",
            comment.replace('\'', "''")
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(finish))
            .execute(&mut *conn)
            .await
            .map_err(|e| fail("isolate and label", &e))?;
        Ok(BackendObject {
            provider_id: name.expose().to_owned(),
            connection_url: self.connection_url(name, &password),
        })
    }
}

impl PgClusterBackend {
    /// A new password for the role of an existing database `name`, or `None` when the database
    /// (or its role) is gone. Rotations of one role are serialized by a transaction-scoped
    /// advisory lock, so concurrent ones each commit (the last one's password is the live one)
    /// instead of failing on each other's update; the database is looked up inside that
    /// transaction, and nothing is ever created.
    async fn reset_database_password(
        &self,
        name: &DatabaseName,
    ) -> Result<Option<BackendObject>, BackendError> {
        let backend_name = BackendName::Database(name.clone());
        let fail = |operation, e: &sqlx::Error| {
            BackendError::unavailable(operation, &backend_name, redacted(e, name))
        };
        let role = RoleName::for_database(name);
        let mut conn = self
            .admin
            .acquire()
            .await
            .map_err(|e| fail("get an admin connection for", &e))?;
        let mut tx = sqlx::Connection::begin(&mut *conn)
            .await
            .map_err(|e| fail("begin resetting the credentials of", &e))?;
        // Keyed on the token's digest, never on the name (a legacy name carries the token).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('keel-rotate:' || $1, 0))")
            .bind(role.digest().as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| fail("serialize the credential resets of", &e))?;
        let owner: Option<String> = database_owner(&mut tx, name)
            .await
            .map_err(|e| fail("look up", &e))?;
        match owner {
            None => return Ok(None),
            Some(owner) if owner != role.expose() => {
                return Err(BackendError::Foreign {
                    name: name.masked(),
                });
            }
            Some(_) => {}
        }
        let password = generate_password();
        let verifier = Verifier::compute(&password, &random_bytes::<16>(), ITERATIONS);
        let alter = format!(
            "ALTER ROLE \"{}\" WITH PASSWORD '{}'",
            role.expose(),
            verifier.expose()
        );
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(alter))
            .execute(&mut *tx)
            .await
        {
            drop(tx);
            // Dropped by a teardown since the lookup: there is nothing to rotate.
            let gone = sqlx::query_scalar::<_, bool>(ROLE_EXISTS)
                .bind(role.expose())
                .fetch_one(&mut *conn)
                .await
                .is_ok_and(|exists| !exists);
            return if gone {
                Ok(None)
            } else {
                Err(fail("reset the password of", &e))
            };
        }
        tx.commit()
            .await
            .map_err(|e| fail("commit the new password of", &e))?;
        Ok(Some(BackendObject {
            provider_id: name.expose().to_owned(),
            connection_url: self.connection_url(name, &password),
        }))
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source is available");
    bytes
}

/// 64 hex digits (256 bits) from the operating system's random source.
fn generate_password() -> Password {
    use std::fmt::Write as _;
    let mut hex = String::with_capacity(64);
    for byte in random_bytes::<32>() {
        let _ = write!(hex, "{byte:02x}");
    }
    Password::new(hex)
}

fn database_comment(tier: &Tier, installation: Option<InstallationId>) -> String {
    let created_at = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    // Tiers are [a-z0-9_-]; the timestamp is RFC 3339 and the installation a hyphenated UUID:
    // no JSON escaping is needed.
    let stamp = installation
        .map(|id| format!(",\"{INSTALLATION_LABEL}\":\"{id}\""))
        .unwrap_or_default();
    format!(
        "{{\"labels\":{{\"{}\":\"keel\",\"{}\":\"postgres\",\"keel.dev/tier\":\"{}\"{stamp}}},\
          \"annotations\":{{\"{}\":\"{created_at}\"}}}}",
        comment_keys::MANAGED_BY,
        comment_keys::RESOURCE_TYPE,
        tier.as_str(),
        comment_keys::CREATED_AT,
    )
}

/// The `keel.dev/protect` mark of a database `COMMENT` (a JSON document), among its annotations
/// or labels: any value but `false` protects ([`protect_value_protects`]). Unparsable JSON carries
/// no mark.
fn is_protected(comment: &str) -> bool {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(comment) else {
        return false;
    };
    ["annotations", "labels"].iter().any(|section| {
        doc.get(section)
            .and_then(|s| s.get(comment_keys::PROTECT))
            .is_some_and(|v| v.as_str().is_none_or(protect_value_protects))
    })
}

/// A database COMMENT's string label `key`.
fn comment_label(comment: &str, key: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(comment)
        .ok()?
        .get("labels")?
        .get(key)?
        .as_str()
        .map(str::to_owned)
}

fn database_of(name: &BackendName) -> Result<&DatabaseName, BackendError> {
    match name {
        BackendName::Database(db) => Ok(db),
        BackendName::Namespace { resource_type, .. } => {
            Err(BackendError::Unsupported(*resource_type))
        }
    }
}

/// The owner of database `name`, or `None` when there is no such database.
async fn database_owner(
    conn: &mut PgConnection,
    name: &DatabaseName,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_get_userbyid(datdba)::text FROM pg_database WHERE datname = $1")
        .bind(name.expose())
        .fetch_optional(conn)
        .await
}

/// Whether a database of this name exists.
const DATABASE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)";

/// Whether a role of this name exists.
const ROLE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)";

impl Backend for PgClusterBackend {
    fn supports(&self, resource_type: ResourceType) -> bool {
        match resource_type {
            ResourceType::Postgres => true,
            ResourceType::Redis | ResourceType::Namespace => false,
        }
    }

    async fn create(&self, name: &BackendName, tier: &Tier) -> Result<BackendObject, BackendError> {
        let db = database_of(name)?;
        self.create_database(db, tier).await
    }

    async fn reset_credentials(
        &self,
        name: &BackendName,
        _tier: &Tier,
    ) -> Result<Option<BackendObject>, BackendError> {
        let db = database_of(name)?;
        self.reset_database_password(db).await
    }

    async fn teardown(&self, name: &BackendName) -> Result<(), BackendError> {
        let db = database_of(name)?;
        let role = RoleName::for_database(db);
        // All three statements on one connection, taken once (as a create does): concurrent
        // teardowns must not queue behind each other at every step.
        let mut conn = self.admin.acquire().await.map_err(|e| {
            BackendError::unavailable("get an admin connection for", name, redacted(&e, db))
        })?;
        // Never drop a database under the platform's name that its customer role does not own.
        let owner: Option<String> = database_owner(&mut conn, db)
            .await
            .map_err(|e| BackendError::unavailable("look up", name, redacted(&e, db)))?;
        if owner.is_some_and(|owner| owner != role.expose()) {
            return Err(BackendError::Foreign { name: db.masked() });
        }
        // The customer's login goes first: were the role's drop to fail (an object it owns
        // elsewhere on the cluster, a session's temporary table), a role that can still sign in
        // with the password its customer holds must never outlive the database.
        self.lock_out_role(&mut conn, &role, name, db).await?;
        // A drop that fails is a failure only while its object is still there: two teardowns
        // of one object may run at once (a provisioning's own compensation and the reconciler,
        // the chokepoint and the orphan sweep), and a `DROP ROLE` racing another fails with
        // "tuple concurrently deleted" although the role is gone; a drop whose reply was lost
        // may have committed. Either way the teardown did what it was for.
        let drop_db = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db.expose());
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(drop_db))
            .execute(&mut *conn)
            .await
        {
            self.gone_after_failed_drop(DATABASE_EXISTS, db.expose(), name)
                .await
                .map_err(|()| BackendError::unavailable("drop", name, redacted(&e, db)))?;
        }
        let drop_role = format!("DROP ROLE IF EXISTS \"{}\"", role.expose());
        if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(drop_role))
            .execute(&mut *conn)
            .await
        {
            self.gone_after_failed_drop(ROLE_EXISTS, role.expose(), name)
                .await
                .map_err(|()| {
                    BackendError::unavailable("drop the role of", name, redacted(&e, db))
                })?;
        }
        Ok(())
    }

    async fn protected(&self, name: &BackendName) -> Result<bool, BackendError> {
        let db = database_of(name)?;
        let comment: Option<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM pg_database d WHERE datname = $1",
            bounded_database_comment_sql()
        )))
        .bind(db.expose())
        .fetch_optional(&self.admin)
        .await
        .map_err(|e| BackendError::unavailable("look up", name, redacted(&e, db)))?;
        Ok(comment.flatten().is_some_and(|text| is_protected(&text)))
    }

    async fn preflight(&self, name: &BackendName) -> Result<Preflight, BackendError> {
        let db = database_of(name)?;
        let role = RoleName::for_database(db);
        let found: Option<(String, Option<String>, String)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT pg_get_userbyid(datdba)::text, {}, d.oid::text \
                   FROM pg_database d WHERE datname = $1",
                bounded_database_comment_sql()
            )))
            .bind(db.expose())
            .fetch_optional(&self.admin)
            .await
            .map_err(|e| BackendError::unavailable("look up", name, redacted(&e, db)))?;
        let Some((owner, comment, oid)) = found else {
            return Ok(Preflight::Absent);
        };
        let comment = comment.unwrap_or_default();
        Ok(Preflight::Present(ObjectFacts {
            platform_made: owner == role.expose()
                && comment_label(&comment, comment_keys::MANAGED_BY).as_deref() == Some("keel"),
            protected: is_protected(&comment),
            installation: comment_label(&comment, INSTALLATION_LABEL),
            incarnation: Some(oid),
        }))
    }

    async fn exists(&self, name: &BackendName) -> Result<bool, BackendError> {
        let db = database_of(name)?;
        sqlx::query_scalar(DATABASE_EXISTS)
            .bind(db.expose())
            .fetch_one(&self.admin)
            .await
            .map_err(|e| BackendError::unavailable("look up", name, redacted(&e, db)))
    }
}
