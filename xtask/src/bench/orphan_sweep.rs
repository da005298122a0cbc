//! `cargo xtask bench orphan-sweep [--items N] [--rows N] [--pairs N]`: one audit-only tick over
//! 100k inventory items against 1M resource rows, with the live tokens read in one set-based
//! query, beside a baseline that asks one query per token, in the same run on the same Postgres.
//!
//! Fair by construction: both sides log through the production JSON subscriber into a sink, so
//! every per-candidate line is formatted (BENCH-5); a quarter of the inventory names deleted
//! rows, a quarter live rows and half no row at all, so the deleted-row path is exercised
//! (BENCH-7); the databases are named as keel-provision names them (`cust_<digest>`), one in 20
//! by the legacy `cust_<token>`; both sides run the same number of ticks through the shared harness
//! ([`super::fair`]: alternating order, median and min–max of the rounds, machine and settings
//! printed), each side with its own sweeper recording its sightings in the production state
//! store (`orphan_sightings`, as the deployed sweeper does, in a state database of each side's
//! own on the same server, so neither side's tick is the other's replica), and each tick's peak
//! resident memory
//! growth is sampled the same way (BENCH-8). The rounds run in one process, whose first tick (always the
//! first side's) grows a fresh heap; so each side's first tick is also measured on its own, in a
//! fresh process per tick, in alternating order. Every tick's candidates are checked before a
//! figure is printed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keel_audit::Token;
use keel_orphan_sweep::postgres::{PgLiveTokens, PgSweepState};
use keel_orphan_sweep::{
    FingerprintKey, Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens,
    LiveTokensError, Reclaimer, Standings, SweepConfig, SweepMetrics, Sweeper, TickReport,
};
use keel_provision::{DatabaseName, InstallationId, Provisioner, TokenDigest};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;

use super::fair::{self, Better};

const USAGE: &str =
    "cargo xtask bench orphan-sweep [--items N] [--rows N] [--pairs N] [--shared-buffers SIZE]";

/// The server's buffer pool for this bench, unless `--shared-buffers` says otherwise: enough to
/// hold `resources` at 1M rows (about 410 MB of table and 240 MB of indexes, printed after the
/// load), as a platform database holding that table would be sized. The server's built-in
/// default (128 MB) holds a fifth of it, so most of the read's row fetches went to the operating
/// system's cache. Both sides run against the same server, so both get the same pool.
const SHARED_BUFFERS: &str = "1GB";

/// `--shared-buffers SIZE` from `args` (a whole number of kB, MB or GB, at least 128 kB, as the
/// server takes it), or [`SHARED_BUFFERS`].
fn shared_buffers(args: &[String]) -> anyhow::Result<String> {
    let Some(i) = args.iter().position(|a| a == "--shared-buffers") else {
        return Ok(SHARED_BUFFERS.to_owned());
    };
    let value = args.get(i + 1).map(String::as_str).unwrap_or_default();
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let kib_per_unit: u64 = match &value[digits.len()..] {
        "kB" => 1,
        "MB" => 1 << 10,
        "GB" => 1 << 20,
        _ => 0,
    };
    let kib = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(kib_per_unit));
    match kib {
        Some(kib) if (128..=(1 << 30)).contains(&kib) => Ok(value.to_owned()),
        _ => anyhow::bail!(
            "--shared-buffers takes a size such as 128MB or 1GB (kB, MB or GB, from 128kB to \
             1024GB)\n{USAGE}"
        ),
    }
}

const SIDES: [&str; 2] = ["Keel: one set-based read", "baseline: one query per token"];

/// The inventory, already listed (the benchmark measures the sweep, not the API server).
struct Listed(Vec<InventoryItem>);

impl Inventory for Listed {
    fn source(&self) -> InventorySource {
        InventorySource::Postgres
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        Ok(self.0.clone())
    }
}

/// The baseline: one query per token.
struct PerToken(PgPool);

impl LiveTokens for PerToken {
    async fn standing_among(&self, digests: &[TokenDigest]) -> Result<Standings, LiveTokensError> {
        let installation: uuid::Uuid = sqlx::query_scalar("SELECT keel_installation_id()")
            .fetch_one(&self.0)
            .await
            .map_err(|e| LiveTokensError(Box::new(e)))?;
        let mut standings = Standings::empty(InstallationId::from_uuid(installation));
        for token in digests {
            let (owned, live): (bool, bool) = sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM resources WHERE token_digest = $1), \
                        EXISTS (SELECT 1 FROM resources WHERE token_digest = $1 \
                                   AND status NOT IN ('deleted', 'failed'))",
            )
            .bind(token.as_str())
            .fetch_one(&self.0)
            .await
            .map_err(|e| LiveTokensError(Box::new(e)))?;
            if owned {
                standings.owned.insert(token.clone());
            }
            if live {
                standings.live.insert(token.clone());
            }
        }
        Ok(standings)
    }
}

/// Never wired: the benchmark is audit-only.
type NoReclaimer = Provisioner<
    keel_provision::postgres::PgResourceStore,
    keel_provision::postgres::PgClusterBackend,
>;

/// Runs one tick with the production log subscriber writing to a sink; returns (elapsed, peak
/// resident memory growth in KiB, report).
///
/// Before the clock starts, the period claims are cleared (so this tick claims its period
/// however many ticks ran in it); the sightings the tick before recorded stay, as a running
/// sweeper finds them.
async fn measured_tick<L: LiveTokens, R: Reclaimer>(
    sweeper: &mut Sweeper<Listed, L, R, PgSweepState>,
    state: &PgPool,
    now: OffsetDateTime,
) -> anyhow::Result<(Duration, u64, TickReport)> {
    sqlx::query("DELETE FROM orphan_sweep_periods")
        .execute(state)
        .await?;
    let subscriber = keel_service::telemetry::subscriber(
        keel_service::LogFormat::Json,
        tracing_subscriber::EnvFilter::new(keel_service::telemetry::DEFAULT_FILTER),
        false,
        std::io::sink,
    );
    let _logging = tracing::subscriber::set_default(subscriber);
    let sampler = fair::RssSampler::start();
    let started = Instant::now();
    let report = sweeper.tick(now).await;
    let elapsed = started.elapsed();
    Ok((elapsed, sampler.stop(), report))
}

fn candidates(report: &TickReport) -> usize {
    match report {
        TickReport::Swept { candidates, .. } => candidates.len(),
        TickReport::Disabled | TickReport::Skipped { .. } | TickReport::Failed { .. } => 0,
    }
}

/// Runs the benchmark and prints its figures.
pub fn bench(args: &[String]) -> anyhow::Result<()> {
    let items = fair::flag(args, "--items", 100_000, USAGE)?;
    let rows = fair::flag(args, "--rows", 1_000_000, USAGE)?;
    let pairs = fair::flag(args, "--pairs", fair::DEFAULT_PAIRS, USAGE)?.max(fair::DEFAULT_PAIRS);
    let buffers = shared_buffers(args)?;
    anyhow::ensure!(
        items / 4 * 10 + 10 <= rows,
        "--rows must be at least 2.5 times --items (the inventory names existing rows)\n{USAGE}"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = PgServer::start_throwaway_with(&keel_testkit::ThrowawayOptions {
        settings: vec![("shared_buffers".to_owned(), buffers.clone())],
        ..Default::default()
    })
    .context("could not start a throwaway Postgres")?;
    rt.block_on(async {
        server.create_database("bench_orphan", None).await?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(server.options_for("bench_orphan"))
            .await?;
        keel_schema::migrate(&pool).await?;
        fair::header(
            &format!(
                "orphan sweep: one audit-only tick over {items} inventory items against {rows} \
                 resources rows, logs on"
            ),
            &format!(
                "cargo xtask bench orphan-sweep --items {items} --rows {rows} --pairs {pairs} \
                 --shared-buffers {buffers}"
            ),
            &server.describe(),
            &fair::server_settings(&pool).await?,
        );
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO teams (id, tier) VALUES ('00000000-0000-4000-8000-000000000001', 'pro')",
        )
        .execute(&pool)
        .await?;
        // Every 10th row is deleted (terminal); the rest are live.
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                    provider_resource_id, connection_url, deleted_at) \
             SELECT gen_random_uuid(), 't' || lpad(g::text, 11, '0'), \
                    '00000000-0000-4000-8000-000000000001', 'postgres', 'pro', \
                    CASE WHEN g % 10 = 0 THEN 'deleted' ELSE 'active' END, \
                    'cust_t' || lpad(g::text, 11, '0'), 'postgres://redacted', \
                    CASE WHEN g % 10 = 0 THEN now() END \
               FROM generate_series(1, $1) g",
        )
        .bind(i64::try_from(rows)?)
        .execute(&pool)
        .await?;
        sqlx::query("VACUUM ANALYZE resources")
            .execute(&pool)
            .await?;
        // The load's dirty pages are written now, not by whichever side reads first (the same
        // hygiene as the propagation bench's).
        sqlx::query("CHECKPOINT").execute(&pool).await?;
        let (table, indexes): (String, String) = sqlx::query_as(
            "SELECT pg_size_pretty(pg_table_size('resources')), \
                    pg_size_pretty(pg_indexes_size('resources'))",
        )
        .fetch_one(&pool)
        .await?;
        println!(
            "loading took {:.1} s (not counted); resources: table {table}, indexes {indexes}",
            started.elapsed().as_secs_f64()
        );

        // A quarter of the inventory names live rows, a quarter deleted rows (every 10th row is
        // deleted), half names tokens with no row at all: the last three are candidates.
        let inventory = inventory(items, rows)?;
        let deleted_rows = (0..items).filter(|i| i % 4 == 1).count();
        let legacy = (0..items)
            .filter(|i| i % LEGACY_EVERY == LEGACY_EVERY - 1)
            .count();
        let expected = expected_candidates(items);
        let key = FingerprintKey::new(*FINGERPRINT_KEY)?;
        let now = OffsetDateTime::now_utc();

        // Each side records its sightings in a state database of its own on the same server,
        // as a sweeper that is the only one of its inventory does: a tick of the other side in
        // between would be another replica's tick, after which nothing recorded is kept.
        let states = [
            state_database(&server, 0).await?,
            state_database(&server, 1).await?,
        ];
        let mut keel = sweeper(
            inventory.clone(),
            SideRead::new(PgLiveTokens::new(pool.clone()), &pool),
            &states[0],
            key.clone(),
        );
        let mut baseline = sweeper(
            inventory,
            SideRead::new(PerToken(pool.clone()), &pool),
            &states[1],
            key,
        );
        // Untimed ticks of each side's own sweeper, with the set-based read for both, record the
        // sightings that every measured tick then finds, as a running sweeper's later ticks do
        // (its own first tick found none).
        for (side, state) in SIDES.iter().zip(&states) {
            let (recorded_all, _, warm) = if side == &SIDES[0] {
                seeded_tick(&mut keel, state, now).await?
            } else {
                seeded_tick(&mut baseline, state, now).await?
            };
            ensure!(
                candidates(&warm) == expected,
                "the untimed first tick of {side} found {} candidates, expected {expected}",
                candidates(&warm)
            );
            // Not a figure of either side: the one tick that writes every sighting as new.
            println!(
                "  the untimed first tick of {side} (the set-based read; every sighting new, all \
                 written) took {:.1} ms",
                recorded_all.as_secs_f64() * 1e3
            );
        }
        let mut growth: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
        let samples = fair::alternate(&SIDES, pairs, async |side, round| {
            // One tick per hourly period (a second tick in the same period is skipped).
            let at = now + time::Duration::hours(i64::try_from(round)?);
            let (elapsed, grown, report) = if side == 0 {
                measured_tick(&mut keel, &states[0], at).await?
            } else {
                measured_tick(&mut baseline, &states[1], at).await?
            };
            ensure!(
                candidates(&report) == expected,
                "{} found {} candidates, expected {expected}",
                SIDES[side],
                candidates(&report)
            );
            growth[side].push(grown);
            Ok(elapsed.as_secs_f64() * 1000.0)
        })
        .await?;
        println!(
            "\n  {expected} candidates per tick, checked on every tick (audit-only; \
             {deleted_rows} of them name deleted rows), one JSON log line each; databases named \
             cust_<digest>, {legacy} of the {items} by the legacy cust_<token>"
        );
        fair::report(
            &SIDES,
            &samples,
            "ms per tick",
            Better::Lower,
            ">= 50x the baseline and <= 500 ms per tick; peak RSS growth <= 50 MiB per tick",
        );
        for (name, grown) in SIDES.iter().zip(&growth) {
            let mib: Vec<f64> = grown.iter().map(|&kib| kib as f64 / 1024.0).collect();
            if let Some(s) = fair::Summary::of(&mib) {
                println!(
                    "  peak RSS growth per tick, {name:<31} median {:.1} MiB   min–max {:.1}–{:.1} \
                     (the process's first tick grows the heap; later ticks reuse it)",
                    s.median, s.min, s.max
                );
            }
        }
        let urls = [
            server.url_for("bench_orphan"),
            server.url_for(&state_name(0)),
            server.url_for(&state_name(1)),
        ];
        cold_rounds(&urls, items, rows, pairs).await
    })
}

/// The name of `side`'s state database.
fn state_name(side: usize) -> String {
    format!("bench_orphan_state_{side}")
}

/// Creates and migrates `side`'s state database; a pool on it.
async fn state_database(server: &PgServer, side: usize) -> anyhow::Result<PgPool> {
    let name = state_name(side);
    server.create_database(&name, None).await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(server.options_for(&name))
        .await?;
    keel_schema::migrate(&pool).await?;
    Ok(pool)
}

/// A side's standing read; the untimed tick that seeds a side's state reads with the
/// set-based read instead, the same for both sides.
struct SideRead<L> {
    side: L,
    seed: PgLiveTokens,
    seeding: AtomicBool,
}

impl<L> SideRead<L> {
    /// `side`'s read, seeding through the set-based read on `pool` until [`seeded_tick`] ran.
    fn new(side: L, pool: &PgPool) -> Self {
        Self {
            side,
            seed: PgLiveTokens::new(pool.clone()),
            seeding: AtomicBool::new(true),
        }
    }
}

impl<L: LiveTokens> LiveTokens for SideRead<L> {
    async fn standing_among(&self, digests: &[TokenDigest]) -> Result<Standings, LiveTokensError> {
        if self.seeding.load(Ordering::SeqCst) {
            self.seed.standing_among(digests).await
        } else {
            self.side.standing_among(digests).await
        }
    }
}

/// The untimed ticks that seed a side's state through the side's own sweeper and store: the
/// first records every sighting as new (its figures are returned), the second carries them on as
/// a running sweeper's ticks do (a store keeps nothing of the very first record of an
/// inventory); the side's own read is used from then on.
async fn seeded_tick<L: LiveTokens>(
    sweeper: &mut Sweeper<Listed, SideRead<L>, NoReclaimer, PgSweepState>,
    state: &PgPool,
    now: OffsetDateTime,
) -> anyhow::Result<(Duration, u64, TickReport)> {
    let first = measured_tick(sweeper, state, now).await;
    let second = measured_tick(sweeper, state, now).await;
    sweeper.live_tokens().seeding.store(false, Ordering::SeqCst);
    let (_, _, carried) = second?;
    let (first, carried) = (first?, candidates(&carried));
    ensure!(
        carried == candidates(&first.2),
        "the second untimed tick found {carried} candidates, the first {}",
        candidates(&first.2)
    );
    Ok(first)
}

/// The inventory both sides list: `items` managed databases, three hours old. A quarter name
/// live rows and a quarter deleted rows (every 10th row is deleted), half name tokens with no
/// row at all: the last three quarters are candidates.
fn inventory(items: u64, rows: u64) -> anyhow::Result<Vec<InventoryItem>> {
    let created = OffsetDateTime::now_utc() - time::Duration::hours(3);
    let named = |i: u64| match i % 4 {
        0 => i / 4 * 10 + 1,
        1 => i / 4 * 10 + 10,
        _ => rows + i,
    };
    (0..items)
        .map(|i| {
            let token = Token::parse(&format!("t{:011}", named(i)))
                .map_err(|_| anyhow::anyhow!("a bench token does not parse"))?;
            // As keel-provision names a database today (`cust_<digest>`), and one in
            // LEGACY_EVERY by the legacy name `cust_<token>` of a database made before that.
            let name = if i % LEGACY_EVERY == LEGACY_EVERY - 1 {
                DatabaseName::legacy_for_token(&token)
            } else {
                DatabaseName::for_token(&token)
            };
            Ok(InventoryItem::new(name.expose())
                .with_created_at(created)
                .with_label(
                    keel_orphan_sweep::MANAGED_BY_LABEL,
                    keel_orphan_sweep::MANAGED_BY,
                ))
        })
        .collect()
}

/// One inventory item in this many keeps a legacy `cust_<token>` name (the rest are named by
/// their token's digest), so both naming paths are exercised.
const LEGACY_EVERY: u64 = 20;

/// How many of [`inventory`]'s items are candidates.
fn expected_candidates(items: u64) -> usize {
    (0..items).filter(|i| i % 4 != 0).count()
}

/// A sweeper over `inventory` reading standings through `live`, audit-only, with its own
/// metrics and the production state store (`orphan_sightings` in `pool`, the side's own state
/// database; a tick writes only the sightings that are new, changed or gone, and in these rounds
/// every candidate carries its run on, in the same period as in the next, so each tick writes
/// one row, and finds its sightings kept from the tick before unless a fresh process runs it):
/// how each side is built.
fn sweeper<L: LiveTokens>(
    inventory: Vec<InventoryItem>,
    live: L,
    pool: &PgPool,
    key: FingerprintKey,
) -> Sweeper<Listed, L, NoReclaimer, PgSweepState> {
    Sweeper::new(
        Listed(inventory),
        live,
        None::<NoReclaimer>,
        PgSweepState::new(pool.clone(), "bench"),
        sweep_config(),
        SweepMetrics::register(&mut Registry::default()),
        key,
    )
}

/// Both sides' sweep configuration: enabled, audit-only.
fn sweep_config() -> SweepConfig {
    SweepConfig {
        enabled: true,
        ..SweepConfig::default()
    }
}

const FINGERPRINT_KEY: &[u8; 21] = b"bench-fingerprint-key";

/// The environment variable that hands a cold tick's process the database URL (kept out of its
/// command line).
const COLD_URL_ENV: &str = "KEEL_BENCH_ORPHAN_SWEEP_URL";

/// The environment variable that hands a cold tick's process its side's state database URL.
const COLD_STATE_URL_ENV: &str = "KEEL_BENCH_ORPHAN_SWEEP_STATE_URL";

/// Each side's first tick in a process of its own, `pairs` times in alternating order: the
/// process's first tick grows a fresh heap, which the rounds above give to whichever side runs
/// first. Each process builds the same inventory, connects, then runs one measured tick.
async fn cold_rounds(urls: &[String; 3], items: u64, rows: u64, pairs: u64) -> anyhow::Result<()> {
    println!(
        "\n  first tick of a fresh process, one process per tick, {pairs} rounds (the inventory is \
         built and the pool connected before the tick):"
    );
    let exe = std::env::current_exe().context("cannot find this program to run a cold tick")?;
    let mut growth: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let samples = fair::alternate(&SIDES, pairs, async |side, _round| {
        let mut command = std::process::Command::new(&exe);
        command
            .args(["bench", COLD_TICK, "--side", &side.to_string()])
            .args(["--items", &items.to_string(), "--rows", &rows.to_string()])
            .env(COLD_URL_ENV, &urls[0])
            .env(COLD_STATE_URL_ENV, &urls[1 + side]);
        let out = tokio::task::spawn_blocking(move || command.output())
            .await?
            .context("could not run a cold tick")?;
        ensure!(
            out.status.success(),
            "the cold tick of {} failed: {}",
            SIDES[side],
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut figures = text.split_whitespace().map(str::parse::<f64>);
        let (Some(Ok(ms)), Some(Ok(kib))) = (figures.next(), figures.next()) else {
            anyhow::bail!("the cold tick of {} answered {text:?}", SIDES[side]);
        };
        growth[side].push(kib / 1024.0);
        Ok(ms)
    })
    .await?;
    fair::report(
        &SIDES,
        &samples,
        "ms per first tick",
        Better::Lower,
        "(the same goals, for a process's first tick)",
    );
    for (name, grown) in SIDES.iter().zip(&growth) {
        if let Some(s) = fair::Summary::of(grown) {
            println!(
                "  peak RSS growth of a first tick, {name:<31} median {:.1} MiB   min–max {:.1}–{:.1}",
                s.median, s.min, s.max
            );
        }
    }
    Ok(())
}

/// The subcommand that runs one cold tick (see [`cold_rounds`]); not for use on its own.
pub const COLD_TICK: &str = "orphan-sweep-cold-tick";

/// Runs one side's tick in this fresh process and prints its time in milliseconds and its peak
/// resident memory growth in KiB.
pub fn cold_tick(args: &[String]) -> anyhow::Result<()> {
    const COLD_USAGE: &str = "cargo xtask bench orphan-sweep-cold-tick --side 0|1 --items N --rows N \
                              (run by `bench orphan-sweep`, with the database URLs in its environment)";
    let side = args
        .iter()
        .position(|a| a == "--side")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&s| s < SIDES.len())
        .with_context(|| format!("--side takes 0 (Keel) or 1 (baseline)\n{COLD_USAGE}"))?;
    let items = fair::flag(args, "--items", 100_000, COLD_USAGE)?;
    let rows = fair::flag(args, "--rows", 1_000_000, COLD_USAGE)?;
    let env = |name: &str| {
        std::env::var(name).with_context(|| format!("{name} is not set\n{COLD_USAGE}"))
    };
    let (url, state_url) = (env(COLD_URL_ENV)?, env(COLD_STATE_URL_ENV)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let options: sqlx::postgres::PgConnectOptions =
            url.parse().context("the database URL does not parse")?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        // Both sides get their connections before the clock starts (Keel's read uses two).
        let held = (pool.acquire().await?, pool.acquire().await?);
        drop(held);
        let state_options: sqlx::postgres::PgConnectOptions = state_url
            .parse()
            .context("the state database URL does not parse")?;
        let state = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(state_options)
            .await?;
        drop(state.acquire().await?);
        let inventory = inventory(items, rows)?;
        let key = FingerprintKey::new(*FINGERPRINT_KEY)?;
        let now = OffsetDateTime::now_utc();
        let (elapsed, grown, report) = if side == 0 {
            let live = PgLiveTokens::new(pool.clone());
            measured_tick(&mut sweeper(inventory, live, &state, key), &state, now).await?
        } else {
            let live = PerToken(pool.clone());
            measured_tick(&mut sweeper(inventory, live, &state, key), &state, now).await?
        };
        let expected = expected_candidates(items);
        ensure!(
            candidates(&report) == expected,
            "{} found {} candidates, expected {expected}",
            SIDES[side],
            candidates(&report)
        );
        println!("{:.3} {grown}", elapsed.as_secs_f64() * 1000.0);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn the_buffer_pool_flag_takes_a_server_size_and_refuses_anything_else() {
        assert_eq!(
            shared_buffers(&args(&["--pairs", "3"])).unwrap(),
            SHARED_BUFFERS
        );
        for ok in ["128MB", "1GB", "131072kB", "128kB"] {
            assert_eq!(
                shared_buffers(&args(&["--shared-buffers", ok])).unwrap(),
                ok
            );
        }
        for bad in [
            "",
            "1",
            "1gb",
            "MB",
            "-1GB",
            "1.5GB",
            "64kB",
            "0GB",
            "2048GB",
            "1 GB",
            "1GB;",
            "99999999999999999999GB",
        ] {
            let error = shared_buffers(&args(&["--shared-buffers", bad])).unwrap_err();
            assert!(
                error
                    .to_string()
                    .starts_with("--shared-buffers takes a size"),
                "{bad:?}"
            );
        }
        let missing = shared_buffers(&args(&["--shared-buffers"])).unwrap_err();
        assert!(missing.to_string().contains(USAGE));
    }
}
