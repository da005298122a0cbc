//! The customer-notification dispatcher as the application role: every customer kind queued
//! once from the trail in commit order, signed, delivered and audited; failures retried, then
//! dead-lettered (an operator alert) and requeued under the same event id.

use std::sync::Mutex;
use std::time::Duration;

use keel_audit::notify::{
    DeadLetterPage, DeliveryOutcome, FailureClass, NotifyKey, RetryPolicy, SignedNotification,
    Webhook, WebhookReply, backlog, dead_letters, deliver_due, deliver_due_each, ingest, requeue,
    try_lock,
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
    let dead = dead_letters(&mut app, &DeadLetterPage::newest(10))
        .await
        .unwrap();
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

/// A row this build cannot read is skipped (one stuck row never holds up the others) but named:
/// the pass reports the first one's id, and moving the cursor back to just before it, as the
/// runbook says, reads the rows after it again without queueing any notification twice.
#[tokio::test]
async fn a_row_this_build_cannot_read_is_named_and_reading_again_queues_nothing_twice() {
    let db = keel_testkit::role_split_database().await;
    let mut owner = db.owner().acquire().await.unwrap();
    let unknown: i64 = sqlx::query_scalar(
        "INSERT INTO audit_events (kind, actor, occurred_at, recorded_at) \
         VALUES ('resource.teleported', 'system', now(), now()) RETURNING id",
    )
    .fetch_one(&mut *owner)
    .await
    .unwrap();
    let mut app = db.app().acquire().await.unwrap();
    insert(&mut app, &sample(AuditKind::ProvisionCreated, 1))
        .await
        .unwrap();
    let mut skipped = None;
    let mut queued = 0;
    for _ in 0..1200 {
        let pass = ingest(&mut app, 100).await.unwrap();
        queued += pass.queued;
        skipped = skipped.or(pass.first_unreadable);
        if queued >= 1 && skipped.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((queued, skipped), (1, Some(unknown)));

    // The runbook's recovery: the cursor goes back to just before the skipped row.
    sqlx::query(
        "UPDATE notification_cursor SET txid = (SELECT txid::text::bigint FROM audit_events \
                                                 WHERE id = $1), audit_id = $1 - 1 \
          WHERE name = 'customer-notifications'",
    )
    .bind(unknown)
    .execute(&mut *owner)
    .await
    .unwrap();
    let again = ingest(&mut app, 100).await.unwrap();
    assert_eq!(
        (again.read, again.queued, again.first_unreadable),
        (2, 0, Some(unknown)),
        "both rows read again, nothing queued twice"
    );
    let deliveries: i64 = sqlx::query_scalar("SELECT count(*) FROM notification_deliveries")
        .fetch_one(&mut *owner)
        .await
        .unwrap();
    assert_eq!(deliveries, 1);
}

/// A receiver that answers 503, and while the second request is with it the dispatcher's
/// database connection is ended (a failover in the middle of a batch).
struct CutsTheConnection {
    admin: sqlx::PgPool,
    dispatcher_pid: i32,
    posts: Mutex<u32>,
}

impl Webhook for CutsTheConnection {
    async fn post(&self, _: &SignedNotification) -> WebhookReply {
        let post = {
            let mut posts = self.posts.lock().unwrap();
            *posts += 1;
            *posts
        };
        if post == 2 {
            let ended: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
                .bind(self.dispatcher_pid)
                .fetch_one(&self.admin)
                .await
                .unwrap();
            assert!(ended, "the dispatcher's connection was ended");
        }
        WebhookReply::Status(503)
    }
}

/// A notification dead-lettered early in a batch is handed over (to be counted for its alert)
/// as soon as it is recorded: an error recording a later one of the same batch never loses it,
/// although it is no longer due and no later batch would report it.
#[tokio::test]
async fn a_dead_letter_recorded_before_a_failure_later_in_its_batch_is_still_reported() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    for n in 1..=2 {
        insert(&mut app, &sample(AuditKind::ProvisionCreated, n))
            .await
            .unwrap();
    }
    ingest_all(&mut app, 2).await;
    let dispatcher_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *app)
        .await
        .unwrap();
    let receiver = CutsTheConnection {
        admin: db.database().pool().clone(),
        dispatcher_pid,
        posts: Mutex::new(0),
    };
    let policy = RetryPolicy {
        max_attempts: 1,
        base_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };
    let mut reported = Vec::new();
    let result = deliver_due_each(&mut app, &receiver, &key(), &policy, 10, |attempt| {
        reported.push(attempt);
    })
    .await;
    assert!(result.is_err(), "the second attempt's record failed");
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert_eq!(
        reported[0].outcome,
        DeliveryOutcome::DeadLettered(FailureClass::Status5xx)
    );
    let mut owner = db.owner().acquire().await.unwrap();
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM notification_deliveries ORDER BY seq")
            .fetch_all(&mut *owner)
            .await
            .unwrap();
    assert_eq!(states, ["dead", "pending"], "the first was recorded");
}

/// A receiver that answers 429 with a `Retry-After` of `wait`, and keeps every request.
struct Throttling {
    wait: Duration,
    seen: Mutex<Vec<SignedNotification>>,
}

impl Webhook for Throttling {
    async fn post(&self, notification: &SignedNotification) -> WebhookReply {
        self.seen.lock().unwrap().push(notification.clone());
        WebhookReply::Throttled {
            status: 429,
            retry_after: self.wait,
        }
    }
}

/// A receiver that asks to be left alone (429 with `Retry-After`) gets no further request in
/// the batch: its delivery is due again exactly when it asked (at most the policy's longest
/// backoff), audited with the wait, and the deliveries behind it stay due, unattempted.
#[tokio::test]
async fn a_receiver_that_asks_to_wait_is_left_alone_for_that_long() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    for n in 0..3 {
        insert(&mut app, &sample(AuditKind::ProvisionCreated, n))
            .await
            .unwrap();
    }
    ingest_all(&mut app, 3).await;
    assert!(try_lock(&mut app).await.unwrap());
    let policy = RetryPolicy {
        max_attempts: 5,
        base_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(600),
    };
    // (asked, kept): as asked; capped by the longest backoff; never below the attempt's backoff.
    for (asked, kept) in [(90, 90), (365 * 24 * 3600, 600), (0, 1)] {
        sqlx::query("UPDATE notification_deliveries SET next_attempt_at = now(), attempts = 0")
            .execute(&mut *app)
            .await
            .unwrap();
        let receiver = Throttling {
            wait: Duration::from_secs(asked),
            seen: Mutex::new(Vec::new()),
        };
        let done = deliver_due(&mut app, &receiver, &key(), &policy, 10)
            .await
            .unwrap();
        assert_eq!(done.len(), 1, "the batch stops at the throttle: {done:?}");
        assert_eq!(
            done[0].outcome,
            DeliveryOutcome::Retrying(FailureClass::Status4xx)
        );
        assert_eq!(done[0].retry_after, Some(Duration::from_secs(kept)));
        assert_eq!(receiver.seen.lock().unwrap().len(), 1);
        // Due again after exactly the kept wait (no jitter below it), by the server's clock.
        let waits: Vec<(i32, f64)> = sqlx::query_as(
            "SELECT attempts, extract(epoch FROM next_attempt_at - now())::float8 \
             FROM notification_deliveries ORDER BY seq",
        )
        .fetch_all(&mut *app)
        .await
        .unwrap();
        assert_eq!(waits[0].0, 1);
        assert!(
            (waits[0].1 - kept as f64).abs() < 5.0,
            "asked {asked}, kept {kept}: {waits:?}"
        );
        assert!(
            waits[1..]
                .iter()
                .all(|(attempts, due_in)| *attempts == 0 && *due_in <= 0.0),
            "the rest stay due, unattempted: {waits:?}"
        );
    }
    let audited: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT attributes->>'retry_after_seconds' FROM audit_events \
         WHERE kind = 'notification.retrying' ORDER BY id",
    )
    .fetch_all(&mut *app)
    .await
    .unwrap();
    assert_eq!(
        audited,
        [
            Some("90".to_owned()),
            Some("600".to_owned()),
            Some("1".to_owned())
        ]
    );
}

/// A receiver that takes `delay` to answer 204, and keeps every request.
struct SlowReceiver {
    delay: Duration,
    seen: Mutex<Vec<SignedNotification>>,
}

impl Webhook for SlowReceiver {
    async fn post(&self, notification: &SignedNotification) -> WebhookReply {
        self.seen.lock().unwrap().push(notification.clone());
        tokio::time::sleep(self.delay).await;
        WebhookReply::Status(204)
    }
}

/// Rows of the outbox that the dispatcher did not write (another writer of the application
/// role's tables, or a hand) are dead-lettered as `malformed` without being posted or signed:
/// one whose ids do not parse no longer fails the read of every due row, one whose template
/// is not its kind's never reaches a metric label, a log line or an audit attribute, and none
/// holds up the real notification queued behind them.
#[tokio::test]
async fn rows_written_into_the_outbox_by_hand_are_dead_lettered_unposted_and_hold_up_nothing() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    let team = uuid::Uuid::new_v4().to_string();
    // (kind, template, id in the body, team id in the body, padding bytes)
    let forged: [(&str, &str, bool, &str, i32); 6] = [
        ("provision.created", "resource_ready", true, "not-a-uuid", 0),
        (
            "provision.created",
            "x\nERROR forged line",
            true,
            team.as_str(),
            0,
        ),
        ("made.up", "made_up", true, team.as_str(), 0),
        (
            "provision.created",
            "resource_ready",
            true,
            team.as_str(),
            300 * 1024,
        ),
        (
            "provision.created",
            "resource_ready",
            false,
            team.as_str(),
            0,
        ),
        (
            "propagation.applied",
            "resource_ready",
            true,
            team.as_str(),
            0,
        ),
    ];
    for (n, (kind, template, own_id, team_id, padding)) in forged.into_iter().enumerate() {
        sqlx::query(
            "WITH e AS (SELECT gen_random_uuid() AS id) \
             INSERT INTO notification_deliveries \
               (event_id, audit_id, recorded_at, kind, template, payload) \
             SELECT e.id, -1 - $1::bigint, now(), $2, $3, jsonb_build_object( \
                 'id', CASE WHEN $4 THEN e.id ELSE gen_random_uuid() END, \
                 'type', $3, 'kind', $2, 'audit_id', -1 - $1::bigint, \
                 'team_id', $5::text, 'padding', repeat('p', $6)) FROM e",
        )
        .bind(n as i64)
        .bind(kind)
        .bind(template)
        .bind(own_id)
        .bind(team_id)
        .bind(padding)
        .execute(&mut *app)
        .await
        .unwrap();
    }
    // The forged rows are first in line; the real notification is behind them.
    let real = insert(&mut app, &sample(AuditKind::ProvisionCreated, 1))
        .await
        .unwrap()
        .0;
    ingest_all(&mut app, 1).await;
    let receiver = Recorder::answering(204);
    let done = deliver_due(&mut app, &receiver, &key(), &RetryPolicy::default(), 100)
        .await
        .expect("one bad row never fails the read of the others");
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the real notification is posted");
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body["audit_id"], real);
    let outcomes: Vec<_> = done.iter().map(|a| a.outcome).collect();
    let mut expected = vec![DeliveryOutcome::DeadLettered(FailureClass::Malformed); 6];
    expected.push(DeliveryOutcome::Delivered);
    assert_eq!(outcomes, expected);
    let templates: Vec<&str> = done.iter().map(|a| a.template.as_str()).collect();
    assert_eq!(
        templates,
        [
            "resource_ready",
            "resource_ready",
            "unknown",
            "resource_ready",
            "resource_ready",
            "tier_change_applied",
            "resource_ready"
        ],
        "labels come from the closed set, never from the row"
    );
    let dead = dead_letters(&mut app, &DeadLetterPage::newest(100))
        .await
        .unwrap();
    assert_eq!(dead.len(), 6);
    assert!(
        dead.iter()
            .all(|d| d.last_outcome.as_deref() == Some("malformed"))
    );
    assert_eq!(
        kinds_written(&mut app, AuditKind::NotificationDeadLettered)
            .await
            .len(),
        6,
        "each is audited as an operator alert"
    );
    assert!(
        deliver_due(&mut app, &receiver, &key(), &RetryPolicy::default(), 100)
            .await
            .unwrap()
            .is_empty(),
        "nothing is posted again"
    );
}

/// A queued body that another writer of the application role's tables changed afterwards (its
/// team, an attribute's value, an attribute added) is never posted nor signed: the dispatcher
/// rebuilds the body from the audit row and dead-letters any other as `malformed`; the body
/// left as queued goes out.
#[tokio::test]
async fn a_body_changed_after_it_was_queued_is_never_signed() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    let mut ids = Vec::new();
    for n in 1..=4 {
        ids.push(
            insert(&mut app, &sample(AuditKind::ProvisionCreated, n))
                .await
                .unwrap()
                .0,
        );
    }
    ingest_all(&mut app, 4).await;
    let changes = [
        "UPDATE notification_deliveries \
         SET payload = jsonb_set(payload, '{team_id}', to_jsonb(gen_random_uuid()::text)) \
         WHERE audit_id = $1",
        "UPDATE notification_deliveries \
         SET payload = jsonb_set(payload, '{attributes,tier}', '\"enterprise\"') \
         WHERE audit_id = $1",
        "UPDATE notification_deliveries \
         SET payload = jsonb_set(payload, '{attributes,extra}', '\"x\"') \
         WHERE audit_id = $1",
    ];
    for (audit_id, change) in ids.iter().zip(changes) {
        let changed = sqlx::query(change)
            .bind(audit_id)
            .execute(&mut *app)
            .await
            .unwrap();
        assert_eq!(changed.rows_affected(), 1);
    }
    let receiver = Recorder::answering(204);
    let done = deliver_due(&mut app, &receiver, &key(), &RetryPolicy::default(), 100)
        .await
        .unwrap();
    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "only the body left as queued is posted");
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body["audit_id"], ids[3]);
    assert_eq!(body["attributes"]["tier"], "pro");
    let outcomes: Vec<_> = done.iter().map(|a| a.outcome).collect();
    let mut expected = vec![DeliveryOutcome::DeadLettered(FailureClass::Malformed); 3];
    expected.push(DeliveryOutcome::Delivered);
    assert_eq!(outcomes, expected);
}

/// Dead letters nobody resolves (a malformed row comes back dead after every requeue) never hide
/// newer ones: the list is newest first, pages back by position until every dead letter was
/// listed exactly once, and filters by kind.
#[tokio::test]
async fn old_dead_letters_never_hide_newer_ones() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    let kinds = [
        "provision.created",
        "provision.created",
        "provision.created",
        "propagation.applied",
        "provision.created",
        "propagation.applied",
        "provision.created",
    ];
    let mut made = Vec::new();
    for (n, kind) in kinds.into_iter().enumerate() {
        let id: uuid::Uuid = sqlx::query_scalar(
            "INSERT INTO notification_deliveries \
               (event_id, audit_id, recorded_at, kind, template, payload, state, attempts, \
                last_outcome, dead_lettered_at) \
             VALUES (gen_random_uuid(), $1, now(), $2, 'resource_ready', '{}', 'dead', 12, \
                     'malformed', now()) \
             RETURNING event_id",
        )
        .bind(1_000 + n as i64)
        .bind(kind)
        .fetch_one(&mut *app)
        .await
        .unwrap();
        made.push((id, kind));
    }
    let newest_first: Vec<uuid::Uuid> = made.iter().rev().map(|(id, _)| *id).collect();
    let first = dead_letters(&mut app, &DeadLetterPage::newest(3))
        .await
        .unwrap();
    let ids = |page: &[keel_audit::notify::DeadLetter]| -> Vec<uuid::Uuid> {
        page.iter().map(|d| d.event_id).collect()
    };
    assert_eq!(
        ids(&first),
        newest_first[..3],
        "the newest dead letters come first, whatever older ones are still there"
    );
    let mut listed = ids(&first);
    let mut before = first.last().map(|d| d.seq);
    while let Some(position) = before {
        let page = dead_letters(
            &mut app,
            &DeadLetterPage {
                before: Some(position),
                kind: None,
                limit: 3,
            },
        )
        .await
        .unwrap();
        listed.extend(ids(&page));
        before = (page.len() == 3).then(|| page[2].seq);
    }
    assert_eq!(listed, newest_first, "paging back lists each one once");
    let applied = dead_letters(
        &mut app,
        &DeadLetterPage {
            before: None,
            kind: Some(AuditKind::PropagationApplied),
            limit: 10,
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&applied), [made[5].0, made[3].0]);
}

/// Deliveries go one after another: each request is signed with the time it is sent, so a
/// receiver that refuses stale timestamps does not refuse the end of a batch behind a slow
/// receiver.
#[tokio::test]
async fn each_request_is_signed_when_it_is_sent_not_when_its_batch_was_read() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    for n in 0..3 {
        insert(&mut app, &sample(AuditKind::ProvisionCreated, n))
            .await
            .unwrap();
    }
    ingest_all(&mut app, 3).await;
    let receiver = SlowReceiver {
        delay: Duration::from_millis(1100),
        seen: Mutex::new(Vec::new()),
    };
    let done = deliver_due(&mut app, &receiver, &key(), &RetryPolicy::default(), 100)
        .await
        .unwrap();
    assert_eq!(done.len(), 3);
    let seen = receiver.seen.lock().unwrap().clone();
    for request in &seen {
        assert!(key().verify(request.timestamp, &request.body, &request.signature));
    }
    let stamps: Vec<i64> = seen.iter().map(|r| r.timestamp).collect();
    assert!(
        stamps[2] - stamps[0] >= 2,
        "the third request, sent over 2 s after the first, is signed later: {stamps:?}"
    );
}
