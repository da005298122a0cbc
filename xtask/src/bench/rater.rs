//! `cargo xtask bench rater`: a full rating run, an unchanged re-run, and the bare aggregate over
//! the same events, on the same Postgres in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keel_rater::postgres::{RunRequest, run};
use keel_rater::{RaterExit, resolve_window};
use keel_testkit::PgServer;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;

const AUTH_IDS: u64 = 10_000;
const METERS: [&str; 4] = ["requests", "storage_gb_hours", "egress_gb", "cpu_seconds"];

/// Runs the benchmark and prints its figures.
pub fn bench(events: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = PgServer::start_throwaway().context("could not start a throwaway Postgres")?;
    rt.block_on(async {
        server.create_database("bench_rater", None).await?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(server.options_for("bench_rater"))
            .await?;
        keel_schema::migrate(&pool).await?;
        let now = OffsetDateTime::now_utc();
        let (window, _) = resolve_window(None, None, now, false)?;
        println!(
            "rater benchmark: {events} events over 24 h ({AUTH_IDS} auth ids x {} meters), {}",
            METERS.len(),
            server.describe()
        );

        for meter in METERS {
            sqlx::query("INSERT INTO prices (meter, effective_from, unit_price) VALUES ($1, '2020-01-01Z', 0.0001)")
                .bind(meter)
                .execute(&pool)
                .await?;
        }
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
             SELECT 'evt-' || g, 'auth-' || (g % $2), ($3::text[])[1 + (g / $2) % 4], 1 + g % 7, \
                    $4 + make_interval(secs => (g * 86399 / $1)) \
             FROM generate_series(0, $1 - 1) g",
        )
        .bind(i64::try_from(events)?)
        .bind(i64::try_from(AUTH_IDS)?)
        .bind(&METERS[..])
        .bind(window.start())
        .execute(&pool)
        .await?;
        sqlx::query("VACUUM ANALYZE billing_event").execute(&pool).await?;
        println!("loading the events took {:.1} s (not counted)\n", started.elapsed().as_secs_f64());

        let started = Instant::now();
        let groups: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT auth_id, meter, \
                    date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'), \
                    sum(quantity), count(*) \
             FROM billing_event WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1, 2, 3) g",
        )
        .bind(window.start())
        .bind(window.end())
        .fetch_one(&pool)
        .await?;
        let bare = started.elapsed();

        let lock = server.options_for("bench_rater");
        let request = RunRequest { window, explicit: false, dry_run: false, now };
        let started = Instant::now();
        let full = run(&pool, &lock, request).await?;
        let full_time = started.elapsed();
        ensure!(full.exit == RaterExit::Clean, "the full run did not exit clean: {:?}", full.exit);
        let inserted = full.report.map(|r| r.inserted.count).unwrap_or(0);
        ensure!(inserted as i64 == groups, "rated {inserted} rows for {groups} groups");

        let started = Instant::now();
        let rerun = run(&pool, &lock, request).await?;
        let rerun_time = started.elapsed();
        let rerun_report = rerun.report.unwrap_or_default();
        ensure!(
            rerun_report.inserted.is_empty() && rerun_report.updated.is_empty() && rerun_report.losses() == 0,
            "the unchanged re-run wrote rows"
        );

        let ratio = |d: Duration| d.as_secs_f64() / bare.as_secs_f64();
        println!("bare SELECT ... GROUP BY:     {:>7.2} s  ({groups} groups)", bare.as_secs_f64());
        println!(
            "full rating run:              {:>7.2} s  = {:.2}x the bare aggregate ({inserted} rows inserted)",
            full_time.as_secs_f64(),
            ratio(full_time)
        );
        println!(
            "unchanged re-run:             {:>7.2} s  = {:.2}x the bare aggregate (0 rows written, {} unchanged)",
            rerun_time.as_secs_f64(),
            ratio(rerun_time),
            rerun_report.unchanged
        );
        anyhow::Ok(())
    })
}
