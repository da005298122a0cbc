//! Regression tests for the rater's money, loss, late-data, single-flight and ledger guarantees
//! (RATER-H1 … H5, M1 … M6), against a real Postgres.

use keel_rater::postgres::{
    Ingested, RaterError, RunOutcome, RunRequest, record_event, record_events, run, run_until,
};
use keel_rater::{BillingEvent, RaterExit, resolve_window};
use rust_decimal::Decimal;
use sqlx::PgPool;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const H0: OffsetDateTime = datetime!(2026-11-20 00:00 UTC);
const NOW: OffsetDateTime = datetime!(2026-11-21 12:30 UTC);

async fn exec(pool: &PgPool, sql: &'static str) -> Result<u64, sqlx::Error> {
    sqlx::query(sql)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

async fn event(pool: &PgPool, id: &str, auth: &str, qty: &str, at: OffsetDateTime) {
    let event = BillingEvent::new(id, auth, "requests", qty.parse().unwrap(), at, NOW).unwrap();
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        record_event(&mut conn, &event).await.unwrap(),
        Ingested::Recorded
    );
}

async fn base_price(pool: &PgPool) {
    exec(
        pool,
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('requests', '2020-01-01Z', 0.001)",
    )
    .await
    .unwrap();
}

fn request(hours: i64, explicit: bool) -> RunRequest {
    RunRequest {
        window: resolve_window(Some(H0), Some(H0 + Duration::hours(hours)), NOW, false)
            .unwrap()
            .0,
        explicit,
        dry_run: false,
        now: NOW,
    }
}

/// A routine run of the window from `hours_back` hours after `H0` to 36 hours after it.
fn routine(hours_back: i64) -> RunRequest {
    RunRequest {
        window: resolve_window(
            Some(H0 + Duration::hours(hours_back)),
            Some(H0 + Duration::hours(36)),
            NOW,
            false,
        )
        .unwrap()
        .0,
        explicit: false,
        dry_run: false,
        now: NOW,
    }
}

async fn go(db: &keel_testkit::TestDatabase, hours: i64, explicit: bool) -> RunOutcome {
    run(db.pool(), &db.connect_options(), request(hours, explicit))
        .await
        .unwrap()
}

async fn audit_rows(pool: &PgPool) -> Vec<(String, serde_json::Value)> {
    sqlx::query_as("SELECT kind, attributes FROM audit_events ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn amounts(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT auth_id, amount::text FROM rated_usage ORDER BY auth_id, meter, window_start",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// RATER-H1: a tiny price and a many-decimals quantity used to fail the whole day's rating
/// (`amount` not representable); now the value is bounded where it is stored and amounts are
/// rounded in SQL, so the other rows are rated.
#[tokio::test]
async fn no_event_or_price_value_can_fail_the_rating_of_other_rows() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    exec(
        db.pool(),
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('tiny', '2020-01-01Z', 0.000000001)",
    )
    .await
    .unwrap();
    // The tables refuse what the Rust validation refuses.
    for refused in [
        "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
         VALUES ('x1', 'acme', 'tiny', 0.0000000000000000000000000001, '2026-11-20T00:10Z')",
        "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
         VALUES ('x2', 'acme', 'tiny', 1e15, '2026-11-20T00:10Z')",
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('p', '2020-01-01Z', 0.0000000001)",
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('p', '2020-01-01Z', 1000000)",
    ] {
        let err = sqlx::query(refused).execute(db.pool()).await.unwrap_err();
        assert!(
            err.to_string().contains("check constraint"),
            "{refused}: {err}"
        );
    }
    let tiny = "0.000001".parse().unwrap();
    let e = BillingEvent::new("t1", "acme", "tiny", tiny, H0 + Duration::minutes(10), NOW).unwrap();
    record_event(&mut db.pool().acquire().await.unwrap(), &e)
        .await
        .unwrap();
    // The largest accepted quantity at the largest accepted price: 10^15 units at 999999.
    exec(
        db.pool(),
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('huge', '2020-01-01Z', 999999.999999999)",
    )
    .await
    .unwrap();
    for i in 0..3 {
        let q = "999999999999999.999999".parse().unwrap();
        let e = BillingEvent::new(
            &format!("h{i}"),
            "acme",
            "huge",
            q,
            H0 + Duration::minutes(20),
            NOW,
        )
        .unwrap();
        record_event(&mut db.pool().acquire().await.unwrap(), &e)
            .await
            .unwrap();
    }
    event(db.pool(), "ok", "other", "5", H0 + Duration::minutes(30)).await;
    let outcome = go(&db, 1, true).await;
    let report = outcome.report.unwrap();
    assert_eq!(report.inserted.count, 2, "{report:?}");
    assert_eq!(
        report.out_of_range.count, 1,
        "the huge hour is flagged, not fatal"
    );
    assert_eq!(outcome.exit, RaterExit::Attention);
    assert_eq!(
        amounts(db.pool()).await,
        vec![
            ("acme".into(), "0".into()), // 0.000001 * 0.000000001 rounds to 0 at 9 places
            ("other".into(), "0.005".into()),
        ]
    );
}

/// RATER-H2: ids the Rust validation refuses (non-ASCII, spaces, empty, too long) are refused by
/// the table as well, so no stored id can reach the audit truncation.
#[tokio::test]
async fn billing_event_rejects_what_billing_event_new_rejects() {
    let db = keel_testkit::database().await;
    for (auth, meter) in [
        (format!("a{}", "é".repeat(600)), "requests".to_owned()),
        ("two words".to_owned(), "requests".to_owned()),
        (String::new(), "requests".to_owned()),
        ("a".repeat(129), "requests".to_owned()),
        ("acme".to_owned(), "m".repeat(65)),
    ] {
        assert!(
            BillingEvent::new("e1", &auth, &meter, Decimal::ONE, H0, NOW).is_err(),
            "{auth}/{meter}"
        );
        let err = sqlx::query(
            "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
             VALUES ('e1', $1, $2, 1, $3)",
        )
        .bind(&auth)
        .bind(&meter)
        .bind(H0)
        .execute(db.pool())
        .await
        .unwrap_err();
        assert!(err.to_string().contains("check constraint"), "{err}");
    }
}

/// RATER-H3: deleting one of two events in a billed hour used to exit 0 silently.
#[tokio::test]
async fn a_routine_run_that_lowers_a_rated_hour_exits_2_with_an_audit_row() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "10", H0 + Duration::minutes(5)).await;
    event(db.pool(), "e2", "acme", "5", H0 + Duration::minutes(50)).await;
    assert_eq!(go(&db, 2, false).await.exit, RaterExit::Clean);
    exec(db.pool(), "DELETE FROM billing_event WHERE event_id = 'e1'")
        .await
        .unwrap();
    let outcome = go(&db, 2, false).await;
    assert_eq!(outcome.exit.code(), 2);
    let report = outcome.report.unwrap();
    assert_eq!(report.lowered.count, 1);
    let change = &report.lowered.details[0];
    assert_eq!(
        change.old.as_ref().unwrap().amount.as_deref(),
        Some("0.015")
    );
    assert_eq!(
        change.new.as_ref().unwrap().amount.as_deref(),
        Some("0.005")
    );
    let audit = audit_rows(db.pool()).await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].0, "rater.reconcile_deleted");
    let lowered = audit[0].1["lowered"].as_str().unwrap();
    assert!(
        lowered.contains("15 units/2 events = 0.015 USD -> 5 units/1 events = 0.005 USD"),
        "{lowered}"
    );
    assert_eq!(audit[0].1["lowered_count"], "1");
    assert_eq!(audit[0].1["window_start"], "2026-11-20T00:00:00Z");

    // The same change under an explicit backfill is quiet, and still audited.
    exec(db.pool(), "DELETE FROM billing_event WHERE event_id = 'e2'")
        .await
        .unwrap();
    event(db.pool(), "e3", "acme", "1", H0 + Duration::minutes(7)).await;
    let backfill = go(&db, 2, true).await;
    assert_eq!(backfill.exit, RaterExit::Clean);
    assert_eq!(backfill.report.unwrap().lowered.count, 1);
    let audit = audit_rows(db.pool()).await;
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[1].0, "rater.backfill_reconciled");
}

/// RATER-H4: an event ingested two days after its hour used to be accepted and never rated.
#[tokio::test]
async fn an_event_ingested_after_its_hour_left_the_window_is_rated_or_flagged() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "on-time", "acme", "1", H0 + Duration::hours(30)).await;
    let first = run(db.pool(), &db.connect_options(), routine(12))
        .await
        .unwrap();
    assert_eq!(first.exit, RaterExit::Clean);
    // Two days late for the window [12:00, 36:00): its hour (H0 + 1 h) is long gone.
    event(db.pool(), "late1", "acme", "5000", H0 + Duration::hours(1)).await;
    let second = run(db.pool(), &db.connect_options(), routine(12))
        .await
        .unwrap();
    assert_eq!(second.exit.code(), 2, "late usage must page");
    let late = second.report.unwrap().late.unwrap();
    assert_eq!((late.events, late.hours), (1, 1));
    assert_eq!(
        late.backfill_command(),
        "keel-rater --backfill --since 2026-11-20T01:00:00Z --until 2026-11-20T02:00:00Z"
    );
    let recorded: i64 =
        sqlx::query_scalar("SELECT late_events FROM rater_runs ORDER BY id DESC LIMIT 1")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(recorded, 1);
    // Still paging on the next routine run until someone backfills.
    let third = run(db.pool(), &db.connect_options(), routine(12))
        .await
        .unwrap();
    assert_eq!(third.exit.code(), 2);
    // The backfill the command names rates it; then routine runs are clean again.
    let backfill = go(&db, 2, true).await;
    assert_eq!(backfill.report.unwrap().inserted.count, 1);
    let fourth = run(db.pool(), &db.connect_options(), routine(12))
        .await
        .unwrap();
    assert_eq!(fourth.exit, RaterExit::Clean, "{:?}", fourth.report);
}

/// A price cut, or a change of currency, taking effect inside the routine window lowers (or
/// makes incomparable) the bill of hours already rated there: like lowered usage it pages
/// (exit 2, a `rater.reconcile_deleted` row with old -> new), where it was rated as a silent
/// update. A price rise is an update, and quiet.
#[tokio::test]
async fn a_price_cut_inside_the_window_pages_like_lowered_usage() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "1000", H0 + Duration::minutes(5)).await;
    event(db.pool(), "e2", "acme", "1000", H0 + Duration::minutes(65)).await;
    assert_eq!(go(&db, 2, false).await.exit, RaterExit::Clean);

    // A rise from the second hour on: an update, no page.
    exec(
        db.pool(),
        "INSERT INTO prices (meter, effective_from, unit_price) \
         VALUES ('requests', '2026-11-20T01:00:00Z', 0.002)",
    )
    .await
    .unwrap();
    let raised = go(&db, 2, false).await;
    assert_eq!(raised.exit, RaterExit::Clean);
    let report = raised.report.unwrap();
    assert_eq!((report.updated.count, report.lowered.count), (1, 0));

    // A cut from the first hour on, and a currency change of the second: both page.
    exec(
        db.pool(),
        "INSERT INTO prices (meter, effective_from, unit_price) \
         VALUES ('requests', '2026-11-20T00:00:00Z', 0.0001)",
    )
    .await
    .unwrap();
    exec(
        db.pool(),
        "UPDATE prices SET currency = 'EUR' WHERE effective_from = '2026-11-20T01:00:00Z'",
    )
    .await
    .unwrap();
    let cut = go(&db, 2, false).await;
    assert_eq!(cut.exit, RaterExit::Attention);
    let report = cut.report.unwrap();
    assert_eq!(report.lowered.count, 2, "{report:?}");
    let audit = audit_rows(db.pool()).await;
    let (kind, attributes) = audit.last().unwrap();
    assert_eq!(kind, "rater.reconcile_deleted");
    let lowered = attributes["lowered"].as_str().unwrap();
    assert!(
        lowered.contains("= 1 USD -> 1000 units/1 events = 0.1 USD"),
        "{lowered}"
    );
    assert!(
        lowered.contains("= 2 USD -> 1000 units/1 events = 2 EUR"),
        "{lowered}"
    );
}

/// The newest ledger row's exit code and error.
async fn last_run(pool: &PgPool) -> (Option<i16>, Option<String>) {
    sqlx::query_as("SELECT exit_code, error FROM rater_runs ORDER BY id DESC LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A routine run that committed a loss (its day's audit row and rated rows are in, its change
/// marker consumed) and then failed on a later day pages for it: exit 2, never the quieter
/// exit 1 whose next run finds nothing left to report.
#[tokio::test]
async fn a_routine_run_failing_after_it_committed_a_loss_still_pages() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "10", H0 + Duration::minutes(5)).await;
    event(db.pool(), "e2", "acme", "5", H0 + Duration::minutes(50)).await;
    let options = db.connect_options();
    let routine_run = || run(db.pool(), &options, routine(0));
    assert_eq!(routine_run().await.unwrap().exit, RaterExit::Clean);
    // The first day loses an event; the second day's rating fails.
    exec(db.pool(), "DELETE FROM billing_event WHERE event_id = 'e1'")
        .await
        .unwrap();
    event(db.pool(), "e3", "acme", "1", H0 + Duration::hours(30)).await;
    for ddl in [
        "CREATE FUNCTION fail_second_day() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'the second day fails'; END $$",
        "CREATE TRIGGER fail_second_day BEFORE INSERT ON rated_usage FOR EACH ROW \
         WHEN (NEW.window_start >= '2026-11-21T00:00:00Z') EXECUTE FUNCTION fail_second_day()",
    ] {
        exec(db.pool(), ddl).await.unwrap();
    }
    let err = routine_run().await.unwrap_err();
    assert_eq!(err.exit(), RaterExit::Attention, "{err}");
    assert!(
        matches!(&err, RaterError::FailedAfterLosses { losses: 1, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("the second day fails"), "{err}");
    let (code, error) = last_run(db.pool()).await;
    assert_eq!(code, Some(2));
    assert!(error.unwrap().contains("1 lost rated hour"));
    assert_eq!(
        audit_rows(db.pool()).await.last().unwrap().0,
        "rater.reconcile_deleted"
    );

    // Once the failure is gone, the next run rates the second day, and has no loss to report.
    exec(db.pool(), "DROP TRIGGER fail_second_day ON rated_usage")
        .await
        .unwrap();
    let next = routine_run().await.unwrap();
    assert_eq!(next.exit, RaterExit::Clean);
    assert_eq!(next.report.unwrap().inserted.count, 1);
}

/// A routine run killed after it committed a loss (its ledger row left open) never paged for
/// it: the next routine run takes it over, pages (exit 2) and closes the dead run's row naming
/// itself; the run after that is quiet again.
#[tokio::test]
async fn a_loss_committed_by_a_run_that_was_killed_is_paged_by_the_next_run() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "10", H0 + Duration::minutes(5)).await;
    event(db.pool(), "e2", "acme", "5", H0 + Duration::minutes(50)).await;
    let routine_run = || async {
        run(db.pool(), &db.connect_options(), routine(0))
            .await
            .unwrap()
    };
    assert_eq!(routine_run().await.exit, RaterExit::Clean);
    exec(db.pool(), "DELETE FROM billing_event WHERE event_id = 'e1'")
        .await
        .unwrap();
    let killed = routine_run().await;
    assert_eq!(killed.exit, RaterExit::Attention);
    // What a SIGKILL after the day's commit leaves: the day is in, the row never closed.
    let killed_id = killed.run_id.unwrap();
    sqlx::query("UPDATE rater_runs SET finished_at = NULL, exit_code = NULL WHERE id = $1")
        .bind(killed_id)
        .execute(db.pool())
        .await
        .unwrap();

    let next = routine_run().await;
    assert_eq!(next.exit, RaterExit::Attention, "the dead run's loss pages");
    let next_id = next.run_id.unwrap();
    let (code, error): (Option<i16>, Option<String>) =
        sqlx::query_as("SELECT exit_code, error FROM rater_runs WHERE id = $1")
            .bind(killed_id)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(code, Some(2));
    assert!(
        error
            .unwrap()
            .contains(&format!("run {next_id} reported them")),
        "the dead run's row names the run that reported it"
    );
    assert_eq!(last_run(db.pool()).await.0, Some(2));
    assert_eq!(routine_run().await.exit, RaterExit::Clean, "reported once");
}

/// Usage lowered or deleted in an hour before the window pages like late growth: the bill of a
/// rated hour whose events went down (or vanished) is too high, so the run exits 2 naming the
/// backfill, keeps the markers and pages until the backfill reconciles the hours.
#[tokio::test]
async fn usage_lowered_or_deleted_before_the_window_pages_until_backfilled() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "a1", "acme", "5", H0 + Duration::hours(1)).await;
    event(db.pool(), "a2", "acme", "7", H0 + Duration::hours(1)).await;
    event(db.pool(), "b1", "acme", "9", H0 + Duration::hours(2)).await;
    assert_eq!(go(&db, 36, false).await.exit, RaterExit::Clean);
    let routine = routine(12);
    assert_eq!(
        run(db.pool(), &db.connect_options(), routine)
            .await
            .unwrap()
            .exit,
        RaterExit::Clean
    );
    // One hour lowered, the other emptied, both long after they left the window.
    exec(
        db.pool(),
        "DELETE FROM billing_event WHERE event_id IN ('a2', 'b1')",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let paged = run(db.pool(), &db.connect_options(), routine)
            .await
            .unwrap();
        assert_eq!(paged.exit.code(), 2, "a lowered rated hour must page");
        let late = paged.report.unwrap().late.unwrap();
        assert_eq!((late.hours, late.lowered, late.events), (2, 2, 0));
        assert_eq!(
            late.backfill_command(),
            "keel-rater --backfill --since 2026-11-20T01:00:00Z --until 2026-11-20T03:00:00Z"
        );
    }
    let backfill = go(&db, 3, true).await;
    assert_eq!(backfill.exit, RaterExit::Clean);
    let reconciled = backfill.report.unwrap();
    assert_eq!((reconciled.lowered.count, reconciled.deleted.count), (1, 1));
    let after = run(db.pool(), &db.connect_options(), routine)
        .await
        .unwrap();
    assert_eq!(after.exit, RaterExit::Clean, "{:?}", after.report);
}

/// RATER-H5a: rating ran on the pool while the lock lived on another connection, so a rater whose
/// lock connection was killed still committed (and a second rater ran at the same time).
#[tokio::test]
async fn a_rater_that_loses_its_lock_commits_nothing() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "10", H0 + Duration::minutes(5)).await;
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE prices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let first = {
        let (pool, options) = (db.pool().clone(), db.connect_options());
        tokio::spawn(async move { run(&pool, &options, request(3, false)).await })
    };
    let mut lock_pid = None;
    for _ in 0..400 {
        lock_pid = sqlx::query_scalar(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1 \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind(0x7261_7465_i64)
        .fetch_optional(db.pool())
        .await
        .unwrap();
        if lock_pid.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let lock_pid: i32 = lock_pid.expect("the first rater never took the lock");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(lock_pid)
        .execute(db.pool())
        .await
        .unwrap();
    blocker.rollback().await.unwrap();
    let first = first.await.unwrap();
    assert!(first.is_err(), "the first rater must fail: {first:?}");
    assert!(
        amounts(db.pool()).await.is_empty(),
        "a rater that lost its lock committed"
    );

    let second = go(&db, 3, false).await;
    assert_eq!(second.exit, RaterExit::Clean);
    assert_eq!(second.report.unwrap().inserted.count, 1);
    let ledger: Vec<(i16, i32, bool)> = sqlx::query_as(
        "SELECT exit_code, days_committed, error IS NOT NULL FROM rater_runs ORDER BY id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(
        ledger,
        vec![(1, 0, true), (0, 1, false)],
        "the ledger agrees with both exits"
    );
}

/// RATER-H5c: the unlock's result was ignored.
#[tokio::test]
async fn an_unlock_returning_false_is_an_error() {
    let db = keel_testkit::database().await;
    let mut lock = keel_rater::postgres::SingleFlight::try_acquire(&db.connect_options())
        .await
        .unwrap()
        .unwrap();
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(keel_rater::postgres::SINGLE_FLIGHT_KEY)
        .execute(lock.connection())
        .await
        .unwrap();
    assert!(matches!(
        lock.release().await,
        Err(RaterError::UnlockFailed)
    ));
}

/// RATER-M1: a price starting mid-hour used to start silently at the next hour.
#[tokio::test]
async fn a_price_must_start_on_the_hour() {
    let db = keel_testkit::database().await;
    let err = exec(
        db.pool(),
        "INSERT INTO prices (meter, effective_from, unit_price) VALUES ('gpu', '2026-11-20T12:30:00Z', 1.5)",
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("prices_effective_from_on_the_hour"),
        "{err}"
    );
}

/// RATER-M2: a reused id with a different payload used to be a silent duplicate.
#[tokio::test]
async fn a_reused_event_id_with_a_different_payload_is_a_conflict() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let acme = BillingEvent::new("dup-1", "acme", "requests", Decimal::ONE, H0, NOW).unwrap();
    let other = BillingEvent::new("dup-1", "other", "gpu", Decimal::from(999), H0, NOW).unwrap();
    assert_eq!(
        record_event(&mut conn, &acme).await.unwrap(),
        Ingested::Recorded
    );
    assert_eq!(
        record_event(&mut conn, &acme).await.unwrap(),
        Ingested::Duplicate
    );
    let err = record_event(&mut conn, &other).await.unwrap_err();
    assert!(
        matches!(&err, RaterError::EventIdConflict { count: 1, first } if first == "default/dup-1"),
        "{err}"
    );
    // Another source may use the same id.
    let scoped = other.clone().with_source("billing-proxy").unwrap();
    assert_eq!(
        record_event(&mut conn, &scoped).await.unwrap(),
        Ingested::Recorded
    );

    // A batch is all or nothing, thousands of events per statement.
    let batch: Vec<BillingEvent> = (0..5000)
        .map(|i| {
            BillingEvent::new(&format!("b{i}"), "acme", "requests", Decimal::ONE, H0, NOW).unwrap()
        })
        .collect();
    let done = record_events(&mut conn, &batch).await.unwrap();
    assert_eq!((done.recorded, done.duplicates), (5000, 0));
    let again = record_events(&mut conn, &batch).await.unwrap();
    assert_eq!((again.recorded, again.duplicates), (0, 5000));
    let mut poisoned: Vec<BillingEvent> = (5000..5010)
        .map(|i| {
            BillingEvent::new(&format!("b{i}"), "acme", "requests", Decimal::ONE, H0, NOW).unwrap()
        })
        .collect();
    poisoned.push(BillingEvent::new("b7", "acme", "requests", Decimal::TWO, H0, NOW).unwrap());
    assert!(matches!(
        record_events(&mut conn, &poisoned).await,
        Err(RaterError::EventIdConflict { count: 1, .. })
    ));
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM billing_event WHERE event_id LIKE 'b%'")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(
        stored, 5000,
        "nothing of the conflicting batch was recorded"
    );
}

/// RATER-M5: a rated hour whose price disappears used to keep billing its stale row.
#[tokio::test]
async fn an_hour_that_loses_its_price_removes_its_rated_row_and_pages() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "10", H0 + Duration::minutes(5)).await;
    go(&db, 1, true).await;
    exec(db.pool(), "DELETE FROM prices").await.unwrap();
    let outcome = go(&db, 1, true).await;
    assert_eq!(
        outcome.exit.code(),
        2,
        "an unpriced hour pages even in a backfill"
    );
    let report = outcome.report.unwrap();
    assert_eq!(report.price_lost.count, 1);
    assert_eq!(
        report.price_lost.details[0]
            .old
            .as_ref()
            .unwrap()
            .amount
            .as_deref(),
        Some("0.01")
    );
    assert!(
        amounts(db.pool()).await.is_empty(),
        "the stale row still bills"
    );
    assert_eq!(audit_rows(db.pool()).await.len(), 1);
}

/// RATER-M4: a multi-day run that fails on a later day recorded zero counts although earlier
/// days committed; now each day's counts commit with the day.
#[tokio::test]
async fn the_ledger_records_what_committed_when_a_later_day_fails() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "d1", "acme", "1", H0 + Duration::minutes(5)).await;
    event(db.pool(), "d2", "acme", "1", H0 + Duration::hours(25)).await;
    // Day 2's insert fails: a trigger refuses rows for its hour.
    exec(
        db.pool(),
        "CREATE FUNCTION refuse_day_two() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.window_start >= '2026-11-21T00:00Z' THEN RAISE EXCEPTION 'day two refused'; END IF; \
           RETURN NEW; END $$",
    )
    .await
    .unwrap();
    exec(
        db.pool(),
        "CREATE TRIGGER refuse_day_two BEFORE INSERT ON rated_usage FOR EACH ROW EXECUTE FUNCTION refuse_day_two()",
    )
    .await
    .unwrap();
    let err = run(db.pool(), &db.connect_options(), request(36, true))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("day two refused"), "{err}");
    let row: (i64, i32, i16, bool) = sqlx::query_as(
        "SELECT inserted, days_committed, exit_code, finished_at IS NOT NULL FROM rater_runs",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(row, (1, 1, 1, true));
}

/// RATER-M4: a run stopped by SIGTERM left its ledger row open forever.
#[tokio::test]
async fn a_stopped_run_closes_its_ledger_row_and_commits_nothing_more() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "1", H0 + Duration::minutes(5)).await;
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE prices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let stop = tokio::time::sleep(std::time::Duration::from_millis(300));
    let result = run_until(db.pool(), &db.connect_options(), request(3, false), stop).await;
    blocker.rollback().await.unwrap();
    assert!(
        matches!(result, Err(RaterError::Terminated { days: 0 })),
        "{result:?}"
    );
    let row: (i16, bool, String) =
        sqlx::query_as("SELECT exit_code, finished_at IS NOT NULL, error FROM rater_runs")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((row.0, row.1), (1, true));
    assert!(row.2.contains("termination signal"), "{}", row.2);
    assert!(amounts(db.pool()).await.is_empty());
}

/// A server of the dry-run test's own: transaction ids are cluster-wide, so on the shared test
/// server another test's write between the two readings would look like the dry run's.
fn quiet_server() -> &'static keel_testkit::PgServer {
    static SERVER: std::sync::OnceLock<keel_testkit::PgServer> = std::sync::OnceLock::new();
    SERVER.get_or_init(|| {
        keel_testkit::PgServer::start_throwaway().expect("could not start a throwaway Postgres")
    })
}

/// RATER-M6: the dry run wrote and rolled back under the lock, showed new values only, and a
/// routine dry run exited 2 with a past-tense ERROR.
#[tokio::test]
async fn a_dry_run_is_a_read_only_diff_with_old_and_new_values() {
    let db = keel_testkit::database_on(quiet_server()).await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "10", H0 + Duration::minutes(5)).await;
    event(db.pool(), "e2", "acme", "5", H0 + Duration::minutes(6)).await;
    go(&db, 1, false).await;
    exec(db.pool(), "DELETE FROM billing_event WHERE event_id = 'e1'")
        .await
        .unwrap();
    // Another rater holds the lock: a dry run does not need it.
    let other = keel_rater::postgres::SingleFlight::try_acquire(&db.connect_options())
        .await
        .unwrap()
        .unwrap();
    let mut dry = request(1, false);
    dry.dry_run = true;
    let xid_before: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let outcome = run(db.pool(), &db.connect_options(), dry).await.unwrap();
    let xid_after: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint")
        .fetch_one(db.pool())
        .await
        .unwrap();
    other.release().await.unwrap();
    assert_eq!(
        xid_after,
        xid_before + 1,
        "the dry run took a transaction id: it wrote"
    );
    assert_eq!(outcome.exit, RaterExit::Clean);
    assert_eq!(outcome.would_exit.code(), 2);
    let report = outcome.report.unwrap();
    let change = &report.lowered.details[0];
    assert_eq!(change.old.as_ref().unwrap().quantity, "15");
    assert_eq!(change.new.as_ref().unwrap().quantity, "5");
    let rated: Vec<(String, String)> = amounts(db.pool()).await;
    assert_eq!(rated, vec![("acme".to_owned(), "0.015".to_owned())]);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM rater_runs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(runs, 1, "the dry run wrote a ledger row");
}

/// RATER-M4: a run that failed before taking the lock left no ledger row, so the ledger (and the
/// metrics built from it) missed the failure.
#[tokio::test]
async fn a_run_that_cannot_take_the_lock_records_its_failure() {
    let db = keel_testkit::database().await;
    let unreachable = db
        .connect_options()
        .database("no_such_database_for_the_rater");
    let err = run(db.pool(), &unreachable, request(3, false))
        .await
        .unwrap_err();
    assert!(matches!(err, RaterError::Database { .. }), "{err}");
    let row: (i16, bool, String) =
        sqlx::query_as("SELECT exit_code, finished_at IS NOT NULL, error FROM rater_runs")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!((row.0, row.1), (1, true));
    assert!(row.2.contains("single-flight connection"), "{}", row.2);
}

/// RATER-M3: every changed row was fetched and kept, and every deleted key joined into one log
/// line; now a report holds complete counts and at most DETAIL_CAP rows per kind.
#[tokio::test]
async fn reports_stay_bounded_whatever_the_window_holds() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    // 3 000 auth ids in one hour: 3 000 rated rows.
    sqlx::query(
        "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
         SELECT 'bulk-' || g, 'auth-' || g, 'requests', 1, $1 FROM generate_series(1, 3000) g",
    )
    .bind(H0 + Duration::minutes(1))
    .execute(db.pool())
    .await
    .unwrap();
    let first = go(&db, 1, true).await.report.unwrap();
    assert_eq!(first.inserted.count, 3000);
    assert_eq!(first.inserted.details.len(), keel_rater::DETAIL_CAP);
    exec(db.pool(), "DELETE FROM billing_event").await.unwrap();
    let second = go(&db, 1, true).await.report.unwrap();
    assert_eq!(second.deleted.count, 3000);
    assert_eq!(second.deleted.details.len(), keel_rater::DETAIL_CAP);
    let json = serde_json::to_string(&second).unwrap();
    assert!(
        json.len() < 64 * 1024,
        "the report grew with the window: {} bytes",
        json.len()
    );
    let audit = audit_rows(db.pool()).await;
    let deleted = audit[0].1["deleted"].as_str().unwrap();
    assert!(deleted.len() <= keel_audit::MAX_ATTR_VALUE_LEN);
    assert_eq!(audit[0].1["deleted_count"], "3000");
}

/// RATER-H5: behind a pooler a second session can be granted the same re-entrant lock; the
/// rater that takes over bumps the fence, so the first fails its next check instead of
/// committing alongside it. The fence row is read FOR UPDATE inside each day's transaction, so a
/// takeover waits for the day in progress and the two never write at the same time.
#[tokio::test]
async fn a_rater_whose_fence_was_taken_over_fails_its_next_check() {
    let db = keel_testkit::database().await;
    let mut lock = keel_rater::postgres::SingleFlight::try_acquire(&db.connect_options())
        .await
        .unwrap()
        .unwrap();
    let (pid, fence) = (lock.pid(), lock.fence());
    {
        let mut tx = sqlx::Connection::begin(lock.connection()).await.unwrap();
        keel_rater::postgres::SingleFlight::verify(&mut tx, pid, fence)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    exec(db.pool(), "UPDATE rater_lease SET fence = fence + 1")
        .await
        .unwrap();
    let mut tx = sqlx::Connection::begin(lock.connection()).await.unwrap();
    let checked = keel_rater::postgres::SingleFlight::verify(&mut tx, pid, fence).await;
    assert!(matches!(checked, Err(RaterError::Fenced)), "{checked:?}");
    tx.rollback().await.unwrap();
    lock.release().await.unwrap();
}

/// A change marker names a group the rater can rate (an hour starting on the hour, an auth id
/// and meter an event can carry). The routine run turns every marker it consumes into a
/// `rated_usage` key in one statement, so one marker at 10:05 written by another service failed
/// the rating of every tenant, run after run, and then paged with a backfill the rater refuses.
#[tokio::test]
async fn a_change_marker_no_event_could_write_is_refused_and_never_stops_the_rating() {
    let db = keel_testkit::database().await;
    for sql in [
        "INSERT INTO rating_change (auth_id, meter, window_start) \
         VALUES ('tenant-a', 'requests', '2026-11-20 10:05:00Z')",
        "INSERT INTO rating_change (auth_id, meter, window_start) \
         VALUES (repeat('a', 129), 'requests', '2026-11-20 10:00:00Z')",
        "INSERT INTO rating_change (auth_id, meter, window_start) \
         VALUES ('tenant a', 'requests', '2026-11-20 10:00:00Z')",
        "INSERT INTO rating_change (auth_id, meter, window_start) \
         VALUES ('tenant-a', '', '2026-11-20 10:00:00Z')",
    ] {
        let refused = exec(db.pool(), sql).await.expect_err(sql);
        assert_eq!(
            keel_testkit::sqlstate(&refused).as_deref(),
            Some("23514"),
            "{sql}: {refused}"
        );
    }
    // The markers the ingest trigger writes are on the hour, and are still taken.
    base_price(db.pool()).await;
    event(
        db.pool(),
        "e-1",
        "tenant-a",
        "3",
        H0 + Duration::minutes(605),
    )
    .await;
    let markers: Vec<OffsetDateTime> = sqlx::query_scalar("SELECT window_start FROM rating_change")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(markers, [H0 + Duration::hours(10)]);
}

/// The pushed metrics come from runs that finished by the database's clock, and their sums
/// never overflow: a ledger row another writer dated in 2099 stood as the last run and the
/// last success, silencing every rater alert until then, and counts near the column's limit
/// failed every push.
#[tokio::test]
async fn the_pushed_metrics_are_the_runs_that_finished_and_their_sums_never_overflow() {
    let db = keel_testkit::database().await;
    exec(
        db.pool(),
        "INSERT INTO rater_runs (started_at, finished_at, window_start, window_end, \
                                 explicit_window, exit_code) VALUES \
         (now() - interval '2 minutes', now() - interval '1 minute', \
          now() - interval '3 hours', now() - interval '2 hours', false, 2), \
         (now(), '2099-01-01Z', now() - interval '3 hours', now() - interval '2 hours', false, 0)",
    )
    .await
    .unwrap();
    exec(
        db.pool(),
        "INSERT INTO rater_runs (started_at, finished_at, window_start, window_end, \
                                 explicit_window, exit_code, inserted, updated, late_events) \
         VALUES (now() - interval '10 minutes', now() - interval '9 minutes', \
                 now() - interval '5 hours', now() - interval '4 hours', false, 0, \
                 9223372036854775807, 1, 9223372036854775807), \
                (now() - interval '8 minutes', now() - interval '7 minutes', \
                 now() - interval '5 hours', now() - interval '4 hours', false, 0, 0, 0, 1)",
    )
    .await
    .unwrap();
    let text = keel_rater::metrics::render(db.pool())
        .await
        .expect("the metrics render whatever the ledger's counts");
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("instant_rater_last_exit_code"), 2.0, "{text}");
    let in_2099 = 4_070_908_800.0;
    assert!(value("instant_rater_last_run_timestamp_seconds") < in_2099);
    assert!(value("instant_rater_last_success_timestamp_seconds") < in_2099);
    assert_eq!(
        value("instant_rater_rated_rows_total"),
        9_223_372_036_854_775_807.0
    );
    assert_eq!(
        value("instant_rater_late_events_total"),
        9_223_372_036_854_775_807.0
    );
}

/// A price change reaches hours rated before the routine window too: the routine run that
/// consumes its whole-window marker marks every earlier rated hour no longer billed at its
/// hour's price, and each run pages for it (late usage, with its backfill) until the backfill
/// re-rates it.
#[tokio::test]
async fn a_price_change_behind_the_window_pages_until_it_is_backfilled() {
    let db = keel_testkit::database().await;
    base_price(db.pool()).await;
    event(db.pool(), "e1", "acme", "1000", H0 + Duration::minutes(5)).await;
    assert_eq!(go(&db, 1, true).await.exit, RaterExit::Clean);
    let routine_run = || async {
        run(db.pool(), &db.connect_options(), routine(12))
            .await
            .unwrap()
    };
    assert_eq!(
        routine_run().await.exit,
        RaterExit::Clean,
        "nothing changed yet"
    );
    exec(db.pool(), "UPDATE prices SET unit_price = 0.002")
        .await
        .unwrap();
    // The dry run says so before any run has marked the hour.
    let preview = run(
        db.pool(),
        &db.connect_options(),
        RunRequest {
            dry_run: true,
            ..routine(12)
        },
    )
    .await
    .unwrap();
    assert_eq!(preview.would_exit, RaterExit::Attention);
    assert_eq!(preview.report.unwrap().late.map(|l| l.since), Some(H0));
    for attempt in 1..=2 {
        let outcome = routine_run().await;
        assert_eq!(outcome.exit, RaterExit::Attention, "run {attempt}");
        let late = outcome.report.unwrap().late.expect("late usage");
        assert_eq!((late.hours, late.since), (1, H0), "run {attempt}");
        assert_eq!(
            amounts(db.pool()).await,
            [("acme".to_owned(), "1".to_owned())]
        );
    }
    assert_eq!(go(&db, 1, true).await.exit, RaterExit::Clean);
    assert_eq!(
        amounts(db.pool()).await,
        [("acme".to_owned(), "2".to_owned())]
    );
    assert_eq!(routine_run().await.exit, RaterExit::Clean);
}
