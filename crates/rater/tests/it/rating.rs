//! Rating, reconcile, the exit contract, single flight and the reconcile index.

use std::io::Write;
use std::sync::{Arc, Mutex};

use keel_rater::postgres::{
    Ingested, RATE_APPLY, RunOutcome, RunRequest, SingleFlight, rate_window, record_event, run,
};
use keel_rater::{BillingEvent, RaterExit, resolve_window};
use rust_decimal::Decimal;
use sqlx::PgPool;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const H0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);
/// The run's clock: long after the hours rated, so they are all closed.
const NOW: OffsetDateTime = datetime!(2026-11-21 12:30 UTC);

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

async fn price(pool: &PgPool, meter: &str, from: OffsetDateTime, unit: &str) {
    sqlx::query(
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ($1, $2, $3::numeric)",
    )
    .bind(meter)
    .bind(from)
    .bind(unit)
    .execute(pool)
    .await
    .unwrap();
}

async fn event(
    pool: &PgPool,
    id: &str,
    auth: &str,
    meter: &str,
    qty: i64,
    at: OffsetDateTime,
) -> Ingested {
    let event = BillingEvent::new(id, auth, meter, Decimal::from(qty), at, NOW).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    record_event(&mut conn, &event).await.unwrap()
}

/// Two auth ids over three hours, with a price change at 02:00.
async fn fixture(pool: &PgPool) {
    price(pool, "requests", datetime!(2026-01-01 00:00 UTC), "0.001").await;
    price(pool, "requests", H0 + Duration::hours(2), "0.002").await;
    event(
        pool,
        "e1",
        "auth-a",
        "requests",
        10,
        H0 + Duration::minutes(5),
    )
    .await;
    event(
        pool,
        "e2",
        "auth-a",
        "requests",
        5,
        H0 + Duration::minutes(59),
    )
    .await;
    event(
        pool,
        "e3",
        "auth-a",
        "requests",
        100,
        H0 + Duration::hours(2),
    )
    .await;
    event(
        pool,
        "e4",
        "auth-b",
        "requests",
        7,
        H0 + Duration::minutes(90),
    )
    .await;
}

fn window(hours: i64) -> keel_rater::Window {
    resolve_window(Some(H0), Some(H0 + Duration::hours(hours)), NOW, false)
        .unwrap()
        .0
}

async fn rated(pool: &PgPool) -> Vec<(String, OffsetDateTime, Decimal)> {
    sqlx::query_as(
        "SELECT auth_id, window_start, amount FROM rated_usage ORDER BY auth_id, window_start",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn rate(pool: &PgPool, hours: i64) -> keel_rater::RateReport {
    let mut tx = pool.begin().await.unwrap();
    let report = rate_window(&mut tx, window(hours), NOW).await.unwrap();
    tx.commit().await.unwrap();
    report
}

#[tokio::test]
async fn hours_are_priced_with_the_price_effective_at_their_start() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    let report = rate(db.pool(), 3).await;
    assert_eq!(report.inserted.count, 3);
    assert_eq!(
        rated(db.pool()).await,
        vec![
            ("auth-a".into(), H0, dec("0.015")),
            ("auth-a".into(), H0 + Duration::hours(2), dec("0.200")),
            ("auth-b".into(), H0 + Duration::hours(1), dec("0.007")),
        ]
    );
}

#[tokio::test]
async fn an_unchanged_rerun_writes_zero_rows() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    rate(db.pool(), 3).await;
    let versions = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT string_agg(xmin::text, ',' ORDER BY id) FROM rated_usage",
        )
        .fetch_one(db.pool())
        .await
        .unwrap()
    };
    let before = versions().await;
    let report = rate(db.pool(), 3).await;
    assert!(
        report.inserted.is_empty() && report.updated.is_empty() && report.losses() == 0,
        "{report:?}"
    );
    assert_eq!(report.unchanged, 3);
    assert_eq!(versions().await, before, "an unchanged row was rewritten");
}

#[tokio::test]
async fn a_duplicate_event_id_is_counted_once() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    assert_eq!(
        event(
            db.pool(),
            "e1",
            "auth-a",
            "requests",
            10,
            H0 + Duration::minutes(5)
        )
        .await,
        Ingested::Duplicate
    );
    rate(db.pool(), 1).await;
    assert_eq!(
        rated(db.pool()).await[0].2,
        dec("0.015"),
        "the duplicate was counted"
    );
}

#[tokio::test]
async fn a_late_event_inside_the_window_is_rated_by_the_next_run() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    rate(db.pool(), 3).await;
    event(
        db.pool(),
        "late",
        "auth-b",
        "requests",
        3,
        H0 + Duration::minutes(70),
    )
    .await;
    let report = rate(db.pool(), 3).await;
    assert_eq!(report.updated.count, 1);
    let new = report.updated.details[0].new.clone().unwrap();
    assert_eq!(new.amount.as_deref(), Some("0.01"));
}

#[tokio::test]
async fn hours_are_utc_whatever_the_session_time_zone() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    let mut tx = db.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL TimeZone = 'Asia/Kolkata'")
        .execute(&mut *tx)
        .await
        .unwrap();
    rate_window(&mut tx, window(3), NOW).await.unwrap();
    tx.commit().await.unwrap();
    let hours: Vec<OffsetDateTime> = rated(db.pool()).await.into_iter().map(|r| r.1).collect();
    assert_eq!(
        hours,
        vec![H0, H0 + Duration::hours(2), H0 + Duration::hours(1)]
    );
}

/// Captures log lines for the duration of a test (current-thread runtime).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn rate_run(db: &keel_testkit::TestDatabase, explicit: bool) -> (RunOutcome, String) {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let request = RunRequest {
        window: window(3),
        explicit,
        dry_run: false,
        now: NOW,
    };
    let outcome = run(db.pool(), &db.connect_options(), request)
        .await
        .unwrap();
    (outcome, logs.text())
}

async fn delete_event(pool: &PgPool, id: &str) {
    sqlx::query("DELETE FROM billing_event WHERE event_id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn routine_reconcile_delete_exits_2_with_an_error_line_naming_the_keys() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    assert_eq!(rate_run(&db, false).await.0.exit, RaterExit::Clean);
    delete_event(db.pool(), "e4").await;
    let (outcome, logs) = rate_run(&db, false).await;
    assert_eq!(outcome.exit, RaterExit::Attention);
    assert_eq!(outcome.exit.code(), 2);
    let error = logs
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no ERROR line:\n{logs}"));
    assert!(
        error.contains("auth-b/requests@2026-11-20T01:00:00Z"),
        "{error}"
    );
    let audit: Vec<String> = sqlx::query_scalar("SELECT kind FROM audit_events")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(audit, vec!["rater.reconcile_deleted"]);
}

#[tokio::test]
async fn backfill_reconcile_delete_exits_0_with_info_and_no_error_line() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    rate_run(&db, true).await;
    delete_event(db.pool(), "e4").await;
    let (outcome, logs) = rate_run(&db, true).await;
    assert_eq!(outcome.exit, RaterExit::Clean);
    assert_eq!(outcome.report.unwrap().deleted.count, 1);
    assert!(
        !logs.contains("ERROR"),
        "a backfill logged an ERROR:\n{logs}"
    );
    assert!(
        logs.lines()
            .any(|l| l.contains("INFO") && l.contains("backfill reconciled")),
        "{logs}"
    );
}

#[tokio::test]
async fn an_anomaly_during_a_backfill_still_exits_nonzero() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    event(
        db.pool(),
        "e5",
        "auth-a",
        "gpu_seconds",
        60,
        H0 + Duration::minutes(10),
    )
    .await;
    let (outcome, logs) = rate_run(&db, true).await;
    assert_eq!(outcome.exit, RaterExit::Attention);
    assert_eq!(outcome.report.unwrap().unpriced.count, 1);
    assert!(logs.contains("no effective price"), "{logs}");
}

#[tokio::test]
async fn a_second_concurrent_rater_exits_3_and_writes_nothing() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    // Another rater is mid-run: it holds the single-flight lock on its own connection.
    let other = SingleFlight::try_acquire(&db.connect_options())
        .await
        .unwrap()
        .unwrap();
    let (outcome, _) = rate_run(&db, false).await;
    assert_eq!(outcome.exit, RaterExit::Locked);
    assert_eq!(outcome.exit.code(), 3);
    assert!(rated(db.pool()).await.is_empty());
    let skipped: Vec<(Option<i16>, bool)> =
        sqlx::query_as("SELECT exit_code, finished_at IS NOT NULL FROM rater_runs")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(
        skipped,
        vec![(Some(3), true)],
        "RATER-M4: a skipped run is recorded, closed, with exit 3"
    );

    other.release().await.unwrap();
    let (outcome, _) = rate_run(&db, false).await;
    assert_eq!(outcome.exit, RaterExit::Clean);
    let (exit, inserted): (i16, i64) =
        sqlx::query_as("SELECT exit_code, inserted FROM rater_runs WHERE exit_code <> 3")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((exit, inserted), (0, 3), "the run ledger records the run");
}

#[tokio::test]
async fn a_dry_run_reports_the_diff_and_writes_nothing() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    let request = RunRequest {
        window: window(3),
        explicit: true,
        dry_run: true,
        now: NOW,
    };
    let outcome = run(db.pool(), &db.connect_options(), request)
        .await
        .unwrap();
    let report = outcome.report.unwrap();
    assert_eq!(report.inserted.count, 3);
    let first = report.inserted.details[0].new.clone().unwrap();
    assert_eq!(first.amount.as_deref(), Some("0.015"));
    assert!(rated(db.pool()).await.is_empty());
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM rater_runs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(runs, 0);
}

async fn reconcile_plan(pool: &PgPool) -> String {
    let sql = format!("EXPLAIN {RATE_APPLY}");
    let mut tx = pool.begin().await.unwrap();
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(H0 + Duration::hours(100))
        .bind(H0 + Duration::hours(124))
        .bind(NOW)
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    lines.join("\n")
}

#[tokio::test]
async fn the_reconcile_delete_uses_the_window_start_index_and_would_not_without_it() {
    let db = keel_testkit::database().await;
    // 50 auth ids x 200 hours = 10 000 rated rows, at default planner settings.
    sqlx::query(
        "INSERT INTO rated_usage (auth_id, meter, window_start, quantity, unit_price, amount, event_count) \
         SELECT 'auth-' || a, 'requests', $1 + make_interval(hours => h), 1, 1, 1, 1 \
         FROM generate_series(1, 50) a, generate_series(0, 199) h",
    )
    .bind(H0)
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query("ANALYZE rated_usage")
        .execute(db.pool())
        .await
        .unwrap();
    let plan = reconcile_plan(db.pool()).await;
    assert!(
        plan.contains("rated_usage_window_start_ix"),
        "the reconcile does not use the index:\n{plan}"
    );

    sqlx::query("DROP INDEX rated_usage_window_start_ix")
        .execute(db.pool())
        .await
        .unwrap();
    let without = reconcile_plan(db.pool()).await;
    assert!(
        !without.contains("rated_usage_window_start_ix"),
        "{without}"
    );
}

#[tokio::test]
async fn two_concurrent_raters_exactly_one_writes_and_the_other_exits_3() {
    let db = keel_testkit::database().await;
    fixture(db.pool()).await;
    // Hold the first rater inside its rating statement: it has taken the single-flight lock and
    // is waiting on `prices`.
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE prices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let request = RunRequest {
        window: window(3),
        explicit: false,
        dry_run: false,
        now: NOW,
    };
    let first = {
        let (pool, options) = (db.pool().clone(), db.connect_options());
        tokio::spawn(async move { run(&pool, &options, request).await.unwrap() })
    };
    // Wait until the first rater holds the lock (it is in pg_locks) before starting the second.
    let mut held = false;
    for _ in 0..400 {
        held = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if held {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(held, "the first rater never took the single-flight lock");

    let second = run(db.pool(), &db.connect_options(), request)
        .await
        .unwrap();
    assert_eq!(second.exit, RaterExit::Locked);
    assert!(second.report.is_none());

    blocker.rollback().await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.exit, RaterExit::Clean);
    assert_eq!(first.report.unwrap().inserted.count, 3);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM rater_runs WHERE exit_code <> 3")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(runs, 1, "exactly one rater wrote");
}
