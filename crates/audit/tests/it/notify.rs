//! The customer-notification dispatcher as the application role: every customer kind queued
//! once from the trail in commit order, signed, delivered and audited; failures retried, then
//! dead-lettered (an operator alert) and requeued under the same event id.

use std::sync::Mutex;
use std::time::Duration;

use keel_audit::notify::{
    DeliveryOutcome, FailureClass, NotifyKey, RetryPolicy, SignedNotification, Webhook,
    WebhookReply, backlog, dead_letters, deliver_due, ingest, requeue, try_lock,
};
use keel_audit::postgres::insert;
use keel_audit::{Actor, AuditKind};
use sqlx::PgConnection;

use crate::sample;

fn key() -> NotifyKey {
    NotifyKey::new(b"a notification key of 32 bytes!!".to_vec()).unwrap()
}

/// A receiver that answers `status` and keeps every request.
struct Recorder {
    status: Mutex<u16>,
    seen: Mutex<Vec<SignedNotification>>,
}

impl Recorder {
    fn answering(status: u16) -> Self {
        Self {
            status: Mutex::new(status),
            seen: Mutex::new(Vec::new()),
        }
    }
}

impl Webhook for Recorder {
    async fn post(&self, notification: &SignedNotification) -> WebhookReply {
        self.seen.lock().unwrap().push(notification.clone());
        WebhookReply::Status(*self.status.lock().unwrap())
    }
}

/// Ingests until `expected` notifications are queued (other tests' transactions on the shared
/// server may hold the commit horizon back for a moment).
async fn ingest_all(conn: &mut PgConnection, expected: u64) {
    let mut queued = 0;
    for _ in 0..1200 {
        queued += ingest(conn, 100).await.unwrap().queued;
        if queued >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(queued, expected);
}

async fn kinds_written(conn: &mut PgConnection, kind: AuditKind) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT attributes->>'event_id' FROM audit_events WHERE kind = $1 ORDER BY id",
    )
    .bind(kind.as_str())
    .fetch_all(conn)
    .await
    .unwrap()
}

#[tokio::test]
async fn every_customer_notification_is_queued_once_and_delivered_signed_and_audited() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    let mut customer = Vec::new();
    for (n, kind) in keel_audit::notify::DISPATCHED_KINDS.iter().enumerate() {
        customer.push(insert(&mut app, &sample(*kind, n as u32)).await.unwrap().0);
        // An operator kind in between is not a customer notification.
        insert(&mut app, &sample(AuditKind::ProvisionPersistenceFailed, 0))
            .await
            .unwrap();
    }
    assert!(try_lock(&mut app).await.unwrap());
    let mut other = db.app().acquire().await.unwrap();
    assert!(
        !try_lock(&mut other).await.unwrap(),
        "a second dispatcher waits"
    );

    ingest_all(&mut app, customer.len() as u64).await;
    assert_eq!(ingest(&mut app, 100).await.unwrap().queued, 0);
    let receiver = Recorder::answering(204);
    let done = deliver_due(&mut app, &receiver, &key(), &RetryPolicy::default(), 100)
        .await
        .unwrap();
    assert!(done.iter().all(|a| a.outcome == DeliveryOutcome::Delivered));
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), customer.len());
    for (request, audit_id) in seen.iter().zip(&customer) {
        assert!(key().verify(request.timestamp, &request.body, &request.signature));
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["id"], request.event_id.to_string());
        assert_eq!(body["audit_id"], *audit_id, "delivered in commit order");
        assert_eq!(body["attributes"]["tier"], "pro");
    }
    let delivered = kinds_written(&mut app, AuditKind::NotificationDelivered).await;
    let ids: Vec<String> = seen.iter().map(|r| r.event_id.to_string()).collect();
    assert_eq!(delivered, ids, "each delivery audited once, naming its id");
    // Nothing more is due.
    assert!(
        deliver_due(&mut app, &receiver, &key(), &RetryPolicy::default(), 100)
            .await
            .unwrap()
            .is_empty()
    );
    let left = backlog(&mut app).await.unwrap();
    assert_eq!((left.pending, left.dead), (0, 0));
}

#[tokio::test]
async fn a_failing_receiver_is_retried_then_dead_lettered_and_a_requeue_delivers_the_same_id() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    insert(&mut app, &sample(AuditKind::ProvisionCreated, 1))
        .await
        .unwrap();
    ingest_all(&mut app, 1).await;
    let policy = RetryPolicy {
        max_attempts: 2,
        base_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };
    let receiver = Recorder::answering(503);
    let first = deliver_due(&mut app, &receiver, &key(), &policy, 10)
        .await
        .unwrap();
    assert_eq!(
        first[0].outcome,
        DeliveryOutcome::Retrying(FailureClass::Status5xx)
    );
    let second = deliver_due(&mut app, &receiver, &key(), &policy, 10)
        .await
        .unwrap();
    assert_eq!(
        second[0].outcome,
        DeliveryOutcome::DeadLettered(FailureClass::Status5xx)
    );
    assert!(
        deliver_due(&mut app, &receiver, &key(), &policy, 10)
            .await
            .unwrap()
            .is_empty(),
        "a dead letter is not retried"
    );
    let dead = dead_letters(&mut app, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].event_id, first[0].event_id);
    assert_eq!(dead[0].attempts, 2);
    assert_eq!(dead[0].last_outcome.as_deref(), Some("status_5xx"));
    assert_eq!(backlog(&mut app).await.unwrap().dead, 1);
    assert_eq!(
        kinds_written(&mut app, AuditKind::NotificationRetrying).await,
        [first[0].event_id.to_string()]
    );
    assert_eq!(
        kinds_written(&mut app, AuditKind::NotificationDeadLettered).await,
        [first[0].event_id.to_string()]
    );

    let operator = Actor::parse("ops-alice").unwrap();
    assert!(
        requeue(&mut app, first[0].event_id, &operator)
            .await
            .unwrap()
    );
    assert!(
        !requeue(&mut app, first[0].event_id, &operator)
            .await
            .unwrap(),
        "only a dead letter can be requeued"
    );
    *receiver.status.lock().unwrap() = 200;
    let third = deliver_due(&mut app, &receiver, &key(), &policy, 10)
        .await
        .unwrap();
    assert_eq!(third[0].outcome, DeliveryOutcome::Delivered);
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|r| r.event_id == first[0].event_id));
    assert!(
        seen.windows(2).all(|w| w[0].body == w[1].body),
        "every attempt carries the same notification"
    );
    assert_eq!(
        kinds_written(&mut app, AuditKind::NotificationRequeued).await,
        [first[0].event_id.to_string()]
    );
    let audited_actor: String =
        sqlx::query_scalar("SELECT actor FROM audit_events WHERE kind = 'notification.requeued'")
            .fetch_one(&mut *app)
            .await
            .unwrap();
    assert_eq!(audited_actor, "ops-alice");
}
