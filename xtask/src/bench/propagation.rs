//! `cargo xtask bench propagation`: end-to-end propagation throughput with a no-op applier,
//! Keel's runner beside graphile_worker doing the same number of no-op jobs on the same server.
//!
//! Fair by construction (BENCH-1, BENCH-2, BENCH-3, BENCH-6):
//! - every run gets a fresh database on the same server, seeded before the clock starts, then
//!   the same hygiene (`VACUUM ANALYZE` of its queue tables and a `CHECKPOINT`), and is dropped
//!   after it, so no side inherits another's dead rows or autovacuum debt;
//! - every side runs inside this process and is timed the same way: from starting its worker
//!   until the worker has handled every row and has committed every completion (Keel's
//!   `Runner::drain` returns; graphile_worker's handler count reaches the total, then its
//!   graceful shutdown flushes the batched completions). Nothing polls the database while a
//!   side runs;
//! - the sides alternate, A B A B …, over `--pairs` rounds, and the report gives the median
//!   and min–max;
//! - Keel does its real work per row: the fenced transition, the `propagation.applied` audit
//!   row, and the tier landing on a real `resources` row (seeded rows name real resources of
//!   their team), all checked after each run before a figure is printed. The peer's jobs carry
//!   no audit rows and land nothing.
//!
//!
//! The second peer is `awa` (a Postgres job queue in Rust, with its client's default storage;
//! its opt-in "queue storage" engine needs a staged storage transition first), doing the same
//! no-op jobs, timed the same way: from starting its client until its handler has run every job
//! and its graceful shutdown has committed every completion.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use graphile_worker::{
    IntoTaskHandlerResult, JobSpec, LocalQueueConfig, RawJobSpec, TaskHandler, WorkerContext,
    WorkerOptions,
};
use keel_audit::Actor;
use keel_propagation::postgres::PgPropagationStore;
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_propagation::{
    Applier, ApplyError, ApplyOutcome, Completion, CompletionReport, Metrics, Propagation,
    PropagationStore, StoreError, WorkerId,
};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::fair;

/// Rows per claim (and applies in flight) for Keel's runner.
const BATCH: u32 = 1000;
/// Connections Keel's runner may use (claims and recordings overlap).
const KEEL_CONNECTIONS: u32 = 4;
/// graphile_worker's settings from its maintainers' own throughput test.
const PEER_CONCURRENCY: usize = 500;
const PEER_LOCAL_QUEUE: usize = 5000;
const PEER_CONNECTIONS: u32 = 24;

/// awa's settings from its maintainers' own throughput test: workers per queue, how often an
/// idle dispatcher looks for work, and connections. With 500 workers (graphile_worker's
/// concurrency) awa ran at 13,300–19,900 jobs/s in four rounds here and at 1,600–1,700 in two
/// others; with 100 it runs steadily, so the bench keeps its maintainers' setting.
const AWA_WORKERS: u32 = 100;
const AWA_POLL: Duration = Duration::from_millis(50);
const AWA_CONNECTIONS: u32 = 20;
/// The queue the awa side's jobs go to.
const AWA_QUEUE: &str = "keel_bench";

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
}

async fn pool(server: &PgServer, db: &str, connections: u32) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .connect_with(server.options_for(db))
        .await?)
}

/// The same hygiene for every side, after seeding and before the clock starts.
async fn settle(pool: &PgPool, tables: &[&str]) -> anyhow::Result<()> {
    for table in tables {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(pool)
            .await
            .with_context(|| format!("could not vacuum {table}"))?;
    }
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

const SIDES: [&str; 3] = [
    "keel runner (audit + tier)",
    "graphile_worker 0.14",
    "awa 0.6",
];

/// Runs the benchmark and prints its figures.
pub fn bench(rows: u64, pairs: u64) -> anyhow::Result<()> {
    let rt = runtime()?;
    let server = PgServer::start_throwaway().context("could not start a throwaway Postgres")?;
    fair::header(
        &format!("propagation benchmark: {rows} due rows, no-op work, {pairs} pairs"),
        &format!("cargo xtask bench propagation --rows {rows} --pairs {pairs}"),
        &server.describe(),
        &format!(
            "fsync, synchronous_commit, full_page_writes off (the same server for every side); \
             keel: batch {BATCH}, {KEEL_CONNECTIONS} connections; graphile_worker: concurrency \
             {PEER_CONCURRENCY}, local queue {PEER_LOCAL_QUEUE}, {PEER_CONNECTIONS} connections; \
             awa: {AWA_WORKERS} workers, poll {} ms, {AWA_CONNECTIONS} connections",
            AWA_POLL.as_millis()
        ),
    );
    let samples = rt.block_on(fair::alternate(&SIDES, pairs, async |side, round| {
        let db = format!("bench_propagation_{side}_{round}");
        server.create_database(&db, None).await?;
        let elapsed = match side {
            0 => keel_run(&server, &db, rows).await,
            1 => peer_run(&server, &db, rows).await,
            _ => awa_run(&server, &db, rows).await,
        };
        server.drop_database(&db).await?;
        Ok(rows as f64 / elapsed?.as_secs_f64())
    }))?;
    fair::report(
        &SIDES,
        &samples,
        "rows/s",
        fair::Better::Higher,
        "keel >= 1.5x the best peer, and >= 15k rows/s absolute",
    );
    Ok(())
}

/// Seeds `rows` due tier elevations, each for a real `free` resource of a `pro` team, drains
/// them with one runner, and checks every row applied, audited and landed.
async fn keel_run(server: &PgServer, db: &str, rows: u64) -> anyhow::Result<Duration> {
    let pool = pool(server, db, KEEL_CONNECTIONS).await?;
    keel_schema::migrate(&pool).await?;
    sqlx::query(
        "WITH team AS (INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro') RETURNING id) \
         INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
         SELECT gen_random_uuid(), 'bench' || lpad(g::text, 12, '0'), team.id, 'postgres', 'free', 'active', \
                $2 || keel_token_digest('bench' || lpad(g::text, 12, '0')), 'postgres://bench@127.0.0.1/x' \
         FROM generate_series(1, $1) g, team",
    )
    .bind(i64::try_from(rows)?)
    // Named as keel-provision names it: the prefix and the token's digest.
    .bind(keel_provision::DATABASE_PREFIX)
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, next_attempt_at) \
         SELECT 'tier_elevation', team_id, id, 'postgres', \
                '{\"target_tier\": \"pro\"}', now() - interval '1 minute' \
         FROM resources",
    )
    .execute(&pool)
    .await?;
    settle(
        &pool,
        &["pending_propagations", "resources", "audit_events"],
    )
    .await?;

    let mut config = RunnerConfig::new(WorkerId::parse("bench")?);
    config.batch_size = BATCH;
    let store = Arc::new(Timed::new(PgPropagationStore::new(pool.clone())));
    let runner = Runner::new(
        Arc::clone(&store),
        Arc::new(NoOp),
        Metrics::register(&mut Registry::default()),
        config,
    )?;
    let started = Instant::now();
    let report = runner.drain(&CancellationToken::new()).await?;
    let elapsed = started.elapsed();

    let (applied, audited, landed): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pending_propagations WHERE status = 'applied'), \
                (SELECT count(*) FROM audit_events WHERE kind = 'propagation.applied'), \
                (SELECT count(*) FROM resources WHERE tier = 'pro')",
    )
    .fetch_one(&pool)
    .await?;
    let rows = i64::try_from(rows)?;
    ensure!(
        applied == rows && audited == rows && landed == rows,
        "expected {rows} rows applied, audited and landed; found {applied}, {audited} and \
         {landed} (runner report: {report:?})"
    );
    println!("    keel: {}", store.breakdown(elapsed));
    pool.close().await;
    Ok(elapsed)
}

/// The store, with the time spent in each of its calls added up (calls overlap: claims and
/// recordings run side by side), to show where a run's time goes.
struct Timed<S> {
    inner: S,
    /// Per call kind (now, claim, complete, release): calls, rows, microseconds.
    calls: std::sync::Mutex<[(u64, u64, u64); 4]>,
}

impl<S> Timed<S> {
    fn new(inner: S) -> Self {
        Self {
            inner,
            calls: std::sync::Mutex::new([(0, 0, 0); 4]),
        }
    }

    fn add(&self, kind: usize, rows: usize, started: Instant) {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        if let Ok(mut calls) = self.calls.lock() {
            calls[kind].0 += 1;
            calls[kind].1 += rows as u64;
            calls[kind].2 += micros;
        }
    }

    fn breakdown(&self, wall: Duration) -> String {
        let calls = self.calls.lock().map(|c| *c).unwrap_or_default();
        let names = ["clock reads", "claims", "recordings", "releases"];
        let parts: Vec<String> = names
            .iter()
            .zip(calls)
            .filter(|(_, (n, _, _))| *n > 0)
            .map(|(name, (n, rows, micros))| {
                format!("{n} {name} ({rows} rows) busy {:.2} s", micros as f64 / 1e6)
            })
            .collect();
        format!("{} over {:.2} s", parts.join(", "), wall.as_secs_f64())
    }
}

impl<S: PropagationStore> PropagationStore for Timed<S> {
    async fn now(&self) -> Result<time::OffsetDateTime, StoreError> {
        let started = Instant::now();
        let now = self.inner.now().await;
        self.add(0, 0, started);
        now
    }

    async fn claim(
        &self,
        worker: &WorkerId,
        limit: u32,
        lease: time::Duration,
        now: time::OffsetDateTime,
    ) -> Result<Vec<Propagation>, StoreError> {
        let started = Instant::now();
        let claimed = self.inner.claim(worker, limit, lease, now).await;
        self.add(1, claimed.as_ref().map_or(0, Vec::len), started);
        claimed
    }

    async fn complete(
        &self,
        worker: &WorkerId,
        completions: &[Completion],
        actor: &Actor,
        now: time::OffsetDateTime,
    ) -> Result<CompletionReport, StoreError> {
        let started = Instant::now();
        let report = self.inner.complete(worker, completions, actor, now).await;
        self.add(2, completions.len(), started);
        report
    }

    async fn release(
        &self,
        worker: &WorkerId,
        propagations: &[Propagation],
        due_at: time::OffsetDateTime,
        now: time::OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let started = Instant::now();
        let released = self.inner.release(worker, propagations, due_at, now).await;
        self.add(3, propagations.len(), started);
        released
    }
}

struct NoOp;

impl Applier for NoOp {
    async fn apply(&self, _: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        Ok(ApplyOutcome::Applied)
    }
}

/// The peer's in-process completion signal: jobs handled so far, and a wake-up at the total.
#[derive(Clone, Debug)]
struct Done {
    handled: Arc<AtomicUsize>,
    total: usize,
    all: Arc<Notify>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NoOpJob {}

impl TaskHandler for NoOpJob {
    const IDENTIFIER: &'static str = "noop";

    async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        if let Some(done) = ctx.get_ext::<Done>()
            && done.handled.fetch_add(1, Ordering::Relaxed) + 1 == done.total
        {
            done.all.notify_one();
        }
        Ok::<(), String>(())
    }
}

/// Enqueues `rows` no-op jobs (not timed), then times graphile_worker from its start until it
/// has handled them all and its shutdown has committed every completion.
async fn peer_run(server: &PgServer, db: &str, rows: u64) -> anyhow::Result<Duration> {
    let pool = pool(server, db, PEER_CONNECTIONS).await?;
    let total = usize::try_from(rows)?;
    let done = Done {
        handled: Arc::new(AtomicUsize::new(0)),
        total,
        all: Arc::new(Notify::new()),
    };
    let worker = WorkerOptions::default()
        .pg_pool(pool.clone())
        .schema("graphile_worker")
        .concurrency(PEER_CONCURRENCY)
        .poll_interval(Duration::from_millis(5))
        .complete_job_batch_delay(Duration::from_millis(5))
        .local_queue(LocalQueueConfig::default().with_size(PEER_LOCAL_QUEUE))
        .listen_os_shutdown_signals(false)
        .add_extension(done.clone())
        .define_job::<NoOpJob>()
        .init()
        .await
        .map_err(|e| anyhow::anyhow!("graphile_worker init failed: {e:?}"))?;
    let worker = Arc::new(worker);

    let utils = worker.create_utils();
    let mut left = total;
    while left > 0 {
        let chunk = left.min(10_000);
        let jobs: Vec<RawJobSpec> = (0..chunk)
            .map(|_| RawJobSpec {
                identifier: NoOpJob::IDENTIFIER.to_owned(),
                payload: serde_json::json!({}),
                spec: JobSpec::default(),
            })
            .collect();
        utils
            .add_raw_jobs(&jobs)
            .await
            .map_err(|e| anyhow::anyhow!("graphile_worker enqueue failed: {e:?}"))?;
        left -= chunk;
    }
    settle(
        &pool,
        &[
            "graphile_worker._private_jobs",
            "graphile_worker._private_tasks",
            "graphile_worker._private_job_queues",
        ],
    )
    .await?;

    let started = Instant::now();
    let running = Arc::clone(&worker);
    let mut handle = tokio::spawn(async move { running.run().await });
    tokio::select! {
        _ = done.all.notified() => {}
        stopped = &mut handle => {
            anyhow::bail!("graphile_worker stopped before finishing: {stopped:?}");
        }
    }
    worker.request_shutdown();
    handle
        .await?
        .map_err(|e| anyhow::anyhow!("graphile_worker failed: {e:?}"))?;
    let elapsed = started.elapsed();

    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM graphile_worker._private_jobs")
        .fetch_one(&pool)
        .await?;
    ensure!(
        left == 0 && done.handled.load(Ordering::Relaxed) == total,
        "graphile_worker left {left} jobs and handled {} of {total}",
        done.handled.load(Ordering::Relaxed)
    );
    pool.close().await;
    Ok(elapsed)
}

/// The awa side's job: no arguments, no work.
#[derive(serde::Serialize, serde::Deserialize, awa::JobArgs)]
struct AwaNoOp {}

/// Enqueues `rows` no-op jobs into awa (not timed), then times its client from its start until
/// its handler has run them all and its shutdown has committed every completion.
async fn awa_run(server: &PgServer, db: &str, rows: u64) -> anyhow::Result<Duration> {
    let pool = sqlx08::postgres::PgPoolOptions::new()
        .max_connections(AWA_CONNECTIONS)
        .connect(&server.url_for(db))
        .await
        .context("could not connect awa's pool")?;
    awa::migrations::run(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("awa's migrations failed: {e}"))?;
    let total = usize::try_from(rows)?;
    let done = Done {
        handled: Arc::new(AtomicUsize::new(0)),
        total,
        all: Arc::new(Notify::new()),
    };
    let mut left = total;
    while left > 0 {
        // awa binds a dozen parameters per job; a statement takes at most 65,535.
        let chunk = left.min(5_000);
        let jobs = (0..chunk)
            .map(|_| {
                awa::model::insert::params_with(
                    &AwaNoOp {},
                    awa::InsertOpts {
                        queue: AWA_QUEUE.into(),
                        ..Default::default()
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("awa job parameters: {e}"))?;
        awa::insert_many(&pool, &jobs)
            .await
            .map_err(|e| anyhow::anyhow!("awa enqueue failed: {e}"))?;
        left -= chunk;
    }
    for table in ["awa.jobs_hot", "awa.scheduled_jobs"] {
        let vacuum = format!("VACUUM ANALYZE {table}");
        sqlx08::query(&vacuum)
            .execute(&pool)
            .await
            .with_context(|| format!("could not vacuum {table}"))?;
    }
    sqlx08::query("CHECKPOINT").execute(&pool).await?;

    let counter = done.clone();
    let client = awa::Client::builder(pool.clone())
        .queue(
            AWA_QUEUE,
            awa::QueueConfig {
                max_workers: AWA_WORKERS,
                poll_interval: AWA_POLL,
                ..Default::default()
            },
        )
        .register::<AwaNoOp, _, _>(move |_job, _ctx| {
            let counter = counter.clone();
            async move {
                if counter.handled.fetch_add(1, Ordering::Relaxed) + 1 == counter.total {
                    counter.all.notify_one();
                }
                Ok(awa::JobResult::Completed)
            }
        })
        .build()
        .map_err(|e| anyhow::anyhow!("awa client: {e}"))?;
    let started = Instant::now();
    client
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("awa did not start: {e}"))?;
    tokio::time::timeout(Duration::from_secs(600), done.all.notified())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "awa handled {} of {total} jobs in 10 minutes",
                done.handled.load(Ordering::Relaxed)
            )
        })?;
    client.shutdown(Duration::from_secs(60)).await;
    let elapsed = started.elapsed();

    let completed: i64 = sqlx08::query_scalar(
        "SELECT count(*) FROM awa.jobs WHERE queue = $1 AND state = 'completed'",
    )
    .bind(AWA_QUEUE)
    .fetch_one(&pool)
    .await?;
    ensure!(
        completed == i64::try_from(total)? && done.handled.load(Ordering::Relaxed) == total,
        "awa completed {completed} jobs and handled {} of {total}",
        done.handled.load(Ordering::Relaxed)
    );
    pool.close().await;
    Ok(elapsed)
}
