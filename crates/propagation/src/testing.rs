//! In-memory fakes (feature `testing`): [`MemoryPropagationStore`], a [`PropagationStore`] with
//! the Postgres adapter's semantics (coalescing, leases, the claim-token and target-version
//! fence), for tests of code that drives a store. The contract test in `tests/it/contract.rs`
//! runs one story against this fake and the Postgres adapter alike.

use std::collections::BTreeMap;
use std::sync::Mutex;

use keel_audit::{Actor, AuditKind, ResourceId, ResourceType, TeamId};
use time::{Duration, OffsetDateTime};

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
        let mut inner = self.lock();
        for row in inner.rows.values_mut() {
            if row.state.status == RowStatus::Pending
                && row.lease_expires_at.is_some_and(|at| at <= now)
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
            row.state.attempts += 1;
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
