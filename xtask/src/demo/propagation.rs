//! The propagation act: a team's upgrade reaches one database and not the other, and the one it
//! could not reach retries loudly — `propagation.unexpected_skip`, never `propagation.applied` —
//! until it dead-letters.

use std::sync::Arc;

use anyhow::{Context, ensure};
use keel_audit::postgres::insert;
use keel_audit::{Actor, AuditEvent, AuditKind, ResourceId, TeamId};
use keel_propagation::postgres::{PgPropagationStore, PgRoleApplier, TierRoleSettings};
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_propagation::{Metrics, RetryPolicy, WorkerId};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::step;

async fn create_resource(
    pool: &PgPool,
    team: TeamId,
    token: &str,
    with_role: bool,
) -> anyhow::Result<ResourceId> {
    let resource = ResourceId::new_random();
    let role = format!("cust_{token}");
    if with_role {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {} LOGIN CONNECTION LIMIT 10",
            keel_testkit::quote_ident(&role)
        )))
        .execute(pool)
        .await?;
    }
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, 'postgres', 'hobby', 'active', $4, 'postgres://customer@127.0.0.1/db')",
    )
    .bind(resource.as_uuid())
    .bind(token)
    .bind(team.as_uuid())
    .bind(&role)
    .execute(pool)
    .await?;
    Ok(resource)
}

async fn kinds(pool: &PgPool, resource: ResourceId) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT kind FROM audit_events WHERE resource_id = $1 ORDER BY id")
            .bind(resource.as_uuid())
            .fetch_all(pool)
            .await?,
    )
}

/// Runs the propagation act.
pub async fn tier_elevations(pool: &PgPool) -> anyhow::Result<()> {
    // Whole seconds, so the schedule prints exactly (Postgres keeps microseconds).
    let now = OffsetDateTime::now_utc();
    let start = now.replace_nanosecond(0).unwrap_or(now);
    let team = TeamId::new_random();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'hobby')")
        .bind(team.as_uuid())
        .execute(pool)
        .await?;
    let reachable = create_resource(pool, team, "demoreach01", true).await?;
    let missing_role = create_resource(pool, team, "demomissing1", false).await?;

    step("Propagation: a team upgrades hobby -> pro");
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE teams SET tier = 'pro' WHERE id = $1")
        .bind(team.as_uuid())
        .execute(&mut *tx)
        .await?;
    insert(
        &mut tx,
        &AuditEvent::new(
            AuditKind::TeamTierChanged,
            Actor::parse("operator:demo")?,
            start,
        )
        .team(team)
        .attr("to_tier", "pro")?,
    )
    .await?;
    tx.commit().await?;
    let store = Arc::new(PgPropagationStore::new(pool.clone()));
    let enqueued = store.reconcile(start).await?;
    println!(
        "the entitlement reconciler found {} drifted databases and enqueued a tier_elevation for each;",
        enqueued.len()
    );
    println!("one database's customer role exists, the other's was lost in a deprovisioning race");

    step("Propagation: the runner applies what it can and retries what it cannot");
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let applier = Arc::new(PgRoleApplier::new(
        pool.clone(),
        TierRoleSettings::standard(),
    ));
    let runner = Runner::new(
        Arc::clone(&store),
        applier,
        metrics.clone(),
        RunnerConfig::new(WorkerId::parse("demo-runner")?),
    )?;
    let never = CancellationToken::new();
    let report = runner.run_batch(start, &never).await?;
    println!(
        "batch: {} claimed, {} applied, {} unexpected skip(s)",
        report.claimed, report.applied, report.unexpected_skips
    );
    ensure!(
        report.applied == 1 && report.unexpected_skips == 1,
        "unexpected batch: {report:?}"
    );

    let (limit, config): (i32, Option<Vec<String>>) = sqlx::query_as(
        "SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = 'cust_demoreach01'",
    )
    .fetch_one(pool)
    .await?;
    println!(
        "reachable database: role now has CONNECTION LIMIT {limit}, {}; audit: {:?}",
        config.unwrap_or_default().join(", "),
        kinds(pool, reachable).await?
    );
    let (status, applied_at, next, last_error): (String, Option<OffsetDateTime>, OffsetDateTime, Option<String>) =
        sqlx::query_as(
            "SELECT status, applied_at, next_attempt_at, last_error FROM pending_propagations WHERE resource_id = $1",
        )
        .bind(missing_role.as_uuid())
        .fetch_one(pool)
        .await?;
    ensure!(
        applied_at.is_none(),
        "the skipped propagation was marked applied"
    );
    println!(
        "missing role: status {status}, applied_at NULL, next attempt in {} s; last error: {}",
        (next - start).whole_seconds(),
        last_error.unwrap_or_default()
    );
    println!(
        "               audit: {:?}",
        kinds(pool, missing_role).await?
    );
    let mut exposition = String::new();
    prometheus_client::encoding::text::encode(&mut exposition, &registry)?;
    for line in exposition.lines().filter(|l| {
        l.starts_with("instant_propagation_unexpected_skip_total") && !l.ends_with(" 0")
    }) {
        println!("metric:        {line}");
    }
    println!(
        "the reconciler does not pile on while it is pending: {} enqueued",
        store.reconcile(start).await?.len()
    );

    step("Propagation: the role never comes back; the retries run out and it dead-letters");
    let policy = RetryPolicy::standard();
    let mut now = next;
    loop {
        let report = runner.run_batch(now, &never).await?;
        ensure!(report.claimed == 1, "the retry was not due on schedule");
        let (attempts, status, next): (i32, String, OffsetDateTime) = sqlx::query_as(
            "SELECT attempts, status, next_attempt_at FROM pending_propagations WHERE resource_id = $1",
        )
        .bind(missing_role.as_uuid())
        .fetch_one(pool)
        .await?;
        let elapsed = now - start;
        println!(
            "attempt {attempts:>2} at +{:>2}h{:02}m: {status}",
            elapsed.whole_hours(),
            elapsed.whole_minutes() % 60
        );
        if status != "pending" {
            ensure!(
                attempts as u32 == policy.max_attempts(),
                "dead-lettered early"
            );
            break;
        }
        now = next;
    }
    let trail = kinds(pool, missing_role)
        .await
        .context("read the audit trail")?;
    println!(
        "audit for the unreachable database: {} x propagation.unexpected_skip, then {}; never propagation.applied",
        trail
            .iter()
            .filter(|k| *k == "propagation.unexpected_skip")
            .count(),
        trail.last().map(String::as_str).unwrap_or("-")
    );
    ensure!(
        !trail.iter().any(|k| k == "propagation.applied"),
        "an unexpected skip was audited as applied"
    );
    let tier: String = sqlx::query_scalar("SELECT tier FROM resources WHERE id = $1")
        .bind(missing_role.as_uuid())
        .fetch_one(pool)
        .await?;
    println!(
        "its applied tier is still {tier}: the drift stays visible, and the dead-letter alert pages"
    );
    Ok(())
}
