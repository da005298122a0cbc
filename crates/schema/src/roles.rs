//! Least privilege: the role that runs the migrations owns the schema; the role the binaries
//! serve as is granted only what they use.
//!
//! The owner of a table can disable or drop its triggers, rewrite, rename or drop it, so the
//! append-only audit trail holds only against roles that do not own it. [`grant_app_role`], run
//! by the owner after the migrations (`migrate --app-role NAME`), gives the application role:
//!
//! - `CONNECT` and `TEMPORARY` on the database (when the owner owns it, `PUBLIC` loses both, so
//!   customer roles on the same cluster cannot reach it), `USAGE` on the schema;
//! - on `audit_events`: `SELECT`, and `INSERT` of the event's own columns only (never `id`,
//!   `recorded_at` or the commit-order columns, which the database sets);
//! - on the audit side tables ([`AUDIT_READ_ONLY_TABLES`]): `SELECT` only;
//! - on the contract views (`orphan_sightings`): `SELECT` only;
//! - on every other contract table ([`crate::CONTRACT_TABLES`]): `SELECT`, `INSERT`, `UPDATE`,
//!   `DELETE` (no `TRUNCATE`, `REFERENCES` or `TRIGGER`), and `USAGE` on their sequences (no
//!   `setval`); the provisioning API's private tables ([`PRIVATE_TABLES`]) likewise;
//! - nothing on tables Keel does not own: neither `_keel_migrations` nor a service's own tables
//!   that share the schema (and the owner).
//!
//! Grants are recomputed from scratch on every call, so a narrower release takes back what an
//! older one gave. The role name is configurable, so two installations can share one cluster,
//! each with its own owner and application role.

use std::fmt;

use sqlx::{Acquire, PgConnection};

/// The columns of `audit_events` the application role may write; the database fills the rest.
pub const AUDIT_INSERT_COLUMNS: &[&str] = &[
    "kind",
    "actor",
    "team_id",
    "resource_id",
    "request_id",
    "attributes",
    "occurred_at",
];

/// Audit tables the application role may read but never write (besides `audit_events`, which
/// it may append to).
pub const AUDIT_READ_ONLY_TABLES: &[&str] = &[
    "audit_seals",
    "audit_checkpoints",
    "audit_retention",
    "audit_retired_links",
];

/// Keel's sequences that no table owns (drawn with `nextval` by the binaries, e.g. the
/// propagation fencing tokens); the application role gets `USAGE` on each. A schema test fails
/// when a migration adds one that is not listed here.
pub const STANDALONE_SEQUENCES: &[&str] = &["pending_propagations_fence_seq"];

/// The schema holding the provisioning API's private state (its keys and idempotency records):
/// not contract tables, but the serving binary reads and writes them as the application role.
pub const PRIVATE_SCHEMA: &str = "provision_api";

/// The tables in [`PRIVATE_SCHEMA`]; the application role gets DML on each.
pub const PRIVATE_TABLES: &[&str] = &["api_keys", "idempotency_keys", "console_sessions"];

/// An application role name: a plain lower-case SQL identifier (`[a-z_][a-z0-9_]{0,62}`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct AppRole(String);

impl AppRole {
    /// Parses a role name; anything but a plain identifier is refused (it is never quoted into
    /// SQL unchecked).
    pub fn parse(name: &str) -> Result<Self, RoleError> {
        let mut chars = name.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && name.len() <= 63 && !name.starts_with("pg_") {
            Ok(Self(name.to_owned()))
        } else {
            Err(RoleError::BadName)
        }
    }

    /// The role name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AppRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AppRole({})", self.0)
    }
}

impl fmt::Display for AppRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for AppRole {
    type Err = RoleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Why the application role could not be granted its privileges.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoleError {
    /// The name is not a plain lower-case identifier.
    #[error(
        "the application role name must be a plain lower-case identifier ([a-z_][a-z0-9_]*, at \
         most 63 characters, not pg_*)"
    )]
    BadName,
    /// The role does not exist on the cluster.
    #[error(
        "the application role {0} does not exist; create it first (CREATE ROLE {0} LOGIN \
         PASSWORD …) as a role with CREATEROLE"
    )]
    Missing(AppRole),
    /// The role would hold the owner's rights: it is the owner, a member of it, or a superuser.
    #[error(
        "the application role {0} is the schema's owner, a member of it or a superuser, so it \
         could disable or drop the audit triggers; use a separate role without those rights"
    )]
    NotSeparate(AppRole),
    /// A statement failed.
    #[error("could not grant the application role its privileges")]
    Database(#[source] sqlx::Error),
}

fn quoted(role: &AppRole) -> String {
    // Parsed identifiers hold no quote; quoting keeps reserved words usable.
    format!("\"{}\"", role.0)
}

/// Grants `role` what Keel's binaries use and nothing more, as the owner connected on `conn`
/// (run after the migrations). Idempotent; one transaction.
pub async fn grant_app_role(conn: &mut PgConnection, role: &AppRole) -> Result<(), RoleError> {
    let mut tx = Acquire::begin(conn).await.map_err(RoleError::Database)?;
    let (exists, separate): (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1), \
                NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = $1 \
                            AND (r.rolsuper OR pg_has_role(r.oid, current_user, 'MEMBER')))",
    )
    .bind(role.as_str())
    .fetch_one(&mut *tx)
    .await
    .map_err(RoleError::Database)?;
    if !exists {
        return Err(RoleError::Missing(role.clone()));
    }
    if !separate {
        return Err(RoleError::NotSeparate(role.clone()));
    }
    let r = quoted(role);
    let db_owner: bool = sqlx::query_scalar(
        "SELECT pg_has_role(current_user, d.datdba, 'USAGE') \
         FROM pg_database d WHERE d.datname = current_database()",
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(RoleError::Database)?;
    let mut statements = Vec::new();
    if db_owner {
        statements.push(format!(
            "DO $$ BEGIN \
               EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %s', current_database(), '{r}'); \
               EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()); \
             END $$"
        ));
    }
    statements.push(format!(
        "DO $$ BEGIN EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', current_schema(), '{r}'); END $$"
    ));
    // Views (`orphan_sightings`) are read through: SELECT only.
    let tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text, c.relkind = 'v' FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v') \
           AND NOT c.relispartition \
           AND pg_has_role(current_user, c.relowner, 'USAGE') \
           AND c.relname = ANY($1) \
         ORDER BY 1",
    )
    .bind(crate::CONTRACT_TABLES)
    .fetch_all(&mut *tx)
    .await
    .map_err(RoleError::Database)?;
    for (table, view) in &tables {
        let t = format!("\"{}\"", table.replace('"', "\"\""));
        statements.push(format!("REVOKE ALL ON TABLE {t} FROM {r}"));
        if *view {
            statements.push(format!("GRANT SELECT ON TABLE {t} TO {r}"));
        } else if table == "audit_events" {
            statements.push(format!("GRANT SELECT ON TABLE {t} TO {r}"));
            statements.push(format!(
                "GRANT INSERT ({}) ON TABLE {t} TO {r}",
                AUDIT_INSERT_COLUMNS.join(", ")
            ));
        } else if AUDIT_READ_ONLY_TABLES.contains(&table.as_str()) {
            statements.push(format!("GRANT SELECT ON TABLE {t} TO {r}"));
        } else {
            statements.push(format!(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {t} TO {r}"
            ));
        }
    }
    let sequences: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT s.relname::text, t.relname::text \
         FROM pg_class s JOIN pg_namespace n ON n.oid = s.relnamespace \
         LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid \
              AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') \
         LEFT JOIN pg_class t ON t.oid = d.refobjid \
         WHERE n.nspname = current_schema() AND s.relkind = 'S' \
           AND pg_has_role(current_user, s.relowner, 'USAGE') \
           AND (t.relname = ANY($1) OR (t.relname IS NULL AND s.relname = ANY($2))) \
         ORDER BY 1",
    )
    .bind(crate::CONTRACT_TABLES)
    .bind(STANDALONE_SEQUENCES)
    .fetch_all(&mut *tx)
    .await
    .map_err(RoleError::Database)?;
    for (sequence, table) in &sequences {
        let s = format!("\"{}\"", sequence.replace('"', "\"\""));
        statements.push(format!("REVOKE ALL ON SEQUENCE {s} FROM {r}"));
        let audit = table
            .as_deref()
            .is_some_and(|t| t == "audit_events" || AUDIT_READ_ONLY_TABLES.contains(&t));
        if !audit {
            statements.push(format!("GRANT USAGE ON SEQUENCE {s} TO {r}"));
        }
    }
    // Readiness (`/readyz`) reads the applied schema version as this role: SELECT only.
    let migrations = crate::MIGRATIONS_TABLE;
    statements.push(format!("REVOKE ALL ON TABLE {migrations} FROM {r}"));
    statements.push(format!("GRANT SELECT ON TABLE {migrations} TO {r}"));
    statements.push(format!("GRANT USAGE ON SCHEMA {PRIVATE_SCHEMA} TO {r}"));
    for table in PRIVATE_TABLES {
        statements.push(format!(
            "REVOKE ALL ON TABLE {PRIVATE_SCHEMA}.{table} FROM {r}"
        ));
        statements.push(format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {PRIVATE_SCHEMA}.{table} TO {r}"
        ));
    }
    for statement in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *tx)
            .await
            .map_err(RoleError::Database)?;
    }
    tx.commit().await.map_err(RoleError::Database)
}

/// What the connected role could do to the audit trail beyond appending, for a start-up check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeRole {
    /// Neither superuser nor owner (nor a member of the owner) of `audit_events`.
    LeastPrivilege,
    /// The connected role owns `audit_events` (or inherits from its owner): it can drop the
    /// append-only triggers.
    Owner,
    /// The connected role is a superuser.
    Superuser,
    /// `audit_events` does not exist yet (not migrated).
    Unmigrated,
}

/// Classifies the role connected on `conn` (see [`RuntimeRole`]).
pub async fn runtime_role(conn: &mut PgConnection) -> Result<RuntimeRole, sqlx::Error> {
    let (superuser, owner): (bool, Option<bool>) = sqlx::query_as(
        "SELECT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), \
                (SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c \
                 WHERE c.oid = to_regclass('audit_events'))",
    )
    .fetch_one(conn)
    .await?;
    Ok(match (superuser, owner) {
        (true, _) => RuntimeRole::Superuser,
        (false, None) => RuntimeRole::Unmigrated,
        (false, Some(true)) => RuntimeRole::Owner,
        (false, Some(false)) => RuntimeRole::LeastPrivilege,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_identifiers_are_role_names() {
        for good in ["keel_app", "_x", "app2", "a"] {
            assert_eq!(AppRole::parse(good).unwrap().as_str(), good);
        }
        for bad in [
            "",
            "Keel",
            "2app",
            "app-role",
            "app\"; DROP TABLE audit_events; --",
            "pg_read_all_data",
            &"a".repeat(64),
        ] {
            assert!(AppRole::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
