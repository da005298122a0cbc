//! `cargo xtask bench propagation`: end-to-end propagation throughput (claim, apply, fenced
//! transition and its audit row) with a no-op applier, with one and with two runner processes,
//! beside graphile_worker processing the same number of no-op jobs on the same Postgres.

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use graphile_worker::{
    IntoTaskHandlerResult, JobSpec, LocalQueueConfig, RawJobSpec, TaskHandler, WorkerContext,
    WorkerOptions,
};
use keel_propagation::postgres::PgPropagationStore;
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_propagation::{Applier, ApplyError, ApplyOutcome, Metrics, Propagation, WorkerId};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

/// Rows per claim (and applies in flight) for Keel's runners.
const BATCH: u32 = 1000;
/// graphile_worker's settings from its maintainers' own throughput test.
const PEER_CONCURRENCY: usize = 500;
const PEER_LOCAL_QUEUE: usize = 5000;

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

/// Runs the benchmark and prints its figures.
pub fn bench(rows: u64) -> anyhow::Result<()> {
    let rt = runtime()?;
    let server = PgServer::start_throwaway().context("could not start a throwaway Postgres")?;
    println!(
        "propagation benchmark: {rows} due rows, no-op applier, {}",
        server.describe()
    );
    println!("(fsync off on the throwaway server, the same for every contender)\n");

    let one = rt.block_on(keel_run(&server, "bench_keel_one", rows, 1))?;
    let two = rt.block_on(keel_run(&server, "bench_keel_two", rows, 2))?;
    let peer = rt.block_on(peer_run(&server, "bench_peer", rows))?;

    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    println!(
        "keel, 1 runner process:   {rows} rows in {:>6.2} s = {:>8.0} rows/s  (claim + apply + fenced transition + audit row)",
        one.as_secs_f64(),
        rate(one)
    );
    println!(
        "keel, 2 runner processes: {rows} rows in {:>6.2} s = {:>8.0} rows/s",
        two.as_secs_f64(),
        rate(two)
    );
    println!(
        "graphile_worker 0.14:     {rows} jobs in {:>6.2} s = {:>8.0} jobs/s  (concurrency {PEER_CONCURRENCY}, local queue {PEER_LOCAL_QUEUE}; no audit rows; enqueue took {:.2} s, not counted)",
        peer.process.as_secs_f64(),
        rate(peer.process),
        peer.enqueue.as_secs_f64()
    );
    println!(
        "\nratio keel/graphile_worker: {:.2}x with 1 process, {:.2}x with 2 processes",
        rate(one) / rate(peer.process),
        rate(two) / rate(peer.process)
    );
    Ok(())
}

async fn keel_run(
    server: &PgServer,
    db: &str,
    rows: u64,
    processes: usize,
) -> anyhow::Result<Duration> {
    server.create_database(db, None).await?;
    let pool = pool(server, db, 4).await?;
    keel_schema::migrate(&pool).await?;
    // Each row names a real resource of its team (a propagation for a missing resources row is
    // never applied), its provider id `cust_<digest>` as keel-provision names it.
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
    sqlx::query("VACUUM ANALYZE pending_propagations")
        .execute(&pool)
        .await?;

    let exe = std::env::current_exe().context("could not find the xtask binary")?;
    let url = server.url_for(db);
    let started = Instant::now();
    let children: Vec<Child> = (0..processes)
        .map(|i| {
            Command::new(&exe)
                .args([
                    "__propagation-bench-worker",
                    &url,
                    &format!("bench-{i}"),
                    &BATCH.to_string(),
                ])
                .spawn()
                .context("could not start a runner process")
        })
        .collect::<Result<_, _>>()?;
    let statuses = tokio::task::spawn_blocking(move || {
        children
            .into_iter()
            .map(|mut c| c.wait())
            .collect::<Result<Vec<_>, _>>()
    })
    .await??;
    let elapsed = started.elapsed();
    ensure!(
        statuses.iter().all(|s| s.success()),
        "a runner process failed: {statuses:?}"
    );

    let (applied, audited): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pending_propagations WHERE status = 'applied'), \
                (SELECT count(*) FROM audit_events WHERE kind = 'propagation.applied')",
    )
    .fetch_one(&pool)
    .await?;
    ensure!(
        applied == rows as i64 && audited == rows as i64,
        "expected {rows} applied rows with audit rows, found {applied} and {audited}"
    );
    pool.close().await;
    Ok(elapsed)
}

struct NoOp;

impl Applier for NoOp {
    async fn apply(&self, _: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        Ok(ApplyOutcome::Applied)
    }
}

/// A runner process: drains what is due with a no-op applier, then exits.
pub fn worker(args: &[String]) -> anyhow::Result<()> {
    let [url, worker, batch] = args else {
        bail!("usage: xtask __propagation-bench-worker URL WORKER_ID BATCH");
    };
    let batch: u32 = batch.parse().context("BATCH must be a whole number")?;
    let rt = runtime()?;
    rt.block_on(async {
        let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
        let mut config = RunnerConfig::new(WorkerId::parse(worker)?);
        config.batch_size = batch;
        let runner = Runner::new(
            Arc::new(PgPropagationStore::new(pool)),
            Arc::new(NoOp),
            Metrics::register(&mut Registry::default()),
            config,
        )?;
        runner.drain(&CancellationToken::new()).await?;
        anyhow::Ok(())
    })
}

#[derive(Clone, Debug)]
struct Done(Arc<AtomicUsize>);

#[derive(serde::Serialize, serde::Deserialize)]
struct NoOpJob {}

impl TaskHandler for NoOpJob {
    const IDENTIFIER: &'static str = "noop";

    async fn run(self, ctx: WorkerContext) -> impl IntoTaskHandlerResult {
        if let Some(done) = ctx.get_ext::<Done>() {
            done.0.fetch_add(1, Ordering::Relaxed);
        }
        Ok::<(), String>(())
    }
}

struct PeerTimes {
    enqueue: Duration,
    process: Duration,
}

async fn peer_run(server: &PgServer, db: &str, rows: u64) -> anyhow::Result<PeerTimes> {
    server.create_database(db, None).await?;
    let pool = pool(server, db, 24).await?;
    let done = Arc::new(AtomicUsize::new(0));
    let worker = WorkerOptions::default()
        .pg_pool(pool.clone())
        .schema("graphile_worker")
        .concurrency(PEER_CONCURRENCY)
        .poll_interval(Duration::from_millis(5))
        .complete_job_batch_delay(Duration::from_millis(5))
        .local_queue(LocalQueueConfig::default().with_size(PEER_LOCAL_QUEUE))
        .listen_os_shutdown_signals(false)
        .add_extension(Done(Arc::clone(&done)))
        .define_job::<NoOpJob>()
        .init()
        .await
        .map_err(|e| anyhow::anyhow!("graphile_worker init failed: {e:?}"))?;
    let worker = Arc::new(worker);

    let utils = worker.create_utils();
    let started = Instant::now();
    let mut left = rows as usize;
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
    let enqueue = started.elapsed();

    let started = Instant::now();
    let running = Arc::clone(&worker);
    let handle = tokio::spawn(async move { running.run().await });
    // Done means every job handled and its completion committed (the jobs table is empty).
    loop {
        let remaining: i64 =
            sqlx::query_scalar("SELECT count(*) FROM graphile_worker._private_jobs")
                .fetch_one(&pool)
                .await?;
        if remaining == 0 && done.load(Ordering::Relaxed) >= rows as usize {
            break;
        }
        ensure!(
            !handle.is_finished(),
            "graphile_worker stopped before finishing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let process = started.elapsed();
    worker.request_shutdown();
    handle
        .await?
        .map_err(|e| anyhow::anyhow!("graphile_worker failed: {e:?}"))?;
    Ok(PeerTimes { enqueue, process })
}
