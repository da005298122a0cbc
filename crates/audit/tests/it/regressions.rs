//! One regression test per keel-audit defect (FND-5, FND-8, FND-11, FND-13), each named for the
//! invariant it pins, against a real Postgres.

use keel_audit::MemoryAuditSink;
use keel_audit::postgres::{
    AuditFilter, CommitCursor, fetch, fetch_committed_after, fetch_rows, insert, insert_batch,
};
use keel_audit::{AuditKind, AuditSink};
use sqlx::{Acquire, Connection, PgConnection};

use crate::sample;

/// FND-5: a reader tailing in commit order sees a row whose transaction began first but
/// committed last, exactly once, while a reader paging by id skips it.
#[tokio::test]
async fn a_cursor_reader_sees_every_committed_row_exactly_once() {
    let db = keel_testkit::database().await;
    let mut slow = PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();
    let mut reader = db.pool().acquire().await.unwrap();

    let mut slow_tx = Connection::begin(&mut slow).await.unwrap();
    let late = insert(&mut slow_tx, &sample(AuditKind::PropagationApplied, 1))
        .await
        .unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    let early = insert(&mut tx, &sample(AuditKind::PropagationApplied, 2))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(late < early, "the long transaction took the lower id");

    // While the long transaction runs, the commit-order reader waits for it.
    let (seen, cursor) = fetch_committed_after(&mut reader, CommitCursor::START, 100)
        .await
        .unwrap();
    assert!(seen.is_empty(), "{seen:?}");
    // The id-order reader moves past the long transaction's id.
    let by_id = fetch(&mut reader, &AuditFilter::default()).await.unwrap();
    assert_eq!(by_id.iter().map(|r| r.id).collect::<Vec<_>>(), [early]);

    slow_tx.commit().await.unwrap();
    // Transactions of other tests on the same server hold the horizon back for a moment: poll
    // one row at a time until both arrived (each poll returns only finished transactions).
    let mut delivered = Vec::new();
    let mut cursor = cursor;
    for _ in 0..1200 {
        let (rows, next) = fetch_committed_after(&mut reader, cursor, 1).await.unwrap();
        delivered.extend(rows.into_iter().map(|r| r.unwrap().id));
        cursor = next;
        if delivered.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (rest, _) = fetch_committed_after(&mut reader, cursor, 100)
        .await
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(delivered, [late, early], "each row once, in commit order");
    let after_early = fetch(
        &mut reader,
        &AuditFilter {
            after: Some(early),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(
        after_early.is_empty(),
        "paging by id never returns the late row: the reason for the cursor"
    );
}

/// FND-8: a row this build cannot read (a newer release's kind, a non-string attribute, an
/// attribute today's screen would refuse) does not hide the rest of its page.
#[tokio::test]
async fn one_unreadable_row_does_not_hide_its_page() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    insert(&mut conn, &sample(AuditKind::PropagationApplied, 1))
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO audit_events (kind, actor, occurred_at) \
           VALUES ('team.tier_downgraded', 'system', now()); \
         INSERT INTO audit_events (kind, actor, attributes, occurred_at) \
           VALUES ('propagation.applied', 'Legacy Actor', \
                   '{\"detail\": \"the bearer of this certificate\"}', now())",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    insert(&mut conn, &sample(AuditKind::PropagationApplied, 2))
        .await
        .unwrap();

    let rows = fetch_rows(&mut conn, &AuditFilter::default())
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    assert!(
        rows[0].is_ok() && rows[2].is_ok() && rows[3].is_ok(),
        "{rows:?}"
    );
    let err = rows[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("team.tier_downgraded"), "{err}");
    let legacy = rows[2].as_ref().unwrap();
    assert_eq!(legacy.event.actor().as_str(), "Legacy Actor");
    assert_eq!(
        legacy.event.attributes().get("detail"),
        Some("the bearer of this certificate")
    );

    // A non-string attribute value is refused for new rows by the database itself.
    let err = sqlx::query(
        "INSERT INTO audit_events (kind, actor, attributes, occurred_at) \
         VALUES ('propagation.applied', 'system', '{\"attempt\": 1}', now())",
    )
    .execute(&mut *conn)
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("audit_events_attribute_values_are_strings"),
        "{err}"
    );
}

/// FND-8: a failed read says it failed to read, not that "nothing was recorded".
#[tokio::test]
async fn a_failed_read_is_reported_as_a_read() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let mut tx = conn.begin().await.unwrap();
    sqlx::query("DROP TABLE audit_events CASCADE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let err = fetch(&mut tx, &AuditFilter::default()).await.unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("read audit events"), "{shown}");
    assert!(!shown.contains("nothing was recorded"), "{shown}");
}

/// FND-11: the fake and Postgres accept the same attributes: a NUL is replaced before either
/// store sees it, so it can never abort the caller's transaction, and what the builder accepts,
/// Postgres stores and the transaction commits.
#[tokio::test]
async fn the_fake_and_postgres_refuse_the_same_attributes() {
    let db = keel_testkit::database().await;
    let event = sample(AuditKind::PropagationRetrying, 1)
        .attr("detail", "backend said: bad\0byte")
        .unwrap()
        .attr(
            "note",
            "tab\there, bell \u{7}, emoji 🦀, quote \" and backslash \\",
        )
        .unwrap();
    let fake = MemoryAuditSink::new();
    fake.record(&event).await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    insert(&mut tx, &event).await.unwrap();
    tx.commit().await.unwrap();
    let mut conn = db.pool().acquire().await.unwrap();
    let stored = fetch(&mut conn, &AuditFilter::default()).await.unwrap();
    assert_eq!(
        stored.len(),
        1,
        "the commit reported success without the row"
    );
    assert_eq!(stored[0].event, fake.events()[0]);
}

/// FND-13: a trigger that swallows rows makes `insert_batch` fail instead of reporting a short
/// write the caller ignores, so the state change rolls back with it.
#[tokio::test]
async fn insert_batch_fails_unless_every_event_is_stored() {
    let db = keel_testkit::database().await;
    sqlx::raw_sql(
        "CREATE FUNCTION swallow_second() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.attributes->>'n' = '2' THEN RETURN NULL; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER swallow BEFORE INSERT ON audit_events \
         FOR EACH ROW EXECUTE FUNCTION swallow_second()",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    let err = insert_batch(
        &mut tx,
        &[
            sample(AuditKind::PropagationApplied, 1),
            sample(AuditKind::PropagationApplied, 2),
        ],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("insert a batch"), "{err}");
    let stored = insert_batch(&mut tx, &[sample(AuditKind::PropagationApplied, 3)])
        .await
        .unwrap();
    assert_eq!(stored, 1);
}
