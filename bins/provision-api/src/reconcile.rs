//! The reconciler: every interval, one replica (a Postgres advisory lock makes it single-flight
//! across replicas) settles the `pending` rows older than the age limit, which only a crash or a
//! shutdown deadline leaves behind. Each settlement is the flow's own compensation (flip first,
//! audited as `provision.reconciled`, then teardown). It also deletes expired idempotency keys
//! and settles those whose request was cut short (see `idempotency::release_abandoned`).

use std::time::Duration;

use keel_provision::{Backend, ErrorChain, Provisioner, ResourceStore};
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// The advisory lock key the replicas contend for (`hashtext` of a fixed name).
const LOCK_NAME: &str = "keel-provision-reconciler";

/// Rows settled per tick at most.
const BATCH: u32 = 100;

/// How the reconciler runs.
#[derive(Clone, Copy, Debug)]
pub struct ReconcileConfig {
    /// A `pending` row older than this is settled.
    pub older_than: Duration,
    /// Time between ticks.
    pub interval: Duration,
}

/// What one tick did.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// Another replica holds the lock: nothing was done.
    Skipped,
    /// This replica settled this many rows.
    Settled(usize),
}

/// One tick: take the lock without waiting, settle, release.
///
/// The lock is a transaction's (`pg_try_advisory_xact_lock`), held by a transaction that stays
/// open for the tick and writes nothing: it ends on the server connection that took it, so a
/// transaction-pooling proxy between the replicas and the server cannot strand it on a backend
/// (a session lock whose unlock lands on another backend stays held there for good, and only a
/// replica that happens to reach that backend could reconcile again). If the connection dies
/// mid-tick the lock goes with it and another replica may reconcile at the same time, which
/// does no harm: each settlement's flip is conditional, and a teardown of an object another
/// teardown removed succeeds.
///
/// The lock's connection is held under a permit of `holders` (the API's
/// [`AppState::lock_holders`](keel_provision_http::AppState::lock_holders)): the tick
/// needs more connections while it holds that one.
pub async fn tick<S: ResourceStore, B: Backend>(
    pool: &PgPool,
    provisioner: &Provisioner<S, B>,
    holders: &tokio::sync::Semaphore,
    config: ReconcileConfig,
) -> anyhow::Result<Tick> {
    let _holder = holders.acquire().await?;
    let mut conn = pool.acquire().await?;
    let mut lock = sqlx::Connection::begin(&mut *conn).await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
        .bind(LOCK_NAME)
        .fetch_one(&mut *lock)
        .await?;
    if !locked {
        lock.rollback().await?;
        return Ok(Tick::Skipped);
    }
    let settled = provisioner
        .reconcile_pending(config.older_than, BATCH, OffsetDateTime::now_utc())
        .await;
    // Idempotency keys: expired ones go; those whose request a crash cut short replay the
    // resource it made, or are released for the retry when it made none.
    let keys = async {
        let released =
            keel_provision_http::idempotency::release_abandoned(pool, config.older_than).await?;
        let expired = keel_provision_http::idempotency::purge_expired(pool).await?;
        Ok::<_, sqlx::Error>((released, expired))
    }
    .await;
    match keys {
        Ok((0, _)) => {}
        Ok((released, _)) => {
            tracing::warn!(released, "settled idempotency keys of requests cut short")
        }
        Err(e) => tracing::error!(error = %ErrorChain(&e), "could not tidy the idempotency keys"),
    }
    // Released with its transaction; an error here means the lock's connection was lost
    // during the tick, and another replica may have reconciled beside this one.
    if let Err(e) = lock.commit().await {
        tracing::warn!(error = %ErrorChain(&e), "the reconciler's lock was lost during the tick (its connection ended): another replica may have reconciled at the same time, which is harmless");
    }
    Ok(Tick::Settled(settled?.len()))
}

/// Ticks every interval until `shutdown`.
pub async fn run<S: ResourceStore, B: Backend>(
    pool: PgPool,
    provisioner: &Provisioner<S, B>,
    holders: &tokio::sync::Semaphore,
    config: ReconcileConfig,
    shutdown: CancellationToken,
) {
    loop {
        match tick(&pool, provisioner, holders, config).await {
            Ok(Tick::Settled(0) | Tick::Skipped) => {}
            Ok(Tick::Settled(n)) => tracing::warn!(settled = n, "reconciled stale pending rows"),
            Err(e) => {
                tracing::error!(error = %ErrorChain(e.as_ref()), "the reconciler tick failed")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(config.interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_audit::{Actor, AuditKind, RequestId, ResourceType, TeamId, Tier};
    use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
    use keel_provision::{ProvisionMetrics, ProvisionRequest};
    use prometheus_client::registry::Registry;

    use super::*;

    /// PROV-5: a stale `pending` row is settled by exactly one replica at a time; while another
    /// replica holds the lock, a tick does nothing.
    #[tokio::test]
    async fn the_reconciler_is_single_flight_and_settles_stale_pending_rows() {
        let db = keel_testkit::database().await;
        let team = TeamId::from_uuid(db.team("pro").await);
        let provisioner = Provisioner::new(
            PgResourceStore::new(db.pool().clone()),
            PgClusterBackend::new(db.server().admin_options(), None, 2),
            ProvisionMetrics::register(&mut Registry::default()),
        );
        let request = ProvisionRequest {
            team_id: team,
            resource_type: ResourceType::Postgres,
            tier: Tier::parse("pro").unwrap(),
            request_id: RequestId::parse("req-stale").unwrap(),
            actor: Actor::parse("api").unwrap(),
        };
        let now = OffsetDateTime::now_utc();
        let reservation = provisioner.reserve(request, now).await.unwrap();
        let created = provisioner.create(reservation, now).await.unwrap();
        drop(created);
        sqlx::query("UPDATE resources SET created_at = now() - interval '2 hours'")
            .execute(db.pool())
            .await
            .unwrap();
        let config = ReconcileConfig {
            older_than: Duration::from_secs(3600),
            interval: Duration::from_secs(60),
        };
        let holders = tokio::sync::Semaphore::new(1);
        let mut other_replica = db.pool().acquire().await.unwrap();
        sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
            .bind(LOCK_NAME)
            .execute(&mut *other_replica)
            .await
            .unwrap();
        assert_eq!(
            tick(db.pool(), &provisioner, &holders, config)
                .await
                .unwrap(),
            Tick::Skipped
        );
        let status: String = sqlx::query_scalar("SELECT status FROM resources")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(status, "pending");
        let _: bool = sqlx::query_scalar("SELECT pg_advisory_unlock(hashtext($1))")
            .bind(LOCK_NAME)
            .fetch_one(&mut *other_replica)
            .await
            .unwrap();
        assert_eq!(
            tick(db.pool(), &provisioner, &holders, config)
                .await
                .unwrap(),
            Tick::Settled(1)
        );
        let (status, name): (String, String) =
            sqlx::query_as("SELECT status, 'cust_' || token_digest FROM resources")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(status, "failed");
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert!(!exists, "the stale reservation's database is torn down");
        let rows: Vec<(String, serde_json::Value)> =
            sqlx::query_as("SELECT kind, attributes FROM audit_events ORDER BY id")
                .fetch_all(db.pool())
                .await
                .unwrap();
        let kinds: Vec<&str> = rows.iter().map(|(kind, _)| kind.as_str()).collect();
        assert_eq!(kinds, [AuditKind::ProvisionReconciled.as_str()], "{rows:?}");
    }
}
