//! Postgres adapters (feature `postgres`): the live-token lookup on `resources`, the inventory
//! of customer databases on the shared cluster, the durable sweep state (period claims and
//! sightings), and the single-flight tick lock.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, PoisonError};

use keel_provision::postgres::{
    COMMENT_MAX_BYTES, bounded_database_comment_sql, comment_keys, oversized_database_comment_sql,
};
use keel_provision::{DATABASE_PREFIX, InstallationId, TokenDigest};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection, PgPool};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ports::{
    Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens, LiveTokensError,
    PeriodClaim, Sighting, SightingChanges, Standings, StateError, SweepState,
};

/// Which tokens are live, read from `resources` in one set-based query (two halves at once, on
/// two connections, for a large inventory).
#[derive(Clone, Debug)]
pub struct PgLiveTokens {
    pool: PgPool,
}

impl PgLiveTokens {
    /// A lookup over `pool` (the platform database).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

/// Above this many distinct digests the read is split into two halves, read at once on two
/// connections (the server probes the index for each half on its own core).
const SPLIT_ABOVE: usize = 8_192;

/// The standing of the digests in `$1`, answered by their 1-based position in `$1`, so no digest
/// comes back as text. One index probe per digest (`resources_token_digest_ix`); the caller sends
/// each digest once, so nothing is deduplicated on the server. Liveness is "not terminal", so a
/// status this build does not know counts as live (fails closed); ownership is any row.
const STANDING_SQL: &str = "\
SELECT keel_installation_id(), \
       coalesce(array_agg(f.i::int4) FILTER (WHERE f.live), '{}'), \
       coalesce(array_agg(f.i::int4), '{}'), \
       (SELECT coalesce(array_agg(w.i::int4), '{}') \
          FROM unnest($1::text[]) WITH ORDINALITY AS w(d, i) \
          JOIN reclaim_protections p ON p.token_digest = w.d) \
  FROM (SELECT w.i, l.live \
          FROM unnest($1::text[]) WITH ORDINALITY AS w(d, i) \
         CROSS JOIN LATERAL (SELECT bool_or(r.status NOT IN ('deleted', 'failed')) AS live \
                               FROM resources r WHERE r.token_digest = w.d) AS l \
         WHERE l.live IS NOT NULL) AS f";

/// What one read answered: the installation, then positions (1-based) of live, owned and
/// protected digests among those asked.
type StandingRow = (uuid::Uuid, Vec<i32>, Vec<i32>, Vec<i32>);

impl PgLiveTokens {
    /// Reads the standing of `wanted` (distinct) in one statement, in a transaction whose
    /// settings suit a read of many keys: no JIT compilation (it costs more than the read) and
    /// enough `work_mem` that the list of digests never spills to disk.
    ///
    /// The connection's buffers are shrunk after it: a read of 50 000 digests grows each of the
    /// two connections' buffers by megabytes, which the pool would otherwise keep until the
    /// connection closes.
    async fn read(&self, wanted: &[&TokenDigest]) -> Result<StandingRow, sqlx::Error> {
        let texts: Vec<&str> = wanted.iter().map(|d| d.as_str()).collect();
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT set_config('jit', 'off', true), set_config('work_mem', '32MB', true)")
            .execute(&mut *tx)
            .await?;
        let row: StandingRow = sqlx::query_as(STANDING_SQL)
            .bind(&texts)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        conn.shrink_buffers();
        Ok(row)
    }
}

/// The digests at `positions` (1-based, into the `wanted` list each comes with), as a set; a
/// position outside its list is an error (the answer does not match the question).
fn digests_at(
    parts: &[(&[&TokenDigest], &[i32])],
) -> Result<HashSet<TokenDigest>, LiveTokensError> {
    let mut set = HashSet::with_capacity(parts.iter().map(|(_, p)| p.len()).sum());
    for &(wanted, positions) in parts {
        for &position in positions {
            let digest = usize::try_from(position)
                .ok()
                .and_then(|p| p.checked_sub(1))
                .and_then(|i| wanted.get(i))
                .ok_or_else(|| {
                    LiveTokensError("the standing read answered a position it was not asked".into())
                })?;
            set.insert((*digest).clone());
        }
    }
    Ok(set)
}

/// `digests` each once, in byte order. Sorted by their first eight bytes first, held beside
/// each reference, so most comparisons never leave the vector being sorted; ties fall back to
/// the whole digest, so the order is exactly the digests' byte order.
fn sorted_distinct(digests: &[TokenDigest]) -> Vec<&TokenDigest> {
    let prefix = |digest: &TokenDigest| {
        let mut head = [0_u8; 8];
        let bytes = digest.as_str().as_bytes();
        let n = bytes.len().min(8);
        head[..n].copy_from_slice(&bytes[..n]);
        u64::from_be_bytes(head)
    };
    let mut keyed: Vec<(u64, &TokenDigest)> = digests.iter().map(|d| (prefix(d), d)).collect();
    keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    let mut wanted: Vec<&TokenDigest> = keyed.into_iter().map(|(_, d)| d).collect();
    wanted.dedup();
    wanted
}

impl LiveTokens for PgLiveTokens {
    async fn standing_among(&self, digests: &[TokenDigest]) -> Result<Standings, LiveTokensError> {
        // Each digest once, sorted: the server probes the index in key order, with no
        // deduplication of its own.
        let wanted = sorted_distinct(digests);
        let halves: [&[&TokenDigest]; 2] = if wanted.len() > SPLIT_ABOVE {
            let (a, b) = wanted.split_at(wanted.len() / 2);
            [a, b]
        } else {
            [&wanted, &[]]
        };
        let (first, second) = if halves[1].is_empty() {
            (self.read(halves[0]).await, None)
        } else {
            let (a, b) = tokio::join!(self.read(halves[0]), self.read(halves[1]));
            (a, Some(b))
        };
        let fail = |e: sqlx::Error| LiveTokensError(Box::new(e));
        let first = first.map_err(fail)?;
        let second = second.transpose().map_err(fail)?;
        let rows: Vec<(&[&TokenDigest], StandingRow)> = halves
            .iter()
            .copied()
            .zip([Some(first), second])
            .filter_map(|(half, row)| row.map(|row| (half, row)))
            .collect();
        let installation = rows.first().map(|(_, row)| row.0);
        if rows.iter().any(|(_, row)| Some(row.0) != installation) {
            return Err(LiveTokensError(
                "the installation changed between the two halves of the standing read".into(),
            ));
        }
        let parts = |pick: fn(&StandingRow) -> &[i32]| -> Vec<(&[&TokenDigest], &[i32])> {
            rows.iter().map(|(half, row)| (*half, pick(row))).collect()
        };
        let (live, owned, protected) = (parts(|r| &r.1), parts(|r| &r.2), parts(|r| &r.3));
        // The live and owned sets are built at once for a large answer (two threads).
        let (live, owned) = if crate::split::worth_two(wanted.len()) {
            crate::split::both(|| digests_at(&live), || digests_at(&owned))
        } else {
            (digests_at(&live), digests_at(&owned))
        };
        let mut standings =
            Standings::empty(InstallationId::from_uuid(installation.unwrap_or_default()));
        standings.live = live?;
        standings.owned = owned?;
        standings.protected = digests_at(&protected)?;
        Ok(standings)
    }
}

/// The customer databases (`cust_*`) on the shared cluster.
///
/// Labels and annotations come from the database's `COMMENT` (a JSON document keel-provision
/// writes: `{"labels": {…}, "annotations": {…}}`); an operator protects a database by adding
/// `"keel.dev/protect": "true"` to its annotations. The creation time is the
/// earlier of the `keel.dev/created-at` annotation and (when the role may call `pg_stat_file`) the
/// time of the database's `PG_VERSION` file, either one alone when the other is missing, else
/// unknown — and an item of unknown age is never a candidate. A comment longer than
/// [`COMMENT_MAX_BYTES`] is not read (its database carries no labels; logged at WARN).
#[derive(Clone, Debug)]
pub struct PgDatabaseInventory {
    admin: PgPool,
}

impl PgDatabaseInventory {
    /// An inventory over `admin` (any database on the shared cluster).
    pub fn new(admin: PgPool) -> Self {
        Self { admin }
    }
}

#[derive(serde::Deserialize, Default)]
struct Comment {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Inventory for PgDatabaseInventory {
    fn source(&self) -> InventorySource {
        InventorySource::Postgres
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        let page_error = |e: sqlx::Error| InventoryError::Page {
            page: 1,
            source: Box::new(e),
        };
        let can_stat: bool = sqlx::query_scalar(
            "SELECT has_function_privilege('pg_stat_file(text, boolean)', 'execute')",
        )
        .fetch_one(&self.admin)
        .await
        .map_err(page_error)?;
        // A comment is its database owner's (the customer's) to write, up to a gigabyte: only
        // a bounded one is read, and a longer one is read as none (no labels: never reclaimed).
        let rows: Vec<(String, Option<String>, bool, Option<OffsetDateTime>)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT d.datname::text, {}, {}, \
                        CASE WHEN $2 THEN (pg_stat_file('base/' || d.oid || '/PG_VERSION', true)).modification END \
                   FROM pg_database d \
                  WHERE starts_with(d.datname, $1) \
                  ORDER BY d.datname",
                bounded_database_comment_sql(),
                oversized_database_comment_sql(),
            )))
        .bind(DATABASE_PREFIX)
        .bind(can_stat)
        .fetch_all(&self.admin)
        .await
        .map_err(page_error)?;
        let oversized = rows.iter().filter(|row| row.2).count();
        if oversized > 0 {
            tracing::warn!(
                databases = oversized,
                max_bytes = COMMENT_MAX_BYTES,
                "customer databases whose COMMENT is longer than Keel reads: read as carrying no \
                 labels, so never reclaimed (listed as unmanaged when orphaned)"
            );
        }
        Ok(rows
            .into_iter()
            .map(|(name, comment, _, file_time)| {
                let comment: Comment = comment
                    .as_deref()
                    .and_then(|c| serde_json::from_str(c).ok())
                    .unwrap_or_default();
                let annotated = comment
                    .annotations
                    .get(comment_keys::CREATED_AT)
                    .and_then(|at| OffsetDateTime::parse(at, &Rfc3339).ok());
                // The annotation is the database owner's to rewrite; the server's file is not.
                // A creation time later than the file's (a customer's, to make the database
                // look too young ever to be a candidate) gives way to the file's.
                let created_at = match (annotated, file_time) {
                    (Some(annotated), Some(file)) => Some(annotated.min(file)),
                    (annotated, file) => annotated.or(file),
                };
                InventoryItem {
                    name,
                    created_at,
                    labels: comment.labels.into(),
                    annotations: comment.annotations.into(),
                    terminating: false,
                }
            })
            .collect())
    }
}

/// The advisory lock key that makes a tick single-flight across replicas.
pub const TICK_LOCK_KEY: i64 = 0x6b65_656c_6f72_7068; // "keelorph"

/// Holds the single-flight tick lock on a dedicated connection; dropping it (or calling
/// [`TickLock::release`]) frees it.
#[derive(Debug)]
pub struct TickLock {
    conn: PgConnection,
}

impl TickLock {
    /// Takes the lock if no other replica holds it; `Ok(None)` when one does.
    pub async fn try_acquire(options: &PgConnectOptions) -> Result<Option<Self>, sqlx::Error> {
        let mut conn =
            PgConnection::connect_with(&options.clone().application_name("keel-orphan-sweep-lock"))
                .await?;
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(TICK_LOCK_KEY)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(Self { conn }))
        } else {
            conn.close().await?;
            Ok(None)
        }
    }

    /// Releases the lock and closes its connection.
    pub async fn release(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(TICK_LOCK_KEY)
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await
    }
}

/// The sweep's durable state in the platform database (`orphan_sweep_periods`,
/// `orphan_sightings`): period claims by the database's clock, and sightings.
///
/// It keeps the sightings a tick hands back after recording them
/// ([`SweepState::keep_recorded`]), and answers the next read with them when the inventory's
/// generation (`orphan_sweep_recorded.generation`, the last transaction that changed its state,
/// stamped by triggers whoever writes) is still the one its own record committed; otherwise,
/// and in a fresh process, it reads every sighting. A clone starts with nothing kept.
pub struct PgSweepState {
    pool: PgPool,
    holder: String,
    /// Per inventory ([`slot`]): what this store knows of its stored state.
    kept: Mutex<[Kept; 2]>,
}

impl Clone for PgSweepState {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            holder: self.holder.clone(),
            kept: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for PgSweepState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("PgSweepState")
            .field("pool", &self.pool)
            .field("holder", &self.holder)
            .field(
                "kept_sightings",
                &kept
                    .iter()
                    .map(|k| k.sightings.as_ref().map_or(0, |(_, s)| s.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What a [`PgSweepState`] knows of one inventory's stored state.
#[derive(Default)]
struct Kept {
    /// The generation the state had when this store last read it or exactly recorded it: the
    /// state its caller's next changes describe.
    seen: Option<i64>,
    /// This store's last successful record or replace, when what it committed is exactly the
    /// sightings it was given.
    recorded: Option<Recorded>,
    /// Those sightings, handed back, as a read at that generation would answer them.
    sightings: Option<(Recorded, Vec<Sighting>)>,
}

/// A commit whose outcome is exactly the sightings it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Recorded {
    /// The committing transaction: the inventory's generation right after it.
    generation: i64,
    /// The period the sightings were recorded as seen in.
    period: i64,
    /// How many sightings.
    len: usize,
}

/// Where an inventory's [`Kept`] is.
fn slot(source: InventorySource) -> usize {
    match source {
        InventorySource::Kubernetes => 0,
        InventorySource::Postgres => 1,
    }
}

impl PgSweepState {
    /// Runs `f` on what this store knows of `source` (never across an await).
    fn kept<T>(&self, source: InventorySource, f: impl FnOnce(&mut Kept) -> T) -> T {
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut kept[slot(source)])
    }

    /// Forgets what this store knew of `source` before a write (a write that fails leaves
    /// nothing known); returns the generation it had seen.
    fn forget(&self, source: InventorySource) -> Option<i64> {
        let kept = self.kept(source, std::mem::take);
        kept.seen
    }

    /// Notes a commit at `generation` whose outcome is exactly `len` sightings seen in
    /// `claim`'s period: the state the next changes describe, and the sightings
    /// [`SweepState::keep_recorded`] may keep.
    fn recorded_exactly(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
        generation: i64,
        len: usize,
    ) {
        self.kept(source, |kept| {
            kept.seen = Some(generation);
            kept.recorded = Some(Recorded {
                generation,
                period: claim.period,
                len,
            });
        });
    }
}

/// `sighting` as a read of the state `recorded` committed answers it: seen in its period, its
/// run's length counted from the run's first period as stored, its instants to the
/// microsecond the database keeps, its failed reclaims at most what the column holds.
fn as_read_back(sighting: &mut Sighting, period: i64) {
    let run = run_start(sighting, period);
    sighting.last_period = period;
    sighting.consecutive = run_length(period, run);
    sighting.first_seen = to_microseconds(sighting.first_seen);
    sighting.reclaimable_since = sighting.reclaimable_since.map(to_microseconds);
    sighting.failed_reclaims = sighting.failed_reclaims.min(i32::MAX.unsigned_abs());
}

/// `at` truncated to whole microseconds, as a `timestamptz` stores it.
fn to_microseconds(at: OffsetDateTime) -> OffsetDateTime {
    let nanos = at.nanosecond();
    at.replace_nanosecond(nanos - nanos % 1_000).unwrap_or(at)
}

impl PgSweepState {
    /// The state over `pool` (the platform database); claims are recorded as made by `holder`
    /// (a replica's name, for operators).
    pub fn new(pool: PgPool, holder: impl Into<String>) -> Self {
        let mut holder = holder.into();
        holder.truncate(200);
        if holder.is_empty() {
            holder.push_str("keel-orphan-sweep");
        }
        Self {
            pool,
            holder,
            kept: Mutex::default(),
        }
    }
}

fn state_error(operation: &'static str) -> impl Fn(sqlx::Error) -> StateError {
    move |e| StateError {
        operation,
        source: Box::new(e),
    }
}

/// A stored sighting: its inventory's last recorded period, then its run's key, first seen,
/// reclaimable since, the reclaimable run's first period, quarantine and failed reclaims.
type StoredRun = (
    i64,
    String,
    OffsetDateTime,
    Option<OffsetDateTime>,
    Option<i64>,
    Option<String>,
    i32,
);

/// The rows `orphan_sightings` shows for `source`, read from its tables: the period once per
/// inventory, each run's length computed here.
async fn read_sightings(
    pool: &PgPool,
    source: InventorySource,
) -> Result<Vec<Sighting>, sqlx::Error> {
    // Each row is decoded straight into its sighting as it arrives: no list of rows or tuples
    // is held beside the sightings.
    sqlx::query(
        "SELECT r.last_period, s.key, s.first_seen, s.reclaimable_since, \
                s.reclaimable_period, s.quarantined, s.failed_reclaims \
           FROM orphan_sweep_recorded r \
           JOIN orphan_sighting_runs s ON s.inventory = r.inventory \
          WHERE r.inventory = $1",
    )
    .bind(source.as_str())
    .try_map(|row: sqlx::postgres::PgRow| {
        let (last_period, key, first_seen, reclaimable_since, run_start, quarantined, failed) =
            <StoredRun as sqlx::FromRow<'_, sqlx::postgres::PgRow>>::from_row(&row)?;
        Ok(Sighting {
            key,
            first_seen,
            last_period,
            reclaimable_since,
            consecutive: run_length(last_period, reclaimable_since.and(run_start)),
            quarantined,
            // The column refuses a negative count.
            failed_reclaims: u32::try_from(failed).unwrap_or(0),
        })
    })
    .fetch_all(pool)
    .await
}

/// How many periods a reclaimable run that started in `run_start` has lasted by `last_period`
/// (0 when there is none), as `orphan_sightings` shows it.
fn run_length(last_period: i64, run_start: Option<i64>) -> u32 {
    run_start.map_or(0, |start| {
        let periods = last_period.saturating_sub(start).saturating_add(1).max(0);
        u32::try_from(periods.min(i64::from(i32::MAX))).unwrap_or(0)
    })
}

/// Serialises claims and sighting writes per inventory, in the caller's transaction.
const STATE_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('keel-orphan-sweep:' || $1, 0))";

impl SweepState for PgSweepState {
    async fn claim(
        &self,
        source: InventorySource,
        interval: std::time::Duration,
        _now: OffsetDateTime,
    ) -> Result<Option<PeriodClaim>, StateError> {
        let fail = state_error("claim a period");
        let mut tx = self.pool.begin().await.map_err(&fail)?;
        sqlx::query(STATE_LOCK)
            .bind(source.as_str())
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
        let seconds = i64::try_from(interval.as_secs().max(1)).unwrap_or(i64::MAX);
        // A claim ahead of this interval's current period by the database's clock cannot be
        // another replica's claim of it: it was made with another `--interval` (a one-off
        // `--once --interval 1m`, say) or by hand. Kept, it would stand as this period's claim
        // and as the newest fence for as long as its number is ahead (centuries, for a claim
        // in minutes read in hours), and every tick would be skipped. It is removed, and said.
        let ahead: Vec<i64> = sqlx::query_scalar(
            "DELETE FROM orphan_sweep_periods \
             WHERE inventory = $1 \
               AND period > floor(extract(epoch FROM clock_timestamp()) / $2)::bigint + 1 \
             RETURNING period",
        )
        .bind(source.as_str())
        .bind(seconds)
        .fetch_all(&mut *tx)
        .await
        .map_err(&fail)?;
        if !ahead.is_empty() {
            tracing::warn!(
                inventory = source.as_str(),
                claims = ahead.len(),
                interval_seconds = seconds,
                "removed period claims ahead of the database clock for this interval: a sweep \
                 with another --interval shares this database, or a claim was written by hand; \
                 every replica and CronJob of an inventory must use the same interval"
            );
        }
        // The period by this database's clock, so replicas agree whatever their own clocks say.
        let claimed: Option<(i64, OffsetDateTime)> = sqlx::query_as(
            "WITH clock AS (SELECT clock_timestamp() AS at, \
                                   floor(extract(epoch FROM clock_timestamp()) / $2)::bigint AS period) \
             INSERT INTO orphan_sweep_periods (inventory, period, claimed_by, claimed_at) \
             SELECT $1, clock.period, $3, clock.at FROM clock \
              WHERE NOT EXISTS (SELECT 1 FROM orphan_sweep_periods p \
                                 WHERE p.inventory = $1 AND p.period >= clock.period) \
             ON CONFLICT DO NOTHING \
             RETURNING period, claimed_at",
        )
        .bind(source.as_str())
        .bind(seconds)
        .bind(&self.holder)
        .fetch_optional(&mut *tx)
        .await
        .map_err(&fail)?;
        if let Some((period, _)) = claimed {
            // Old claims are history; the newest is the fence.
            sqlx::query(
                "DELETE FROM orphan_sweep_periods WHERE inventory = $1 AND period < $2 - 1000",
            )
            .bind(source.as_str())
            .bind(period)
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
        }
        tx.commit().await.map_err(&fail)?;
        Ok(claimed.map(|(period, now)| PeriodClaim { period, now }))
    }

    async fn holds(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
    ) -> Result<bool, StateError> {
        let newest: Option<i64> =
            sqlx::query_scalar("SELECT max(period) FROM orphan_sweep_periods WHERE inventory = $1")
                .bind(source.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(state_error("check the period claim"))?;
        Ok(newest == Some(claim.period))
    }

    async fn sightings(&self, source: InventorySource) -> Result<Vec<Sighting>, StateError> {
        let fail = state_error("read the sightings");
        // Whatever was kept is answered at most once, and nothing is known until this read is.
        let kept = self.kept(source, |kept| {
            kept.seen = None;
            kept.recorded = None;
            kept.sightings.take()
        });
        let stamp: Option<(i64, i64)> = sqlx::query_as(
            "SELECT generation, last_period FROM orphan_sweep_recorded WHERE inventory = $1",
        )
        .bind(source.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(&fail)?;
        let had_kept = kept.is_some();
        if let (Some((recorded, sightings)), Some((generation, period))) = (kept, stamp)
            && recorded.generation == generation
            && recorded.period == period
        {
            tracing::debug!(
                inventory = source.as_str(),
                sightings = sightings.len(),
                "orphan sweep: the sightings are the ones the last tick recorded (the state's generation is unchanged); not read again"
            );
            self.kept(source, |kept| kept.seen = Some(generation));
            return Ok(sightings);
        }
        if had_kept {
            tracing::debug!(
                inventory = source.as_str(),
                "orphan sweep: the state changed since the last tick recorded it (another replica or a hand edit); reading every sighting"
            );
        }
        let read = read_sightings(&self.pool, source).await.map_err(&fail)?;
        // A change between the two reads leaves a newer generation than the one seen, so the
        // next record does not take its outcome for exact.
        self.kept(source, |kept| {
            kept.seen = stamp.map(|(generation, _)| generation)
        });
        Ok(read)
    }

    fn keep_recorded(&self, source: InventorySource, mut sightings: Vec<Sighting>) {
        let Some(recorded) = self.kept(source, |kept| kept.recorded.take()) else {
            return;
        };
        if sightings.len() != recorded.len {
            return;
        }
        for sighting in &mut sightings {
            as_read_back(sighting, recorded.period);
        }
        self.kept(source, |kept| kept.sightings = Some((recorded, sightings)));
    }

    async fn replace(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
        sightings: &[Sighting],
    ) -> Result<(), StateError> {
        let fail = state_error("record the sightings");
        self.forget(source);
        let mut conn = self.pool.acquire().await.map_err(&fail)?;
        let mut tx = under_claim(&mut conn, source, claim).await?;
        // Every run is written over, so what is committed is exactly `sightings`, provided
        // nobody else's write commits beside this one (the row is locked).
        let exact = lock_recorded(&mut tx, source).await?.is_some();
        sqlx::query("DELETE FROM orphan_sighting_runs WHERE inventory = $1")
            .bind(source.as_str())
            .execute(&mut *tx)
            .await
            .map_err(&fail)?;
        // Plain inserts: two sightings under one key fail the primary key, never merge.
        write_runs(
            &mut tx,
            source,
            claim,
            (sightings.iter(), sightings.len()),
            Write::Insert,
        )
        .await?;
        let generation = finish(tx, source, claim).await?;
        if exact {
            self.recorded_exactly(source, claim, generation, sightings.len());
        }
        // A large tick's arrays grew the connection's buffers; the pool need not keep them.
        conn.shrink_buffers();
        Ok(())
    }

    /// Writes only what changed: the vanished sightings are deleted, the new and changed ones
    /// written over, and the inventory's period moved on, which carries every continued
    /// sighting (`orphan_sightings` shows each with that period and its run's length). A tick
    /// in which no candidate came, went or changed writes one row.
    async fn record(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
        sightings: &[Sighting],
        changes: SightingChanges<'_>,
    ) -> Result<(), StateError> {
        if changes.continued.len() != sightings.len() {
            // Changes that do not describe these sightings are not trusted: all are written.
            return self.replace(source, claim, sightings).await;
        }
        let fail = state_error("record the sightings");
        let seen = self.forget(source);
        let mut conn = self.pool.acquire().await.map_err(&fail)?;
        let mut tx = under_claim(&mut conn, source, claim).await?;
        let generation = lock_recorded(&mut tx, source).await?;
        // Without its period no stored sighting could be read (the view shows none), so none
        // continues: whatever rows are left are stale, and every sighting is written.
        let all = generation.is_none();
        // What is committed is exactly `sightings` when the state is still the one the changes
        // were worked out from: nobody wrote since it was read, and nobody can until this
        // commits (the row is locked). Without the row nothing holds off a concurrent writer.
        let exact = generation.is_some() && generation == seen;
        if all {
            sqlx::query("DELETE FROM orphan_sighting_runs WHERE inventory = $1")
                .bind(source.as_str())
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        let vanished = if all { &[][..] } else { changes.vanished };
        for chunk in vanished.chunks(SIGHTINGS_PER_STATEMENT) {
            sqlx::query("DELETE FROM orphan_sighting_runs WHERE inventory = $1 AND key = ANY($2)")
                .bind(source.as_str())
                .bind(chunk)
                .execute(&mut *tx)
                .await
                .map_err(&fail)?;
        }
        let changed = changes.continued.iter().filter(|&&c| all || !c).count();
        let written = sightings
            .iter()
            .zip(changes.continued)
            .filter_map(|(sighting, &continued)| (all || !continued).then_some(sighting));
        write_runs(&mut tx, source, claim, (written, changed), Write::Upsert).await?;
        let generation = finish(tx, source, claim).await?;
        if exact {
            self.recorded_exactly(source, claim, generation, sightings.len());
        }
        if changed + vanished.len() > SIGHTINGS_PER_STATEMENT {
            conn.shrink_buffers();
        }
        Ok(())
    }
}

/// A transaction on `conn` holding `source`'s state lock, begun only while `claim` is still
/// the newest claim (a stale replica writes nothing and gets an error).
async fn under_claim<'c>(
    conn: &'c mut PgConnection,
    source: InventorySource,
    claim: &PeriodClaim,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, StateError> {
    let fail = state_error("record the sightings");
    let mut tx = conn.begin().await.map_err(&fail)?;
    sqlx::query(STATE_LOCK)
        .bind(source.as_str())
        .execute(&mut *tx)
        .await
        .map_err(&fail)?;
    let newest: Option<i64> =
        sqlx::query_scalar("SELECT max(period) FROM orphan_sweep_periods WHERE inventory = $1")
            .bind(source.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(&fail)?;
    if newest != Some(claim.period) {
        return Err(StateError {
            operation: "record the sightings under a lost period claim",
            source: "a newer period was claimed".into(),
        });
    }
    Ok(tx)
}

/// Locks `source`'s row of `orphan_sweep_recorded` for the rest of `tx` and returns its
/// generation (`None` without a row). Any other write of the inventory's state moves that row
/// (the triggers of migration 0098), so until `tx` ends no other write of it can commit.
async fn lock_recorded(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    source: InventorySource,
) -> Result<Option<i64>, StateError> {
    sqlx::query_scalar(
        "SELECT generation FROM orphan_sweep_recorded WHERE inventory = $1 FOR UPDATE",
    )
    .bind(source.as_str())
    .fetch_optional(&mut **tx)
    .await
    .map_err(state_error("record the sightings"))
}

/// How [`write_runs`] writes a sighting whose key is stored already.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// It is an error (the stored runs were deleted first: two sightings share the key).
    Insert,
    /// It is written over (a changed sighting).
    Upsert,
}

/// Writes `sightings` (the second of the pair is how many) into `source`'s stored runs, as seen
/// in `claim`'s period: set-based, one statement per chunk with each column bound as an array,
/// so a tick with 75 000 new candidates writes them in a few round trips, not 75 000.
async fn write_runs<'s>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    source: InventorySource,
    claim: &PeriodClaim,
    (mut sightings, len): (impl Iterator<Item = &'s Sighting>, usize),
    write: Write,
) -> Result<(), StateError> {
    let fail = state_error("record the sightings");
    let mut left = len;
    while left > 0 {
        let n = left.min(SIGHTINGS_PER_STATEMENT);
        left -= n;
        let chunk: Vec<&Sighting> = sightings.by_ref().take(n).collect();
        let keys: Vec<&str> = chunk.iter().map(|s| s.key.as_str()).collect();
        let first_seen: Vec<OffsetDateTime> = chunk.iter().map(|s| s.first_seen).collect();
        let reclaimable_since: Vec<Option<OffsetDateTime>> =
            chunk.iter().map(|s| s.reclaimable_since).collect();
        let reclaimable_period: Vec<Option<i64>> =
            chunk.iter().map(|s| run_start(s, claim.period)).collect();
        let quarantined: Vec<Option<&str>> =
            chunk.iter().map(|s| s.quarantined.as_deref()).collect();
        // A count past what the column holds is stored as its largest value.
        let failed_reclaims: Vec<i32> = chunk
            .iter()
            .map(|s| i32::try_from(s.failed_reclaims).unwrap_or(i32::MAX))
            .collect();
        let statement = match write {
            Write::Insert => INSERT_RUNS,
            Write::Upsert => UPSERT_RUNS,
        };
        sqlx::query(statement)
            .bind(source.as_str())
            .bind(&keys)
            .bind(&first_seen)
            .bind(&reclaimable_since)
            .bind(&reclaimable_period)
            .bind(&quarantined)
            .bind(&failed_reclaims)
            .execute(&mut **tx)
            .await
            .map_err(&fail)?;
    }
    Ok(())
}

/// The insert of runs bound as arrays (`$1` the inventory), as a literal both statements share.
macro_rules! insert_runs {
    () => {
        "INSERT INTO orphan_sighting_runs \
           (inventory, key, first_seen, reclaimable_since, reclaimable_period, quarantined, \
            failed_reclaims) \
         SELECT $1, s.key, s.first_seen, s.reclaimable_since, s.reclaimable_period, s.quarantined, \
                s.failed_reclaims \
           FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[], $5::int8[], $6::text[], \
                       $7::int4[]) \
                AS s(key, first_seen, reclaimable_since, reclaimable_period, quarantined, \
                     failed_reclaims)"
    };
}

/// Inserts the runs: a key stored already is an error.
const INSERT_RUNS: &str = insert_runs!();

/// Inserts the runs, writing over a stored run with the same key.
const UPSERT_RUNS: &str = concat!(
    insert_runs!(),
    " ON CONFLICT (inventory, key) DO UPDATE \
        SET first_seen = EXCLUDED.first_seen, \
            reclaimable_since = EXCLUDED.reclaimable_since, \
            reclaimable_period = EXCLUDED.reclaimable_period, \
            quarantined = EXCLUDED.quarantined, \
            failed_reclaims = EXCLUDED.failed_reclaims"
);

/// The period a sighting's reclaimable run started in, counted back from `period` (the one it
/// is recorded as seen in): `None` when it is not reclaimable.
fn run_start(sighting: &Sighting, period: i64) -> Option<i64> {
    sighting.reclaimable_since.map(|_| {
        period
            .saturating_sub(i64::from(sighting.consecutive))
            .saturating_add(1)
    })
}

/// Moves `source`'s recorded period to `claim`'s and commits; returns the generation the
/// commit leaves (this transaction's id, which the row's trigger stamps).
async fn finish(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    source: InventorySource,
    claim: &PeriodClaim,
) -> Result<i64, StateError> {
    let fail = state_error("record the sightings");
    let generation: i64 = sqlx::query_scalar(
        "INSERT INTO orphan_sweep_recorded (inventory, last_period) VALUES ($1, $2) \
         ON CONFLICT (inventory) DO UPDATE SET last_period = EXCLUDED.last_period \
         RETURNING generation",
    )
    .bind(source.as_str())
    .bind(claim.period)
    .fetch_one(&mut *tx)
    .await
    .map_err(&fail)?;
    tx.commit().await.map_err(&fail)?;
    Ok(generation)
}

/// How many sightings one statement of [`PgSweepState::replace`] writes: few round trips for a
/// large tick, and a bounded message for each.
const SIGHTINGS_PER_STATEMENT: usize = 10_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// The read sends each digest once in byte order: the same list a plain sort and dedup
    /// gives, whatever the digests share (equal first eight bytes, repeats).
    #[test]
    fn the_digests_are_sent_once_each_in_byte_order() {
        let hex = |n: u64, tail: u64| format!("{n:016x}{tail:032x}");
        let mut digests: Vec<TokenDigest> = Vec::new();
        for i in 0..2_000_u64 {
            // Many share their first eight bytes; every 7th is repeated.
            let head = (i % 13) << 40 | (i % 3);
            let d = TokenDigest::parse(&hex(head, i.wrapping_mul(0x9e37_79b9_7f4a_7c15))).unwrap();
            if i % 7 == 0 {
                digests.push(d.clone());
            }
            digests.push(d);
        }
        let mut expected: Vec<&TokenDigest> = digests.iter().collect();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(sorted_distinct(&digests), expected);
        assert!(sorted_distinct(&[]).is_empty());
    }
}
