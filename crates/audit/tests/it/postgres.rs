//! The Postgres adapter: audit rows commit or roll back with the caller's state change, and the
//! table is append-only.

use keel_audit::postgres::{AuditFilter, fetch, insert, insert_batch};
use keel_audit::{AuditKind, ResourceId, TeamId};
use sqlx::PgPool;
use uuid::Uuid;

use crate::sample;

async fn audit_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn teams(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM teams")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_event_written_in_a_rolled_back_transaction_leaves_no_row() {
    let db = keel_testkit::database().await;
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
        .bind(Uuid::new_v4())
        .execute(&mut *tx)
        .await
        .unwrap();
    insert(&mut tx, &sample(AuditKind::TeamTierChanged, 1))
        .await
        .unwrap();
    insert_batch(&mut tx, &[sample(AuditKind::TeamTierChanged, 2)])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        audit_rows(db.pool()).await,
        0,
        "audit row survived its rolled-back state change"
    );
    assert_eq!(teams(db.pool()).await, 0);
}

#[tokio::test]
async fn an_event_commits_together_with_its_state_change() {
    let db = keel_testkit::database().await;
    let team = TeamId::new_random();
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
        .bind(team.as_uuid())
        .execute(&mut *tx)
        .await
        .unwrap();
    let event = sample(AuditKind::TeamTierChanged, 1).team(team);
    let id = insert(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();

    let mut conn = db.pool().acquire().await.unwrap();
    let stored = fetch(
        &mut conn,
        &AuditFilter {
            team_id: Some(team),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, id);
    assert_eq!(stored[0].event, event);
    assert_eq!(teams(db.pool()).await, 1);
}

#[tokio::test]
async fn a_failing_audit_insert_aborts_the_state_change_with_it() {
    let db = keel_testkit::database().await;
    // A CHECK constraint the adapter never violates; forcing one proves the caller's
    // transaction cannot commit the state change without its audit row.
    sqlx::query("ALTER TABLE audit_events ADD CONSTRAINT test_refuse CHECK (actor <> 'keel-test')")
        .execute(db.pool())
        .await
        .unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
        .bind(Uuid::new_v4())
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = insert(&mut tx, &sample(AuditKind::TeamTierChanged, 1))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("failed to insert an audit event"),
        "{err}"
    );
    // Postgres has aborted the transaction: even a caller that ignores the error and commits
    // cannot persist the state change without its audit row.
    let _ = tx.commit().await;
    assert_eq!(
        teams(db.pool()).await,
        0,
        "the state change committed without its audit row"
    );
}

#[tokio::test]
async fn update_delete_and_truncate_on_audit_events_are_refused_by_the_database() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    insert(&mut conn, &sample(AuditKind::ResourceDeprovisioned, 1))
        .await
        .unwrap();
    for sql in [
        "UPDATE audit_events SET actor = 'someone-else'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let err = sqlx::query(sql).execute(&mut *conn).await.unwrap_err();
        let message = err.to_string();
        assert!(message.contains("append-only"), "{sql}: {message}");
    }
    assert_eq!(audit_rows(db.pool()).await, 1);
}

#[tokio::test]
async fn batches_keep_their_order_and_filters_select_by_resource_and_kind() {
    let db = keel_testkit::database().await;
    let resource = ResourceId::new_random();
    let events: Vec<_> = (0..50)
        .map(|n| {
            let kind = if n % 2 == 0 {
                AuditKind::PropagationRetrying
            } else {
                AuditKind::PropagationUnexpectedSkip
            };
            sample(kind, n).resource(resource)
        })
        .collect();
    let mut conn = db.pool().acquire().await.unwrap();
    assert_eq!(insert_batch(&mut conn, &events).await.unwrap(), 50);
    insert(&mut conn, &sample(AuditKind::PropagationRetrying, 99))
        .await
        .unwrap();

    let for_resource = fetch(
        &mut conn,
        &AuditFilter {
            resource_id: Some(resource),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got: Vec<_> = for_resource.iter().map(|s| s.event.clone()).collect();
    assert_eq!(got, events);

    let skips = fetch(
        &mut conn,
        &AuditFilter {
            resource_id: Some(resource),
            kind: Some(AuditKind::PropagationUnexpectedSkip),
            limit: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(skips.len(), 10);
    assert!(
        skips
            .iter()
            .all(|s| s.event.kind() == AuditKind::PropagationUnexpectedSkip)
    );
    let next = fetch(
        &mut conn,
        &AuditFilter {
            resource_id: Some(resource),
            after: Some(skips[9].id),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        next.len(),
        50 - 20,
        "paging with `after` resumes past the last row seen"
    );
}

#[tokio::test]
async fn a_row_with_an_unknown_kind_is_reported_not_guessed() {
    let db = keel_testkit::database().await;
    sqlx::query(
        "INSERT INTO audit_events (kind, actor, occurred_at) VALUES ('future.kind', 'system', now())",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let err = fetch(&mut conn, &AuditFilter::default()).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown audit kind \"future.kind\""),
        "{err}"
    );
}
