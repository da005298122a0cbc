//! Postgres adapters (feature `postgres`): idempotent ingest, rating and reconcile, the
//! single-flight lock, the run ledger, and a whole run.
//!
//! # Single flight
//!
//! The reconcile DELETE and the ordered upsert are deadlock-free only when no two raters work on
//! overlapping windows at once. The scheduler should forbid concurrency (`concurrencyPolicy:
//! Forbid`), and the rater enforces it too: a session advisory lock held on a dedicated
//! connection for the whole run (never a pooled one, so a transaction-pooling proxy cannot hand
//! the lock to someone else). A rater that cannot take the lock exits 3 without writing.

use std::fmt;

use keel_audit::{Actor, AuditEvent, AuditKind};
use rust_decimal::Decimal;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use time::OffsetDateTime;

use crate::exit::{DeletionSeverity, RaterExit, deletion_severity, exit_code};
use crate::ingest::BillingEvent;
use crate::window::Window;

/// The advisory lock key every rater takes ("keelrate" in ASCII).
pub const SINGLE_FLIGHT_KEY: i64 = 0x6b65_656c_7261_7465;

/// Why a rater operation failed.
#[derive(Debug, thiserror::Error)]
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
    /// The audit row for a reconcile deletion could not be written, so the run rolled back.
    #[error("could not write the reconcile audit row: {0}")]
    Audit(#[from] keel_audit::AuditSinkError),
}

fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> RaterError {
    move |source| RaterError::Database { operation, source }
}

/// What recording an event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingested {
    /// A new event.
    Recorded,
    /// This event id was recorded before; nothing changed (the dedupe is permanent).
    Duplicate,
}

/// Records one billing event; a duplicate event id is reported, never counted twice.
pub async fn record_event(
    conn: &mut PgConnection,
    event: &BillingEvent,
) -> Result<Ingested, RaterError> {
    let inserted = sqlx::query(
        "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(event.event_id())
    .bind(event.auth_id())
    .bind(event.meter())
    .bind(event.quantity())
    .bind(event.occurred_at())
    .execute(conn)
    .await
    .map_err(db("record a billing event"))?
    .rows_affected();
    Ok(if inserted == 1 {
        Ingested::Recorded
    } else {
        Ingested::Duplicate
    })
}

/// The reconcile: delete rated rows in `[$1, $2)` whose (auth_id, meter, hour) has no events
/// left. It filters `rated_usage` on `window_start` alone, which is what
/// `rated_usage_window_start_ix` exists for (every other index leads with `auth_id`).
pub const RECONCILE_DELETE: &str = "WITH deleted AS ( \
       DELETE FROM rated_usage r \
       WHERE r.window_start >= $1 AND r.window_start < $2 \
         AND NOT EXISTS ( \
           SELECT 1 FROM billing_event e \
           WHERE e.auth_id = r.auth_id AND e.meter = r.meter \
             AND e.occurred_at >= r.window_start \
             AND e.occurred_at < r.window_start + interval '1 hour') \
       RETURNING r.auth_id, r.meter, r.window_start, r.amount \
     ) \
     SELECT 'deleted' AS what, auth_id, meter, window_start, amount FROM deleted \
     ORDER BY auth_id, meter, window_start";

/// One rated hour of one meter for one auth id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct UsageKey {
    /// Whose usage.
    pub auth_id: String,
    /// Which meter.
    pub meter: String,
    /// The hour.
    #[serde(with = "time::serde::rfc3339")]
    pub window_start: OffsetDateTime,
}

impl fmt::Display for UsageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hour = self
            .window_start
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|_| fmt::Error)?;
        write!(f, "{}/{}@{hour}", self.auth_id, self.meter)
    }
}

/// A rated row the run inserted, updated or deleted, with its amount.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RatedChange {
    /// Which row.
    #[serde(flatten)]
    pub key: UsageKey,
    /// Its amount (for a deletion: the amount that was billed).
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// What rating a window did (or, in a dry run, would do).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateReport {
    /// New rated rows.
    pub inserted: Vec<RatedChange>,
    /// Rated rows whose quantity, price or amount changed.
    pub updated: Vec<RatedChange>,
    /// Rated rows already right, left untouched.
    pub unchanged: u64,
    /// Previously rated rows whose events are gone: the reconcile deletions.
    pub deleted: Vec<RatedChange>,
    /// Hours with events but no effective price: not rated, an anomaly.
    pub unpriced: Vec<UsageKey>,
}

impl RateReport {
    /// Whether something is wrong enough to page for, whatever the window.
    pub fn has_anomaly(&self) -> bool {
        !self.unpriced.is_empty()
    }

    fn absorb(&mut self, other: RateReport) {
        self.inserted.extend(other.inserted);
        self.updated.extend(other.updated);
        self.unchanged += other.unchanged;
        self.deleted.extend(other.deleted);
        self.unpriced.extend(other.unpriced);
    }
}

#[derive(sqlx::FromRow)]
struct RatingRow {
    what: String,
    auth_id: Option<String>,
    meter: Option<String>,
    window_start: Option<OffsetDateTime>,
    amount: Option<Decimal>,
}

fn change(row: RatingRow) -> Option<(String, RatedChange)> {
    Some((
        row.what,
        RatedChange {
            key: UsageKey {
                auth_id: row.auth_id?,
                meter: row.meter?,
                window_start: row.window_start?,
            },
            amount: row.amount.unwrap_or(Decimal::ZERO),
        },
    ))
}

/// Rates `window` on `conn` (pass a transaction): aggregates `billing_event` per (auth id,
/// meter, UTC hour) once, prices it with the newest effective price at the hour's start (looked
/// up once per meter and hour), upserts `rated_usage` in (auth_id, meter, window_start) order,
/// then deletes rated rows in the window whose events are gone.
///
/// Only rows that differ from what is stored reach the upsert: `ON CONFLICT DO UPDATE … WHERE`
/// would still lock (and so write) every conflicting row, and an unchanged re-run must write
/// nothing.
pub async fn rate_window(
    conn: &mut PgConnection,
    window: Window,
    rated_at: OffsetDateTime,
) -> Result<RateReport, RaterError> {
    let rows: Vec<RatingRow> = sqlx::query_as(
        "WITH agg AS ( \
           SELECT auth_id, meter, \
                  date_bin('1 hour', occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS window_start, \
                  sum(quantity) AS quantity, count(*) AS event_count \
           FROM billing_event WHERE occurred_at >= $1 AND occurred_at < $2 \
           GROUP BY 1, 2, 3 \
         ), hour_prices AS ( \
           SELECT h.meter, h.window_start, p.unit_price, p.currency \
           FROM (SELECT DISTINCT meter, window_start FROM agg) h \
           LEFT JOIN LATERAL ( \
             SELECT unit_price, currency FROM prices \
             WHERE prices.meter = h.meter AND prices.effective_from <= h.window_start \
             ORDER BY effective_from DESC LIMIT 1 \
           ) p ON true \
         ), priced AS MATERIALIZED ( \
           SELECT a.auth_id, a.meter, a.window_start, a.quantity, a.event_count, \
                  hp.unit_price, hp.currency, a.quantity * hp.unit_price AS amount \
           FROM agg a JOIN hour_prices hp USING (meter, window_start) \
         ), changed AS ( \
           SELECT p.* FROM priced p \
           LEFT JOIN rated_usage r \
             ON r.auth_id = p.auth_id AND r.meter = p.meter AND r.window_start = p.window_start \
           WHERE p.unit_price IS NOT NULL \
             AND (r.id IS NULL \
                  OR (r.quantity, r.unit_price, r.amount, r.currency, r.event_count) \
                     IS DISTINCT FROM (p.quantity, p.unit_price, p.amount, p.currency, p.event_count)) \
         ), upserted AS ( \
           INSERT INTO rated_usage AS r \
             (auth_id, meter, window_start, quantity, unit_price, amount, currency, event_count, rated_at) \
           SELECT auth_id, meter, window_start, quantity, unit_price, amount, currency, event_count, $3 \
           FROM changed \
           ORDER BY auth_id, meter, window_start \
           ON CONFLICT (auth_id, meter, window_start) DO UPDATE SET \
             quantity = EXCLUDED.quantity, unit_price = EXCLUDED.unit_price, amount = EXCLUDED.amount, \
             currency = EXCLUDED.currency, event_count = EXCLUDED.event_count, rated_at = EXCLUDED.rated_at \
           WHERE (r.quantity, r.unit_price, r.amount, r.currency, r.event_count) \
                 IS DISTINCT FROM (EXCLUDED.quantity, EXCLUDED.unit_price, EXCLUDED.amount, \
                                   EXCLUDED.currency, EXCLUDED.event_count) \
           RETURNING r.auth_id, r.meter, r.window_start, r.amount, (r.xmax = 0) AS inserted \
         ) \
         SELECT CASE WHEN inserted THEN 'inserted' ELSE 'updated' END AS what, \
                auth_id, meter, window_start, amount FROM upserted \
         UNION ALL \
         SELECT 'unpriced', auth_id, meter, window_start, NULL FROM priced WHERE unit_price IS NULL \
         UNION ALL \
         SELECT 'priced', NULL, NULL, NULL, count(*)::numeric FROM priced WHERE unit_price IS NOT NULL",
    )
    .bind(window.start())
    .bind(window.end())
    .bind(rated_at)
    .fetch_all(&mut *conn)
    .await
    .map_err(db("rate the window"))?;

    let mut report = RateReport::default();
    let mut priced = 0u64;
    for row in rows {
        if row.what == "priced" {
            priced = row.amount.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
            continue;
        }
        let Some((what, change)) = change(row) else {
            continue;
        };
        match what.as_str() {
            "inserted" => report.inserted.push(change),
            "updated" => report.updated.push(change),
            "unpriced" => report.unpriced.push(change.key),
            other => tracing::error!(what = other, "unexpected row from the rating statement"),
        }
    }
    report.unchanged = priced.saturating_sub((report.inserted.len() + report.updated.len()) as u64);

    let deleted: Vec<RatingRow> = sqlx::query_as(RECONCILE_DELETE)
        .bind(window.start())
        .bind(window.end())
        .fetch_all(&mut *conn)
        .await
        .map_err(db("reconcile rated usage"))?;
    report.deleted = deleted
        .into_iter()
        .filter_map(change)
        .map(|(_, c)| c)
        .collect();
    for list in [&mut report.inserted, &mut report.updated] {
        list.sort_by(|a, b| a.key.cmp(&b.key));
    }
    report.unpriced.sort();
    Ok(report)
}

/// The single-flight lock, held on a dedicated connection for the whole run.
#[derive(Debug)]
pub struct SingleFlight {
    conn: PgConnection,
}

impl SingleFlight {
    /// Takes the lock, or returns `None` at once if another rater holds it.
    pub async fn try_acquire(options: &PgConnectOptions) -> Result<Option<Self>, RaterError> {
        let mut conn = PgConnection::connect_with(options)
            .await
            .map_err(db("open the single-flight connection"))?;
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(SINGLE_FLIGHT_KEY)
            .fetch_one(&mut conn)
            .await
            .map_err(db("take the single-flight lock"))?;
        if taken {
            Ok(Some(Self { conn }))
        } else {
            let _ = conn.close().await;
            Ok(None)
        }
    }

    /// Releases the lock and closes its connection (closing alone would release it too).
    pub async fn release(mut self) -> Result<(), RaterError> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(SINGLE_FLIGHT_KEY)
            .execute(&mut self.conn)
            .await
            .map_err(db("release the single-flight lock"))?;
        self.conn
            .close()
            .await
            .map_err(db("close the single-flight connection"))
    }
}

/// How a run was asked for.
#[derive(Clone, Copy, Debug)]
pub struct RunRequest {
    /// The window to rate.
    pub window: Window,
    /// Whether the window was given explicitly (a backfill) rather than defaulted (routine).
    pub explicit: bool,
    /// Compute the diff without writing anything.
    pub dry_run: bool,
    /// The run's clock.
    pub now: OffsetDateTime,
}

/// What a run did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RunOutcome {
    /// How the process should exit.
    #[serde(serialize_with = "exit_as_code")]
    pub exit: RaterExit,
    /// What was rated; `None` when the lock was held elsewhere.
    pub report: Option<RateReport>,
}

fn exit_as_code<S: serde::Serializer>(exit: &RaterExit, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u8(exit.code())
}

/// One rater run: take the single-flight lock (or exit 3 without writing), record the run in
/// `rater_runs`, rate the window one day per transaction (each day's reconcile deletions commit
/// with a `rater.reconcile_deleted` audit row), log and decide the exit, and record the outcome.
pub async fn run(
    pool: &PgPool,
    lock_options: &PgConnectOptions,
    request: RunRequest,
) -> Result<RunOutcome, RaterError> {
    let Some(lock) = SingleFlight::try_acquire(lock_options).await? else {
        tracing::warn!("another rater holds the single-flight lock; nothing written");
        return Ok(RunOutcome {
            exit: RaterExit::Locked,
            report: None,
        });
    };
    let result = run_locked(pool, request).await;
    let released = lock.release().await;
    let outcome = result?;
    released?;
    Ok(outcome)
}

async fn run_locked(pool: &PgPool, request: RunRequest) -> Result<RunOutcome, RaterError> {
    let RunRequest {
        window,
        explicit,
        dry_run,
        now,
    } = request;
    let run_id: Option<i64> = if dry_run {
        None
    } else {
        Some(
            sqlx::query_scalar(
                "INSERT INTO rater_runs (started_at, window_start, window_end, explicit_window, dry_run) \
                 VALUES ($1, $2, $3, $4, false) RETURNING id",
            )
            .bind(now)
            .bind(window.start())
            .bind(window.end())
            .bind(explicit)
            .fetch_one(pool)
            .await
            .map_err(db("record the run"))?,
        )
    };
    let rated = rate_days(pool, window, explicit, dry_run, now).await;
    let (report, exit, error) = match rated {
        Ok(report) => {
            let exit = exit_code(report.deleted.len() as u64, explicit, report.has_anomaly());
            (Some(report), exit, None)
        }
        Err(e) => (None, RaterExit::Error, Some(e)),
    };
    if let Some(id) = run_id {
        let counts = report.as_ref();
        sqlx::query(
            "UPDATE rater_runs SET finished_at = $2, inserted = $3, updated = $4, unchanged = $5, \
                    deleted = $6, anomalies = $7, exit_code = $8, error = $9 WHERE id = $1",
        )
        .bind(id)
        .bind(OffsetDateTime::now_utc())
        .bind(counts.map_or(0, |r| r.inserted.len() as i64))
        .bind(counts.map_or(0, |r| r.updated.len() as i64))
        .bind(counts.map_or(0, |r| r.unchanged as i64))
        .bind(counts.map_or(0, |r| r.deleted.len() as i64))
        .bind(counts.map_or(0, |r| r.unpriced.len() as i64))
        .bind(i16::from(exit.code()))
        .bind(error.as_ref().map(ToString::to_string))
        .execute(pool)
        .await
        .map_err(db("record the run's outcome"))?;
    }
    match error {
        Some(e) => Err(e),
        None => Ok(RunOutcome { exit, report }),
    }
}

async fn rate_days(
    pool: &PgPool,
    window: Window,
    explicit: bool,
    dry_run: bool,
    now: OffsetDateTime,
) -> Result<RateReport, RaterError> {
    let days = window.days();
    let mut total = RateReport::default();
    for (i, day) in days.iter().enumerate() {
        let mut tx = pool
            .begin()
            .await
            .map_err(db("begin a rating transaction"))?;
        let report = rate_window(&mut tx, *day, now).await?;
        if !report.deleted.is_empty() && !dry_run {
            keel_audit::postgres::insert(&mut tx, &reconcile_event(&report, *day, explicit, now))
                .await?;
        }
        if dry_run {
            tx.rollback().await.map_err(db("roll back a dry run"))?;
        } else {
            tx.commit()
                .await
                .map_err(db("commit a rating transaction"))?;
        }
        if days.len() > 1 {
            tracing::info!(day = i + 1, of = days.len(), window = %day, "rated");
        }
        log_day(&report, *day, explicit, dry_run);
        total.absorb(report);
    }
    Ok(total)
}

fn reconcile_event(
    report: &RateReport,
    day: Window,
    explicit: bool,
    now: OffsetDateTime,
) -> AuditEvent {
    let keys: Vec<String> = report
        .deleted
        .iter()
        .take(20)
        .map(|c| c.key.to_string())
        .collect();
    let mut keys = keys.join(" ");
    keys.truncate(keel_audit::MAX_ATTR_VALUE_LEN);
    let mut attributes = keel_audit::Attributes::new();
    for (key, value) in [
        ("deleted_count", report.deleted.len().to_string()),
        ("window_start", day.start().to_string()),
        ("window_end", day.end().to_string()),
        ("explicit_window", explicit.to_string()),
        ("deleted_keys", keys),
    ] {
        // Every value is built here from validated ids and numbers; one refused would only
        // thin the attributes, never lose the audit row.
        let _ = attributes.insert(key, value);
    }
    AuditEvent::new(
        AuditKind::RaterReconcileDeleted,
        Actor::parse("keel-rater").unwrap_or_else(|_| Actor::system()),
        now,
    )
    .with_attributes(attributes)
}

fn log_day(report: &RateReport, day: Window, explicit: bool, dry_run: bool) {
    for key in &report.unpriced {
        tracing::error!(key = %key, "events with no effective price: not rated (anomaly)");
    }
    if report.deleted.is_empty() {
        return;
    }
    let keys: Vec<String> = report
        .deleted
        .iter()
        .map(|c| format!("{} ({})", c.key, c.amount))
        .collect();
    let keys = keys.join(", ");
    let count = report.deleted.len();
    match deletion_severity(explicit) {
        DeletionSeverity::Error => tracing::error!(
            window = %day, count, dry_run, deleted = %keys,
            "routine run deleted previously rated usage: billed events vanished or an upstream regression dropped them"
        ),
        DeletionSeverity::Info => tracing::info!(
            window = %day, count, dry_run, deleted = %keys,
            "backfill reconciled previously rated usage"
        ),
    }
}
