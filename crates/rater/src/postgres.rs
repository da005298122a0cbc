//! Postgres adapters (feature `postgres`): idempotent ingest (one event or a batch), rating and
//! reconcile, the single-flight lock, the run ledger, the late-usage check, and a whole run.
//!
//! # Single flight
//!
//! The reconcile writes `rated_usage` with plain inserts, updates and deletes, correct only when no
//! two raters work at once, so a run holds a session advisory lock and does all its rating
//! work on that same connection. Losing the connection (killed backend, idle timeout, failover)
//! aborts the open transaction: nothing of that day commits. Each day's transaction also reads
//! the `rater_lease` fence row `FOR UPDATE` and checks that it still holds the lock on the very
//! backend that took it before it writes and again before it commits; a rater that took the lock
//! after this one bumped the fence, so this one aborts. An unlock that returns `false` is an
//! error.
//!
//! A transaction-pooling proxy (PgBouncer `pool_mode = transaction`) cannot hold a session lock
//! for one client: at start the rater opens a second connection and, if it lands on the backend
//! holding the lock, refuses with [`RaterError::PoolerDetected`], naming the fix (a direct URL).
//! If the proxy moves the work to another backend later, the per-transaction check aborts it.
//! A rater that cannot take the lock exits 3 and writes only its ledger row.
//!
//! # Work proportional to change
//!
//! Triggers on `billing_event` (migration 0080) write a change marker per (auth id, meter,
//! hour) touched by each insert, update or delete, in the writer's own transaction; a change
//! to `prices` (or a `TRUNCATE`) writes a whole-window marker. A routine run with no
//! whole-window marker pending rates only the marked groups of its window ([`RATE_CHANGED`]):
//! an unchanged re-run reads no events at all. A backfill, or a routine run after a
//! whole-window marker, rates every hour ([`RATE_APPLY`]). Markers are consumed by `DELETE` in
//! the statement that rates them, from the same snapshot, so a marker whose writer commits
//! after that statement began survives it and is rated by the next run: late-committing usage
//! is never skipped. Markers of hours before the window are the late-usage signal
//! ([`find_late_usage`]) and stay until a backfill rates them.

use std::future::Future;

use keel_audit::{Actor, AuditEvent, AuditKind};
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, PgConnection, PgPool, Row};
use time::OffsetDateTime;

use crate::exit::{DeletionSeverity, RaterExit, deletion_severity, exit_code};
use crate::ingest::BillingEvent;
use crate::report::{
    Changes, LateUsage, RateReport, Rated, RatedChange, UsageKey, loss_attributes,
};
use crate::window::Window;

/// The advisory lock key every rater takes ("keelrate" in ASCII).
pub const SINGLE_FLIGHT_KEY: i64 = 0x6b65_656c_7261_7465;

/// Most conflicting event ids an error names.
const CONFLICTS_SHOWN: i64 = 20;

/// Why a rater operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaterError {
    /// The database failed the operation; the transaction rolled back.
    #[error("the rater could not {operation}: {source}")]
    Database {
        /// What was being attempted.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// The audit row for a loss could not be written, so the day rolled back.
    #[error("could not write the rater's audit row: {0}")]
    Audit(#[from] keel_audit::AuditSinkError),
    /// An audit attribute was refused, so the day rolled back rather than lose it.
    #[error("could not build the rater's audit row: {0}")]
    AuditField(#[from] keel_audit::AuditFieldError),
    /// An event id was reused by its source for a different event. Nothing was recorded.
    #[error(
        "{count} event id(s) were already recorded by the same source with a different payload \
         (first: {first}); event ids must be unique per source. Nothing of this batch was recorded"
    )]
    EventIdConflict {
        /// How many events conflict.
        count: u64,
        /// The first conflicting `source/event_id` pairs.
        first: String,
    },
    /// The run no longer holds single flight: the day in progress rolled back.
    #[error(
        "the single-flight lock was lost (its connection moved to another backend, or another \
         rater took over); this day's work rolled back and the run stopped"
    )]
    Fenced,
    /// The rater sits behind a transaction-pooling proxy; it refused to run.
    #[error(
        "keel-rater is connected through a transaction-pooling proxy (e.g. PgBouncer with \
         pool_mode = transaction): two of its sessions share one server backend, so the \
         single-flight lock cannot hold. Nothing was written. Give the rater a direct URL to \
         PostgreSQL (or to a session-mode pool) with --direct-database-url / KEEL_RATER_DIRECT_URL"
    )]
    PoolerDetected,
    /// `pg_advisory_unlock` returned false: the lock was not held by this session.
    #[error(
        "releasing the single-flight lock returned false: this session did not hold it, so \
         single flight was not guaranteed for this run"
    )]
    UnlockFailed,
    /// A signal stopped the run; days already committed stay, the day in progress rolled back.
    #[error("stopped by a termination signal; {days} day(s) had committed")]
    Terminated {
        /// Days committed before the signal.
        days: u32,
    },
    /// A routine run failed after it had committed losses (rated hours deleted, lowered or
    /// priced away, with their audit rows), its own or those of an earlier run that ended
    /// before it could report them. They page: [`RaterError::exit`] is
    /// [`RaterExit::Attention`], never the quieter [`RaterExit::Error`].
    #[error(
        "{source}; before that the run had committed {losses} lost rated hour(s) (deleted, \
         lowered or priced away), which must be looked at before the next invoice"
    )]
    FailedAfterLosses {
        /// The lost rated hours committed.
        losses: u64,
        /// Why the run failed.
        #[source]
        source: Box<RaterError>,
    },
}

impl RaterError {
    /// How a run that failed with this error exits: [`RaterExit::Attention`] when it had
    /// committed losses that page, [`RaterExit::Error`] otherwise.
    pub fn exit(&self) -> RaterExit {
        match self {
            Self::FailedAfterLosses { .. } => RaterExit::Attention,
            Self::Database { .. }
            | Self::Audit(_)
            | Self::AuditField(_)
            | Self::EventIdConflict { .. }
            | Self::Fenced
            | Self::PoolerDetected
            | Self::UnlockFailed
            | Self::Terminated { .. } => RaterExit::Error,
        }
    }
}

fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> RaterError {
    move |source| RaterError::Database { operation, source }
}

/// What recording an event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// A new event.
    Recorded,
    /// This source recorded this very event before; nothing changed.
    Duplicate,
}

/// Records one billing event. Recording the same event again is a [`Ingested::Duplicate`];
/// the same `(source, event_id)` with a different payload is [`RaterError::EventIdConflict`].
pub async fn record_event(
    conn: &mut PgConnection,
    event: &BillingEvent,
) -> Result<Ingested, RaterError> {
    let recorded = record_events(conn, std::slice::from_ref(event)).await?;
    Ok(if recorded.recorded == 1 {
        Ingested::Recorded
    } else {
        Ingested::Duplicate
    })
}

/// What recording a batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct BatchIngested {
    /// New events.
    pub recorded: u64,
    /// Events recorded before, identical; nothing changed.
    pub duplicates: u64,
}

/// Records a batch of events in one statement (thousands per call are fine), all or nothing:
/// if any `(source, event_id)` was recorded with a different payload (or appears twice in the
/// batch with different payloads) nothing is recorded and the conflicting ids are named.
pub async fn record_events(
    conn: &mut PgConnection,
    events: &[BillingEvent],
) -> Result<BatchIngested, RaterError> {
    let mut sources = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    let mut auths = Vec::with_capacity(events.len());
    let mut meters = Vec::with_capacity(events.len());
    let mut quantities = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    for e in events {
        sources.push(e.source());
        ids.push(e.event_id());
        auths.push(e.auth_id());
        meters.push(e.meter());
        quantities.push(e.quantity());
        times.push(e.occurred_at());
    }
    let mut tx = conn.begin().await.map_err(db("begin an ingest"))?;
    let recorded = sqlx::query(
        "INSERT INTO billing_event (source, event_id, auth_id, meter, quantity, occurred_at) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[], \
                              $6::timestamptz[]) \
         ON CONFLICT (source, event_id) DO NOTHING",
    )
    .bind(&sources)
    .bind(&ids)
    .bind(&auths)
    .bind(&meters)
    .bind(&quantities)
    .bind(&times)
    .execute(&mut *tx)
    .await
    .map_err(db("record billing events"))?
    .rows_affected();
    let conflicts: (i64, Option<String>) = sqlx::query_as(
        "WITH c AS ( \
           SELECT DISTINCT u.source, u.event_id \
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::numeric[], \
                       $6::timestamptz[]) AS u(source, event_id, auth_id, meter, quantity, occurred_at) \
           JOIN billing_event e USING (source, event_id) \
           WHERE (e.auth_id, e.meter, e.quantity, e.occurred_at) \
                 IS DISTINCT FROM (u.auth_id, u.meter, u.quantity, u.occurred_at)) \
         SELECT count(*), (SELECT string_agg(source || '/' || event_id, ', ') \
                           FROM (SELECT * FROM c ORDER BY 1, 2 LIMIT $7) f) FROM c",
    )
    .bind(&sources)
    .bind(&ids)
    .bind(&auths)
    .bind(&meters)
    .bind(&quantities)
    .bind(&times)
    .bind(CONFLICTS_SHOWN)
    .fetch_one(&mut *tx)
    .await
    .map_err(db("compare billing events with those recorded"))?;
    if conflicts.0 > 0 {
        tx.rollback().await.map_err(db("roll back an ingest"))?;
        return Err(RaterError::EventIdConflict {
            count: conflicts.0.unsigned_abs(),
            first: conflicts.1.unwrap_or_default(),
        });
    }
    tx.commit().await.map_err(db("commit an ingest"))?;
    Ok(BatchIngested {
        recorded,
        duplicates: (events.len() as u64).saturating_sub(recorded),
    })
}

/// The sources of a whole-window diff: `agg`, what the events of `[$1, $2)` say per (auth id,
/// meter, hour), and `current`, what `rated_usage` holds for the window.
///
/// `current` filters `rated_usage` on `window_start` alone, which is what
/// `rated_usage_window_start_ix` exists for (every other index leads with `auth_id`).
macro_rules! window_sources {
    () => {
        "WITH agg AS ( \
           SELECT auth_id, meter, \
                  date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS window_start, \
                  sum(quantity) AS quantity, count(*) AS event_count \
           FROM billing_event WHERE occurred_at >= $1 AND occurred_at < $2 \
           GROUP BY 1, 2, 3 \
         ), current AS MATERIALIZED ( \
           SELECT id, auth_id, meter, window_start, quantity, unit_price, amount, currency, event_count \
           FROM rated_usage WHERE window_start >= $1 AND window_start < $2 \
         )"
    };
}

/// Consumes the window's change markers: the whole window is rated in the same statement, from
/// the same snapshot, so every marker this deletes has its events counted.
macro_rules! consume_window_markers {
    () => {
        ", consumed AS ( \
           DELETE FROM rating_change WHERE window_start >= $1 AND window_start < $2 \
         )"
    };
}

/// The sources of a diff over the changed groups only: the window's change markers are
/// consumed (deleted, returning their groups) and only those groups are aggregated and compared,
/// each with index lookups, so the work follows the change, not the window.
///
/// The rated row of each group is looked up in a subquery the planner may not pull up
/// (`OFFSET 0`): pulled up, it became a hash join over a scan of all of `rated_usage`, since the
/// planner cannot tell how few groups the consumed markers name, so a run after 1% of the hours
/// changed read every rated row.
macro_rules! changed_sources {
    () => {
        "WITH changed AS ( \
           DELETE FROM rating_change WHERE window_start >= $1 AND window_start < $2 \
           RETURNING auth_id, meter, window_start \
         ), keys AS ( \
           SELECT DISTINCT auth_id, meter, window_start FROM changed \
         ), agg AS ( \
           SELECT k.auth_id, k.meter, k.window_start, e.quantity, e.event_count \
           FROM keys k CROSS JOIN LATERAL ( \
             SELECT sum(quantity) AS quantity, count(*) AS event_count FROM billing_event b \
             WHERE b.auth_id = k.auth_id AND b.meter = k.meter \
               AND b.occurred_at >= k.window_start AND b.occurred_at < k.window_start + interval '1 hour' \
           ) e WHERE e.event_count > 0 \
         ), current AS ( \
           SELECT r.id, r.auth_id, r.meter, r.window_start, r.quantity, r.unit_price, r.amount, \
                  r.currency, r.event_count \
           FROM keys k CROSS JOIN LATERAL ( \
             SELECT * FROM rated_usage u \
             WHERE u.auth_id = k.auth_id AND u.meter = k.meter AND u.window_start = k.window_start \
             OFFSET 0 \
           ) r \
         )"
    };
}

/// The diff between `agg` and `current`, one row per (auth id, meter, hour): `what` is
/// inserted, updated, lowered, unchanged, deleted (events gone), price_lost (rated, now
/// unpriced), unpriced or out_of_range. Amounts are `round(quantity * unit_price, 9)` in SQL.
/// Each hour takes the price whose `[effective_from, next effective_from)` range holds its
/// start (only the ranges that overlap the window are joined), and `agg` is read once.
macro_rules! diff_ctes {
    () => {
        ", hour_prices AS ( \
           SELECT meter, effective_from, effective_until, unit_price, currency FROM ( \
             SELECT meter, effective_from, unit_price, currency, \
                    lead(effective_from) OVER (PARTITION BY meter ORDER BY effective_from) \
                      AS effective_until \
             FROM prices \
           ) p WHERE effective_from < $2 AND (effective_until IS NULL OR effective_until > $1) \
         ), priced AS ( \
           SELECT a.auth_id, a.meter, a.window_start, a.quantity, a.event_count, \
                  hp.unit_price, hp.currency, \
                  trim_scale(round(a.quantity * hp.unit_price, 9)) AS amount \
           FROM agg a LEFT JOIN hour_prices hp ON hp.meter = a.meter \
             AND a.window_start >= hp.effective_from \
             AND (hp.effective_until IS NULL OR a.window_start < hp.effective_until) \
         ), diff AS MATERIALIZED ( \
           SELECT CASE \
               WHEN p.auth_id IS NULL THEN 'deleted' \
               WHEN p.unit_price IS NULL THEN CASE WHEN c.id IS NULL THEN 'unpriced' ELSE 'price_lost' END \
               WHEN p.quantity >= 1e18 OR p.amount >= 1e18 THEN 'out_of_range' \
               WHEN c.id IS NULL THEN 'inserted' \
               WHEN p.event_count < c.event_count OR p.quantity < c.quantity \
                    OR p.amount < c.amount OR p.currency IS DISTINCT FROM c.currency \
                 THEN 'lowered' \
               WHEN (c.quantity, c.unit_price, c.amount, c.currency, c.event_count) \
                    IS DISTINCT FROM (p.quantity, p.unit_price, p.amount, p.currency, p.event_count) \
                 THEN 'updated' \
               ELSE 'unchanged' END AS what, \
             coalesce(p.auth_id, c.auth_id) AS auth_id, coalesce(p.meter, c.meter) AS meter, \
             coalesce(p.window_start, c.window_start) AS window_start, \
             c.id AS old_id, c.quantity AS old_quantity, c.event_count AS old_event_count, \
             c.unit_price AS old_unit_price, c.amount AS old_amount, c.currency AS old_currency, \
             p.quantity AS new_quantity, p.event_count AS new_event_count, \
             p.unit_price AS new_unit_price, p.amount AS new_amount, p.currency AS new_currency \
           FROM priced p FULL JOIN current c \
             ON c.auth_id = p.auth_id AND c.meter = p.meter AND c.window_start = p.window_start \
         )"
    };
}

/// Writes the diff: inserts new hours, updates changed ones in place, and deletes rated hours
/// whose events are gone or that lost their price. An hour that left the money model's range
/// keeps its last rated row (it is reported, never deleted unaudited). The groups of hours left
/// unrated (unpriced, price lost, out of range) get their change marker back, written by this
/// same statement and so never seen by its own consuming `DELETE`: every later run rates them
/// again and pages until they are fixed, and once their hour leaves the routine window they are
/// late usage awaiting a backfill. Only
/// rows that differ from what is stored are written, new ones in key order (appending to the
/// unique index instead of splitting pages at random). Plain statements, no `ON CONFLICT`: only
/// the rater writes `rated_usage`, one rater at a time (single flight, fenced), so a row that
/// appeared meanwhile is a broken invariant and fails the day loudly (unique violation).
macro_rules! write_ctes {
    () => {
        ", inserted AS ( \
           INSERT INTO rated_usage \
             (auth_id, meter, window_start, quantity, unit_price, amount, currency, event_count, rated_at) \
           SELECT auth_id, meter, window_start, new_quantity, new_unit_price, new_amount, new_currency, \
                  new_event_count, $3 \
           FROM diff WHERE what = 'inserted' \
           ORDER BY auth_id, meter, window_start \
           RETURNING 1 \
         ), rewritten AS ( \
           UPDATE rated_usage r SET quantity = d.new_quantity, unit_price = d.new_unit_price, \
             amount = d.new_amount, currency = d.new_currency, event_count = d.new_event_count, \
             rated_at = $3 \
           FROM diff d WHERE r.id = d.old_id AND d.what IN ('updated', 'lowered') \
           RETURNING 1 \
         ), removed AS ( \
           DELETE FROM rated_usage r USING diff d \
           WHERE r.id = d.old_id AND d.what IN ('deleted', 'price_lost') \
           RETURNING 1 \
         ), unresolved AS ( \
           INSERT INTO rating_change (auth_id, meter, window_start) \
           SELECT auth_id, meter, window_start FROM diff \
           WHERE what IN ('unpriced', 'price_lost', 'out_of_range') \
           RETURNING 1 \
         )"
    };
}

/// The bounded report over `diff`: one count row per kind, then at most `$cap` detail rows per
/// kind present (a top-N per kind: no sort of the whole diff). Values travel as text, so no
/// stored or computed value can fail decoding.
macro_rules! report_select {
    ($cap:literal) => {
        concat!(
            ", counts AS (SELECT what, count(*)::bigint AS n FROM diff GROUP BY what) \
             SELECT 'count' AS row_kind, what, n, NULL::text AS auth_id, \
                NULL::text AS meter, NULL::timestamptz AS window_start, \
                NULL::text AS old_quantity, NULL::bigint AS old_event_count, \
                NULL::text AS old_unit_price, NULL::text AS old_amount, NULL::text AS old_currency, \
                NULL::text AS new_quantity, NULL::bigint AS new_event_count, \
                NULL::text AS new_unit_price, NULL::text AS new_amount, NULL::text AS new_currency \
             FROM counts \
             UNION ALL \
             SELECT 'detail', d.what, NULL, d.auth_id, d.meter, d.window_start, \
                    d.old_quantity::text, d.old_event_count, d.old_unit_price::text, d.old_amount::text, \
                    d.old_currency, d.new_quantity::text, d.new_event_count, d.new_unit_price::text, \
                    d.new_amount::text, d.new_currency \
             FROM counts k CROSS JOIN LATERAL ( \
               SELECT * FROM diff WHERE diff.what = k.what AND k.what <> 'unchanged' \
               ORDER BY auth_id, meter, window_start LIMIT ",
            $cap,
            ") d"
        )
    };
}

/// Computes the diff for a window without writing anything (the dry run). `$1`, `$2`: window.
pub const RATE_PREVIEW: &str = concat!(window_sources!(), diff_ctes!(), report_select!("50"));

/// Rates a whole window: writes the diff (see the module's statements) and returns the bounded
/// report; consumes the window's change markers. `$1`, `$2`: window; `$3`: rated_at.
///
/// Only rows that differ from what is stored are written: an unchanged re-run writes nothing.
pub const RATE_APPLY: &str = concat!(
    window_sources!(),
    consume_window_markers!(),
    diff_ctes!(),
    write_ctes!(),
    report_select!("50")
);

/// Rates only the groups of `[$1, $2)` whose change markers are visible, consuming them: the
/// routine run's statement when no whole-window marker is pending. `$3`: rated_at.
///
/// A marker whose writer commits after this statement's snapshot is neither seen nor deleted,
/// so its group is rated by the next run.
pub const RATE_CHANGED: &str = concat!(
    changed_sources!(),
    diff_ctes!(),
    write_ctes!(),
    report_select!("50")
);

/// The `work_mem` of a rating transaction (`SET LOCAL`, with `jit` off: compiling the
/// statement costs more than it saves): a day of ten million events is aggregated, joined and
/// diffed in memory instead of spilling gigabytes to temp files. One rater runs at a time
/// (single flight), so the server grants it at most a few of these.
pub const RATING_WORK_MEM: &str = "256MB";

fn text(row: &PgRow, column: &str) -> Result<Option<String>, sqlx::Error> {
    row.try_get(column)
}

fn rated(row: &PgRow, side: &str) -> Result<Option<Rated>, sqlx::Error> {
    let quantity = text(row, &format!("{side}_quantity"))?;
    let count: Option<i64> = row.try_get(format!("{side}_event_count").as_str())?;
    Ok(match (quantity, count) {
        (Some(quantity), Some(event_count)) => Some(Rated {
            quantity,
            event_count,
            unit_price: text(row, &format!("{side}_unit_price"))?,
            amount: text(row, &format!("{side}_amount"))?,
            currency: text(row, &format!("{side}_currency"))?,
        }),
        _ => None,
    })
}

fn report_from_rows(rows: Vec<PgRow>) -> Result<RateReport, sqlx::Error> {
    let mut report = RateReport::default();
    let mut counts: Vec<(String, u64)> = Vec::new();
    let mut details: Vec<(String, RatedChange)> = Vec::new();
    for row in rows {
        let kind: String = row.try_get("row_kind")?;
        let what: String = row.try_get("what")?;
        if kind == "count" {
            let n: Option<i64> = row.try_get("n")?;
            counts.push((what, n.unwrap_or(0).unsigned_abs()));
            continue;
        }
        let (Some(auth_id), Some(meter), Some(window_start)) = (
            text(&row, "auth_id")?,
            text(&row, "meter")?,
            row.try_get::<Option<OffsetDateTime>, _>("window_start")?,
        ) else {
            continue;
        };
        details.push((
            what,
            RatedChange {
                key: UsageKey {
                    auth_id,
                    meter,
                    window_start,
                },
                old: rated(&row, "old")?,
                new: rated(&row, "new")?,
            },
        ));
    }
    details.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    for (what, count) in counts {
        let mine = details
            .iter()
            .filter(|(w, _)| *w == what)
            .map(|(_, c)| c.clone());
        let target: &mut Changes = match what.as_str() {
            "inserted" => &mut report.inserted,
            "updated" => &mut report.updated,
            "lowered" => &mut report.lowered,
            "deleted" => &mut report.deleted,
            "price_lost" => &mut report.price_lost,
            "unpriced" => &mut report.unpriced,
            "out_of_range" => &mut report.out_of_range,
            "unchanged" => {
                report.unchanged = count;
                continue;
            }
            other => {
                tracing::error!(what = other, "unexpected row from the rating statement");
                continue;
            }
        };
        target.add(count, mine);
    }
    Ok(report)
}

/// Rates `window` on `conn` (pass a transaction) with [`RATE_APPLY`]: the whole window.
pub async fn rate_window(
    conn: &mut PgConnection,
    window: Window,
    rated_at: OffsetDateTime,
) -> Result<RateReport, RaterError> {
    rate_with(conn, RATE_APPLY, window, rated_at).await
}

/// Rates the groups of `window` whose change markers are visible on `conn` (pass a
/// transaction) with [`RATE_CHANGED`]; `unchanged` then counts only groups looked at.
pub async fn rate_changed(
    conn: &mut PgConnection,
    window: Window,
    rated_at: OffsetDateTime,
) -> Result<RateReport, RaterError> {
    rate_with(conn, RATE_CHANGED, window, rated_at).await
}

async fn rate_with(
    conn: &mut PgConnection,
    statement: &'static str,
    window: Window,
    rated_at: OffsetDateTime,
) -> Result<RateReport, RaterError> {
    let rows = sqlx::query(statement)
        .bind(window.start())
        .bind(window.end())
        .bind(rated_at)
        .fetch_all(&mut *conn)
        .await
        .map_err(db("rate the window"))?;
    report_from_rows(rows).map_err(db("read the rating report"))
}

/// What rating `window` would do, computed with SELECTs only ([`RATE_PREVIEW`]).
pub async fn preview_window(
    conn: &mut PgConnection,
    window: Window,
) -> Result<RateReport, RaterError> {
    let rows = sqlx::query(RATE_PREVIEW)
        .bind(window.start())
        .bind(window.end())
        .fetch_all(&mut *conn)
        .await
        .map_err(db("compute the window's diff"))?;
    report_from_rows(rows).map_err(db("read the rating report"))
}

/// `hp`: the price of the hour that starts at `$at` for meter `$meter` (the price with the
/// latest `effective_from` at or before it; one lookup by the `prices` key), to join to a row.
macro_rules! hour_price {
    ($meter:literal, $at:literal) => {
        concat!(
            " LEFT JOIN LATERAL ( \
               SELECT p.unit_price, p.currency FROM prices p \
               WHERE p.meter = ",
            $meter,
            " AND p.effective_from <= ",
            $at,
            " ORDER BY p.effective_from DESC LIMIT 1 \
             ) hp ON true "
        )
    };
}

/// Whether the rated row `r` is no longer billed at its hour's price `hp` ([`hour_price`]):
/// the price changed, or the hour has none any more.
macro_rules! price_differs {
    () => {
        " (hp.unit_price IS NULL \
           OR (r.unit_price, r.currency) IS DISTINCT FROM (hp.unit_price, hp.currency)) "
    };
}

/// The groups of the rated hours before `$1` that are no longer billed at their hour's price.
macro_rules! repriced_hours {
    () => {
        concat!(
            "SELECT r.auth_id, r.meter, r.window_start FROM rated_usage r",
            hour_price!("r.meter", "r.window_start"),
            "WHERE r.window_start < $1 AND",
            price_differs!()
        )
    };
}

/// Change markers for every rated hour before `$1` whose stored price is no longer its hour's
/// price, or whose hour has no price any more, unless it is marked already. Run when a routine
/// run consumes a whole-window marker (a price changed).
const REPRICED_BEFORE_WINDOW: &str = concat!(
    "INSERT INTO rating_change (auth_id, meter, window_start) ",
    repriced_hours!(),
    "AND NOT EXISTS (SELECT 1 FROM rating_change m \
                     WHERE m.auth_id = r.auth_id AND m.meter = r.meter \
                       AND m.window_start = r.window_start)"
);

/// Late usage among the change markers of hours before `$1`: per marked group, its events
/// against its rated row (looked up per group, `OFFSET 0`, as in the changed-groups diff). A
/// group whose events no longer match its rated row is late: they grew beyond it (or it has
/// events and no rated row), or they went down or vanished under a rated row (`lowered`: the
/// bill is too high until a backfill reconciles it), or the rated row is no longer billed at
/// its hour's price (a price changed, or went away, after the hour was rated). The others need
/// nothing.
macro_rules! late_judged {
    () => {
        concat!(
            "WITH keys AS ( \
               SELECT DISTINCT auth_id, meter, window_start FROM rating_change \
               WHERE window_start < $1 \
             )",
            late_judged_from_keys!()
        )
    };
}

/// [`late_judged`] for the dry run: when `$2` (the run would take a price change's
/// whole-window marker), the rated hours before `$1` that [`REPRICED_BEFORE_WINDOW`] would mark
/// are judged too, as the real run judges them after marking them.
macro_rules! late_judged_preview {
    () => {
        concat!(
            "WITH keys AS ( \
               SELECT DISTINCT auth_id, meter, window_start FROM ( \
                 SELECT auth_id, meter, window_start FROM rating_change WHERE window_start < $1 \
                 UNION ALL ",
            repriced_hours!(),
            "AND $2 \
               ) marked \
             )",
            late_judged_from_keys!()
        )
    };
}

/// The judgement of [`late_judged`] over its `keys`.
macro_rules! late_judged_from_keys {
    () => {
        concat!(
            ", judged AS ( \
               SELECT k.auth_id, k.meter, k.window_start, e.event_count, \
                      coalesce(r.event_count, 0) AS rated_events, \
                      CASE WHEN r.id IS NULL THEN e.event_count > 0 \
                           ELSE e.event_count <> r.event_count OR e.quantity <> r.quantity \
                                OR",
            price_differs!(),
            "END AS late, \
                      r.id IS NOT NULL AND (e.event_count < r.event_count \
                                            OR e.quantity < r.quantity) AS lowered \
               FROM keys k \
               CROSS JOIN LATERAL ( \
                 SELECT coalesce(sum(quantity), 0) AS quantity, count(*) AS event_count \
                 FROM billing_event b \
                 WHERE b.auth_id = k.auth_id AND b.meter = k.meter \
                   AND b.occurred_at >= k.window_start \
                   AND b.occurred_at < k.window_start + interval '1 hour' \
               ) e \
               LEFT JOIN LATERAL ( \
                 SELECT id, quantity, event_count, unit_price, currency FROM rated_usage u \
                 WHERE u.auth_id = k.auth_id AND u.meter = k.meter \
                   AND u.window_start = k.window_start \
                 OFFSET 0 \
               ) r ON true",
            hour_price!("k.meter", "k.window_start"),
            ")"
        )
    };
}

macro_rules! late_select {
    () => {
        " SELECT count(*) FILTER (WHERE late), \
                 coalesce(sum(greatest(event_count - rated_events, 0)) FILTER (WHERE late), 0)::bigint, \
                 count(*) FILTER (WHERE lowered), \
                 min(window_start) FILTER (WHERE late), \
                 max(window_start) FILTER (WHERE late) + interval '1 hour' \
          FROM judged"
    };
}

/// Finds late usage and consumes the markers of hours before `$1` that need nothing.
pub const LATE_USAGE: &str = concat!(
    late_judged!(),
    ", consumed AS ( \
       DELETE FROM rating_change c USING judged j \
       WHERE c.window_start < $1 AND NOT j.late \
         AND c.auth_id = j.auth_id AND c.meter = j.meter AND c.window_start = j.window_start \
     )",
    late_select!()
);

/// [`LATE_USAGE`] without consuming anything (the dry run); `$2`: whether the run would take a
/// price change's whole-window marker (and so mark the rated hours it reaches first).
pub const LATE_USAGE_PREVIEW: &str = concat!(late_judged_preview!(), late_select!());

/// Finds late usage: change markers of hours before `before` (events ingested, changed or
/// deleted after their hour left the routine window) whose events no longer match what is
/// rated, grown or lowered.
/// Those markers stay until a backfill rates their hours, so every run pages until then; the
/// other markers before `before` are consumed, unless `read_only`.
///
/// The markers are written in the same transaction as the events, so an event that commits
/// after a run started is found by the next run: there is no time-based watermark to miss it.
pub async fn find_late_usage(
    conn: &mut PgConnection,
    before: OffsetDateTime,
    read_only: bool,
) -> Result<Option<LateUsage>, RaterError> {
    late_usage(conn, before, read_only.then_some(false)).await
}

/// [`find_late_usage`]; `preview` is `Some(reprices)` for the read-only preview, `reprices`
/// saying whether the run previewed would take a price change's whole-window marker.
async fn late_usage(
    conn: &mut PgConnection,
    before: OffsetDateTime,
    preview: Option<bool>,
) -> Result<Option<LateUsage>, RaterError> {
    let query = match preview {
        Some(reprices) => sqlx::query_as(LATE_USAGE_PREVIEW)
            .bind(before)
            .bind(reprices),
        None => sqlx::query_as(LATE_USAGE).bind(before),
    };
    let row: (
        i64,
        i64,
        i64,
        Option<OffsetDateTime>,
        Option<OffsetDateTime>,
    ) = query
        .fetch_one(&mut *conn)
        .await
        .map_err(db("look for late usage"))?;
    Ok(match row {
        (hours, events, lowered, Some(since), Some(until)) if hours > 0 => Some(LateUsage {
            events: events.unsigned_abs(),
            hours: hours.unsigned_abs(),
            lowered: lowered.unsigned_abs(),
            since,
            until,
        }),
        _ => None,
    })
}

/// The single-flight lock, held on the connection that does the run's work.
#[derive(Debug)]
pub struct SingleFlight {
    conn: PgConnection,
    pid: i32,
    fence: i64,
}

impl SingleFlight {
    /// Takes the lock, or returns `None` at once if another rater holds it. Refuses with
    /// [`RaterError::PoolerDetected`] when a second session lands on the lock's backend.
    pub async fn try_acquire(options: &PgConnectOptions) -> Result<Option<Self>, RaterError> {
        let mut conn = PgConnection::connect_with(options)
            .await
            .map_err(db("open the single-flight connection"))?;
        // Plain (unprepared) statements until the pooler probe passed: a transaction pooler
        // would mix up prepared statements before the probe could say why.
        let row = sqlx::raw_sql(AssertSqlSafe(format!(
            "SELECT pg_try_advisory_lock({SINGLE_FLIGHT_KEY}), pg_backend_pid()"
        )))
        .fetch_one(&mut conn)
        .await
        .map_err(db("take the single-flight lock"))?;
        let (taken, pid): (bool, i32) = (
            row.try_get(0).map_err(db("take the single-flight lock"))?,
            row.try_get(1).map_err(db("take the single-flight lock"))?,
        );
        if !taken {
            let _ = conn.close().await;
            return Ok(None);
        }
        if shares_backend(options, pid).await? {
            let _ = conn.close().await;
            return Err(RaterError::PoolerDetected);
        }
        let fence: i64 = sqlx::query_scalar(
            "UPDATE rater_lease SET fence = fence + 1, holder_pid = pg_backend_pid(), \
                    taken_at = now() RETURNING fence",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(db("take the single-flight fence"))?;
        Ok(Some(Self { conn, pid, fence }))
    }

    /// The connection the run's work must use.
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    /// The server backend that holds the lock.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// This holder's fence token (`rater_lease.fence` when it took the lock).
    pub fn fence(&self) -> i64 {
        self.fence
    }

    /// Checks, inside `conn`'s open transaction, that this run still holds single flight: the
    /// fence is its own (read `FOR UPDATE`, so no later rater can take over until commit), and
    /// the lock is held by the backend that took it, which is the one running the transaction.
    pub async fn verify(conn: &mut PgConnection, pid: i32, fence: i64) -> Result<(), RaterError> {
        let held: bool = sqlx::query_scalar(
            "SELECT l.fence = $1 AND pg_backend_pid() = $2 AND l.holder_pid = $2 \
                    AND EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted \
                                AND pid = pg_backend_pid() AND classid::bigint = $3 \
                                AND objid::bigint = $4 AND objsubid = 1) \
             FROM rater_lease l FOR UPDATE",
        )
        .bind(fence)
        .bind(pid)
        .bind(SINGLE_FLIGHT_KEY >> 32)
        .bind(SINGLE_FLIGHT_KEY & 0xffff_ffff)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("check the single-flight lock"))?;
        if held {
            Ok(())
        } else {
            Err(RaterError::Fenced)
        }
    }

    /// Releases the lock and closes its connection; an unlock returning `false` is an error.
    pub async fn release(mut self) -> Result<(), RaterError> {
        let released: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
            .bind(SINGLE_FLIGHT_KEY)
            .fetch_one(&mut self.conn)
            .await
            .map_err(db("release the single-flight lock"))?;
        let closed = self
            .conn
            .close()
            .await
            .map_err(db("close the single-flight connection"));
        if !released {
            return Err(RaterError::UnlockFailed);
        }
        closed
    }
}

/// Whether a fresh session lands on backend `pid` (which holds the lock): only a
/// transaction-pooling proxy does that. If it does, the lock is released there, in the same
/// statement, so the refused run leaves nothing held behind the proxy.
async fn shares_backend(options: &PgConnectOptions, pid: i32) -> Result<bool, RaterError> {
    let mut probe = PgConnection::connect_with(options)
        .await
        .map_err(db("open the pooler probe connection"))?;
    let row = sqlx::raw_sql(AssertSqlSafe(format!(
        "SELECT pg_backend_pid() = {pid}, \
                CASE WHEN pg_backend_pid() = {pid} THEN pg_advisory_unlock({SINGLE_FLIGHT_KEY}) END"
    )))
    .fetch_one(&mut probe)
    .await
    .map_err(db("probe for a transaction-pooling proxy"))?;
    let shared: bool = row
        .try_get(0)
        .map_err(db("probe for a transaction-pooling proxy"))?;
    let _ = probe.close().await;
    Ok(shared)
}

/// How a run was asked for.
#[derive(Clone, Copy, Debug)]
pub struct RunRequest {
    /// The window to rate.
    pub window: Window,
    /// Whether the run is an explicit backfill (`--backfill`) rather than routine.
    pub explicit: bool,
    /// Compute the diff with SELECTs only: no lock, no ledger row, nothing written.
    pub dry_run: bool,
    /// The run's clock.
    pub now: OffsetDateTime,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RunOutcome {
    /// How the process should exit (a dry run that succeeds exits 0).
    #[serde(serialize_with = "exit_as_code")]
    pub exit: RaterExit,
    /// How a real run would have exited, for a dry run; the same as `exit` otherwise.
    #[serde(serialize_with = "exit_as_code")]
    pub would_exit: RaterExit,
    /// What was rated; `None` when the lock was held elsewhere.
    pub report: Option<RateReport>,
    /// The `rater_runs` row, for a run that wrote one.
    pub run_id: Option<i64>,
}

fn exit_as_code<S: serde::Serializer>(exit: &RaterExit, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u8(exit.code())
}

/// [`run_until`] with no stop signal.
pub async fn run(
    pool: &PgPool,
    lock_options: &PgConnectOptions,
    request: RunRequest,
) -> Result<RunOutcome, RaterError> {
    run_until(pool, lock_options, request, std::future::pending()).await
}

/// One rater run.
///
/// A dry run computes the diff with SELECTs in a read-only transaction, without the lock or a
/// ledger row. A real run takes the single-flight lock (or records a skipped run and exits 3),
/// opens its `rater_runs` row, rates the window one day per transaction on the lock's own
/// connection (each day's counts and loss audit row commit with it), looks for late usage,
/// releases the lock, and closes the ledger row with the exit code the process will use.
/// When `stop` completes first the day in progress rolls back and the row is closed as
/// [`RaterError::Terminated`].
pub async fn run_until(
    pool: &PgPool,
    lock_options: &PgConnectOptions,
    request: RunRequest,
    stop: impl Future<Output = ()>,
) -> Result<RunOutcome, RaterError> {
    let stop = std::pin::pin!(stop);
    let mut stop = stop;
    if request.dry_run {
        return tokio::select! {
            result = dry_run(pool, request) => result,
            () = &mut stop => Err(RaterError::Terminated { days: 0 }),
        };
    }
    // A stop while the lock is being taken (it may wait on the fence row) is recorded like any
    // run that reached the database and did nothing.
    let acquiring = tokio::select! {
        acquired = SingleFlight::try_acquire(lock_options) => acquired,
        () = &mut stop => Err(RaterError::Terminated { days: 0 }),
    };
    let acquired = match acquiring {
        Ok(acquired) => acquired,
        Err(e) => {
            record_failed_start(pool, request, &e).await;
            return Err(e);
        }
    };
    let Some(lock) = acquired else {
        tracing::warn!("another rater holds the single-flight lock; nothing rated");
        let run_id = record_skipped(pool, request).await?;
        return Ok(RunOutcome {
            exit: RaterExit::Locked,
            would_exit: RaterExit::Locked,
            report: None,
            run_id: Some(run_id),
        });
    };
    let run_id: i64 = sqlx::query_scalar(
        "INSERT INTO rater_runs (started_at, window_start, window_end, explicit_window, dry_run) \
         VALUES ($1, $2, $3, $4, false) RETURNING id",
    )
    .bind(request.now)
    .bind(request.window.start())
    .bind(request.window.end())
    .bind(request.explicit)
    .fetch_one(pool)
    .await
    .map_err(db("record the run"))?;

    let mut committed = Committed::default();
    let work = locked_work(lock, request, run_id, &mut committed);
    let result = tokio::select! {
        result = work => result,
        () = &mut stop => Err(RaterError::Terminated { days: 0 }),
    };
    let result = match result {
        Err(RaterError::Terminated { .. }) => Err(RaterError::Terminated {
            days: committed.days,
        }),
        other => other,
    };
    // Losses a routine run committed (its own, or an earlier run's it took over) page however
    // the run ends: their audit rows are in, their hours are no longer marked, and no later run
    // would find them again.
    let result = match result {
        Err(source) if committed.losses > 0 => Err(RaterError::FailedAfterLosses {
            losses: committed.losses,
            source: Box::new(source),
        }),
        other => other,
    };
    let (exit, error, late) = match &result {
        Ok(report) => {
            let own = exit_code(report.losses(), request.explicit, report.has_anomaly());
            let exit = if committed.losses > 0 {
                RaterExit::Attention
            } else {
                own
            };
            (exit, None, report.late.as_ref().map_or(0, |l| l.events))
        }
        Err(e) => (e.exit(), Some(e.to_string()), 0),
    };
    let closed = close_ledger(pool, run_id, exit, error, late, &committed.taken_over).await;
    if let Err(unrecorded) = closed {
        // The run's own error (the database went away under it, say) is what the operator
        // needs; the ledger's is logged beside it, never in its place.
        tracing::error!(error = %unrecorded, run_id, "could not close the run's ledger row");
        result?;
        return Err(if committed.losses > 0 {
            RaterError::FailedAfterLosses {
                losses: committed.losses,
                source: Box::new(unrecorded),
            }
        } else {
            unrecorded
        });
    }
    let report = result?;
    Ok(RunOutcome {
        exit,
        would_exit: exit,
        report: Some(report),
        run_id: Some(run_id),
    })
}

/// Records a run that failed before it could take the lock (exit 1). Best effort: the same
/// database may be what failed, and the run's own error is the one to report.
async fn record_failed_start(pool: &PgPool, request: RunRequest, error: &RaterError) {
    let recorded = sqlx::query(
        "INSERT INTO rater_runs (started_at, finished_at, window_start, window_end, \
                                 explicit_window, dry_run, exit_code, error) \
         VALUES ($1, now(), $2, $3, $4, false, 1, $5)",
    )
    .bind(request.now)
    .bind(request.window.start())
    .bind(request.window.end())
    .bind(request.explicit)
    .bind(error.to_string())
    .execute(pool)
    .await;
    if let Err(e) = recorded {
        tracing::error!(error = %e, "could not record the failed run in rater_runs");
    }
}

async fn record_skipped(pool: &PgPool, request: RunRequest) -> Result<i64, RaterError> {
    sqlx::query_scalar(
        "INSERT INTO rater_runs (started_at, finished_at, window_start, window_end, \
                                 explicit_window, dry_run, exit_code, error) \
         VALUES ($1, now(), $2, $3, $4, false, 3, 'another rater holds the single-flight lock') \
         RETURNING id",
    )
    .bind(request.now)
    .bind(request.window.start())
    .bind(request.window.end())
    .bind(request.explicit)
    .fetch_one(pool)
    .await
    .map_err(db("record the skipped run"))
}

/// What a run has committed so far, kept outside its work so that a failure or a stop part way
/// still knows it.
#[derive(Default)]
struct Committed {
    /// Days committed.
    days: u32,
    /// Lost rated hours that page (a routine run's own, and those of the runs it took over).
    losses: u64,
    /// Earlier routine runs that ended before they finished with losses committed, whose
    /// losses this run reports; their ledger rows are closed with this run's.
    taken_over: Vec<i64>,
}

/// Closes the run's ledger row with `exit`, and in the same transaction the rows of the runs
/// it took over (so a run that cannot close its own row leaves theirs for the next run too).
async fn close_ledger(
    pool: &PgPool,
    run_id: i64,
    exit: RaterExit,
    error: Option<String>,
    late: u64,
    taken_over: &[i64],
) -> Result<(), RaterError> {
    let mut tx = pool.begin().await.map_err(db("record the run's outcome"))?;
    sqlx::query(
        "UPDATE rater_runs SET finished_at = now(), exit_code = $2, error = $3, late_events = $4 \
         WHERE id = $1",
    )
    .bind(run_id)
    .bind(i16::from(exit.code()))
    .bind(error)
    .bind(i64::try_from(late).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await
    .map_err(db("record the run's outcome"))?;
    if !taken_over.is_empty() {
        sqlx::query(
            "UPDATE rater_runs SET finished_at = now(), exit_code = $2, \
                    error = 'ended before it finished, after committing losses; run ' || $3 || \
                            ' reported them' \
             WHERE id = ANY($1) AND finished_at IS NULL",
        )
        .bind(taken_over)
        .bind(i16::from(RaterExit::Attention.code()))
        .bind(run_id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(db("close the ledger rows of the runs taken over"))?;
    }
    tx.commit().await.map_err(db("record the run's outcome"))
}

/// A routine run's first step under the lock: earlier routine runs whose ledger row is still
/// open (none can be running while this run holds the lock: each opens its row once it holds
/// it) ended before they finished, killed or unable to close their row. Those that had
/// committed losses never paged for them; this run takes them over.
async fn take_over_unreported_losses(
    conn: &mut PgConnection,
    run_id: i64,
    committed: &mut Committed,
) -> Result<(), RaterError> {
    let unreported: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT id, deleted, lowered FROM rater_runs \
          WHERE id <> $1 AND finished_at IS NULL AND NOT explicit_window AND NOT dry_run \
            AND (deleted > 0 OR lowered > 0) \
          ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("read earlier runs that ended before they finished"))?;
    for (id, deleted, lowered) in unreported {
        let losses = u64::try_from(deleted.saturating_add(lowered)).unwrap_or(0);
        tracing::error!(
            run_id = id,
            losses,
            "an earlier routine run ended before it finished (killed, or its ledger row could not \
             be closed) after committing losses it never paged for; this run reports them"
        );
        committed.losses = committed.losses.saturating_add(losses);
        committed.taken_over.push(id);
    }
    Ok(())
}

async fn locked_work(
    mut lock: SingleFlight,
    request: RunRequest,
    run_id: i64,
    committed: &mut Committed,
) -> Result<RateReport, RaterError> {
    let (pid, fence) = (lock.pid, lock.fence);
    let days = request.window.days();
    if !request.explicit {
        take_over_unreported_losses(lock.connection(), run_id, committed).await?;
    }
    let scope = rating_scope(lock.connection(), request.explicit).await?;
    match &scope {
        Scope::Changed => tracing::info!("rating the groups whose events changed"),
        Scope::Whole { reasons, .. } => {
            tracing::info!(reasons = %reasons, "rating the whole window");
        }
    }
    let mut total = RateReport::default();
    for (i, day) in days.iter().enumerate() {
        let started = std::time::Instant::now();
        let conn = lock.connection();
        let mut tx = conn
            .begin()
            .await
            .map_err(db("begin a rating transaction"))?;
        set_rating_work_mem(&mut tx).await?;
        SingleFlight::verify(&mut tx, pid, fence).await?;
        let report = match scope {
            Scope::Changed => rate_changed(&mut tx, *day, request.now).await?,
            Scope::Whole { .. } => rate_window(&mut tx, *day, request.now).await?,
        };
        if let Scope::Whole { consume, .. } = &scope
            && i + 1 == days.len()
            && !consume.is_empty()
        {
            sqlx::query("DELETE FROM rating_change_all WHERE id = ANY($1)")
                .bind(consume)
                .execute(&mut *tx)
                .await
                .map_err(db("consume the whole-window markers"))?;
            // A price change reaches behind the window too: every rated hour before it that is
            // no longer billed at its hour's price gets a change marker, so the late-usage check
            // pages for it (and prints its backfill) on every run until it is re-rated.
            sqlx::query(REPRICED_BEFORE_WINDOW)
                .bind(request.window.start())
                .execute(&mut *tx)
                .await
                .map_err(db("mark rated hours a price change reached"))?;
        }
        if report.losses() > 0 {
            let kind = if request.explicit {
                AuditKind::RaterBackfillReconciled
            } else {
                AuditKind::RaterReconcileDeleted
            };
            let attributes = loss_attributes(&report, *day, request.explicit, Some(run_id))?;
            let event = AuditEvent::new(
                kind,
                Actor::parse("keel-rater").unwrap_or_else(|_| Actor::system()),
                request.now,
            )
            .with_attributes(attributes);
            keel_audit::postgres::insert(&mut tx, &event).await?;
        }
        sqlx::query(
            "UPDATE rater_runs SET inserted = inserted + $2, updated = updated + $3, \
                    unchanged = unchanged + $4, deleted = deleted + $5, anomalies = anomalies + $6, \
                    lowered = lowered + $7, days_committed = days_committed + 1 WHERE id = $1",
        )
        .bind(run_id)
        .bind(count(report.inserted.count))
        .bind(count(report.updated.count))
        .bind(count(report.unchanged))
        .bind(count(report.deleted.count + report.price_lost.count))
        .bind(count(
            report.unpriced.count + report.price_lost.count + report.out_of_range.count,
        ))
        .bind(count(report.lowered.count))
        .execute(&mut *tx)
        .await
        .map_err(db("record the day's counts"))?;
        SingleFlight::verify(&mut tx, pid, fence).await?;
        tx.commit()
            .await
            .map_err(db("commit a rating transaction"))?;
        committed.days += 1;
        if !request.explicit {
            committed.losses = committed.losses.saturating_add(report.losses());
        }
        tracing::info!(
            day = i + 1,
            of = days.len(),
            window = %day,
            seconds = started.elapsed().as_secs_f64(),
            written = report.rows_written(),
            "rated"
        );
        log_day(&report, *day, request.explicit, false);
        total.absorb(report);
    }
    total.late = find_late_usage(lock.connection(), request.window.start(), false).await?;
    log_late(total.late.as_ref(), false);
    lock.release().await?;
    Ok(total)
}

/// What a run rates.
enum Scope {
    /// The groups with change markers (a routine run with no whole-window marker pending).
    Changed,
    /// Every hour of the window: an explicit backfill, or whole-window markers are pending
    /// (`consume`: their ids, deleted with the last day; empty for a backfill).
    Whole { consume: Vec<i64>, reasons: String },
}

/// A backfill rates its whole window; a routine run too when a price changed (or
/// `billing_event` was truncated) since the last routine run that rated a whole window.
async fn rating_scope(conn: &mut PgConnection, explicit: bool) -> Result<Scope, RaterError> {
    if explicit {
        return Ok(Scope::Whole {
            consume: Vec::new(),
            reasons: "explicit window".to_owned(),
        });
    }
    let (ids, reasons): (Vec<i64>, Option<String>) = sqlx::query_as(
        "SELECT coalesce(array_agg(id ORDER BY id), '{}'),                 string_agg(DISTINCT reason, ', ') FROM rating_change_all",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(db("read the whole-window markers"))?;
    Ok(if ids.is_empty() {
        Scope::Changed
    } else {
        Scope::Whole {
            consume: ids,
            reasons: reasons.unwrap_or_default(),
        }
    })
}

async fn set_rating_work_mem(conn: &mut PgConnection) -> Result<(), RaterError> {
    sqlx::query("SELECT set_config('work_mem', $1, true), set_config('jit', 'off', true)")
        .bind(RATING_WORK_MEM)
        .execute(&mut *conn)
        .await
        .map_err(db("set the rating work_mem"))?;
    Ok(())
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

async fn dry_run(pool: &PgPool, request: RunRequest) -> Result<RunOutcome, RaterError> {
    let mut conn = pool.acquire().await.map_err(db("open a connection"))?;
    let mut tx = conn
        .begin()
        .await
        .map_err(db("begin a read-only transaction"))?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db("make the dry run read-only"))?;
    set_rating_work_mem(&mut tx).await?;
    let mut total = RateReport::default();
    for day in request.window.days() {
        let report = preview_window(&mut tx, day).await?;
        log_day(&report, day, request.explicit, true);
        total.absorb(report);
    }
    // A routine run takes a pending price change's whole-window marker and marks the rated
    // hours before its window that the change reaches; the preview judges those too.
    let reprices = !request.explicit
        && sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM rating_change_all)")
            .fetch_one(&mut *tx)
            .await
            .map_err(db("look for a pending price change"))?;
    total.late = late_usage(&mut tx, request.window.start(), Some(reprices)).await?;
    log_late(total.late.as_ref(), true);
    tx.rollback().await.map_err(db("end the dry run"))?;
    let would_exit = exit_code(total.losses(), request.explicit, total.has_anomaly());
    Ok(RunOutcome {
        exit: RaterExit::Clean,
        would_exit,
        report: Some(total),
        run_id: None,
    })
}

/// The first few changes of a kind, for one bounded log field.
fn sample(changes: &Changes) -> String {
    let mut shown = changes
        .details
        .iter()
        .take(10)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if changes.count > 10 {
        shown.push_str(&format!("; and {} more", changes.count - 10));
    }
    shown
}

fn log_day(report: &RateReport, day: Window, explicit: bool, dry_run: bool) {
    let (verb, lost_verb) = if dry_run {
        ("would not rate", "would lower or remove")
    } else {
        ("not rated", "lowered or removed")
    };
    for (changes, what) in [
        (&report.unpriced, "events with no effective price"),
        (
            &report.price_lost,
            "rated hours lost their effective price; the stale rated rows",
        ),
        (
            &report.out_of_range,
            "hours beyond the money model's range (quantity or amount >= 10^18)",
        ),
    ] {
        if !changes.is_empty() {
            if dry_run {
                tracing::warn!(window = %day, count = changes.count, hours = %sample(changes),
                    "dry run: {what}: {verb} (a real run pages)");
            } else {
                tracing::error!(window = %day, count = changes.count, hours = %sample(changes),
                    "{what}: {verb} (anomaly)");
            }
        }
    }
    let losses = report.losses();
    if losses == 0 {
        return;
    }
    let details = [
        ("deleted", &report.deleted),
        ("lowered", &report.lowered),
        ("price lost", &report.price_lost),
    ]
    .into_iter()
    .filter(|(_, changes)| !changes.is_empty())
    .map(|(label, changes)| format!("{label}: {}", sample(changes)))
    .collect::<Vec<_>>()
    .join(" | ");
    let (deleted, lowered) = (report.deleted.count, report.lowered.count);
    match (deletion_severity(explicit), dry_run) {
        (DeletionSeverity::Error, false) => tracing::error!(
            window = %day, count = losses, deleted, lowered, changes = %details,
            "routine run {lost_verb} previously rated usage: billed events vanished or an upstream regression dropped them"
        ),
        (DeletionSeverity::Error, true) => tracing::warn!(
            window = %day, count = losses, deleted, lowered, changes = %details,
            "dry run: a routine run {lost_verb} previously rated usage (it would page)"
        ),
        (DeletionSeverity::Info, _) => tracing::info!(
            window = %day, count = losses, deleted, lowered, dry_run, changes = %details,
            "backfill reconciled previously rated usage"
        ),
    }
}

fn log_late(late: Option<&LateUsage>, dry_run: bool) {
    let Some(late) = late else { return };
    let command = late.backfill_command();
    if dry_run {
        tracing::warn!(events = late.events, hours = late.hours, lowered_hours = late.lowered, command = %command,
            "dry run: late usage outside the window is not rated yet");
    } else {
        tracing::error!(events = late.events, hours = late.hours, lowered_hours = late.lowered, command = %command,
            "late usage: events arrived, changed or were deleted after their hours left the routine window and are not rated (anomaly); run the backfill command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_statements_cap_details_at_detail_cap() {
        let tail = format!("LIMIT {}) d", crate::DETAIL_CAP);
        for statement in [RATE_APPLY, RATE_CHANGED, RATE_PREVIEW] {
            assert!(statement.trim_end().ends_with(&tail), "{statement}");
        }
        for read_only in [RATE_PREVIEW, LATE_USAGE_PREVIEW] {
            assert!(!read_only.contains("INSERT") && !read_only.contains("DELETE"));
        }
    }
}
