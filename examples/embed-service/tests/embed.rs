//! The embedding service against a real Postgres: Keel's migrations and the service's own share
//! one database in either order, repeatedly; an upgrade written in the service's transaction
//! reaches the service's backend through Keel's runner, and an unexpected skip from that backend
//! is never recorded as success.

use std::sync::Arc;

use keel_audit::{TeamId, Tier};
use keel_embed_service::{Order, QuotaApplier, audit_trail, migrate, run_once, sign_up, upgrade};
use keel_propagation::postgres::TierChange;
use sqlx::PgPool;

fn tier(name: &str) -> Tier {
    Tier::parse(name).unwrap()
}

async fn versions(pool: &PgPool, table: &str) -> Vec<i64> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT version FROM {table} WHERE success ORDER BY version"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn kinds(pool: &PgPool, team: TeamId) -> Vec<String> {
    audit_trail(pool, team)
        .await
        .unwrap()
        .iter()
        .map(|stored| stored.event.kind().as_str().to_owned())
        .collect()
}

/// LIB-1: both migrators, in either order, three times over, on one database.
#[tokio::test]
async fn keel_and_the_service_migrate_one_database_in_either_order_repeatedly() {
    for (first, then) in [
        (Order::KeelFirst, Order::ServiceFirst),
        (Order::ServiceFirst, Order::KeelFirst),
    ] {
        let db = keel_testkit::empty_database().await;
        for order in [first, first, then] {
            migrate(db.pool(), order)
                .await
                .unwrap_or_else(|e| panic!("{order:?} after {first:?}: {e}"));
        }
        assert_eq!(versions(db.pool(), "_sqlx_migrations").await, [1, 2]);
        let keel = versions(db.pool(), keel_schema::MIGRATIONS_TABLE).await;
        assert_eq!(keel.last().copied(), Some(keel_schema::latest_version()));
        assert!(keel.starts_with(&[1, 2]), "{keel:?}");
        let note: Option<String> = sqlx::query_scalar("SELECT note FROM service_upgrades LIMIT 1")
            .fetch_optional(db.pool())
            .await
            .unwrap()
            .flatten();
        assert_eq!(
            note, None,
            "the service's table exists, with its second migration"
        );
    }
}

/// LIB-8 / LIB-3 from the outside: the upgrade's transaction enqueues; the runner applies what
/// the service's backend applied and retries what it skipped unexpectedly.
#[tokio::test]
async fn an_upgrade_reaches_the_backend_and_an_unexpected_skip_is_never_success() {
    let db = keel_testkit::empty_database().await;
    migrate(db.pool(), Order::ServiceFirst).await.unwrap();
    let (landed_team, landed) = sign_up(db.pool(), &tier("hobby")).await.unwrap();
    let (skipped_team, skipped) = sign_up(db.pool(), &tier("hobby")).await.unwrap();
    for team in [landed_team, skipped_team] {
        let change = upgrade(db.pool(), team, &tier("pro")).await.unwrap();
        assert!(
            matches!(&change, TierChange::Changed { enqueued, .. } if enqueued.len() == 1),
            "{change:?}"
        );
    }

    let applier = Arc::new(QuotaApplier::default());
    applier.forget(skipped);
    let report = run_once(db.pool(), Arc::clone(&applier)).await.unwrap();
    assert_eq!(
        (report.claimed, report.applied, report.unexpected_skips),
        (2, 1, 1)
    );
    assert_eq!(applier.applied(), [landed]);

    assert_eq!(
        kinds(db.pool(), landed_team).await,
        ["team.tier_changed", "propagation.applied"]
    );
    assert_eq!(
        kinds(db.pool(), skipped_team).await,
        ["team.tier_changed", "propagation.unexpected_skip"]
    );
    let tiers: Vec<(String, String)> = sqlx::query_as(
        "SELECT token, tier FROM resources WHERE id = ANY($1) ORDER BY id = $2 DESC",
    )
    .bind(vec![landed.as_uuid(), skipped.as_uuid()])
    .bind(landed.as_uuid())
    .fetch_all(db.pool())
    .await
    .unwrap();
    let tiers: Vec<&str> = tiers.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(tiers, ["pro", "hobby"], "only the applied resource moved");
    let upgrades: i64 = sqlx::query_scalar("SELECT count(*) FROM service_upgrades")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        upgrades, 2,
        "the service's own rows committed with the tier changes"
    );
}
