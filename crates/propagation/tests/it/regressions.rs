//! One regression test per defect (PROP-1 … PROP-18), each named for the invariant it pins.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel_audit::{Actor, AuditKind};
use keel_propagation::postgres::{
    Enqueued, Housekeeping, HousekeepingSchedule, PgRoleApplier, Retention, TierChange,
    TierRoleSettings, change_team_tier, enqueue_in, run_housekeeping,
};
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_propagation::{
    ApplyOutcome, Completion, DeferReason, Metrics, PropagationKind, PropagationStore,
    ReasonBucket, RetryPolicy, SkipReason, StoreError, Transition, decide,
};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::*;

fn runner_with<A: Applier + 'static>(
    pool: &PgPool,
    applier: Arc<A>,
    config: RunnerConfig,
) -> (Runner<PgPropagationStore, A>, Metrics) {
    let metrics = Metrics::register(&mut Registry::default());
    (
        Runner::new(Arc::new(store(pool)), applier, metrics.clone(), config).unwrap(),
        metrics,
    )
}

fn default_runner<A: Applier + 'static>(
    pool: &PgPool,
    applier: Arc<A>,
) -> (Runner<PgPropagationStore, A>, Metrics) {
    runner_with(pool, applier, RunnerConfig::new(worker("runner-1")))
}

fn never() -> CancellationToken {
    CancellationToken::new()
}

/// Waits (bounded, as a hang guard) until `check` holds.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("gave up waiting until {what}");
}

async fn complete_as(
    store: &PgPropagationStore,
    name: &str,
    propagation: Propagation,
    transition: Transition,
) -> keel_propagation::CompletionReport {
    store
        .complete(
            &worker(name),
            &[Completion {
                propagation,
                transition,
            }],
            &Actor::system(),
            T0,
        )
        .await
        .unwrap()
}

/// Answers per resource; `Applied` for any other.
#[derive(Default)]
struct PerResource {
    answers: BTreeMap<ResourceId, Result<ApplyOutcome, ApplyError>>,
    calls: AtomicUsize,
}

impl Applier for PerResource {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.answers
            .get(&propagation.resource_id)
            .cloned()
            .unwrap_or(Ok(ApplyOutcome::Applied))
    }
}

/// Holds every apply of the resources in `held` until `release` is notified.
#[derive(Default)]
struct Gate {
    held: std::sync::Mutex<Vec<ResourceId>>,
    started: AtomicUsize,
    release: tokio::sync::Notify,
    open: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn holding(resources: &[ResourceId]) -> Self {
        Self {
            held: std::sync::Mutex::new(resources.to_vec()),
            ..Self::default()
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.release.notify_waiters();
    }
}

impl Applier for Gate {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        let held = self.held.lock().unwrap().contains(&propagation.resource_id);
        self.started.fetch_add(1, Ordering::SeqCst);
        if held {
            let released = self.release.notified();
            if !self.open.load(Ordering::SeqCst) {
                released.await;
            }
        }
        Ok(ApplyOutcome::Applied)
    }
}

/// PROP-1: a stored payload with a key this build does not know still takes the normal
/// retry path (audit row, metric, schedule) and, when applied, lands.
#[tokio::test]
async fn extra_payload_keys_do_not_defeat_the_completion_fence() {
    let db = keel_testkit::database().await;
    let insert = |team: TeamId, resource: ResourceId| {
        sqlx::query_scalar::<_, i64>(
            "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, next_attempt_at) \
             VALUES ('tier_elevation', $1, $2, 'postgres', \
                     '{\"target_tier\": \"pro\", \"requested_by\": \"billing-webhook\"}', $3) RETURNING id",
        )
        .bind(team.as_uuid())
        .bind(resource.as_uuid())
        .bind(T0)
    };
    let (team, failing) = seed(db.pool(), "pro", "free", None).await;
    let failing_id = PropagationId(insert(team, failing).fetch_one(db.pool()).await.unwrap());
    let (team, landing) = seed(db.pool(), "pro", "free", None).await;
    let landing_id = PropagationId(insert(team, landing).fetch_one(db.pool()).await.unwrap());

    let applier = Arc::new(PerResource {
        answers: BTreeMap::from([(
            failing,
            Ok(ApplyOutcome::Skipped(SkipReason::unexpected(
                "the customer role does not exist",
            ))),
        )]),
        ..PerResource::default()
    });
    let (runner, metrics) = default_runner(db.pool(), applier);
    let report = runner.run_batch(T0, &never()).await.unwrap();
    assert_eq!(
        (report.unexpected_skips, report.applied, report.stale),
        (1, 1, 0)
    );
    let failed = row(db.pool(), failing_id).await;
    assert_eq!((failed.status.as_str(), failed.attempts), ("pending", 1));
    assert!(failed.next_attempt_at > T0, "retried on the schedule");
    assert!(failed.last_error.unwrap().contains("unexpected skip"));
    assert_eq!(
        audit_kinds(db.pool(), failing).await,
        ["propagation.unexpected_skip"]
    );
    assert_eq!(
        metrics.unexpected_skips(
            PropagationKind::TierElevation,
            ResourceType::Postgres,
            ReasonBucket::Other
        ),
        1
    );
    assert_eq!(
        runner.run_batch(T0, &never()).await.unwrap().claimed,
        0,
        "claimable again before its backoff"
    );
    assert_eq!(row(db.pool(), landing_id).await.status, "applied");
    assert_eq!(resource_tier(db.pool(), landing).await, "pro");
}

/// PROP-3: a dead letter holds the reconciler back only for the tier change it belongs to.
#[tokio::test]
async fn a_dead_letter_older_than_the_last_tier_change_does_not_suppress_drift() {
    let db = keel_testkit::database().await;
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    let store = store(db.pool());
    assert_eq!(store.reconcile(T0).await.unwrap().len(), 1);
    sqlx::query(
        "UPDATE pending_propagations SET status = 'dead_lettered', dead_lettered_at = $1, \
                attempts = 10 WHERE resource_id = $2",
    )
    .bind(T0)
    .bind(resource.as_uuid())
    .execute(db.pool())
    .await
    .unwrap();
    assert!(
        store.reconcile(T0).await.unwrap().is_empty(),
        "the same tier change stays with operators"
    );
    for tier in ["free", "pro"] {
        sqlx::query("UPDATE teams SET tier = $2 WHERE id = $1")
            .bind(team.as_uuid())
            .bind(tier)
            .execute(db.pool())
            .await
            .unwrap();
    }
    let again = store.reconcile(T0).await.unwrap();
    assert_eq!(
        again.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        [resource],
        "a later genuine change to pro must be carried"
    );
}

/// PROP-4: a target that replaces another under a live claim starts with a full budget, even
/// when the claim's holder dies instead of completing.
#[tokio::test]
async fn a_replaced_target_gets_a_full_attempt_budget() {
    let db = keel_testkit::database().await;
    let (team, resource, id) = drifted_and_enqueued(db.pool()).await;
    let store = store(db.pool());
    let claimed = claim_as(&store, "w").await;
    assert_eq!(claimed.len(), 1);
    // The old target had spent its budget.
    sqlx::query("UPDATE pending_propagations SET attempts = 10 WHERE id = $1")
        .bind(id.0)
        .execute(db.pool())
        .await
        .unwrap();
    let replaced = store
        .enqueue(
            &elevation(team, resource, "team"),
            T0 + time::Duration::minutes(1),
        )
        .await
        .unwrap();
    assert_eq!(replaced, Enqueued::Replaced(id));
    assert_eq!(row(db.pool(), id).await.attempts, 0);

    // The holder dies; after its lease the new target is applied, not settled as abandoned.
    let (runner, _) = default_runner(db.pool(), Arc::new(Recording::default()));
    let report = runner
        .run_batch(T0 + time::Duration::minutes(6), &never())
        .await
        .unwrap();
    assert_eq!((report.applied, report.dead_lettered), (1, 0));
    let state = row(db.pool(), id).await;
    assert_eq!((state.status.as_str(), state.attempts), ("applied", 1));
    assert_eq!(resource_tier(db.pool(), resource).await, "team");
}

/// A row whose attempt count another writer set to the column's largest value neither stops the
/// claim for every other row (the count saturates instead of overflowing) nor is applied: its
/// budget is spent, so it is dead-lettered, and the row beside it is applied.
#[tokio::test]
async fn an_attempt_count_at_the_columns_limit_does_not_stop_the_queue() {
    let db = keel_testkit::database().await;
    let (_, _, spent) = drifted_and_enqueued(db.pool()).await;
    let (_, other, fine) = drifted_and_enqueued(db.pool()).await;
    sqlx::query("UPDATE pending_propagations SET attempts = 2147483647 WHERE id = $1")
        .bind(spent.0)
        .execute(db.pool())
        .await
        .unwrap();
    let (runner, _) = default_runner(db.pool(), Arc::new(Recording::default()));
    let report = runner.run_batch(T0, &never()).await.unwrap();
    assert_eq!((report.applied, report.dead_lettered), (1, 1), "{report:?}");
    assert_eq!(row(db.pool(), fine).await.status, "applied");
    assert_eq!(resource_tier(db.pool(), other).await, "pro");
    let state = row(db.pool(), spent).await;
    assert_eq!(
        (state.status.as_str(), state.attempts),
        ("dead_lettered", i32::MAX)
    );
    assert!(
        state
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("attempts spent")),
        "{:?}",
        state.last_error
    );
}

/// LIB-4: enqueue refuses, writing nothing, a resource that does not exist, one of another team
/// and one of another type: the database's `resources` row is the truth, not the request.
#[tokio::test]
async fn enqueue_refuses_a_resource_that_does_not_exist_or_does_not_match() {
    let db = keel_testkit::database().await;
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    let store = store(db.pool());
    let ghost = store
        .enqueue(&elevation(team, ResourceId::new_random(), "pro"), T0)
        .await
        .unwrap_err();
    assert!(ghost.to_string().contains("does not exist"), "{ghost}");
    let stranger = store
        .enqueue(&elevation(TeamId::new_random(), resource, "pro"), T0)
        .await
        .unwrap_err();
    assert!(stranger.to_string().contains("another team"), "{stranger}");
    let mut wrong_type = elevation(team, resource, "pro");
    wrong_type.resource_type = keel_audit::ResourceType::Redis;
    let mistyped = store.enqueue(&wrong_type, T0).await.unwrap_err();
    assert!(mistyped.to_string().contains("not redis"), "{mistyped}");
    for refused in [&ghost, &stranger, &mistyped] {
        assert!(
            matches!(refused, keel_propagation::StoreError::Rejected(_)),
            "{refused:?}"
        );
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_propagations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0, "a refused enqueue wrote a row");
    store
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap();
}

/// PROP-5: a propagation whose resource has no row (any more: it was removed after the enqueue)
/// is an unexpected skip, never applied, and no applier is asked.
#[tokio::test]
async fn a_propagation_for_a_missing_resource_is_never_applied() {
    let db = keel_testkit::database().await;
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    let id = store(db.pool())
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap()
        .id();
    sqlx::query("DELETE FROM resources WHERE id = $1")
        .bind(resource.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    let applier = Arc::new(Recording::default());
    let (runner, _) = default_runner(db.pool(), applier.clone());
    let report = runner.run_batch(T0, &never()).await.unwrap();
    assert_eq!((report.applied, report.unexpected_skips), (0, 1));
    assert!(applier.applies().is_empty());
    let state = row(db.pool(), id).await;
    assert_eq!((state.status.as_str(), state.applied_at), ("pending", None));
    assert_eq!(
        audit_kinds(db.pool(), resource).await,
        ["propagation.unexpected_skip"]
    );
}

/// PROP-17(c): a propagation naming another team than the resource's owner is never applied
/// (its notification would go to the wrong team).
#[tokio::test]
async fn a_propagation_naming_another_team_is_never_applied() {
    let db = keel_testkit::database().await;
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    let id = store(db.pool())
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap()
        .id();
    // The resource moves to another team after the enqueue.
    let (other_team, _) = seed(db.pool(), "pro", "free", None).await;
    sqlx::query("UPDATE resources SET team_id = $2 WHERE id = $1")
        .bind(resource.as_uuid())
        .bind(other_team.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    let applier = Arc::new(Recording::default());
    let (runner, _) = default_runner(db.pool(), applier.clone());
    runner.run_batch(T0, &never()).await.unwrap();
    assert!(applier.applies().is_empty());
    assert_eq!(row(db.pool(), id).await.status, "pending");
    assert_eq!(resource_tier(db.pool(), resource).await, "free");
}

/// PROP-6: a backend error full of NULs is stored (cleaned), and the healthy row of the same
/// batch is recorded.
#[tokio::test]
async fn one_unrecordable_completion_does_not_discard_the_rest_of_the_batch() {
    let db = keel_testkit::database().await;
    let (_, poisoned, poisoned_id) = drifted_and_enqueued(db.pool()).await;
    let (_, healthy, healthy_id) = drifted_and_enqueued(db.pool()).await;
    let applier = Arc::new(PerResource {
        answers: BTreeMap::from([(
            poisoned,
            Err(ApplyError::new("backend said: \u{0}\u{1}binary garbage")),
        )]),
        ..PerResource::default()
    });
    let (runner, _) = default_runner(db.pool(), applier);
    let report = runner.run_batch(T0, &never()).await.unwrap();
    assert_eq!((report.applied, report.retried), (1, 1));
    assert_eq!(row(db.pool(), healthy_id).await.status, "applied");
    assert_eq!(
        audit_kinds(db.pool(), healthy).await,
        ["propagation.applied"]
    );
    let state = row(db.pool(), poisoned_id).await;
    assert_eq!((state.status.as_str(), state.attempts), ("pending", 1));
    let error = state.last_error.unwrap();
    assert!(
        error.contains("backend said:") && !error.contains('\u{0}'),
        "{error:?}"
    );
    assert_eq!(
        audit_kinds(db.pool(), poisoned).await,
        ["propagation.retrying"]
    );
}

/// PROP-6, the batch boundary itself: when the database refuses one row's completion, every
/// other row of the batch is still recorded, and the refused one stays claimed for its lease.
#[tokio::test]
async fn a_completion_the_database_refuses_costs_only_its_own_row() {
    let db = keel_testkit::database().await;
    let (_, refused, refused_id) = drifted_and_enqueued(db.pool()).await;
    let (_, healthy, healthy_id) = drifted_and_enqueued(db.pool()).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE audit_events ADD CONSTRAINT test_refuse_one \
         CHECK (resource_id IS DISTINCT FROM '{}')",
        refused.as_uuid()
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let (runner, metrics) = default_runner(db.pool(), Arc::new(Recording::default()));
    let report = runner.run_batch(T0, &never()).await.unwrap();
    assert_eq!((report.applied, report.unrecorded), (1, 1));
    assert!(metrics.record_errors() >= 1);
    assert_eq!(row(db.pool(), healthy_id).await.status, "applied");
    assert_eq!(
        audit_kinds(db.pool(), healthy).await,
        ["propagation.applied"]
    );
    let state = row(db.pool(), refused_id).await;
    assert_eq!(
        (state.status.as_str(), state.claimed_by.as_deref()),
        ("pending", Some("runner-1"))
    );
}

async fn unknown_rows(pool: &PgPool) -> Vec<(PropagationId, DeferReason)> {
    let mut rows = Vec::new();
    for (kind, resource_type, version, payload, reason) in [
        (
            "quota_resize",
            "postgres",
            1,
            r#"{"target_tier": "pro"}"#,
            DeferReason::UnknownKind,
        ),
        (
            "tier_elevation",
            "mysql",
            1,
            r#"{"target_tier": "pro"}"#,
            DeferReason::UnknownResourceType,
        ),
        (
            "tier_elevation",
            "postgres",
            2,
            r#"{"target_tier": {"name": "pro"}}"#,
            DeferReason::UnknownPayloadVersion,
        ),
        (
            "tier_elevation",
            "postgres",
            1,
            r#"{"target_tier": "Enterprise"}"#,
            DeferReason::UnreadablePayload,
        ),
    ] {
        let (team, resource) = seed(pool, "pro", "free", None).await;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO pending_propagations \
               (kind, team_id, resource_id, resource_type, payload, payload_version, next_attempt_at) \
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7) RETURNING id",
        )
        .bind(kind)
        .bind(team.as_uuid())
        .bind(resource.as_uuid())
        .bind(resource_type)
        .bind(payload)
        .bind(version)
        .bind(T0)
        .fetch_one(pool)
        .await
        .unwrap();
        rows.push((PropagationId(id), reason));
    }
    rows
}

/// PROP-8: rows a newer build wrote (unknown kind, resource type, payload version, or a
/// payload that does not decode) are left for a runner that knows them, visible to operators,
/// and cost no attempt.
#[tokio::test]
async fn rows_of_an_unknown_kind_are_left_for_a_newer_replica() {
    let db = keel_testkit::database().await;
    let rows = unknown_rows(db.pool()).await;
    let (runner, metrics) = default_runner(db.pool(), Arc::new(Recording::default()));
    let report = runner.run_batch(T0, &never()).await.unwrap();
    assert_eq!((report.claimed, report.dead_lettered), (0, 0));
    for (id, reason) in &rows {
        let state = row(db.pool(), *id).await;
        assert_eq!(
            (state.status.as_str(), state.attempts),
            ("pending", 0),
            "{reason:?}"
        );
    }
    let store = store(db.pool());
    let listed: Vec<(i64, DeferReason)> = store
        .deferred(10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.reason))
        .collect();
    let expected: Vec<(i64, DeferReason)> = rows.iter().map(|(id, r)| (id.0, *r)).collect();
    assert_eq!(listed, expected);
    let counts = store.deferred_counts().await.unwrap();
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let actor = Actor::system();
    assert!(
        store
            .settle_unsupported(
                time::Duration::hours(1),
                &actor,
                T0 + time::Duration::minutes(30)
            )
            .await
            .unwrap()
            .is_empty(),
        "dead-lettered inside the grace period"
    );
    assert_eq!(
        metrics.dead_lettered(PropagationKind::TierElevation, ResourceType::Postgres),
        0
    );
}

/// PROP-8: once the grace is over, every such row is dead-lettered with its own reason, its
/// audit row, and a count in the metric.
#[tokio::test]
async fn every_dead_letter_is_counted_in_the_metric() {
    let db = keel_testkit::database().await;
    let rows = unknown_rows(db.pool()).await;
    let (runner, _) = default_runner(db.pool(), Arc::new(Recording::default()));
    runner.run_batch(T0, &never()).await.unwrap();
    let store = store(db.pool());
    let metrics = Metrics::register(&mut Registry::default());
    // The pass runs on the database clock, well past T0 + the grace.
    let plan = Housekeeping {
        unsupported_grace: time::Duration::hours(1),
        retention: Retention::default(),
        prune_batch: 100,
        actor: Actor::system(),
    };
    store.housekeeping(&metrics, &plan).await.unwrap();
    for (id, reason) in &rows {
        let state = row(db.pool(), *id).await;
        assert_eq!(state.status, "dead_lettered", "{reason:?}");
        assert!(
            state.last_error.unwrap().contains(reason.as_str()),
            "{reason:?}"
        );
        assert_eq!(metrics.unsupported_dead_letters(*reason), 1, "{reason:?}");
    }
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_events WHERE kind = 'propagation.dead_lettered'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(audited, 4);
    assert_eq!(store.dead_letters(None, 10).await.unwrap().len(), 4);
}

/// PROP-8: a row once deferred as unreadable and since repaired is no longer "unsupported":
/// neither a retry after a readable claim nor a requeue of its dead letter leaves the old
/// deferral behind for the next housekeeping pass to dead-letter it again with a false reason.
#[tokio::test]
async fn a_repaired_row_is_never_dead_lettered_again_as_unsupported() {
    use keel_propagation::postgres::{RequeueReason, RequeueTarget};
    let db = keel_testkit::database().await;
    let (retried, reason) = unknown_rows(db.pool()).await[3];
    assert_eq!(reason, DeferReason::UnreadablePayload);
    let (requeued, _) = unknown_rows(db.pool()).await[3];
    sqlx::query("DELETE FROM pending_propagations WHERE id <> ALL($1)")
        .bind([retried.0, requeued.0])
        .execute(db.pool())
        .await
        .unwrap();
    let (runner, _) = default_runner(db.pool(), Arc::new(Recording::default()));
    runner.run_batch(T0, &never()).await.unwrap();
    let repair = |id: PropagationId| {
        sqlx::query(
            "UPDATE pending_propagations SET payload = '{\"target_tier\": \"pro\"}' WHERE id = $1",
        )
        .bind(id.0)
        .execute(db.pool())
    };
    let store = store(db.pool());
    let actor = Actor::system();
    let grace = time::Duration::hours(1);

    // Repaired within its grace, then claimed and read; its attempt fails and is retried.
    repair(retried).await.unwrap();
    let failing = Arc::new(Recording::answering(Err(ApplyError::new(
        "connection refused by the customer's backend",
    ))));
    let (failing_runner, _) = default_runner(db.pool(), failing);
    let report = failing_runner
        .run_batch(T0 + time::Duration::minutes(10), &never())
        .await
        .unwrap();
    assert_eq!(report.retried, 1);
    let settled = store
        .settle_unsupported(grace, &actor, T0 + time::Duration::hours(2))
        .await
        .unwrap();
    assert_eq!(
        settled,
        [(requeued, DeferReason::UnreadablePayload)],
        "only the row still unreadable is settled"
    );
    assert_eq!(row(db.pool(), retried).await.status, "pending");

    // Repaired after it was dead-lettered, and requeued by an operator.
    repair(requeued).await.unwrap();
    let reason = RequeueReason::parse("payload repaired").unwrap();
    let t_requeue = T0 + time::Duration::hours(3);
    store
        .requeue(RequeueTarget::One(requeued), &actor, &reason, t_requeue)
        .await
        .unwrap();
    let settled = store
        .settle_unsupported(grace, &actor, t_requeue + time::Duration::minutes(1))
        .await
        .unwrap();
    assert!(
        settled.is_empty(),
        "a repaired row settled again: {settled:?}"
    );
    assert_eq!(row(db.pool(), requeued).await.status, "pending");
}

/// PROP-10: one apply hanging holds only its own slot; rows enqueued meanwhile are claimed and
/// applied.
#[tokio::test]
async fn a_hung_apply_does_not_stop_new_claims() {
    let db = keel_testkit::database().await;
    let (_, hung, hung_id) = drifted_and_enqueued(db.pool()).await;
    let gate = Arc::new(Gate::holding(&[hung]));
    let mut config = RunnerConfig::new(worker("runner-1"));
    config.batch_size = 4;
    // Polling so rare that only the notification and the free slots explain a pick-up.
    config.poll_interval = std::time::Duration::from_secs(3600);
    let (runner, _) = runner_with(db.pool(), Arc::clone(&gate), config);
    let wake = Arc::new(tokio::sync::Notify::new());
    let listener =
        keel_propagation::postgres::listen_for_wakeups(db.pool().clone(), Arc::clone(&wake))
            .await
            .unwrap();
    let shutdown = CancellationToken::new();
    let running = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move { runner.run(wake, shutdown).await })
    };
    eventually("the hung apply started", || {
        let gate = Arc::clone(&gate);
        async move { gate.started.load(Ordering::SeqCst) >= 1 }
    })
    .await;

    let (_, _, later) = drifted_and_enqueued(db.pool()).await;
    eventually("the later row is applied", || {
        let pool = db.pool().clone();
        async move { row(&pool, later).await.status == "applied" }
    })
    .await;
    assert_eq!(
        row(db.pool(), hung_id).await.status,
        "pending",
        "still hanging"
    );
    gate.open();
    eventually("the hung row is applied once released", || {
        let pool = db.pool().clone();
        async move { row(&pool, hung_id).await.status == "applied" }
    })
    .await;
    shutdown.cancel();
    running.await.unwrap();
    listener.abort();
}

/// PROP-11: a caller's open transaction holding a pending row's lock delays the recording of
/// that row only; the rest of the batch is recorded while it is still open.
#[tokio::test]
async fn recording_does_not_wait_on_a_caller_transaction() {
    let db = keel_testkit::database().await;
    let mut rows = Vec::new();
    for _ in 0..6 {
        rows.push(drifted_and_enqueued(db.pool()).await);
    }
    let all: Vec<ResourceId> = rows.iter().map(|(_, r, _)| *r).collect();
    let gate = Arc::new(Gate::holding(&all));
    let (runner, _) = default_runner(db.pool(), Arc::clone(&gate));
    let batch = tokio::spawn(async move { runner.run_batch(T0, &never()).await });
    eventually("every apply started", || {
        let gate = Arc::clone(&gate);
        async move { gate.started.load(Ordering::SeqCst) == 6 }
    })
    .await;

    let (team, resource, locked) = rows[0];
    let mut caller = db.pool().begin().await.unwrap();
    enqueue_in(&mut caller, &elevation(team, resource, "team"), T0)
        .await
        .unwrap();
    gate.open();
    let report = tokio::time::timeout(std::time::Duration::from_secs(60), batch)
        .await
        .expect("the recording waited on the caller's transaction")
        .unwrap()
        .unwrap();
    assert_eq!((report.applied, report.unrecorded), (5, 1));
    for (_, _, id) in &rows[1..] {
        assert_eq!(row(db.pool(), *id).await.status, "applied");
    }
    caller.commit().await.unwrap();
    let state = row(db.pool(), locked).await;
    assert_eq!(
        state.status, "pending",
        "the replaced target is still to apply"
    );
}

/// PROP-12: a completion from an earlier claim of the same row by the same worker at the same
/// attempt number is refused: claim tokens never repeat.
#[tokio::test]
async fn a_completion_from_an_earlier_claim_never_matches_a_later_claim() {
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let store = store(db.pool());
    let earlier = claim_as(&store, "a").await;
    store.release(&worker("a"), &earlier, T0, T0).await.unwrap();
    let later = claim_as(&store, "a").await;
    assert_eq!((earlier[0].attempt, later[0].attempt), (1, 1));
    let applied = decide(1, &Ok(ApplyOutcome::Applied), &RetryPolicy::standard(), T0);
    let report = complete_as(&store, "a", earlier[0].clone(), applied.clone()).await;
    assert_eq!(report.stale, [id]);
    let state = row(db.pool(), id).await;
    assert_eq!(
        (state.status.as_str(), state.claimed_by.as_deref()),
        ("pending", Some("a"))
    );
    assert!(audit_kinds(db.pool(), resource).await.is_empty());
    let report = complete_as(&store, "a", later[0].clone(), applied).await;
    assert_eq!(report.recorded, [id]);
}

/// Reads the database clock at the end of each apply.
struct ClockReading {
    pool: PgPool,
    read: std::sync::Mutex<Vec<OffsetDateTime>>,
}

impl Applier for ClockReading {
    async fn apply(&self, _: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now: OffsetDateTime = sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| ApplyError::new(e.to_string()))?;
        self.read.lock().unwrap().push(now);
        Ok(ApplyOutcome::Applied)
    }
}

/// PROP-13: `applied_at` and the audit row's time are the database's clock when the apply
/// finished, not the claim time on the replica's own clock.
#[tokio::test]
async fn completion_times_come_from_the_database_clock_after_the_apply() {
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let applier = Arc::new(ClockReading {
        pool: db.pool().clone(),
        read: std::sync::Mutex::new(Vec::new()),
    });
    let (runner, _) = default_runner(db.pool(), Arc::clone(&applier));
    runner.drain(&never()).await.unwrap();
    let finished = applier.read.lock().unwrap()[0];
    let applied_at = row(db.pool(), id).await.applied_at.unwrap();
    assert!(
        applied_at >= finished,
        "applied_at {applied_at} precedes the end of the apply {finished}"
    );
    let occurred: OffsetDateTime =
        sqlx::query_scalar("SELECT occurred_at FROM audit_events WHERE resource_id = $1")
            .bind(resource.as_uuid())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(occurred >= finished);
}

/// PROP-14: retention deletes finished rows past their period in bounded batches, never a
/// pending row and never an audit row; one replica prunes at a time.
#[tokio::test]
async fn retention_prunes_finished_rows_in_bounded_batches_and_keeps_audit_rows() {
    let db = keel_testkit::database().await;
    for _ in 0..3 {
        drifted_and_enqueued(db.pool()).await;
    }
    let (runner, _) = default_runner(db.pool(), Arc::new(Recording::default()));
    runner.run_batch(T0, &never()).await.unwrap();
    let (_, _, pending) = drifted_and_enqueued(db.pool()).await;
    let store = store(db.pool());
    let retention = Retention::default();
    let early = store
        .prune(&retention, 2, T0 + time::Duration::days(6))
        .await
        .unwrap();
    assert_eq!((early.applied, early.dead_lettered), (0, 0));
    let later = T0 + time::Duration::days(8);
    assert_eq!(store.prune(&retention, 2, later).await.unwrap().applied, 2);
    assert_eq!(store.prune(&retention, 2, later).await.unwrap().applied, 1);
    assert_eq!(store.prune(&retention, 2, later).await.unwrap().applied, 0);
    assert_eq!(row(db.pool(), pending).await.status, "pending");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = 'propagation.applied'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(audited, 3, "audit rows are never pruned");

    // While another replica holds the maintenance lock, a pass does nothing.
    let (_, drifted) = seed(db.pool(), "team", "free", None).await;
    let mut other = db.pool().begin().await.unwrap();
    for key in [0x6b65_656c_7072_0001_i64, 0x6b65_656c_7072_0003] {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(key)
            .execute(&mut *other)
            .await
            .unwrap();
    }
    assert!(
        store.reconcile(T0).await.unwrap().is_empty(),
        "single flight"
    );
    let busy = store
        .prune(&retention, 2, T0 + time::Duration::days(60))
        .await
        .unwrap();
    assert_eq!(
        (busy.applied, busy.dead_lettered, busy.busy),
        (0, 0, true),
        "single flight, and said"
    );
    other.rollback().await.unwrap();
    assert_eq!(
        store
            .reconcile(T0)
            .await
            .unwrap()
            .iter()
            .map(|(_, r)| *r)
            .collect::<Vec<_>>(),
        [drifted]
    );
}

/// PROP-16: failed claims and failed recordings are counted, not only logged.
#[tokio::test]
async fn claim_and_record_failures_are_counted() {
    let db = keel_testkit::database().await;
    drifted_and_enqueued(db.pool()).await;
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(db.connect_options())
        .await
        .unwrap();

    /// Closes the store's pool during the apply: the recording then fails.
    struct ClosesThePool(PgPool);
    impl Applier for ClosesThePool {
        async fn apply(&self, _: &Propagation) -> Result<ApplyOutcome, ApplyError> {
            self.0.close().await;
            Ok(ApplyOutcome::Applied)
        }
    }
    let metrics = Metrics::register(&mut Registry::default());
    let runner = Runner::new(
        Arc::new(store(&own)),
        Arc::new(ClosesThePool(own.clone())),
        metrics.clone(),
        RunnerConfig::new(worker("runner-1")),
    )
    .unwrap();
    assert!(runner.run_batch(T0, &never()).await.is_err());
    assert_eq!(metrics.record_errors(), 1);
    let claimed_at = metrics.last_successful_claim();
    assert_eq!(claimed_at, T0.unix_timestamp() as f64);
    assert!(
        runner
            .run_batch(T0 + time::Duration::minutes(1), &never())
            .await
            .is_err()
    );
    assert_eq!(metrics.claim_errors(), 1);
    assert_eq!(
        metrics.last_successful_claim(),
        claimed_at,
        "the readiness signal stops moving while the database is unreachable"
    );
}

/// PROP-17(b): a runner cannot be built with a lease that an apply can outlive.
#[tokio::test]
async fn a_runner_cannot_be_built_with_a_lease_shorter_than_an_apply() {
    let db = keel_testkit::database().await;
    let mut config = RunnerConfig::new(worker("runner-1"));
    config.lease = std::time::Duration::from_secs(30);
    let built = Runner::new(
        Arc::new(store(db.pool())),
        Arc::new(Recording::default()),
        Metrics::register(&mut Registry::default()),
        config,
    );
    assert!(built.is_err());
}

/// PROP-18: rows whose apply never reached the backend (every connection of the applier's
/// pool held by slow customer backends) are given back without spending an attempt and
/// without a misleading `resource_not_reachable` retry.
#[tokio::test]
async fn slow_backend_rows_never_cost_healthy_rows_an_attempt() {
    let db = keel_testkit::database().await;
    let token = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let role = keel_provision::RoleName::for_database(&keel_provision::DatabaseName::for_token(
        &keel_audit::Token::parse(&token).unwrap(),
    ))
    .expose()
    .to_owned();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} CONNECTION LIMIT 5"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let (team, resource) = seed(db.pool(), "pro", "free", Some(&role)).await;
    sqlx::query("UPDATE resources SET token = $2 WHERE id = $1")
        .bind(resource.as_uuid())
        .bind(&token)
        .execute(db.pool())
        .await
        .unwrap();
    let id = store(db.pool())
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap()
        .id();
    let cluster = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_millis(300))
        .connect_with(db.connect_options())
        .await
        .unwrap();
    let busy = cluster.acquire().await.unwrap();
    let applier = Arc::new(PgRoleApplier::new(
        cluster.clone(),
        TierRoleSettings::standard(),
    ));
    let (runner, _) = default_runner(db.pool(), applier);
    let report = runner.run_batch(T0, &never()).await.unwrap();
    assert_eq!(
        (report.not_attempted, report.retried, report.applied),
        (1, 0, 0)
    );
    let state = row(db.pool(), id).await;
    assert_eq!(
        (
            state.status.as_str(),
            state.attempts,
            state.claimed_by,
            state.last_error
        ),
        ("pending", 0, None, None)
    );
    assert_eq!(
        state.next_attempt_at,
        T0 + keel_propagation::runner::NOT_ATTEMPTED_RETRY
    );
    assert!(audit_kinds(db.pool(), resource).await.is_empty());

    drop(busy);
    let report = runner
        .run_batch(T0 + time::Duration::seconds(10), &never())
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    let limit: i32 = sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
        .bind(&role)
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(
        limit,
        TierRoleSettings::standard()
            .get(&tier("pro"))
            .unwrap()
            .connection_limit
    );
}

/// Adds an active `free` resource of `resource_type` (any text: another release's types too) to
/// `team`.
async fn active_resource(
    pool: &PgPool,
    team: TeamId,
    resource_type: &str,
    token: &str,
    provider_id: &str,
) -> ResourceId {
    let resource = ResourceId::new_random();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, $4, 'free', 'active', $5, 'https://backend.internal/x')",
    )
    .bind(resource.as_uuid())
    .bind(token)
    .bind(team.as_uuid())
    .bind(resource_type)
    .bind(provider_id)
    .execute(pool)
    .await
    .unwrap();
    resource
}

/// Deliver 4: a tier change, its `team.tier_changed` audit row and the propagation of every
/// active resource commit together or not at all.
#[tokio::test]
async fn a_tier_change_enqueues_its_propagations_in_the_same_transaction() {
    let db = keel_testkit::database().await;
    let (team, postgres) = seed(db.pool(), "free", "free", None).await;
    let redis = active_resource(
        db.pool(),
        team,
        "redis",
        "redistoken01",
        "instant-customer-redistoken01",
    )
    .await;
    let actor = Actor::parse("operator:alice").unwrap();
    let pro = tier("pro");

    let mut tx = db.pool().begin().await.unwrap();
    let change = change_team_tier(&mut tx, team, &pro, &actor, T0)
        .await
        .unwrap();
    let TierChange::Changed {
        from,
        enqueued,
        unknown_type,
    } = change
    else {
        panic!("no change: {change:?}");
    };
    assert_eq!(from, Some(tier("free")));
    assert!(unknown_type.is_empty());
    assert_eq!(enqueued.len(), 2);
    tx.rollback().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_propagations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0, "rolled back together");

    let mut tx = db.pool().begin().await.unwrap();
    change_team_tier(&mut tx, team, &pro, &actor, T0)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM audit_events WHERE team_id = $1 ORDER BY id")
            .bind(team.as_uuid())
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(kinds, [AuditKind::TeamTierChanged.as_str()]);
    let targets: Vec<(uuid::Uuid, String)> = sqlx::query_as(
        "SELECT resource_id, payload->>'target_tier' FROM pending_propagations ORDER BY resource_id",
    )
    .fetch_all(db.pool())
    .await
    .unwrap();
    let mut expected = vec![
        (postgres.as_uuid(), "pro".to_owned()),
        (redis.as_uuid(), "pro".to_owned()),
    ];
    expected.sort();
    assert_eq!(targets, expected);
    let mut tx = db.pool().begin().await.unwrap();
    assert_eq!(
        change_team_tier(&mut tx, team, &pro, &actor, T0)
            .await
            .unwrap(),
        TierChange::Unchanged
    );
    let missing = change_team_tier(&mut tx, TeamId::new_random(), &pro, &actor, T0).await;
    assert!(
        matches!(missing, Err(StoreError::Rejected(_))),
        "{missing:?}"
    );
}

/// The `/metrics` text of `registry`.
fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

/// PROP-16: when the queue cannot be read, its gauges do not keep the last value they had (a
/// frozen `oldest_due_age_seconds` would hide a growing backlog): their series disappear until
/// the next successful read, and `instant_propagation_maintenance_up` says the pass failed.
#[tokio::test]
async fn queue_gauges_never_keep_a_value_their_read_failed_to_refresh() {
    let db = keel_testkit::database().await;
    drifted_and_enqueued(db.pool()).await;
    let own = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(db.connect_options())
        .await
        .unwrap();
    let store = store(&own);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let plan = Housekeeping {
        unsupported_grace: time::Duration::hours(1),
        retention: Retention::default(),
        prune_batch: 100,
        actor: Actor::system(),
    };
    store.housekeeping(&metrics, &plan).await.unwrap();
    let text = scrape(&registry);
    assert!(
        text.contains("instant_propagation_due_rows{kind=\"tier_elevation\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("instant_propagation_maintenance_up 1\n"),
        "{text}"
    );

    own.close().await;
    assert!(store.housekeeping(&metrics, &plan).await.is_err());
    let text = scrape(&registry);
    for family in [
        "instant_propagation_due_rows{",
        "instant_propagation_oldest_due_age_seconds{",
        "instant_propagation_deferred_rows{",
    ] {
        assert!(
            !text.lines().any(|l| l.starts_with(family)),
            "{family} kept a value it could not refresh:\n{text}"
        );
    }
    assert!(
        text.contains("instant_propagation_maintenance_up 0\n"),
        "{text}"
    );

    // Readable again: the series come back with current values.
    let store = super::store(db.pool());
    store.housekeeping(&metrics, &plan).await.unwrap();
    let text = scrape(&registry);
    assert!(
        text.contains("instant_propagation_due_rows{kind=\"tier_elevation\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("instant_propagation_maintenance_up 1\n"),
        "{text}"
    );
}

/// LIB-8: the reconciler and the queue gauges run from the library (`run_housekeeping`), so a
/// service that embeds the runner gets the drift backstop without Keel's binary: a drifted
/// resource is enqueued and counted in the gauges.
#[tokio::test]
async fn the_library_housekeeping_loop_reconciles_drift_and_sets_the_queue_gauges() {
    let db = keel_testkit::database().await;
    let (_, resource) = seed(db.pool(), "pro", "free", None).await;
    let store = store(db.pool());
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let plan = Housekeeping {
        unsupported_grace: time::Duration::hours(1),
        retention: Retention::default(),
        prune_batch: 100,
        actor: Actor::system(),
    };
    let hour = std::time::Duration::from_secs(3600);
    // Already stopped: exactly the first round of passes runs.
    let stopped = CancellationToken::new();
    stopped.cancel();
    run_housekeeping(
        &store,
        &metrics,
        &plan,
        HousekeepingSchedule::new(hour, Some(hour)),
        &stopped,
    )
    .await;
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pending_propagations WHERE resource_id = $1 AND status = 'pending'",
    )
    .bind(resource.as_uuid())
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        pending, 1,
        "the reconciler did not enqueue the drifted resource"
    );
    let text = scrape(&registry);
    assert!(
        text.contains("instant_propagation_due_rows{kind=\"tier_elevation\"} 1\n"),
        "{text}"
    );
}

/// A payload the server stores but serde cannot read (JSON nested deeper than it recurses, a
/// number beyond its range) is that row's problem: it is left as an unreadable payload, like
/// any row this build cannot read, and the claim of every other due row goes on. Decoded in the
/// claim's own statement, such a row failed every claim of every replica, for every tenant.
#[tokio::test]
async fn a_payload_serde_cannot_read_never_fails_the_claim_of_the_others() {
    let db = keel_testkit::database().await;
    let mut unreadable = Vec::new();
    for payload in [
        format!(
            r#"{{"target_tier": "pro", "x": {}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        ),
        r#"{"target_tier": "pro", "n": 1e400}"#.to_owned(),
    ] {
        let (team, resource) = seed(db.pool(), "pro", "free", None).await;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO pending_propagations \
               (kind, team_id, resource_id, resource_type, payload, next_attempt_at) \
             VALUES ('tier_elevation', $1, $2, 'postgres', $3::jsonb, $4) RETURNING id",
        )
        .bind(team.as_uuid())
        .bind(resource.as_uuid())
        .bind(payload)
        .bind(T0 - time::Duration::minutes(1))
        .fetch_one(db.pool())
        .await
        .unwrap();
        unreadable.push(id);
    }
    let (_, _, readable) = drifted_and_enqueued(db.pool()).await;
    let (runner, _) = default_runner(db.pool(), Arc::new(Recording::default()));
    let report = runner
        .run_batch(T0, &never())
        .await
        .expect("the claim goes on past the rows it cannot read");
    assert_eq!((report.claimed, report.applied), (1, 1));
    assert_eq!(row(db.pool(), readable).await.status, "applied");
    let listed: Vec<(i64, DeferReason)> = store(db.pool())
        .deferred(10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.id, r.reason))
        .collect();
    assert_eq!(
        listed,
        unreadable
            .iter()
            .map(|id| (*id, DeferReason::UnreadablePayload))
            .collect::<Vec<_>>()
    );
    for id in unreadable {
        let state = row(db.pool(), PropagationId(id)).await;
        assert_eq!((state.status.as_str(), state.attempts), ("pending", 0));
    }
}

/// A payload is bounded on write (64 KiB, a `target_tier` of 64 bytes): a tier of kilobytes
/// could not enter the dead-letter index, and the one statement that dead-letters every row no
/// runner can read failed on it, for every tenant, with the retention pass after it.
#[tokio::test]
async fn a_payload_too_large_to_dead_letter_is_refused_on_write() {
    let db = keel_testkit::database().await;
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    for payload in [
        format!(r#"{{"target_tier": "{}"}}"#, "x".repeat(65)),
        format!(
            r#"{{"target_tier": "pro", "pad": "{}"}}"#,
            "x".repeat(70_000)
        ),
    ] {
        let refused = sqlx::query(
            "INSERT INTO pending_propagations \
               (kind, team_id, resource_id, resource_type, payload) \
             VALUES ('tier_elevation', $1, $2, 'mysql', $3::jsonb)",
        )
        .bind(team.as_uuid())
        .bind(resource.as_uuid())
        .bind(&payload)
        .execute(db.pool())
        .await
        .expect_err("an oversized payload is refused");
        assert_eq!(
            keel_testkit::sqlstate(&refused).as_deref(),
            Some("23514"),
            "{refused}"
        );
    }
    // The largest tier the bound allows is dead-lettered like any unreadable row.
    sqlx::query(
        "INSERT INTO pending_propagations \
           (kind, team_id, resource_id, resource_type, payload, next_attempt_at) \
         VALUES ('tier_elevation', $1, $2, 'mysql', jsonb_build_object('target_tier', repeat('x', 64)), \
                 now() - interval '7 hours')",
    )
    .bind(team.as_uuid())
    .bind(resource.as_uuid())
    .execute(db.pool())
    .await
    .unwrap();
    let plan = Housekeeping {
        unsupported_grace: time::Duration::hours(1),
        retention: Retention::default(),
        prune_batch: 100,
        actor: Actor::system(),
    };
    store(db.pool())
        .housekeeping(&Metrics::register(&mut Registry::default()), &plan)
        .await
        .unwrap();
    assert_eq!(
        store(db.pool()).dead_letters(None, 10).await.unwrap().len(),
        1
    );
}

/// The cluster unreachable (a refused connection with room in the pool, a refused password)
/// is a charged attempt with its cause recorded, retried with backoff and dead-lettered in the
/// end: given back unattempted, the row cycled every few seconds with no attempt, no error, no
/// audit row and no alert.
#[tokio::test]
async fn an_unreachable_cluster_is_a_charged_attempt_not_a_row_given_back_for_ever() {
    let db = keel_testkit::database().await;
    let refused_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    for (case, options) in [
        (
            "refused connection",
            db.connect_options().host("127.0.0.1").port(refused_port),
        ),
        (
            "wrong password",
            db.connect_options().password("not-the-password"),
        ),
    ] {
        // Seeded with the role keel-provision names for its token, so the apply gets as far as
        // the connection.
        let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
        let cluster = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_millis(300))
            .connect_lazy_with(options);
        let applier = Arc::new(PgRoleApplier::new(cluster, TierRoleSettings::standard()));
        let (runner, _) = default_runner(db.pool(), applier);
        let report = runner.run_batch(T0, &never()).await.unwrap();
        assert_eq!((report.not_attempted, report.retried), (0, 1), "{case}");
        let state = row(db.pool(), id).await;
        assert_eq!(
            (state.status.as_str(), state.attempts),
            ("pending", 1),
            "{case}"
        );
        assert!(
            state
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("could not connect to the shared cluster")),
            "{case}: {:?}",
            state.last_error
        );
        assert!(
            audit_kinds(db.pool(), resource)
                .await
                .contains(&"propagation.retrying".to_owned()),
            "{case}"
        );
        sqlx::query("DELETE FROM pending_propagations WHERE id = $1")
            .bind(id.0)
            .execute(db.pool())
            .await
            .unwrap();
    }
}

/// A claimed row always carries its lease and fence token: one claimed without a lease was
/// never rescued (the rescue finds claims by lease expiry), never claimed, settled nor counted
/// (those look only at unclaimed rows), so its tier never landed and nothing showed it.
#[tokio::test]
async fn a_claim_without_a_lease_is_refused_on_write() {
    let db = keel_testkit::database().await;
    let (_, _, id) = drifted_and_enqueued(db.pool()).await;
    for set in [
        "claimed_by = 'old-runner'",
        "claimed_by = 'old-runner', claim_token = 7",
        "claimed_by = 'old-runner', lease_expires_at = now() + interval '1 minute'",
    ] {
        let refused = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE pending_propagations SET {set} WHERE id = $1"
        )))
        .bind(id.0)
        .execute(db.pool())
        .await
        .expect_err(set);
        assert_eq!(
            keel_testkit::sqlstate(&refused).as_deref(),
            Some("23514"),
            "{set}: {refused}"
        );
    }
    // Claimed as Keel claims, the row is still rescued and applied once its lease runs out.
    sqlx::query(
        "UPDATE pending_propagations SET claimed_by = 'old-runner', claim_token = 7, \
                lease_expires_at = $2 WHERE id = $1",
    )
    .bind(id.0)
    .bind(T0 + time::Duration::minutes(1))
    .execute(db.pool())
    .await
    .unwrap();
    let (runner, _) = default_runner(db.pool(), Arc::new(Recording::default()));
    let report = runner
        .run_batch(T0 + time::Duration::minutes(2), &never())
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(row(db.pool(), id).await.status, "applied");
}

/// The Postgres store, except that its clock answers only the first read (the claim's).
struct ClockLostAfterClaim {
    inner: PgPropagationStore,
    reads: AtomicUsize,
}

impl PropagationStore for ClockLostAfterClaim {
    async fn now(&self) -> Result<OffsetDateTime, StoreError> {
        if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
            self.inner.now().await
        } else {
            // A closed pool's error, as a lost database gives.
            let closed = sqlx::postgres::PgPoolOptions::new().connect_lazy_with(
                sqlx::postgres::PgConnectOptions::new()
                    .host("127.0.0.1")
                    .port(1),
            );
            closed.close().await;
            Err(keel_propagation::postgres::PgPropagationStore::new(closed)
                .now()
                .await
                .unwrap_err())
        }
    }
    async fn claim(
        &self,
        worker: &WorkerId,
        limit: u32,
        lease: time::Duration,
        now: OffsetDateTime,
    ) -> Result<Vec<Propagation>, StoreError> {
        self.inner.claim(worker, limit, lease, now).await
    }
    async fn complete(
        &self,
        worker: &WorkerId,
        completions: &[Completion],
        actor: &Actor,
        now: OffsetDateTime,
    ) -> Result<keel_propagation::CompletionReport, StoreError> {
        self.inner.complete(worker, completions, actor, now).await
    }
    async fn release(
        &self,
        worker: &WorkerId,
        propagations: &[Propagation],
        due_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.inner.release(worker, propagations, due_at, now).await
    }
}

/// Completions are recorded only at the shared clock's time: when the recorder cannot read it,
/// nothing is recorded (never at this process's own time, out of step with every other
/// replica); the row stays claimed for its lease, and the failure is counted.
#[tokio::test]
async fn completions_are_never_recorded_at_the_processs_own_time() {
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let metrics = Metrics::register(&mut Registry::default());
    let runner = Runner::new(
        Arc::new(ClockLostAfterClaim {
            inner: store(db.pool()),
            reads: AtomicUsize::new(0),
        }),
        Arc::new(Recording::default()),
        metrics.clone(),
        RunnerConfig::new(worker("runner-1")),
    )
    .unwrap();
    assert!(runner.drain(&never()).await.is_err());
    assert!(metrics.record_errors() >= 1);
    let state = row(db.pool(), id).await;
    assert_eq!(state.status, "pending", "recorded without the shared clock");
    assert_eq!(state.claimed_by.as_deref(), Some("runner-1"));
    assert!(audit_kinds(db.pool(), resource).await.is_empty());
}

/// One team whose stored tier is not a tier (far too long for a propagation's payload) never
/// fails the entitlement reconciler's pass for every other team: its resources are left alone,
/// every other drifted resource is enqueued.
#[tokio::test]
async fn a_team_with_an_unreadable_tier_never_stops_the_reconciler_for_the_others() {
    let db = keel_testkit::database().await;
    let (_, foreign) = seed(db.pool(), &"x".repeat(100), "free", None).await;
    let (_, drifted) = seed(db.pool(), "pro", "free", None).await;
    let enqueued = store(db.pool()).reconcile(T0).await.unwrap();
    assert_eq!(
        enqueued.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        [drifted],
        "only the readable team's drift is enqueued"
    );
    let foreign_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_propagations WHERE resource_id = $1")
            .bind(foreign.as_uuid())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(foreign_rows, 0);
}

/// A team's tier change is never failed by one of its resources: a resource of a type this
/// build does not know (another release's) is reported and left to a build that knows it, the
/// others are enqueued; and a stored tier that is not a tier is repaired by the change rather
/// than blocking it.
#[tokio::test]
async fn a_tier_change_passes_over_a_resource_of_an_unknown_type_and_repairs_an_unreadable_tier() {
    let db = keel_testkit::database().await;
    let (team, known) = seed(db.pool(), "free", "free", None).await;
    let unknown = active_resource(db.pool(), team, "mysql", "mysqltoken01", "m-1").await;
    sqlx::query("UPDATE teams SET tier = 'Free Plan (legacy)' WHERE id = $1")
        .bind(team.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    let actor = Actor::parse("operator:alice").unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    let change = change_team_tier(&mut tx, team, &tier("pro"), &actor, T0)
        .await
        .expect("the change goes through");
    tx.commit().await.unwrap();
    let TierChange::Changed {
        from,
        enqueued,
        unknown_type,
    } = change
    else {
        panic!("no change: {change:?}");
    };
    assert_eq!(from, None, "the stored tier was not a tier");
    assert_eq!(
        enqueued.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        [known]
    );
    assert_eq!(unknown_type, [unknown]);
    let stored: String = sqlx::query_scalar("SELECT tier FROM teams WHERE id = $1")
        .bind(team.as_uuid())
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(stored, "pro");
    let audited: serde_json::Value = sqlx::query_scalar(
        "SELECT attributes FROM audit_events WHERE kind = 'team.tier_changed' AND team_id = $1",
    )
    .bind(team.as_uuid())
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(audited["from_tier_unreadable"], "true");
    assert_eq!(audited["to_tier"], "pro");
}
