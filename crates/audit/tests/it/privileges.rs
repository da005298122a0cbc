//! The audit trail as production deploys it: an owner role ran `migrate`, the binaries serve as
//! a separate application role. Every bypass is tried as the application role (FND-1, FND-12),
//! and the schema's down migrations never erase audit rows (FND-2).

use keel_audit::AuditKind;
use keel_audit::postgres::{AuditFilter, fetch, insert, insert_batch};
use sqlx::{Acquire, PgPool};

use crate::sample;

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Runs `sql` as one transaction on `pool` and returns its error, or panics when it succeeds.
async fn refused(pool: &PgPool, sql: &str) -> String {
    let mut conn = pool.acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    let outcome = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await;
    tx.rollback().await.unwrap();
    match outcome {
        Ok(_) => panic!("the application role was allowed: {sql}"),
        Err(e) => e.to_string(),
    }
}

/// FND-1: every bypass of the append-only triggers that worked for the role Keel ran as is
/// refused for the application role, which is not the owner.
#[tokio::test]
async fn the_app_role_cannot_disable_or_drop_the_audit_triggers() {
    let db = keel_testkit::role_split_database().await;
    let mut conn = db.app().acquire().await.unwrap();
    insert(&mut conn, &sample(AuditKind::PropagationApplied, 1))
        .await
        .unwrap();
    insert_batch(
        &mut conn,
        &[
            sample(AuditKind::PropagationRetrying, 2),
            sample(AuditKind::PropagationRetrying, 3),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        fetch(&mut conn, &AuditFilter::default())
            .await
            .unwrap()
            .len(),
        3,
        "the application role must write and read the trail"
    );
    drop(conn);

    let bypasses = [
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete; \
         DELETE FROM audit_events",
        "ALTER TABLE audit_events DISABLE TRIGGER ALL; TRUNCATE audit_events",
        "DROP TRIGGER audit_events_no_update_delete ON audit_events; \
         UPDATE audit_events SET actor = 'forged'",
        "CREATE OR REPLACE FUNCTION audit_events_refuse_change() RETURNS trigger \
         LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$; DELETE FROM audit_events",
        "ALTER TABLE audit_events ALTER COLUMN actor TYPE text USING 'rewritten'",
        "ALTER TABLE audit_events RENAME TO audit_events_old",
        "CREATE TABLE audit_events_swap (LIKE audit_events INCLUDING ALL)",
        "DROP TABLE audit_events CASCADE",
        "SET session_replication_role = replica",
        "UPDATE audit_events SET actor = 'forged'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "CREATE TRIGGER swallow BEFORE UPDATE ON audit_events \
         FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change()",
        "ALTER TABLE audit_events OWNER TO CURRENT_USER",
        "ALTER TABLE audit_events DROP CONSTRAINT audit_events_kind_format",
        "CREATE RULE forge AS ON INSERT TO audit_events DO INSTEAD NOTHING",
        "ALTER TABLE audit_events ENABLE REPLICA TRIGGER audit_events_no_update_delete",
    ];
    for sql in bypasses {
        let err = refused(db.app(), sql).await;
        assert!(
            err.contains("must be owner")
                || err.contains("permission denied")
                || err.contains("append-only"),
            "{sql}: unexpected refusal {err}"
        );
    }
    // A GRANT by a non-owner only warns; it must not have given anything.
    let _ = sqlx::raw_sql("GRANT ALL ON audit_events TO CURRENT_USER")
        .execute(db.app())
        .await;
    let granted: bool = sqlx::query_scalar(
        "SELECT has_table_privilege('audit_events', 'UPDATE') \
             OR has_table_privilege('audit_events', 'DELETE') \
             OR has_table_privilege('audit_events', 'TRUNCATE') \
             OR has_table_privilege('audit_events', 'TRIGGER') \
             OR has_column_privilege('audit_events', 'id', 'INSERT') \
             OR has_column_privilege('audit_events', 'recorded_at', 'INSERT')",
    )
    .fetch_one(db.app())
    .await
    .unwrap();
    assert!(
        !granted,
        "the application role holds more than SELECT and INSERT"
    );
    // The owner sees every row intact.
    assert_eq!(count(db.owner()).await, 3);
    let forged: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE actor IN ('forged', 'rewritten')",
    )
    .fetch_one(db.owner())
    .await
    .unwrap();
    assert_eq!(forged, 0);
}

/// FND-12: the application role can neither choose `id` or `recorded_at` nor move the
/// sequence that numbers the trail.
#[tokio::test]
async fn the_app_role_cannot_forge_ids_timestamps_or_wedge_the_sequence() {
    let db = keel_testkit::role_split_database().await;
    for sql in [
        "INSERT INTO audit_events (id, kind, actor, occurred_at) \
         VALUES (999, 'propagation.applied', 'system', now())",
        "INSERT INTO audit_events (kind, actor, occurred_at, recorded_at) \
         VALUES ('propagation.applied', 'system', now(), '2020-01-01')",
        "INSERT INTO audit_events (id, kind, actor, occurred_at) OVERRIDING SYSTEM VALUE \
         VALUES (999, 'propagation.applied', 'system', now())",
        "SELECT setval(pg_get_serial_sequence('audit_events', 'id'), 1)",
        "SELECT nextval(pg_get_serial_sequence('audit_events', 'id'))",
        "ALTER SEQUENCE audit_events_id_seq RESTART WITH 1",
    ] {
        let err = refused(db.app(), sql).await;
        assert!(
            err.contains("permission denied")
                || err.contains("must be owner")
                || err.contains("cannot insert a non-DEFAULT value into column \"id\""),
            "{sql}: unexpected refusal {err}"
        );
    }
    // Even the owner, who may name `recorded_at`, never stores a forged one: a time in another
    // month is refused (the row was routed to that month's partition before the stamp), one in
    // this month is replaced by the database's clock.
    let other_month = sqlx::query(
        "INSERT INTO audit_events (kind, actor, occurred_at, recorded_at) \
         VALUES ('propagation.applied', 'system', now(), '2020-01-01')",
    )
    .execute(db.owner())
    .await
    .unwrap_err();
    assert!(
        other_month.to_string().contains("another partition"),
        "{other_month}"
    );
    sqlx::query(
        "INSERT INTO audit_events (kind, actor, occurred_at, recorded_at) \
         VALUES ('propagation.applied', 'system', now(), date_trunc('month', now()))",
    )
    .execute(db.owner())
    .await
    .unwrap();
    let stamped: bool =
        sqlx::query_scalar("SELECT recorded_at > date_trunc('month', now()) FROM audit_events")
            .fetch_one(db.owner())
            .await
            .unwrap();
    assert!(stamped, "the owner's recorded_at was replaced by the clock");
    let mut conn = db.app().acquire().await.unwrap();
    let id = insert(&mut conn, &sample(AuditKind::PropagationApplied, 1))
        .await
        .unwrap();
    let rows = fetch(&mut conn, &AuditFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.recorded_at.year() > 2020), "{rows:?}");
    // (Both rows: the owner's, stamped, and the application role's.)
    assert_eq!(rows[1].id, id);
    assert!(rows[1].id > rows[0].id);
}

/// FND-1: the application role is granted DML on the other tables the binaries use, but never
/// TRUNCATE, TRIGGER or DDL in the schema.
#[tokio::test]
async fn the_app_role_gets_dml_on_state_tables_and_no_ddl() {
    let db = keel_testkit::role_split_database().await;
    sqlx::query("INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro')")
        .execute(db.app())
        .await
        .unwrap();
    sqlx::query("UPDATE teams SET tier = 'hobby'")
        .execute(db.app())
        .await
        .unwrap();
    for sql in [
        "TRUNCATE teams",
        "CREATE TABLE sneaky (x int)",
        "ALTER TABLE teams ADD COLUMN sneaky int",
        "CREATE TRIGGER swallow BEFORE INSERT ON teams \
         FOR EACH ROW EXECUTE FUNCTION audit_events_refuse_change()",
        "DROP TABLE teams",
    ] {
        let err = refused(db.app(), sql).await;
        assert!(
            err.contains("permission denied") || err.contains("must be owner"),
            "{sql}: unexpected refusal {err}"
        );
    }
}

/// FND-1: a role that is the owner, inherits from it or is a superuser is refused as the
/// application role, and grants are idempotent.
#[tokio::test]
async fn the_app_role_must_be_separate_from_the_owner() {
    let db = keel_testkit::role_split_database().await;
    let mut conn = db.owner().acquire().await.unwrap();
    keel_schema::roles::grant_app_role(&mut conn, db.app_role())
        .await
        .unwrap();
    let owner = keel_schema::roles::AppRole::parse(db.owner_role()).unwrap();
    let err = keel_schema::roles::grant_app_role(&mut conn, &owner)
        .await
        .unwrap_err();
    assert!(
        matches!(err, keel_schema::roles::RoleError::NotSeparate(_)),
        "{err}"
    );
    let missing = keel_schema::roles::AppRole::parse("keel_no_such_role").unwrap();
    let err = keel_schema::roles::grant_app_role(&mut conn, &missing)
        .await
        .unwrap_err();
    assert!(
        matches!(err, keel_schema::roles::RoleError::Missing(_)),
        "{err}"
    );
    use keel_schema::roles::{RuntimeRole, runtime_role};
    assert_eq!(runtime_role(&mut conn).await.unwrap(), RuntimeRole::Owner);
    let mut app = db.app().acquire().await.unwrap();
    assert_eq!(
        runtime_role(&mut app).await.unwrap(),
        RuntimeRole::LeastPrivilege
    );
}

/// FND-2: reverting a schema whose trail holds rows refuses, and the rows stay; a revert of an
/// empty trail still works (covered by the schema's own up/down/up test).
#[tokio::test]
async fn reverting_a_schema_that_holds_audit_rows_refuses_or_archives() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    insert(&mut conn, &sample(AuditKind::PropagationApplied, 1))
        .await
        .unwrap();
    drop(conn);
    // One session for the revert and the migrate after it: a failed revert keeps sqlx's
    // migration lock on its session (FND-9, fixed in keel_schema::migrate itself).
    let single = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.connect_options())
        .await
        .unwrap();
    let err = keel_schema::revert_all(&single).await.unwrap_err();
    assert!(err.to_string().contains("audit"), "{err}");
    assert_eq!(count(db.pool()).await, 1, "the revert erased audit rows");
    // Each down migration, run alone, either refuses or leaves every audit row in place.
    for migration in keel_schema::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_down_migration())
    {
        let mut conn = db.pool().acquire().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        let outcome = sqlx::raw_sql(migration.sql.clone()).execute(&mut *tx).await;
        if outcome.is_ok() {
            let left: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM audit_events")
                .fetch_one(&mut *tx)
                .await;
            assert_eq!(
                left.ok(),
                Some(1),
                "down migration {} erased audit rows",
                migration.version
            );
        }
        tx.rollback().await.unwrap();
    }
    assert_eq!(count(db.pool()).await, 1);
    keel_schema::migrate(&single).await.unwrap();
    assert_eq!(count(db.pool()).await, 1);
}
