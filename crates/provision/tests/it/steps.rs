//! A failure injected at each step (reserve, create, finalize, audit, teardown), against real
//! Postgres: no `active` row without its database; no database without a row except a failed
//! teardown, which is counted and audited; and the status and envelope the API answers with.

use keel_audit::{AuditKind, ResourceType};
use keel_provision::fault::{BackendStep, StoreStep};
use keel_provision::{
    Compensation, DocsBase, ErrorCode, ErrorEnvelope, FailedStep, Outcome, ProvisionError,
    ProvisionedBody, RowResult, TeardownResult, TeardownStage,
};

use super::{Harness, NOW, connect_as_customer, harness};

fn envelope(err: &ProvisionError) -> ErrorEnvelope {
    let docs = DocsBase::parse("https://docs.keel.test/errors").unwrap();
    ErrorEnvelope::new(err.code(), err.to_string(), "req-42", &docs)
}

/// Asserts the error is the seed's answer: 503 `provision_failed`, a Retry-After, and an agent
/// action that says retry with backoff.
fn assert_503_retry_with_backoff(err: &ProvisionError) {
    assert_eq!(err.code(), ErrorCode::ProvisionFailed, "{err}");
    let envelope = envelope(err);
    assert_eq!(envelope.status, 503);
    assert_eq!(envelope.retry_after_header().as_deref(), Some("5"));
    assert!(envelope.agent_action.contains("exponential backoff"));
}

fn compensation(err: &ProvisionError, expected_step: FailedStep) -> Compensation {
    let ProvisionError::Failed {
        step, compensation, ..
    } = err
    else {
        panic!("expected a compensated failure, got {err}");
    };
    assert_eq!(*step, expected_step);
    *compensation
}

async fn provision_err(h: &Harness) -> ProvisionError {
    h.provisioner
        .provision(h.request(), NOW)
        .await
        .expect_err("the injected fault must fail the provisioning")
}

fn outcomes(h: &Harness, outcome: Outcome) -> u64 {
    h.provisioner
        .metrics()
        .outcomes(ResourceType::Postgres, outcome)
}

#[tokio::test]
async fn success_leaves_an_active_row_whose_database_accepts_the_returned_url() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let url = provisioned.connection_url().expose().to_owned();
    let rows = h.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "active");
    assert_eq!(rows[0].provider_id.as_deref(), Some(rows[0].name.expose()));
    assert!(h.role_exists(&rows[0].name).await);
    let mut customer = connect_as_customer(&url).await;
    let (user, database): (String, String) =
        sqlx::query_as("SELECT current_user::text, current_database()::text")
            .fetch_one(&mut customer)
            .await
            .unwrap();
    assert_eq!(user, rows[0].name.expose());
    assert_eq!(database, rows[0].name.expose());
    let body = serde_json::to_value(ProvisionedBody::from(provisioned)).unwrap();
    assert_eq!(body["connection_url"], url.as_str());
    assert_eq!(body["status"], "active");
    assert_eq!(h.audit_kinds().await, [AuditKind::ProvisionCreated]);
    assert_eq!(outcomes(&h, Outcome::Provisioned), 1);
    h.assert_invariants().await;
}

#[tokio::test]
async fn reserve_failure_creates_nothing_and_answers_503() {
    let h = harness().await;
    h.provisioner.store().fail(StoreStep::Reserve, 1);
    let err = provision_err(&h).await;
    assert!(matches!(err, ProvisionError::Reserve(_)), "{err}");
    assert_503_retry_with_backoff(&err);
    assert!(h.rows().await.is_empty());
    assert!(h.audit_kinds().await.is_empty());
    assert_eq!(outcomes(&h, Outcome::ReserveFailed), 1);
}

/// A reservation that was written although its answer was lost (the store's deadline passed,
/// the connection ended after the commit) is marked failed at once: no `pending` row the client
/// never heard of is left to hold the team's quota until the reconciler, and nothing is created.
#[tokio::test]
async fn a_reservation_written_though_its_answer_was_lost_is_settled_at_once() {
    let h = harness().await;
    h.provisioner.store().fail_after(StoreStep::Reserve, 1);
    let err = provision_err(&h).await;
    assert!(matches!(err, ProvisionError::Reserve(_)), "{err}");
    let rows = h.rows().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "failed");
    assert!(rows[0].soft_deleted && !rows[0].has_url);
    assert!(!h.object_exists(&rows[0].name).await);
    assert_eq!(h.audit_kinds().await, [AuditKind::ProvisionReconciled]);
    let audit = h.audit().await;
    assert_eq!(
        audit[0].attributes().get("reason"),
        Some("reservation_reply_lost")
    );
    assert_eq!(outcomes(&h, Outcome::ReserveFailed), 1);
    h.assert_invariants().await;
}

#[tokio::test]
async fn create_failure_soft_deletes_the_row_and_leaves_no_database() {
    let h = harness().await;
    h.provisioner.backend().fail(BackendStep::Create, 1);
    let err = provision_err(&h).await;
    assert_503_retry_with_backoff(&err);
    let compensation = compensation(&err, FailedStep::Create);
    assert_eq!(compensation.teardown, TeardownResult::TornDown);
    assert_eq!(compensation.row, RowResult::SoftDeleted);
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "failed");
    assert!(rows[0].soft_deleted && !rows[0].has_url);
    assert!(!h.object_exists(&rows[0].name).await);
    assert_eq!(outcomes(&h, Outcome::CreateFailed), 1);
    h.assert_invariants().await;
}

#[tokio::test]
async fn finalize_failure_tears_down_soft_deletes_and_audits_persistence_failed() {
    let h = harness().await;
    h.provisioner.store().fail(StoreStep::Activate, 1);
    let err = provision_err(&h).await;
    assert_503_retry_with_backoff(&err);
    let compensation = compensation(&err, FailedStep::Finalize);
    assert_eq!(
        compensation,
        Compensation {
            teardown: TeardownResult::TornDown,
            row: RowResult::SoftDeleted,
            audited: true
        }
    );
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "failed");
    assert!(rows[0].soft_deleted && !rows[0].has_url);
    assert!(
        !h.object_exists(&rows[0].name).await,
        "the database must be torn down"
    );
    assert!(
        !h.role_exists(&rows[0].name).await,
        "the role must be dropped"
    );
    let audit = h.audit().await;
    assert_eq!(audit.len(), 1);
    let event = &audit[0];
    assert_eq!(event.kind(), AuditKind::ProvisionPersistenceFailed);
    assert_eq!(event.resource_id(), Some(rows[0].id));
    assert_eq!(event.request_id().map(|r| r.as_str()), Some("req-42"));
    let attrs = event.attributes();
    assert_eq!(attrs.get("resource_type"), Some("postgres"));
    assert_eq!(attrs.get("tier"), Some("pro"));
    assert_eq!(
        attrs.get("provider_id"),
        Some(rows[0].name.masked().as_str())
    );
    assert_eq!(attrs.get("compensation"), Some("teardown"));
    assert_eq!(attrs.get("failed_step"), Some("finalize"));
    assert_eq!(attrs.get("reason"), Some("store_unavailable"));
    assert_eq!(outcomes(&h, Outcome::FinalizeFailed), 1);
    h.assert_invariants().await;
}

#[tokio::test]
async fn audit_failure_at_finalize_rolls_the_activation_back_and_compensates() {
    let h = harness().await;
    // The database itself refuses the provision.created row, inside the activation transaction.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_created() RETURNS trigger LANGUAGE plpgsql AS $$ \
           BEGIN RAISE EXCEPTION 'audit store refuses provision.created'; END $$; \
         CREATE TRIGGER refuse_created BEFORE INSERT ON audit_events FOR EACH ROW \
           WHEN (NEW.kind = 'provision.created') EXECUTE FUNCTION refuse_created();",
    )
    .execute(h.db.pool())
    .await
    .unwrap();
    let err = provision_err(&h).await;
    assert_503_retry_with_backoff(&err);
    compensation(&err, FailedStep::Finalize);
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "failed", "the activation must roll back");
    assert!(!rows[0].has_url);
    assert!(!h.object_exists(&rows[0].name).await);
    assert_eq!(
        h.audit_kinds().await,
        [AuditKind::ProvisionPersistenceFailed]
    );
    h.assert_invariants().await;
}

#[tokio::test]
async fn a_failed_teardown_is_the_only_way_a_database_outlives_its_row_and_is_counted_and_audited()
{
    let h = harness().await;
    h.provisioner.store().fail(StoreStep::Activate, 1);
    h.provisioner.backend().fail(BackendStep::Teardown, 1);
    let err = provision_err(&h).await;
    assert_eq!(envelope(&err).status, 503);
    let compensation = compensation(&err, FailedStep::Finalize);
    assert_eq!(compensation.teardown, TeardownResult::Failed);
    assert!(compensation.audited);
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "failed");
    assert!(h.object_exists(&rows[0].name).await, "the teardown failed");
    let audit = h.audit().await;
    let kinds: Vec<_> = audit.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        [
            AuditKind::ProvisionPersistenceFailed,
            AuditKind::ProvisionTeardownFailed
        ]
    );
    assert_eq!(err.code(), ErrorCode::ProvisionIncomplete);
    assert_eq!(
        h.provisioner
            .metrics()
            .teardown_failures(ResourceType::Postgres, TeardownStage::Compensation),
        1
    );
    h.assert_invariants().await;
}

#[tokio::test]
async fn a_create_failure_whose_teardown_also_fails_is_audited_too() {
    let h = harness().await;
    h.provisioner.backend().fail(BackendStep::Create, 1);
    h.provisioner.backend().fail(BackendStep::Teardown, 1);
    let err = provision_err(&h).await;
    let compensation = compensation(&err, FailedStep::Create);
    assert_eq!(compensation.teardown, TeardownResult::Failed);
    assert!(compensation.audited);
    let audit = h.audit().await;
    assert_eq!(audit[0].kind(), AuditKind::ProvisionCreateFailed);
    assert_eq!(audit[0].attributes().get("failed_step"), Some("create"));
    assert_eq!(audit[1].kind(), AuditKind::ProvisionTeardownFailed);
    h.assert_invariants().await;
}

/// PROV-1 class: a compensation that cannot win its state flip destroys nothing; the row stays
/// `pending` (owned by the reconciler) and the answer says cleanup is pending.
#[tokio::test]
async fn a_reservation_that_cannot_be_flipped_stays_pending_and_nothing_is_torn_down() {
    let h = harness().await;
    h.provisioner.store().fail(StoreStep::Activate, 1);
    h.provisioner.store().fail(StoreStep::Abandon, 2);
    let err = provision_err(&h).await;
    assert_eq!(err.code(), ErrorCode::ProvisionIncomplete);
    let compensation = compensation(&err, FailedStep::Finalize);
    assert_eq!(compensation.row, RowResult::LeftPending);
    assert_eq!(compensation.teardown, TeardownResult::NotAttempted);
    assert!(!compensation.audited);
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "pending");
    assert!(!rows[0].has_url);
    assert!(
        h.object_exists(&rows[0].name).await,
        "nothing is destroyed without winning the flip"
    );
    h.assert_invariants().await;
}

#[tokio::test]
async fn an_unknown_team_is_refused_before_anything_is_written() {
    let mut h = harness().await;
    h.team = keel_audit::TeamId::new_random();
    let err = provision_err(&h).await;
    assert!(matches!(err, ProvisionError::TeamNotFound), "{err}");
    assert_eq!(envelope(&err).status, 422);
    assert!(h.rows().await.is_empty());
}

#[tokio::test]
async fn a_resource_type_without_a_backend_is_refused_before_anything_is_written() {
    let h = harness().await;
    let mut request = h.request();
    request.resource_type = ResourceType::Redis;
    let err = h.provisioner.provision(request, NOW).await.unwrap_err();
    assert!(matches!(
        err,
        ProvisionError::Unsupported(ResourceType::Redis)
    ));
    assert_eq!(envelope(&err).status, 400);
    assert!(h.rows().await.is_empty());
}

#[tokio::test]
async fn create_is_retry_safe_on_an_existing_database() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let rows = h.rows().await;
    // A second create of the same name (a retried step) succeeds and issues a new password.
    let again = h
        .provisioner
        .backend()
        .inner()
        .create(&rows[0].name, &keel_audit::Tier::parse("pro").unwrap())
        .await
        .unwrap();
    assert_ne!(again.connection_url, *provisioned.connection_url());
    connect_as_customer(again.connection_url.expose()).await;
}

use keel_provision::Backend as _;
