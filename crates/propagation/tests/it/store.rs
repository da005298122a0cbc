//! The Postgres store: coalescing, claims and leases, fences, audit atomicity, the reconciler
//! and dead letters.

use keel_audit::{Actor, AuditKind};
use keel_propagation::postgres::{Enqueued, RequeueReason, RequeueTarget};
use keel_propagation::{
    ApplyOutcome, Completion, PropagationKind, PropagationStore, RetryPolicy, StoreError,
    Transition, decide,
};
use time::Duration;

use crate::*;

/// Records one attempt's transition as worker `name`, at `T0`.
async fn complete_one(
    store: &PgPropagationStore,
    name: &str,
    propagation: keel_propagation::Propagation,
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

#[tokio::test]
async fn enqueue_coalesces_to_one_pending_row_per_kind_and_resource() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;

    let first = store
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap();
    assert!(matches!(first, Enqueued::Inserted(_)), "{first:?}");
    let same = store
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap();
    assert_eq!(
        same,
        Enqueued::Unchanged(first.id()),
        "the same target changes nothing"
    );
    let newer = store
        .enqueue(&elevation(team, resource, "team"), T0)
        .await
        .unwrap();
    assert_eq!(newer, Enqueued::Replaced(first.id()));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM pending_propagations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(count, 1);
    let claimed = claim_as(&store, "a").await;
    assert_eq!(claimed[0].payload.target_tier().as_str(), "team");
}

#[tokio::test]
async fn a_new_target_for_a_claimed_row_waits_for_the_claim_and_is_applied_next() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (team, resource, id) = drifted_and_enqueued(db.pool()).await;
    let by_a = claim_as(&store, "a").await;

    // The team changes its mind while A is still applying "pro".
    store
        .enqueue(&elevation(team, resource, "team"), T0)
        .await
        .unwrap();
    let kept = row(db.pool(), id).await;
    assert_eq!(
        (kept.claimed_by.as_deref(), kept.attempts),
        (Some("a"), 0),
        "the live claim stays, and the new target has a full budget"
    );
    assert!(
        claim_as(&store, "b").await.is_empty(),
        "a second worker must not race the first to the backend"
    );

    // A's result is for the old target: refused, and the row is handed back at once.
    let applied = decide(1, &Ok(ApplyOutcome::Applied), &RetryPolicy::standard(), T0);
    let report = complete_one(&store, "a", by_a[0].clone(), applied.clone()).await;
    assert_eq!(report.stale, vec![id]);
    let handed_back = row(db.pool(), id).await;
    assert_eq!(
        (
            handed_back.status.as_str(),
            handed_back.claimed_by,
            handed_back.attempts
        ),
        ("pending", None, 0)
    );
    assert_eq!(
        resource_tier(db.pool(), resource).await,
        "free",
        "the old target must not be recorded"
    );
    assert!(audit_kinds(db.pool(), resource).await.is_empty());

    let by_b = claim_as(&store, "b").await;
    assert_eq!(by_b[0].payload.target_tier().as_str(), "team");
    let done = complete_one(&store, "b", by_b[0].clone(), applied).await;
    assert_eq!(done.recorded, vec![id]);
    assert_eq!(resource_tier(db.pool(), resource).await, "team");
}

#[tokio::test]
async fn a_claimed_then_abandoned_row_is_reclaimed_after_its_lease_and_the_stale_completion_is_rejected()
 {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let lease = Duration::minutes(1);

    let by_a = store.claim(&worker("a"), 10, lease, T0).await.unwrap();
    assert_eq!(by_a.len(), 1);
    assert_eq!(by_a[0].attempt, 1);
    assert!(
        store
            .claim(&worker("b"), 10, lease, T0 + Duration::seconds(30))
            .await
            .unwrap()
            .is_empty()
    );

    let by_b = store
        .claim(&worker("b"), 10, lease, T0 + Duration::seconds(61))
        .await
        .unwrap();
    assert_eq!(
        by_b.len(),
        1,
        "an expired lease makes the row claimable again"
    );
    assert_eq!(by_b[0].attempt, 2, "the abandoned attempt counts");

    // A finishes late: the fence refuses it and nothing changes, no audit row either.
    let applied = decide(1, &Ok(ApplyOutcome::Applied), &RetryPolicy::standard(), T0);
    let late = complete_one(&store, "a", by_a[0].clone(), applied.clone()).await;
    assert_eq!(late.stale, vec![id]);
    assert!(late.recorded.is_empty());
    let after = row(db.pool(), id).await;
    assert_eq!(
        (after.status.as_str(), after.claimed_by.as_deref()),
        ("pending", Some("b"))
    );
    assert!(audit_kinds(db.pool(), resource).await.is_empty());

    // B's completion is the one that lands.
    let done = complete_one(&store, "b", by_b[0].clone(), applied).await;
    assert_eq!(done.recorded, vec![id]);
    assert_eq!(row(db.pool(), id).await.status, "applied");
    assert_eq!(resource_tier(db.pool(), resource).await, "pro");
}

/// No claim holds a row longer than `MAX_LEASE`: a claim asking for more holds that long, and
/// a claim whose lease ends further ahead than any claim makes (another writer put it there) is
/// rescued at once rather than hiding its row until then; a long but possible lease is kept.
#[tokio::test]
async fn a_lease_no_claim_makes_never_hides_its_row() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (_, _, id) = drifted_and_enqueued(db.pool()).await;

    let by_a = store
        .claim(&worker("a"), 10, Duration::days(30), T0)
        .await
        .unwrap();
    assert_eq!(by_a.len(), 1);
    let held: time::OffsetDateTime =
        sqlx::query_scalar("SELECT lease_expires_at FROM pending_propagations WHERE id = $1")
            .bind(id.0)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(
        held,
        T0 + keel_propagation::MAX_LEASE,
        "the lease is bounded"
    );
    // The longest lease a claim makes is kept: another worker finds nothing to claim.
    assert!(
        store
            .claim(
                &worker("b"),
                10,
                Duration::minutes(1),
                T0 + Duration::hours(1)
            )
            .await
            .unwrap()
            .is_empty()
    );

    // Another writer pushes the lease a year ahead: the next claim takes the row over.
    sqlx::query(
        "UPDATE pending_propagations SET lease_expires_at = $2 + interval '1 year' WHERE id = $1",
    )
    .bind(id.0)
    .bind(T0)
    .execute(db.pool())
    .await
    .unwrap();
    let by_b = store
        .claim(
            &worker("b"),
            10,
            Duration::minutes(1),
            T0 + Duration::hours(1),
        )
        .await
        .unwrap();
    assert_eq!(by_b.len(), 1, "the implausible lease was rescued");
    assert_eq!(by_b[0].id, id);
    assert_eq!(row(db.pool(), id).await.claimed_by.as_deref(), Some("b"));
}

/// A pending row that another writer pushed further ahead than any retry schedule waits (year
/// 9999) never hides its resource's drift: enqueueing the same change again makes it due, and so
/// does housekeeping, whoever enqueues; a row waiting within a schedule's reach is left alone.
#[tokio::test]
async fn a_next_attempt_no_schedule_makes_never_hides_its_row() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (team, resource, far) = drifted_and_enqueued(db.pool()).await;
    let (near_team, near_resource, near) = drifted_and_enqueued(db.pool()).await;
    let push = |id: PropagationId, to: time::OffsetDateTime| {
        let pool = db.pool().clone();
        async move {
            sqlx::query("UPDATE pending_propagations SET next_attempt_at = $2 WHERE id = $1")
                .bind(id.0)
                .bind(to)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let year_9999 = time::macros::datetime!(9999-12-31 00:00 UTC);
    let within_reach = T0 + keel_propagation::MAX_WAIT - Duration::minutes(1);
    push(far, year_9999).await;
    push(near, within_reach).await;
    assert!(claim_as(&store, "a").await.is_empty(), "neither is due");

    let again = store
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap();
    assert_eq!(
        again,
        Enqueued::Replaced(far),
        "the same change re-arms the row"
    );
    assert_eq!(row(db.pool(), far).await.next_attempt_at, T0);
    let near_again = store
        .enqueue(&elevation(near_team, near_resource, "pro"), T0)
        .await
        .unwrap();
    assert_eq!(
        near_again,
        Enqueued::Unchanged(near),
        "a reachable wait is kept"
    );

    push(far, year_9999).await;
    let woken = store.wake_implausible_waits(T0).await.unwrap();
    assert_eq!(woken, vec![far]);
    assert_eq!(row(db.pool(), far).await.next_attempt_at, T0);
    assert_eq!(row(db.pool(), near).await.next_attempt_at, within_reach);
    let claimed = claim_as(&store, "a").await;
    assert_eq!(
        claimed.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![far],
        "the woken row is claimed at once"
    );
}

#[tokio::test]
async fn a_transition_whose_audit_insert_fails_leaves_the_row_unchanged() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let claimed = claim_as(&store, "a").await;
    let before = row(db.pool(), id).await;
    sqlx::query(
        "ALTER TABLE audit_events ADD CONSTRAINT test_refuse CHECK (kind <> 'propagation.applied')",
    )
    .execute(db.pool())
    .await
    .unwrap();

    let applied = decide(1, &Ok(ApplyOutcome::Applied), &RetryPolicy::standard(), T0);
    let err = store
        .complete(
            &worker("a"),
            &[Completion {
                propagation: claimed[0].clone(),
                transition: applied,
            }],
            &Actor::system(),
            T0,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Audit(_)), "{err}");
    let after = row(db.pool(), id).await;
    assert_eq!(after.status, before.status);
    assert_eq!(after.attempts, before.attempts);
    assert_eq!(after.applied_at, None);
    assert_eq!(after.claimed_by, before.claimed_by);
    assert_eq!(
        resource_tier(db.pool(), resource).await,
        "free",
        "the tier moved without its audit row"
    );
}

#[tokio::test]
async fn releasing_a_claim_gives_the_attempt_back() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (_, _, id) = drifted_and_enqueued(db.pool()).await;
    let claimed = claim_as(&store, "a").await;
    assert_eq!(
        store.release(&worker("b"), &claimed, T0, T0).await.unwrap(),
        0,
        "only the owner can release"
    );
    assert_eq!(
        store.release(&worker("a"), &claimed, T0, T0).await.unwrap(),
        1
    );
    let after = row(db.pool(), id).await;
    assert_eq!((after.attempts, after.claimed_by), (0, None));
    assert_eq!(claim_as(&store, "b").await.len(), 1);
}

#[tokio::test]
async fn the_reconciler_enqueues_on_drift_and_not_while_a_propagation_is_pending() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (_, drifted) = seed(db.pool(), "pro", "free", None).await;
    let (_, in_step) = seed(db.pool(), "pro", "pro", None).await;

    let first = store.reconcile(T0).await.unwrap();
    assert_eq!(
        first.iter().map(|(_, r)| *r).collect::<Vec<_>>(),
        vec![drifted]
    );
    assert!(!first.iter().any(|(_, r)| *r == in_step));
    assert!(
        store.reconcile(T0).await.unwrap().is_empty(),
        "enqueued again while one is pending"
    );

    // Once it dead-letters, the same drift is left to operators instead of looping.
    sqlx::query(
        "UPDATE pending_propagations SET status = 'dead_lettered', dead_lettered_at = now()",
    )
    .execute(db.pool())
    .await
    .unwrap();
    assert!(store.reconcile(T0).await.unwrap().is_empty());
    sqlx::query("DELETE FROM pending_propagations WHERE status = 'pending'")
        .execute(db.pool())
        .await
        .unwrap();
    // A new target for the team is new drift.
    sqlx::query("UPDATE teams SET tier = 'team'")
        .execute(db.pool())
        .await
        .unwrap();
    let again = store.reconcile(T0).await.unwrap();
    assert_eq!(again.len(), 2, "both resources now drift from the new tier");
}

#[tokio::test]
async fn dead_letters_are_listed_and_requeued_with_an_audit_row_and_a_fresh_budget() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (_, resource, id) = drifted_and_enqueued(db.pool()).await;
    let claimed = claim_as(&store, "a").await;
    // Transitions come only from the decision functions: a claim past its budget settles
    // dead-lettered.
    let keel_propagation::ClaimDecision::Settle(dead) =
        keel_propagation::on_claim(u32::MAX, &keel_propagation::RetryPolicy::standard())
    else {
        panic!("a claim past the budget must settle");
    };
    assert!(matches!(dead, Transition::DeadLetter { .. }), "{dead:?}");
    complete_one(&store, "a", claimed[0].clone(), dead).await;

    let listed = store
        .dead_letters(Some(PropagationKind::TierElevation), 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].id,
            listed[0].attempts,
            listed[0].target_tier.as_deref()
        ),
        (id.0, 1, Some("pro"))
    );

    let operator = Actor::parse("operator:alice").unwrap();
    let report = store
        .requeue(RequeueTarget::One(id), &operator, &reason(), T0)
        .await
        .unwrap();
    assert_eq!(report.requeued, vec![id]);
    let recorded: Option<String> = sqlx::query_scalar(
        "SELECT attributes->>'reason' FROM audit_events WHERE kind = 'propagation.requeued'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(recorded.as_deref(), Some(reason().as_str()));
    let after = row(db.pool(), id).await;
    assert_eq!((after.status.as_str(), after.attempts), ("pending", 0));
    assert_eq!(after.next_attempt_at, T0);
    let kinds = audit_kinds(db.pool(), resource).await;
    assert_eq!(
        kinds.last().map(String::as_str),
        Some(AuditKind::PropagationRequeued.as_str())
    );
    assert!(store.dead_letters(None, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn requeue_leaves_a_dead_letter_alone_when_its_resource_already_has_a_pending_row() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    let old = store
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap()
        .id();
    sqlx::query(
        "UPDATE pending_propagations SET status = 'dead_lettered', dead_lettered_at = now()",
    )
    .execute(db.pool())
    .await
    .unwrap();
    store
        .enqueue(&elevation(team, resource, "team"), T0)
        .await
        .unwrap();
    let report = store
        .requeue(
            RequeueTarget::AllOfKind(PropagationKind::TierElevation),
            &Actor::system(),
            &reason(),
            T0,
        )
        .await
        .unwrap();
    assert!(report.requeued.is_empty());
    assert_eq!(report.skipped_open, vec![old]);
}

#[tokio::test]
async fn queue_stats_report_due_rows_and_the_oldest_wait() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    for _ in 0..3 {
        let (team, resource) = seed(db.pool(), "pro", "free", None).await;
        store
            .enqueue(&elevation(team, resource, "pro"), T0)
            .await
            .unwrap();
    }
    let stats = store.queue_stats(T0 + Duration::seconds(90)).await.unwrap();
    assert_eq!(stats.len(), PropagationKind::ALL.len());
    assert_eq!(stats[0].due, 3);
    assert!(
        (stats[0].oldest_due_age_seconds - 90.0).abs() < 0.001,
        "{stats:?}"
    );
}

/// A dead letter whose `propagation.requeued` row cannot be written (another writer gave it a
/// kind the audit trail refuses as an attribute) is reported and left dead-lettered, with nothing
/// written for it; a requeue naming it is not an error that hides the reason.
#[tokio::test]
async fn a_dead_letter_whose_audit_row_cannot_be_written_is_reported_and_left_alone() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (team, resource) = seed(db.pool(), "pro", "free", None).await;
    let id = store
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap()
        .id();
    sqlx::query(
        "UPDATE pending_propagations SET status = 'dead_lettered', dead_lettered_at = now(), \
                kind = 'postgres://u:pw@h/x' WHERE id = $1",
    )
    .bind(id.0)
    .execute(db.pool())
    .await
    .unwrap();
    let report = store
        .requeue(RequeueTarget::One(id), &Actor::system(), &reason(), T0)
        .await
        .expect("a requeue past an unrecordable dead letter answers with a report");
    assert!(report.requeued.is_empty(), "{report:?}");
    assert_eq!(report.skipped_unrecordable.len(), 1, "{report:?}");
    assert_eq!(report.skipped_unrecordable[0].0, id);
    assert_eq!(report.left_alone(), 1);
    let status: String =
        sqlx::query_scalar("SELECT status FROM pending_propagations WHERE id = $1")
            .bind(id.0)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(status, "dead_lettered");
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = 'propagation.requeued'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(audited, 0);
}

#[tokio::test]
async fn requeue_takes_only_the_newest_dead_letter_and_never_an_abandoned_target() {
    let db = keel_testkit::database().await;
    let store = store(db.pool());
    let (team, resource) = seed(db.pool(), "team", "free", None).await;
    let dead = "UPDATE pending_propagations SET status = 'dead_lettered', dead_lettered_at = now() WHERE status = 'pending'";
    let old = store
        .enqueue(&elevation(team, resource, "pro"), T0)
        .await
        .unwrap()
        .id();
    sqlx::query(dead).execute(db.pool()).await.unwrap();
    let newest = store
        .enqueue(&elevation(team, resource, "team"), T0)
        .await
        .unwrap()
        .id();
    sqlx::query(dead).execute(db.pool()).await.unwrap();

    let report = store
        .requeue(
            RequeueTarget::AllOfKind(PropagationKind::TierElevation),
            &Actor::system(),
            &reason(),
            T0,
        )
        .await
        .unwrap();
    assert_eq!(report.requeued, vec![newest]);
    assert_eq!(report.skipped_superseded, vec![old]);

    // The team moves back to "pro": the remaining "pro" dead letter is current again, but the
    // resource now has a pending row, so it is left alone rather than violating coalescing.
    sqlx::query("UPDATE teams SET tier = 'pro'")
        .execute(db.pool())
        .await
        .unwrap();
    let again = store
        .requeue(RequeueTarget::One(old), &Actor::system(), &reason(), T0)
        .await
        .unwrap();
    assert_eq!(again.skipped_open, vec![old]);

    let err = store
        .requeue(RequeueTarget::One(newest), &Actor::system(), &reason(), T0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotDeadLettered(id) if id == newest),
        "{err}"
    );
}

fn reason() -> RequeueReason {
    RequeueReason::parse("upstream quota service restored").unwrap()
}

/// A requeue reason is required, bounded and never something the audit trail would refuse.
#[test]
fn a_requeue_reason_is_neither_blank_nor_unbounded() {
    for bad in ["", "   ", &"x".repeat(RequeueReason::MAX_CHARS + 1)] {
        assert!(RequeueReason::parse(bad).is_err(), "{bad:?} was accepted");
    }
    // A line break or an escape sequence would let one line of an audit listing pose as
    // another.
    for forged in [
        "routine\n2026-12-02T12:00:00Z  9999  propagation.applied",
        "x\u{1b}[2J",
    ] {
        assert_eq!(
            RequeueReason::parse(forged),
            Err(keel_propagation::postgres::InvalidRequeueReason::ControlCharacter),
            "{forged:?}"
        );
    }
    assert_eq!(
        RequeueReason::parse("  fixed the quota  ")
            .unwrap()
            .as_str(),
        "fixed the quota"
    );
}
