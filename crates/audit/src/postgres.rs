//! The Postgres adapter (feature `postgres`) over the append-only `audit_events` table.
//!
//! [`insert`] and [`insert_batch`] take the caller's connection, so when the caller passes its
//! open transaction the audit row commits or rolls back together with the state change it
//! describes; [`encode`] and [`COLUMNS`] let a caller write the audit row in the very statement
//! that makes the change (one round trip, one commit). [`PgAuditSink`] implements the
//! [`AuditSink`] port for callers without a transaction: each call is its own transaction.

use std::collections::BTreeMap;

use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::event::{Actor, Attributes, AuditEvent, RequestId};
use crate::ids::{ResourceId, TeamId};
use crate::kind::AuditKind;
use crate::sink::{AuditSink, AuditSinkError};

/// `audit_events.id` of a stored event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditEventId(pub i64);

/// An event as stored, with its row id and the time the database recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAuditEvent {
    /// The row id (increasing in insertion order on one server).
    pub id: AuditEventId,
    /// The event.
    pub event: AuditEvent,
    /// When the row was inserted (the database's clock).
    pub recorded_at: OffsetDateTime,
}

fn store_error(operation: &'static str) -> impl FnOnce(sqlx::Error) -> AuditSinkError {
    move |e| AuditSinkError::store(operation, e)
}

fn attributes_json(event: &AuditEvent) -> Result<String, AuditSinkError> {
    serde_json::to_string(event.attributes())
        .map_err(|e| AuditSinkError::store("encode audit attributes", e))
}

/// The columns of `audit_events` an event fills, in the order of [`EncodedEvent`]'s fields, for
/// a statement that writes the audit row together with the change it records (a data-modifying
/// `WITH … INSERT INTO audit_events (COLUMNS) SELECT … FROM changed`), so both take one round
/// trip and one commit and the audit row exists exactly when the change happened.
pub const COLUMNS: &str = "kind, actor, team_id, resource_id, request_id, attributes, occurred_at";

/// One event's values, ready to bind in [`COLUMNS`] order (`attributes` is JSON text; cast it
/// with `::jsonb`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EncodedEvent {
    /// `kind`.
    pub kind: &'static str,
    /// `actor`.
    pub actor: String,
    /// `team_id`.
    pub team_id: Option<Uuid>,
    /// `resource_id`.
    pub resource_id: Option<Uuid>,
    /// `request_id`.
    pub request_id: Option<String>,
    /// `attributes`, as JSON text.
    pub attributes: String,
    /// `occurred_at`.
    pub occurred_at: OffsetDateTime,
}

/// Encodes `event` for a caller's own statement (see [`COLUMNS`]).
pub fn encode(event: &AuditEvent) -> Result<EncodedEvent, AuditSinkError> {
    Ok(EncodedEvent {
        kind: event.kind().as_str(),
        actor: event.actor().as_str().to_owned(),
        team_id: event.team_id().map(|id| id.as_uuid()),
        resource_id: event.resource_id().map(|id| id.as_uuid()),
        request_id: event.request_id().map(|r| r.as_str().to_owned()),
        attributes: attributes_json(event)?,
        occurred_at: event.occurred_at(),
    })
}

/// Inserts one event on `conn`. Pass an open transaction to commit it with the state change.
pub async fn insert(
    conn: &mut PgConnection,
    event: &AuditEvent,
) -> Result<AuditEventId, AuditSinkError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO audit_events \
           (kind, actor, team_id, resource_id, request_id, attributes, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7) \
         RETURNING id",
    )
    .bind(event.kind().as_str())
    .bind(event.actor().as_str())
    .bind(event.team_id().map(|id| id.as_uuid()))
    .bind(event.resource_id().map(|id| id.as_uuid()))
    .bind(event.request_id().map(RequestId::as_str))
    .bind(attributes_json(event)?)
    .bind(event.occurred_at())
    .fetch_one(conn)
    .await
    .map_err(store_error("insert an audit event"))?;
    Ok(AuditEventId(id))
}

/// Inserts several events on `conn` in one statement, in order; returns how many were written,
/// which is always `events.len()`: storing fewer is an error.
pub async fn insert_batch(
    conn: &mut PgConnection,
    events: &[AuditEvent],
) -> Result<u64, AuditSinkError> {
    if events.is_empty() {
        return Ok(0);
    }
    let n = events.len();
    let (mut kinds, mut actors, mut teams, mut resources, mut requests, mut attrs, mut times) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for event in events {
        kinds.push(event.kind().as_str());
        actors.push(event.actor().as_str().to_owned());
        teams.push(event.team_id().map(|id| id.as_uuid()));
        resources.push(event.resource_id().map(|id| id.as_uuid()));
        requests.push(event.request_id().map(|r| r.as_str().to_owned()));
        attrs.push(attributes_json(event)?);
        times.push(event.occurred_at());
    }
    let done = sqlx::query(
        "INSERT INTO audit_events \
           (kind, actor, team_id, resource_id, request_id, attributes, occurred_at) \
         SELECT kind, actor, team_id, resource_id, request_id, attributes::jsonb, occurred_at \
         FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], \
                     $7::timestamptz[]) WITH ORDINALITY \
              AS e(kind, actor, team_id, resource_id, request_id, attributes, occurred_at, ord) \
         ORDER BY ord",
    )
    .bind(kinds)
    .bind(actors)
    .bind(teams)
    .bind(resources)
    .bind(requests)
    .bind(attrs)
    .bind(times)
    .execute(conn)
    .await
    .map_err(store_error("insert a batch of audit events"))?;
    // A trigger that swallows rows (RETURN NULL) makes the statement succeed with fewer rows:
    // the state change must not commit without every audit row it described (FND-13).
    if done.rows_affected() != n as u64 {
        return Err(AuditSinkError::store(
            "insert a batch of audit events",
            format!("stored {} of {n} audit events", done.rows_affected()),
        ));
    }
    Ok(done.rows_affected())
}

/// Which stored events to read back; every set field must match.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Only events about this resource.
    pub resource_id: Option<ResourceId>,
    /// Only events about this team.
    pub team_id: Option<TeamId>,
    /// Only events of this kind.
    pub kind: Option<AuditKind>,
    /// Only events with a row id above this one. Row ids are not commit order: a reader tailing
    /// the trail must use [`fetch_committed_after`], which never skips a row that commits late.
    pub after: Option<AuditEventId>,
    /// At most this many (default 1000).
    pub limit: Option<u32>,
}

#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    pub(crate) id: i64,
    kind: String,
    actor: String,
    team_id: Option<Uuid>,
    resource_id: Option<Uuid>,
    request_id: Option<String>,
    attributes: Json<BTreeMap<String, serde_json::Value>>,
    occurred_at: OffsetDateTime,
    recorded_at: OffsetDateTime,
}

impl AuditRow {
    /// The stored row as an event. History is not screened again (today's rules must not make
    /// yesterday's rows unreadable, FND-8): only a kind this build does not know is an error,
    /// for this row alone. A non-string attribute value (which the database refuses for new
    /// rows) is kept as its JSON text.
    pub(crate) fn into_domain(self) -> Result<StoredAuditEvent, AuditSinkError> {
        let kind: AuditKind = self.kind.parse().map_err(|e| AuditSinkError::Corrupt {
            id: self.id,
            reason: format!("{e}"),
        })?;
        let attributes = self
            .attributes
            .0
            .into_iter()
            .map(|(key, value)| match value {
                serde_json::Value::String(text) => (key, text),
                other @ (serde_json::Value::Null
                | serde_json::Value::Bool(_)
                | serde_json::Value::Number(_)
                | serde_json::Value::Array(_)
                | serde_json::Value::Object(_)) => (key, other.to_string()),
            })
            .collect();
        let mut event = AuditEvent::new(kind, Actor::from_stored(self.actor), self.occurred_at)
            .with_attributes(Attributes::from_stored(attributes));
        if let Some(team) = self.team_id {
            event = event.team(TeamId::from_uuid(team));
        }
        if let Some(resource) = self.resource_id {
            event = event.resource(ResourceId::from_uuid(resource));
        }
        if let Some(request) = self.request_id {
            event = event.request(RequestId::from_stored(request));
        }
        Ok(StoredAuditEvent {
            id: AuditEventId(self.id),
            event,
            recorded_at: self.recorded_at,
        })
    }
}

async fn fetch_raw(
    conn: &mut PgConnection,
    filter: &AuditFilter,
) -> Result<Vec<AuditRow>, AuditSinkError> {
    sqlx::query_as(
        "SELECT id, kind, actor, team_id, resource_id, request_id, attributes, occurred_at, \
                recorded_at \
         FROM audit_events \
         WHERE ($1::uuid IS NULL OR resource_id = $1) \
           AND ($2::uuid IS NULL OR team_id = $2) \
           AND ($3::text IS NULL OR kind = $3) \
           AND ($4::bigint IS NULL OR id > $4) \
         ORDER BY id \
         LIMIT $5",
    )
    .bind(filter.resource_id.map(|id| id.as_uuid()))
    .bind(filter.team_id.map(|id| id.as_uuid()))
    .bind(filter.kind.map(AuditKind::as_str))
    .bind(filter.after.map(|id| id.0))
    .bind(i64::from(filter.limit.unwrap_or(1000)))
    .fetch_all(conn)
    .await
    .map_err(|e| AuditSinkError::read("read audit events", e))
}

/// Reads stored events matching `filter`, oldest first. Fails when any row on the page is of
/// a kind this build does not know; [`fetch_rows`] gives each row its own result instead.
pub async fn fetch(
    conn: &mut PgConnection,
    filter: &AuditFilter,
) -> Result<Vec<StoredAuditEvent>, AuditSinkError> {
    fetch_raw(conn, filter)
        .await?
        .into_iter()
        .map(AuditRow::into_domain)
        .collect()
}

/// Reads stored events matching `filter`, oldest first, each row with its own result: a row
/// this build cannot read (a kind a newer release wrote) never hides the rest of its page.
pub async fn fetch_rows(
    conn: &mut PgConnection,
    filter: &AuditFilter,
) -> Result<Vec<Result<StoredAuditEvent, AuditSinkError>>, AuditSinkError> {
    Ok(fetch_raw(conn, filter)
        .await?
        .into_iter()
        .map(AuditRow::into_domain)
        .collect())
}

/// A reader's position in commit order: the writing transaction's id and the row id of the
/// last row it has seen. [`CommitCursor::START`] is before every row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CommitCursor {
    /// `audit_events.txid` of the last row seen (a 64-bit transaction id).
    pub txid: i64,
    /// `audit_events.id` of the last row seen.
    pub id: i64,
}

impl CommitCursor {
    /// Before every row.
    pub const START: CommitCursor = CommitCursor { txid: 0, id: 0 };
}

/// Reads up to `limit` rows after `cursor` in commit order, and the cursor after the last one.
///
/// Only rows of transactions older than every transaction still running are returned, so a
/// row that commits after a later-numbered one is never skipped (FND-5): it is returned once
/// its transaction has finished, before anything written after it. A long transaction makes
/// the reader wait for it. Each row has its own result (see [`fetch_rows`]).
pub async fn fetch_committed_after(
    conn: &mut PgConnection,
    cursor: CommitCursor,
    limit: u32,
) -> Result<(Vec<Result<StoredAuditEvent, AuditSinkError>>, CommitCursor), AuditSinkError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        position: i64,
        #[sqlx(flatten)]
        row: AuditRow,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT txid::text::bigint AS position, id, kind, actor, team_id, resource_id, \
                request_id, attributes, occurred_at, recorded_at \
         FROM audit_events \
         WHERE (txid, id) > ($1::text::xid8, $2) \
           AND txid < pg_snapshot_xmin(pg_current_snapshot()) \
         ORDER BY txid, id \
         LIMIT $3",
    )
    .bind(cursor.txid.to_string())
    .bind(cursor.id)
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await
    .map_err(|e| AuditSinkError::read("read audit events in commit order", e))?;
    let next = rows.last().map_or(cursor, |last| CommitCursor {
        txid: last.position,
        id: last.row.id,
    });
    Ok((
        rows.into_iter().map(|r| r.row.into_domain()).collect(),
        next,
    ))
}

/// The [`AuditSink`] port over a pool: each call commits in its own transaction.
#[derive(Clone, Debug)]
pub struct PgAuditSink {
    pool: PgPool,
}

impl PgAuditSink {
    /// A sink writing through `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl AuditSink for PgAuditSink {
    async fn record(&self, event: &AuditEvent) -> Result<(), AuditSinkError> {
        self.record_batch(std::slice::from_ref(event)).await
    }

    async fn record_batch(&self, events: &[AuditEvent]) -> Result<(), AuditSinkError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(store_error("begin a transaction"))?;
        insert_batch(&mut tx, events).await?;
        tx.commit()
            .await
            .map_err(store_error("commit audit events"))
    }
}
