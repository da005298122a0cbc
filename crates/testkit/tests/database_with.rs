//! LIB-19: a service embedding Keel gets test databases holding Keel's migrations and its own,
//! from one template, and typed ids from the helpers.

static SERVICE: sqlx::migrate::Migrator = sqlx::migrate!("tests/service_migrations");

#[tokio::test]
async fn database_with_holds_keel_and_the_service_migrations_and_typed_ids() {
    let db = keel_testkit::database_with(&[&SERVICE]).await;
    let keel: Option<i64> = sqlx::query_scalar(keel_schema::APPLIED_VERSION_SQL)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(keel, Some(keel_schema::latest_version()));
    let service: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(service, [1]);

    // A typed team id, usable by the service's own tables.
    let team: keel_audit::TeamId = db.team_id("pro").await;
    sqlx::query("INSERT INTO widgets (id, team_id) VALUES (gen_random_uuid(), $1)")
        .bind(team.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();

    // The next database is a fresh copy of the same template: the schema, none of the rows.
    let next = keel_testkit::database_with(&[&SERVICE]).await;
    assert_ne!(next.name(), db.name());
    let widgets: i64 = sqlx::query_scalar("SELECT count(*) FROM widgets")
        .fetch_one(next.pool())
        .await
        .unwrap();
    assert_eq!(widgets, 0);
}
