//! In-memory fakes and the exported port contracts (feature `testing`).
//!
//! - [`MemoryPropagationStore`]: a [`PropagationStore`] with the Postgres adapter's semantics
//!   (coalescing, leases, the claim-token and target-version fence), for tests of code that
//!   drives a store.
//! - [`ScriptedApplier`]: an [`Applier`] that answers each resource with scripted outcomes
//!   and records every call.
//! - [`store_contract`]: the `PropagationStore` contract as one story. Keel runs it against
//!   [`MemoryPropagationStore`] and its Postgres adapter; run it against your own adapter by
//!   implementing [`StoreHarness`] for it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use keel_propagation::testing::{MemoryPropagationStore, store_contract};
//! use time::macros::datetime;
//!
//! let start = datetime!(2026-11-22 10:00 UTC);
//! store_contract(&MemoryPropagationStore::new(start), start).await;
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;

use keel_audit::{Actor, AuditKind, ResourceId, ResourceType, TeamId, Tier};
use time::{Duration, OffsetDateTime};

use crate::applier::Applier;
use crate::decide::decide;
use crate::outcome::{ApplyError, ApplyOutcome};
use crate::policy::RetryPolicy;

use crate::decide::Transition;
use crate::model::{
    Backend, ClaimToken, Fence, Payload, Propagation, PropagationId, TargetVersion,
};
use crate::store::{Completion, CompletionReport, PropagationStore, StoreError, WorkerId};

/// Where a row is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowStatus {
    /// Waiting or claimed.
    Pending,
    /// Done.
    Applied,
    /// Out of attempts.
    DeadLettered,
}

/// A row as the fake holds it, for assertions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowState {
    /// Status.
    pub status: RowStatus,
    /// Attempts counted.
    pub attempts: u32,
    /// The worker holding the claim.
    pub claimed_by: Option<String>,
    /// When it is next due.
    pub next_attempt_at: OffsetDateTime,
    /// The last error recorded.
    pub last_error: Option<String>,
    /// The audit kinds its transitions wrote, in order.
    pub audit: Vec<AuditKind>,
}

#[derive(Clone, Debug)]
struct Row {
    team_id: TeamId,
    resource_id: ResourceId,
    resource_type: ResourceType,
    payload: Payload,
    backend: Backend,
    target_version: i64,
    claim_token: Option<i64>,
    lease_expires_at: Option<OffsetDateTime>,
    state: RowState,
}

#[derive(Debug)]
struct Inner {
    rows: BTreeMap<i64, Row>,
    next_id: i64,
    next_fence: i64,
    clock: OffsetDateTime,
}

impl Inner {
    fn fence(&mut self) -> i64 {
        self.next_fence += 1;
        self.next_fence
    }
}

/// An in-memory [`PropagationStore`].
#[derive(Debug)]
pub struct MemoryPropagationStore {
    inner: Mutex<Inner>,
}

impl MemoryPropagationStore {
    /// An empty store whose clock ([`PropagationStore::now`]) reads `now`.
    pub fn new(now: OffsetDateTime) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rows: BTreeMap::new(),
                next_id: 0,
                next_fence: 0,
                clock: now,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the store's clock.
    pub fn set_now(&self, now: OffsetDateTime) {
        self.lock().clock = now;
    }

    /// Enqueues (or coalesces onto the pending row of the same resource) `payload`, due at
    /// `now`, as `enqueue_in` does: a new target bumps the target version and resets the
    /// budget; the same target changes nothing.
    pub fn enqueue(
        &self,
        team_id: TeamId,
        resource_id: ResourceId,
        resource_type: ResourceType,
        payload: Payload,
        backend: Backend,
        now: OffsetDateTime,
    ) -> PropagationId {
        let mut inner = self.lock();
        let pending = inner.rows.iter().find_map(|(id, row)| {
            (row.resource_id == resource_id
                && row.state.status == RowStatus::Pending
                && row.payload.kind() == payload.kind())
            .then_some(*id)
        });
        if let Some(id) = pending {
            let version = inner.fence();
            if let Some(row) = inner.rows.get_mut(&id)
                && row.payload != payload
            {
                row.payload = payload;
                row.team_id = team_id;
                row.target_version = version;
                row.state.attempts = 0;
                row.state.next_attempt_at = now;
                if row.lease_expires_at.is_none_or(|lease| lease <= now) {
                    row.claim_token = None;
                    row.lease_expires_at = None;
                    row.state.claimed_by = None;
                }
            }
            return PropagationId(id);
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let version = inner.fence();
        inner.rows.insert(
            id,
            Row {
                team_id,
                resource_id,
                resource_type,
                payload,
                backend,
                target_version: version,
                claim_token: None,
                lease_expires_at: None,
                state: RowState {
                    status: RowStatus::Pending,
                    attempts: 0,
                    claimed_by: None,
                    next_attempt_at: now,
                    last_error: None,
                    audit: Vec::new(),
                },
            },
        );
        PropagationId(id)
    }

    /// The row's state, if it exists.
    pub fn row(&self, id: PropagationId) -> Option<RowState> {
        self.lock().rows.get(&id.0).map(|row| row.state.clone())
    }
}

impl PropagationStore for MemoryPropagationStore {
    async fn now(&self) -> Result<OffsetDateTime, StoreError> {
        Ok(self.lock().clock)
    }

    async fn claim(
        &self,
        worker: &WorkerId,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<Propagation>, StoreError> {
        let lease = crate::store::bounded_lease(lease);
        let mut inner = self.lock();
        for row in inner.rows.values_mut() {
            if row.state.status == RowStatus::Pending
                && row
                    .lease_expires_at
                    .is_some_and(|at| at <= now || crate::store::lease_is_implausible(at, now))
            {
                row.claim_token = None;
                row.lease_expires_at = None;
                row.state.claimed_by = None;
            }
        }
        let mut due: Vec<(OffsetDateTime, i64)> = inner
            .rows
            .iter()
            .filter(|(_, row)| {
                row.state.status == RowStatus::Pending
                    && row.state.claimed_by.is_none()
                    && row.state.next_attempt_at <= now
            })
            .map(|(id, row)| (row.state.next_attempt_at, *id))
            .collect();
        due.sort();
        due.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let mut claimed = Vec::with_capacity(due.len());
        for (_, id) in due {
            let token = inner.fence();
            let Some(row) = inner.rows.get_mut(&id) else {
                continue;
            };
            row.claim_token = Some(token);
            row.lease_expires_at = Some(now + lease);
            row.state.claimed_by = Some(worker.as_str().to_owned());
            row.state.attempts = row.state.attempts.saturating_add(1);
            claimed.push(Propagation {
                id: PropagationId(id),
                team_id: row.team_id,
                resource_id: row.resource_id,
                resource_type: row.resource_type,
                payload: row.payload.clone(),
                attempt: row.state.attempts,
                backend: row.backend.clone(),
                fence: Fence {
                    claim: ClaimToken(token),
                    target: TargetVersion(row.target_version),
                },
            });
        }
        Ok(claimed)
    }

    async fn complete(
        &self,
        worker: &WorkerId,
        completions: &[Completion],
        _actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<CompletionReport, StoreError> {
        let mut inner = self.lock();
        let mut report = CompletionReport::default();
        for completion in completions {
            let id = completion.propagation.id;
            let fence = completion.propagation.fence;
            let Some(row) = inner.rows.get_mut(&id.0) else {
                report.stale.push(id);
                continue;
            };
            let held = row.state.status == RowStatus::Pending
                && row.claim_token == Some(fence.claim.0)
                && row.state.claimed_by.as_deref() == Some(worker.as_str());
            if !held {
                report.stale.push(id);
                continue;
            }
            row.claim_token = None;
            row.lease_expires_at = None;
            row.state.claimed_by = None;
            if row.target_version != fence.target.0 {
                // The result is for a replaced target: hand the row back, due now.
                row.state.next_attempt_at = row.state.next_attempt_at.min(now);
                report.stale.push(id);
                continue;
            }
            let transition = &completion.transition;
            row.state.audit.push(transition.audit_kind());
            if let Some(error) = transition.last_error() {
                row.state.last_error = Some(error);
            }
            match transition {
                Transition::Applied { .. } => row.state.status = RowStatus::Applied,
                Transition::Retry {
                    next_attempt_at, ..
                } => row.state.next_attempt_at = *next_attempt_at,
                Transition::DeadLetter { .. } => row.state.status = RowStatus::DeadLettered,
            }
            report.recorded.push(id);
        }
        Ok(report)
    }

    async fn release(
        &self,
        worker: &WorkerId,
        propagations: &[Propagation],
        due_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let mut released = 0;
        for propagation in propagations {
            let Some(row) = inner.rows.get_mut(&propagation.id.0) else {
                continue;
            };
            if row.state.status != RowStatus::Pending
                || row.claim_token != Some(propagation.fence.claim.0)
                || row.state.claimed_by.as_deref() != Some(worker.as_str())
            {
                continue;
            }
            row.claim_token = None;
            row.lease_expires_at = None;
            row.state.claimed_by = None;
            if row.target_version == propagation.fence.target.0 {
                row.state.attempts = row.state.attempts.saturating_sub(1);
                row.state.next_attempt_at = due_at;
            } else {
                row.state.next_attempt_at = row.state.next_attempt_at.min(now);
            }
            released += 1;
        }
        Ok(released)
    }
}

/// An [`Applier`] whose answers are scripted per resource, recording every call.
///
/// A resource's scripted outcomes are used in order; a resource with none left (or never
/// scripted) is applied.
#[derive(Debug, Default)]
pub struct ScriptedApplier {
    script: Mutex<BTreeMap<ResourceId, VecDeque<Result<ApplyOutcome, ApplyError>>>>,
    calls: Mutex<Vec<Propagation>>,
}

impl ScriptedApplier {
    /// An applier that applies everything until told otherwise.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `outcome` as the answer to the next apply of `resource`.
    pub fn answer(&self, resource: ResourceId, outcome: Result<ApplyOutcome, ApplyError>) {
        self.script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(resource)
            .or_default()
            .push_back(outcome);
    }

    /// Every propagation the applier was asked to apply, in order.
    pub fn calls(&self) -> Vec<Propagation> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Applier for ScriptedApplier {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(propagation.clone());
        self.script
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_mut(&propagation.resource_id)
            .and_then(VecDeque::pop_front)
            .unwrap_or(Ok(ApplyOutcome::Applied))
    }
}

/// What [`store_contract`] needs beyond the [`PropagationStore`] port: putting rows in and
/// reading their state. Implement it for an adapter to check that adapter against the contract.
pub trait StoreHarness: PropagationStore {
    /// Creates a resource of a new team and enqueues its propagation to `to`, due at `now`.
    fn seed(
        &self,
        to: &Tier,
        now: OffsetDateTime,
    ) -> impl Future<Output = (TeamId, ResourceId, PropagationId)> + Send;

    /// Enqueues a new target `to` for `resource` (of `team`), at `now`.
    fn retarget(
        &self,
        team: TeamId,
        resource: ResourceId,
        to: &Tier,
        now: OffsetDateTime,
    ) -> impl Future<Output = ()> + Send;

    /// The row's status, attempts counted and claim holder.
    fn state(
        &self,
        id: PropagationId,
    ) -> impl Future<Output = (RowStatus, u32, Option<String>)> + Send;
}

impl StoreHarness for MemoryPropagationStore {
    async fn seed(&self, to: &Tier, now: OffsetDateTime) -> (TeamId, ResourceId, PropagationId) {
        let (team, resource) = (TeamId::new_random(), ResourceId::new_random());
        let backend = Backend {
            status: Some("active".into()),
            team_id: Some(team),
            ..Backend::default()
        };
        let payload = Payload::TierElevation {
            target_tier: to.clone(),
        };
        let id = self.enqueue(
            team,
            resource,
            ResourceType::Postgres,
            payload,
            backend,
            now,
        );
        (team, resource, id)
    }

    async fn retarget(&self, team: TeamId, resource: ResourceId, to: &Tier, now: OffsetDateTime) {
        let payload = Payload::TierElevation {
            target_tier: to.clone(),
        };
        self.enqueue(
            team,
            resource,
            ResourceType::Postgres,
            payload,
            Backend::default(),
            now,
        );
    }

    async fn state(&self, id: PropagationId) -> (RowStatus, u32, Option<String>) {
        match self.row(id) {
            Some(row) => (row.status, row.attempts, row.claimed_by),
            None => panic!("propagation {id} is not in the store"),
        }
    }
}

fn contract_worker(name: &str) -> WorkerId {
    WorkerId::parse(name).unwrap_or_else(|e| panic!("worker id {name}: {e}"))
}

fn contract_tier(name: &str) -> Tier {
    Tier::parse(name).unwrap_or_else(|e| panic!("tier {name}: {e}"))
}

async fn complete_one<S: StoreHarness>(
    store: &S,
    name: &str,
    propagation: &Propagation,
    transition: Transition,
    now: OffsetDateTime,
) -> CompletionReport {
    let completion = Completion {
        propagation: propagation.clone(),
        transition,
    };
    store
        .complete(&contract_worker(name), &[completion], &Actor::system(), now)
        .await
        .unwrap_or_else(|e| panic!("complete: {e}"))
}

async fn claim<S: StoreHarness>(
    store: &S,
    worker: &WorkerId,
    lease: Duration,
    now: OffsetDateTime,
) -> Vec<Propagation> {
    store
        .claim(worker, 10, lease, now)
        .await
        .unwrap_or_else(|e| panic!("claim: {e}"))
}

/// The `PropagationStore` contract, as one story starting at `start` on an empty store: claims
/// count attempts and hold rows for their lease; retries wait for their schedule; a release
/// gives the attempt back and fences the released claim; a new target keeps a live claim but
/// refuses its result and restarts the budget; an abandoned claim is taken over after its
/// lease and the vanished worker's result is refused. Panics at the first broken promise.
pub async fn store_contract<S: StoreHarness>(store: &S, start: OffsetDateTime) {
    let lease = Duration::minutes(5);
    let policy = RetryPolicy::standard();
    let (a, b) = (contract_worker("a"), contract_worker("b"));
    let (team, resource, id) = store.seed(&contract_tier("pro"), start).await;

    // A claim counts an attempt and holds the row.
    let first = claim(store, &a, lease, start).await;
    assert_eq!(first.len(), 1, "one due row, one claimed");
    assert_eq!(first[0].attempt, 1, "a claim counts an attempt");
    assert!(
        claim(store, &b, lease, start).await.is_empty(),
        "a claimed row was claimed twice"
    );

    // A retry is due on its schedule, not before.
    let failed = Err(ApplyError::new("connection refused"));
    let retry = decide(1, &failed, &policy, start);
    assert_eq!(
        complete_one(store, "a", &first[0], retry, start)
            .await
            .recorded,
        [id]
    );
    assert_eq!(store.state(id).await, (RowStatus::Pending, 1, None));
    assert!(
        claim(store, &a, lease, start).await.is_empty(),
        "a retry was claimable before its schedule"
    );
    let due = start + policy.delay_after(1);
    let second = claim(store, &a, lease, due).await;
    assert_eq!(second.len(), 1, "a retry was not claimable on its schedule");
    assert_eq!(second[0].attempt, 2);

    // A release gives the attempt back; the same worker's next claim of the same attempt
    // number is a different claim, and the released claim's result is refused.
    let released = store
        .release(&a, &second, due, due)
        .await
        .unwrap_or_else(|e| panic!("release: {e}"));
    assert_eq!(released, 1);
    assert_eq!(store.state(id).await, (RowStatus::Pending, 1, None));
    let third = claim(store, &a, lease, due).await;
    assert_eq!(third.len(), 1);
    assert_eq!(third[0].attempt, 2, "a released attempt was counted");
    let applied = decide(2, &Ok(ApplyOutcome::Applied), &policy, due);
    let report = complete_one(store, "a", &second[0], applied.clone(), start).await;
    assert_eq!(report.stale, [id], "a released claim's result was recorded");

    // A new target while claimed: the claim stays, the budget restarts, and the holder's
    // result is handed back.
    store
        .retarget(team, resource, &contract_tier("team"), due)
        .await;
    assert_eq!(
        store.state(id).await,
        (RowStatus::Pending, 0, Some("a".into()))
    );
    assert!(
        claim(store, &b, lease, due).await.is_empty(),
        "a retargeted row was claimed beside its live claim"
    );
    let report = complete_one(store, "a", &third[0], applied.clone(), start).await;
    assert_eq!(
        report.stale,
        [id],
        "a result for the old target was recorded"
    );
    assert_eq!(store.state(id).await, (RowStatus::Pending, 0, None));
    let fourth = claim(store, &b, lease, due).await;
    assert_eq!(fourth.len(), 1);
    assert_eq!(
        (fourth[0].attempt, fourth[0].payload.target_tier().as_str()),
        (1, "team")
    );

    // An abandoned claim is taken over after its lease; the vanished worker's result is refused.
    let later = due + Duration::minutes(6);
    let fifth = claim(store, &a, lease, later).await;
    assert_eq!(fifth.len(), 1, "an expired claim was not taken over");
    assert_eq!(fifth[0].attempt, 2);
    let report = complete_one(store, "b", &fourth[0], applied.clone(), start).await;
    assert_eq!(
        report.stale,
        [id],
        "a vanished worker's result was recorded"
    );
    let report = complete_one(store, "a", &fifth[0], applied, start).await;
    assert_eq!(report.recorded, [id]);
    assert_eq!(store.state(id).await, (RowStatus::Applied, 2, None));
    assert!(
        claim(store, &a, lease, later).await.is_empty(),
        "an applied row was claimable"
    );
}
