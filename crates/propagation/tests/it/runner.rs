//! The runner end to end against Postgres, with scripted appliers.

use std::sync::Arc;

use keel_audit::AuditKind;
use keel_propagation::runner::{Runner, RunnerConfig};
use keel_propagation::{
    ApplyOutcome, LegitimateSkip, Metrics, PropagationKind, ReasonBucket, RetryPolicy, SkipReason,
};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::*;

fn runner(
    pool: &PgPool,
    applier: Arc<Recording>,
    name: &str,
) -> (Runner<PgPropagationStore, Recording>, Metrics) {
    let metrics = Metrics::register(&mut Registry::default());
    let config = RunnerConfig::new(worker(name));
    (
        Runner::new(Arc::new(store(pool)), applier, metrics.clone(), config).unwrap(),
        metrics,
    )
}

#[tokio::test]
async fn unexpected_skip_never_marks_applied() {
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let skip =
        SkipReason::unexpected("secret postgres-admin not found in namespace instant-customer-…");
    let applier = Arc::new(Recording::answering(Ok(ApplyOutcome::Skipped(skip))));
    let (runner, metrics) = runner(db.pool(), applier.clone(), "runner-1");
    let never = CancellationToken::new();
    let policy = RetryPolicy::standard();

    let mut now = T0;
    for attempt in 1..=policy.max_attempts() {
        let report = runner.run_batch(now, &never).await.unwrap();
        assert_eq!(
            report.claimed, 1,
            "attempt {attempt} was not due on schedule"
        );
        assert!(
            runner.run_batch(now, &never).await.unwrap().claimed == 0,
            "attempt {attempt}: the row was claimable again before its backoff"
        );
        let state = row(db.pool(), id).await;
        assert_eq!(
            state.applied_at, None,
            "attempt {attempt} stamped applied_at"
        );
        assert_eq!(state.attempts, attempt as i32);
        assert!(
            state
                .last_error
                .unwrap()
                .contains("postgres_admin_secret_missing")
        );
        if attempt < policy.max_attempts() {
            assert_eq!(state.status, "pending");
            // The schedule with this row's jitter: deterministic, within ±10 % of nominal.
            let delay = policy.delay_for(attempt, id.0.unsigned_abs());
            assert_eq!(state.next_attempt_at, now + delay);
            let nominal = policy.delay_after(attempt);
            assert!(delay >= nominal * 0.9 && delay <= nominal * 1.1);
            now = state.next_attempt_at;
        } else {
            assert_eq!(
                state.status, "dead_lettered",
                "the 10th attempt dead-letters"
            );
        }
    }
    let pinned = time::Duration::hours(24) + time::Duration::minutes(33);
    assert!(
        now - T0 >= pinned * 0.9 && now - T0 <= pinned * 1.1,
        "dead-lettered {} after the first attempt",
        now - T0
    );

    let kinds = audit_kinds(db.pool(), resource).await;
    let mut expected = vec![AuditKind::PropagationUnexpectedSkip.as_str().to_owned(); 9];
    expected.push(AuditKind::PropagationDeadLettered.as_str().to_owned());
    assert_eq!(kinds, expected, "never propagation.applied");
    assert_eq!(
        metrics.unexpected_skips(
            PropagationKind::TierElevation,
            ResourceType::Postgres,
            ReasonBucket::PostgresAdminSecretMissing
        ),
        10
    );
    assert_eq!(
        metrics.applied(PropagationKind::TierElevation, ResourceType::Postgres),
        0
    );
    assert_eq!(
        metrics.dead_lettered(PropagationKind::TierElevation, ResourceType::Postgres),
        1
    );
    assert_eq!(
        resource_tier(db.pool(), resource).await,
        "free",
        "the regrade never landed"
    );
}

#[tokio::test]
async fn an_applied_propagation_stamps_applied_at_moves_the_tier_and_audits_applied() {
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let (runner, metrics) = runner(db.pool(), Arc::new(Recording::default()), "runner-1");
    let report = runner
        .run_batch(T0, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.applied, 1);
    let state = row(db.pool(), id).await;
    assert_eq!(
        (state.status.as_str(), state.applied_at),
        ("applied", Some(T0))
    );
    assert_eq!(resource_tier(db.pool(), resource).await, "pro");
    assert_eq!(
        audit_kinds(db.pool(), resource).await,
        vec!["propagation.applied"]
    );
    assert_eq!(
        metrics.applied(PropagationKind::TierElevation, ResourceType::Postgres),
        1
    );
}

/// PROP-9: a legitimate skip is success only where it is true. On an active resource only
/// `already_at_target` marks applied; `resource_deprovisioned` and `superseded` would leave
/// the drift in place (and the reconciler re-enqueueing, notifying the customer each pass),
/// so they retry as unexpected skips. On a deleted resource the row settles as deprovisioned.
#[tokio::test]
async fn every_legitimate_skip_marks_applied_only_where_it_is_true() {
    for &skip in LegitimateSkip::ALL {
        let db = keel_testkit::database().await;
        let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
        let applier = Arc::new(Recording::answering(Ok(ApplyOutcome::Skipped(
            SkipReason::Legitimate(skip),
        ))));
        let (runner, _) = runner(db.pool(), applier, "runner-1");
        runner
            .run_batch(T0, &CancellationToken::new())
            .await
            .unwrap();
        let expected = match skip {
            LegitimateSkip::AlreadyAtTarget => ("applied", "propagation.applied"),
            LegitimateSkip::ResourceDeprovisioned | LegitimateSkip::Superseded => {
                ("pending", "propagation.unexpected_skip")
            }
        };
        assert_eq!(row(db.pool(), id).await.status, expected.0, "{skip:?}");
        assert_eq!(
            audit_kinds(db.pool(), resource).await,
            vec![expected.1],
            "{skip:?}"
        );
    }
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    sqlx::query("UPDATE resources SET status = 'deleted', deleted_at = now() WHERE id = $1")
        .bind(resource.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    let applier = Arc::new(Recording::default());
    let (runner, _) = runner(db.pool(), applier.clone(), "runner-1");
    runner
        .run_batch(T0, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(row(db.pool(), id).await.status, "applied");
    assert!(
        applier.applies().is_empty(),
        "no backend call for a deleted resource"
    );
    assert_eq!(resource_tier(db.pool(), resource).await, "free");
}

/// PROP-9 end to end: a skip that does not move the tier on an active resource never makes
/// the reconciler re-enqueue (and re-notify) every pass.
#[tokio::test]
async fn a_non_landing_skip_on_an_active_resource_does_not_reenqueue() {
    let db = keel_testkit::database().await;
    let (_, resource) = seed(db.pool(), "pro", "free", None).await;
    let applier = Arc::new(Recording::answering(Ok(ApplyOutcome::Skipped(
        SkipReason::Legitimate(LegitimateSkip::Superseded),
    ))));
    let (runner, _) = runner(db.pool(), applier, "runner-1");
    let store = store(db.pool());
    let mut now = T0;
    for _ in 0..4 {
        store.reconcile(now).await.unwrap();
        runner
            .run_batch(now, &CancellationToken::new())
            .await
            .unwrap();
        now += time::Duration::minutes(5);
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_propagations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 1, "the reconciler re-enqueued a settled row");
    let kinds = audit_kinds(db.pool(), resource).await;
    assert!(
        !kinds.iter().any(|k| k == "propagation.applied"),
        "a customer notification for a tier that did not land: {kinds:?}"
    );
}

#[tokio::test]
async fn two_runners_over_thousands_of_rows_never_apply_one_row_concurrently() {
    let db = keel_testkit::database().await;
    let rows = 2_000;
    let team = TeamId::new_random();
    sqlx::query("INSERT INTO teams (id, tier) VALUES ($1, 'pro')")
        .bind(team.as_uuid())
        .execute(db.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
         SELECT gen_random_uuid(), 'tok' || lpad(g::text, 12, '0'), $1, 'postgres', 'free', 'active', \
                $3 || keel_token_digest('tok' || lpad(g::text, 12, '0')), 'postgres://customer@db/x' \
         FROM generate_series(1, $2) g",
    )
    .bind(team.as_uuid())
    .bind(rows)
    // Named as keel-provision names it: the prefix and the token's digest.
    .bind(keel_provision::DATABASE_PREFIX)
    .execute(db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload, next_attempt_at) \
         SELECT 'tier_elevation', $1, id, 'postgres', '{\"target_tier\": \"pro\"}', $2 FROM resources",
    )
    .bind(team.as_uuid())
    .bind(OffsetDateTime::now_utc() - time::Duration::minutes(1)) // drain() runs on the database clock
    .execute(db.pool())
    .await
    .unwrap();

    let applier = Arc::new(Recording::default());
    let (a, _) = runner(db.pool(), applier.clone(), "runner-a");
    let (b, _) = runner(db.pool(), applier.clone(), "runner-b");
    let never = CancellationToken::new();
    let drain = |r: Runner<PgPropagationStore, Recording>| {
        let never = never.clone();
        tokio::spawn(async move { r.drain(&never).await.unwrap() })
    };
    let (ra, rb) = (drain(a), drain(b));
    let (ra, rb) = (ra.await.unwrap(), rb.await.unwrap());

    assert!(
        applier.overlaps().is_empty(),
        "rows applied concurrently: {:?}",
        applier.overlaps()
    );
    let applies = applier.applies();
    assert_eq!(applies.len(), rows as usize);
    assert!(applies.values().all(|&n| n == 1), "a row was applied twice");
    assert_eq!(ra.applied + rb.applied, rows as usize);
    assert!(
        ra.applied > 0 && rb.applied > 0,
        "both runners should take part: {ra:?} {rb:?}"
    );
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_propagations WHERE status = 'applied'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(applied, rows);
    let audit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = 'propagation.applied'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(audit, rows, "one audit row per transition");
}

#[tokio::test]
async fn shutdown_releases_rows_whose_apply_outlives_the_grace_period() {
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let applier = Arc::new(Recording {
        delay: Some(std::time::Duration::from_secs(30)),
        ..Recording::default()
    });
    let mut config = RunnerConfig::new(worker("runner-1"));
    config.shutdown_grace = std::time::Duration::from_millis(100);
    let runner = Runner::new(
        Arc::new(store(db.pool())),
        applier,
        Metrics::register(&mut Registry::default()),
        config,
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let report = runner.run_batch(T0, &shutdown).await.unwrap();
    assert_eq!((report.claimed, report.released, report.applied), (1, 1, 0));
    let state = row(db.pool(), id).await;
    assert_eq!(
        (state.attempts, state.claimed_by, state.status.as_str()),
        (0, None, "pending")
    );
    assert!(audit_kinds(db.pool(), resource).await.is_empty());
}

#[tokio::test]
async fn an_applier_error_retries_with_propagation_retrying_and_records_the_error() {
    let db = keel_testkit::database().await;
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let applier = Arc::new(Recording::answering(Err(
        keel_propagation::ApplyError::new("connection refused"),
    )));
    let (runner, _) = runner(db.pool(), applier, "runner-1");
    let report = runner
        .run_batch(T0, &CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(report.retried, 1);
    let state = row(db.pool(), id).await;
    assert_eq!(
        state.last_error.as_deref(),
        Some("error (resource_not_reachable): connection refused")
    );
    assert_eq!(
        audit_kinds(db.pool(), resource).await,
        vec!["propagation.retrying"]
    );
}

#[tokio::test]
async fn a_running_runner_wakes_on_notify_and_stops_on_shutdown() {
    let db = keel_testkit::database().await;
    let mut config = RunnerConfig::new(worker("runner-1"));
    // Polling so rare that only the notification can explain a prompt pick-up.
    config.poll_interval = std::time::Duration::from_secs(3600);
    let runner = Runner::new(
        Arc::new(store(db.pool())),
        Arc::new(Recording::default()),
        Metrics::register(&mut Registry::default()),
        config,
    )
    .unwrap();
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

    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    let id = store(db.pool())
        .enqueue(&elevation(team, resource, "pro"), OffsetDateTime::now_utc())
        .await
        .unwrap()
        .id();
    let mut status = String::new();
    for _ in 0..200 {
        status = row(db.pool(), id).await.status;
        if status == "applied" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        status, "applied",
        "the enqueue's NOTIFY did not wake the runner"
    );

    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(30), running)
        .await
        .expect("the runner did not stop on shutdown")
        .unwrap();
    listener.abort();
}
