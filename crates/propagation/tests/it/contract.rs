//! The `PropagationStore` contract: one story, run against the in-memory fake and the Postgres
//! adapter alike, so the fake other crates test with behaves like the real store.

use keel_audit::Actor;
use keel_propagation::testing::{MemoryPropagationStore, RowStatus};
use keel_propagation::{
    ApplyOutcome, Backend, Completion, PropagationStore, RetryPolicy, Transition, decide,
};
use time::Duration;

use crate::*;

/// What the story needs beyond the port: putting rows in and looking at them.
trait Harness: PropagationStore {
    /// A drifted resource of a new team, its propagation to `to` enqueued at `now`.
    async fn seed(&self, to: &str, now: OffsetDateTime) -> (TeamId, ResourceId, PropagationId);
    /// Enqueues a new target for `resource`.
    async fn retarget(&self, team: TeamId, resource: ResourceId, to: &str, now: OffsetDateTime);
    /// (status, attempts, claimed_by).
    async fn state(&self, id: PropagationId) -> (&'static str, u32, Option<String>);
}

struct Pg(PgPool);

impl PropagationStore for Pg {
    async fn now(&self) -> Result<OffsetDateTime, keel_propagation::StoreError> {
        store(&self.0).now().await
    }
    async fn claim(
        &self,
        worker: &WorkerId,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<Propagation>, keel_propagation::StoreError> {
        store(&self.0).claim(worker, limit, lease, now).await
    }
    async fn complete(
        &self,
        worker: &WorkerId,
        completions: &[Completion],
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<keel_propagation::CompletionReport, keel_propagation::StoreError> {
        store(&self.0)
            .complete(worker, completions, actor, now)
            .await
    }
    async fn release(
        &self,
        worker: &WorkerId,
        propagations: &[Propagation],
        due_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<u64, keel_propagation::StoreError> {
        store(&self.0)
            .release(worker, propagations, due_at, now)
            .await
    }
}

impl Harness for Pg {
    async fn seed(&self, to: &str, now: OffsetDateTime) -> (TeamId, ResourceId, PropagationId) {
        let (team, resource) = seed(&self.0, to, "free", None).await;
        let id = store(&self.0)
            .enqueue(&elevation(team, resource, to), now)
            .await
            .unwrap()
            .id();
        (team, resource, id)
    }
    async fn retarget(&self, team: TeamId, resource: ResourceId, to: &str, now: OffsetDateTime) {
        store(&self.0)
            .enqueue(&elevation(team, resource, to), now)
            .await
            .unwrap();
    }
    async fn state(&self, id: PropagationId) -> (&'static str, u32, Option<String>) {
        let r = row(&self.0, id).await;
        let status = match r.status.as_str() {
            "pending" => "pending",
            "applied" => "applied",
            "dead_lettered" => "dead_lettered",
            other => panic!("status {other}"),
        };
        (status, u32::try_from(r.attempts).unwrap(), r.claimed_by)
    }
}

impl Harness for MemoryPropagationStore {
    async fn seed(&self, to: &str, now: OffsetDateTime) -> (TeamId, ResourceId, PropagationId) {
        let (team, resource) = (TeamId::new_random(), ResourceId::new_random());
        let id = self.enqueue(
            team,
            resource,
            ResourceType::Postgres,
            Payload::TierElevation {
                target_tier: tier(to),
            },
            Backend {
                status: Some("active".into()),
                team_id: Some(team),
                ..Backend::default()
            },
            now,
        );
        (team, resource, id)
    }
    async fn retarget(&self, team: TeamId, resource: ResourceId, to: &str, now: OffsetDateTime) {
        self.enqueue(
            team,
            resource,
            ResourceType::Postgres,
            Payload::TierElevation {
                target_tier: tier(to),
            },
            Backend::default(),
            now,
        );
    }
    async fn state(&self, id: PropagationId) -> (&'static str, u32, Option<String>) {
        let r = self.row(id).unwrap();
        let status = match r.status {
            RowStatus::Pending => "pending",
            RowStatus::Applied => "applied",
            RowStatus::DeadLettered => "dead_lettered",
        };
        (status, r.attempts, r.claimed_by)
    }
}

async fn complete<S: Harness>(
    store: &S,
    name: &str,
    propagation: &Propagation,
    transition: Transition,
) -> keel_propagation::CompletionReport {
    store
        .complete(
            &worker(name),
            &[Completion {
                propagation: propagation.clone(),
                transition,
            }],
            &Actor::system(),
            T0,
        )
        .await
        .unwrap()
}

async fn story<S: Harness>(store: S) {
    let lease = Duration::minutes(5);
    let policy = RetryPolicy::standard();
    let (a, b) = (worker("a"), worker("b"));
    let (team, resource, id) = store.seed("pro", T0).await;

    // A claim counts an attempt and holds the row.
    let first = store.claim(&a, 10, lease, T0).await.unwrap();
    assert_eq!((first.len(), first[0].attempt), (1, 1));
    assert!(store.claim(&b, 10, lease, T0).await.unwrap().is_empty());

    // A retry is due on its schedule, not before.
    let failed = Err(ApplyError::new("connection refused"));
    let retry = decide(1, &failed, &policy, T0);
    assert_eq!(complete(&store, "a", &first[0], retry).await.recorded, [id]);
    assert_eq!(store.state(id).await, ("pending", 1, None));
    assert!(store.claim(&a, 10, lease, T0).await.unwrap().is_empty());
    let due = T0 + policy.delay_after(1);
    let second = store.claim(&a, 10, lease, due).await.unwrap();
    assert_eq!(second[0].attempt, 2);

    // A release gives the attempt back; the same worker's next claim of the same attempt
    // number is a different claim, and the released claim's result is refused.
    assert_eq!(store.release(&a, &second, due, due).await.unwrap(), 1);
    assert_eq!(store.state(id).await, ("pending", 1, None));
    let third = store.claim(&a, 10, lease, due).await.unwrap();
    assert_eq!(third[0].attempt, 2);
    let applied = decide(2, &Ok(ApplyOutcome::Applied), &policy, due);
    assert_eq!(
        complete(&store, "a", &second[0], applied.clone())
            .await
            .stale,
        [id]
    );

    // A new target while claimed: the claim stays, the budget restarts, and the holder's
    // result is handed back.
    store.retarget(team, resource, "team", due).await;
    assert_eq!(store.state(id).await, ("pending", 0, Some("a".into())));
    assert!(store.claim(&b, 10, lease, due).await.unwrap().is_empty());
    assert_eq!(
        complete(&store, "a", &third[0], applied.clone())
            .await
            .stale,
        [id]
    );
    assert_eq!(store.state(id).await, ("pending", 0, None));
    let fourth = store.claim(&b, 10, lease, due).await.unwrap();
    assert_eq!(
        (fourth[0].attempt, fourth[0].payload.target_tier().as_str()),
        (1, "team")
    );

    // An abandoned claim is taken over after its lease; the vanished worker's result is refused.
    let later = due + Duration::minutes(6);
    let fifth = store.claim(&a, 10, lease, later).await.unwrap();
    assert_eq!(fifth[0].attempt, 2);
    assert_eq!(
        complete(&store, "b", &fourth[0], applied.clone())
            .await
            .stale,
        [id]
    );
    assert_eq!(
        complete(&store, "a", &fifth[0], applied).await.recorded,
        [id]
    );
    assert_eq!(store.state(id).await, ("applied", 2, None));
    assert!(store.claim(&a, 10, lease, later).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_memory_store_keeps_the_store_contract() {
    story(MemoryPropagationStore::new(T0)).await;
}

#[tokio::test]
async fn the_postgres_store_keeps_the_store_contract() {
    let db = keel_testkit::database().await;
    story(Pg(db.pool().clone())).await;
}
