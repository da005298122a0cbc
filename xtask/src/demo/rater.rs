//! The rater act: a routine run that rewrites a prior bill pages (ERROR, exit 2); the same kind
//! of change on an explicit backfill is the convergence the operator asked for (INFO, exit 0).

use anyhow::ensure;
use keel_rater::postgres::{RunRequest, record_event, run};
use keel_rater::{BillingEvent, RaterExit, resolve_window};
use keel_testkit::PgServer;
use rust_decimal::Decimal;
use sqlx::PgPool;
use time::{Duration, OffsetDateTime};

use super::step;

async fn delete_event(pool: &PgPool, id: &str) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM billing_event WHERE event_id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Runs the rater act.
pub async fn rating(server: &PgServer, db: &str, pool: &PgPool) -> anyhow::Result<()> {
    // The rater's own log lines (and only its) are part of the account.
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("keel_rater=info")
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .with_writer(std::io::stdout)
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);

    let now = OffsetDateTime::now_utc();
    let (routine, _) = resolve_window(None, None, now, false)?;
    let hour = routine.end() - Duration::hours(3);
    sqlx::query("INSERT INTO prices (meter, effective_from, unit_price) VALUES ('requests', '2020-01-01Z', 0.001)")
        .execute(pool)
        .await?;
    let mut conn = pool.acquire().await?;
    for (id, minutes, qty) in [
        ("evt-1", 5, 1200),
        ("evt-2", 40, 800),
        ("evt-3", 70, 500),
        ("evt-4", 95, 250),
    ] {
        let event = BillingEvent::new(
            id,
            "acme-app",
            "requests",
            Decimal::from(qty),
            hour + Duration::minutes(minutes),
            now,
        )?;
        record_event(&mut conn, &event).await?;
    }
    drop(conn);
    let lock = server.options_for(db);
    let request = |since, until| -> anyhow::Result<RunRequest> {
        let (window, explicit) = resolve_window(since, until, now, false)?;
        Ok(RunRequest {
            window,
            explicit,
            dry_run: false,
            now,
        })
    };

    step("Rater: a routine run over the trailing 24 closed hours");
    let outcome = run(pool, &lock, request(None, None)?).await?;
    let report = outcome.report.clone().unwrap_or_default();
    println!(
        "exit {}: {} hours rated ({} inserted), nothing deleted",
        outcome.exit.code(),
        report.inserted.count,
        report.inserted.count
    );
    ensure!(
        outcome.exit == RaterExit::Clean,
        "the first routine run should be clean"
    );

    step(
        "Rater: one of an hour's two events vanishes upstream; the next routine run lowers a billed hour and pages",
    );
    delete_event(pool, "evt-1").await?;
    let outcome = run(pool, &lock, request(None, None)?).await?;
    println!("exit {} (attention: page someone)", outcome.exit.code());
    if let Some(change) = outcome
        .report
        .as_ref()
        .and_then(|r| r.lowered.details.first())
    {
        println!("lowered {change}");
    }
    ensure!(
        outcome.exit == RaterExit::Attention,
        "a routine run that lowers a rated hour must exit 2"
    );

    step("Rater: an explicit backfill over the next hour converges quietly");
    delete_event(pool, "evt-3").await?;
    delete_event(pool, "evt-4").await?;
    let outcome = run(
        pool,
        &lock,
        request(Some(hour + Duration::HOUR), Some(hour + Duration::hours(2)))?,
    )
    .await?;
    println!(
        "exit {}: {} deleted on an explicit --backfill window is the convergence asked for",
        outcome.exit.code(),
        outcome.report.map(|r| r.deleted.count).unwrap_or(0)
    );
    ensure!(
        outcome.exit == RaterExit::Clean,
        "a backfill reconcile deletion must exit 0"
    );
    let runs: Vec<(bool, i64, i64, i16)> = sqlx::query_as(
        "SELECT explicit_window, lowered, deleted, exit_code FROM rater_runs ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    println!("run ledger (explicit, lowered, deleted, exit): {runs:?}");
    Ok(())
}
