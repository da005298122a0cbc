//! The propagation act: a team's upgrade is enqueued in the same transaction as the tier change,
//! reaches one database and a Redis namespace (through its own applier, against a tower-test
//! Kubernetes API), and the database it could not reach retries loudly —
//! `propagation.unexpected_skip`, never `propagation.applied` — until it dead-letters.

use std::sync::Arc;

use anyhow::{Context, ensure};
use keel_audit::{Actor, ResourceId, TeamId, Tier};
use keel_propagation::kube::{KubeQuotaApplier, TierQuotas};
use keel_propagation::postgres::{
    PgPropagationStore, PgRoleApplier, TierChange, TierRoleSettings, change_team_tier,
};
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_propagation::{ByResourceType, Metrics, RetryPolicy, WorkerId};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::step;

/// The role keel-provision creates for `token`: `cust_<digest>`.
fn customer_role(token: &str) -> anyhow::Result<String> {
    let token = keel_audit::Token::parse(token)?;
    Ok(
        keel_provision::RoleName::for_database(&keel_provision::DatabaseName::for_token(&token))
            .expose()
            .to_owned(),
    )
}

async fn create_resource(
    pool: &PgPool,
    cluster: &PgPool,
    team: TeamId,
    token: &str,
    with_role: bool,
) -> anyhow::Result<ResourceId> {
    let resource = ResourceId::new_random();
    let role = customer_role(token)?;
    if with_role {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE ROLE {} LOGIN CONNECTION LIMIT 10",
            keel_testkit::quote_ident(&role)
        )))
        .execute(cluster)
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

/// A Redis resource as keel-provision creates it: a labelled namespace, no Secret.
async fn create_redis(pool: &PgPool, team: TeamId, token: &str) -> anyhow::Result<ResourceId> {
    let resource = ResourceId::new_random();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, 'redis', 'hobby', 'active', $4, 'https://k8s.example.com:6443/api/v1/namespaces/x')",
    )
    .bind(resource.as_uuid())
    .bind(token)
    .bind(team.as_uuid())
    .bind(format!("instant-customer-{token}"))
    .execute(pool)
    .await?;
    Ok(resource)
}

/// Plays the Kubernetes API server (no cluster is available here): the customer namespace's
/// metadata as keel-provision labelled it, and the quota's server-side apply echoed back.
/// Returns the requests it answered.
async fn kubernetes_api(
    mut handle: tower_test::mock::Handle<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >,
) -> Vec<String> {
    let mut seen = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let name = path.split('/').nth(4).unwrap_or_default().to_owned();
        let body = if method == http::Method::GET {
            serde_json::json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": {
                    "name": name,
                    "uid": "6f1c1c52-2b0e-4f0c-9a55-0d6f3e0b8a11",
                    "resourceVersion": "4711",
                    "labels": {
                        "app.kubernetes.io/managed-by": "keel",
                        "keel.dev/resource-type": "redis",
                        "keel.dev/tier": "hobby"
                    }
                }
            })
        } else {
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let mut quota: serde_json::Value =
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            quota["metadata"]["namespace"] = serde_json::json!(name);
            quota
        };
        seen.push(format!(
            "{method} {}",
            path.replace(&name, "instant-customer-demo…")
        ));
        let response = http::Response::builder()
            .status(200)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(kube::client::Body::from(
                serde_json::to_vec(&body).unwrap_or_default(),
            ));
        match response {
            Ok(response) => send.send_response(response),
            Err(_) => return seen,
        }
    }
    seen
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
pub async fn tier_elevations(pool: &PgPool, cluster: &PgPool) -> anyhow::Result<()> {
    // Whole seconds, so the schedule prints exactly (Postgres keeps microseconds).
    let now = OffsetDateTime::now_utc();
    let start = now.replace_nanosecond(0).unwrap_or(now);
    let team = TeamId::new_random();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'hobby')")
        .bind(team.as_uuid())
        .execute(pool)
        .await?;
    let reachable = create_resource(pool, cluster, team, "demoreach01", true).await?;
    let missing_role = create_resource(pool, cluster, team, "demomissing1", false).await?;

    let redis = create_redis(pool, team, "demoredis01").await?;

    step("Propagation: a team upgrades hobby -> pro, and its propagations commit with it");
    let store = Arc::new(PgPropagationStore::new(pool.clone()));
    let mut tx = pool.begin().await?;
    let change = change_team_tier(
        &mut tx,
        team,
        &Tier::parse("pro")?,
        &Actor::parse("operator:demo")?,
        start,
    )
    .await?;
    let TierChange::Changed {
        from: Some(from),
        enqueued,
        unknown_type,
    } = change
    else {
        anyhow::bail!("the tier did not change from a readable tier: {change:?}");
    };
    ensure!(
        unknown_type.is_empty(),
        "resources of an unknown type: {unknown_type:?}"
    );
    tx.commit().await?;
    println!(
        "change_team_tier: {from} -> pro, team.tier_changed and {} tier_elevation(s) in one transaction:",
        enqueued.len()
    );
    for (resource, enqueued) in &enqueued {
        println!("  resource {resource}: {enqueued:?}");
    }
    ensure!(
        enqueued.len() == 3,
        "expected three propagations: {enqueued:?}"
    );
    println!(
        "the 5-minute reconciler is only the backstop: it finds {} more to enqueue",
        store.reconcile(start).await?.len()
    );
    println!("one database's customer role exists, the other's was lost in a deprovisioning race");

    step("Propagation: each row goes to the applier for its resource type");
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let (service, handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    let api = tokio::spawn(kubernetes_api(handle));
    let applier = Arc::new(ByResourceType {
        postgres: Some(PgRoleApplier::new(
            cluster.clone(),
            TierRoleSettings::standard(),
        )),
        kubernetes: Some(KubeQuotaApplier::new(
            kube::Client::new(service, "default"),
            TierQuotas::standard(),
        )),
    });
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
        report.applied == 2 && report.unexpected_skips == 1,
        "unexpected batch: {report:?}"
    );

    let (limit, config): (i32, Option<Vec<String>>) =
        sqlx::query_as("SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = $1")
            .bind(customer_role("demoreach01")?)
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
    let redis_tier: String = sqlx::query_scalar("SELECT tier FROM resources WHERE id = $1")
        .bind(redis.as_uuid())
        .fetch_one(pool)
        .await?;
    ensure!(redis_tier == "pro", "the redis quota did not land");
    println!(
        "redis namespace: ResourceQuota keel-tier applied for pro (tier now {redis_tier}); audit: {:?}",
        kinds(pool, redis).await?
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
    drop(runner);
    for request in api.await? {
        println!("kubernetes api (tower-test): {request}");
    }
    Ok(())
}
