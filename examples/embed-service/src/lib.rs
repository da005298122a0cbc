//! A small service that embeds Keel the way a project outside this workspace does, and whose
//! test runs in CI against a real Postgres.
//!
//! It has its own sqlx migrations (tracked in `_sqlx_migrations`, with version numbers Keel uses
//! too), and it makes the choices Keel's libraries leave to the application: the TLS stack and
//! runtime flavour of sqlx and tokio, and the Kubernetes API version k8s-openapi compiles for
//! (see its `Cargo.toml`). Its upgrade flow changes a team's tier in its own transaction with
//! [`keel_propagation::postgres::change_team_tier`], runs one batch of Keel's runner with its own
//! [`Applier`], and reads the audit trail back.
//!
//! ```no_run
//! use keel_embed_service::{Order, QuotaApplier};
//! use std::sync::Arc;
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), keel_embed_service::Error> {
//! keel_embed_service::migrate(&pool, Order::ServiceFirst).await?;
//! let tier = |name: &str| keel_audit::Tier::parse(name).expect("a known tier");
//! let (team, _resource) = keel_embed_service::sign_up(&pool, &tier("hobby")).await?;
//! keel_embed_service::upgrade(&pool, team, &tier("pro")).await?;
//! let report = keel_embed_service::run_once(&pool, Arc::new(QuotaApplier::default())).await?;
//! assert_eq!(report.applied, 1);
//! # Ok(()) }
//! ```

use std::sync::{Arc, Mutex};

use keel_audit::postgres::{AuditFilter, StoredAuditEvent};
use keel_audit::{Actor, ResourceId, TeamId, Tier};
use keel_propagation::postgres::{PgPropagationStore, TierChange, change_team_tier};
use keel_propagation::runner::{BatchReport, CancellationToken, LeaseError, Runner, RunnerConfig};
use keel_propagation::{
    Applier, ApplyError, ApplyOutcome, Metrics, Propagation, SkipReason, StoreError, WorkerId,
};
use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};

/// The service's own migrations (`migrations/`), tracked in sqlx's default `_sqlx_migrations`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// Which migrator runs first. Both orders give the same schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Keel's migrations, then the service's.
    KeelFirst,
    /// The service's migrations, then Keel's.
    ServiceFirst,
}

/// What failed in the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A migration failed.
    #[error("a migration failed: {0}")]
    Migrate(#[from] MigrateError),
    /// The service's own SQL failed.
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
    /// Keel's propagation store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Keel refused the runner configuration.
    #[error(transparent)]
    Config(#[from] LeaseError),
    /// Keel's audit read-back failed.
    #[error(transparent)]
    Audit(#[from] keel_audit::AuditSinkError),
    /// A name the service uses was refused.
    #[error("invalid name: {0}")]
    Name(String),
}

/// Applies the service's migrations and Keel's, in `order`. Safe to run on every start.
pub async fn migrate(pool: &PgPool, order: Order) -> Result<(), Error> {
    match order {
        Order::KeelFirst => {
            keel_schema::migrate(pool).await?;
            MIGRATOR.run(pool).await?;
        }
        Order::ServiceFirst => {
            MIGRATOR.run(pool).await?;
            keel_schema::migrate(pool).await?;
        }
    }
    Ok(())
}

/// Signs a team up on `tier` with one active Postgres database: the service's own provisioning
/// writes Keel's `teams` and `resources` contract rows.
pub async fn sign_up(pool: &PgPool, tier: &Tier) -> Result<(TeamId, ResourceId), Error> {
    let team = TeamId::new_random();
    let resource = ResourceId::new_random();
    let token = format!("tok{}", &resource.as_uuid().simple().to_string()[..12]);
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, $2)")
        .bind(team.as_uuid())
        .bind(tier.as_str())
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, 'postgres', $4, 'active', $5, 'postgres://customer@db.internal/app')",
    )
    .bind(resource.as_uuid())
    .bind(&token)
    .bind(team.as_uuid())
    .bind(tier.as_str())
    .bind(format!("db_{token}"))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((team, resource))
}

/// The service's upgrade: its own row, the tier change, Keel's audit row and the propagations
/// for every active resource, in one transaction.
pub async fn upgrade(pool: &PgPool, team: TeamId, tier: &Tier) -> Result<TierChange, Error> {
    let store = PgPropagationStore::new(pool.clone());
    let now = store.db_now().await?;
    let actor = Actor::parse("billing:embed-service").map_err(|e| Error::Name(e.to_string()))?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO service_upgrades (team_id, to_tier, note) VALUES ($1, $2, $3)")
        .bind(team.as_uuid())
        .bind(tier.as_str())
        .bind("self-service upgrade")
        .execute(&mut *tx)
        .await?;
    let change = change_team_tier(&mut tx, team, tier, &actor, now).await?;
    tx.commit().await?;
    Ok(change)
}

/// The service's own backend: a quota service. A resource it does not know is an unexpected
/// skip, which Keel retries and never records as applied.
#[derive(Debug, Default)]
pub struct QuotaApplier {
    unknown: Mutex<Vec<ResourceId>>,
    applied: Mutex<Vec<ResourceId>>,
}

impl QuotaApplier {
    /// Makes the quota service not know `resource`.
    pub fn forget(&self, resource: ResourceId) {
        self.unknown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(resource);
    }

    /// The resources whose quota was changed, in order.
    pub fn applied(&self) -> Vec<ResourceId> {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Applier for QuotaApplier {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        let unknown = self
            .unknown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&propagation.resource_id);
        if unknown {
            return Ok(ApplyOutcome::Skipped(SkipReason::unexpected(
                "the quota service does not know this resource",
            )));
        }
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(propagation.resource_id);
        Ok(ApplyOutcome::Applied)
    }
}

/// Runs one batch of Keel's runner with `applier`, at the database's clock.
pub async fn run_once<A: Applier + 'static>(
    pool: &PgPool,
    applier: Arc<A>,
) -> Result<BatchReport, Error> {
    let store = Arc::new(PgPropagationStore::new(pool.clone()));
    let worker = WorkerId::parse("embed-service-1").map_err(|e| Error::Name(e.to_string()))?;
    let runner = Runner::new(
        Arc::clone(&store),
        applier,
        Metrics::unregistered(),
        RunnerConfig::new(worker),
    )?;
    let now = store.db_now().await?;
    Ok(runner.run_batch(now, &CancellationToken::new()).await?)
}

/// The audit trail of `team`, oldest first.
pub async fn audit_trail(pool: &PgPool, team: TeamId) -> Result<Vec<StoredAuditEvent>, Error> {
    let filter = AuditFilter {
        team_id: Some(team),
        ..AuditFilter::default()
    };
    let mut conn = pool.acquire().await?;
    Ok(keel_audit::postgres::fetch(&mut conn, &filter).await?)
}
