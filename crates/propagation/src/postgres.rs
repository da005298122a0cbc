//! Postgres adapters (feature `postgres`): the `pending_propagations` store, the entitlement
//! reconciler, dead-letter handling, `LISTEN/NOTIFY` wake-ups, and the role applier for the
//! shared Postgres cluster.
//!
//! # Coalescing
//!
//! At most one non-terminal row exists per (kind, resource) — a partial unique index enforces it.
//! Enqueueing a new target for a resource that already has a pending row replaces that row's
//! payload, bumps its `target_version`, gives it a full budget (attempts back to 0) and makes it
//! due now; enqueueing a target the row already carries changes nothing.
//!
//! While a worker holds a live claim on the row the claim stays (no second worker can take the
//! row and race the first one to the backend), and the worker's completion is handed back by the
//! fence because it carries the old target version: the new target is applied by the next claim.
//!
//! # Claims, leases and the fence
//!
//! Due rows are claimed in batches with `FOR UPDATE SKIP LOCKED`, so replicas never claim the
//! same row; a claim stamps `claimed_by`, `lease_expires_at`, a fresh `claim_token` from a
//! sequence, and counts the attempt. A row whose lease expired is rescued (its claim undone, the
//! counted attempt kept) and claimed again: delivery is at least once, so appliers must be
//! idempotent. Every transition is fenced on the claim token (never repeated) and the target
//! version, and commits with its audit row.
//!
//! The statements select their rows through `id = ANY(…)` so the planner looks them up by primary
//! key instead of hash-joining against the whole table: a claim or a completion costs the same
//! whether the table holds a thousand rows or a million.

use std::collections::BTreeMap;
use std::sync::Arc;

use keel_audit::{Actor, AuditEvent, AuditKind, ResourceId, ResourceType, TeamId, Tier, Token};
use sqlx::postgres::PgListener;
use sqlx::types::{Json, Uuid};
use sqlx::{PgConnection, PgPool};
use time::{Duration, OffsetDateTime};

use crate::applier::Applier;
use crate::decide::{Transition, storable};
pub use crate::metrics::DeferReason;
use crate::model::{
    Backend, ClaimToken, Fence, Payload, Propagation, PropagationId, PropagationKind, TargetVersion,
};
use crate::outcome::{ApplyError, ApplyOutcome, LegitimateSkip, ReasonBucket, SkipReason};
use crate::store::{Completion, CompletionReport, PropagationStore, StoreError, WorkerId};

/// The `NOTIFY` channel an enqueue signals on.
pub const NOTIFY_CHANNEL: &str = "keel_propagation";

/// How long recording (or releasing) waits for a row lock held by someone else (a caller's
/// open `enqueue_in` transaction) before it gives up on the batch and records row by row.
pub const RECORD_LOCK_TIMEOUT: Duration = Duration::seconds(2);

/// How long a row this build cannot read waits before it is offered to a runner again.
pub const DEFER_RETRY: Duration = Duration::minutes(5);

/// The transaction-scoped advisory lock the entitlement reconciler
/// ([`PgPropagationStore::reconcile`]) holds for its pass: one replica reconciles at a time.
pub const RECONCILE_LOCK: i64 = 0x6b65_656c_7072_0001;
/// The advisory lock of the pass that dead-letters rows no runner can read.
const SETTLE_LOCK: i64 = 0x6b65_656c_7072_0002;
/// The transaction-scoped advisory lock retention ([`PgPropagationStore::prune`]) holds while it
/// deletes: one replica prunes at a time.
pub const PRUNE_LOCK: i64 = 0x6b65_656c_7072_0003;

fn defer_reason(s: &str) -> DeferReason {
    DeferReason::ALL
        .iter()
        .copied()
        .find(|r| r.as_str() == s)
        .unwrap_or(DeferReason::UnreadablePayload)
}

impl serde::Serialize for DeferReason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A pending row this build leaves for another runner, for operators.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct DeferredRow {
    /// Row id.
    pub id: i64,
    /// Why it is left.
    pub reason: DeferReason,
    /// Kind as stored (at most 64 characters).
    pub kind: String,
    /// Team.
    pub team_id: TeamId,
    /// Resource.
    pub resource_id: ResourceId,
    /// Resource type as stored (at most 64 characters).
    pub resource_type: String,
    /// Payload version as stored.
    pub payload_version: i32,
    /// When it was enqueued.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it is next due.
    #[serde(with = "time::serde::rfc3339")]
    pub next_attempt_at: OffsetDateTime,
    /// When a runner first found it unreadable.
    #[serde(with = "time::serde::rfc3339::option")]
    pub deferred_since: Option<OffsetDateTime>,
    /// The last error recorded on it.
    pub last_error: Option<String>,
}

#[derive(sqlx::FromRow)]
struct DeferredDbRow {
    id: i64,
    kind: String,
    team_id: Uuid,
    resource_id: Uuid,
    resource_type: String,
    payload_version: i32,
    created_at: OffsetDateTime,
    next_attempt_at: OffsetDateTime,
    deferred_since: Option<OffsetDateTime>,
    last_error: Option<String>,
    reason: String,
}

/// How long finished rows are kept before [`PgPropagationStore::prune`] deletes them. Audit
/// rows are never pruned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Applied rows (default 7 days).
    pub applied: Duration,
    /// Dead-lettered rows (default 30 days: an unresolved dead letter suppresses the
    /// reconciler for its tier change until then).
    pub dead_lettered: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            applied: Duration::days(7),
            dead_lettered: Duration::days(30),
        }
    }
}

/// What [`PgPropagationStore::housekeeping`] does besides the gauges.
#[derive(Clone, Debug)]
pub struct Housekeeping {
    /// How long a row no runner can read may wait before it is dead-lettered as unsupported.
    pub unsupported_grace: Duration,
    /// How long finished rows are kept.
    pub retention: Retention,
    /// Rows deleted per pass and status.
    pub prune_batch: u32,
    /// Who the audit rows say acted.
    pub actor: Actor,
}

/// What a prune deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pruned {
    /// Applied rows.
    pub applied: u64,
    /// Dead-lettered rows.
    pub dead_lettered: u64,
    /// Another replica held the retention lock, so this call deleted nothing whatever was
    /// due: the counts say nothing about what is left.
    pub busy: bool,
}

fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::Database {
        operation,
        source: Box::new(e),
    }
}

/// At most `n` characters of a stored string, for messages.
fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn millis(d: Duration) -> f64 {
    d.as_seconds_f64() * 1000.0
}

/// A propagation to enqueue.
#[derive(Clone, Debug)]
#[non_exhaustive]
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

impl EnqueueRequest {
    /// A request to carry `payload` to `resource_id` (of `team_id`, of `resource_type`). The
    /// team and type must agree with the `resources` row, or the enqueue is refused.
    pub fn new(
        team_id: TeamId,
        resource_id: ResourceId,
        resource_type: ResourceType,
        payload: Payload,
    ) -> Self {
        Self {
            team_id,
            resource_id,
            resource_type,
            payload,
        }
    }
}

/// What an enqueue did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
#[non_exhaustive]
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
#[non_exhaustive]
pub enum RequeueTarget {
    /// One row.
    One(PropagationId),
    /// Every dead letter of a kind.
    AllOfKind(PropagationKind),
}

/// Why an operator re-arms dead letters: 1 to 200 characters (trimmed), recorded as the
/// `reason` attribute of every `propagation.requeued` row the requeue writes. The console and
/// `keel-propagation-runner dead-letters requeue --reason` both require one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequeueReason(String);

impl RequeueReason {
    /// The longest reason accepted, in characters.
    pub const MAX_CHARS: usize = 200;

    /// Checks `reason`: not blank, at most [`Self::MAX_CHARS`] characters, no control character,
    /// and nothing the audit trail refuses to store (a value that looks like a secret).
    pub fn parse(reason: &str) -> Result<Self, InvalidRequeueReason> {
        let reason = reason.trim();
        let chars = reason.chars().count();
        if chars == 0 || chars > Self::MAX_CHARS {
            return Err(InvalidRequeueReason::Length { chars });
        }
        if reason.chars().any(char::is_control) {
            return Err(InvalidRequeueReason::ControlCharacter);
        }
        keel_audit::Attributes::new()
            .insert("reason", reason)
            .map_err(|e| InvalidRequeueReason::Refused(e.to_string()))?;
        Ok(Self(reason.to_owned()))
    }

    /// The reason as given (trimmed).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A requeue reason that [`RequeueReason::parse`] refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRequeueReason {
    /// Blank, or longer than [`RequeueReason::MAX_CHARS`].
    #[error("give a requeue reason of 1 to 200 characters (got {chars})")]
    Length {
        /// Characters given, after trimming.
        chars: usize,
    },
    /// The audit trail would not store it (for example, it looks like a secret).
    #[error("the requeue reason cannot be recorded: {0}")]
    Refused(String),
    /// It holds a control character (a line break, an escape sequence), which would let one
    /// line of an audit listing pose as another.
    #[error("the requeue reason must not hold a control character (a line break, an escape)")]
    ControlCharacter,
}

/// What a requeue did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequeueReport {
    /// Rows made pending again, attempts reset, each with a `propagation.requeued` audit row.
    pub requeued: Vec<PropagationId>,
    /// Dead letters left alone because their resource already has a pending propagation.
    pub skipped_open: Vec<PropagationId>,
    /// Dead letters left alone because a newer one for the same resource exists, or because the
    /// team has moved to another tier since: requeueing them would re-apply an old target.
    pub skipped_superseded: Vec<PropagationId>,
    /// Dead letters left alone because their `propagation.requeued` audit row cannot be written
    /// (a row another writer put there whose kind the audit trail refuses as an attribute), with
    /// the reason. Each is logged at ERROR; the others of the same requeue go ahead.
    pub skipped_unrecordable: Vec<(PropagationId, String)>,
}

impl RequeueReport {
    /// How many dead letters this requeue looked at and left dead-lettered.
    pub fn left_alone(&self) -> usize {
        self.skipped_open.len() + self.skipped_superseded.len() + self.skipped_unrecordable.len()
    }
}

/// A dead letter a requeue looks at, with what decides whether it is re-armed.
#[derive(sqlx::FromRow)]
struct RequeueCandidate {
    id: i64,
    kind: String,
    team_id: Uuid,
    resource_id: Uuid,
    attempts: i32,
    open: bool,
    newer: bool,
    moved_on: Option<bool>,
}

/// The `propagation.requeued` row for one candidate.
fn requeued_event(
    c: &RequeueCandidate,
    actor: &Actor,
    reason: &RequeueReason,
    now: OffsetDateTime,
) -> Result<AuditEvent, keel_audit::AuditFieldError> {
    AuditEvent::new(AuditKind::PropagationRequeued, actor.clone(), now)
        .team(TeamId::from_uuid(c.team_id))
        .resource(ResourceId::from_uuid(c.resource_id))
        .attr("propagation_id", c.id.to_string())
        .and_then(|e| e.attr("propagation_kind", c.kind.clone()))
        .and_then(|e| e.attr("previous_attempts", c.attempts.to_string()))
        .and_then(|e| e.attr("reason", reason.as_str()))
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
    /// As text: a payload the server stores but serde cannot read (nested deeper than it
    /// recurses, a number out of its range) is this row's problem, never the claim's.
    payload: String,
    attempts: i32,
    claim_token: i64,
    target_version: i64,
    token: Option<String>,
    provider_resource_id: Option<String>,
    status: Option<String>,
    owner: Option<Uuid>,
}

impl ClaimedRow {
    fn into_domain(self) -> Result<Propagation, (i64, i64, String)> {
        let corrupt = |reason: String| (self.id, self.claim_token, reason);
        let kind: PropagationKind = self.kind.parse().map_err(|e| corrupt(format!("{e}")))?;
        let resource_type: ResourceType = self
            .resource_type
            .parse()
            .map_err(|e| corrupt(format!("{e}")))?;
        let json: serde_json::Value = serde_json::from_str(&self.payload)
            .map_err(|e| corrupt(format!("bad payload: {e}")))?;
        let payload =
            Payload::from_json(kind, &json).map_err(|e| corrupt(format!("bad payload: {e}")))?;
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
                team_id: self.owner.map(TeamId::from_uuid),
            },
            fence: Fence {
                claim: ClaimToken(self.claim_token),
                target: TargetVersion(self.target_version),
            },
        })
    }
}

/// The wire names of every kind and resource type this build knows: a runner claims only rows
/// it can read, and leaves the rest for a newer runner (see [`PgPropagationStore::deferred`]).
fn known() -> (Vec<&'static str>, Vec<&'static str>) {
    (
        PropagationKind::ALL.iter().map(|k| k.as_str()).collect(),
        ResourceType::ALL.iter().map(|t| t.as_str()).collect(),
    )
}

/// Inserts or coalesces one propagation on `conn` (pass a transaction to enqueue atomically with
/// the change that caused it), and signals waiting runners when the transaction commits.
///
/// A new target replaces a pending row's target, bumps its target version (so a result for the
/// old target can never be recorded for the new one) and gives it a full attempt budget. While
/// a worker holds a live claim on the row the claim stays (no second worker races it to the
/// backend); its completion is then refused and the row handed back at once. A request whose
/// target the pending row already carries changes nothing (so re-sending it cannot re-arm a
/// failing row's budget).
///
/// `now` must come from the database clock ([`PgPropagationStore::db_now`]): it is compared
/// with leases other replicas wrote.
///
/// Refused ([`StoreError::Rejected`], nothing written) unless the resource exists, belongs to
/// `request.team_id` and has `request.resource_type`: a propagation is never queued for a
/// resource the database does not hold, nor audited under another team.
///
/// The statement locks the pending row until the caller's transaction ends; recording of that
/// row waits at most the recorder's lock timeout and is then retried, so keep such
/// transactions short. Each enqueue that changes something sends a `NOTIFY`, which takes
/// PostgreSQL's notification-queue lock at commit: fine at tier-change rates, but not a call
/// for a hot path with thousands of concurrent writers.
pub async fn enqueue_in(
    conn: &mut PgConnection,
    request: &EnqueueRequest,
    now: OffsetDateTime,
) -> Result<Enqueued, StoreError> {
    check_resource(conn, request).await?;
    let kind = request.payload.kind();
    let payload = request.payload.to_json();
    let changed: Option<(i64, bool)> = sqlx::query_as(
        "INSERT INTO pending_propagations \
           (kind, team_id, resource_id, resource_type, payload, payload_version, tier_epoch, \
            next_attempt_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $7, (SELECT tier_epoch FROM teams WHERE id = $2), $6, $6, $6) \
         ON CONFLICT (kind, resource_id) WHERE status = 'pending' DO UPDATE SET \
           payload = EXCLUDED.payload, payload_version = EXCLUDED.payload_version, \
           team_id = EXCLUDED.team_id, tier_epoch = EXCLUDED.tier_epoch, \
           resource_type = EXCLUDED.resource_type, \
           target_version = nextval('pending_propagations_fence_seq'), attempts = 0, \
           deferred_since = NULL, \
           claimed_by = CASE WHEN pending_propagations.lease_expires_at > EXCLUDED.updated_at \
                             THEN pending_propagations.claimed_by END, \
           claim_token = CASE WHEN pending_propagations.lease_expires_at > EXCLUDED.updated_at \
                              THEN pending_propagations.claim_token END, \
           lease_expires_at = CASE WHEN pending_propagations.lease_expires_at > EXCLUDED.updated_at \
                                   THEN pending_propagations.lease_expires_at END, \
           next_attempt_at = EXCLUDED.next_attempt_at, updated_at = EXCLUDED.updated_at \
         WHERE NOT (pending_propagations.payload @> EXCLUDED.payload \
                    AND pending_propagations.payload_version = EXCLUDED.payload_version \
                    AND pending_propagations.team_id = EXCLUDED.team_id \
                    AND pending_propagations.next_attempt_at \
                        <= EXCLUDED.next_attempt_at + make_interval(secs => $8::float8 / 1000.0)) \
         RETURNING id, (xmax = 0) AS inserted",
    )
    .bind(kind.as_str())
    .bind(request.team_id.as_uuid())
    .bind(request.resource_id.as_uuid())
    .bind(request.resource_type.as_str())
    .bind(Json(&payload))
    .bind(now)
    .bind(Payload::CURRENT_VERSION)
    .bind(millis(crate::MAX_WAIT))
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

/// How often [`run_housekeeping`] runs its passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct HousekeepingSchedule {
    /// Between housekeeping passes ([`PgPropagationStore::housekeeping`]: queue and deferral
    /// gauges, unsupported rows, retention).
    pub housekeeping_every: std::time::Duration,
    /// Between entitlement-reconciler passes ([`PgPropagationStore::reconcile`]); `None`: never.
    pub reconcile_every: Option<std::time::Duration>,
}

impl HousekeepingSchedule {
    /// Housekeeping every `housekeeping_every`, the reconciler every `reconcile_every`.
    pub fn new(
        housekeeping_every: std::time::Duration,
        reconcile_every: Option<std::time::Duration>,
    ) -> Self {
        Self {
            housekeeping_every,
            reconcile_every,
        }
    }
}

/// An interval whose first tick is one `period` from now (the passes at the start run before).
fn every(period: std::time::Duration) -> tokio::time::Interval {
    let period = period.max(std::time::Duration::from_millis(100));
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn reconcile_pass(store: &PgPropagationStore) {
    let pass = async { store.reconcile(store.db_now().await?).await };
    match pass.await {
        Ok(enqueued) if !enqueued.is_empty() => tracing::info!(
            enqueued = enqueued.len(),
            "reconciler enqueued drifted resources"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "entitlement reconciler pass failed"),
    }
}

async fn housekeeping_pass(
    store: &PgPropagationStore,
    metrics: &crate::Metrics,
    plan: &Housekeeping,
) {
    if let Err(e) = store.housekeeping(metrics, plan).await {
        tracing::warn!(
            error = %e,
            "housekeeping pass failed; queue gauges cleared until the next successful read"
        );
    }
}

/// The background work a runner replica does beside [`Runner::run`](crate::runner::Runner::run),
/// until `shutdown`: the entitlement reconciler (the backstop for a tier change that enqueued
/// nothing) and the housekeeping passes (queue gauges, unsupported rows, retention), each on
/// `schedule`. Both run once at the start, the reconciler first (so the gauges count what it
/// enqueued); when `shutdown` has already fired, that one round runs and the call returns.
/// Failures are logged and counted, and the next pass tries again.
///
/// Keel's runner binary runs exactly this; a service that embeds the runner spawns it beside
/// `Runner::run` to get the same backstop and gauges.
pub async fn run_housekeeping(
    store: &PgPropagationStore,
    metrics: &crate::Metrics,
    plan: &Housekeeping,
    schedule: HousekeepingSchedule,
    shutdown: &tokio_util::sync::CancellationToken,
) {
    if schedule.reconcile_every.is_some() {
        reconcile_pass(store).await;
    }
    housekeeping_pass(store, metrics, plan).await;
    let mut reconcile = schedule.reconcile_every.map(every);
    let mut gauges = every(schedule.housekeeping_every);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick(&mut reconcile) => reconcile_pass(store).await,
            _ = gauges.tick() => housekeeping_pass(store, metrics, plan).await,
        }
    }
}

/// Refuses a request whose resource does not exist or whose team or type disagree with the
/// `resources` row. The row is locked against deletion until the transaction ends.
async fn check_resource(
    conn: &mut PgConnection,
    request: &EnqueueRequest,
) -> Result<(), StoreError> {
    let found: Option<(Uuid, String)> =
        sqlx::query_as("SELECT team_id, resource_type FROM resources WHERE id = $1 FOR KEY SHARE")
            .bind(request.resource_id.as_uuid())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("look up the resource"))?;
    let Some((owner, resource_type)) = found else {
        return Err(StoreError::Rejected(format!(
            "resource {} does not exist",
            request.resource_id
        )));
    };
    if owner != request.team_id.as_uuid() {
        return Err(StoreError::Rejected(format!(
            "resource {} belongs to another team, not {}",
            request.resource_id, request.team_id
        )));
    }
    if resource_type != request.resource_type.as_str() {
        return Err(StoreError::Rejected(format!(
            "resource {} is a {} resource, not {}",
            request.resource_id,
            clip(&resource_type, 32),
            request.resource_type
        )));
    }
    Ok(())
}

/// What [`change_team_tier`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierChange {
    /// The team was already on that tier: nothing written, nothing enqueued.
    Unchanged,
    /// The tier changed, `team.tier_changed` was written, and each active resource of the team
    /// of a type this build knows got its propagation.
    Changed {
        /// The tier before; `None` when the stored one was not a [`Tier`] (the change repairs
        /// it, and the audit row says `from_tier_unreadable`).
        from: Option<Tier>,
        /// One enqueue per active resource of a known type.
        enqueued: Vec<(ResourceId, Enqueued)>,
        /// Active resources of a type this build does not know (another release's): not
        /// enqueued here, logged at WARN; the entitlement reconciler of a build that knows
        /// them picks up their drift.
        unknown_type: Vec<ResourceId>,
    },
}

/// Changes a team's tier on `conn` — pass the transaction of the business change (a billing
/// webhook, an operator action) — writing `team.tier_changed` (attributed to `actor`) and
/// enqueueing a tier elevation for every active resource of the team, all in that transaction:
/// either the change, its audit row and its propagations commit together, or none does. The
/// entitlement reconciler is then only the backstop.
///
/// `now` must come from the database clock ([`PgPropagationStore::db_now`]).
pub async fn change_team_tier(
    conn: &mut PgConnection,
    team: TeamId,
    tier: &Tier,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<TierChange, StoreError> {
    let previous: Option<String> =
        sqlx::query_scalar("SELECT tier FROM teams WHERE id = $1 FOR UPDATE")
            .bind(team.as_uuid())
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("read the team's tier"))?;
    let Some(previous) = previous else {
        return Err(StoreError::Rejected(format!("team {team} does not exist")));
    };
    if previous == tier.as_str() {
        return Ok(TierChange::Unchanged);
    }
    // A stored tier that is not a tier never blocks the change that repairs it.
    let from = Tier::parse(&previous).ok();
    sqlx::query("UPDATE teams SET tier = $2, updated_at = $3 WHERE id = $1")
        .bind(team.as_uuid())
        .bind(tier.as_str())
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db("change the team's tier"))?;
    let event = AuditEvent::new(AuditKind::TeamTierChanged, actor.clone(), now).team(team);
    let event = match &from {
        Some(from) => event.attr("from_tier", from.as_str()),
        None => event.attr("from_tier_unreadable", "true"),
    }
    .and_then(|e| e.attr("to_tier", tier.as_str()))
    .map_err(|e| StoreError::Corrupt {
        id: None,
        reason: e.to_string(),
    })?;
    keel_audit::postgres::insert(&mut *conn, &event).await?;
    let resources: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT id, resource_type FROM resources WHERE team_id = $1 AND status = 'active' ORDER BY id",
    )
    .bind(team.as_uuid())
    .fetch_all(&mut *conn)
    .await
    .map_err(db("list the team's resources"))?;
    let mut enqueued = Vec::with_capacity(resources.len());
    let mut unknown_type = Vec::new();
    for (resource, resource_type) in resources {
        let resource = ResourceId::from_uuid(resource);
        // Another release's resource type: left to a build that knows it, never failing the
        // change (and the caller's transaction) for the team's other resources.
        let Ok(resource_type) = resource_type.parse::<ResourceType>() else {
            tracing::warn!(
                %team,
                %resource,
                "a resource of a type this build does not know is not enqueued; a newer build's reconciler picks up its drift"
            );
            unknown_type.push(resource);
            continue;
        };
        let request = EnqueueRequest {
            team_id: team,
            resource_id: resource,
            resource_type,
            payload: Payload::TierElevation {
                target_tier: tier.clone(),
            },
        };
        enqueued.push((resource, enqueue_in(&mut *conn, &request, now).await?));
    }
    Ok(TierChange::Changed {
        from,
        enqueued,
        unknown_type,
    })
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

    /// The database's clock: the one time every replica agrees on. Pass it as `now` wherever a
    /// time is compared with one another replica wrote (leases, due times).
    pub async fn db_now(&self) -> Result<OffsetDateTime, StoreError> {
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await
            .map_err(db("read the database clock"))
    }

    /// Enqueues one tier elevation on an operator's behalf, through the same checks as the
    /// platform's own path, writing `propagation.enqueued` (attributed to `actor`) in the same
    /// transaction.
    ///
    /// Refused ([`StoreError::Rejected`], nothing written) unless the resource exists and is
    /// active, belongs to `request.team_id`, has `request.resource_type`, and the target is the
    /// team's current tier (any other target would be reverted by the reconciler). A request the
    /// pending row already carries is [`Enqueued::Unchanged`] and leaves its budget alone:
    /// only `dead-letters requeue` re-arms a spent budget.
    pub async fn enqueue_audited(
        &self,
        request: &EnqueueRequest,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Enqueued, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        let found: Option<(Uuid, String, String, String)> = sqlx::query_as(
            "SELECT r.team_id, r.resource_type, r.status, t.tier \
             FROM resources r JOIN teams t ON t.id = r.team_id WHERE r.id = $1 FOR SHARE OF r, t",
        )
        .bind(request.resource_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("look up the resource"))?;
        let Some((owner, resource_type, status, team_tier)) = found else {
            return Err(StoreError::Rejected(format!(
                "resource {} does not exist",
                request.resource_id
            )));
        };
        let wanted = request.payload.target_tier();
        let problem = if owner != request.team_id.as_uuid() {
            Some(format!(
                "resource {} belongs to another team, not {}",
                request.resource_id, request.team_id
            ))
        } else if resource_type != request.resource_type.as_str() {
            Some(format!(
                "resource {} is a {} resource, not {}",
                request.resource_id,
                clip(&resource_type, 32),
                request.resource_type
            ))
        } else if status != "active" {
            Some(format!(
                "resource {} is {}, not active",
                request.resource_id,
                clip(&status, 32)
            ))
        } else if team_tier != wanted.as_str() {
            Some(format!(
                "team {} is on tier {}, not {wanted}; change the team's tier instead",
                request.team_id,
                clip(&team_tier, 32)
            ))
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(StoreError::Rejected(problem));
        }
        let enqueued = enqueue_in(&mut tx, request, now).await?;
        let outcome = match enqueued {
            Enqueued::Inserted(_) => "inserted",
            Enqueued::Replaced(_) => "replaced",
            Enqueued::Unchanged(_) => "unchanged",
        };
        let event = AuditEvent::new(AuditKind::PropagationEnqueued, actor.clone(), now)
            .team(request.team_id)
            .resource(request.resource_id)
            .attr("propagation_id", enqueued.id().to_string())
            .and_then(|e| e.attr("propagation_kind", request.payload.kind().as_str()))
            .and_then(|e| e.attr("target_tier", wanted.as_str()))
            .and_then(|e| e.attr("outcome", outcome))
            .map_err(|e| StoreError::Corrupt {
                id: Some(enqueued.id()),
                reason: e.to_string(),
            })?;
        keel_audit::postgres::insert(&mut tx, &event).await?;
        tx.commit().await.map_err(db("commit an enqueue"))?;
        Ok(enqueued)
    }

    /// The entitlement reconciler's pass: enqueues a tier elevation for every active resource
    /// whose applied tier differs from its team's tier and that has no pending propagation.
    /// Single-flight: while one replica runs a pass, the others' passes return at once. A team
    /// whose stored tier is not a [`Tier`] is left out (logged at ERROR each pass, with how many
    /// there are), so it never fails the pass for every other team.
    ///
    /// Because an unexpected skip never marks a propagation applied, a regrade that did not land
    /// stays visible here as drift. Drift towards a target whose propagation dead-lettered
    /// *under the team's current tier change* (the same `teams.tier_epoch`) is left to
    /// operators (`dead-letters requeue`) rather than retried forever; any later tier change
    /// starts a new epoch, so an old dead letter never mutes a genuine change.
    ///
    /// A pass that found another replica's pass running answers an empty list, like a pass that
    /// found no drift; [`PgPropagationStore::try_reconcile`] tells the two apart.
    pub async fn reconcile(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<(PropagationId, ResourceId)>, StoreError> {
        Ok(self.try_reconcile(now).await?.unwrap_or_default())
    }

    /// [`PgPropagationStore::reconcile`], answering `None` when another replica's pass held the
    /// reconciler's lock, so this call checked nothing.
    pub async fn try_reconcile(
        &self,
        now: OffsetDateTime,
    ) -> Result<Option<Vec<(PropagationId, ResourceId)>>, StoreError> {
        let types: Vec<&str> = ResourceType::ALL.iter().map(|t| t.as_str()).collect();
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RECONCILE_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("take the reconciler lock"))?;
        if !leader {
            return Ok(None);
        }
        let unreadable: i64 = sqlx::query_scalar(UNREADABLE_TIERS_SQL)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("count teams with an unreadable tier"))?;
        if unreadable > 0 {
            tracing::error!(
                teams = unreadable,
                "teams whose tier is not a tier (1 to 32 characters of [a-z0-9_-]): their \
                 resources are not reconciled until the tier is repaired"
            );
        }
        let rows: Vec<(i64, Uuid)> = sqlx::query_as(RECONCILE_SQL)
            .bind(now)
            .bind(&types)
            .bind(Payload::CURRENT_VERSION)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("reconcile entitlements"))?;
        if !rows.is_empty() {
            sqlx::query("SELECT pg_notify($1, 'tier_elevation')")
                .bind(NOTIFY_CHANNEL)
                .execute(&mut *tx)
                .await
                .map_err(db("notify runners"))?;
        }
        tx.commit().await.map_err(db("commit a reconciler pass"))?;
        Ok(Some(
            rows.into_iter()
                .map(|(id, resource)| (PropagationId(id), ResourceId::from_uuid(resource)))
                .collect(),
        ))
    }

    /// Dead letters, newest first, optionally of one kind.
    pub async fn dead_letters(
        &self,
        kind: Option<PropagationKind>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let rows: Vec<DeadLetterRow> = sqlx::query_as(DEAD_LETTERS_SQL)
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
    /// (attributed to `actor`, with `reason`) for each, in one transaction.
    pub async fn requeue(
        &self,
        target: RequeueTarget,
        actor: &Actor,
        reason: &RequeueReason,
        now: OffsetDateTime,
    ) -> Result<RequeueReport, StoreError> {
        let (id, kind) = match target {
            RequeueTarget::One(id) => (Some(id.0), None),
            RequeueTarget::AllOfKind(kind) => (None, Some(kind.as_str())),
        };
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        // For each dead letter: is its resource already pending, is a newer dead letter for the
        // same resource waiting, and (tier elevations) has the team moved to another tier since?
        let candidates: Vec<RequeueCandidate> = sqlx::query_as(
            "SELECT d.id, d.kind, d.team_id, d.resource_id, d.attempts, \
                    EXISTS (SELECT 1 FROM pending_propagations p \
                            WHERE p.kind = d.kind AND p.resource_id = d.resource_id \
                              AND p.status = 'pending') AS open, \
                    EXISTS (SELECT 1 FROM pending_propagations n \
                            WHERE n.kind = d.kind AND n.resource_id = d.resource_id \
                              AND n.status = 'dead_lettered' AND n.id > d.id) AS newer, \
                    (d.kind = 'tier_elevation' AND d.payload->>'target_tier' IS DISTINCT FROM \
                       (SELECT t.tier FROM teams t WHERE t.id = d.team_id)) AS moved_on \
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
        let mut events = Vec::new();
        for c in candidates {
            if c.open {
                report.skipped_open.push(PropagationId(c.id));
            } else if c.newer || c.moved_on.unwrap_or(false) {
                report.skipped_superseded.push(PropagationId(c.id));
            } else {
                // Built before anything is written: a row whose audit row cannot be written is
                // left dead-lettered on its own, never failing the requeue of the others.
                match requeued_event(&c, actor, reason, now) {
                    Ok(event) => {
                        ids.push(c.id);
                        events.push(event);
                    }
                    Err(e) => {
                        tracing::error!(
                            propagation_id = c.id,
                            error = %e,
                            "a dead letter cannot be requeued: its audit row cannot be written; \
                             it stays dead-lettered until the row is repaired"
                        );
                        report
                            .skipped_unrecordable
                            .push((PropagationId(c.id), e.to_string()));
                    }
                }
            }
        }
        // The rows are locked (`FOR UPDATE` above), so what the events were built from holds.
        let rows: Vec<(i64,)> = sqlx::query_as(
            "UPDATE pending_propagations SET status = 'pending', attempts = 0, next_attempt_at = $2, \
                    dead_lettered_at = NULL, claimed_by = NULL, lease_expires_at = NULL, \
                    deferred_since = NULL, updated_at = $2 \
             WHERE id = ANY($1) \
             RETURNING id",
        )
        .bind(&ids)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("requeue dead letters"))?;
        if rows.len() != ids.len() {
            return Err(StoreError::Corrupt {
                id: None,
                reason: format!(
                    "{} of {} locked dead letters were requeued",
                    rows.len(),
                    ids.len()
                ),
            });
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
        report.requeued = ids.into_iter().map(PropagationId).collect();
        Ok(report)
    }

    /// Due, unclaimed rows per kind, for the queue gauges.
    pub async fn queue_stats(&self, now: OffsetDateTime) -> Result<Vec<QueueStat>, StoreError> {
        let rows: Vec<(String, i64, Option<f64>)> = sqlx::query_as(QUEUE_STATS_SQL)
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

    /// Pending rows this build cannot run, for operators: unknown kind, resource type or
    /// payload version (left for a newer runner), or a payload no runner could read so far
    /// (deferred). Oldest first.
    pub async fn deferred(&self, limit: u32) -> Result<Vec<DeferredRow>, StoreError> {
        let (kinds, types) = known();
        let rows: Vec<DeferredDbRow> = sqlx::query_as(
            "SELECT id, kind, team_id, resource_id, resource_type, payload_version, created_at, \
                    next_attempt_at, deferred_since, last_error, \
                    CASE WHEN kind <> ALL($1) THEN 'unknown_kind' \
                         WHEN resource_type <> ALL($2) THEN 'unknown_resource_type' \
                         WHEN payload_version > $3 THEN 'unknown_payload_version' \
                         ELSE 'unreadable_payload' END AS reason \
             FROM pending_propagations \
             WHERE status = 'pending' AND (kind <> ALL($1) OR resource_type <> ALL($2) \
                   OR payload_version > $3 OR deferred_since IS NOT NULL) \
             ORDER BY created_at, id LIMIT $4",
        )
        .bind(&kinds)
        .bind(&types)
        .bind(Payload::CURRENT_VERSION)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db("list deferred propagations"))?;
        Ok(rows
            .into_iter()
            .map(|row| DeferredRow {
                id: row.id,
                reason: defer_reason(&row.reason),
                kind: clip(&row.kind, 64),
                team_id: TeamId::from_uuid(row.team_id),
                resource_id: ResourceId::from_uuid(row.resource_id),
                resource_type: clip(&row.resource_type, 64),
                payload_version: row.payload_version,
                created_at: row.created_at,
                next_attempt_at: row.next_attempt_at,
                deferred_since: row.deferred_since,
                last_error: row.last_error,
            })
            .collect())
    }

    /// How many pending rows this build defers, by reason (for the deferred gauge).
    pub async fn deferred_counts(&self) -> Result<BTreeMap<DeferReason, i64>, StoreError> {
        let (kinds, types) = known();
        let (kind, resource_type, version, unreadable): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE kind <> ALL($1)), \
                    count(*) FILTER (WHERE kind = ANY($1) AND resource_type <> ALL($2)), \
                    count(*) FILTER (WHERE kind = ANY($1) AND resource_type = ANY($2) \
                                       AND payload_version > $3), \
                    count(*) FILTER (WHERE kind = ANY($1) AND resource_type = ANY($2) \
                                       AND payload_version <= $3 AND deferred_since IS NOT NULL) \
             FROM pending_propagations WHERE status = 'pending' \
               AND (kind <> ALL($1) OR resource_type <> ALL($2) OR payload_version > $3 \
                    OR deferred_since IS NOT NULL)",
        )
        .bind(&kinds)
        .bind(&types)
        .bind(Payload::CURRENT_VERSION)
        .fetch_one(&self.pool)
        .await
        .map_err(db("count deferred propagations"))?;
        Ok(BTreeMap::from([
            (DeferReason::UnknownKind, kind),
            (DeferReason::UnknownResourceType, resource_type),
            (DeferReason::UnknownPayloadVersion, version),
            (DeferReason::UnreadablePayload, unreadable),
        ]))
    }

    /// Dead-letters rows no runner has been able to run for `grace`: of an unknown kind,
    /// resource type or payload version and due (unclaimed) since at least `grace` ago, or
    /// deferred as unreadable for at least `grace`. Each gets `propagation.dead_lettered` with
    /// reason bucket `other` and its own detail (`unsupported: …`), in one transaction.
    /// Single-flight across replicas.
    pub async fn settle_unsupported(
        &self,
        grace: Duration,
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<Vec<(PropagationId, DeferReason)>, StoreError> {
        let (kinds, types) = known();
        let cutoff = now - grace;
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(SETTLE_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("take the settle lock"))?;
        if !leader {
            return Ok(Vec::new());
        }
        let rows: Vec<(i64, Uuid, Uuid, String)> = sqlx::query_as(
            "WITH gone AS ( \
               SELECT id, CASE WHEN kind <> ALL($1) THEN 'unknown_kind' \
                               WHEN resource_type <> ALL($2) THEN 'unknown_resource_type' \
                               WHEN payload_version > $3 THEN 'unknown_payload_version' \
                               ELSE 'unreadable_payload' END AS reason \
               FROM pending_propagations \
               WHERE status = 'pending' AND claimed_by IS NULL AND ( \
                     ((kind <> ALL($1) OR resource_type <> ALL($2) OR payload_version > $3) \
                      AND next_attempt_at <= $4) \
                  OR deferred_since <= $4) \
               ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED) \
             UPDATE pending_propagations p SET status = 'dead_lettered', dead_lettered_at = $5, \
                    last_error = 'unsupported (' || gone.reason || '): no runner could run it within the grace period', \
                    updated_at = $5 \
             FROM gone WHERE p.id = gone.id \
             RETURNING p.id, p.team_id, p.resource_id, gone.reason",
        )
        .bind(&kinds)
        .bind(&types)
        .bind(Payload::CURRENT_VERSION)
        .bind(cutoff)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("dead-letter unsupported propagations"))?;
        let mut events = Vec::with_capacity(rows.len());
        let mut settled = Vec::with_capacity(rows.len());
        for (id, team, resource, reason) in rows {
            let reason = defer_reason(&reason);
            let event = AuditEvent::new(AuditKind::PropagationDeadLettered, actor.clone(), now)
                .team(TeamId::from_uuid(team))
                .resource(ResourceId::from_uuid(resource))
                .attr("propagation_id", id.to_string())
                .and_then(|e| e.attr("reason_bucket", ReasonBucket::Other.as_str()))
                .and_then(|e| e.attr("detail", format!("unsupported ({})", reason.as_str())))
                .map_err(|e| StoreError::Corrupt {
                    id: Some(PropagationId(id)),
                    reason: e.to_string(),
                })?;
            events.push(event);
            settled.push((PropagationId(id), reason));
        }
        keel_audit::postgres::insert_batch(&mut tx, &events).await?;
        tx.commit().await.map_err(db("commit dead letters"))?;
        Ok(settled)
    }

    /// Retention: deletes at most `batch` applied rows finished before `now - applied_for`
    /// and at most `batch` dead letters finished before `now - dead_lettered_for`. Pending rows
    /// and audit rows are never touched. Single-flight: while one replica prunes, the others'
    /// calls return at once with nothing deleted and [`Pruned::busy`] set. Call repeatedly
    /// until it returns fewer than `batch`.
    pub async fn prune(
        &self,
        retention: &Retention,
        batch: u32,
        now: OffsetDateTime,
    ) -> Result<Pruned, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        let leader: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(PRUNE_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("take the retention lock"))?;
        if !leader {
            return Ok(Pruned {
                busy: true,
                ..Pruned::default()
            });
        }
        let applied = sqlx::query(
            "DELETE FROM pending_propagations WHERE id = ANY(ARRAY( \
               SELECT id FROM pending_propagations WHERE status = 'applied' AND applied_at < $1 \
               ORDER BY applied_at LIMIT $2))",
        )
        .bind(now - retention.applied)
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await
        .map_err(db("prune applied propagations"))?
        .rows_affected();
        let dead_lettered = sqlx::query(
            "DELETE FROM pending_propagations WHERE id = ANY(ARRAY( \
               SELECT id FROM pending_propagations \
               WHERE status = 'dead_lettered' AND dead_lettered_at < $1 \
               ORDER BY dead_lettered_at LIMIT $2))",
        )
        .bind(now - retention.dead_lettered)
        .bind(i64::from(batch))
        .execute(&mut *tx)
        .await
        .map_err(db("prune dead-lettered propagations"))?
        .rows_affected();
        tx.commit().await.map_err(db("commit a prune"))?;
        Ok(Pruned {
            applied,
            dead_lettered,
            busy: false,
        })
    }

    /// One housekeeping pass at the database's clock: the queue and deferral gauges, the rows
    /// no runner could run within the grace dead-lettered (each counted in
    /// `instant_propagation_unsupported_dead_lettered_total` and audited), and one bounded
    /// retention batch. The passes that change rows are single-flight across replicas.
    /// `instant_propagation_maintenance_up` says whether it worked; when the reads fail, the
    /// queue and deferral gauges are cleared rather than left at their last value.
    pub async fn housekeeping(
        &self,
        metrics: &crate::Metrics,
        plan: &Housekeeping,
    ) -> Result<(), StoreError> {
        let reads = async {
            let now = self.db_now().await?;
            let queue = self.queue_stats(now).await?;
            let deferred = self.deferred_counts().await?;
            Ok::<_, StoreError>((now, queue, deferred))
        };
        let now = match reads.await {
            Ok((now, queue, deferred)) => {
                for stat in queue {
                    metrics.set_queue(stat.kind, stat.due, stat.oldest_due_age_seconds);
                }
                for (reason, rows) in deferred {
                    metrics.set_deferred(reason, rows);
                }
                now
            }
            Err(e) => {
                metrics.queue_unknown();
                metrics.set_maintenance_up(false);
                return Err(e);
            }
        };
        let pass = async {
            for id in self.wake_implausible_waits(now).await? {
                tracing::warn!(
                    propagation_id = %id,
                    "a pending propagation was due further ahead than any retry schedule makes; \
                     another writer set it, and it is due now"
                );
            }
            for (id, reason) in self
                .settle_unsupported(plan.unsupported_grace, &plan.actor, now)
                .await?
            {
                tracing::error!(propagation_id = %id, reason = reason.as_str(), "dead-lettered a propagation no runner could run within the grace period");
                metrics.unsupported_dead_lettered(reason);
            }
            let pruned = self.prune(&plan.retention, plan.prune_batch, now).await?;
            metrics.pruned(crate::PrunedStatus::Applied, pruned.applied);
            metrics.pruned(crate::PrunedStatus::DeadLettered, pruned.dead_lettered);
            Ok(())
        };
        let result = pass.await;
        metrics.set_maintenance_up(result.is_ok());
        result
    }

    /// Makes due now every unclaimed pending row due more than [`MAX_WAIT`](crate::MAX_WAIT)
    /// after `now` (no retry schedule waits that long; another writer set it), and answers
    /// their ids. Left alone, such a row would hide its resource's drift from the reconciler
    /// and from every enqueue until then, with no gauge showing it. Part of
    /// [`PgPropagationStore::housekeeping`].
    pub async fn wake_implausible_waits(
        &self,
        now: OffsetDateTime,
    ) -> Result<Vec<PropagationId>, StoreError> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "WITH far AS ( \
               SELECT id FROM pending_propagations \
               WHERE status = 'pending' AND claimed_by IS NULL \
                 AND next_attempt_at > $1 + make_interval(secs => $2::float8 / 1000.0) \
               ORDER BY next_attempt_at, id LIMIT 1000 FOR UPDATE SKIP LOCKED) \
             UPDATE pending_propagations p SET next_attempt_at = $1, updated_at = $1 \
             FROM far WHERE p.id = far.id AND p.claimed_by IS NULL \
             RETURNING p.id",
        )
        .bind(now)
        .bind(millis(crate::MAX_WAIT))
        .fetch_all(&self.pool)
        .await
        .map_err(db("wake propagations due implausibly far ahead"))?;
        Ok(ids.into_iter().map(PropagationId).collect())
    }

    /// Leaves claimed rows that cannot be read for a runner that can: the claim is undone
    /// (the attempt given back) and the row is due again after [`DEFER_RETRY`]; the first
    /// deferral stamps `deferred_since`, from which the grace of
    /// [`PgPropagationStore::settle_unsupported`] runs.
    async fn defer(
        &self,
        unreadable: Vec<(i64, i64, String)>,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let (ids, tokens, reasons): (Vec<i64>, Vec<i64>, Vec<String>) = unreadable
            .into_iter()
            .map(|(id, token, reason)| (id, token, storable(&format!("deferred: {reason}"))))
            .fold(
                (Vec::new(), Vec::new(), Vec::new()),
                |(mut a, mut b, mut c), (x, y, z)| {
                    a.push(x);
                    b.push(y);
                    c.push(z);
                    (a, b, c)
                },
            );
        sqlx::query(
            "UPDATE pending_propagations p SET claimed_by = NULL, claim_token = NULL, \
                    lease_expires_at = NULL, attempts = GREATEST(p.attempts - 1, 0), \
                    next_attempt_at = $4, deferred_since = COALESCE(p.deferred_since, $5), \
                    last_error = u.reason, updated_at = $5 \
             FROM UNNEST($1::bigint[], $2::bigint[], $3::text[]) AS u(id, token, reason) \
             WHERE p.id = u.id AND p.claim_token = u.token AND p.status = 'pending'",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&reasons)
        .bind(now + DEFER_RETRY)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("defer unreadable propagations"))?;
        Ok(())
    }

    /// Records `completions` in one transaction, under the recording lock timeout.
    async fn complete_in_one(
        &self,
        worker: &WorkerId,
        completions: &[&Completion],
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<(Vec<i64>, Vec<i64>), StoreError> {
        let n = completions.len();
        let mut ids = Vec::with_capacity(n);
        let mut tokens = Vec::with_capacity(n);
        let mut targets = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut next = Vec::with_capacity(n);
        let mut errors = Vec::with_capacity(n);
        for c in completions {
            ids.push(c.propagation.id.0);
            tokens.push(c.propagation.fence.claim.0);
            targets.push(c.propagation.fence.target.0);
            statuses.push(status_of(&c.transition));
            next.push(match &c.transition {
                Transition::Retry {
                    next_attempt_at, ..
                } => Some(*next_attempt_at),
                Transition::Applied { .. } | Transition::DeadLetter { .. } => None,
            });
            errors.push(c.transition.last_error());
        }
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        // A caller's open transaction holding a row lock (an enqueue_in not yet committed) must
        // not hold the recording: wait at most this long, then record row by row.
        //
        // The fence filter makes the planner expect about one matching row and choose a nested
        // loop that rescans the UNNEST once per row: quadratic in the batch. A hash join over
        // the primary-key lookup is right for any batch size. Both settings in one round trip.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{}ms'; SET LOCAL enable_nestloop = off",
            RECORD_LOCK_TIMEOUT.whole_milliseconds()
        )))
        .execute(&mut *tx)
        .await
        .map_err(db("set the recording lock timeout and plan"))?;
        // Rows still held by this very claim (its token) take their transition when their target
        // version is unchanged; when the target was replaced meanwhile, the result is for the
        // old target: the row is handed back instead, due now, keeping the fresh budget the
        // replacing enqueue gave it.
        let fenced: Vec<(i64, bool)> = sqlx::query_as(RECORD_SQL)
            .bind(&ids)
            .bind(&tokens)
            .bind(&targets)
            .bind(&statuses)
            .bind(&next)
            .bind(&errors)
            .bind(now)
            .bind(worker.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(db("record transitions"))?;
        let recorded: Vec<i64> = fenced
            .iter()
            .filter(|(_, same)| *same)
            .map(|(id, _)| *id)
            .collect();
        let recorded_set: std::collections::BTreeSet<i64> = recorded.iter().copied().collect();
        let refused: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !recorded_set.contains(id))
            .collect();
        let accepted: Vec<&Completion> = completions
            .iter()
            .copied()
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
            sqlx::query(LAND_TIERS_SQL)
                .bind(&landed_ids)
                .bind(&landed_tiers)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db("record applied tiers"))?;
        }
        tx.commit().await.map_err(db("commit transitions"))?;
        Ok((recorded, refused))
    }
}

/// The fenced transition of a recorded batch: `$1` ids, `$2` their claim tokens, `$3` the target
/// versions they were claimed at, `$4` new statuses, `$5` next attempts, `$6` errors, `$7` now,
/// `$8` the worker.
///
/// The rows are found by primary key (`id = ANY($1)`). The worker is compared with
/// `IS NOT DISTINCT FROM`, not `=`: from `claimed_by = $8` the planner proves that the partial
/// `pending_propagations_lease_ix` (claimed rows) applies, and, with statistics taken while
/// few rows were claimed, believes it nearly empty and scans all of it instead, through every
/// live claim and the dead entries of earlier ones, testing each against the batch's ids. A
/// generic plan did that on every recording: 150–220 ms a batch at 100,000 rows instead of
/// about 10. The worker is never NULL, so the two comparisons select the same rows.
const RECORD_SQL: &str = "UPDATE pending_propagations p SET \
               status = CASE WHEN p.target_version = u.target THEN u.status ELSE 'pending' END, \
               next_attempt_at = CASE WHEN p.target_version = u.target \
                                      THEN COALESCE(u.next_attempt_at, p.next_attempt_at) \
                                      ELSE LEAST(p.next_attempt_at, $7) END, \
               last_error = CASE WHEN p.target_version = u.target \
                                 THEN COALESCE(u.last_error, p.last_error) ELSE p.last_error END, \
               applied_at = CASE WHEN p.target_version = u.target AND u.status = 'applied' \
                                 THEN $7 END, \
               dead_lettered_at = CASE WHEN p.target_version = u.target \
                                        AND u.status = 'dead_lettered' THEN $7 END, \
               claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL, \
               deferred_since = NULL, updated_at = $7 \
             FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], \
                         $5::timestamptz[], $6::text[]) \
                  AS u(id, token, target, status, next_attempt_at, last_error) \
             WHERE p.id = ANY($1) AND p.id = u.id AND p.claim_token = u.token \
               AND p.claimed_by IS NOT DISTINCT FROM $8 AND p.status = 'pending' \
             RETURNING p.id, p.target_version = u.target";

/// The release of claims handed back unapplied: `$1` ids, `$2` their claim tokens, `$3` the
/// worker, `$4` now, `$5` when they are due again, `$6` the target versions they were claimed
/// at. Rows are found by primary key, the worker compared as in [`RECORD_SQL`].
const RELEASE_SQL: &str = "UPDATE pending_propagations p SET claimed_by = NULL, claim_token = NULL, \
                    lease_expires_at = NULL, \
                    attempts = CASE WHEN p.target_version = u.target \
                                    THEN GREATEST(p.attempts - 1, 0) ELSE p.attempts END, \
                    next_attempt_at = CASE WHEN p.target_version = u.target THEN $5 \
                                           ELSE LEAST(p.next_attempt_at, $4) END, \
                    updated_at = $4 \
             FROM UNNEST($1::bigint[], $2::bigint[], $6::bigint[]) AS u(id, token, target) \
             WHERE p.id = ANY($1) AND p.id = u.id AND p.claim_token = u.token \
               AND p.claimed_by IS NOT DISTINCT FROM $3 AND p.status = 'pending'";

/// The claim: due, unclaimed rows this build can read, in claim order, skipping rows another
/// replica is claiming. `$1` now, `$2` limit, `$3` worker, `$4` lease in ms, `$5` kinds,
/// `$6` resource types, `$7` highest payload version. The attempt count saturates at the
/// column's largest value: a count another writer set there would otherwise overflow and fail
/// every claim, holding back every other row (such a row's budget is spent: it is dead-lettered).
const CLAIM_SQL: &str = "WITH claimed AS ( \
               UPDATE pending_propagations p \
               SET claimed_by = $3, claim_token = nextval('pending_propagations_fence_seq'), \
                   attempts = LEAST(p.attempts, 2147483646) + 1, updated_at = $1, \
                   lease_expires_at = $1 + make_interval(secs => $4::float8 / 1000.0) \
               WHERE p.id = ANY(ARRAY( \
                 SELECT id FROM pending_propagations \
                 WHERE status = 'pending' AND claimed_by IS NULL AND next_attempt_at <= $1 \
                   AND kind = ANY($5) AND resource_type = ANY($6) AND payload_version <= $7 \
                 ORDER BY next_attempt_at, id \
                 LIMIT $2 \
                 FOR UPDATE SKIP LOCKED)) \
               RETURNING p.id, p.kind, p.team_id, p.resource_id, p.resource_type, p.payload, \
                         p.attempts, p.claim_token, p.target_version \
             ) \
             SELECT c.id, c.kind, c.team_id, c.resource_id, c.resource_type, \
                    c.payload::text AS payload, c.attempts, \
                    c.claim_token, c.target_version, \
                    r.token, r.provider_resource_id, r.status, r.team_id AS owner \
             FROM claimed c LEFT JOIN resources r ON r.id = c.resource_id \
             ORDER BY c.id";

/// The tier landing of a recorded batch (`$1` resource ids, `$2` their target tiers, `$3`
/// now): only rows not already at their target change. The resources are found through
/// `id = ANY($1)` (an index lookup of the batch's rows) so that, under the recording's
/// `enable_nestloop = off`, the join never becomes a hash join over a scan of every resource,
/// which made each batch cost in proportion to the whole `resources` table.
const LAND_TIERS_SQL: &str = "UPDATE resources r SET tier = u.tier, updated_at = $3 \
             FROM UNNEST($1::uuid[], $2::text[]) AS u(id, tier) \
             WHERE r.id = ANY($1) AND r.id = u.id AND r.tier IS DISTINCT FROM u.tier";

/// The rescue of claims whose lease expired or ends further ahead than any claim makes (`$1`
/// now, `$2` limit, `$3` the implausible horizon in ms, see
/// [`lease_is_implausible`](crate::lease_is_implausible)). Answers, per rescued row, whether its
/// lease was an implausible one.
const RESCUE_SQL: &str = "WITH due AS ( \
               SELECT id, lease_expires_at FROM pending_propagations \
               WHERE status = 'pending' AND claimed_by IS NOT NULL \
                 AND (lease_expires_at <= $1 \
                      OR lease_expires_at > $1 + make_interval(secs => $3::float8 / 1000.0)) \
               ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE pending_propagations p SET claimed_by = NULL, claim_token = NULL, \
                    lease_expires_at = NULL, updated_at = $1 \
             FROM due \
             WHERE p.id = ANY(ARRAY(SELECT id FROM due)) AND p.id = due.id \
             RETURNING p.id, due.lease_expires_at > $1";

/// Dead letters newest first (`$1` kind or NULL for all, `$2` limit).
const DEAD_LETTERS_SQL: &str = "SELECT id, kind, team_id, resource_id, resource_type, payload->>'target_tier' AS target_tier, \
                        attempts, last_error, dead_lettered_at \
                 FROM pending_propagations \
                 WHERE status = 'dead_lettered' AND ($1::text IS NULL OR kind = $1) \
                 ORDER BY dead_lettered_at DESC, id DESC LIMIT $2";

/// Due, unclaimed rows per kind (`$1` now).
const QUEUE_STATS_SQL: &str = "SELECT kind, count(*), max(extract(epoch FROM ($1 - next_attempt_at)))::float8 \
             FROM pending_propagations \
             WHERE status = 'pending' AND claimed_by IS NULL AND next_attempt_at <= $1 \
             GROUP BY kind";

/// Teams whose tier is not a [`Tier`] (another writer put it there): the reconciler leaves their
/// resources alone, as [`RECONCILE_SQL`] does, and says how many there are.
const UNREADABLE_TIERS_SQL: &str = "SELECT count(*) FROM teams \
             WHERE NOT (octet_length(tier) <= 32 AND tier ~ '^[a-z0-9_-]+$')";

/// The reconciler's insert (`$1` now, `$2` resource types, `$3` payload version). Only teams
/// whose tier is a [`Tier`] are read: one other tier (too long for a payload, or not a tier at
/// all) would otherwise fail the whole statement, and so every tenant's pass. The
/// dead-letter check is a scalar subquery on purpose: it stays one index probe per drifted
/// resource (`pending_propagations_dead_letter_epoch_ix`), where `NOT EXISTS` would be planned
/// as a hash or merge anti-join over every dead letter kept, of every epoch.
const RECONCILE_SQL: &str = "INSERT INTO pending_propagations \
               (kind, team_id, resource_id, resource_type, payload, payload_version, tier_epoch, \
                next_attempt_at, created_at, updated_at) \
             SELECT 'tier_elevation', r.team_id, r.id, r.resource_type, \
                    jsonb_build_object('target_tier', t.tier), $3, t.tier_epoch, $1, $1, $1 \
             FROM resources r JOIN teams t ON t.id = r.team_id \
             WHERE r.status = 'active' AND r.tier IS DISTINCT FROM t.tier \
               AND r.resource_type = ANY($2) \
               AND octet_length(t.tier) <= 32 AND t.tier ~ '^[a-z0-9_-]+$' \
               AND NOT EXISTS (SELECT 1 FROM pending_propagations p \
                               WHERE p.resource_id = r.id AND p.kind = 'tier_elevation' \
                                 AND p.status = 'pending') \
               AND (SELECT true FROM pending_propagations d \
                    WHERE d.resource_id = r.id AND d.kind = 'tier_elevation' \
                      AND d.status = 'dead_lettered' AND d.tier_epoch = t.tier_epoch \
                      AND d.payload->>'target_tier' = t.tier \
                    LIMIT 1) IS NULL \
             ON CONFLICT DO NOTHING \
             RETURNING id, resource_id";

impl PropagationStore for PgPropagationStore {
    async fn now(&self) -> Result<OffsetDateTime, StoreError> {
        self.db_now().await
    }

    async fn claim(
        &self,
        worker: &WorkerId,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<Propagation>, StoreError> {
        let (kinds, types) = known();
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        // Rescue: a claim whose lease expired is undone, keeping its counted attempt, so the
        // claim below takes it like any due row. Its token is gone, so the vanished worker's
        // late completion can never be recorded.
        let rescued: Vec<(i64, bool)> = sqlx::query_as(RESCUE_SQL)
            .bind(now)
            .bind(i64::from(limit))
            .bind(millis(crate::MAX_LEASE + crate::LEASE_MARGIN))
            .fetch_all(&mut *tx)
            .await
            .map_err(db("rescue abandoned claims"))?;
        for (id, _) in rescued.iter().filter(|(_, implausible)| *implausible) {
            tracing::warn!(
                propagation_id = id,
                "a claim whose lease ended further ahead than any claim makes was undone; \
                 another writer set it"
            );
        }
        let lease = crate::bounded_lease(lease);
        // Only rows this build can read: other kinds, resource types and payload versions wait
        // for a runner that knows them.
        let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM_SQL)
            .bind(now)
            .bind(i64::from(limit))
            .bind(worker.as_str())
            .bind(millis(lease))
            .bind(&kinds)
            .bind(&types)
            .bind(Payload::CURRENT_VERSION)
            .fetch_all(&mut *tx)
            .await
            .map_err(db("claim due propagations"))?;
        tx.commit().await.map_err(db("commit a claim"))?;
        let mut claimed = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in rows {
            match row.into_domain() {
                Ok(propagation) => claimed.push(propagation),
                Err(bad) => unreadable.push(bad),
            }
        }
        if !unreadable.is_empty() {
            let count = unreadable.len();
            tracing::warn!(
                count,
                "left unreadable propagations for a newer runner (see `deferred list`)"
            );
            if let Err(e) = self.defer(unreadable, now).await {
                // The unreadable rows keep their lease and come back after it; the readable
                // ones just claimed must not be dropped because of them.
                tracing::error!(error = %e, count, "could not defer unreadable propagations");
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
        let all: Vec<&Completion> = completions.iter().collect();
        let batch_error = match self.complete_in_one(worker, &all, actor, now).await {
            Ok((recorded, stale)) => {
                return Ok(CompletionReport {
                    recorded: recorded.into_iter().map(PropagationId).collect(),
                    stale: stale.into_iter().map(PropagationId).collect(),
                    unrecorded: Vec::new(),
                });
            }
            Err(e) => e,
        };
        if completions.len() == 1 {
            return Err(batch_error);
        }
        // One row must not cost the others their results: record each on its own.
        tracing::warn!(error = %batch_error, rows = completions.len(), "recording the batch failed; recording its rows one by one");
        let mut report = CompletionReport::default();
        let mut last_error = None;
        for completion in completions {
            let id = completion.propagation.id;
            match self
                .complete_in_one(worker, &[completion], actor, now)
                .await
            {
                Ok((recorded, _)) if recorded.is_empty() => report.stale.push(id),
                Ok(_) => report.recorded.push(id),
                Err(e) => {
                    tracing::error!(propagation_id = %id, error = %e, "could not record a propagation's transition; it is retried after its lease");
                    report.unrecorded.push(id);
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) if report.recorded.is_empty() && report.stale.is_empty() => Err(e),
            Some(_) | None => Ok(report),
        }
    }

    async fn release(
        &self,
        worker: &WorkerId,
        propagations: &[Propagation],
        due_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        if propagations.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = propagations.iter().map(|p| p.id.0).collect();
        let tokens: Vec<i64> = propagations.iter().map(|p| p.fence.claim.0).collect();
        let targets: Vec<i64> = propagations.iter().map(|p| p.fence.target.0).collect();
        let mut tx = self.pool.begin().await.map_err(db("begin a transaction"))?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = '{}ms'",
            RECORD_LOCK_TIMEOUT.whole_milliseconds()
        )))
        .execute(&mut *tx)
        .await
        .map_err(db("set the release lock timeout"))?;
        // As in `complete`: keep the planner off a per-row rescan of the UNNEST.
        sqlx::query("SET LOCAL enable_nestloop = off")
            .execute(&mut *tx)
            .await
            .map_err(db("set the plan for releasing claims"))?;
        // The attempt is given back only when the target is the one claimed: a replacing
        // enqueue already reset the budget for the new target.
        let done = sqlx::query(RELEASE_SQL)
            .bind(&ids)
            .bind(&tokens)
            .bind(worker.as_str())
            .bind(now)
            .bind(due_at)
            .bind(&targets)
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
/// The role is the resource's `provider_resource_id`, parsed with the newtype provisioning
/// created it with ([`keel_provision::RoleName`]: `cust_<digest>`, the first 48 hex digits of
/// the token's SHA-256, or the legacy `cust_<token>` of a database created before digest names)
/// and checked against the resource's token: a platform role (`keel_app`, `postgres`, a
/// replication role) can never be named, and a role with `SUPERUSER`, `REPLICATION`, `CREATEROLE` or `BYPASSRLS` is refused
/// even inside the prefix. The role name (derived from the customer's token) never appears in
/// errors.
///
/// An attempt that cannot get a connection to the cluster within the pool's acquire timeout,
/// because every connection of the pool is busy, never reached the backend: it is reported
/// [`ApplyError::not_attempted`], so a few slow customer roles holding connections never cost
/// other rows an attempt. Give the applier its own pool, at least as large as the runner's
/// concurrency. A connection that cannot be made at all (refused, timed out with room in the
/// pool, a wrong password) is a charged attempt, retried and in the end dead-lettered.
#[derive(Clone, Debug)]
pub struct PgRoleApplier {
    cluster: PgPool,
    settings: TierRoleSettings,
}

impl PgRoleApplier {
    /// Why no connection to the cluster was had. Waiting for one while every connection of the
    /// pool is busy with other rows is not an attempt on this customer's role. Anything else (a
    /// refused or timed-out connect with room in the pool, a refused password, a TLS or DNS
    /// failure) is the cluster being unreachable: a charged attempt, retried with backoff and
    /// dead-lettered when its budget is spent, so a wrong secret or a dead cluster pages
    /// instead of cycling rows unattempted for ever.
    fn no_connection(&self, e: &sqlx::Error) -> ApplyError {
        let at_capacity = matches!(e, sqlx::Error::PoolTimedOut)
            && self.cluster.size() >= self.cluster.options().get_max_connections()
            && self.cluster.num_idle() == 0;
        if at_capacity {
            ApplyError::not_attempted(format!("no free connection to the shared cluster: {e}"))
        } else {
            ApplyError::new(format!("could not connect to the shared cluster: {e}"))
        }
    }

    /// An applier acting on the cluster behind `cluster` (a role allowed to `ALTER ROLE`).
    /// Build the pool from [`PgRoleApplier::cluster_options`], so nothing on its connections
    /// logs a statement.
    pub fn new(cluster: PgPool, settings: TierRoleSettings) -> Self {
        Self { cluster, settings }
    }

    /// `options` made fit for the applier's pool: sqlx's own statement logging is off (a
    /// statement names the customer role, and a legacy `cust_<token>` name contains the token),
    /// and the server sends no notice below WARNING, so none naming a role is forwarded to the
    /// log.
    pub fn cluster_options(
        options: sqlx::postgres::PgConnectOptions,
    ) -> sqlx::postgres::PgConnectOptions {
        use sqlx::ConnectOptions as _;
        options
            .disable_statement_logging()
            .options([("client_min_messages", "warning")])
    }
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

/// The customer role a propagation may change, or the unexpected skip that explains why none.
fn customer_role(propagation: &Propagation) -> Result<keel_provision::RoleName, ApplyOutcome> {
    let legacy = |detail: &str| {
        ApplyOutcome::Skipped(SkipReason::Unexpected {
            bucket: ReasonBucket::LegacyResource,
            detail: detail.to_owned(),
        })
    };
    match propagation.resource_type {
        ResourceType::Postgres => {}
        ResourceType::Redis | ResourceType::Namespace => {
            return Err(ApplyOutcome::Skipped(SkipReason::Unexpected {
                bucket: ReasonBucket::Other,
                detail: format!(
                    "a {} resource has no customer role; it is routed to the wrong applier",
                    propagation.resource_type
                ),
            }));
        }
    }
    let Some(id) = propagation.backend.provider_resource_id.as_deref() else {
        return Err(legacy(
            "the resource has no provider resource id (customer role) recorded",
        ));
    };
    let Ok(role) = keel_provision::RoleName::parse(id) else {
        return Err(legacy(
            "the resource's provider resource id is not a customer role (cust_<digest>); \
             platform roles are never changed",
        ));
    };
    let belongs = propagation
        .backend
        .token
        .as_ref()
        .is_some_and(|token| role.belongs_to(token));
    if !belongs {
        return Err(ApplyOutcome::Skipped(SkipReason::Unexpected {
            bucket: ReasonBucket::Other,
            detail: "the resource's provider resource id names another customer's role".into(),
        }));
    }
    Ok(role)
}

impl Applier for PgRoleApplier {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        match propagation.backend.status.as_deref() {
            // Deprovisioned on purpose: there is nothing left to change.
            Some("deleted") => {
                return Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                    LegitimateSkip::ResourceDeprovisioned,
                )));
            }
            // No resources row at all: a wrong id or a hard delete, never success.
            None => {
                return Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
                    bucket: ReasonBucket::Other,
                    detail: "the resource has no resources row".into(),
                }));
            }
            Some(_) => {}
        }
        let role = match customer_role(propagation) {
            Ok(role) => role,
            Err(skip) => return Ok(skip),
        };
        let named = role;
        let role = named.expose();
        let tier = propagation.payload.target_tier();
        let settings = self.settings.get(tier).ok_or_else(|| {
            ApplyError::new(format!("no role settings are configured for tier {tier}"))
        })?;
        let mut conn = match self.cluster.acquire().await {
            Ok(conn) => conn,
            Err(e) => return Err(self.no_connection(&e)),
        };
        // A legacy name carries the token: it is found by its token's digest, computed by the
        // server, and changed by its oid, so neither the statements nor their parameters name
        // it (a server that logs statements would log the token).
        let read = if named.carries_token() {
            sqlx::query_as(
                "SELECT oid, rolconnlimit, rolconfig, \
                        (rolsuper OR rolreplication OR rolcreaterole OR rolbypassrls) \
                 FROM pg_roles \
                 WHERE starts_with(rolname, $3) \
                   AND left(encode(sha256(convert_to(substr(rolname, length($3) + 1), 'UTF8')), \
                                   'hex'), length($1)) = $1 \
                   AND length(rolname) = $2",
            )
            .bind(named.digest().as_str())
            .bind(i32::try_from(role.len()).unwrap_or(i32::MAX))
            .bind(keel_provision::DATABASE_PREFIX)
        } else {
            sqlx::query_as(
                "SELECT oid, rolconnlimit, rolconfig, \
                        (rolsuper OR rolreplication OR rolcreaterole OR rolbypassrls) \
                 FROM pg_roles WHERE rolname = $1",
            )
            .bind(role)
        };
        let current: Option<(sqlx::postgres::types::Oid, i32, Option<Vec<String>>, bool)> =
            match read.fetch_optional(&mut *conn).await {
                Ok(current) => current,
                Err(e) => return role_error("read the customer role", role, e),
            };
        let Some((oid, connection_limit, config, privileged)) = current else {
            return Ok(role_missing(
                "the customer role does not exist on the shared cluster",
            ));
        };
        if privileged {
            return Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
                bucket: ReasonBucket::Other,
                detail: "refusing to change a privileged role (superuser, replication, \
                         createrole or bypassrls)"
                    .into(),
            }));
        }
        let wanted_timeout = format!("statement_timeout={}ms", settings.statement_timeout_ms);
        let timeout_set = config.unwrap_or_default().contains(&wanted_timeout);
        if connection_limit == settings.connection_limit && timeout_set {
            return Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                LegitimateSkip::AlreadyAtTarget,
            )));
        }
        let quoted = quote_ident(role);
        let mut tx = match sqlx::Connection::begin(&mut *conn).await {
            Ok(tx) => tx,
            Err(e) => return role_error("begin on the shared cluster", role, e),
        };
        // Both values are integers formatted here; the role is parsed and quoted, or (a legacy
        // name) looked up by its oid inside the block, so its name is never sent.
        let statements = if named.carries_token() {
            vec![format!(
                "DO $keel$ DECLARE r text; BEGIN \
                   SELECT rolname INTO STRICT r FROM pg_roles WHERE oid = {}; \
                   EXECUTE format('ALTER ROLE %I CONNECTION LIMIT {}', r); \
                   EXECUTE format('ALTER ROLE %I SET statement_timeout = %L', r, '{}ms'); \
                 END $keel$",
                oid.0, settings.connection_limit, settings.statement_timeout_ms
            )]
        } else {
            vec![
                format!(
                    "ALTER ROLE {quoted} CONNECTION LIMIT {}",
                    settings.connection_limit
                ),
                format!(
                    "ALTER ROLE {quoted} SET statement_timeout = '{}ms'",
                    settings.statement_timeout_ms
                ),
            ]
        };
        for statement in statements {
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

    /// PROP-7: the applier accepts exactly the names provisioning creates for the resource's
    /// token (`cust_<digest>`, or a legacy `cust_<token>`), nothing another customer's or the
    /// platform's.
    #[test]
    fn the_role_applier_refuses_roles_outside_the_customer_prefix() {
        use keel_provision::{DatabaseName, RoleName, TokenDigest};
        let token = Token::parse("a1b2c3d4").unwrap();
        let other = Token::parse("ffff0000").unwrap();
        let role = |token: &Token| {
            RoleName::for_database(&DatabaseName::for_token(token))
                .expose()
                .to_owned()
        };
        let mut propagation = crate::model::sample_propagation();
        propagation.backend.token = Some(token.clone());
        propagation.backend.status = Some("active".into());
        let digest = TokenDigest::of(&token);
        for (id, accepted) in [
            (role(&token), true),
            (
                DatabaseName::legacy_for_token(&token).expose().to_owned(),
                true,
            ),
            (role(&other), false),
            ("cust_ffff0000".to_owned(), false),
            ("keel_app".to_owned(), false),
            ("postgres".to_owned(), false),
            ("replicator".to_owned(), false),
            ("cust_".to_owned(), false),
            (format!("Cust_{digest}"), false),
            (format!("cust_{}", digest.as_str().to_uppercase()), false),
            (format!("cust_{}", &digest.as_str()[..40]), false),
            (format!("instant-customer-{digest}"), false),
            ("instant-customer-a1b2c3d4".to_owned(), false),
        ] {
            propagation.backend.provider_resource_id = Some(id.clone());
            match customer_role(&propagation) {
                Ok(parsed) => {
                    assert!(accepted, "{id} was accepted");
                    assert_eq!(parsed.expose(), id);
                }
                Err(skip) => {
                    assert!(!accepted, "{id} was refused: {skip:?}");
                    assert!(
                        matches!(skip, ApplyOutcome::Skipped(SkipReason::Unexpected { .. })),
                        "{id}: {skip:?}"
                    );
                }
            }
        }
        // A resource without a token owns no role.
        propagation.backend.provider_resource_id = Some(role(&token));
        propagation.backend.token = None;
        assert!(customer_role(&propagation).is_err());
        propagation.backend.token = Some(token.clone());
        propagation.resource_type = ResourceType::Redis;
        assert!(customer_role(&propagation).is_err());
    }
}

/// PROP-14: the hot statements cost the same however many rows are in flight or finished.
/// Each is planned and run (`EXPLAIN ANALYZE`, inside a transaction that is rolled back) over
/// 50,000 leased rows, 150,000 dead letters and 140,000 applied rows, and the plan is checked
/// for its shape and its row counts, never for a time.
#[cfg(test)]
mod plans {
    use super::*;

    /// Every plan node of `plan` (a node and its children, init plans and CTEs included).
    fn nodes(plan: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        out.push(plan.clone());
        if let Some(children) = plan.get("Plans").and_then(|p| p.as_array()) {
            for child in children {
                nodes(child, out);
            }
        }
    }

    /// The nodes that read `pending_propagations`.
    fn queue_nodes(plan: &[serde_json::Value]) -> Vec<serde_json::Value> {
        plan.iter()
            .filter(|n| n["Relation Name"] == "pending_propagations")
            .cloned()
            .collect()
    }

    fn removed_by_filter(node: &serde_json::Value) -> i64 {
        node.get("Rows Removed by Filter")
            .and_then(|v| v.as_i64())
            .unwrap_or(0)
    }

    /// 50,000 leased rows (claimed by another runner, lease live), 150,000 dead letters,
    /// 140,000 applied rows and `due` unclaimed due rows, then `ANALYZE`.
    async fn crowded_queue(pool: &PgPool, due: i64) {
        sqlx::query(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, \
                    next_attempt_at, claimed_by, claim_token, lease_expires_at, attempts, tier_epoch) \
             SELECT 'tier_elevation', gen_random_uuid(), gen_random_uuid(), 'postgres', \
                    '{\"target_tier\":\"pro\"}', now() - interval '1 minute', 'busy-runner', g, \
                    now() + interval '1 hour', 1, 0 \
             FROM generate_series(1, 50000) g",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, \
                    status, attempts, dead_lettered_at, tier_epoch) \
             SELECT 'tier_elevation', gen_random_uuid(), gen_random_uuid(), 'postgres', \
                    '{\"target_tier\":\"pro\"}', 'dead_lettered', 10, \
                    now() - make_interval(secs => g), 0 \
             FROM generate_series(1, 150000) g",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, \
                    status, attempts, applied_at, tier_epoch) \
             SELECT 'tier_elevation', gen_random_uuid(), gen_random_uuid(), 'postgres', \
                    '{\"target_tier\":\"pro\"}', 'applied', 1, now() - make_interval(secs => g), 0 \
             FROM generate_series(1, 140000) g",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, \
                    next_attempt_at, tier_epoch) \
             SELECT 'tier_elevation', gen_random_uuid(), gen_random_uuid(), 'postgres', \
                    '{\"target_tier\":\"pro\"}', now() - interval '30 seconds', 0 \
             FROM generate_series(1, $1) g",
        )
        .bind(due)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE pending_propagations")
            .execute(pool)
            .await
            .unwrap();
    }

    /// `EXPLAIN (ANALYZE, FORMAT JSON)` of `query` (already bound), rolled back; its nodes.
    async fn explain(
        pool: &PgPool,
        sql: &str,
        bind: impl FnOnce(
            sqlx::query::QueryScalar<
                'static,
                sqlx::Postgres,
                sqlx::types::Json<serde_json::Value>,
                sqlx::postgres::PgArguments,
            >,
        ) -> sqlx::query::QueryScalar<
            'static,
            sqlx::Postgres,
            sqlx::types::Json<serde_json::Value>,
            sqlx::postgres::PgArguments,
        >,
    ) -> Vec<serde_json::Value> {
        let mut tx = pool.begin().await.unwrap();
        let query = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (ANALYZE, FORMAT JSON) {sql}"
        )));
        let sqlx::types::Json(plan) = bind(query).fetch_one(&mut *tx).await.unwrap();
        tx.rollback().await.unwrap();
        let mut out = Vec::new();
        nodes(&plan[0]["Plan"], &mut out);
        out
    }

    #[tokio::test]
    async fn claim_never_filters_past_leased_rows() {
        let db = keel_testkit::database().await;
        crowded_queue(db.pool(), 20).await;
        let store = PgPropagationStore::new(db.pool().clone());
        let now = store.db_now().await.unwrap();
        let (kinds, types) = known();

        let plan = explain(db.pool(), CLAIM_SQL, |q| {
            q.bind(now)
                .bind(32_i64)
                .bind("plan-runner")
                .bind(60_000_i64)
                .bind(kinds)
                .bind(types)
                .bind(Payload::CURRENT_VERSION)
        })
        .await;
        assert!(
            plan.iter()
                .any(|n| n["Index Name"] == "pending_propagations_unclaimed_due_ix"),
            "the claim reads the index of unclaimed due rows: {plan:#?}"
        );
        let reads = queue_nodes(&plan);
        for node in &reads {
            assert_ne!(node["Node Type"], "Seq Scan", "{node:#?}");
            assert_eq!(
                removed_by_filter(node),
                0,
                "leased rows were read: {node:#?}"
            );
        }
        let claimed = plan[0]["Actual Rows"].as_i64().unwrap();
        assert_eq!(
            claimed, 20,
            "every due unclaimed row, and only those, is claimed"
        );

        let plan = explain(db.pool(), RESCUE_SQL, |q| {
            q.bind(now)
                .bind(32_i64)
                .bind(millis(crate::MAX_LEASE + crate::LEASE_MARGIN))
        })
        .await;
        for node in &queue_nodes(&plan) {
            assert_ne!(node["Node Type"], "Seq Scan", "{node:#?}");
            assert_eq!(
                removed_by_filter(node),
                0,
                "live leases were read by the rescue: {node:#?}"
            );
        }
    }

    /// The tier landing of a recorded batch reads only that batch's resources, under the plan
    /// settings the recording runs with: never a scan of every resource per batch, which made
    /// draining a queue quadratic in the size of `resources`.
    #[tokio::test]
    async fn tier_landing_reads_only_the_batchs_resources() {
        let db = keel_testkit::database().await;
        let team = db.team("pro").await;
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                    provider_resource_id, connection_url) \
             SELECT gen_random_uuid(), 'plan' || lpad(g::text, 12, '0'), $1, 'postgres', 'free', \
                    'active', 'cust_plan' || g, 'postgres://plan@127.0.0.1/x' \
             FROM generate_series(1, 20000) g",
        )
        .bind(team)
        .execute(db.pool())
        .await
        .unwrap();
        sqlx::query("ANALYZE resources")
            .execute(db.pool())
            .await
            .unwrap();
        let ids: Vec<Uuid> =
            sqlx::query_scalar("SELECT id FROM resources ORDER BY token LIMIT 10 OFFSET 5000")
                .fetch_all(db.pool())
                .await
                .unwrap();
        let tiers = vec!["pro"; ids.len()];
        let now = PgPropagationStore::new(db.pool().clone())
            .db_now()
            .await
            .unwrap();

        let mut tx = db.pool().begin().await.unwrap();
        sqlx::query("SET LOCAL enable_nestloop = off")
            .execute(&mut *tx)
            .await
            .unwrap();
        let sqlx::types::Json(plan): sqlx::types::Json<serde_json::Value> = sqlx::query_scalar(
            sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, FORMAT JSON) {LAND_TIERS_SQL}")),
        )
        .bind(&ids)
        .bind(&tiers)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        let landed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM resources WHERE id = ANY($1) AND tier = 'pro'",
        )
        .bind(&ids)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(landed, 10, "every resource of the batch got its tier");
        let mut all = Vec::new();
        nodes(&plan[0]["Plan"], &mut all);
        let reads: Vec<&serde_json::Value> = all
            .iter()
            .filter(|n| n["Relation Name"] == "resources" && n["Node Type"] != "ModifyTable")
            .collect();
        assert!(!reads.is_empty(), "{all:#?}");
        for node in reads {
            assert_ne!(
                node["Node Type"], "Seq Scan",
                "the landing scanned every resource: {node:#?}"
            );
            assert!(
                node["Actual Rows"].as_i64().unwrap() <= 10,
                "the landing read resources outside its batch: {node:#?}"
            );
        }
    }

    #[tokio::test]
    async fn dead_letter_listing_and_queue_stats_read_only_what_they_return() {
        let db = keel_testkit::database().await;
        crowded_queue(db.pool(), 20).await;
        let store = PgPropagationStore::new(db.pool().clone());
        let now = store.db_now().await.unwrap();

        for kind in [None, Some(PropagationKind::TierElevation.as_str())] {
            let plan = explain(db.pool(), DEAD_LETTERS_SQL, |q| q.bind(kind).bind(100_i64)).await;
            let reads = queue_nodes(&plan);
            assert!(!reads.is_empty(), "{plan:#?}");
            for node in &reads {
                assert_ne!(node["Node Type"], "Seq Scan", "{kind:?}: {node:#?}");
                assert!(
                    node["Actual Rows"].as_i64().unwrap() <= 100,
                    "{kind:?}: the listing reads past its limit: {node:#?}"
                );
                assert_eq!(removed_by_filter(node), 0, "{kind:?}: {node:#?}");
            }
        }

        let plan = explain(db.pool(), QUEUE_STATS_SQL, |q| q.bind(now)).await;
        assert!(
            plan.iter()
                .any(|n| n["Index Name"] == "pending_propagations_unclaimed_due_ix"),
            "queue_stats reads the index of unclaimed due rows: {plan:#?}"
        );
        let reads = queue_nodes(&plan);
        for node in &reads {
            assert_ne!(node["Node Type"], "Seq Scan", "{node:#?}");
            assert_eq!(removed_by_filter(node), 0, "{node:#?}");
            assert!(node["Actual Rows"].as_i64().unwrap() <= 20, "{node:#?}");
        }
    }

    /// 300 teams on `pro` with 1,000 active resources each: 150,000 on their team's tier,
    /// 149,990 still on `free` whose elevation dead-lettered under the team's current tier
    /// change (plus as many dead letters from an earlier change), and 10 drifted without one.
    async fn crowded_reconciler(pool: &PgPool) {
        sqlx::query(
            "INSERT INTO teams (id, tier) \
             SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'free' \
             FROM generate_series(1, 300) g",
        )
        .execute(pool)
        .await
        .unwrap();
        // Two tier changes: epoch 2, on `pro`.
        sqlx::query("UPDATE teams SET tier = 'team'")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("UPDATE teams SET tier = 'pro'")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                    provider_resource_id, connection_url) \
             SELECT gen_random_uuid(), md5(g::text), \
                    ('00000000-0000-0000-0000-' || lpad((g % 300 + 1)::text, 12, '0'))::uuid, \
                    'postgres', CASE WHEN g <= 150000 THEN 'pro' ELSE 'free' END, 'active', \
                    'cust_' || left(md5(g::text), 8), 'postgres://x' \
             FROM generate_series(1, 300000) g",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, \
                    status, attempts, dead_lettered_at, tier_epoch) \
             SELECT 'tier_elevation', r.team_id, r.id, 'postgres', \
                    jsonb_build_object('target_tier', e.tier), 'dead_lettered', 10, \
                    now() - interval '1 day', e.epoch \
             FROM (SELECT id, team_id FROM resources WHERE tier = 'free' \
                   ORDER BY id OFFSET 10) r \
             CROSS JOIN (VALUES (1::bigint, 'team'), (2::bigint, 'pro')) e(epoch, tier)",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE").execute(pool).await.unwrap();
    }

    #[tokio::test]
    async fn reconciler_reads_only_current_epoch_dead_letters_and_sorts_none() {
        let db = keel_testkit::database().await;
        crowded_reconciler(db.pool()).await;
        let store = PgPropagationStore::new(db.pool().clone());
        let now = store.db_now().await.unwrap();
        let (_, types) = known();

        let plan = explain(db.pool(), RECONCILE_SQL, |q| {
            q.bind(now).bind(types).bind(Payload::CURRENT_VERSION)
        })
        .await;
        assert_eq!(
            plan[0]["Actual Rows"].as_i64(),
            Some(10),
            "exactly the 10 drifted resources without a current dead letter are enqueued"
        );
        for node in &plan {
            assert_ne!(node["Node Type"], "Sort", "{node:#?}");
        }
        let reads = queue_nodes(&plan);
        for node in &reads {
            assert_ne!(node["Node Type"], "Seq Scan", "{node:#?}");
        }
        // One probe per drifted resource, each finding at most its current dead letter (EXPLAIN
        // gives rows per loop): the 149,990 dead letters of the earlier tier change are never
        // read, nor sorted or hashed.
        let probes: Vec<_> = reads
            .iter()
            .filter(|n| n["Index Name"] == "pending_propagations_dead_letter_epoch_ix")
            .collect();
        assert_eq!(probes.len(), 1, "{plan:#?}");
        assert_eq!(
            probes[0]["Actual Loops"].as_i64(),
            Some(150_000),
            "one probe per drifted resource: {:#?}",
            probes[0]
        );
        assert!(
            probes[0]["Actual Rows"].as_f64().unwrap() <= 1.0,
            "at most one dead letter read per probe: {:#?}",
            probes[0]
        );
    }

    /// The recording and the release of a batch find its rows by primary key even under a
    /// generic plan built from statistics taken while no row was claimed (as after a quiet
    /// period, or a `VACUUM ANALYZE` before a burst), when the planner believes the partial
    /// index of claimed rows nearly empty: neither may scan the claimed rows instead.
    #[tokio::test]
    async fn a_batch_is_recorded_and_released_by_primary_key_whatever_the_statistics() {
        let db = keel_testkit::database().await;
        let pool = db.pool();
        sqlx::query(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, \
                    next_attempt_at, tier_epoch) \
             SELECT 'tier_elevation', gen_random_uuid(), gen_random_uuid(), 'postgres', \
                    '{\"target_tier\":\"pro\"}', now() - interval '1 minute', 0 \
             FROM generate_series(1, 20000) g",
        )
        .execute(pool)
        .await
        .unwrap();
        sqlx::query("VACUUM ANALYZE pending_propagations")
            .execute(pool)
            .await
            .unwrap();
        // Then most rows get claimed, by this worker and others, as a busy queue has them.
        sqlx::query(
            "UPDATE pending_propagations SET claim_token = id, attempts = 1, \
                    claimed_by = CASE WHEN id <= 1000 THEN 'me' ELSE 'another' END, \
                    lease_expires_at = now() + interval '1 hour'",
        )
        .execute(pool)
        .await
        .unwrap();
        let (ids, targets): (Vec<i64>, Vec<i64>) = sqlx::query_as::<_, (i64, i64)>(
            "SELECT id, target_version FROM pending_propagations WHERE claimed_by = 'me' ORDER BY id",
        )
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .unzip();
        let n = ids.len();
        let statuses = vec!["applied"; n];
        let next: Vec<Option<OffsetDateTime>> = vec![None; n];
        let errors: Vec<Option<String>> = vec![None; n];
        let now = OffsetDateTime::now_utc();
        for (name, sql) in [("RECORD_SQL", RECORD_SQL), ("RELEASE_SQL", RELEASE_SQL)] {
            let mut tx = pool.begin().await.unwrap();
            sqlx::raw_sql(
                "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_nestloop = off",
            )
            .execute(&mut *tx)
            .await
            .unwrap();
            let query = sqlx::query_scalar::<_, sqlx::types::Json<serde_json::Value>>(
                sqlx::AssertSqlSafe(format!("EXPLAIN (ANALYZE, FORMAT JSON) {sql}")),
            );
            let query = if name == "RECORD_SQL" {
                query
                    .bind(&ids)
                    .bind(&ids)
                    .bind(&targets)
                    .bind(&statuses)
                    .bind(&next)
                    .bind(&errors)
                    .bind(now)
                    .bind("me")
            } else {
                query
                    .bind(&ids)
                    .bind(&ids)
                    .bind("me")
                    .bind(now)
                    .bind(now)
                    .bind(&targets)
            };
            let sqlx::types::Json(plan) = query.fetch_one(&mut *tx).await.unwrap();
            tx.rollback().await.unwrap();
            let mut all = Vec::new();
            nodes(&plan[0]["Plan"], &mut all);
            let queue: Vec<serde_json::Value> = queue_nodes(&all)
                .into_iter()
                .filter(|node| {
                    node["Node Type"]
                        .as_str()
                        .is_some_and(|t| t.ends_with("Scan"))
                })
                .collect();
            assert!(!queue.is_empty(), "{name}: no node reads the queue: {plan}");
            for node in &queue {
                assert_eq!(
                    node["Index Name"], "pending_propagations_pkey",
                    "{name} reads the queue otherwise than by primary key: {node}"
                );
                assert_eq!(
                    removed_by_filter(node),
                    0,
                    "{name} read rows outside its batch: {node}"
                );
                assert_eq!(
                    node["Actual Rows"].as_u64(),
                    Some(n as u64),
                    "{name} did not find exactly its batch: {node}"
                );
            }
        }
    }
}
