//! `cargo xtask bench rater [--events N] [--pairs N]`: the rater against the bare aggregate
//! over the same events, on the same Postgres, with the same session settings, in alternating
//! order (BENCH-4), for at least three pairs.
//!
//! Each pair: the bare aggregate (the same sums and counts as the rater computes, all of them
//! consumed, so the planner cannot drop any: BENCH-9) and a full rating run from an empty
//! `rated_usage` with every group marked changed (as after a bulk load), in alternating order;
//! then an unchanged routine re-run, and a routine run after 1% of the rated hours got one late
//! event each. Every run's results are checked before a figure is printed. The cost the change
//! markers add to ingest is measured separately, with the triggers on and off alternately.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keel_rater::postgres::{RATING_WORK_MEM, RunRequest, record_events, run};
use keel_rater::{BillingEvent, RaterExit, resolve_window};
use keel_testkit::PgServer;
use rust_decimal::Decimal;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool};
use time::OffsetDateTime;

use self::fair::Samples;

const AUTH_IDS: u64 = 10_000;
const METERS: [&str; 4] = ["requests", "storage_gb_hours", "egress_gb", "cpu_seconds"];
const USAGE: &str = "cargo xtask bench rater [--events N] [--pairs N]";

/// The bare aggregate: the rater's `agg`, every sum and count consumed by an outer aggregate.
const BARE: &str = "SELECT count(*), sum(quantity), sum(event_count)::bigint FROM ( \
       SELECT auth_id, meter, \
              date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS window_start, \
              sum(quantity) AS quantity, count(*) AS event_count \
       FROM billing_event WHERE occurred_at >= $1 AND occurred_at < $2 GROUP BY 1, 2, 3) g";

/// Runs the benchmark and prints its figures.
pub fn bench(args: &[String]) -> anyhow::Result<()> {
    let events = fair::flag(args, "--events", 10_000_000, USAGE)?;
    let pairs = fair::flag(args, "--pairs", 3, USAGE)?.max(3);
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
        println!("{}", fair::header(&format!("cargo xtask bench rater --events {events} --pairs {pairs}"), &server.describe(), &pool).await?);
        println!(
            "data: {events} events over 24 h ({AUTH_IDS} auth ids x {} meters); both sides run with \
             work_mem = {RATING_WORK_MEM} and jit = off (the rater's own session settings)",
            METERS.len()
        );

        for meter in METERS {
            sqlx::query("INSERT INTO prices (meter, effective_from, unit_price) VALUES ($1, '2020-01-01Z', 0.0001)")
                .bind(meter)
                .execute(&pool)
                .await?;
        }
        let started = Instant::now();
        // The load's markers are written by `reset` before each pair, as the trigger would
        // have (one statement of ten million rows would hold them all in one transition table).
        sqlx::query("ALTER TABLE billing_event DISABLE TRIGGER billing_event_marks_inserted")
            .execute(&pool)
            .await?;
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
        sqlx::query("ALTER TABLE billing_event ENABLE TRIGGER billing_event_marks_inserted")
            .execute(&pool)
            .await?;
        sqlx::query("VACUUM ANALYZE billing_event").execute(&pool).await?;
        println!("loading the events (one set-based INSERT) took {:.1} s (not counted)", started.elapsed().as_secs_f64());

        let (on, off) = ingest_cost(&pool, window.start() - time::Duration::days(10), pairs).await?;
        println!(
            "ingest through record_events, batches of 1000 events: markers on {} / off {} per batch; \
             the markers add {:+.1}% (median)\n",
            on.summary_ms(),
            off.summary_ms(),
            (on.median() / off.median() - 1.0) * 100.0
        );

        let lock = server.options_for("bench_rater");
        let routine = RunRequest { window, explicit: false, dry_run: false, now };
        let (mut bare, mut full, mut rerun, mut late) =
            (Samples::default(), Samples::default(), Samples::default(), Samples::default());
        let mut peak_growth_kib = 0u64;
        let mut groups = 0i64;
        let mut late_groups = 0i64;
        for pair in 0..pairs {
            reset(&pool).await?;
            let bare_first = pair % 2 == 0;
            for side in [bare_first, !bare_first] {
                if side {
                    let (elapsed, counted) = bare_aggregate(&pool, window.start(), window.end()).await?;
                    ensure!(counted.2 == i64::try_from(events)?, "the bare aggregate counted {} events", counted.2);
                    groups = counted.0;
                    bare.push(elapsed);
                } else {
                    let sampler = fair::RssSampler::start();
                    let started = Instant::now();
                    let outcome = run(&pool, &lock, routine).await?;
                    full.push(started.elapsed());
                    peak_growth_kib = peak_growth_kib.max(sampler.stop());
                    ensure!(outcome.exit == RaterExit::Clean, "the full run exited {:?}", outcome.exit);
                    let report = outcome.report.unwrap_or_default();
                    let rated: i64 = sqlx::query_scalar("SELECT count(*) FROM rated_usage").fetch_one(&pool).await?;
                    ensure!(report.inserted.count as i64 == rated && rated > 0, "the full run inserted {} rows, {rated} stored", report.inserted.count);
                }
            }
            let rated: i64 = sqlx::query_scalar("SELECT count(*) FROM rated_usage").fetch_one(&pool).await?;
            ensure!(rated == groups, "rated {rated} rows for {groups} groups");

            let started = Instant::now();
            let outcome = run(&pool, &lock, routine).await?;
            rerun.push(started.elapsed());
            let report = outcome.report.unwrap_or_default();
            ensure!(outcome.exit == RaterExit::Clean && report.rows_written() == 0, "the unchanged re-run wrote rows: {:?}", outcome.exit);

            // 1% of the rated hours get one late event each, through the ordinary ingest path.
            late_groups = sqlx::query_scalar(
                "WITH l AS (INSERT INTO billing_event (source, event_id, auth_id, meter, quantity, occurred_at) \
                   SELECT 'late', 'late-' || id, auth_id, meter, 1, window_start + interval '30 minutes' \
                   FROM rated_usage WHERE id % 100 = 0 RETURNING 1) SELECT count(*) FROM l",
            )
            .fetch_one(&pool)
            .await?;
            let started = Instant::now();
            let outcome = run(&pool, &lock, routine).await?;
            late.push(started.elapsed());
            let report = outcome.report.unwrap_or_default();
            ensure!(
                outcome.exit == RaterExit::Clean && report.updated.count as i64 == late_groups && report.unchanged == 0,
                "the late run updated {} hours for {late_groups} late ones ({:?})",
                report.updated.count,
                outcome.exit
            );
            sqlx::query("DELETE FROM billing_event WHERE source = 'late'").execute(&pool).await?;
        }

        let per_group = events as f64 / groups as f64;
        println!("{groups} groups rated per run ({per_group:.1} events per group); {late_groups} late hours (1%)");
        println!("{:<44} {}", "bare aggregate (SELECT ... GROUP BY):", bare.summary_s());
        println!("{:<44} {}", "full rating run:", full.summary_s());
        println!("{:<44} {}", "unchanged routine re-run:", rerun.summary_s());
        println!("{:<44} {}", "routine run after 1% late hours:", late.summary_s());
        let b = bare.median();
        println!(
            "full run      = {:.2}x the bare aggregate (median; pairs {:.2}x-{:.2}x)  goal <= 1.3x",
            full.median() / b,
            fair::min_ratio(&full, &bare),
            fair::max_ratio(&full, &bare)
        );
        println!("unchanged run = {:.3}x the bare aggregate  goal <= 0.1x", rerun.median() / b);
        let those_hours = full.median() * late_groups as f64 / groups as f64;
        println!(
            "late run      = {:.3}x the bare aggregate; goal <= 0.1x + the cost of those hours \
             ({late_groups}/{groups} of a full run = {:.3}x), i.e. <= {:.3}x",
            late.median() / b,
            those_hours / b,
            0.1 + those_hours / b
        );
        println!(
            "peak RSS growth of the benchmark process during a full run: {:.1} MiB (goal < 100 MB); after the runs: {}",
            peak_growth_kib as f64 / 1024.0,
            fair::load()
        );
        anyhow::Ok(())
    })
}

/// Before a pair: nothing rated, every group of the events marked changed (as a bulk load
/// leaves them), the next routine run a whole-window one; the same table hygiene for both sides.
async fn reset(pool: &PgPool) -> anyhow::Result<()> {
    for statement in [
        "TRUNCATE rated_usage",
        "DELETE FROM rating_change",
        "INSERT INTO rating_change (auth_id, meter, window_start) \
         SELECT DISTINCT auth_id, meter, date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') \
         FROM billing_event",
        "INSERT INTO rating_change_all (reason) VALUES ('benchmark')",
        "VACUUM ANALYZE billing_event, rated_usage, rating_change",
    ] {
        sqlx::query(statement).execute(pool).await?;
    }
    Ok(())
}

async fn bare_aggregate(
    pool: &PgPool,
    start: OffsetDateTime,
    end: OffsetDateTime,
) -> anyhow::Result<(Duration, (i64, Decimal, i64))> {
    let mut conn = pool.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT set_config('work_mem', $1, true), set_config('jit', 'off', true)")
        .bind(RATING_WORK_MEM)
        .execute(&mut *tx)
        .await?;
    let started = Instant::now();
    let counted: (i64, Decimal, i64) = sqlx::query_as(BARE)
        .bind(start)
        .bind(end)
        .fetch_one(&mut *tx)
        .await?;
    let elapsed = started.elapsed();
    tx.rollback().await?;
    Ok((elapsed, counted))
}

/// Batches of 1000 events through `record_events`, with the marker triggers on and off in
/// alternating order, into hours far from the benchmark's window; cleaned up afterwards.
async fn ingest_cost(
    pool: &PgPool,
    at: OffsetDateTime,
    pairs: u64,
) -> anyhow::Result<(Samples, Samples)> {
    let (mut on, mut off) = (Samples::default(), Samples::default());
    let mut conn = pool.acquire().await?;
    let rounds = pairs * 4;
    for round in 0..rounds {
        let on_first = round % 2 == 0;
        for markers in [on_first, !on_first] {
            let toggle = if markers { "ENABLE" } else { "DISABLE" };
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE billing_event {toggle} TRIGGER billing_event_marks_inserted"
            )))
            .execute(&mut *conn)
            .await?;
            let batch: Vec<BillingEvent> = (0..1000u64)
                .map(|i| {
                    BillingEvent::new(
                        &format!("ingest-{round}-{markers}-{i}"),
                        &format!("auth-{}", i * 7 % AUTH_IDS),
                        METERS[(i % 4) as usize],
                        Decimal::from(1 + i % 7),
                        at + time::Duration::seconds((i * 3) as i64),
                        at + time::Duration::hours(1),
                    )
                })
                .collect::<Result<_, _>>()?;
            let started = Instant::now();
            let done = record_events(&mut conn, &batch).await?;
            let elapsed = started.elapsed();
            ensure!(
                done.recorded == 1000,
                "recorded {} of 1000 events",
                done.recorded
            );
            if markers {
                on.push(elapsed)
            } else {
                off.push(elapsed)
            }
        }
    }
    sqlx::query("ALTER TABLE billing_event ENABLE TRIGGER billing_event_marks_inserted")
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM billing_event WHERE event_id LIKE 'ingest-%'")
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM rating_change WHERE window_start < $1 + interval '1 day'")
        .bind(at)
        .execute(&mut *conn)
        .await?;
    Ok((on, off))
}

/// The rater's side of the shared harness (`bench/fair.rs`): samples in seconds, summarised with
/// the harness's median and min–max, ratios per pair, and the header with the machine, memory
/// and the server's settings.
pub(super) mod fair {
    use std::time::Duration;

    use sqlx::PgPool;

    use super::super::fair::Summary;
    pub use super::super::fair::{RssSampler, flag};

    /// Timings of one side, one per pair.
    #[derive(Default, Debug)]
    pub struct Samples(Vec<f64>);

    impl Samples {
        /// Adds a timing.
        pub fn push(&mut self, d: Duration) {
            self.0.push(d.as_secs_f64());
        }

        fn summary(&self) -> Option<Summary> {
            Summary::of(&self.0)
        }

        /// The median, in seconds.
        pub fn median(&self) -> f64 {
            self.summary().map_or(f64::NAN, |s| s.median)
        }

        /// The fastest, in seconds.
        pub fn min(&self) -> f64 {
            self.summary().map_or(f64::NAN, |s| s.min)
        }

        /// The slowest, in seconds.
        pub fn max(&self) -> f64 {
            self.summary().map_or(f64::NAN, |s| s.max)
        }

        /// The per-pair values.
        pub fn values(&self) -> &[f64] {
            &self.0
        }

        /// "median m s (min–max a–b s, n runs)".
        pub fn summary_s(&self) -> String {
            format!(
                "{:>8.3} s median  (min-max {:.3}-{:.3} s, {} runs)",
                self.median(),
                self.min(),
                self.max(),
                self.0.len()
            )
        }

        /// The same in milliseconds.
        pub fn summary_ms(&self) -> String {
            format!(
                "{:.2} ms median (min-max {:.2}-{:.2} ms, {} runs)",
                self.median() * 1e3,
                self.min() * 1e3,
                self.max() * 1e3,
                self.0.len()
            )
        }
    }

    fn pair_ratios(a: &Samples, b: &Samples) -> Vec<f64> {
        a.values()
            .iter()
            .zip(b.values())
            .map(|(a, b)| a / b)
            .collect()
    }

    /// The smallest per-pair ratio a/b.
    pub fn min_ratio(a: &Samples, b: &Samples) -> f64 {
        pair_ratios(a, b).into_iter().fold(f64::INFINITY, f64::min)
    }

    /// The largest per-pair ratio a/b.
    pub fn max_ratio(a: &Samples, b: &Samples) -> f64 {
        pair_ratios(a, b).into_iter().fold(0.0, f64::max)
    }

    /// The load averages (1, 5, 15 minutes).
    pub fn load() -> String {
        super::super::fair::load()
    }

    /// The command, the machine (cores, CPU, load, memory) and the server's settings.
    pub async fn header(command: &str, server: &str, pool: &PgPool) -> anyhow::Result<String> {
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kib| kib.parse::<u64>().ok())
            })
            .map_or_else(
                || "?".to_owned(),
                |kib| format!("{:.1} GiB", kib as f64 / 1048576.0),
            );
        let settings = super::super::fair::server_settings(pool).await?;
        Ok(format!(
            "command: {command}\nmachine: {}, {memory}\nserver: {server}\nserver settings: {settings}",
            super::super::fair::machine()
        ))
    }
}
