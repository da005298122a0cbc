//! Reading the trail (feature `postgres`): [`list`] filters by kind, team, resource, actor,
//! request id and a `recorded_at` range, and pages in commit order with a [`CommitCursor`], so
//! paging never skips a row that commits after a later-numbered one (`keel-audit list`).
//!
//! The SQL is built for the filters actually set (no `$1 IS NULL OR …`), so each query can use
//! its index: `request_id`, `recorded_at`, `team_id`, `resource_id`, `kind`, or the commit order.

use sqlx::{PgConnection, Postgres, QueryBuilder};
use time::OffsetDateTime;

use crate::event::{Actor, RequestId};
use crate::ids::{ResourceId, TeamId};
use crate::kind::AuditKind;
use crate::postgres::{AuditRow, CommitCursor, StoredAuditEvent};
use crate::sink::AuditSinkError;

/// Which rows [`list`] returns; every set field must match.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// Only this kind.
    pub kind: Option<AuditKind>,
    /// Only rows about this team.
    pub team_id: Option<TeamId>,
    /// Only rows about this resource.
    pub resource_id: Option<ResourceId>,
    /// Only rows by this actor.
    pub actor: Option<Actor>,
    /// Only rows of this request.
    pub request_id: Option<RequestId>,
    /// Only rows the database recorded at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only rows the database recorded before this time.
    pub until: Option<OffsetDateTime>,
    /// Only rows after this position in commit order ([`CommitCursor::START`] by default).
    pub after: CommitCursor,
    /// At most this many rows (1 to 10 000; default 100).
    pub limit: Option<u32>,
}

/// One row of a [`list`] page with its position, to resume after it.
#[derive(Debug)]
pub struct Listed {
    /// The row's position in commit order.
    pub cursor: CommitCursor,
    /// The row, or why this build cannot read it (a kind a newer release wrote).
    pub row: Result<StoredAuditEvent, AuditSinkError>,
}

/// A cursor that is not `<txid>-<id>` (two non-negative integers).
#[derive(Debug, thiserror::Error)]
#[error("a cursor is <txid>-<id>, as printed by a previous page (two non-negative integers)")]
pub struct InvalidCursor;

/// Formats a cursor as `<txid>-<id>`, the form [`parse_cursor`] reads.
pub fn format_cursor(cursor: CommitCursor) -> String {
    format!("{}-{}", cursor.txid, cursor.id)
}

/// Parses `<txid>-<id>`.
pub fn parse_cursor(text: &str) -> Result<CommitCursor, InvalidCursor> {
    let (txid, id) = text.trim().split_once('-').ok_or(InvalidCursor)?;
    let parse = |part: &str| {
        part.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0 && part.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(InvalidCursor)
    };
    Ok(CommitCursor {
        txid: parse(txid)?,
        id: parse(id)?,
    })
}

/// Rows matching `query` after `query.after`, in commit order, and the cursor after the last.
///
/// Like [`crate::postgres::fetch_committed_after`], only rows of transactions older than every
/// transaction still running are returned, so the next page never misses a row that was still
/// being written.
pub async fn list(
    conn: &mut PgConnection,
    query: &ListQuery,
) -> Result<(Vec<Listed>, CommitCursor), AuditSinkError> {
    #[derive(sqlx::FromRow)]
    struct Row {
        position: i64,
        #[sqlx(flatten)]
        row: AuditRow,
    }
    let mut sql: QueryBuilder<Postgres> = QueryBuilder::new(
        "SELECT txid::text::bigint AS position, id, kind, actor, team_id, resource_id, \
                request_id, attributes, occurred_at, recorded_at \
         FROM audit_events \
         WHERE txid < pg_snapshot_xmin(pg_current_snapshot()) AND (txid, id) > (",
    );
    sql.push_bind(query.after.txid.to_string())
        .push("::text::xid8, ")
        .push_bind(query.after.id)
        .push(")");
    if let Some(kind) = query.kind {
        sql.push(" AND kind = ").push_bind(kind.as_str());
    }
    if let Some(team) = query.team_id {
        sql.push(" AND team_id = ").push_bind(team.as_uuid());
    }
    if let Some(resource) = query.resource_id {
        sql.push(" AND resource_id = ")
            .push_bind(resource.as_uuid());
    }
    if let Some(actor) = &query.actor {
        sql.push(" AND actor = ")
            .push_bind(actor.as_str().to_owned());
    }
    if let Some(request) = &query.request_id {
        sql.push(" AND request_id = ")
            .push_bind(request.as_str().to_owned());
    }
    if let Some(since) = query.since {
        sql.push(" AND recorded_at >= ").push_bind(since);
    }
    if let Some(until) = query.until {
        sql.push(" AND recorded_at < ").push_bind(until);
    }
    sql.push(" ORDER BY txid, id LIMIT ")
        .push_bind(i64::from(query.limit.unwrap_or(100).clamp(1, 10_000)));
    let rows: Vec<Row> = sql
        .build_query_as()
        .fetch_all(conn)
        .await
        .map_err(|e| AuditSinkError::read("list audit events", e))?;
    let next = rows.last().map_or(query.after, |last| CommitCursor {
        txid: last.position,
        id: last.row.id,
    });
    let listed = rows
        .into_iter()
        .map(|r| Listed {
            cursor: CommitCursor {
                txid: r.position,
                id: r.row.id,
            },
            row: r.row.into_domain(),
        })
        .collect();
    Ok((listed, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_anything_else_is_refused() {
        let cursor = CommitCursor { txid: 812, id: 44 };
        assert_eq!(parse_cursor(&format_cursor(cursor)).unwrap(), cursor);
        assert_eq!(parse_cursor("0-0").unwrap(), CommitCursor::START);
        for bad in [
            "",
            "12",
            "-1-2",
            "1--2",
            "a-1",
            "1-2-3",
            "+1-2",
            "1-99999999999999999999",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad:?}");
        }
    }
}
