//! Keel's Postgres schema: one set of reversible migrations (`migrations/*.up.sql` and
//! `*.down.sql` at the workspace root) embedded into the binary, shared by every concern.
//!
//! Table and index names are contracts that operators and other services query; see
//! [`CONTRACT_TABLES`].
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
//! keel_schema::migrate(&pool).await?;
//! # Ok(()) }
//! ```

pub mod roles;

use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};

/// Every migration, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

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
    "io_log",
    "keel_installation",
    "reclaim_protections",
    "orphan_sweep_periods",
    "orphan_sightings",
    "audit_seals",
    "audit_checkpoints",
];

/// Applies every pending migration. Safe to call on every start: applied ones are skipped.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    MIGRATOR.run(pool).await
}

/// Reverts every applied migration, newest first, leaving an empty schema.
pub async fn revert_all(pool: &PgPool) -> Result<(), MigrateError> {
    MIGRATOR.undo(pool, 0).await
}

/// The newest migration version embedded in this build.
pub fn latest_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// A short hex fingerprint of the embedded migrations (versions and checksums).
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
    for migration in MIGRATOR.iter() {
        feed(&migration.version.to_le_bytes());
        feed(&migration.checksum);
    }
    format!("{hash:016x}")
}
