//! Customer notifications (feature `postgres`): the dispatcher that delivers every
//! [`Consumer::CustomerNotification`] kind to a webhook, at least once, with a stable event id
//! and an HMAC-SHA256 signature.
//!
//! - [`ingest`] reads the trail in commit order from a durable cursor (`notification_cursor`,
//!   through [`fetch_committed_after`], so a row that commits late is never skipped) and queues
//!   one row per customer notification in `notification_deliveries`, minting its event id, in
//!   the same transaction that moves the cursor: a crash re-reads, never loses, and never mints a
//!   second id for the same audit row.
//! - [`deliver_due`] posts each due delivery through the [`Webhook`] port as JSON with the
//!   headers [`EVENT_ID_HEADER`], [`TIMESTAMP_HEADER`] and [`SIGNATURE_HEADER`]
//!   (`v1=<hex HMAC-SHA256 over "<timestamp>.<body>">`), then records the outcome in one
//!   transaction with its audit row: `notification.delivered`, `notification.retrying` (the
//!   next attempt after an exponential backoff with jitter, from the database's clock) or, after
//!   the last attempt, `notification.dead_lettered` (an operator alert). A dispatcher killed
//!   between the post and the record posts again: receivers deduplicate on the event id.
//! - [`dead_letters`] lists the dead-lettered deliveries and [`requeue`] re-arms one
//!   (`notification.requeued`).
//! - [`try_lock`] makes the dispatcher single-flight across replicas (a session advisory lock,
//!   released when the holder's connection ends, a SIGKILL included).
//!
//! Neither the webhook URL nor the signing key reaches a row, an audit attribute or an error.

use std::time::Duration;

use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;
use sqlx::{Acquire as _, PgConnection};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::event::{Actor, AuditEvent};
use crate::ids::{ResourceId, TeamId};
use crate::kind::{AuditKind, Consumer};
use crate::postgres::{AuditRow, CommitCursor, StoredAuditEvent, fetch_committed_after, insert};
use crate::sink::AuditSinkError;

type HmacSha256 = Hmac<Sha256>;

/// The kinds this dispatcher delivers: every [`Consumer::CustomerNotification`] kind (a test
/// keeps the list complete).
pub const DISPATCHED_KINDS: &[AuditKind] = &[
    AuditKind::PropagationApplied,
    AuditKind::ProvisionCreated,
    AuditKind::ResourceDeprovisioned,
    AuditKind::ApiKeyCreated,
    AuditKind::ApiKeyRevoked,
    AuditKind::ResourceCredentialsRotated,
];

/// The request header carrying the notification's event id (stable across retries).
pub const EVENT_ID_HEADER: &str = "keel-event-id";
/// The request header carrying the signing time, in Unix seconds.
pub const TIMESTAMP_HEADER: &str = "keel-timestamp";
/// The request header carrying `v1=<hex HMAC-SHA256(key, "<timestamp>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "keel-signature";

/// The name of the dispatcher's cursor in `notification_cursor`.
const CURSOR: &str = "customer-notifications";

/// The key notifications are signed with (HMAC-SHA256), shared with the receivers. Its bytes
/// never reach a log, a row or an error.
#[derive(Clone)]
pub struct NotifyKey {
    secret: Vec<u8>,
}

impl std::fmt::Debug for NotifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifyKey(<redacted>)")
    }
}

/// A signing key shorter than 32 bytes.
#[derive(Debug, thiserror::Error)]
#[error("a notification signing key needs at least 32 bytes (the key is not shown)")]
pub struct InvalidNotifyKey;

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

impl NotifyKey {
    /// A key of at least 32 bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, InvalidNotifyKey> {
        let secret = secret.into();
        if secret.len() < 32 {
            return Err(InvalidNotifyKey);
        }
        Ok(Self { secret })
    }

    fn mac(&self, timestamp: i64, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The [`SIGNATURE_HEADER`] value for `body` signed at `timestamp` (Unix seconds).
    pub fn sign(&self, timestamp: i64, body: &[u8]) -> String {
        format!(
            "v1={}",
            hex(&self.mac(timestamp, body).finalize().into_bytes())
        )
    }

    /// Whether `signature` (a [`SIGNATURE_HEADER`] value) signs `body` at `timestamp`, compared
    /// in constant time. A receiver should also refuse timestamps far from its own clock.
    pub fn verify(&self, timestamp: i64, body: &[u8], signature: &str) -> bool {
        let Some(hex_sig) = signature.strip_prefix("v1=") else {
            return false;
        };
        if hex_sig.len() % 2 != 0 || !hex_sig.is_ascii() {
            return false;
        }
        let mut bytes = Vec::with_capacity(hex_sig.len() / 2);
        for pair in hex_sig.as_bytes().chunks(2) {
            let Some(Ok(b)) = std::str::from_utf8(pair)
                .ok()
                .map(|p| u8::from_str_radix(p, 16))
            else {
                return false;
            };
            bytes.push(b);
        }
        self.mac(timestamp, body).verify_slice(&bytes).is_ok()
    }
}

/// One signed request for the [`Webhook`]: a JSON body and the values of its headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedNotification {
    /// The event id ([`EVENT_ID_HEADER`]), the same on every attempt.
    pub event_id: Uuid,
    /// Signing time in Unix seconds ([`TIMESTAMP_HEADER`]): the database's clock when the
    /// batch was read, plus the time since, so each request carries the time it is sent.
    pub timestamp: i64,
    /// The [`SIGNATURE_HEADER`] value.
    pub signature: String,
    /// The JSON body: `id`, `type` (the template), `kind`, `audit_id`, `occurred_at`,
    /// `recorded_at`, `team_id`, `resource_id`, `request_id`, `attributes`.
    pub body: Vec<u8>,
}

/// What the receiver did with one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookReply {
    /// It answered with this HTTP status (2xx is a delivery, anything else a failure).
    Status(u16),
    /// It answered `status` (429 or 503) with a `Retry-After`: a failure of that status's
    /// class, and a request to send nothing before `retry_after` has passed. The delivery is
    /// due again then (no sooner than the policy's backoff for the attempt, at most its longest
    /// backoff), and the batch stops there.
    Throttled {
        /// The HTTP status.
        status: u16,
        /// How long the receiver asked to be left alone.
        retry_after: Duration,
    },
    /// No answer: the connection failed, timed out or broke.
    Unreachable(Unreachable),
}

/// Why a receiver gave no answer (a closed set: it is a metric label and an audit attribute).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unreachable {
    /// The connection (or TLS handshake) could not be made.
    Connect,
    /// No complete answer within the timeout.
    Timeout,
    /// The connection broke mid-request.
    Io,
}

/// The port the dispatcher posts through; the binary's adapter speaks HTTP(S).
pub trait Webhook {
    /// Posts one notification. Never returns the URL or the key in what it reports.
    fn post(
        &self,
        notification: &SignedNotification,
    ) -> impl std::future::Future<Output = WebhookReply> + Send;
}

/// How a failed attempt is classified (a closed set, for metric labels and audit attributes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The receiver answered 4xx.
    Status4xx,
    /// The receiver answered 5xx.
    Status5xx,
    /// The receiver answered 1xx or 3xx.
    StatusOther,
    /// See [`Unreachable::Connect`].
    Connect,
    /// See [`Unreachable::Timeout`].
    Timeout,
    /// See [`Unreachable::Io`].
    Io,
    /// The queued notification is not one the dispatcher could have queued: its kind is not
    /// a dispatched one, its template not that kind's, its payload over
    /// [`MAX_PAYLOAD_BYTES`] or not the JSON [`ingest`] writes for that row. It is
    /// dead-lettered at once and never posted, so a row written into the outbox by hand is
    /// neither signed nor allowed to hold up the rows behind it.
    Malformed,
}

impl FailureClass {
    /// The stable label.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureClass::Status4xx => "status_4xx",
            FailureClass::Status5xx => "status_5xx",
            FailureClass::StatusOther => "status_other",
            FailureClass::Connect => "connect",
            FailureClass::Timeout => "timeout",
            FailureClass::Io => "io",
            FailureClass::Malformed => "malformed",
        }
    }

    fn of(reply: WebhookReply) -> Option<(Self, Option<u16>)> {
        match reply {
            // A throttle is never a delivery, whatever status came with it.
            WebhookReply::Throttled { status, .. } => {
                Self::of(WebhookReply::Status(status)).or(Some((Self::StatusOther, Some(status))))
            }
            WebhookReply::Status(status) if (200..300).contains(&status) => None,
            WebhookReply::Status(status) if (400..500).contains(&status) => {
                Some((FailureClass::Status4xx, Some(status)))
            }
            WebhookReply::Status(status) if (500..600).contains(&status) => {
                Some((FailureClass::Status5xx, Some(status)))
            }
            WebhookReply::Status(status) => Some((FailureClass::StatusOther, Some(status))),
            WebhookReply::Unreachable(Unreachable::Connect) => Some((FailureClass::Connect, None)),
            WebhookReply::Unreachable(Unreachable::Timeout) => Some((FailureClass::Timeout, None)),
            WebhookReply::Unreachable(Unreachable::Io) => Some((FailureClass::Io, None)),
        }
    }
}

/// Retry policy: attempt `n` (from 1) that fails waits `min(max_backoff, base_backoff·2^(n-1))`
/// scaled by a random factor in [0.5, 1) before the next; after `max_attempts` failures the
/// delivery is dead-lettered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before dead-lettering (at least 1).
    pub max_attempts: u32,
    /// The first backoff.
    pub base_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 12,
            base_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// The backoff after failed attempt `attempt` (from 1), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
        self.base_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// What one [`ingest`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Audit rows read past the cursor.
    pub read: u64,
    /// Customer notifications queued.
    pub queued: u64,
    /// Rows this build cannot read (a kind a newer release wrote); skipped, and counted.
    pub unreadable: u64,
    /// The `audit_events.id` of the first of them, where the notification cursor must go back
    /// to (just before it) for a build that reads them to queue them.
    pub first_unreadable: Option<i64>,
}

fn store(operation: &'static str) -> impl FnOnce(sqlx::Error) -> AuditSinkError {
    move |e| AuditSinkError::store(operation, e)
}

fn template_of(kind: AuditKind) -> Option<&'static str> {
    match kind.consumer() {
        Consumer::CustomerNotification { template } if DISPATCHED_KINDS.contains(&kind) => {
            Some(template)
        }
        Consumer::CustomerNotification { .. }
        | Consumer::OperatorAlert { .. }
        | Consumer::PropagationWiring { .. }
        | Consumer::IntentionallyNone { .. } => None,
    }
}

/// The dispatcher's single-flight lock.
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock(hashtext('keel-audit-notify'))";

/// Takes the dispatcher's single-flight lock on this session; `false` when another dispatcher
/// holds it. Held until the connection closes (or the process dies): keep `conn` for the
/// dispatcher's lifetime.
/// Behind a transaction-pooling proxy the lock is not the session's own: check with
/// [`lock_is_shared`] after taking it.
pub async fn try_lock(conn: &mut PgConnection) -> Result<bool, AuditSinkError> {
    use sqlx::Row as _;
    // The simple protocol, which every pooler passes, so that [`lock_is_shared`] can tell.
    sqlx::raw_sql(TRY_LOCK)
        .fetch_one(conn)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(store("take the notification dispatcher lock"))
}

/// Whether the lock [`try_lock`] took is not its session's own: a new connection made with
/// `options` reaches a server backend that holds it. That happens behind a transaction-pooling
/// proxy (PgBouncer's `pool_mode = transaction`), which hands the server connection the lock was
/// taken on to other clients between transactions (PgBouncer does so with an idle pool). There
/// the lock neither keeps a second dispatcher out (one reaching another backend takes it too,
/// and both post every notification) nor ends with this process (the backend keeps it). The
/// probe tries for the lock itself: a session of its own (a direct connection, a session-mode
/// pool) is refused while the dispatcher holds it, and a backend that holds it already is
/// granted it again. When it is shared, both holds are released there, in the same statement.
/// A `true` proves the lock is shared; a `false` cannot prove there is no pooler, as a busy pool
/// may hand the probe another backend. The statement uses the simple protocol, which every
/// pooler passes.
pub async fn lock_is_shared(
    options: &sqlx::postgres::PgConnectOptions,
) -> Result<bool, AuditSinkError> {
    use sqlx::{Connection as _, Row as _};
    let fail = |e| AuditSinkError::store("probe for a transaction-pooling proxy", e);
    let mut probe = PgConnection::connect_with(options).await.map_err(fail)?;
    let shared: Result<bool, sqlx::Error> = sqlx::raw_sql(PROBE_LOCK)
        .fetch_one(&mut probe)
        .await
        .and_then(|row| row.try_get(0));
    let _ = probe.close().await;
    shared.map_err(fail)
}

/// [`lock_is_shared`]'s probe: granted the lock only where it is held already, and then releases
/// that hold and the one before it.
const PROBE_LOCK: &str = "WITH probe AS MATERIALIZED \
       (SELECT pg_try_advisory_lock(hashtext('keel-audit-notify')) AS shared) \
     SELECT shared, \
            CASE WHEN shared THEN pg_advisory_unlock(hashtext('keel-audit-notify')) END, \
            CASE WHEN shared THEN pg_advisory_unlock(hashtext('keel-audit-notify')) END \
       FROM probe";

/// Reads up to `limit` audit rows past the cursor, in commit order, and queues the customer
/// notifications among them; moves the cursor in the same transaction.
pub async fn ingest(conn: &mut PgConnection, limit: u32) -> Result<Ingested, AuditSinkError> {
    let mut tx = conn.begin().await.map_err(store("begin ingesting"))?;
    let cursor: Option<(i64, i64)> =
        sqlx::query_as("SELECT txid, audit_id FROM notification_cursor WHERE name = $1 FOR UPDATE")
            .bind(CURSOR)
            .fetch_optional(&mut *tx)
            .await
            .map_err(store("read the notification cursor"))?;
    let cursor = cursor.map_or(CommitCursor::START, |(txid, id)| CommitCursor { txid, id });
    let (rows, next) = fetch_committed_after(&mut tx, cursor, limit).await?;
    let mut done = Ingested::default();
    for row in rows {
        done.read += 1;
        let stored = match row {
            Ok(stored) => stored,
            Err(e) => {
                // Named, so an operator can queue it again once a build that reads it runs
                // (see the KeelNotificationRowsSkipped runbook).
                if done.first_unreadable.is_none() {
                    done.first_unreadable = e.corrupt_row().map(|id| id.0);
                }
                done.unreadable += 1;
                continue;
            }
        };
        let event = &stored.event;
        let Some(template) = template_of(event.kind()) else {
            continue;
        };
        let event_id = Uuid::new_v4();
        let payload = notification_body(&stored, event_id, template)?;
        let inserted = sqlx::query(
            "INSERT INTO notification_deliveries \
               (event_id, audit_id, recorded_at, kind, template, payload) \
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb) \
             ON CONFLICT (audit_id) DO NOTHING",
        )
        .bind(event_id)
        .bind(stored.id.0)
        .bind(stored.recorded_at)
        .bind(event.kind().as_str())
        .bind(template)
        .bind(payload.to_string())
        .execute(&mut *tx)
        .await
        .map_err(store("queue a customer notification"))?;
        done.queued += inserted.rows_affected();
    }
    if next != cursor {
        sqlx::query(
            "INSERT INTO notification_cursor (name, txid, audit_id) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE \
             SET txid = EXCLUDED.txid, audit_id = EXCLUDED.audit_id, updated_at = now()",
        )
        .bind(CURSOR)
        .bind(next.txid)
        .bind(next.id)
        .execute(&mut *tx)
        .await
        .map_err(store("move the notification cursor"))?;
    }
    tx.commit().await.map_err(store("commit ingesting"))?;
    Ok(done)
}

/// The body [`ingest`] queues for the audit row `stored` under the notification id `event_id`:
/// the one the dispatcher posts, and the one it rebuilds from the row to check what it is about
/// to sign.
fn notification_body(
    stored: &StoredAuditEvent,
    event_id: Uuid,
    template: &str,
) -> Result<serde_json::Value, AuditSinkError> {
    let event = &stored.event;
    let attributes: serde_json::Map<String, serde_json::Value> = event
        .attributes()
        .iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v.to_owned())))
        .collect();
    let format = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| AuditSinkError::store("format a notification time", e))
    };
    Ok(serde_json::json!({
        "id": event_id,
        "type": template,
        "kind": event.kind().as_str(),
        "audit_id": stored.id.0,
        "occurred_at": format(event.occurred_at())?,
        "recorded_at": format(stored.recorded_at)?,
        "team_id": event.team_id().map(|t| t.as_uuid()),
        "resource_id": event.resource_id().map(|r| r.as_uuid()),
        "request_id": event.request_id().map(|r| r.as_str()),
        "attributes": attributes,
    }))
}

/// The outcome of one delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// The attempt failed; the delivery retries after a backoff.
    Retrying(FailureClass),
    /// The last attempt failed; the delivery is dead-lettered.
    DeadLettered(FailureClass),
}

/// One delivery attempt made by [`deliver_due`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The notification's event id.
    pub event_id: Uuid,
    /// Its customer-notification template, from the closed set the dispatched kinds declare
    /// (`unknown` for a [`FailureClass::Malformed`] row whose kind is not a dispatched one).
    pub template: String,
    /// What happened.
    pub outcome: DeliveryOutcome,
    /// The wait after a receiver asked for one ([`WebhookReply::Throttled`]): what it asked,
    /// but no less than the policy's backoff for the attempt and no more than its longest
    /// backoff. The delivery is due again after it, and no other delivery of the batch was
    /// attempted after this one.
    pub retry_after: Option<Duration>,
}

/// The largest payload [`deliver_due`] posts, in bytes of its JSON text. What [`ingest`] queues
/// is a few kilobytes (an audit row's attributes are bounded); anything larger was written by
/// hand and is dead-lettered as [`FailureClass::Malformed`] without being read whole.
pub const MAX_PAYLOAD_BYTES: i32 = 256 * 1024;

/// A due row as stored: every column another writer could have filled is read as text and
/// checked here, so one bad row never fails the statement that reads the others.
#[derive(sqlx::FromRow)]
struct DueRow {
    event_id: Uuid,
    audit_id: i64,
    recorded_at: OffsetDateTime,
    kind: String,
    template: String,
    payload: Option<String>,
    attempts: i32,
    team_id: Option<String>,
    resource_id: Option<String>,
    now: OffsetDateTime,
}

/// A due row, checked.
struct Due {
    event_id: Uuid,
    audit_id: i64,
    /// The template of the row's kind, from the closed set (`"unknown"` for a kind that is not
    /// dispatched): it is a metric label and an audit attribute.
    template: &'static str,
    /// The body to post; `None` when the row is malformed.
    payload: Option<String>,
    attempts: i32,
    team_id: Option<Uuid>,
    resource_id: Option<Uuid>,
    now: OffsetDateTime,
}

impl DueRow {
    /// The row checked against `source`, the audit row it names as read now (`None` when it is
    /// not in the table, or does not decode): only the very body [`ingest`] queues for that row
    /// is posted.
    fn checked(self, source: Option<&StoredAuditEvent>) -> Due {
        let kind = self
            .kind
            .parse::<AuditKind>()
            .ok()
            .and_then(|kind| template_of(kind).map(|template| (kind, template)));
        let parse_id = |id: Option<&str>| match id {
            None => Ok(None),
            Some(id) => Uuid::parse_str(id).map(Some),
        };
        let (team_id, resource_id) = (
            parse_id(self.team_id.as_deref()),
            parse_id(self.resource_id.as_deref()),
        );
        let payload = match (kind, self.payload, &team_id, &resource_id) {
            (Some((kind, template)), Some(payload), Ok(_), Ok(_))
                if template == self.template
                    && written_by_ingest(
                        &payload,
                        self.event_id,
                        self.audit_id,
                        kind,
                        template,
                        source,
                    ) =>
            {
                Some(payload)
            }
            _ => None,
        };
        Due {
            event_id: self.event_id,
            audit_id: self.audit_id,
            template: kind.map_or("unknown", |(_, template)| template),
            payload,
            attempts: self.attempts,
            team_id: team_id.ok().flatten(),
            resource_id: resource_id.ok().flatten(),
            now: self.now,
        }
    }
}

/// Whether `payload` is the JSON object [`ingest`] queues for this row: its `id`, `type`,
/// `kind` and `audit_id` name the row's own, and the whole of it is the body rebuilt from the
/// audit row `source` (so a team, a tier or an attribute changed after it was queued is never
/// signed).
fn written_by_ingest(
    payload: &str,
    event_id: Uuid,
    audit_id: i64,
    kind: AuditKind,
    template: &str,
    source: Option<&StoredAuditEvent>,
) -> bool {
    let Ok(queued) = serde_json::from_str::<serde_json::Value>(payload) else {
        return false;
    };
    let serde_json::Value::Object(body) = &queued else {
        return false;
    };
    body.get("id").and_then(serde_json::Value::as_str) == Some(event_id.to_string().as_str())
        && body.get("type").and_then(serde_json::Value::as_str) == Some(template)
        && body.get("kind").and_then(serde_json::Value::as_str) == Some(kind.as_str())
        && body.get("audit_id").and_then(serde_json::Value::as_i64) == Some(audit_id)
        && source.is_some_and(|source| {
            source.id.0 == audit_id
                && notification_body(source, event_id, template)
                    .is_ok_and(|rebuilt| rebuilt == queued)
        })
}

/// Posts up to `limit` due deliveries (oldest first, in commit order) and records each
/// outcome with its audit row. Attempts are sequential; a failure never stops the batch, except
/// a receiver that asks to be left alone ([`WebhookReply::Throttled`]): its delivery is due
/// again after the wait it asked for, and the rest of the batch is left due, unattempted, so
/// the caller can pause for [`Attempt::retry_after`].
///
/// An error recording one attempt ends the batch and answers the error alone: the attempts
/// recorded before it are committed (a dead letter among them is no longer due, so no later
/// batch reports it again) but not answered. A caller that counts or alerts on them uses
/// [`deliver_due_each`], which hands each attempt over as soon as it is recorded.
pub async fn deliver_due(
    conn: &mut PgConnection,
    webhook: &impl Webhook,
    key: &NotifyKey,
    policy: &RetryPolicy,
    limit: u32,
) -> Result<Vec<Attempt>, AuditSinkError> {
    let mut attempts = Vec::new();
    deliver_due_each(conn, webhook, key, policy, limit, |attempt| {
        attempts.push(attempt);
    })
    .await?;
    Ok(attempts)
}

/// [`deliver_due`], handing each attempt to `recorded` as soon as its outcome and audit row are
/// committed, so an error recording a later attempt of the batch never loses an earlier one
/// (a dead letter whose alert counts it, say).
pub async fn deliver_due_each(
    conn: &mut PgConnection,
    webhook: &impl Webhook,
    key: &NotifyKey,
    policy: &RetryPolicy,
    limit: u32,
    mut recorded: impl FnMut(Attempt),
) -> Result<(), AuditSinkError> {
    let due: Vec<DueRow> = sqlx::query_as(
        "SELECT event_id, audit_id, recorded_at, kind, template, \
                CASE WHEN octet_length(payload::text) <= $2 THEN payload::text END AS payload, \
                attempts, payload->>'team_id' AS team_id, \
                payload->>'resource_id' AS resource_id, now() AS now \
         FROM notification_deliveries \
         WHERE state = 'pending' AND next_attempt_at <= now() \
         ORDER BY seq LIMIT $1",
    )
    .bind(i64::from(limit))
    .bind(MAX_PAYLOAD_BYTES)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| AuditSinkError::read("read due notifications", e))?;
    // Requests go one after another, each up to the webhook's timeout: each is signed at the
    // moment it is sent (the database's clock when the batch was read, plus the time since),
    // so a receiver that refuses stale timestamps never refuses the end of a slow batch.
    let read_at = std::time::Instant::now();
    if due.is_empty() {
        return Ok(());
    }
    let sources = audit_rows_of(&mut *conn, &due).await?;
    for row in due {
        let source = sources.get(&row.audit_id);
        let row = row.checked(source);
        let attempt = u32::try_from(row.attempts).unwrap_or(0).saturating_add(1);
        let mut wait = None;
        let (outcome, status) = match &row.payload {
            Some(payload) => {
                let elapsed = i64::try_from(read_at.elapsed().as_secs()).unwrap_or(i64::MAX);
                let timestamp = row.now.unix_timestamp().saturating_add(elapsed);
                let body = payload.clone().into_bytes();
                let request = SignedNotification {
                    event_id: row.event_id,
                    timestamp,
                    signature: key.sign(timestamp, &body),
                    body,
                };
                let reply = webhook.post(&request).await;
                if let WebhookReply::Throttled { retry_after, .. } = reply {
                    // Never sooner than asked, nor than the policy's own backoff (a receiver
                    // answering `Retry-After: 0` must not spend the attempts in a burst), nor
                    // later than the policy's longest backoff.
                    wait = Some(
                        retry_after
                            .max(policy.backoff(attempt))
                            .min(policy.max_backoff),
                    );
                }
                let outcome = match FailureClass::of(reply) {
                    None => DeliveryOutcome::Delivered,
                    Some((class, _)) if attempt >= policy.max_attempts.max(1) => {
                        DeliveryOutcome::DeadLettered(class)
                    }
                    Some((class, _)) => DeliveryOutcome::Retrying(class),
                };
                let status = match reply {
                    WebhookReply::Status(status) | WebhookReply::Throttled { status, .. } => {
                        Some(status)
                    }
                    WebhookReply::Unreachable(_) => None,
                };
                (outcome, status)
            }
            None => (DeliveryOutcome::DeadLettered(FailureClass::Malformed), None),
        };
        record(conn, &row, attempt, outcome, status, wait, policy).await?;
        recorded(Attempt {
            event_id: row.event_id,
            template: row.template.to_owned(),
            outcome,
            retry_after: wait,
        });
        if wait.is_some() {
            break;
        }
    }
    Ok(())
}

/// The audit rows `due` names, by id, as they read now: each row is looked up by its id and the
/// time it was recorded (the table's key). A row that does not decode is left out, so its
/// notification is not posted.
async fn audit_rows_of(
    conn: &mut PgConnection,
    due: &[DueRow],
) -> Result<std::collections::HashMap<i64, StoredAuditEvent>, AuditSinkError> {
    let (ids, times): (Vec<i64>, Vec<OffsetDateTime>) = due
        .iter()
        .map(|row| (row.audit_id, row.recorded_at))
        .unzip();
    let rows: Vec<AuditRow> = sqlx::query_as(
        "SELECT a.id, a.kind, a.actor, a.team_id, a.resource_id, a.request_id, a.attributes, \
                a.occurred_at, a.recorded_at \
         FROM unnest($1::int8[], $2::timestamptz[]) AS k(id, recorded_at) \
         JOIN audit_events a ON a.id = k.id AND a.recorded_at = k.recorded_at",
    )
    .bind(ids)
    .bind(times)
    .fetch_all(&mut *conn)
    .await
    .map_err(|e| AuditSinkError::read("read the audit rows of due notifications", e))?;
    Ok(rows
        .into_iter()
        .filter_map(|row| row.into_domain().ok())
        .map(|stored| (stored.id.0, stored))
        .collect())
}

async fn record(
    conn: &mut PgConnection,
    row: &Due,
    attempt: u32,
    outcome: DeliveryOutcome,
    status: Option<u16>,
    wait: Option<Duration>,
    policy: &RetryPolicy,
) -> Result<(), AuditSinkError> {
    let mut tx = conn
        .begin()
        .await
        .map_err(store("begin recording a delivery"))?;
    let (kind, last_outcome) = match outcome {
        DeliveryOutcome::Delivered => (AuditKind::NotificationDelivered, "delivered"),
        DeliveryOutcome::Retrying(class) => (AuditKind::NotificationRetrying, class.as_str()),
        DeliveryOutcome::DeadLettered(class) => {
            (AuditKind::NotificationDeadLettered, class.as_str())
        }
    };
    let sql = match outcome {
        DeliveryOutcome::Delivered => {
            "UPDATE notification_deliveries \
             SET state = 'delivered', attempts = $2, delivered_at = now(), last_outcome = $3 \
             WHERE event_id = $1 AND state = 'pending'"
        }
        // The receiver named its wait: exactly that, no jitter below it.
        DeliveryOutcome::Retrying(_) if wait.is_some() => {
            "UPDATE notification_deliveries \
             SET attempts = $2, last_outcome = $3, \
                 next_attempt_at = now() + make_interval(secs => $4) \
             WHERE event_id = $1 AND state = 'pending'"
        }
        DeliveryOutcome::Retrying(_) => {
            "UPDATE notification_deliveries \
             SET attempts = $2, last_outcome = $3, \
                 next_attempt_at = now() + make_interval(secs => $4 * (0.5 + random() / 2)) \
             WHERE event_id = $1 AND state = 'pending'"
        }
        DeliveryOutcome::DeadLettered(_) => {
            "UPDATE notification_deliveries \
             SET state = 'dead', attempts = $2, last_outcome = $3, dead_lettered_at = now() \
             WHERE event_id = $1 AND state = 'pending'"
        }
    };
    let updated = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(row.event_id)
        .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
        .bind(last_outcome)
        .bind(
            wait.unwrap_or_else(|| policy.backoff(attempt))
                .as_secs_f64(),
        )
        .execute(&mut *tx)
        .await
        .map_err(store("record a delivery"))?;
    if updated.rows_affected() != 1 {
        // Requeued or changed under us (only an operator can): record nothing for this attempt.
        return Ok(());
    }
    let mut event = AuditEvent::new(kind, Actor::system(), row.now)
        .attr("event_id", row.event_id.to_string())
        .and_then(|e| e.attr("template", row.template))
        .and_then(|e| e.attr("source_audit_id", row.audit_id.to_string()))
        .and_then(|e| e.attr("attempt", attempt.to_string()))
        .and_then(|e| e.attr("outcome", last_outcome))
        .map_err(|e| AuditSinkError::store("describe a delivery", e))?;
    if let Some(status) = status {
        event = event
            .attr("http_status", status.to_string())
            .map_err(|e| AuditSinkError::store("describe a delivery", e))?;
    }
    if let Some(wait) = wait {
        event = event
            .attr("retry_after_seconds", wait.as_secs().to_string())
            .map_err(|e| AuditSinkError::store("describe a delivery", e))?;
    }
    if let Some(team) = row.team_id {
        event = event.team(TeamId::from_uuid(team));
    }
    if let Some(resource) = row.resource_id {
        event = event.resource(ResourceId::from_uuid(resource));
    }
    insert(&mut tx, &event).await?;
    tx.commit().await.map_err(store("commit a delivery"))
}

/// A dead-lettered delivery, as [`dead_letters`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct DeadLetter {
    /// Its position: the order notifications were taken from the trail (commit order). The
    /// list is newest first; [`DeadLetterPage::before`] pages back from a position.
    pub seq: i64,
    /// The notification's event id.
    pub event_id: Uuid,
    /// The audit row it carries.
    pub audit_id: i64,
    /// The audit kind's wire name.
    pub kind: String,
    /// The template.
    pub template: String,
    /// Attempts made.
    pub attempts: i32,
    /// The last failure's class ([`FailureClass::as_str`]).
    pub last_outcome: Option<String>,
    /// When it was dead-lettered.
    pub dead_lettered_at: Option<OffsetDateTime>,
}

/// Which dead letters [`dead_letters`] lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterPage {
    /// Only those before this position (the last [`DeadLetter::seq`] of the page before), so
    /// every dead letter can be reached however many there are.
    pub before: Option<i64>,
    /// Only this audit kind.
    pub kind: Option<AuditKind>,
    /// At most this many.
    pub limit: u32,
}

impl DeadLetterPage {
    /// The newest `limit` dead letters, of every kind.
    pub fn newest(limit: u32) -> Self {
        Self {
            before: None,
            kind: None,
            limit,
        }
    }
}

/// Dead-lettered deliveries, newest first (by position), as `page` asks. Dead letters nobody
/// resolves never hide newer ones: the newest come first, and `page.before` reaches the rest.
pub async fn dead_letters(
    conn: &mut PgConnection,
    page: &DeadLetterPage,
) -> Result<Vec<DeadLetter>, AuditSinkError> {
    sqlx::query_as(
        "SELECT seq, event_id, audit_id, kind, template, attempts, last_outcome, dead_lettered_at \
         FROM notification_deliveries \
         WHERE state = 'dead' AND ($1::int8 IS NULL OR seq < $1) AND ($2::text IS NULL OR kind = $2) \
         ORDER BY seq DESC LIMIT $3",
    )
    .bind(page.before)
    .bind(page.kind.map(AuditKind::as_str))
    .bind(i64::from(page.limit))
    .fetch_all(conn)
    .await
    .map_err(|e| AuditSinkError::read("read dead-lettered notifications", e))
}

/// What a requeue reads back: template, audit id, team, resource, the database's now.
type Requeued = (String, i64, Option<Uuid>, Option<Uuid>, OffsetDateTime);

/// Re-arms a dead-lettered delivery (attempts from zero, due now) under the same event id, and
/// audits `notification.requeued` by `actor`. `false` when no dead delivery has that id.
pub async fn requeue(
    conn: &mut PgConnection,
    event_id: Uuid,
    actor: &Actor,
) -> Result<bool, AuditSinkError> {
    let mut tx = conn.begin().await.map_err(store("begin requeueing"))?;
    let row: Option<Requeued> = sqlx::query_as(
        "UPDATE notification_deliveries \
         SET state = 'pending', attempts = 0, next_attempt_at = now(), dead_lettered_at = NULL \
         WHERE event_id = $1 AND state = 'dead' \
         RETURNING template, audit_id, (payload->>'team_id')::uuid, \
                   (payload->>'resource_id')::uuid, now()",
    )
    .bind(event_id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(store("requeue a notification"))?;
    let Some((template, audit_id, team, resource, now)) = row else {
        return Ok(false);
    };
    let mut event = AuditEvent::new(AuditKind::NotificationRequeued, actor.clone(), now)
        .attr("event_id", event_id.to_string())
        .and_then(|e| e.attr("template", template))
        .and_then(|e| e.attr("source_audit_id", audit_id.to_string()))
        .map_err(|e| AuditSinkError::store("describe a requeue", e))?;
    if let Some(team) = team {
        event = event.team(TeamId::from_uuid(team));
    }
    if let Some(resource) = resource {
        event = event.resource(ResourceId::from_uuid(resource));
    }
    insert(&mut tx, &event).await?;
    tx.commit().await.map_err(store("commit a requeue"))?;
    Ok(true)
}

/// The dispatcher's backlog, for its gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Backlog {
    /// Deliveries not yet delivered (nor dead-lettered).
    pub pending: i64,
    /// Dead-lettered deliveries.
    pub dead: i64,
    /// Seconds since the oldest pending delivery's audit row was recorded (0 when none).
    pub lag_seconds: f64,
}

/// Reads the backlog (the database's clock).
pub async fn backlog(conn: &mut PgConnection) -> Result<Backlog, AuditSinkError> {
    let (pending, dead, lag_seconds): (i64, i64, f64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE state = 'pending'), \
                count(*) FILTER (WHERE state = 'dead'), \
                coalesce(extract(epoch FROM now() - min(recorded_at) \
                         FILTER (WHERE state = 'pending'))::float8, 0) \
         FROM notification_deliveries WHERE state <> 'delivered'",
    )
    .fetch_one(conn)
    .await
    .map_err(|e| AuditSinkError::read("read the notification backlog", e))?;
    Ok(Backlog {
        pending,
        dead,
        lag_seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_body_and_timestamp_only() {
        let key = NotifyKey::new(*b"0123456789abcdef0123456789abcdef").unwrap();
        let sig = key.sign(1_700_000_000, b"{\"id\":1}");
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64, "{sig}");
        assert!(key.verify(1_700_000_000, b"{\"id\":1}", &sig));
        assert!(!key.verify(1_700_000_001, b"{\"id\":1}", &sig));
        assert!(!key.verify(1_700_000_000, b"{\"id\":2}", &sig));
        assert!(!key.verify(1_700_000_000, b"{\"id\":1}", "v1=zz"));
        let other = NotifyKey::new(*b"fedcba9876543210fedcba9876543210").unwrap();
        assert!(!other.verify(1_700_000_000, b"{\"id\":1}", &sig));
    }

    #[test]
    fn a_short_key_is_refused_and_a_key_never_prints() {
        assert!(NotifyKey::new(b"short".to_vec()).is_err());
        let key = NotifyKey::new(b"a secret signing key of 32 bytes!".to_vec()).unwrap();
        assert_eq!(format!("{key:?}"), "NotifyKey(<redacted>)");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let policy = RetryPolicy {
            max_attempts: 5,
            base_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(10),
        };
        let waits: Vec<u64> = (1..=5).map(|n| policy.backoff(n).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 10, 10]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn only_2xx_is_a_delivery() {
        assert_eq!(FailureClass::of(WebhookReply::Status(204)), None);
        assert_eq!(
            FailureClass::of(WebhookReply::Status(503)),
            Some((FailureClass::Status5xx, Some(503)))
        );
        assert_eq!(
            FailureClass::of(WebhookReply::Status(302)),
            Some((FailureClass::StatusOther, Some(302)))
        );
        assert_eq!(
            FailureClass::of(WebhookReply::Unreachable(Unreachable::Connect)),
            Some((FailureClass::Connect, None))
        );
    }
}
