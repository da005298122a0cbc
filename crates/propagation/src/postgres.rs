//! Postgres adapters (feature `postgres`): the `pending_propagations` store, the entitlement
//! reconciler, dead-letter handling, `LISTEN/NOTIFY` wake-ups, and the role applier for the
//! shared Postgres cluster.
//!
//! # Coalescing
//!
//! At most one non-terminal row exists per (kind, resource) — a partial unique index enforces it.
//! Enqueueing a new target for a resource that already has a pending row replaces that row's
//! payload and makes it due now; enqueueing the same target again changes nothing.
//!
//! A new target deserves a full budget, so attempts restart from 0 — except while a worker holds
//! a live claim on the row: the claim stays (no second worker can take the row and race the
//! first one to the backend), and the worker's completion is refused by the fence because it
//! carries the old target. That refusal hands the row back at once with a fresh budget, and the
//! new target is applied by the next claim.
//!
//! # Claims and leases
//!
//! Due rows are claimed in batches with `FOR UPDATE SKIP LOCKED`, so replicas never claim the
//! same row; a claim stamps `claimed_by`, `lease_expires_at`, and counts the attempt. A row whose
//! lease expired is claimable again: delivery is at least once, so appliers must be idempotent.
//! Every transition is fenced on `id`, `claimed_by` and `attempts` and commits with its audit row.
//!
//! The statements select their rows through `id = ANY(…)` so the planner looks them up by primary
//! key instead of hash-joining against the whole table: a claim or a completion costs the same
//! whether the table holds a thousand rows or a million.

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_audit::{Actor, AuditEvent, AuditKind, ResourceId, ResourceType, TeamId, Token};
use sqlx::postgres::PgListener;
use sqlx::types::{Json, Uuid};
use sqlx::{PgConnection, PgPool};
use time::{Duration, OffsetDateTime};

use crate::applier::Applier;
use crate::decide::Transition;
use crate::model::{Backend, Payload, Propagation, PropagationId, PropagationKind};
use crate::outcome::{ApplyError, ApplyOutcome, LegitimateSkip, ReasonBucket, SkipReason};
use crate::store::{Completion, CompletionReport, PropagationStore, StoreError, WorkerId};

/// The `NOTIFY` channel an enqueue signals on.
pub const NOTIFY_CHANNEL: &str = "keel_propagation";

fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::Database {
        operation,
        source: Box::new(e),
    }
}

fn millis(d: Duration) -> f64 {
    d.as_seconds_f64() * 1000.0
}

/// A propagation to enqueue.
#[derive(Clone, Debug)]
pub struct EnqueueRequest {
    /// The team whose entitlement it carries.
    pub team_id: TeamId,
    /// The resource it applies to.
    pub resource_id: ResourceId,
    /// The resource's type.
    pub resource_type: ResourceType,
    /// What to apply.
    pub payload: Payload,
}

/// What an enqueue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    /// A new row.
    Inserted(PropagationId),
    /// The pending row's target was replaced (attempts reset).
    Replaced(PropagationId),
    /// The pending row already had this target.
    Unchanged(PropagationId),
}

impl Enqueued {
    /// The row id.
    pub fn id(self) -> PropagationId {
        match self {
            Enqueued::Inserted(id) | Enqueued::Replaced(id) | Enqueued::Unchanged(id) => id,
        }
    }
}

/// How many rows of one kind are due, and since when.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QueueStat {
    /// The kind.
    pub kind: PropagationKind,
    /// Pending rows whose next attempt is due.
    pub due: i64,
    /// Seconds the oldest due row has been due.
    pub oldest_due_age_seconds: f64,
}

/// A dead-lettered propagation, for operators.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    /// Row id.
    pub id: i64,
    /// Kind.
    pub kind: String,
    /// Team.
    pub team_id: TeamId,
    /// Resource.
    pub resource_id: ResourceId,
    /// Resource type.
    pub resource_type: String,
    /// The payload's target tier, if it has one.
    pub target_tier: Option<String>,
    /// Attempts made.
    pub attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was dead-lettered.
    #[serde(with = "time::serde::rfc3339")]
    pub dead_lettered_at: OffsetDateTime,
}

/// Which dead letters to requeue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequeueTarget {
    /// One row.
    One(PropagationId),
    /// Every dead letter of a kind.
    AllOfKind(PropagationKind),
}

/// What a requeue did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequeueReport {
    /// Rows made pending again, attempts reset, each with a `propagation.requeued` audit row.
    pub requeued: Vec<PropagationId>,
    /// Dead letters left alone because their resource already has a pending propagation.
    pub skipped_open: Vec<PropagationId>,
    /// Dead letters left alone because a newer one for the same resource exists, or because the
    /// team has moved to another tier since: requeueing them would re-apply an old target.
    pub skipped_superseded: Vec<PropagationId>,
}

#[derive(sqlx::FromRow)]
struct DeadLetterRow {
    id: i64,
    kind: String,
    team_id: Uuid,
    resource_id: Uuid,
    resource_type: String,
    target_tier: Option<String>,
    attempts: i32,
    last_error: Option<String>,
    dead_lettered_at: OffsetDateTime,
}

/// The `pending_propagations` store.
#[derive(Clone, Debug)]
pub struct PgPropagationStore {
    pool: PgPool,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    id: i64,
    kind: String,
    team_id: Uuid,
    resource_id: Uuid,
    resource_type: String,
    payload: Json<serde_json::Value>,
    attempts: i32,
    token: Option<String>,
    provider_resource_id: Option<String>,
    status: Option<String>,
}

impl ClaimedRow {
    fn into_domain(self) -> Result<Propagation, (i64, Uuid, Uuid, String)> {
        let corrupt = |reason: String| (self.id, self.team_id, self.resource_id, reason);
        let kind: PropagationKind = self.kind.parse().map_err(|e| corrupt(format!("{e}")))?;
        let resource_type: ResourceType = self
            .resource_type
            .parse()
            .map_err(|e| corrupt(format!("{e}")))?;
        let payload = Payload::from_json(kind, &self.payload.0)
            .map_err(|e| corrupt(format!("bad payload: {e}")))?;
        Ok(Propagation {
            id: PropagationId(self.id),
            team_id: TeamId::from_uuid(self.team_id),
            resource_id: ResourceId::from_uuid(self.resource_id),
            resource_type,
            payload,
            attempt: u32::try_from(self.attempts).unwrap_or(0),
            backend: Backend {
                // A token that does not parse is a legacy resource; appliers report it as such.
                token: self.token.as_deref().and_then(|t| Token::parse(t).ok()),
                provider_resource_id: self.provider_resource_id,
                status: self.status,
            },
        })
    }
}

/// Inserts or coalesces one propagation on `conn` (pass a transaction to enqueue atomically with
/// the change that caused it), and signals waiting runners when the transaction commits.
pub async fn enqueue_in(
    conn: &mut PgConnection,
    request: &EnqueueRequest,
    now: OffsetDateTime,
) -> Result<Enqueued, StoreError> {
    let kind = request.payload.kind();
    let payload = request.payload.to_json();
    let changed: Option<(i64, bool)> = sqlx::query_as(
        "INSERT INTO pending_propagations \
           (kind, team_id, resource_id, resource_type, payload, next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6, $6) \
         ON CONFLICT (kind, resource_id) WHERE status = 'pending' DO UPDATE SET \
           payload = EXCLUDED.payload, team_id = EXCLUDED.team_id, \
           attempts = CASE WHEN pending_propagations.lease_expires_at > EXCLUDED.updated_at \
                           THEN pending_propagations.attempts ELSE 0 END, \
           next_attempt_at = EXCLUDED.next_attempt_at, updated_at = EXCLUDED.updated_at \
         WHERE pending_propagations.payload IS DISTINCT FROM EXCLUDED.payload \
         RETURNING id, (xmax = 0) AS inserted",
    )
    .bind(kind.as_str())
    .bind(request.team_id.as_uuid())
    .bind(request.resource_id.as_uuid())
    .bind(request.resource_type.as_str())
    .bind(Json(&payload))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("enqueue a propagation"))?;
    let enqueued = match changed {
        Some((id, true)) => Enqueued::Inserted(PropagationId(id)),
        Some((id, false)) => Enqueued::Replaced(PropagationId(id)),
        None => {
            let id: i64 = sqlx::query_scalar(
                "SELECT id FROM pending_propagations WHERE kind = $1 AND resource_id = $2 AND status = 'pending'",
            )
            .bind(kind.as_str())
            .bind(request.resource_id.as_uuid())
            .fetch_one(&mut *conn)
            .await
            .map_err(db("find the pending propagation"))?;
            return Ok(Enqueued::Unchanged(PropagationId(id)));
        }
    };
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(kind.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db("notify runners"))?;
    Ok(enqueued)
}

fn status_of(transition: &Transition) -> &'static str {
    match transition {
        Transition::Applied { .. } => "applied",
        Transition::Retry { .. } => "pending",
        Transition::DeadLetter { .. } => "dead_lettered",
    }
}

/// Whether an applied transition means the backend now has the target tier.
fn tier_landed(transition: &Transition) -> bool {
    match transition {
        Transition::Applied { skipped: None }
        | Transition::Applied {
            skipped: Some(LegitimateSkip::AlreadyAtTarget),
        } => true,
        Transition::Applied {
            skipped: Some(LegitimateSkip::ResourceDeprovisioned | LegitimateSkip::Superseded),
        }
        | Transition::Retry { .. }
        | Transition::DeadLetter { .. } => false,
    }
}

impl PgPropagationStore {
    /// A store over `pool` (the platform database).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Enqueues (or coalesces) one propagation in its own transaction.
    pub async fn enqueue(
        &self,
        request: &EnqueueRequest,
        now: OffsetDateTime,
    ) -> Result<Enqueued, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        let enqueued = enqueue_in(&mut tx, request, now).await?;
        tx.commit().await.map_err(db("commit an enqueue"))?;
        Ok(enqueued)
    }

    /// The entitlement reconciler's pass: enqueues a tier elevation for every active resource
    /// whose applied tier differs from its team's tier and that has no pending propagation.
    ///
    /// Because an unexpected skip never marks a propagation applied, a regrade that did not land
    /// stays visible here as drift. Drift towards a target whose propagation already
    /// dead-lettered is left to operators (`dead-letters requeue`) rather than retried forever —
    /// until a later propagation for the resource is applied, after which that old dead letter
    /// no longer holds the backstop back.
    pub async fn reconcile(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<(PropagationId, ResourceId)>, StoreError> {
        let types: Vec<&str> = ResourceType::ALL.iter().map(|t| t.as_str()).collect();
        let rows: Vec<(i64, Uuid)> = sqlx::query_as(
            "INSERT INTO pending_propagations \
               (kind, team_id, resource_id, resource_type, payload, next_attempt_at, created_at, updated_at) \
             SELECT 'tier_elevation', r.team_id, r.id, r.resource_type, \
                    jsonb_build_object('target_tier', t.tier), $1, $1, $1 \
             FROM resources r JOIN teams t ON t.id = r.team_id \
             WHERE r.status = 'active' AND r.tier IS DISTINCT FROM t.tier \
               AND r.resource_type = ANY($2) \
               AND NOT EXISTS (SELECT 1 FROM pending_propagations p \
                               WHERE p.resource_id = r.id AND p.kind = 'tier_elevation' \
                                 AND p.status = 'pending') \
               AND NOT EXISTS (SELECT 1 FROM pending_propagations d \
                               WHERE d.resource_id = r.id AND d.kind = 'tier_elevation' \
                                 AND d.status = 'dead_lettered' \
                                 AND d.payload->>'target_tier' = t.tier \
                                 AND NOT EXISTS (SELECT 1 FROM pending_propagations a \
                                                 WHERE a.resource_id = r.id \
                                                   AND a.kind = 'tier_elevation' \
                                                   AND a.status = 'applied' \
                                                   AND a.applied_at > d.dead_lettered_at)) \
             ON CONFLICT DO NOTHING \
             RETURNING id, resource_id",
        )
        .bind(now)
        .bind(&types)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reconcile entitlements"))?;
        if !rows.is_empty() {
            sqlx::query("SELECT pg_notify($1, 'tier_elevation')")
                .bind(NOTIFY_CHANNEL)
                .execute(&self.pool)
                .await
                .map_err(db("notify runners"))?;
        }
        Ok(rows
            .into_iter()
            .map(|(id, resource)| (PropagationId(id), ResourceId::from_uuid(resource)))
            .collect())
    }

    /// Dead letters, newest first, optionally of one kind.
    pub async fn dead_letters(
        &self,
        kind: Option<PropagationKind>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows: Vec<DeadLetterRow> =
            sqlx::query_as(
                "SELECT id, kind, team_id, resource_id, resource_type, payload->>'target_tier' AS target_tier, \
                        attempts, last_error, dead_lettered_at \
                 FROM pending_propagations \
                 WHERE status = 'dead_lettered' AND ($1::text IS NULL OR kind = $1) \
                 ORDER BY dead_lettered_at DESC, id DESC LIMIT $2",
            )
            .bind(kind.map(PropagationKind::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(db("list dead letters"))?;
        Ok(rows
            .into_iter()
            .map(|row| DeadLetter {
                id: row.id,
                kind: row.kind,
                team_id: TeamId::from_uuid(row.team_id),
                resource_id: ResourceId::from_uuid(row.resource_id),
                resource_type: row.resource_type,
                target_tier: row.target_tier,
                attempts: row.attempts,
                last_error: row.last_error,
                dead_lettered_at: row.dead_lettered_at,
            })
            .collect())
    }

    /// Makes dead letters pending again with a fresh budget, writing `propagation.requeued`
    /// (attributed to `actor`) for each, in one transaction.
    pub async fn requeue(
        &self,
        target: RequeueTarget,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<RequeueReport, StoreError> {
        let (id, kind) = match target {
            RequeueTarget::One(id) => (Some(id.0), None),
            RequeueTarget::AllOfKind(kind) => (None, Some(kind.as_str())),
        };
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        // For each dead letter: is its resource already pending, is a newer dead letter for the
        // same resource waiting, and (tier elevations) has the team moved to another tier since?
        let candidates: Vec<(i64, bool, bool, bool)> = sqlx::query_as(
            "SELECT d.id, \
                    EXISTS (SELECT 1 FROM pending_propagations p \
                            WHERE p.kind = d.kind AND p.resource_id = d.resource_id \
                              AND p.status = 'pending'), \
                    EXISTS (SELECT 1 FROM pending_propagations n \
                            WHERE n.kind = d.kind AND n.resource_id = d.resource_id \
                              AND n.status = 'dead_lettered' AND n.id > d.id), \
                    (d.kind = 'tier_elevation' AND d.payload->>'target_tier' IS DISTINCT FROM \
                       (SELECT t.tier FROM teams t WHERE t.id = d.team_id)) \
             FROM pending_propagations d \
             WHERE d.status = 'dead_lettered' \
               AND ($1::bigint IS NULL OR d.id = $1) AND ($2::text IS NULL OR d.kind = $2) \
             ORDER BY d.id FOR UPDATE OF d",
        )
        .bind(id)
        .bind(kind)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("find dead letters"))?;
        if let (RequeueTarget::One(wanted), true) = (target, candidates.is_empty()) {
            return Err(StoreError::NotDeadLettered(wanted));
        }
        let mut report = RequeueReport::default();
        let mut ids = Vec::new();
        for (id, open, newer, moved_on) in candidates {
            if open {
                report.skipped_open.push(PropagationId(id));
            } else if newer || moved_on {
                report.skipped_superseded.push(PropagationId(id));
            } else {
                ids.push(id);
            }
        }
        let rows: Vec<(i64, String, Uuid, Uuid, i32)> = sqlx::query_as(
            "UPDATE pending_propagations p SET status = 'pending', attempts = 0, next_attempt_at = $2, \
                    dead_lettered_at = NULL, claimed_by = NULL, lease_expires_at = NULL, updated_at = $2 \
             FROM (SELECT id, attempts AS previous FROM pending_propagations WHERE id = ANY($1)) old \
             WHERE p.id = old.id \
             RETURNING p.id, p.kind, p.team_id, p.resource_id, old.previous",
        )
        .bind(&ids)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("requeue dead letters"))?;
        let mut events = Vec::with_capacity(rows.len());
        for (id, kind, team, resource, previous) in &rows {
            let event = AuditEvent::new(AuditKind::PropagationRequeued, actor.clone(), now)
                .team(TeamId::from_uuid(*team))
                .resource(ResourceId::from_uuid(*resource))
                .attr("propagation_id", id.to_string())
                .and_then(|e| e.attr("propagation_kind", kind.clone()))
                .and_then(|e| e.attr("previous_attempts", previous.to_string()))
                .map_err(|e| StoreError::Corrupt {
                    id: *id,
                    reason: e.to_string(),
                })?;
            events.push(event);
        }
        keel_audit::postgres::insert_batch(&mut tx, &events).await?;
        if !rows.is_empty() {
            sqlx::query("SELECT pg_notify($1, 'requeue')")
                .bind(NOTIFY_CHANNEL)
                .execute(&mut *tx)
                .await
                .map_err(db("notify runners"))?;
        }
        tx.commit().await.map_err(db("commit a requeue"))?;
        report.requeued = rows.iter().map(|r| PropagationId(r.0)).collect();
        Ok(report)
    }

    /// Due rows per kind, for the queue gauges.
    pub async fn queue_stats(&self, now: OffsetDateTime) -> Result<Vec<QueueStat>, StoreError> {
        let rows: Vec<(String, i64, Option<f64>)> = sqlx::query_as(
            "SELECT kind, count(*), max(extract(epoch FROM ($1 - next_attempt_at)))::float8 \
             FROM pending_propagations \
             WHERE status = 'pending' AND next_attempt_at <= $1 GROUP BY kind",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db("read queue depth"))?;
        let mut by_kind: BTreeMap<PropagationKind, QueueStat> = PropagationKind::ALL
            .iter()
            .map(|&kind| {
                (
                    kind,
                    QueueStat {
                        kind,
                        due: 0,
                        oldest_due_age_seconds: 0.0,
                    },
                )
            })
            .collect();
        for (kind, due, age) in rows {
            if let Ok(kind) = kind.parse::<PropagationKind>() {
                by_kind.insert(
                    kind,
                    QueueStat {
                        kind,
                        due,
                        oldest_due_age_seconds: age.unwrap_or(0.0).max(0.0),
                    },
                );
            }
        }
        Ok(by_kind.into_values().collect())
    }

    /// Dead-letters rows that cannot be read as propagations, so one bad row cannot block the
    /// queue, each with a `propagation.dead_lettered` audit row.
    async fn quarantine(
        &self,
        corrupt: Vec<(i64, Uuid, Uuid, String)>,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        let mut events = Vec::new();
        for (id, team, resource, reason) in corrupt {
            sqlx::query(
                "UPDATE pending_propagations SET status = 'dead_lettered', dead_lettered_at = $2, \
                        last_error = $3, claimed_by = NULL, lease_expires_at = NULL, updated_at = $2 \
                 WHERE id = $1 AND status = 'pending'",
            )
            .bind(id)
            .bind(now)
            .bind(format!("unreadable row: {reason}"))
            .execute(&mut *tx)
            .await
            .map_err(db("quarantine an unreadable row"))?;
            let event = AuditEvent::new(AuditKind::PropagationDeadLettered, actor.clone(), now)
                .team(TeamId::from_uuid(team))
                .resource(ResourceId::from_uuid(resource))
                .attr("propagation_id", id.to_string())
                .and_then(|e| e.attr("reason_bucket", ReasonBucket::Other.as_str()))
                .and_then(|e| e.attr("detail", "unreadable row"))
                .map_err(|e| StoreError::Corrupt {
                    id,
                    reason: e.to_string(),
                })?;
            events.push(event);
        }
        keel_audit::postgres::insert_batch(&mut tx, &events).await?;
        tx.commit().await.map_err(db("commit a quarantine"))
    }
}

impl PropagationStore for PgPropagationStore {
    async fn claim(
        &self,
        worker: &WorkerId,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<Propagation>, StoreError> {
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "WITH claimed AS ( \
               UPDATE pending_propagations p \
               SET claimed_by = $3, attempts = p.attempts + 1, updated_at = $1, \
                   lease_expires_at = $1 + make_interval(secs => $4::float8 / 1000.0) \
               WHERE p.id = ANY(ARRAY( \
                 SELECT id FROM pending_propagations \
                 WHERE status = 'pending' AND next_attempt_at <= $1 \
                   AND (lease_expires_at IS NULL OR lease_expires_at <= $1) \
                 ORDER BY next_attempt_at, id \
                 LIMIT $2 \
                 FOR UPDATE SKIP LOCKED)) \
               RETURNING p.id, p.kind, p.team_id, p.resource_id, p.resource_type, p.payload, p.attempts \
             ) \
             SELECT c.id, c.kind, c.team_id, c.resource_id, c.resource_type, c.payload, c.attempts, \
                    r.token, r.provider_resource_id, r.status \
             FROM claimed c LEFT JOIN resources r ON r.id = c.resource_id \
             ORDER BY c.id",
        )
        .bind(now)
        .bind(i64::from(limit))
        .bind(worker.as_str())
        .bind(millis(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(db("claim due propagations"))?;
        let mut claimed = Vec::with_capacity(rows.len());
        let mut corrupt = Vec::new();
        for row in rows {
            match row.into_domain() {
                Ok(propagation) => claimed.push(propagation),
                Err(bad) => corrupt.push(bad),
            }
        }
        if !corrupt.is_empty() {
            let actor = Actor::parse(&format!("runner:{}", worker.as_str().to_ascii_lowercase()))
                .unwrap_or_else(|_| Actor::system());
            let count = corrupt.len();
            if let Err(e) = self.quarantine(corrupt, &actor, now).await {
                // The unreadable rows keep their lease and are retried after it; the readable
                // ones just claimed must not be dropped because of them.
                tracing::error!(error = %e, count, "could not dead-letter unreadable propagations");
            }
        }
        Ok(claimed)
    }

    async fn complete(
        &self,
        worker: &WorkerId,
        completions: &[Completion],
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<CompletionReport, StoreError> {
        if completions.is_empty() {
            return Ok(CompletionReport::default());
        }
        let n = completions.len();
        let mut payloads = Vec::with_capacity(n);
        let (mut ids, mut attempts, mut statuses, mut next, mut errors) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for c in completions {
            ids.push(c.propagation.id.0);
            attempts.push(i32::try_from(c.propagation.attempt).unwrap_or(i32::MAX));
            statuses.push(status_of(&c.transition));
            next.push(match &c.transition {
                Transition::Retry {
                    next_attempt_at, ..
                } => Some(*next_attempt_at),
                Transition::Applied { .. } | Transition::DeadLetter { .. } => None,
            });
            errors.push(c.transition.last_error());
            payloads.push(c.propagation.payload.to_json().to_string());
        }
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        // The fence filter (claimed_by) makes the planner expect about one matching row and
        // choose a nested loop that rescans the UNNEST once per row: quadratic in the batch.
        // A hash join over the primary-key lookup is right for any batch size.
        sqlx::query("SET LOCAL enable_nestloop = off")
            .execute(&mut *tx)
            .await
            .map_err(db("set the plan for recording transitions"))?;
        // One statement for the batch. Rows still held by this very claim (id, worker,
        // attempt) take their transition when their target is unchanged; when the target was
        // replaced meanwhile, the result is for the old target: the row is handed back instead,
        // due now, with a fresh budget.
        let fenced: Vec<(i64, bool)> = sqlx::query_as(
            "UPDATE pending_propagations p SET \
               status = CASE WHEN p.payload = u.payload::jsonb THEN u.status ELSE 'pending' END, \
               next_attempt_at = CASE WHEN p.payload = u.payload::jsonb \
                                      THEN COALESCE(u.next_attempt_at, p.next_attempt_at) \
                                      ELSE LEAST(p.next_attempt_at, $6) END, \
               last_error = CASE WHEN p.payload = u.payload::jsonb \
                                 THEN COALESCE(u.last_error, p.last_error) ELSE p.last_error END, \
               attempts = CASE WHEN p.payload = u.payload::jsonb THEN p.attempts ELSE 0 END, \
               applied_at = CASE WHEN p.payload = u.payload::jsonb AND u.status = 'applied' \
                                 THEN $6 END, \
               dead_lettered_at = CASE WHEN p.payload = u.payload::jsonb \
                                        AND u.status = 'dead_lettered' THEN $6 END, \
               claimed_by = NULL, lease_expires_at = NULL, updated_at = $6 \
             FROM UNNEST($1::bigint[], $2::int[], $3::text[], $4::timestamptz[], $5::text[], \
                         $8::text[]) \
                  AS u(id, attempt, status, next_attempt_at, last_error, payload) \
             WHERE p.id = ANY($1) AND p.id = u.id AND p.attempts = u.attempt \
               AND p.claimed_by = $7 AND p.status = 'pending' \
             RETURNING p.id, p.payload = u.payload::jsonb",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&statuses)
        .bind(&next)
        .bind(&errors)
        .bind(now)
        .bind(worker.as_str())
        .bind(&payloads)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("record transitions"))?;
        let recorded: Vec<i64> = fenced
            .iter()
            .filter(|(_, same)| *same)
            .map(|(id, _)| *id)
            .collect();

        let recorded_set: std::collections::BTreeSet<i64> = recorded.iter().copied().collect();
        let accepted: Vec<&Completion> = completions
            .iter()
            .filter(|c| recorded_set.contains(&c.propagation.id.0))
            .collect();
        let events: Vec<AuditEvent> = accepted
            .iter()
            .map(|c| c.transition.audit_event(&c.propagation, actor, now))
            .collect();
        keel_audit::postgres::insert_batch(&mut tx, &events).await?;

        let (landed_ids, landed_tiers): (Vec<Uuid>, Vec<&str>) = accepted
            .iter()
            .filter(|c| tier_landed(&c.transition))
            .map(|c| {
                (
                    c.propagation.resource_id.as_uuid(),
                    c.propagation.payload.target_tier().as_str(),
                )
            })
            .unzip();
        if !landed_ids.is_empty() {
            sqlx::query(
                "UPDATE resources r SET tier = u.tier, updated_at = $3 \
                 FROM UNNEST($1::uuid[], $2::text[]) AS u(id, tier) WHERE r.id = u.id",
            )
            .bind(&landed_ids)
            .bind(&landed_tiers)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db("record applied tiers"))?;
        }
        tx.commit().await.map_err(db("commit transitions"))?;
        Ok(CompletionReport {
            recorded: recorded.into_iter().map(PropagationId).collect(),
            stale: completions
                .iter()
                .map(|c| c.propagation.id)
                .filter(|id| !recorded_set.contains(&id.0))
                .collect(),
        })
    }

    async fn release(
        &self,
        worker: &WorkerId,
        propagations: &[Propagation],
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        if propagations.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = propagations.iter().map(|p| p.id.0).collect();
        let attempts: Vec<i32> = propagations
            .iter()
            .map(|p| i32::try_from(p.attempt).unwrap_or(i32::MAX))
            .collect();
        let payloads: Vec<String> = propagations
            .iter()
            .map(|p| p.payload.to_json().to_string())
            .collect();
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        // As in `complete`: keep the planner off a per-row rescan of the UNNEST.
        sqlx::query("SET LOCAL enable_nestloop = off")
            .execute(&mut *tx)
            .await
            .map_err(db("set the plan for releasing claims"))?;
        let done = sqlx::query(
            "UPDATE pending_propagations p SET claimed_by = NULL, lease_expires_at = NULL, \
                    attempts = CASE WHEN p.payload = u.payload::jsonb THEN p.attempts - 1 ELSE 0 END, \
                    updated_at = $4 \
             FROM UNNEST($1::bigint[], $2::int[], $5::text[]) AS u(id, attempt, payload) \
             WHERE p.id = ANY($1) AND p.id = u.id AND p.attempts = u.attempt \
               AND p.claimed_by = $3 AND p.status = 'pending'",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(worker.as_str())
        .bind(now)
        .bind(&payloads)
        .execute(&mut *tx)
        .await
        .map_err(db("release claims"))?;
        tx.commit().await.map_err(db("commit a release"))?;
        Ok(done.rows_affected())
    }
}

/// Wakes `notify` whenever a propagation is enqueued or requeued (`LISTEN keel_propagation`).
///
/// Returns once the first listener is listening (so a notification sent after it returns is not
/// lost), then keeps listening in a background task that reconnects after errors. Runners also
/// poll, so a notification lost while reconnecting only delays work.
pub async fn listen_for_wakeups(
    pool: PgPool,
    notify: Arc<tokio::sync::Notify>,
) -> Result<tokio::task::JoinHandle<()>, StoreError> {
    let connect = |pool: PgPool| async move {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        Ok::<PgListener, sqlx::Error>(listener)
    };
    let mut listener = connect(pool.clone())
        .await
        .map_err(db("listen for wake-ups"))?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.recv().await {
                Ok(_) => notify.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "lost the propagation wake-up listener; polling until it reconnects");
                    loop {
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        match connect(pool.clone()).await {
                            Ok(fresh) => {
                                listener = fresh;
                                // Anything enqueued while disconnected: look now.
                                notify.notify_one();
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "could not reconnect the wake-up listener")
                            }
                        }
                    }
                }
            }
        }
    }))
}

pub use keel_audit::{RoleSettings, TierRoleSettings};

/// Applies a tier to a customer's role on the shared Postgres cluster with `ALTER ROLE`.
///
/// The role is the resource's `provider_resource_id`. Identifiers are validated and quoted, never
/// interpolated raw; the role name (derived from the customer's token) never appears in errors.
#[derive(Clone, Debug)]
pub struct PgRoleApplier {
    cluster: PgPool,
    settings: TierRoleSettings,
}

impl PgRoleApplier {
    /// An applier acting on the cluster behind `cluster` (a role allowed to `ALTER ROLE`).
    pub fn new(cluster: PgPool, settings: TierRoleSettings) -> Self {
        Self { cluster, settings }
    }
}

fn valid_role_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
        && name.len() <= 63
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The customer role disappeared or never existed: an unexpected skip, never success.
fn role_missing(detail: &str) -> ApplyOutcome {
    ApplyOutcome::Skipped(SkipReason::Unexpected {
        bucket: ReasonBucket::Other,
        detail: detail.to_owned(),
    })
}

/// Turns a database error into an outcome. The role name derives from the customer's token, so
/// it is masked wherever the server's message repeats it.
fn role_error(step: &str, role: &str, e: sqlx::Error) -> Result<ApplyOutcome, ApplyError> {
    let undefined_object = e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "42704");
    if undefined_object {
        return Ok(role_missing(
            "the customer role disappeared while it was being changed",
        ));
    }
    let message = e.to_string().replace(role, &keel_audit::mask(role));
    Err(ApplyError::new(format!("could not {step}: {message}")))
}

impl Applier for PgRoleApplier {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        // No resource row (hard-deleted) or a deleted one: there is nothing left to change.
        if matches!(
            propagation.backend.status.as_deref(),
            None | Some("deleted")
        ) {
            return Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                LegitimateSkip::ResourceDeprovisioned,
            )));
        }
        let Some(role) = propagation.backend.provider_resource_id.as_deref() else {
            return Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
                bucket: ReasonBucket::LegacyResource,
                detail: "the resource has no provider resource id (customer role) recorded".into(),
            }));
        };
        if !valid_role_name(role) {
            return Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
                bucket: ReasonBucket::LegacyResource,
                detail: "the resource's provider resource id is not a valid role name".into(),
            }));
        }
        let tier = propagation.payload.target_tier();
        let settings = self.settings.get(tier).ok_or_else(|| {
            ApplyError::new(format!("no role settings are configured for tier {tier}"))
        })?;
        let current: Option<(i32, Option<Vec<String>>)> =
            match sqlx::query_as("SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = $1")
                .bind(role)
                .fetch_optional(&self.cluster)
                .await
            {
                Ok(current) => current,
                Err(e) => return role_error("read the customer role", role, e),
            };
        let Some((connection_limit, config)) = current else {
            return Ok(role_missing(
                "the customer role does not exist on the shared cluster",
            ));
        };
        let wanted_timeout = format!("statement_timeout={}ms", settings.statement_timeout_ms);
        let timeout_set = config.unwrap_or_default().contains(&wanted_timeout);
        if connection_limit == settings.connection_limit && timeout_set {
            return Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                LegitimateSkip::AlreadyAtTarget,
            )));
        }
        let quoted = quote_ident(role);
        let mut tx = match self.cluster.begin().await {
            Ok(tx) => tx,
            Err(e) => return role_error("begin on the shared cluster", role, e),
        };
        // Both values are integers formatted here; the role is validated and quoted.
        for statement in [
            format!(
                "ALTER ROLE {quoted} CONNECTION LIMIT {}",
                settings.connection_limit
            ),
            format!(
                "ALTER ROLE {quoted} SET statement_timeout = '{}ms'",
                settings.statement_timeout_ms
            ),
        ] {
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut *tx)
                .await
            {
                return role_error("alter the customer role", role, e);
            }
        }
        match tx.commit().await {
            Ok(()) => Ok(ApplyOutcome::Applied),
            Err(e) => role_error("commit the role change", role, e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_errors_mask_the_role_name_the_server_repeats() {
        let role = "cust_a1b2c3d4e5f6";
        let err = role_error(
            "alter the customer role",
            role,
            sqlx::Error::Protocol(format!("role \"{role}\" cannot be altered right now")),
        )
        .unwrap_err();
        assert_eq!(
            err.message,
            "could not alter the customer role: encountered unexpected or invalid data: role \"cust…\" cannot be altered right now"
        );
    }

    #[test]
    fn role_names_must_be_plain_lowercase_identifiers() {
        for good in ["cust_a1b2c3d4", "_x", "a"] {
            assert!(valid_role_name(good), "{good}");
        }
        for bad in ["", "Cust", "1abc", "a-b", "a\"b", &"a".repeat(64)] {
            assert!(!valid_role_name(bad), "{bad}");
        }
    }
}
