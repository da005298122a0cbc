//! The schema against a real Postgres: up, down and up again; the contract names exist.

use sqlx::PgPool;

async fn public_tables(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
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
    let team = uuid_row(
        db.pool(),
        "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro') RETURNING id",
    )
    .await;
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
