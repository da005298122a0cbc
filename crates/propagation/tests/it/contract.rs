//! The `PropagationStore` contract (`keel_propagation::testing::store_contract`, exported for
//! other adapters): run against the in-memory fake and the Postgres adapter alike, so the fake
//! other crates test with behaves like the real store.

use keel_audit::Actor;
use keel_propagation::testing::{MemoryPropagationStore, RowStatus, StoreHarness, store_contract};
use keel_propagation::{Completion, PropagationStore};
use time::Duration;

use crate::*;

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

impl StoreHarness for Pg {
    async fn seed(&self, to: &Tier, now: OffsetDateTime) -> (TeamId, ResourceId, PropagationId) {
        let (team, resource) = seed(&self.0, to.as_str(), "free", None).await;
        let id = store(&self.0)
            .enqueue(&elevation(team, resource, to.as_str()), now)
            .await
            .unwrap()
            .id();
        (team, resource, id)
    }
    async fn retarget(&self, team: TeamId, resource: ResourceId, to: &Tier, now: OffsetDateTime) {
        store(&self.0)
            .enqueue(&elevation(team, resource, to.as_str()), now)
            .await
            .unwrap();
    }
    async fn state(&self, id: PropagationId) -> (RowStatus, u32, Option<String>) {
        let r = row(&self.0, id).await;
        let status = match r.status.as_str() {
            "pending" => RowStatus::Pending,
            "applied" => RowStatus::Applied,
            "dead_lettered" => RowStatus::DeadLettered,
            other => panic!("status {other}"),
        };
        (status, u32::try_from(r.attempts).unwrap(), r.claimed_by)
    }
}

/// LIB-7: the exported contract holds for the exported fake.
#[tokio::test]
async fn the_memory_store_keeps_the_store_contract() {
    store_contract(&MemoryPropagationStore::new(T0), T0).await;
}

/// LIB-7: the exported contract holds for the Postgres adapter.
#[tokio::test]
async fn the_postgres_store_keeps_the_store_contract() {
    let db = keel_testkit::database().await;
    store_contract(&Pg(db.pool().clone()), T0).await;
}

/// LIB-7: the exported fakes drive Keel's runner with no database, and an unexpected skip the
/// scripted applier reports is retried, never applied.
#[tokio::test]
async fn the_fakes_drive_the_runner_and_an_unexpected_skip_is_never_applied() {
    use keel_propagation::runner::{CancellationToken, Runner, RunnerConfig};
    use keel_propagation::testing::ScriptedApplier;
    use keel_propagation::{ApplyOutcome, Metrics, SkipReason};
    use std::sync::Arc;

    let store = Arc::new(MemoryPropagationStore::new(T0));
    let (_, skipped, skipped_id) = store.seed(&tier("pro"), T0).await;
    let (_, landed, landed_id) = store.seed(&tier("pro"), T0).await;
    let applier = Arc::new(ScriptedApplier::new());
    applier.answer(
        skipped,
        Ok(ApplyOutcome::Skipped(SkipReason::unexpected(
            "the quota service does not know this resource",
        ))),
    );
    let runner = Runner::new(
        Arc::clone(&store),
        Arc::clone(&applier),
        Metrics::unregistered(),
        RunnerConfig::new(worker("runner-1")),
    )
    .unwrap();
    let report = runner
        .run_batch(T0, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!((report.applied, report.unexpected_skips), (1, 1));
    let mut asked: Vec<ResourceId> = applier.calls().iter().map(|p| p.resource_id).collect();
    asked.sort();
    let mut expected = vec![skipped, landed];
    expected.sort();
    assert_eq!(asked, expected);
    let skipped_row = store.row(skipped_id).unwrap();
    assert_eq!(skipped_row.status, RowStatus::Pending);
    assert_eq!(
        skipped_row.audit,
        [keel_audit::AuditKind::PropagationUnexpectedSkip]
    );
    assert_eq!(store.row(landed_id).unwrap().status, RowStatus::Applied);
}
