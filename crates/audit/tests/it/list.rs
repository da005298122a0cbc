//! `keel_audit::list` as the application role: every filter narrows, filters combine, and paging
//! by the commit-order cursor never skips a row that commits after a later-numbered one.

use std::time::Duration;

use keel_audit::list::{ListQuery, list};
use keel_audit::postgres::{CommitCursor, insert};
use keel_audit::{Actor, AuditKind, RequestId};
use sqlx::{Acquire as _, PgConnection};

use crate::sample;

/// Every row after `after` matching `query`, page by page (`limit` per page), waiting for
/// transactions of other tests that hold the commit horizon back.
async fn all(conn: &mut PgConnection, query: &ListQuery, expected: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut query = query.clone();
    for _ in 0..1200 {
        let (page, next) = list(conn, &query).await.unwrap();
        ids.extend(page.into_iter().map(|l| l.row.unwrap().id.0));
        query.after = next;
        if ids.len() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ids
}

#[tokio::test]
async fn a_row_that_commits_late_is_listed_after_the_cursor_not_skipped() {
    let db = keel_testkit::role_split_database().await;
    let mut writer = db.app().acquire().await.unwrap();
    let mut late = writer.begin().await.unwrap();
    let early_id = insert(&mut late, &sample(AuditKind::ProvisionCreated, 1))
        .await
        .unwrap()
        .0;
    let mut other = db.app().acquire().await.unwrap();
    let later_id = insert(&mut other, &sample(AuditKind::ProvisionCreated, 2))
        .await
        .unwrap()
        .0;
    assert!(early_id < later_id);
    let mut reader = db.app().acquire().await.unwrap();
    let (page, cursor) = list(&mut reader, &ListQuery::default()).await.unwrap();
    assert!(
        page.is_empty(),
        "a row is not listed before an older transaction that may still write finishes"
    );
    late.commit().await.unwrap();
    let query = ListQuery {
        after: cursor,
        limit: Some(1),
        ..ListQuery::default()
    };
    assert_eq!(all(&mut reader, &query, 2).await, [early_id, later_id]);
}

#[tokio::test]
async fn each_filter_narrows_and_filters_combine() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    let first = sample(AuditKind::ProvisionCreated, 1);
    let second = sample(AuditKind::ResourceDeprovisioned, 2);
    let by_alice = keel_audit::AuditEvent::new(
        AuditKind::ResourceDeprovisioned,
        Actor::parse("alice").unwrap(),
        first.occurred_at(),
    )
    .team(first.team_id().unwrap())
    .request(RequestId::parse("req-alice").unwrap());
    let ids: Vec<i64> = {
        let mut ids = Vec::new();
        for event in [&first, &second, &by_alice] {
            ids.push(insert(&mut app, event).await.unwrap().0);
        }
        ids
    };
    let everything = all(&mut app, &ListQuery::default(), 3).await;
    assert_eq!(everything, ids);

    let cases = [
        (
            ListQuery {
                kind: Some(AuditKind::ResourceDeprovisioned),
                ..ListQuery::default()
            },
            vec![ids[1], ids[2]],
        ),
        (
            ListQuery {
                team_id: first.team_id(),
                ..ListQuery::default()
            },
            vec![ids[0], ids[2]],
        ),
        (
            ListQuery {
                team_id: first.team_id(),
                kind: Some(AuditKind::ResourceDeprovisioned),
                ..ListQuery::default()
            },
            vec![ids[2]],
        ),
        (
            ListQuery {
                resource_id: second.resource_id(),
                ..ListQuery::default()
            },
            vec![ids[1]],
        ),
        (
            ListQuery {
                actor: Some(Actor::parse("alice").unwrap()),
                ..ListQuery::default()
            },
            vec![ids[2]],
        ),
        (
            ListQuery {
                request_id: Some(RequestId::parse("req-2").unwrap()),
                ..ListQuery::default()
            },
            vec![ids[1]],
        ),
        (
            ListQuery {
                since: Some(time::OffsetDateTime::now_utc() + time::Duration::days(1)),
                ..ListQuery::default()
            },
            vec![],
        ),
        (
            ListQuery {
                since: Some(time::OffsetDateTime::now_utc() - time::Duration::days(1)),
                until: Some(time::OffsetDateTime::now_utc() + time::Duration::days(1)),
                ..ListQuery::default()
            },
            ids.clone(),
        ),
        (
            ListQuery {
                after: CommitCursor::START,
                until: Some(time::OffsetDateTime::now_utc() - time::Duration::days(1)),
                ..ListQuery::default()
            },
            vec![],
        ),
    ];
    for (query, expected) in cases {
        let (page, _) = list(&mut app, &query).await.unwrap();
        let got: Vec<i64> = page.into_iter().map(|l| l.row.unwrap().id.0).collect();
        assert_eq!(got, expected, "{query:?}");
    }
}
