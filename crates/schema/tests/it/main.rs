//! The schema against a real Postgres: up, down and up again; the contract names exist; Keel's
//! migrations share a database with a service's own.

use sqlx::PgPool;
use sqlx::SqlSafeStr;
use sqlx::migrate::{MigrateError, Migration, MigrationType, Migrator};

async fn public_tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        // Tables, not their partitions (audit_events is partitioned by month).
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'f') AND NOT c.relispartition \
           AND c.relname NOT IN ('_keel_migrations', '_sqlx_migrations') ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

fn sorted_contract_tables() -> Vec<String> {
    let mut tables: Vec<String> = keel_schema::CONTRACT_TABLES
        .iter()
        .map(|t| t.to_string())
        .collect();
    tables.sort();
    tables
}

/// The application role is granted `USAGE` on Keel's sequences by name: a standalone sequence a
/// migration adds must be listed, or the binaries, serving as that role, could not draw from it.
#[tokio::test]
async fn every_standalone_sequence_is_granted_to_the_application_role() {
    let db = keel_testkit::empty_database().await;
    keel_schema::migrate(db.pool()).await.unwrap();
    let standalone: Vec<String> = sqlx::query_scalar(
        "SELECT s.relname::text FROM pg_class s JOIN pg_namespace n ON n.oid = s.relnamespace \
         WHERE n.nspname = 'public' AND s.relkind = 'S' \
           AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                            AND d.objid = s.oid AND d.refclassid = 'pg_class'::regclass \
                            AND d.deptype IN ('a', 'i')) \
         ORDER BY 1",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut listed: Vec<String> = keel_schema::roles::STANDALONE_SEQUENCES
        .iter()
        .map(|s| s.to_string())
        .collect();
    listed.sort();
    assert_eq!(standalone, listed);
}

#[tokio::test]
async fn migrations_go_up_down_and_up_again() {
    let db = keel_testkit::empty_database().await;
    keel_schema::migrate(db.pool()).await.unwrap();
    assert_eq!(public_tables(db.pool()).await, sorted_contract_tables());

    keel_schema::revert_all(db.pool()).await.unwrap();
    assert_eq!(
        public_tables(db.pool()).await,
        Vec::<String>::new(),
        "down left tables behind"
    );
    let functions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
         WHERE n.nspname = 'public'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(functions, 0, "down left functions behind");

    keel_schema::migrate(db.pool()).await.unwrap();
    assert_eq!(public_tables(db.pool()).await, sorted_contract_tables());
}

#[tokio::test]
async fn every_down_migration_tolerates_objects_already_gone() {
    let db = keel_testkit::empty_database().await;
    for migration in keel_schema::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_down_migration())
    {
        sqlx::raw_sql(migration.sql.clone())
            .execute(db.pool())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "down migration {} is not IF EXISTS-safe: {e}",
                    migration.version
                )
            });
    }
}

#[tokio::test]
async fn the_reconcile_index_exists_under_its_contract_name() {
    let db = keel_testkit::database().await;
    let definition: String = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'rated_usage_window_start_ix'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(
        definition.ends_with("ON public.rated_usage USING btree (window_start)"),
        "{definition}"
    );
}

#[tokio::test]
async fn an_active_resource_must_be_addressable() {
    let db = keel_testkit::database().await;
    let team = pro_team(db.pool()).await;
    let insert = |status: &'static str, url: Option<&'static str>| {
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
             VALUES (gen_random_uuid(), gen_random_uuid()::text, $1, 'postgres', 'pro', $2, 'db_x', $3)",
        )
        .bind(team)
        .bind(status)
        .bind(url)
        .execute(db.pool())
    };
    let err = insert("active", None).await.unwrap_err();
    assert!(
        err.to_string().contains("resources_active_is_addressable"),
        "{err}"
    );
    insert("active", Some("postgres://x")).await.unwrap();
    insert("pending", None).await.unwrap();
    let err = insert("gone", None).await.unwrap_err();
    assert!(err.to_string().contains("resources_status_check"), "{err}");
}

#[tokio::test]
async fn rated_usage_windows_must_start_on_the_hour() {
    let db = keel_testkit::database().await;
    let insert = |at: &'static str| {
        sqlx::query(
            "INSERT INTO rated_usage (auth_id, meter, window_start, quantity, unit_price, amount, event_count) \
             VALUES ('a', 'm', $1::timestamptz, 1, 1, 1, 1)",
        )
        .bind(at)
        .execute(db.pool())
    };
    insert("2026-11-22T10:00:00Z").await.unwrap();
    // On the hour in UTC, whatever the offset it is written with.
    insert("2026-11-22T16:30:00+05:30").await.unwrap();
    let err = insert("2026-11-22T10:30:00Z").await.unwrap_err();
    assert!(
        err.to_string()
            .contains("rated_usage_window_start_on_the_hour"),
        "{err}"
    );
}

async fn uuid_row(pool: &PgPool, sql: &'static str) -> uuid::Uuid {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A service's own migrator, as `sqlx::migrate!()` in the service would build it: tracked in
/// sqlx's default table, with a version 1 of its own (a number Keel uses too).
/// A new `pro` team's id.
async fn pro_team(pool: &PgPool) -> uuid::Uuid {
    uuid_row(
        pool,
        "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro') RETURNING id",
    )
    .await
}

/// A resource's lifecycle, one status change per step (finalize, suspend, resume, deprovision),
/// each bound to the resource's id.
const LIFECYCLE_STEPS: [&str; 4] = [
    "UPDATE resources SET status = 'active', provider_resource_id = 'cust_x', \
            connection_url = 'postgres://h/cust_x', updated_at = now() WHERE id = $1",
    "UPDATE resources SET status = 'suspended', updated_at = now() WHERE id = $1",
    "UPDATE resources SET status = 'active', updated_at = now() WHERE id = $1",
    "UPDATE resources SET status = 'deleted', deleted_at = now(), connection_url = NULL, \
            updated_at = now() WHERE id = $1",
];

fn service_migrator() -> Migrator {
    Migrator::with_migrations(vec![
        Migration::new(
            1,
            "service widgets".into(),
            MigrationType::Simple,
            "CREATE TABLE service_widgets (id bigint PRIMARY KEY)".into_sql_str(),
            false,
        ),
        Migration::new(
            20_260_101_000_000,
            "service gadgets".into(),
            MigrationType::Simple,
            "CREATE TABLE service_gadgets (id bigint PRIMARY KEY)".into_sql_str(),
            false,
        ),
    ])
}

async fn versions(pool: &PgPool, table: &str) -> Vec<i64> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {table} ORDER BY version"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

fn keel_versions() -> Vec<i64> {
    let mut versions: Vec<i64> = keel_schema::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .collect();
    versions.dedup();
    versions
}

/// LIB-1: Keel's migrator and a service's own sqlx migrator share one database, in either
/// order, repeatedly, each with its own bookkeeping.
#[tokio::test]
async fn keel_schema_coexists_with_a_consumer_migrator() {
    let service = service_migrator();
    for keel_first in [true, false] {
        let db = keel_testkit::empty_database().await;
        for _ in 0..2 {
            if keel_first {
                keel_schema::migrate(db.pool()).await.unwrap();
                service.run(db.pool()).await.unwrap();
            } else {
                service.run(db.pool()).await.unwrap();
                keel_schema::migrate(db.pool()).await.unwrap();
            }
        }
        assert_eq!(
            versions(db.pool(), keel_schema::MIGRATIONS_TABLE).await,
            keel_versions()
        );
        assert_eq!(
            versions(db.pool(), "_sqlx_migrations").await,
            vec![1, 20_260_101_000_000],
            "the service's bookkeeping holds only the service's versions"
        );
        let applied: Option<i64> = sqlx::query_scalar(keel_schema::APPLIED_VERSION_SQL)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(applied, Some(keel_schema::latest_version()));
    }
}

/// The sightings an earlier release recorded one row per tick read the same through the
/// `orphan_sightings` view once runs are stored (migration 0096), and the same again after it
/// is reverted; a row left from an earlier period than its inventory's last tick is dropped (it
/// starts a new run: a longer burn-in, never a shorter one). A role that could read the table
/// can read the view, and one that could write it can write the period its rows now share.
#[tokio::test]
async fn recorded_sightings_read_the_same_across_the_move_to_runs_and_back() {
    let db = keel_testkit::empty_database().await;
    let mut before = Migrator::with_migrations(
        keel_schema::MIGRATOR
            .iter()
            .filter(|m| m.version < 96)
            .cloned()
            .collect(),
    );
    before.dangerous_set_table_name(keel_schema::MIGRATIONS_TABLE);
    before.run(db.pool()).await.unwrap();
    sqlx::query(
        "INSERT INTO orphan_sightings \
           (inventory, key, first_seen, last_period, reclaimable_since, consecutive, quarantined) VALUES \
         ('postgres', 'customer_database:' || repeat('a', 48), '2026-11-01Z', 500, '2026-11-02Z', 3, NULL), \
         ('postgres', 'customer_database:' || repeat('b', 48), '2026-11-01Z', 500, NULL, 0, NULL), \
         ('postgres', 'customer_database:' || repeat('c', 48), '2026-11-01Z', 500, '2026-11-03Z', 1, 'refused'), \
         ('postgres', 'customer_database:' || repeat('d', 48), '2026-11-01Z', 499, NULL, 0, NULL), \
         ('kubernetes', 'customer_namespace:' || repeat('e', 48), '2026-11-01Z', 42, '2026-11-02Z', 7, NULL)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let (reader, writer) = (
        format!("{}_reader", db.name()),
        format!("{}_writer", db.name()),
    );
    for sql in [
        format!("CREATE ROLE {reader}"),
        format!("CREATE ROLE {writer}"),
        format!("GRANT SELECT ON orphan_sightings TO {reader}"),
        format!("GRANT SELECT, INSERT, UPDATE, DELETE ON orphan_sightings TO {writer}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(db.pool())
            .await
            .unwrap();
    }
    let read = || async {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT concat_ws('|', inventory, key, first_seen, last_period, reclaimable_since, \
                              consecutive, quarantined) \
             FROM orphan_sightings ORDER BY inventory, key",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        rows
    };
    let mut expected = read().await;
    assert_eq!(expected.len(), 5);
    expected.retain(|row| !row.contains(&"d".repeat(48)));

    keel_schema::migrate(db.pool()).await.unwrap();
    assert_eq!(read().await, expected, "the view shows what the table held");
    for (role, relation, privilege, held) in [
        (&reader, "orphan_sightings", "SELECT", true),
        (&reader, "orphan_sweep_recorded", "UPDATE", false),
        (&writer, "orphan_sightings", "SELECT", true),
        (&writer, "orphan_sighting_runs", "INSERT", true),
        (&writer, "orphan_sweep_recorded", "UPDATE", true),
    ] {
        let has: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2, $3)")
            .bind(role)
            .bind(relation)
            .bind(privilege)
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(
            has,
            held,
            "{privilege} on {relation} for the role that could {}",
            if role == &reader { "read" } else { "write" }
        );
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM orphan_sighting_runs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(runs, 4);

    keel_schema::MIGRATOR.undo(db.pool(), 95).await.unwrap();
    assert_eq!(
        read().await,
        expected,
        "reverted, the table holds what the view showed"
    );
    keel_schema::migrate(db.pool()).await.unwrap();
    assert_eq!(read().await, expected);
    for role in [&reader, &writer] {
        for sql in [format!("DROP OWNED BY {role}"), format!("DROP ROLE {role}")] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(db.pool())
                .await
                .unwrap();
        }
    }
}

/// LIB-1: a database migrated by a Keel that tracked its versions in `_sqlx_migrations` (beside
/// a service's own rows) is taken over: Keel's rows move, the service's stay, no data is lost and
/// both migrators keep running.
#[tokio::test]
async fn existing_deployments_tracked_in_sqlx_migrations_keep_working() {
    let db = keel_testkit::empty_database().await;
    // The old bookkeeping: Keel's migrations in sqlx's default table.
    let legacy = Migrator::with_migrations(keel_schema::MIGRATOR.iter().cloned().collect());
    legacy.run(db.pool()).await.unwrap();
    sqlx::query("INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro')")
        .execute(db.pool())
        .await
        .unwrap();
    // A service row of its own in the same table (as a workaround would have left it).
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (20990101000000, 'service row', true, '\\x00', 0)",
    )
    .execute(db.pool())
    .await
    .unwrap();

    for _ in 0..2 {
        keel_schema::migrate(db.pool()).await.unwrap();
    }

    assert_eq!(
        versions(db.pool(), keel_schema::MIGRATIONS_TABLE).await,
        keel_versions()
    );
    assert_eq!(
        versions(db.pool(), "_sqlx_migrations").await,
        vec![20_990_101_000_000],
        "only the service's row stays in sqlx's table"
    );
    let teams: i64 = sqlx::query_scalar("SELECT count(*) FROM teams")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(teams, 1, "taking over the bookkeeping re-ran a migration");
}

/// FND-9: a migration that fails leaves no migration lock behind, so the next `migrate` (another
/// replica's, or this pool's again) runs instead of waiting forever.
#[tokio::test]
async fn a_failed_migrate_does_not_block_the_next_one() {
    let db = keel_testkit::empty_database().await;
    // A conflicting object makes one of the migrations fail.
    sqlx::query("CREATE TABLE io_log (id int)")
        .execute(db.pool())
        .await
        .unwrap();
    let first = keel_schema::migrate(db.pool()).await.unwrap_err();
    assert!(
        matches!(first, MigrateError::ExecuteMigration(..)),
        "{first}"
    );
    assert_eq!(
        db.advisory_locks_held().await,
        0,
        "the failed migrate kept its lock"
    );

    let second = keel_schema::migrate(db.pool()).await.unwrap_err();
    assert!(
        matches!(second, MigrateError::ExecuteMigration(..)),
        "{second}"
    );
    assert_eq!(db.advisory_locks_held().await, 0);

    sqlx::query("DROP TABLE io_log")
        .execute(db.pool())
        .await
        .unwrap();
    keel_schema::migrate(db.pool()).await.unwrap();
    assert_eq!(public_tables(db.pool()).await, sorted_contract_tables());
    assert_eq!(db.advisory_locks_held().await, 0);
}

/// Migrates an empty database, writes one row with `insert`, and checks that `revert_all` then
/// refuses naming `table`, and changes nothing: the row is still there, every table too, and the
/// migration lock is released.
async fn revert_refused_while(insert: &str, table: &'static str) {
    let db = keel_testkit::empty_database().await;
    keel_schema::migrate(db.pool()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(insert.to_owned()))
        .execute(db.pool())
        .await
        .unwrap();

    let refused = keel_schema::revert_all(db.pool()).await.unwrap_err();
    assert!(
        matches!(refused, keel_schema::RevertError::NotEmpty { table: t } if t == table),
        "{refused}"
    );
    let rows: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(rows, 1, "the refused revert erased {table}");
    assert_eq!(public_tables(db.pool()).await, sorted_contract_tables());
    assert_eq!(db.advisory_locks_held().await, 0);
}

/// FND-2: `revert_all` on a schema whose contract tables hold rows (an audit trail above all)
/// refuses and changes nothing.
#[tokio::test]
async fn reverting_a_schema_that_holds_audit_rows_refuses() {
    revert_refused_while(
        "INSERT INTO audit_events (kind, actor, attributes, occurred_at) \
         VALUES ('team.tier_changed', 'system:test', '{}', now())",
        "audit_events",
    )
    .await;
}

/// `revert_all` never drops the provisioning API's keys: while `provision_api.api_keys` holds a
/// key (every other table empty), it refuses and changes nothing.
#[tokio::test]
async fn reverting_a_schema_that_holds_api_keys_refuses() {
    revert_refused_while(
        "INSERT INTO provision_api.api_keys (id, secret_sha256, scope) \
         VALUES ('0123456789ab', sha256('s'::bytea), 'operator')",
        "provision_api.api_keys",
    )
    .await;
}

/// The text-format CHECKs migration 0092 restates without bounded repetition, each with the
/// pattern it replaced: (table, constraint, column, pattern).
const RESTATED_TEXT_CHECKS: [(&str, &str, &str, &str); 12] = [
    (
        "billing_event",
        "billing_event_event_id_printable",
        "event_id",
        "^[!-~]{1,128}$",
    ),
    (
        "billing_event",
        "billing_event_auth_id_printable",
        "auth_id",
        "^[!-~]{1,128}$",
    ),
    (
        "billing_event",
        "billing_event_meter_printable",
        "meter",
        "^[!-~]{1,64}$",
    ),
    (
        "billing_event",
        "billing_event_source_printable",
        "source",
        "^[!-~]{1,64}$",
    ),
    ("prices", "prices_meter_printable", "meter", "^[!-~]{1,64}$"),
    ("prices", "prices_currency_iso", "currency", "^[A-Z]{3}$"),
    (
        "rated_usage",
        "rated_usage_auth_id_printable",
        "auth_id",
        "^[!-~]{1,128}$",
    ),
    (
        "rated_usage",
        "rated_usage_meter_printable",
        "meter",
        "^[!-~]{1,64}$",
    ),
    (
        "reclaim_protections",
        "reclaim_protections_digest_format",
        "token_digest",
        "^[0-9a-f]{48}$",
    ),
    (
        "orphan_sighting_runs",
        "orphan_sighting_runs_key_check",
        "key",
        "^[a-z_]+:[0-9a-f]{48}$",
    ),
    (
        "notification_cursor",
        "notification_cursor_name_format",
        "name",
        "^[a-z0-9_-]{1,64}$",
    ),
    (
        "provision_api.api_keys",
        "api_keys_id_check",
        "id",
        "^[0-9a-f]{12}$",
    ),
];

/// Values on and around every edge of the restated CHECKs: each length bound, each class's
/// edges and its neighbours outside it, control characters, a trailing newline, multi-byte
/// characters (whose byte length differs from their character length), and digest keys.
fn format_check_corpus() -> Vec<String> {
    let digest = "0123456789abcdef".repeat(3);
    let mut corpus: Vec<String> = vec![
        String::new(),
        " ".into(),
        "a b".into(),
        "!".into(),
        "~".into(),
        "\u{7f}".into(),
        "\t".into(),
        "abc\n".into(),
        "\nabc".into(),
        "é".into(),
        "aé".into(),
        "USD".into(),
        "usd".into(),
        "US".into(),
        "USDX".into(),
        "ÉUR".into(),
        "0123456789ab".into(),
        "0123456789AB".into(),
        "0123456789abc".into(),
        "0123456789a".into(),
        "a-b_c9".into(),
        "a.b".into(),
        digest.clone(),
        digest.to_uppercase(),
        format!("{digest}0"),
        digest[1..].to_owned(),
        format!("database:{digest}"),
        format!("data_base:{digest}"),
        format!(":{digest}"),
        format!("Database:{digest}"),
        format!("database:{digest}0"),
        format!("database:{}", &digest[1..]),
        format!("a:b:{digest}"),
        format!("database:{}", digest.to_uppercase()),
        format!("database:{digest}\n"),
    ];
    for n in [1, 2, 47, 48, 49, 63, 64, 65, 127, 128, 129] {
        corpus.push("x".repeat(n));
        corpus.push("~".repeat(n));
        corpus.push("é".repeat(n));
        corpus.push(format!("{} ", "x".repeat(n.saturating_sub(1))));
        corpus.push(format!("{}é", "x".repeat(n.saturating_sub(1))));
    }
    corpus
}

/// The definition of constraint `name` of `table` (`CHECK (...)`, as the catalog prints it).
async fn constraint_definition(pool: &sqlx::PgPool, table: &str, name: &str) -> String {
    sqlx::query_scalar(
        "SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c \
         WHERE c.conname = $1 AND c.conrelid = to_regclass($2)",
    )
    .bind(name)
    .bind(table)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{table}.{name} is missing: {e}"))
}

/// The `values` (as text) on which `expression`, a CHECK's expression over the column
/// `column` of type `sql_type`, decides otherwise than `reference` (which may use `$2`, bound
/// to `extra`). A NULL from the CHECK counts as accepted, as a CHECK does.
async fn decided_otherwise(
    pool: &sqlx::PgPool,
    (column, sql_type): (&str, &str),
    expression: &str,
    reference: &str,
    values: &[String],
    extra: Option<&str>,
) -> Vec<String> {
    let sql = format!(
        "SELECT {column}::text FROM unnest($1::{sql_type}[]) AS v({column}) \
             WHERE coalesce({expression}, true) IS DISTINCT FROM ({reference})"
    );
    let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(values);
    if let Some(extra) = extra {
        query = query.bind(extra);
    }
    query.fetch_all(pool).await.unwrap()
}

#[tokio::test]
async fn the_restated_format_checks_accept_exactly_what_their_patterns_accepted() {
    let db = keel_testkit::database().await;
    let corpus = format_check_corpus();
    for (table, name, column, pattern) in RESTATED_TEXT_CHECKS {
        let definition = constraint_definition(db.pool(), table, name).await;
        assert!(
            !definition.contains('{'),
            "{name} still repeats a pattern a bounded number of times: {definition}"
        );
        let expression = definition
            .strip_prefix("CHECK ")
            .unwrap_or_else(|| panic!("{name} is not a CHECK: {definition}"));
        // The CHECK's own expression, evaluated over the corpus bound to its column's name.
        let differing = decided_otherwise(
            db.pool(),
            (column, "text"),
            expression,
            &format!("{column} ~ $2"),
            &corpus,
            Some(pattern),
        )
        .await;
        assert!(
            differing.is_empty(),
            "{name} decides these values differently from {pattern:?}: {differing:?}"
        );
    }
    let on_the_hour = constraint_definition(
        db.pool(),
        "rated_usage",
        "rated_usage_window_start_on_the_hour",
    )
    .await;
    let expression = on_the_hour.strip_prefix("CHECK ").unwrap();
    let times = [
        "2026-11-22T10:00:00Z",
        "2026-11-22T16:30:00+05:30",
        "2026-11-22T10:30:00Z",
        "2026-11-22T10:00:00.000001Z",
        "2026-11-22T09:59:59.999999Z",
        "2026-11-22T10:00:00-00:45",
        "1999-12-31T23:00:00Z",
        "1960-01-01T00:00:00Z",
        "1960-01-01T00:00:01Z",
        "2200-06-30T05:00:00Z",
    ];
    let times: Vec<String> = times.iter().map(|t| (*t).to_owned()).collect();
    let differing = decided_otherwise(
        db.pool(),
        ("window_start", "timestamptz"),
        expression,
        "extract(epoch FROM window_start) = floor(extract(epoch FROM window_start) / 3600) * 3600",
        &times,
        None,
    )
    .await;
    assert!(
        differing.is_empty(),
        "the on-the-hour CHECK decides these differently from the epoch arithmetic: {differing:?}"
    );
}

/// Every lifecycle step of a resource changes its `status` (finalize, suspend, resume,
/// deprovision): no index may mention the column, in its keys or its predicate, so that each step
/// is a heap-only update (one new row version, no new index entries) within the room `resources`
/// keeps on its pages.
#[tokio::test]
async fn a_status_change_of_a_resource_is_a_heap_only_update() {
    let db = keel_testkit::database().await;
    let indexing_status: Vec<String> = sqlx::query_scalar(
        "SELECT i.indexrelid::regclass::text FROM pg_index i \
         WHERE i.indrelid = 'resources'::regclass \
           AND ((SELECT attnum FROM pg_attribute \
                  WHERE attrelid = 'resources'::regclass AND attname = 'status') \
                  = ANY (i.indkey::int2[]) \
                OR pg_get_expr(i.indpred, i.indrelid) LIKE '%status%' \
                OR pg_get_expr(i.indexprs, i.indrelid) LIKE '%status%')",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert!(
        indexing_status.is_empty(),
        "these indexes make every status change write new index entries: {indexing_status:?}"
    );

    let team = pro_team(db.pool()).await;
    let mut tx = db.pool().begin().await.unwrap();
    let id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status) \
         VALUES (gen_random_uuid(), replace(gen_random_uuid()::text, '-', ''), $1, 'postgres', \
                 'pro', 'pending') RETURNING id",
    )
    .bind(team)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    for step in LIFECYCLE_STEPS {
        sqlx::query(step).bind(id).execute(&mut *tx).await.unwrap();
    }
    // This transaction's own counters: every update so far, and how many were heap-only.
    let (updated, heap_only): (i64, i64) = sqlx::query_as(
        "SELECT pg_stat_get_xact_tuples_updated('resources'::regclass), \
                pg_stat_get_xact_tuples_hot_updated('resources'::regclass)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!((updated, heap_only), (4, 4), "(updates, heap-only updates)");
}

/// Every audited write pays for each index of the trail, so each one must serve a lookup that is
/// made: this list names the reader of each. `event_uuid` in particular is never looked up (an
/// export's consumer keys on it in its own store) and its values are random, so indexing it put
/// every write's entry on a random page of an index as large as the trail.
#[tokio::test]
async fn every_index_of_the_audit_trail_serves_a_lookup_that_is_made() {
    let db = keel_testkit::database().await;
    let mut indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = 'audit_events'::regclass",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    indexes.sort();
    let served = [
        // `keel-audit list --actor`.
        "audit_events_actor_ix",
        // Commit order: sealing, verification, `keel-audit list`, the commit-order reader.
        "audit_events_commit_order_ix",
        // `keel-audit list --kind`.
        "audit_events_kind_commit_ix",
        // The runbooks' queries: one kind over a recent span of `occurred_at`.
        "audit_events_kind_ix",
        // (id, recorded_at): the primary key.
        "audit_events_pkey",
        // `keel-audit list --since/--until`; the console's recent page-severity rows.
        "audit_events_recorded_ix",
        // `keel-audit list --request-id`.
        "audit_events_request_ix",
        // `keel-audit list --resource`, the console's resource history.
        "audit_events_resource_ix",
        // `keel-audit list --team`.
        "audit_events_team_ix",
        // The deprovision chokepoint's "already recorded" check of a refused reclaim.
        "audit_events_token_fingerprint_ix",
    ];
    assert_eq!(
        indexes, served,
        "an index of the trail that no lookup uses, or one missing"
    );
    let on_event_uuid: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid \
         WHERE c.relname LIKE 'audit_events%' \
           AND (SELECT attnum FROM pg_attribute \
                 WHERE attrelid = i.indrelid AND attname = 'event_uuid') = ANY (i.indkey::int2[])",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        on_event_uuid, 0,
        "no partition of the trail indexes event_uuid"
    );
}

/// What `EXPLAIN (ANALYZE, WAL, FORMAT JSON)` reports for `statement` (which it runs): the WAL
/// records it wrote, and the row triggers it called with how many calls each.
async fn explained(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    bind: uuid::Uuid,
) -> (i64, Vec<(String, i64)>) {
    let sql = format!("EXPLAIN (ANALYZE, WAL, FORMAT JSON) {statement}");
    let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(bind)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    let top = &plan[0];
    let records = top["Plan"]["WAL Records"].as_i64().unwrap();
    let triggers = top["Triggers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            (
                t["Trigger Name"].as_str().unwrap().to_owned(),
                t["Calls"].as_i64().unwrap(),
            )
        })
        .collect();
    (records, triggers)
}

/// An update of a resource writes its new row version and nothing more: no trigger on
/// `resources` may make the server lock the row before it updates it (a BEFORE row trigger on
/// UPDATE does for every update of the table, whatever columns it names and whatever the trigger
/// then decides), so each lifecycle step and a propagation's tier landing is one WAL record.
/// The refusal to revive a terminal status still holds, with its error code.
#[tokio::test]
async fn an_update_of_a_resource_takes_no_row_lock_before_it_writes() {
    let db = keel_testkit::database().await;
    let team = pro_team(db.pool()).await;
    let id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status) \
         VALUES (gen_random_uuid(), replace(gen_random_uuid()::text, '-', ''), $1, 'postgres', \
                 'pro', 'pending') RETURNING id",
    )
    .bind(team)
    .fetch_one(db.pool())
    .await
    .unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    // The finalize flip, a propagation's tier landing, then the rest of the lifecycle.
    let tier_landing = "UPDATE resources SET tier = 'free', updated_at = now() WHERE id = $1";
    let (finalize, rest) = LIFECYCLE_STEPS.split_first().unwrap();
    for step in [finalize, &tier_landing].into_iter().chain(rest) {
        let (records, triggers) = explained(&mut conn, step, id).await;
        assert_eq!(
            (records, triggers),
            (1, vec![]),
            "(WAL records, row triggers called) for {step}"
        );
    }
    let refused = sqlx::query("UPDATE resources SET status = 'suspended' WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .unwrap_err();
    let code = refused.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("23514"), "{refused}");
    assert!(
        refused.to_string().contains("never changes status"),
        "{refused}"
    );
    let status: String = sqlx::query_scalar("SELECT status FROM resources WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(status, "deleted");
}

/// `insert`, whose column list and values each end in `{}`, as it is or naming one more column
/// with its value.
fn naming(insert: &str, column: Option<(&str, &str)>) -> String {
    let (column, value) = column.map_or((String::new(), String::new()), |(c, v)| {
        (format!(", {c}"), format!(", {v}"))
    });
    insert.replacen("{}", &column, 1).replacen("{}", &value, 1)
}

/// The row triggers that fill in a value (the audit row's `recorded_at`, a propagation's tier
/// epoch) are called only when the row needs it, and the rows stored are what they were when the
/// triggers ran on every row: the server's clock whatever an INSERT names, the team's epoch when
/// none is named, a named epoch kept.
#[tokio::test]
async fn filling_row_triggers_are_called_only_when_they_change_the_row() {
    let db = keel_testkit::database().await;
    let team = uuid_row(
        db.pool(),
        "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'free') RETURNING id",
    )
    .await;
    sqlx::query("UPDATE teams SET tier = 'pro' WHERE id = $1")
        .bind(team)
        .execute(db.pool())
        .await
        .unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    let audit = "INSERT INTO audit_events (kind, actor, team_id, occurred_at{}) \
                 VALUES ('provision.created', 'system', $1, now(){})";
    let (_, unnamed) = explained(&mut tx, &naming(audit, None), team).await;
    assert_eq!(unnamed, vec![], "nothing to stamp");
    let earlier = Some(("recorded_at", "now() - interval '1 microsecond'"));
    let (_, named) = explained(&mut tx, &naming(audit, earlier), team).await;
    assert_eq!(named, vec![("audit_events_stamp".to_owned(), 1)]);
    let stamped: Vec<bool> = sqlx::query_scalar(
        "SELECT recorded_at = now() FROM audit_events WHERE team_id = $1 ORDER BY id",
    )
    .bind(team)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        stamped,
        vec![true, true],
        "every row stamped with the server's clock"
    );

    let propagation = "INSERT INTO pending_propagations \
                         (kind, team_id, resource_id, resource_type{}) \
                       VALUES ('tier_elevation', $1, gen_random_uuid(), 'postgres'{})";
    let (_, unnamed) = explained(&mut tx, &naming(propagation, None), team).await;
    assert_eq!(
        unnamed,
        vec![("pending_propagations_tier_epoch".to_owned(), 1)],
        "an epoch to take"
    );
    let (_, named) = explained(
        &mut tx,
        &naming(propagation, Some(("tier_epoch", "7"))),
        team,
    )
    .await;
    assert_eq!(named, vec![], "an epoch named");
    let epochs: Vec<i64> = sqlx::query_scalar(
        "SELECT tier_epoch FROM pending_propagations WHERE team_id = $1 ORDER BY id",
    )
    .bind(team)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(epochs, vec![1, 7], "the team's epoch, then the named one");
    tx.rollback().await.unwrap();
}

/// Each inventory's sweep state carries the id of the last transaction that changed it: any
/// INSERT, UPDATE, DELETE or TRUNCATE of its sighting runs, and any write of its own row, even
/// one that names the old generation, moves it to the writing transaction; a write of one
/// inventory's runs leaves the other's generation alone.
#[tokio::test]
async fn the_sweep_states_generation_is_the_last_transaction_that_changed_it() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    sqlx::query(
        "INSERT INTO orphan_sweep_recorded (inventory, last_period, generation) \
         VALUES ('postgres', 1, 7), ('kubernetes', 1, 7)",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let run = |c: char| format!("'customer_database:{}'", c.to_string().repeat(48));
    let writes = [
        (
            format!(
                "INSERT INTO orphan_sighting_runs (inventory, key, first_seen) \
                 VALUES ('postgres', {}, now()), ('postgres', {}, now())",
                run('a'),
                run('b')
            ),
            "postgres",
        ),
        (
            format!(
                "UPDATE orphan_sighting_runs SET quarantined = 'by hand' WHERE key = {}",
                run('a')
            ),
            "postgres",
        ),
        (
            format!("DELETE FROM orphan_sighting_runs WHERE key = {}", run('a')),
            "postgres",
        ),
        (
            "UPDATE orphan_sweep_recorded SET generation = generation, last_period = 2 \
             WHERE inventory = 'kubernetes'"
                .to_owned(),
            "kubernetes",
        ),
        ("TRUNCATE orphan_sighting_runs".to_owned(), "both"),
    ];
    for (write, changed) in writes {
        let before: Vec<(String, i64)> = sqlx::query_as(
            "SELECT inventory, generation FROM orphan_sweep_recorded ORDER BY inventory",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(write.clone()))
            .execute(&mut *conn)
            .await
            .unwrap();
        let writer: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        sqlx::query("COMMIT").execute(&mut *conn).await.unwrap();
        let after: Vec<(String, i64)> = sqlx::query_as(
            "SELECT inventory, generation FROM orphan_sweep_recorded ORDER BY inventory",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        for ((inventory, old), (_, new)) in before.iter().zip(&after) {
            if changed == "both" || changed == inventory {
                assert_eq!(
                    *new, writer,
                    "{write}: {inventory} is not stamped by its writer"
                );
            } else {
                assert_eq!(new, old, "{write}: {inventory} moved");
            }
        }
    }
}

/// Every column of a timestamp type in Keel's tables (the contract tables and the provisioning
/// API's) with the table it belongs to, as `(table, column)`.
async fn keel_time_columns(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT CASE WHEN n.nspname = 'public' THEN c.relname::text \
                     ELSE n.nspname || '.' || c.relname END, a.attname::text \
         FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype) AND a.attnum > 0 \
           AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
           AND (n.nspname = 'provision_api' \
                OR (n.nspname = 'public' AND c.relname = ANY ($1))) \
         ORDER BY 1, 2",
    )
    .bind(keel_schema::CONTRACT_TABLES)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// A time Keel stores is one every reader can decode and print (year 1 to 9999, UTC): the
/// client library panics decoding an infinity or a year past 9999, and RFC 3339 has no year
/// before 1, so one such value written by another service stopped a work loop for every tenant.
/// Every timestamp column of Keel's tables refuses them on write, a column added later included.
#[tokio::test]
async fn every_stored_time_is_one_its_readers_can_decode() {
    let db = keel_testkit::empty_database().await;
    keel_schema::migrate(db.pool()).await.unwrap();
    let columns = keel_time_columns(db.pool()).await;
    assert!(
        columns.len() > 40,
        "the catalog query found the time columns: {columns:?}"
    );
    let expected = "CHECK (((COL >= '0001-01-01 00:00:00+00'::timestamp with time zone) AND (COL <= '9999-12-31 23:59:59.999999+00'::timestamp with time zone)))";
    for (table, column) in &columns {
        let bare = table.rsplit('.').next().unwrap();
        let definition =
            constraint_definition(db.pool(), table, &format!("{bare}_{column}_in_range")).await;
        assert_eq!(
            definition.replace(" NOT VALID", ""),
            expected.replace("COL", column),
            "{table}.{column}"
        );
    }

    // Written by hand, as another service could: each out-of-range value is refused (23514).
    let team: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro') RETURNING id",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    for value in [
        "infinity",
        "-infinity",
        "10000-01-01 00:00:00+00",
        "0001-12-31 23:00:00+00 BC",
    ] {
        for sql in [
            "UPDATE teams SET updated_at = $1::timestamptz WHERE id = $2",
            "INSERT INTO audit_events (kind, actor, occurred_at, team_id) \
             VALUES ('team.tier_changed', 'service:other', $1::timestamptz, $2)",
            "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
             VALUES ($2::text, 'a', 'm', 1, $1::timestamptz)",
        ] {
            let refused = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(value)
                .bind(team)
                .execute(db.pool())
                .await
                .expect_err(&format!("{value} stored by: {sql}"));
            assert_eq!(
                keel_testkit::sqlstate(&refused).as_deref(),
                Some("23514"),
                "{value} by {sql}: {refused}"
            );
        }
    }
    // The range's ends are stored and read back.
    for value in ["0001-01-01 00:00:00+00", "9999-12-31 23:59:59.999999+00"] {
        sqlx::query("UPDATE teams SET updated_at = $1::timestamptz WHERE id = $2")
            .bind(value)
            .bind(team)
            .execute(db.pool())
            .await
            .unwrap();
        let read: time::OffsetDateTime =
            sqlx::query_scalar("SELECT updated_at FROM teams WHERE id = $1")
                .bind(team)
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert!((1..=9999).contains(&read.year()), "{value} read as {read}");
    }
}

/// A row already holding an unreadable time fails migration 0099 with the table and column
/// named and a query to find it, and the schema is left as it was, to be migrated again once
/// the row is corrected.
#[tokio::test]
async fn an_unreadable_time_already_stored_is_named_by_the_migration() {
    let db = keel_testkit::empty_database().await;
    let mut before = Migrator::with_migrations(
        keel_schema::MIGRATOR
            .iter()
            .filter(|m| m.version < 99)
            .cloned()
            .collect(),
    );
    before.dangerous_set_table_name(keel_schema::MIGRATIONS_TABLE);
    before.run(db.pool()).await.unwrap();
    sqlx::query(
        "INSERT INTO teams (id, tier, updated_at) VALUES (gen_random_uuid(), 'pro', 'infinity')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let refused = keel_schema::migrate(db.pool())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("teams.updated_at holds a time outside year 1 to 9999"),
        "{refused}"
    );
    assert_eq!(
        versions(db.pool(), keel_schema::MIGRATIONS_TABLE)
            .await
            .last(),
        Some(&98)
    );
    sqlx::query("UPDATE teams SET updated_at = now()")
        .execute(db.pool())
        .await
        .unwrap();
    keel_schema::migrate(db.pool()).await.unwrap();
    assert_eq!(
        versions(db.pool(), keel_schema::MIGRATIONS_TABLE).await,
        keel_versions(),
        "every migration from 0099 on applied"
    );
}
