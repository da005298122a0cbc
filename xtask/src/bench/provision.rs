//! `cargo xtask bench provision`: what two-phase provisioning costs.
//!
//! 1. Finalize overhead: reserve (a `pending` row) + activate (the row `active` with its
//!    `provision.created` audit row, one transaction), against a bare INSERT of the same `active`
//!    row, interleaved on the same connection pool, p50/p99 per resource.
//! 2. 200 concurrent provisions against the shared-cluster backend (real `CREATE ROLE` and
//!    `CREATE DATABASE`): throughput, latency, and the pools' behaviour; then 200 deprovisions
//!    through the chokepoint.

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

const STORE_CONNECTIONS: u32 = 16;
const BACKEND_CONNECTIONS: u32 = 8;

/// Runs the benchmark and prints its figures.
pub fn bench(resources: u64, concurrent: u64) -> anyhow::Result<()> {
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
        println!("provision benchmark on {}", server.describe());
        finalize_overhead(&pool, team, resources).await?;
        concurrent_provisions(&server, &pool, team, concurrent).await
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn finalize_overhead(pool: &PgPool, team: TeamId, n: u64) -> anyhow::Result<()> {
    let store = PgResourceStore::new(pool.clone());
    let tier = Tier::parse("pro")?;
    let url = ConnectionUrl::new("postgres://bench:bench@127.0.0.1:5432/bench");
    let (mut keel, mut bare) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let now = OffsetDateTime::now_utc();
        // Keel: reserve + activate with its audit row.
        let id = ResourceId::new_random();
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
        keel.push(started.elapsed());

        // Peer: a bare INSERT of the same active row.
        let token = new_token();
        let started = Instant::now();
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                    provider_resource_id, connection_url, created_at, updated_at) \
             VALUES ($1, $2, $3, 'postgres', 'pro', 'active', $4, $5, $6, $6)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(token.expose())
        .bind(team.as_uuid())
        .bind(DatabaseName::for_token(&token).expose())
        .bind(url.expose())
        .bind(now)
        .execute(pool)
        .await?;
        bare.push(started.elapsed());
    }
    keel.sort();
    bare.sort();
    println!("\n1. finalize overhead, {n} resources each (interleaved):");
    println!("   {:<44} {:>9} {:>9}", "", "p50 ms", "p99 ms");
    for (label, sorted) in [
        ("reserve + activate + audit (two transactions)", &keel),
        ("bare INSERT of the same active row", &bare),
    ] {
        println!(
            "   {label:<44} {:>9.3} {:>9.3}",
            ms(percentile(sorted, 0.50)),
            ms(percentile(sorted, 0.99))
        );
    }
    println!(
        "   overhead: {:.2}x at p50, {:.2}x at p99",
        ms(percentile(&keel, 0.50)) / ms(percentile(&bare, 0.50)),
        ms(percentile(&keel, 0.99)) / ms(percentile(&bare, 0.99))
    );
    Ok(())
}

async fn concurrent_provisions(
    server: &PgServer,
    pool: &PgPool,
    team: TeamId,
    concurrent: u64,
) -> anyhow::Result<()> {
    let backend = PgClusterBackend::new(server.admin_options(), None, BACKEND_CONNECTIONS);
    let admin = backend.admin_pool().clone();
    let provisioner = Arc::new(Provisioner::new(
        PgResourceStore::new(pool.clone()),
        backend,
        ProvisionMetrics::register(&mut Registry::default()),
    ));
    // Samples how many connections each pool holds and how many are busy.
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
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrent {
        let provisioner = provisioner.clone();
        tasks.push(tokio::spawn(async move {
            let request = ProvisionRequest {
                team_id: team,
                resource_type: ResourceType::Postgres,
                tier: Tier::parse("pro")?,
                request_id: RequestId::parse(&format!("bench-{i}"))?,
                actor: Actor::parse("bench")?,
            };
            let began = Instant::now();
            let provisioned = provisioner
                .provision(request, OffsetDateTime::now_utc())
                .await?;
            anyhow::Ok((provisioned.id(), began.elapsed()))
        }));
    }
    let mut ids = Vec::new();
    let mut latencies = Vec::new();
    let mut failures = 0;
    for task in tasks {
        match task.await? {
            Ok((id, latency)) => {
                ids.push(id);
                latencies.push(latency);
            }
            Err(e) => {
                failures += 1;
                eprintln!("a provisioning failed: {e:#}");
            }
        }
    }
    let wall = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    latencies.sort();
    println!(
        "\n2. {concurrent} concurrent provisions (CREATE ROLE + CREATE DATABASE each), \
         store pool {STORE_CONNECTIONS}, backend pool {BACKEND_CONNECTIONS}:"
    );
    println!(
        "   {} provisioned, {failures} failed in {:.2} s: {:.1} provisions/s",
        ids.len(),
        wall.as_secs_f64(),
        ids.len() as f64 / wall.as_secs_f64()
    );
    if !latencies.is_empty() {
        println!(
            "   latency per provision: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            ms(percentile(&latencies, 0.50)),
            ms(percentile(&latencies, 0.99)),
            ms(latencies[latencies.len() - 1])
        );
    }
    println!(
        "   busiest: store pool {}/{STORE_CONNECTIONS} connections, backend pool {}/{BACKEND_CONNECTIONS}",
        store_busy.load(Ordering::Relaxed),
        admin_busy.load(Ordering::Relaxed)
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
        tasks.push(tokio::spawn(async move {
            provisioner
                .deprovision(
                    DeprovisionTarget::Resource(id),
                    &cause,
                    OffsetDateTime::now_utc(),
                )
                .await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let wall = started.elapsed();
    println!(
        "   {} deprovisions through the chokepoint in {:.2} s: {:.1}/s",
        ids.len(),
        wall.as_secs_f64(),
        ids.len() as f64 / wall.as_secs_f64()
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE 'cust\\_%'")
            .fetch_one(&admin)
            .await?;
    ensure!(left == 0, "{left} customer databases left behind");
    Ok(())
}
