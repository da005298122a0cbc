//! `cargo xtask bench provision`: what two-phase provisioning costs.
//!
//! 1. Finalize overhead: reserve (a `pending` row, one commit) + activate (the row `active` with
//!    its `provision.created` audit row, one statement and one commit), against a bare INSERT of
//!    the same `active` row on the same pool. The sides are interleaved one resource at a time,
//!    which goes first alternating (A B, B A, ...), `--resources` rows each per round, over
//!    `--pairs` rounds; each round's p99 (and p50) per resource is a figure.
//! 2. `--concurrent` provisions at once against the shared-cluster backend (real `CREATE ROLE`
//!    and `CREATE DATABASE`), `--pairs` bursts: throughput, latency against the burst's wall
//!    time (a convoy shows as p50 near the wall time), and the pools' behaviour; each burst's
//!    rows are checked `active` with their audit rows, then deprovisioned through the chokepoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use keel_audit::{Actor, AuditEvent, AuditKind, RequestId, ResourceId, ResourceType, TeamId, Tier};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{
    BackendObject, ConnectionUrl, DatabaseName, DeprovisionCause, DeprovisionReason,
    DeprovisionTarget, NewReservation, ProvisionMetrics, ProvisionRequest, Provisioner,
    ResourceStore as _, new_token,
};
use keel_testkit::PgServer;
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use time::OffsetDateTime;

use super::fair;

const STORE_CONNECTIONS: u32 = 16;
const BACKEND_CONNECTIONS: u32 = 8;
/// Provisions running at once, as `provision-api`'s `--max-in-flight` admits by default; the
/// rest of a burst waits its turn (the service would answer them 503 and have them retry).
const IN_FLIGHT: usize = 32;

/// Runs the benchmark and prints its figures.
pub fn bench(resources: u64, concurrent: u64, pairs: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = PgServer::start_throwaway().context("could not start a throwaway Postgres")?;
    rt.block_on(async {
        server.create_database("bench_provision", None).await?;
        let pool = PgPoolOptions::new()
            .max_connections(STORE_CONNECTIONS)
            .connect_with(server.options_for("bench_provision"))
            .await?;
        keel_schema::migrate(&pool).await?;
        let team = TeamId::new_random();
        sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
            .bind(team.as_uuid())
            .execute(&pool)
            .await?;
        fair::header(
            &format!(
                "provision benchmark: finalize overhead over {resources} resources a round, \
                 bursts of {concurrent} concurrent provisions, {pairs} rounds"
            ),
            &format!(
                "cargo xtask bench provision --resources {resources} --concurrent {concurrent} \
                 --pairs {pairs}"
            ),
            &server.describe(),
            &format!(
                "fsync, synchronous_commit, full_page_writes off; store pool \
                 {STORE_CONNECTIONS} connections, backend pool {BACKEND_CONNECTIONS}"
            ),
        );
        finalize_overhead(&pool, team, resources, pairs).await?;
        concurrent_provisions(&server, &pool, team, concurrent, pairs).await
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    fair::quantile(sorted, p).unwrap_or(Duration::ZERO)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const FINALIZE_SIDES: [&str; 2] = ["reserve + activate + audit", "bare INSERT, same row"];

async fn finalize_overhead(pool: &PgPool, team: TeamId, n: u64, pairs: u64) -> anyhow::Result<()> {
    let store = PgResourceStore::new(pool.clone());
    let tier = Tier::parse("pro")?;
    let url = ConnectionUrl::new("postgres://bench:bench@127.0.0.1:5432/bench");
    println!(
        "1. finalize overhead, p99 ms per resource, {n} resources per side and round, the sides \
         interleaved one resource at a time:"
    );
    let mut samples: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut p50s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..usize::try_from(pairs)? {
        let mut latencies = [Vec::new(), Vec::new()];
        let mut ids: [Vec<uuid::Uuid>; 2] = [Vec::new(), Vec::new()];
        for i in 0..n {
            // One resource of each side at a time, the first side alternating (A B, B A, ...):
            // whatever slows the machine for a moment (a checkpoint, autovacuum, another
            // process) meets both sides alike, so each side's tail is measured under the same
            // conditions as the other's.
            let sides = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for side in sides {
                let (id, elapsed) = finalize_one(&store, pool, team, &tier, &url, side).await?;
                ids[side].push(id);
                latencies[side].push(elapsed);
            }
        }
        for side in 0..2 {
            // Every row is there and active; Keel's each with its audit row.
            let (active, audited): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM resources WHERE id = ANY($1) AND status = 'active'), \
                        (SELECT count(*) FROM audit_events \
                          WHERE kind = 'provision.created' AND resource_id = ANY($1))",
            )
            .bind(&ids[side])
            .fetch_one(pool)
            .await?;
            let expected_audit = if side == 0 { ids[side].len() as i64 } else { 0 };
            ensure!(
                active == ids[side].len() as i64 && audited == expected_audit,
                "expected {} active rows and {expected_audit} audit rows, found {active} and {audited}",
                ids[side].len()
            );
            let latencies = &mut latencies[side];
            latencies.sort();
            p50s[side].push(ms(percentile(latencies, 0.50)));
            let p99 = ms(percentile(latencies, 0.99));
            fair::print_round(round, FINALIZE_SIDES[side], p99);
            samples[side].push(p99);
        }
    }
    for (name, p50) in FINALIZE_SIDES.iter().zip(&p50s) {
        if let Some(s) = fair::Summary::of(p50) {
            println!(
                "  {name:<28} p50 median {:.3} ms (min–max {:.3}–{:.3})",
                s.median, s.min, s.max
            );
        }
    }
    if let (Some(keel), Some(bare)) = (fair::Summary::of(&p50s[0]), fair::Summary::of(&p50s[1])) {
        println!("  overhead at p50: {:.2}x", keel.median / bare.median);
    }
    println!("  p99 per round:");
    let ratio = fair::report(
        &FINALIZE_SIDES,
        &samples[..],
        "ms",
        fair::Better::Lower,
        "overhead (keel's p99 over the bare INSERT's) <= 2x, i.e. the ratio above >= 0.50x",
    );
    if let Some(ratio) = ratio {
        println!("  overhead at p99: {:.2}x (goal <= 2x)", 1.0 / ratio);
    }
    Ok(())
}

/// One resource of `side`: Keel's reserve and activate with its audit row (side 0), or a bare
/// INSERT of the same `active` row (side 1). Returns the row's id and the time it took.
async fn finalize_one(
    store: &PgResourceStore,
    pool: &PgPool,
    team: TeamId,
    tier: &Tier,
    url: &ConnectionUrl,
    side: usize,
) -> anyhow::Result<(uuid::Uuid, Duration)> {
    let now = OffsetDateTime::now_utc();
    let id = ResourceId::new_random();
    if side == 0 {
        let started = Instant::now();
        let token = store
            .reserve(&NewReservation {
                id,
                team_id: team,
                resource_type: ResourceType::Postgres,
                tier: tier.clone(),
                now,
            })
            .await?;
        let object = BackendObject {
            provider_id: DatabaseName::for_token(&token).expose().to_owned(),
            connection_url: url.clone(),
        };
        let audit = AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), now)
            .team(team)
            .resource(id)
            .attr("resource_type", "postgres")?
            .attr("tier", "pro")?;
        store.activate(id, &object, &audit, now).await?;
        return Ok((id.as_uuid(), started.elapsed()));
    }
    let token = new_token();
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                provider_resource_id, connection_url, created_at, updated_at) \
         VALUES ($1, $2, $3, 'postgres', 'pro', 'active', $4, $5, $6, $6)",
    )
    .bind(id.as_uuid())
    .bind(token.expose())
    .bind(team.as_uuid())
    .bind(DatabaseName::for_token(&token).expose())
    .bind(url.expose())
    .bind(now)
    .execute(pool)
    .await?;
    Ok((id.as_uuid(), started.elapsed()))
}

async fn concurrent_provisions(
    server: &PgServer,
    pool: &PgPool,
    team: TeamId,
    concurrent: u64,
    rounds: u64,
) -> anyhow::Result<()> {
    let backend = PgClusterBackend::new(server.admin_options(), None, BACKEND_CONNECTIONS);
    let admin = backend.admin_pool().clone();
    let provisioner = Arc::new(Provisioner::new(
        PgResourceStore::new(pool.clone()),
        backend,
        ProvisionMetrics::register(&mut Registry::default()),
    ));
    println!(
        "\n2. bursts of {concurrent} provisions submitted at once, {IN_FLIGHT} admitted at a time \
         (provision-api's default --max-in-flight), CREATE ROLE + CREATE DATABASE each, store \
         pool {STORE_CONNECTIONS}, backend pool {BACKEND_CONNECTIONS}, {rounds} bursts:"
    );
    let (mut rates, mut p50_share) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let burst = burst(&provisioner, pool, &admin, team, concurrent, round).await?;
        println!(
            "  burst {}: {concurrent} in {:.2} s = {:.1} provisions/s; latency once admitted p50 \
             {:.0} ms, p99 {:.0} ms, max {:.0} ms; from submission p50 {:.0} ms; busiest pools: \
             store {}/{STORE_CONNECTIONS}, backend {}/{BACKEND_CONNECTIONS}; {} deprovisions in \
             {:.2} s   ({})",
            round + 1,
            burst.wall.as_secs_f64(),
            concurrent as f64 / burst.wall.as_secs_f64(),
            ms(burst.p50),
            ms(burst.p99),
            ms(burst.max),
            ms(burst.submitted_p50),
            burst.store_busy,
            burst.admin_busy,
            concurrent,
            burst.deprovision.as_secs_f64(),
            fair::load()
        );
        rates.push(concurrent as f64 / burst.wall.as_secs_f64());
        p50_share.push(burst.p50.as_secs_f64() / burst.wall.as_secs_f64());
    }
    if let (Some(rate), Some(share)) = (fair::Summary::of(&rates), fair::Summary::of(&p50_share)) {
        println!(
            "\n  provisions/s: median {:.1} (min–max {:.1}–{:.1}); goal >= 86 (2x 43)",
            rate.median, rate.min, rate.max
        );
        println!(
            "  p50 latency once admitted, as a share of the burst's wall time: median {:.2} \
             (min–max {:.2}–{:.2}); a convoy shows as about 1.0",
            share.median, share.min, share.max
        );
    }
    println!("  after the runs: {}", fair::load());
    Ok(())
}

struct Burst {
    wall: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    /// Median time from submission (admission wait included) to done.
    submitted_p50: Duration,
    store_busy: u32,
    admin_busy: u32,
    deprovision: Duration,
}

type BenchProvisioner = Provisioner<PgResourceStore, PgClusterBackend>;

/// One burst: `concurrent` provisions at once, checked, then all deprovisioned.
async fn burst(
    provisioner: &Arc<BenchProvisioner>,
    pool: &PgPool,
    admin: &PgPool,
    team: TeamId,
    concurrent: u64,
    round: u64,
) -> anyhow::Result<Burst> {
    // Samples how many connections each pool holds busy.
    let (store_busy, admin_busy) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pool, admin) = (pool.clone(), admin.clone());
        let (store_busy, admin_busy, sampling) =
            (store_busy.clone(), admin_busy.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let busy = |p: &PgPool| p.size().saturating_sub(p.num_idle() as u32);
                store_busy.fetch_max(busy(&pool), Ordering::Relaxed);
                admin_busy.fetch_max(busy(&admin), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let admission = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrent {
        let provisioner = provisioner.clone();
        let admission = Arc::clone(&admission);
        tasks.push(tokio::spawn(async move {
            let submitted = Instant::now();
            let _admitted = admission.acquire_owned().await?;
            let request = ProvisionRequest {
                team_id: team,
                resource_type: ResourceType::Postgres,
                tier: Tier::parse("pro")?,
                request_id: RequestId::parse(&format!("bench-{round}-{i}"))?,
                actor: Actor::parse("bench")?,
            };
            let began = Instant::now();
            let provisioned = provisioner
                .provision(request, OffsetDateTime::now_utc())
                .await?;
            anyhow::Ok((provisioned.id(), began.elapsed(), submitted.elapsed()))
        }));
    }
    let mut ids = Vec::new();
    let mut latencies = Vec::new();
    let mut waits = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match task.await? {
            Ok((id, latency, since_submitted)) => {
                ids.push(id);
                latencies.push(latency);
                waits.push(since_submitted);
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let wall = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    ensure!(
        failures.is_empty(),
        "{} of {concurrent} provisions failed, the first: {}",
        failures.len(),
        failures[0]
    );
    latencies.sort();
    waits.sort();
    // Every provision left an active row with its audit row and a real database.
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    let (active, audited): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM resources WHERE id = ANY($1) AND status = 'active'), \
                (SELECT count(*) FROM audit_events \
                  WHERE kind = 'provision.created' AND resource_id = ANY($1))",
    )
    .bind(&uuids)
    .fetch_one(pool)
    .await?;
    let databases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'cust\\_%'")
            .fetch_one(admin)
            .await?;
    let n = i64::try_from(concurrent)?;
    ensure!(
        active == n && audited == n && databases == n,
        "expected {n} active rows, audit rows and databases; found {active}, {audited} and \
         {databases}"
    );

    let cause = DeprovisionCause {
        reason: DeprovisionReason::Operator,
        actor: Actor::parse("bench")?,
        request_id: None,
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for id in ids.iter().copied() {
        let (provisioner, cause) = (provisioner.clone(), cause.clone());
        let admission = Arc::clone(&admission);
        tasks.push(tokio::spawn(async move {
            let _admitted = admission.acquire_owned().await?;
            provisioner
                .deprovision(
                    DeprovisionTarget::Resource(id),
                    &cause,
                    OffsetDateTime::now_utc(),
                )
                .await
                .map_err(anyhow::Error::from)
        }));
    }
    for task in tasks {
        task.await??;
    }
    let deprovision = started.elapsed();
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'cust\\_%'")
            .fetch_one(admin)
            .await?;
    ensure!(left == 0, "{left} customer databases left behind");
    Ok(Burst {
        wall,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        submitted_p50: percentile(&waits, 0.50),
        store_busy: store_busy.load(Ordering::Relaxed),
        admin_busy: admin_busy.load(Ordering::Relaxed),
        deprovision,
    })
}
