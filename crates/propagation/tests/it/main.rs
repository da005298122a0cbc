//! keel-propagation against a real Postgres (a fresh migrated database per test).

mod applier;
mod contract;
mod regressions;
mod routing;
mod runner;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use keel_audit::{ResourceId, ResourceType, TeamId, Tier};
use keel_propagation::postgres::{EnqueueRequest, PgPropagationStore};
use keel_propagation::{
    Applier, ApplyError, ApplyOutcome, Payload, Propagation, PropagationId, WorkerId,
};
use sqlx::PgPool;
use time::OffsetDateTime;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

fn tier(name: &str) -> Tier {
    Tier::parse(name).unwrap()
}

fn worker(name: &str) -> WorkerId {
    WorkerId::parse(name).unwrap()
}

/// A team on `team_tier` with one active resource whose applied tier is `resource_tier`, its
/// provider id `provider_id` or else the role keel-provision names for its token.
async fn seed(
    pool: &PgPool,
    team_tier: &str,
    resource_tier: &str,
    provider_id: Option<&str>,
) -> (TeamId, ResourceId) {
    let team = TeamId::new_random();
    let resource = ResourceId::new_random();
    let token = keel_audit::Token::parse(&format!(
        "tok{}",
        &resource.as_uuid().simple().to_string()[..12]
    ))
    .unwrap();
    let role =
        keel_provision::RoleName::for_database(&keel_provision::DatabaseName::for_token(&token));
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, $2)")
        .bind(team.as_uuid())
        .bind(team_tier)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, 'postgres', $4, 'active', $5, 'postgres://customer@db/x')",
    )
    .bind(resource.as_uuid())
    .bind(token.expose())
    .bind(team.as_uuid())
    .bind(resource_tier)
    .bind(provider_id.unwrap_or(role.expose()))
    .execute(pool)
    .await
    .unwrap();
    (team, resource)
}

/// A team on `pro` with an active resource still on `free`, and its elevation enqueued at `T0`.
async fn drifted_and_enqueued(pool: &PgPool) -> (TeamId, ResourceId, PropagationId) {
    let (team, resource) = seed(pool, "pro", "free", None).await;
    let id = store(pool)
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap()
        .id();
    (team, resource, id)
}

/// Claims up to 10 due rows as worker `name` at `T0` with a 5-minute lease.
async fn claim_as(store: &PgPropagationStore, name: &str) -> Vec<Propagation> {
    use keel_propagation::PropagationStore;
    store
        .claim(&worker(name), 10, time::Duration::minutes(5), T0)
        .await
        .unwrap()
}

fn elevation(team: TeamId, resource: ResourceId, to: &str) -> EnqueueRequest {
    EnqueueRequest::new(
        team,
        resource,
        ResourceType::Postgres,
        Payload::TierElevation {
            target_tier: tier(to),
        },
    )
}

#[derive(Debug)]
struct Row {
    status: String,
    attempts: i32,
    next_attempt_at: OffsetDateTime,
    applied_at: Option<OffsetDateTime>,
    claimed_by: Option<String>,
    last_error: Option<String>,
}

async fn row(pool: &PgPool, id: PropagationId) -> Row {
    let (status, attempts, next_attempt_at, applied_at, claimed_by, last_error) = sqlx::query_as(
        "SELECT status, attempts, next_attempt_at, applied_at, claimed_by, last_error \
         FROM pending_propagations WHERE id = $1",
    )
    .bind(id.0)
    .fetch_one(pool)
    .await
    .unwrap();
    Row {
        status,
        attempts,
        next_attempt_at,
        applied_at,
        claimed_by,
        last_error,
    }
}

async fn audit_kinds(pool: &PgPool, resource: ResourceId) -> Vec<String> {
    sqlx::query_scalar("SELECT kind FROM audit_events WHERE resource_id = $1 ORDER BY id")
        .bind(resource.as_uuid())
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn resource_tier(pool: &PgPool, resource: ResourceId) -> String {
    sqlx::query_scalar("SELECT tier FROM resources WHERE id = $1")
        .bind(resource.as_uuid())
        .fetch_one(pool)
        .await
        .unwrap()
}

fn store(pool: &PgPool) -> PgPropagationStore {
    PgPropagationStore::new(pool.clone())
}

/// An applier that answers with a fixed outcome and records what it saw, failing the test if
/// one row is ever applied twice at the same time.
#[derive(Default)]
struct Recording {
    outcome: Option<Result<ApplyOutcome, ApplyError>>,
    in_flight: Mutex<BTreeSet<PropagationId>>,
    applies: Mutex<BTreeMap<PropagationId, u32>>,
    overlaps: Mutex<Vec<PropagationId>>,
    delay: Option<std::time::Duration>,
}

impl Recording {
    fn answering(outcome: Result<ApplyOutcome, ApplyError>) -> Self {
        Self {
            outcome: Some(outcome),
            ..Self::default()
        }
    }

    fn applies(&self) -> BTreeMap<PropagationId, u32> {
        self.applies.lock().unwrap().clone()
    }

    fn overlaps(&self) -> Vec<PropagationId> {
        self.overlaps.lock().unwrap().clone()
    }
}

impl Applier for Recording {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        if !self.in_flight.lock().unwrap().insert(propagation.id) {
            self.overlaps.lock().unwrap().push(propagation.id);
        }
        *self
            .applies
            .lock()
            .unwrap()
            .entry(propagation.id)
            .or_default() += 1;
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        } else {
            tokio::task::yield_now().await;
        }
        self.in_flight.lock().unwrap().remove(&propagation.id);
        self.outcome.clone().unwrap_or(Ok(ApplyOutcome::Applied))
    }
}
