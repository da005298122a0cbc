//! Keel's Postgres schema: one set of reversible migrations (`migrations/*.up.sql` and
//! `*.down.sql` at the workspace root) embedded into the binary, shared by every concern.
//!
//! Table and index names are contracts that operators and other services query; see
//! [`CONTRACT_TABLES`].
//!
//! # Sharing a database with a service's own migrations
//!
//! Keel records which of its migrations ran in its own table, [`MIGRATIONS_TABLE`]
//! (`_keel_migrations`), never in sqlx's default `_sqlx_migrations`. A service that embeds Keel
//! and runs its own `sqlx::migrate!()` therefore keeps both bookkeepings apart: the two
//! migrators run against one database in either order, as often as they like, even when their
//! version numbers overlap.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
//! // The service's own migrations (usually `sqlx::migrate!()`), tracked in `_sqlx_migrations`.
//! let service = sqlx::migrate::Migrator::new(std::path::Path::new("./migrations")).await?;
//! service.run(&pool).await?;
//! // Keel's, tracked in `_keel_migrations`. Either may run first.
//! keel_schema::migrate(&pool).await?;
//! # Ok(()) }
//! ```
//!
//! A deployment that applied Keel's migrations before they moved (when they were tracked in
//! `_sqlx_migrations`) keeps working: [`migrate`] moves Keel's own rows (same version and
//! checksum) from `_sqlx_migrations` into `_keel_migrations` once, under the migration lock, and
//! leaves every other row where it is. A binary from before the move would, after it, find
//! Keel's versions missing from `_sqlx_migrations`: roll forward, not back.
//!
//! # The contract tables
//!
//! - `teams(id uuid primary key, tier text)`: `tier` is one of Keel's tier names (`free`,
//!   `hobby`, `pro`, `team`, `enterprise`; see `keel_audit::Tier`).
//! - `resources(id uuid primary key, token text unique, team_id uuid references teams,
//!   resource_type text, tier text, status text, provider_resource_id text, connection_url text,
//!   created_at, updated_at, deleted_at)`: `resource_type` is `postgres`, `redis` or
//!   `namespace`; `status` is `pending`, `active`, `paused` or `suspended` (live) or `deleted`,
//!   `failed` (terminal). The CHECK `resources_active_is_addressable` refuses an `active` row
//!   without `provider_resource_id` and `connection_url`. `keel_provision` writes these rows.
//! - `audit_events`: append-only; written through `keel_audit::postgres::insert`.
//! - `pending_propagations`: the propagation queue; written through `keel_propagation`'s
//!   `postgres` adapter (`enqueue_in`, `change_team_tier`).
//! - `billing_event`, `prices`, `rated_usage`, `rater_runs`, `rater_lease`, `io_log`: the
//!   rater's; see `keel_rater`. `rating_change` and `rating_change_all` hold the change markers
//!   triggers on `billing_event` and `prices` write for the rater's incremental runs (derived
//!   data: never written by hand).

pub mod roles;

use std::sync::LazyLock;

use sqlx::migrate::{Migrate, MigrateError, Migrator};
use sqlx::{Connection, PgConnection, PgPool};

/// The table in which Keel records which of its migrations ran: apart from sqlx's default
/// `_sqlx_migrations`, which stays free for the embedding service's own migrations.
pub const MIGRATIONS_TABLE: &str = "_keel_migrations";

/// Where Keel recorded its migrations before they got their own table; [`migrate`] moves Keel's
/// rows out of it.
pub const LEGACY_MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// The query that reads the newest successfully applied Keel migration (`NULL` when none ran):
/// what a readiness check compares with [`latest_version`].
pub const APPLIED_VERSION_SQL: &str = "SELECT max(version) FROM _keel_migrations WHERE success";

/// The migrations as `sqlx::migrate!` embeds them.
static EMBEDDED: Migrator = sqlx::migrate!("../../migrations");

/// Every migration, embedded at compile time, tracked in [`MIGRATIONS_TABLE`].
///
/// Apply it with [`migrate`], which also moves legacy bookkeeping and always releases the
/// migration lock; `MIGRATOR.run` directly does neither.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let mut migrator = Migrator::with_migrations(EMBEDDED.iter().cloned().collect());
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
});

/// Tables that other services and operators rely on by name.
pub const CONTRACT_TABLES: &[&str] = &[
    "teams",
    "resources",
    "audit_events",
    "pending_propagations",
    "billing_event",
    "prices",
    "rated_usage",
    "rater_runs",
    "rater_lease",
    "rating_change",
    "rating_change_all",
    "io_log",
    "keel_installation",
    "reclaim_protections",
    "orphan_sweep_periods",
    "orphan_sightings",
    "orphan_sighting_runs",
    "orphan_sweep_recorded",
    "audit_seals",
    "audit_checkpoints",
    "notification_cursor",
    "notification_deliveries",
    "audit_retention",
    "audit_retired_links",
];

/// The tables of the provisioning API's own state, in the schema `provision_api` (not contract
/// names: no other service queries them). [`revert_all`] refuses while any holds rows.
pub const PROVISION_API_TABLES: &[&str] = &[
    "provision_api.api_keys",
    "provision_api.idempotency_keys",
    "provision_api.console_sessions",
];

/// Applies every pending migration. Safe to call on every start: applied ones are skipped.
///
/// Runs on a connection of its own (not one of `pool`'s), which it closes whether the migration
/// succeeded or not, so a failed migration never leaves the migration lock held for the next
/// replica. That connection is opened from `pool`'s connect options: a setting your pool makes
/// in an `after_connect` hook (a `search_path`, say) does not reach it, so give such settings
/// in the connect options instead (`PgConnectOptions::options`, or `options=-c search_path=…`
/// in the URL), where both the migration and the pool's connections take them. Keel's versions are tracked in [`MIGRATIONS_TABLE`]; rows a previous Keel left in
/// [`LEGACY_MIGRATIONS_TABLE`] are moved there first.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
    let result = migrate_on(&mut conn).await;
    release(conn).await;
    result
}

/// Releases every advisory lock the dedicated connection still holds (a migrator that failed
/// returns without unlocking) and closes it. Should the unlock fail, closing ends the session,
/// which releases them too.
async fn release(mut conn: PgConnection) {
    let _ = sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
}

async fn migrate_on(conn: &mut PgConnection) -> Result<(), MigrateError> {
    conn.lock().await?;
    adopt_legacy_rows(conn).await?;
    // The migrator takes the same (session, re-entrant) lock again and releases its own hold.
    // `run_direct` is `run` on a connection (whose future stays `Send` for any lifetime).
    MIGRATOR.run_direct(None, &mut *conn, false).await?;
    conn.unlock().await?;
    Ok(())
}

/// Moves Keel's rows (same version and checksum as an embedded up migration) from
/// `_sqlx_migrations` to `_keel_migrations`, in one statement. Rows of the service's own
/// migrations stay.
async fn adopt_legacy_rows(conn: &mut PgConnection) -> Result<(), MigrateError> {
    let legacy: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(LEGACY_MIGRATIONS_TABLE)
        .fetch_one(&mut *conn)
        .await?;
    if !legacy {
        return Ok(());
    }
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    let (versions, checksums): (Vec<i64>, Vec<Vec<u8>>) = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| (m.version, m.checksum.to_vec()))
        .unzip();
    sqlx::query(
        "WITH moved AS ( \
             DELETE FROM _sqlx_migrations s \
             WHERE (s.version, s.checksum) IN \
                   (SELECT v, c FROM unnest($1::int8[], $2::bytea[]) AS k(v, c)) \
               AND NOT EXISTS (SELECT 1 FROM _keel_migrations k WHERE k.version = s.version) \
             RETURNING s.version, s.description, s.installed_on, s.success, s.checksum, \
                       s.execution_time) \
         INSERT INTO _keel_migrations \
             (version, description, installed_on, success, checksum, execution_time) \
         SELECT version, description, installed_on, success, checksum, execution_time FROM moved",
    )
    .bind(versions)
    .bind(checksums)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Why [`revert_all`] did not revert.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevertError {
    /// A contract table, or a table of the provisioning API's own state (its API keys, its
    /// idempotency records, the console's sessions), still holds rows: reverting would erase
    /// them (for `audit_events`, the audit trail; for `provision_api.api_keys`, every operator's
    /// and team's key). Nothing was reverted. Empty the table deliberately first if that is
    /// meant.
    #[error(
        "refusing to revert the schema: {table} still holds rows, which the down migrations \
         would erase; nothing was reverted"
    )]
    NotEmpty {
        /// The first contract table found holding rows.
        table: &'static str,
    },
    /// The migrator failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
}

/// Reverts every applied migration, newest first, leaving an empty schema — but only while every
/// contract table and every table of the provisioning API's own state
/// ([`PROVISION_API_TABLES`]) is empty: a schema holding data (above all an audit trail or the
/// API keys) is never dropped by this call, it returns [`RevertError::NotEmpty`] and changes
/// nothing.
pub async fn revert_all(pool: &PgPool) -> Result<(), RevertError> {
    let mut conn = PgConnection::connect_with(&pool.connect_options())
        .await
        .map_err(MigrateError::from)?;
    let result = revert_on(&mut conn).await;
    release(conn).await;
    result
}

async fn revert_on(conn: &mut PgConnection) -> Result<(), RevertError> {
    conn.lock().await?;
    // `rater_lease` holds only the single-flight lease row its migration seeds, and the rating
    // change markers only what triggers derived from the other tables: no data of their own.
    let derived = ["rater_lease", "rating_change", "rating_change_all"];
    let guarded = CONTRACT_TABLES
        .iter()
        .filter(|t| !derived.contains(t))
        .chain(PROVISION_API_TABLES);
    for &table in guarded {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&mut *conn)
            .await
            .map_err(MigrateError::from)?;
        if !exists {
            continue;
        }
        // The name comes from the constant list above, never from input.
        let holds_rows: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {table})"
        )))
        .fetch_one(&mut *conn)
        .await
        .map_err(MigrateError::from)?;
        if holds_rows {
            return Err(RevertError::NotEmpty { table });
        }
    }
    // `Migrator::undo` to version 0, on this connection.
    conn.ensure_migrations_table(MIGRATIONS_TABLE).await?;
    if let Some(version) = conn.dirty_version(MIGRATIONS_TABLE).await? {
        return Err(MigrateError::Dirty(version).into());
    }
    let applied: Vec<i64> = conn
        .list_applied_migrations(MIGRATIONS_TABLE)
        .await?
        .into_iter()
        .map(|m| m.version)
        .collect();
    for migration in MIGRATOR
        .iter()
        .rev()
        .filter(|m| m.migration_type.is_down_migration() && applied.contains(&m.version))
    {
        conn.revert(MIGRATIONS_TABLE, migration).await?;
    }
    conn.unlock().await?;
    Ok(())
}

/// The newest migration version embedded in this build.
pub fn latest_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// A short hex fingerprint of the embedded migrations (versions and checksums) and of the table
/// that tracks them.
///
/// Two builds with the same fingerprint create the same schema; the test harness names its
/// template database after it.
pub fn fingerprint() -> String {
    // FNV-1a, 64 bit: stable across builds and platforms, unlike `DefaultHasher`.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(MIGRATIONS_TABLE.as_bytes());
    for migration in MIGRATOR.iter() {
        feed(&migration.version.to_le_bytes());
        feed(&migration.checksum);
    }
    format!("{hash:016x}")
}
