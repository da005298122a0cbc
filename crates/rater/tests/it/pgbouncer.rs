//! The rater behind a real PgBouncer (Debian's `pgbouncer` package): in transaction pooling it
//! refuses at start, naming the fix, and leaves nothing held; in session pooling it works.

use keel_rater::postgres::{RaterError, RunRequest, run};
use keel_rater::{BillingEvent, RaterExit, resolve_window};
use keel_testkit::pgbouncer::Bouncer;
use rust_decimal::Decimal;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const H0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);
const NOW: OffsetDateTime = datetime!(2026-11-21 12:30 UTC);

fn request() -> RunRequest {
    RunRequest {
        window: resolve_window(Some(H0), Some(H0 + Duration::hours(3)), NOW, false)
            .unwrap()
            .0,
        explicit: false,
        dry_run: false,
        now: NOW,
    }
}

/// RATER-H5b: behind PgBouncer in transaction mode the lock landed on a pooled backend, the
/// unlock on another, and every run failed on prepared statements. Now the rater refuses at
/// start with the fix, leaves no lock behind, and works in session pooling and directly.
#[tokio::test]
async fn behind_pgbouncer_transaction_pooling_the_rater_refuses_and_session_pooling_works() {
    let db = keel_testkit::database().await;
    sqlx::query(
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('requests', '2020-01-01Z', 0.001)",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let event = BillingEvent::new(
        "e1",
        "acme",
        "requests",
        Decimal::TEN,
        H0 + Duration::minutes(5),
        NOW,
    )
    .unwrap();
    keel_rater::postgres::record_event(&mut db.pool().acquire().await.unwrap(), &event)
        .await
        .unwrap();
    let bouncer = Bouncer::start(&db.connect_options(), db.name()).await;
    let without_password = PgConnectOptions::new_without_pgpass()
        .host("127.0.0.1")
        .port(bouncer.port())
        .username("postgres")
        .database("session");
    assert!(
        sqlx::PgConnection::connect_with(&without_password)
            .await
            .is_err(),
        "PgBouncer lets a client in without the password"
    );

    let tx_options = bouncer.options("tx");
    let tx_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(tx_options.clone());
    let refused = run(&tx_pool, &tx_options, request()).await;
    let err = refused.expect_err("a transaction-pooled rater must refuse");
    assert!(matches!(err, RaterError::PoolerDetected), "{err}");
    let message = err.to_string();
    assert!(message.contains("pool_mode = transaction"), "{message}");
    assert!(message.contains("KEEL_RATER_DIRECT_URL"), "{message}");
    tx_pool.close().await;

    let held = db.advisory_locks_held().await;
    assert_eq!(
        held, 0,
        "the refused run left its lock held behind the pooler"
    );
    let rated: i64 = sqlx::query_scalar("SELECT count(*) FROM rated_usage")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rated, 0);

    let session_options = bouncer.options("session");
    let session_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_lazy_with(session_options.clone());
    let outcome = run(&session_pool, &session_options, request())
        .await
        .unwrap();
    assert_eq!(outcome.exit, RaterExit::Clean);
    assert_eq!(outcome.report.unwrap().inserted.count, 1);
    session_pool.close().await;
}
