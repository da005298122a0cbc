//! Work proportional to change: routine runs rate only the groups whose change markers are
//! visible, and never lose usage whose writer commits after a run started.

use keel_rater::postgres::{RunOutcome, RunRequest, record_events, run};
use keel_rater::{BillingEvent, RaterExit, resolve_window};
use rust_decimal::Decimal;
use sqlx::{Connection, PgPool};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const H0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);
const NOW: OffsetDateTime = datetime!(2026-11-21 12:30 UTC);

fn ev(id: &str, auth: &str, qty: i64, at: OffsetDateTime) -> BillingEvent {
    BillingEvent::new(id, auth, "requests", Decimal::from(qty), at, NOW).unwrap()
}

async fn ingest(pool: &PgPool, events: &[BillingEvent]) {
    let mut conn = pool.acquire().await.unwrap();
    record_events(&mut conn, events).await.unwrap();
}

async fn set_price(pool: &PgPool, from: OffsetDateTime, unit: &str) {
    sqlx::query(
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('requests', $1, $2::numeric)",
    )
    .bind(from)
    .bind(unit)
    .execute(pool)
    .await
    .unwrap();
}

/// A routine run over [H0, H0 + 6 h).
async fn routine(db: &keel_testkit::TestDatabase) -> RunOutcome {
    let request = RunRequest {
        window: resolve_window(Some(H0), Some(H0 + Duration::hours(6)), NOW, false)
            .unwrap()
            .0,
        explicit: false,
        dry_run: false,
        now: NOW,
    };
    run(db.pool(), &db.connect_options(), request)
        .await
        .unwrap()
}

async fn markers(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM rating_change")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn rated_quantities(pool: &PgPool) -> Vec<(String, i64, String)> {
    sqlx::query_as(
        "SELECT auth_id, extract(hour FROM window_start AT TIME ZONE 'UTC')::bigint, \
                quantity::text FROM rated_usage ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Three auth ids in three hours, priced, rated once (the price's whole-window marker makes
/// the first routine run a whole-window one).
async fn rated_fixture(db: &keel_testkit::TestDatabase) {
    set_price(db.pool(), datetime!(2026-01-01 00:00 UTC), "0.001").await;
    let events: Vec<BillingEvent> = (0..9)
        .map(|i| {
            ev(
                &format!("e{i}"),
                &format!("auth-{}", i % 3),
                1 + i,
                H0 + Duration::minutes(5 + 60 * (i % 3)),
            )
        })
        .collect();
    ingest(db.pool(), &events).await;
    let first = routine(db).await;
    assert_eq!(first.exit, RaterExit::Clean);
    let report = first.report.unwrap();
    assert_eq!(report.inserted.count, 3);
    assert_eq!(markers(db.pool()).await, 0, "the run consumed its markers");
}

#[tokio::test]
async fn an_unchanged_routine_rerun_looks_at_no_group_and_writes_nothing() {
    let db = keel_testkit::database().await;
    rated_fixture(&db).await;
    let rerun = routine(&db).await;
    assert_eq!(rerun.exit, RaterExit::Clean);
    let report = rerun.report.unwrap();
    assert_eq!(report.rows_written(), 0);
    assert_eq!(
        report.unchanged, 0,
        "a routine re-run compared groups nobody changed"
    );
    // A backfill still compares every hour of its window.
    let request = RunRequest {
        window: resolve_window(Some(H0), Some(H0 + Duration::hours(6)), NOW, false)
            .unwrap()
            .0,
        explicit: true,
        dry_run: false,
        now: NOW,
    };
    let backfill = run(db.pool(), &db.connect_options(), request)
        .await
        .unwrap();
    assert_eq!(backfill.report.unwrap().unchanged, 3);
}

#[tokio::test]
async fn a_routine_run_rates_exactly_the_changed_groups() {
    let db = keel_testkit::database().await;
    rated_fixture(&db).await;
    ingest(
        db.pool(),
        &[ev("late-1", "auth-1", 100, H0 + Duration::minutes(70))],
    )
    .await;
    let report = routine(&db).await.report.unwrap();
    assert_eq!(report.updated.count, 1);
    assert_eq!(report.unchanged, 0);
    assert_eq!(report.updated.details[0].key.auth_id, "auth-1");
    let rows = rated_quantities(db.pool()).await;
    assert!(
        rows.contains(&("auth-1".to_owned(), 1, "115".to_owned())),
        "{rows:?}"
    );
}

/// The marker is written in the event's transaction: an event whose transaction is still open
/// while a run rates its hour (here with an `ingested_at` three hours old, as a long ingest
/// transaction would leave it) is neither rated nor lost; the run after its commit rates it. A
/// watermark on `ingested_at` or on the last run's start would skip it for ever.
#[tokio::test]
async fn usage_committed_after_a_run_started_is_rated_by_the_next_run() {
    let db = keel_testkit::database().await;
    rated_fixture(&db).await;
    let mut writer = sqlx::PgConnection::connect_with(&db.connect_options())
        .await
        .unwrap();
    let mut open = writer.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at, ingested_at) \
         VALUES ('slow-1', 'auth-2', 'requests', 40, $1, now() - interval '3 hours')",
    )
    .bind(H0 + Duration::minutes(130))
    .execute(&mut *open)
    .await
    .unwrap();

    let during = routine(&db).await;
    assert_eq!(during.exit, RaterExit::Clean);
    assert_eq!(during.report.unwrap().rows_written(), 0);
    open.commit().await.unwrap();

    let after = routine(&db).await;
    assert_eq!(after.exit, RaterExit::Clean);
    let report = after.report.unwrap();
    assert_eq!(report.updated.count, 1, "{report:?}");
    let rows = rated_quantities(db.pool()).await;
    assert!(
        rows.contains(&("auth-2".to_owned(), 2, "58".to_owned())),
        "{rows:?}"
    );
    assert_eq!(markers(db.pool()).await, 0);
}

/// A price change touches no event, yet every hour it prices must be re-rated.
#[tokio::test]
async fn a_price_change_rerates_the_whole_window_once() {
    let db = keel_testkit::database().await;
    rated_fixture(&db).await;
    set_price(db.pool(), H0 + Duration::hours(1), "0.002").await;
    let repriced = routine(&db).await.report.unwrap();
    assert_eq!(repriced.updated.count, 2, "{repriced:?}");
    assert_eq!(repriced.unchanged, 1);
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM rating_change_all")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(pending, 0, "the whole-window marker was not consumed");
    assert_eq!(routine(&db).await.report.unwrap().unchanged, 0);
}

/// Deleting events marks their groups, so a routine run finds the loss and pages.
#[tokio::test]
async fn a_deleted_event_is_reconciled_by_a_routine_run_and_pages() {
    let db = keel_testkit::database().await;
    rated_fixture(&db).await;
    sqlx::query("DELETE FROM billing_event WHERE event_id = 'e0'")
        .execute(db.pool())
        .await
        .unwrap();
    let outcome = routine(&db).await;
    assert_eq!(outcome.exit.code(), 2);
    assert_eq!(outcome.report.unwrap().lowered.count, 1);
}

/// A duplicate (already recorded, so not inserted) leaves no marker; a new event leaves one per
/// group of its statement.
#[tokio::test]
async fn only_inserted_events_leave_markers() {
    let db = keel_testkit::database().await;
    let batch = [
        ev("m1", "auth-a", 1, H0 + Duration::minutes(1)),
        ev("m2", "auth-a", 1, H0 + Duration::minutes(2)),
        ev("m3", "auth-b", 1, H0 + Duration::minutes(3)),
    ];
    ingest(db.pool(), &batch).await;
    assert_eq!(markers(db.pool()).await, 2);
    ingest(db.pool(), &batch).await;
    assert_eq!(markers(db.pool()).await, 2);
}

/// A run that rolls back (here: the rating statement fails on a bad price table) consumes no
/// marker, so the next run still rates the change.
#[tokio::test]
async fn a_failed_run_keeps_its_markers() {
    let db = keel_testkit::database().await;
    rated_fixture(&db).await;
    ingest(
        db.pool(),
        &[ev("x1", "auth-0", 5, H0 + Duration::minutes(9))],
    )
    .await;
    assert_eq!(markers(db.pool()).await, 1);
    sqlx::query("ALTER TABLE rated_usage RENAME TO rated_usage_away")
        .execute(db.pool())
        .await
        .unwrap();
    let request = RunRequest {
        window: resolve_window(Some(H0), Some(H0 + Duration::hours(6)), NOW, false)
            .unwrap()
            .0,
        explicit: false,
        dry_run: false,
        now: NOW,
    };
    assert!(
        run(db.pool(), &db.connect_options(), request)
            .await
            .is_err()
    );
    sqlx::query("ALTER TABLE rated_usage_away RENAME TO rated_usage")
        .execute(db.pool())
        .await
        .unwrap();
    assert_eq!(markers(db.pool()).await, 1);
    let report = routine(&db).await.report.unwrap();
    assert_eq!(report.updated.count, 1);
}

async fn price_for(pool: &PgPool, meter: &str, unit: &str) {
    sqlx::query(
        "INSERT INTO prices (meter, effective_from, unit_price) \
         VALUES ($1, '2026-01-01 00:00+00', $2::numeric)",
    )
    .bind(meter)
    .bind(unit)
    .execute(pool)
    .await
    .unwrap();
}

/// Usage left unrated (an hour with no price, an hour out of the money range) pages on every
/// routine run until it is rated, never only on the first: the run that reports it gives its
/// change marker back. An hour that goes out of range keeps its last rated row (never deleted
/// without an audit row), and a price arriving later rates the unpriced hour.
#[tokio::test]
async fn usage_left_unrated_pages_on_every_run_until_it_is_rated() {
    let db = keel_testkit::database().await;
    price_for(db.pool(), "big", "999999").await;
    let big = |id: &str, qty: &str| {
        BillingEvent::new(
            id,
            "auth-big",
            "big",
            qty.parse::<Decimal>().unwrap(),
            H0 + Duration::minutes(10),
            NOW,
        )
        .unwrap()
    };
    ingest(db.pool(), &[big("b1", "1")]).await;
    assert_eq!(routine(&db).await.exit, RaterExit::Clean);
    let rated: String = sqlx::query_scalar("SELECT amount::text FROM rated_usage")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rated, "999999");

    let unpriced = BillingEvent::new(
        "g1",
        "auth-gpu",
        "gpu_seconds",
        Decimal::from(60),
        H0 + Duration::minutes(20),
        NOW,
    )
    .unwrap();
    ingest(db.pool(), &[unpriced, big("b2", "999999999999999")]).await;
    for run in 1..=3 {
        let outcome = routine(&db).await;
        assert_eq!(outcome.exit, RaterExit::Attention, "run {run}");
        let report = outcome.report.unwrap();
        assert_eq!(
            (report.unpriced.count, report.out_of_range.count),
            (1, 1),
            "run {run}"
        );
        let kept: Vec<String> = sqlx::query_scalar("SELECT amount::text FROM rated_usage")
            .fetch_all(db.pool())
            .await
            .unwrap();
        assert_eq!(kept, ["999999"], "run {run}: the billed row is kept");
    }

    price_for(db.pool(), "gpu_seconds", "0.5").await;
    sqlx::query("DELETE FROM billing_event WHERE event_id = 'b2'")
        .execute(db.pool())
        .await
        .unwrap();
    let fixed = routine(&db).await;
    assert_eq!(fixed.exit, RaterExit::Clean);
    assert_eq!(routine(&db).await.exit, RaterExit::Clean);
    let amounts: Vec<(String, String)> =
        sqlx::query_as("SELECT meter, amount::text FROM rated_usage ORDER BY meter")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        amounts,
        [
            ("big".to_owned(), "999999".to_owned()),
            ("gpu_seconds".to_owned(), "30".to_owned())
        ]
    );
}
