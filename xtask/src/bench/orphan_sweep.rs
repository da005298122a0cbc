//! `cargo xtask bench orphan-sweep`: one audit-only tick over 100k inventory items against 1M
//! resource rows, with the live tokens read in one set-based query, beside a baseline that asks
//! one query per token, in the same run on the same Postgres. Prints time per tick and the
//! process's peak resident memory growth during each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keel_orphan_sweep::postgres::PgLiveTokens;
use keel_orphan_sweep::{
    FingerprintKey, Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens,
    LiveTokensError, MemoryState, Reclaimer, Standings, SweepConfig, SweepMetrics, Sweeper,
    TickReport,
};
use keel_provision::{InstallationId, Provisioner, TokenDigest};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;

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

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs one tick while sampling resident memory; returns (elapsed, peak growth in KiB, report).
async fn measured_tick<L: LiveTokens, R: Reclaimer>(
    sweeper: &mut Sweeper<Listed, L, R, MemoryState>,
    now: OffsetDateTime,
) -> (Duration, u64, TickReport) {
    let before = rss_kib();
    let peak = Arc::new(AtomicU64::new(before));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, running) = (peak.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let started = Instant::now();
    let report = sweeper.tick(now).await;
    let elapsed = started.elapsed();
    running.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    (
        elapsed,
        peak.load(Ordering::Relaxed).saturating_sub(before),
        report,
    )
}

fn candidates(report: &TickReport) -> usize {
    match report {
        TickReport::Swept { candidates, .. } => candidates.len(),
        TickReport::Disabled | TickReport::Skipped { .. } | TickReport::Failed { .. } => 0,
    }
}

/// Runs the benchmark and prints its figures.
pub fn bench(items: u64, rows: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = PgServer::start_throwaway().context("could not start a throwaway Postgres")?;
    rt.block_on(async {
        server.create_database("bench_orphan", None).await?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_with(server.options_for("bench_orphan"))
            .await?;
        keel_schema::migrate(&pool).await?;
        println!(
            "orphan-sweep benchmark: {items} inventory items against {rows} resource rows, {}",
            server.describe()
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
        println!(
            "loading took {:.1} s (not counted)",
            started.elapsed().as_secs_f64()
        );

        // Half the inventory names rows (some deleted), half names tokens with no row at all.
        let created = OffsetDateTime::now_utc() - time::Duration::hours(3);
        let inventory: Vec<InventoryItem> = (0..items)
            .map(|i| {
                let n = if i % 2 == 0 { i + 1 } else { rows + i };
                InventoryItem::new(format!("cust_t{n:011}"))
                    .with_created_at(created)
                    .with_label(
                        keel_orphan_sweep::MANAGED_BY_LABEL,
                        keel_orphan_sweep::MANAGED_BY,
                    )
            })
            .collect();
        let expected = inventory
            .iter()
            .filter(|item| {
                let n: u64 = item.name["cust_t".len()..].parse().unwrap_or(0);
                n > rows || n.is_multiple_of(10)
            })
            .count();
        let config = SweepConfig {
            enabled: true,
            ..SweepConfig::default()
        };
        let key = FingerprintKey::new(*b"bench-fingerprint-key")?;
        let now = OffsetDateTime::now_utc();
        // Ticks log one line per candidate; keep the benchmark's output to its figures.
        let quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());

        let mut keel = Sweeper::new(
            Listed(inventory.clone()),
            PgLiveTokens::new(pool.clone()),
            None::<NoReclaimer>,
            MemoryState::new(),
            config.clone(),
            SweepMetrics::register(&mut Registry::default()),
            key.clone(),
        );
        let mut keel_runs = Vec::new();
        for n in 0..3 {
            // One tick per hourly period (a second tick in the same period is skipped).
            let at = now + time::Duration::hours(n);
            let (elapsed, grown, report) = measured_tick(&mut keel, at).await;
            ensure!(
                candidates(&report) == expected,
                "Keel found {} candidates, expected {expected}",
                candidates(&report)
            );
            keel_runs.push((elapsed, grown));
        }
        let mut baseline = Sweeper::new(
            Listed(inventory),
            PerToken(pool.clone()),
            None::<NoReclaimer>,
            MemoryState::new(),
            config,
            SweepMetrics::register(&mut Registry::default()),
            key,
        );
        let (base_elapsed, base_grown, report) = measured_tick(&mut baseline, now).await;
        ensure!(
            candidates(&report) == expected,
            "the baseline found {} candidates",
            candidates(&report)
        );
        drop(quiet);

        keel_runs.sort();
        let (median, grown) = keel_runs[keel_runs.len() / 2];
        println!("\n{expected} candidates per tick (audit-only)");
        println!("{:<46} {:>10} {:>16}", "", "s / tick", "peak RSS growth");
        println!(
            "{:<46} {:>10.2} {:>12.1} MiB",
            "Keel: one set-based query (median of 3 ticks)",
            median.as_secs_f64(),
            grown as f64 / 1024.0
        );
        println!(
            "{:<46} {:>10.2} {:>12.1} MiB",
            "baseline: one query per token",
            base_elapsed.as_secs_f64(),
            base_grown as f64 / 1024.0
        );
        println!(
            "Keel is {:.1}x faster per tick",
            base_elapsed.as_secs_f64() / median.as_secs_f64()
        );
        Ok(())
    })
}
