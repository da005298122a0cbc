//! Monthly partitions of `audit_events` and the audited retention path (feature `postgres`):
//! export a month to a file, verify the file against the partition and the seal chain, then
//! detach the partition.
//!
//! `audit_events` is RANGE-partitioned by the UTC month of `recorded_at`, with a default
//! partition so an insert never fails. [`ensure_partitions`] creates the coming months ahead of
//! time (the sealer calls it, and so does `keel-audit partitions ensure`).
//!
//! Retention runs as the schema's owner, one month at a time, each step recorded in
//! `audit_retention` and audited (`audit.partition_exported`, `audit.partition_verified`,
//! `audit.partition_detached`):
//!
//! 1. [`export_month`] writes every row of a month that is over and fully sealed to a new file,
//!    one JSON object per line in commit order, each with its global `event_uuid`, its seal
//!    position and link hash; the file's SHA-256 is recorded. The file is written under a
//!    temporary name and takes its own only just before the record commits (see there for what
//!    a crash leaves behind).
//! 2. [`verify_export`] reads the file back: its digest must be the recorded one, its rows
//!    exactly the partition's (field by field, event UUIDs included), each partition row must
//!    hash to its own seal link, and the whole chain must verify ([`crate::seal::verify`]).
//! 3. [`detach_month`] refuses a month that was not exported and verified, or whose partition
//!    changed since (counted while no writer can add to it: a transaction that began before the
//!    month ended may commit a row into it after the export), records the month's seal links as
//!    retired, signs a checkpoint at the month's last link (the boundary), and `DETACH`es the
//!    partition. Its rows stay in the detached table `audit_events_YYYY_MM` until the owner
//!    archives or drops it; the seal chain keeps verifying without them.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use sqlx::{Acquire as _, PgConnection};
use time::{Date, Month as CalendarMonth, OffsetDateTime, Time};

use crate::event::{Actor, AuditEvent};
use crate::kind::AuditKind;
use crate::seal::{ChainRow, SealKey, Tampering, link, verify};
use crate::sink::AuditSinkError;

/// A calendar month (UTC), the unit of partitioning and retention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(Date);

impl Month {
    /// Parses `YYYY-MM` (years 2000 to 9999).
    pub fn parse(text: &str) -> Result<Self, RetentionError> {
        let (year, month) = text.split_once('-').ok_or(RetentionError::BadMonth)?;
        let ok = year.len() == 4
            && month.len() == 2
            && year
                .bytes()
                .chain(month.bytes())
                .all(|b| b.is_ascii_digit());
        if !ok {
            return Err(RetentionError::BadMonth);
        }
        let year: i32 = year.parse().map_err(|_| RetentionError::BadMonth)?;
        let month: u8 = month.parse().map_err(|_| RetentionError::BadMonth)?;
        if year < 2000 {
            return Err(RetentionError::BadMonth);
        }
        let month = CalendarMonth::try_from(month).map_err(|_| RetentionError::BadMonth)?;
        Date::from_calendar_date(year, month, 1)
            .map(Self)
            .map_err(|_| RetentionError::BadMonth)
    }

    /// The month `at` falls in (UTC).
    pub fn containing(at: OffsetDateTime) -> Self {
        let at = at.checked_to_offset(time::UtcOffset::UTC).unwrap_or(at);
        Self(at.date().replace_day(1).unwrap_or_else(|_| at.date()))
    }

    /// Its first day.
    pub fn first_day(self) -> Date {
        self.0
    }

    /// Its first instant (UTC midnight of the first day).
    pub fn start(self) -> OffsetDateTime {
        self.0.with_time(Time::MIDNIGHT).assume_utc()
    }

    /// The month after it.
    pub fn next(self) -> Self {
        let year = if self.0.month() == CalendarMonth::December {
            self.0.year() + 1
        } else {
            self.0.year()
        };
        Self(Date::from_calendar_date(year, self.0.month().next(), 1).unwrap_or(self.0))
    }

    /// The month `months` months before this one.
    pub fn months_before(self, months: u32) -> Self {
        let index = i64::from(self.0.year()) * 12 + i64::from(u8::from(self.0.month()))
            - 1
            - i64::from(months);
        let year = i32::try_from(index.div_euclid(12)).unwrap_or(self.0.year());
        let month = u8::try_from(index.rem_euclid(12) + 1).unwrap_or(1);
        CalendarMonth::try_from(month)
            .ok()
            .and_then(|m| Date::from_calendar_date(year, m, 1).ok())
            .map_or(self, Self)
    }

    /// Its partition's name, `audit_events_YYYY_MM`.
    pub fn partition(self) -> String {
        format!(
            "audit_events_{:04}_{:02}",
            self.0.year(),
            u8::from(self.0.month())
        )
    }
}

impl std::fmt::Display for Month {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}", self.0.year(), u8::from(self.0.month()))
    }
}

/// Why a retention step refused or failed. No message holds a row's content or a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetentionError {
    /// The month is not `YYYY-MM`.
    #[error("a month is written YYYY-MM (e.g. 2026-01), from 2000 on")]
    BadMonth,
    /// The month is the current one or in the future: rows may still arrive.
    #[error("{0} is not over yet: only a past month can be exported or detached")]
    MonthNotOver(Month),
    /// The month has no partition of its own (its rows, if any, are in the default partition).
    #[error(
        "{0} has no partition of its own (audit_events_default holds its rows, if any); \
         nothing to export"
    )]
    NoPartition(Month),
    /// The connected role does not own `audit_events`.
    #[error("retention runs as the owner of audit_events; the connected role is not")]
    NotOwner,
    /// Rows of the month are not sealed yet.
    #[error("{rows} rows of {month} are not sealed yet: run `keel-audit seal` first")]
    Unsealed {
        /// The month.
        month: Month,
        /// How many rows have no seal link.
        rows: i64,
    },
    /// The month was already exported.
    #[error("{0} was already exported (see audit_retention); verify that export instead")]
    AlreadyExported(Month),
    /// The month was not exported.
    #[error("{0} was not exported: run `keel-audit retention export` first")]
    NotExported(Month),
    /// The month's export was not verified.
    #[error("{0} was exported but its export was not verified: run `keel-audit retention verify`")]
    NotVerified(Month),
    /// The month was already detached.
    #[error("{0} was already detached")]
    AlreadyDetached(Month),
    /// The export file already exists (an export never overwrites a file). With no export of the
    /// month recorded, it is left from an export that did not commit.
    #[error(
        "{0} already exists: an export never overwrites a file. If audit_retention holds no \
         export of this month, the file is left from an export that did not commit (it crashed \
         or failed after naming the file): check it, remove it and export again"
    )]
    FileExists(PathBuf),
    /// The commit of an export got no answer (the connection was lost): whether the month was
    /// recorded is unknown, so its file was left in place.
    #[error(
        "the commit of the export of {month} got no answer ({source}): if audit_retention holds \
         an export of {month}, {path} is that export (verify it); if not, remove {path} and \
         export again"
    )]
    CommitUnknown {
        /// The month.
        month: Month,
        /// The export file, left in place.
        path: PathBuf,
        /// The error of the commit.
        #[source]
        source: sqlx::Error,
    },
    /// Rows were committed into the month after it was exported, by transactions that began
    /// before it ended (`recorded_at` is a transaction's start): the export does not hold them.
    #[error(
        "{rows} rows were committed into {month} after it was exported (by transactions that \
         began before the month ended), so its export does not hold them; nothing was detached. \
         A month is exported once: as the owner, remove the month's audit_retention record and \
         move its export file aside, then seal, export, verify and detach the month again \
         (README, \"Partitions and retention\")"
    )]
    RowsAfterExport {
        /// The month.
        month: Month,
        /// How many rows the partition holds beyond those exported.
        rows: i64,
    },
    /// The file does not match the export or the partition.
    #[error("the export of {month} does not match: {what}")]
    Mismatch {
        /// The month.
        month: Month,
        /// What differs (positions and ids only).
        what: String,
    },
    /// The seal chain does not verify.
    #[error("the seal chain does not verify, so {month} is not retired: {tampering}")]
    ChainBroken {
        /// The month.
        month: Month,
        /// The first difference.
        tampering: Tampering,
    },
    /// A file could not be read or written.
    #[error("could not {what}: {source}")]
    Io {
        /// What was attempted.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] AuditSinkError),
}

fn store(operation: &'static str) -> impl FnOnce(sqlx::Error) -> RetentionError {
    move |e| RetentionError::Store(AuditSinkError::store(operation, e))
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> RetentionError {
    move |source| RetentionError::Io { what, source }
}

/// Creates the monthly partitions from the month of `now` through `months_ahead` months later
/// (those that do not exist yet); returns how many it created. Run as the owner.
pub async fn ensure_partitions(
    conn: &mut PgConnection,
    now: OffsetDateTime,
    months_ahead: u32,
) -> Result<u32, AuditSinkError> {
    let mut last = Month::containing(now);
    for _ in 0..months_ahead.min(1200) {
        last = last.next();
    }
    let created: i32 = sqlx::query_scalar("SELECT audit_events_ensure_partitions($1, $2)")
        .bind(Month::containing(now).start())
        .bind(last.start())
        .fetch_one(conn)
        .await
        .map_err(|e| AuditSinkError::store("create the coming audit partitions", e))?;
    Ok(u32::try_from(created).unwrap_or(0))
}

/// What [`export_month`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// The month.
    pub month: Month,
    /// Rows written.
    pub rows: u64,
    /// SHA-256 of the file.
    pub sha256: [u8; 32],
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp_nanos().to_string())
}

/// A partition row beside its seal link.
#[derive(sqlx::FromRow)]
struct SealedRow {
    event_uuid: uuid::Uuid,
    #[sqlx(flatten)]
    row: ChainRow,
    seq: Option<i64>,
    row_hash: Option<Vec<u8>>,
}

/// The line a row is exported as (keys sorted, so the text is canonical).
fn row_json(row: &SealedRow) -> Result<serde_json::Value, serde_json::Error> {
    let attributes: serde_json::Value = serde_json::from_str(&row.row.attributes)?;
    Ok(serde_json::json!({
        "event_uuid": row.event_uuid,
        "id": row.row.id,
        "txid": row.row.txid,
        "seal_seq": row.seq,
        "row_hash": row.row_hash.as_deref().map(hex),
        "kind": row.row.kind,
        "actor": row.row.actor,
        "team_id": row.row.team_id,
        "resource_id": row.row.resource_id,
        "request_id": row.row.request_id,
        "attributes": attributes,
        "occurred_at": rfc3339(row.row.occurred_at),
        "recorded_at": rfc3339(row.row.recorded_at),
    }))
}

const PAGE: i64 = 10_000;

/// One page of a partition's rows after (`txid`, `id`), in commit order, with their links.
async fn page(
    conn: &mut PgConnection,
    month: Month,
    after: (i64, i64),
) -> Result<Vec<SealedRow>, RetentionError> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT r.*, s.seq, s.row_hash FROM ( \
           SELECT event_uuid, {} FROM {} \
           WHERE (txid, id) > ($1::text::xid8, $2) ORDER BY txid, id LIMIT $3) r \
         LEFT JOIN audit_seals s ON s.event_id = r.id \
         ORDER BY r.txid, r.id",
        crate::seal::ROW_COLUMNS,
        month.partition()
    )))
    .bind(after.0.to_string())
    .bind(after.1)
    .bind(PAGE)
    .fetch_all(conn)
    .await
    .map_err(store("read a page of the month's rows"))
}

/// Checks what every step needs: the owner is connected, the month is over and has a
/// partition still attached; returns the retention record, if any.
async fn preconditions(
    conn: &mut PgConnection,
    month: Month,
    now: OffsetDateTime,
) -> Result<Option<Record>, RetentionError> {
    if month.next().start() > now {
        return Err(RetentionError::MonthNotOver(month));
    }
    let owner: bool = sqlx::query_scalar(
        "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class \
         WHERE oid = 'audit_events'::regclass",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(store("check the connected role"))?;
    if !owner {
        return Err(RetentionError::NotOwner);
    }
    let record: Option<Record> = sqlx::query_as(
        "SELECT rows, file_sha256, first_seq, last_seq, verified_at IS NOT NULL AS verified, \
                detached_at IS NOT NULL AS detached \
         FROM audit_retention WHERE month = $1",
    )
    .bind(month.first_day())
    .fetch_optional(&mut *conn)
    .await
    .map_err(store("read the retention record"))?;
    if record.as_ref().is_some_and(|r| r.detached) {
        return Err(RetentionError::AlreadyDetached(month));
    }
    let attached: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                        WHERE i.inhparent = 'audit_events'::regclass AND c.relname = $1)",
    )
    .bind(month.partition())
    .fetch_one(&mut *conn)
    .await
    .map_err(store("find the month's partition"))?;
    if !attached {
        return Err(RetentionError::NoPartition(month));
    }
    Ok(record)
}

#[derive(sqlx::FromRow)]
struct Record {
    rows: i64,
    file_sha256: Vec<u8>,
    first_seq: Option<i64>,
    last_seq: Option<i64>,
    verified: bool,
    detached: bool,
}

async fn audit_step(
    conn: &mut PgConnection,
    kind: AuditKind,
    actor: &Actor,
    now: OffsetDateTime,
    month: Month,
    rows: i64,
    sha256: &[u8],
) -> Result<(), RetentionError> {
    let event = AuditEvent::new(kind, actor.clone(), now)
        .attr("month", month.to_string())
        .and_then(|e| e.attr("partition", month.partition()))
        .and_then(|e| e.attr("rows", rows.to_string()))
        .and_then(|e| e.attr("file_fingerprint", format!("sha256:{}", hex(sha256))))
        .map_err(|e| RetentionError::Store(AuditSinkError::store("describe the step", e)))?;
    crate::postgres::insert(conn, &event).await?;
    Ok(())
}

/// Exports every row of `month` (over, fully sealed, not exported before) to a new file at
/// `path`, records the export and audits it (`audit.partition_exported`). Run as the owner.
///
/// The rows are written to a new temporary file beside `path` (`.<name>.partial-<pid>-<random>`),
/// which is flushed and synced; the export is recorded and audited; the file is then linked
/// under `path` (a hard link, which never replaces an existing file or symlink), its temporary
/// name removed and the directory synced, and only then does the transaction commit. A failure
/// before the link leaves no file; a failure after it, the server refusing the commit included,
/// removes the file under `path` again; the temporary file is always removed. So, but for a
/// crash, a file under `path` exists only with its record. A crash (or a kill) leaves:
///
/// - before the link: at most the temporary `.<name>.partial-…` file and no record; `path` is
///   still free and a rerun exports afresh (the leftover may be deleted);
/// - between the link and the commit: a complete-looking file under `path` (perhaps beside the
///   temporary one) and no record; a rerun refuses with [`RetentionError::FileExists`], whose
///   message tells the operator to check that `audit_retention` holds no export of the month
///   and to remove the file;
/// - after the commit: the file and its record, as a success does.
///
/// If the commit gets no answer (the connection is lost), whether it took effect is unknown: the
/// file is left under `path` and [`RetentionError::CommitUnknown`] says what to check.
pub async fn export_month(
    conn: &mut PgConnection,
    month: Month,
    path: &Path,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<Export, RetentionError> {
    let mut tx = conn.begin().await.map_err(store("begin the export"))?;
    let exported = export_in(&mut tx, month, path, actor, now).await;
    let (export, placed) = match exported {
        Ok(done) => done,
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(e);
        }
    };
    match tx.commit().await {
        Ok(()) => {
            placed.keep();
            Ok(export)
        }
        // The server refused the commit: nothing was recorded, so `placed` removes the file.
        Err(e @ sqlx::Error::Database(_)) => Err(store("commit the export")(e)),
        Err(source) => {
            placed.keep();
            Err(RetentionError::CommitUnknown {
                month,
                path: path.to_path_buf(),
                source,
            })
        }
    }
}

/// Commits when `outcome` is `Ok`, rolls back at once otherwise (so a refused step leaves the
/// connection holding no transaction, snapshot or lock).
async fn finish<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    outcome: Result<T, RetentionError>,
    what: &'static str,
) -> Result<T, RetentionError> {
    match outcome {
        Ok(value) => {
            tx.commit().await.map_err(store(what))?;
            Ok(value)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// A file removed when this is dropped (however the step ends: failed, refused or cancelled),
/// unless [`kept`](Self::keep).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The directory of `path` (`.` for a bare name) and its file name.
fn split_path(path: &Path) -> Result<(PathBuf, &std::ffi::OsStr), RetentionError> {
    let name = path.file_name().ok_or_else(|| RetentionError::Io {
        what: "name the export file",
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the export path names no file",
        ),
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Syncs a directory, so that a name just linked in it survives a crash.
fn sync_dir(dir: &Path) -> Result<(), RetentionError> {
    if cfg!(unix) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync the export file's directory"))?;
    }
    Ok(())
}

/// Writes, records and audits the export, then links the file under `path`; returns the export
/// and the file under `path`, removed when dropped unless the commit succeeds.
async fn export_in(
    tx: &mut PgConnection,
    month: Month,
    path: &Path,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<(Export, RemoveOnDrop), RetentionError> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .map_err(store("take a snapshot"))?;
    if preconditions(tx, month, now).await?.is_some() {
        return Err(RetentionError::AlreadyExported(month));
    }
    let unsealed: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {} e WHERE NOT EXISTS \
           (SELECT 1 FROM audit_seals s WHERE s.event_id = e.id)",
        month.partition()
    )))
    .fetch_one(&mut *tx)
    .await
    .map_err(store("count unsealed rows"))?;
    if unsealed > 0 {
        return Err(RetentionError::Unsealed {
            month,
            rows: unsealed,
        });
    }
    let (dir, name) = split_path(path)?;
    // Refused before writing anything; the link below is what guarantees no file is replaced.
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(RetentionError::FileExists(path.to_path_buf()));
    }
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(name);
    partial_name.push(format!(
        ".partial-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    let partial = dir.join(partial_name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(io("create the temporary export file"))?;
    let partial_file = RemoveOnDrop(Some(partial.clone()));
    let (rows, sha256, first_seq, last_seq) = write_rows(tx, month, file).await?;
    sqlx::query(
        "INSERT INTO audit_retention \
           (month, partition, rows, file_sha256, first_seq, last_seq, exported_at, exported_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(month.first_day())
    .bind(month.partition())
    .bind(rows)
    .bind(sha256.as_slice())
    .bind(first_seq)
    .bind(last_seq)
    .bind(now)
    .bind(actor.as_str())
    .execute(&mut *tx)
    .await
    .map_err(store("record the export"))?;
    audit_step(
        tx,
        AuditKind::AuditPartitionExported,
        actor,
        now,
        month,
        rows,
        &sha256,
    )
    .await?;
    // The file takes its name: a hard link fails if the name exists, even as a symlink.
    std::fs::hard_link(&partial, path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            RetentionError::FileExists(path.to_path_buf())
        } else {
            RetentionError::Io {
                what: "give the export file its name",
                source: e,
            }
        }
    })?;
    // From here the name is this export's: any failure (or the commit's refusal) removes it.
    let placed = RemoveOnDrop(Some(path.to_path_buf()));
    drop(partial_file);
    sync_dir(&dir)?;
    Ok((
        Export {
            month,
            rows: u64::try_from(rows).unwrap_or(0),
            sha256,
        },
        placed,
    ))
}

type Written = (i64, [u8; 32], Option<i64>, Option<i64>);

async fn write_rows(
    conn: &mut PgConnection,
    month: Month,
    file: std::fs::File,
) -> Result<Written, RetentionError> {
    let mut out = std::io::BufWriter::new(file);
    let mut digest = Sha256::new();
    let (mut rows, mut first_seq, mut last_seq) = (0_i64, None::<i64>, None::<i64>);
    let mut after = (0_i64, 0_i64);
    loop {
        let batch = page(conn, month, after).await?;
        let Some(last) = batch.last() else { break };
        after = (last.row.txid, last.row.id);
        for row in &batch {
            let mut line =
                serde_json::to_string(&row_json(row).map_err(|e| RetentionError::Mismatch {
                    month,
                    what: format!("row {} has attributes that are not JSON: {e}", row.row.id),
                })?)
                .map_err(|e| RetentionError::Io {
                    what: "encode a row",
                    source: std::io::Error::other(e),
                })?;
            line.push('\n');
            digest.update(line.as_bytes());
            out.write_all(line.as_bytes())
                .map_err(io("write the export file"))?;
            rows += 1;
            if let Some(seq) = row.seq {
                first_seq = Some(first_seq.map_or(seq, |f: i64| f.min(seq)));
                last_seq = Some(last_seq.map_or(seq, |l: i64| l.max(seq)));
            }
        }
    }
    let file = out.into_inner().map_err(|e| RetentionError::Io {
        what: "write the export file",
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("flush the export file"))?;
    Ok((rows, digest.finalize().into(), first_seq, last_seq))
}

/// What [`verify_export`] checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportVerification {
    /// The month.
    pub month: Month,
    /// Rows compared between the file and the partition, each checked against its seal link.
    pub rows: u64,
    /// Links of the whole chain verified.
    pub links: u64,
}

/// Verifies the export of `month` at `path`: the file is the one recorded, holds exactly the
/// partition's rows, each row hashes to its seal link, and the whole chain verifies under
/// `key`. Records and audits the verification (`audit.partition_verified`). Run as the owner.
/// A partition holding more rows than the export (rows committed into the month after it was
/// exported) is refused as such ([`RetentionError::RowsAfterExport`]).
pub async fn verify_export(
    conn: &mut PgConnection,
    month: Month,
    path: &Path,
    key: &SealKey,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<ExportVerification, RetentionError> {
    let mut tx = conn
        .begin()
        .await
        .map_err(store("begin the verification"))?;
    let checked = verify_in(&mut tx, month, path, key, actor, now).await;
    finish(tx, checked, "commit the verification").await
}

async fn verify_in(
    tx: &mut PgConnection,
    month: Month,
    path: &Path,
    key: &SealKey,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<ExportVerification, RetentionError> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *tx)
        .await
        .map_err(store("take a snapshot"))?;
    let record = preconditions(tx, month, now)
        .await?
        .ok_or(RetentionError::NotExported(month))?;
    let mismatch = |what: String| RetentionError::Mismatch { month, what };

    let bytes = std::fs::read(path).map_err(io("read the export file"))?;
    let sha256: [u8; 32] = Sha256::digest(&bytes).into();
    if sha256.as_slice() != record.file_sha256.as_slice() {
        return Err(mismatch(
            "the file's SHA-256 is not the one recorded at export".into(),
        ));
    }
    // Rows committed into the month after its export (by transactions that began before the
    // month ended) are in the partition and not in the file: named as such.
    let in_partition: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        month.partition()
    )))
    .fetch_one(&mut *tx)
    .await
    .map_err(store("count the month's rows"))?;
    if in_partition > record.rows {
        return Err(RetentionError::RowsAfterExport {
            month,
            rows: in_partition - record.rows,
        });
    }
    let mut lines = bytes.lines();
    let mut after = (0_i64, 0_i64);
    let mut rows = 0_u64;
    let mut prev_links = std::collections::HashMap::<i64, Vec<u8>>::new();
    loop {
        let batch = page(tx, month, after).await?;
        let Some(last) = batch.last() else { break };
        after = (last.row.txid, last.row.id);
        // The link before each row's, to recompute the row's own link.
        let previous: Vec<i64> = batch.iter().filter_map(|r| r.seq.map(|s| s - 1)).collect();
        let found: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, row_hash FROM audit_seals WHERE seq = ANY($1)")
                .bind(&previous)
                .fetch_all(&mut *tx)
                .await
                .map_err(store("read the seal links"))?;
        prev_links.clear();
        prev_links.extend(found);
        prev_links.insert(0, vec![0; 32]);
        for row in &batch {
            let id = row.row.id;
            let line = lines
                .next()
                .transpose()
                .map_err(io("read the export file"))?
                .ok_or_else(|| mismatch(format!("the file ends before row {id}")))?;
            let in_file: serde_json::Value = serde_json::from_str(&line)
                .map_err(|_| mismatch(format!("line {} is not JSON", rows + 1)))?;
            let in_db = row_json(row)
                .map_err(|_| mismatch(format!("row {id}'s attributes are not JSON")))?;
            if in_file != in_db {
                return Err(mismatch(format!(
                    "line {} differs from row {id} of the partition",
                    rows + 1
                )));
            }
            let (Some(seq), Some(stored)) = (row.seq, row.row_hash.as_ref()) else {
                return Err(mismatch(format!("row {id} has no seal link")));
            };
            let prev = prev_links
                .get(&(seq - 1))
                .ok_or_else(|| mismatch(format!("the link before seal {seq} is missing")))?;
            if link(prev, &row.row) != *stored {
                return Err(RetentionError::ChainBroken {
                    month,
                    tampering: Tampering::Changed { id, seq },
                });
            }
            rows += 1;
        }
    }
    if lines.next().is_some() {
        return Err(mismatch(format!(
            "the file holds more lines than the partition's {rows} rows"
        )));
    }
    if i64::try_from(rows).ok() != Some(record.rows) {
        return Err(mismatch(format!(
            "the partition holds {rows} rows, the export recorded {}",
            record.rows
        )));
    }
    let chain = verify(tx, key, None).await?;
    if let Some(tampering) = chain.tampering {
        return Err(RetentionError::ChainBroken { month, tampering });
    }
    if !record.verified {
        sqlx::query("UPDATE audit_retention SET verified_at = $2 WHERE month = $1")
            .bind(month.first_day())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(store("record the verification"))?;
        audit_step(
            tx,
            AuditKind::AuditPartitionVerified,
            actor,
            now,
            month,
            record.rows,
            &sha256,
        )
        .await?;
    }
    Ok(ExportVerification {
        month,
        rows,
        links: chain.links,
    })
}

/// Detaches the partition of `month`, which must have been exported and verified and be
/// unchanged since: its seal links are recorded as retired, a checkpoint is signed at the
/// month's last link (the boundary), and the detach is audited (`audit.partition_detached`).
/// The detached table keeps its rows. Run as the owner.
///
/// `recorded_at` is the start of the inserting transaction, so a transaction that began before
/// the month ended can commit a row into its partition after the export and verification. The
/// detach first locks the partition against writers (`SHARE ROW EXCLUSIVE`: it waits for those
/// still running, holds new ones off until it commits, lets readers on, and lets one detach in
/// at a time), then counts the partition: a row the export does not hold refuses the detach
/// ([`RetentionError::RowsAfterExport`]) and nothing is detached. A writer stamped in the month
/// that writes while the detach holds the lock holds `audit_events` and waits for the
/// partition, while the `DETACH` needs `audit_events`: the server finds the deadlock and aborts
/// one of the two (a month retired 13 months back has no such writer in practice); either way
/// no row leaves unexported.
pub async fn detach_month(
    conn: &mut PgConnection,
    month: Month,
    key: &SealKey,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<(), RetentionError> {
    let mut tx = conn.begin().await.map_err(store("begin the detach"))?;
    let detached = detach_in(&mut tx, month, key, actor, now).await;
    finish(tx, detached, "commit the detach").await
}

/// The retention record of a month that may be detached.
fn detachable(record: Option<Record>, month: Month) -> Result<Record, RetentionError> {
    let record = record.ok_or(RetentionError::NotExported(month))?;
    if !record.verified {
        return Err(RetentionError::NotVerified(month));
    }
    Ok(record)
}

async fn detach_in(
    tx: &mut PgConnection,
    month: Month,
    key: &SealKey,
    actor: &Actor,
    now: OffsetDateTime,
) -> Result<(), RetentionError> {
    // Each statement sees what committed before it (whatever the server's default), so the
    // count below, made under the lock, sees every row a writer committed before it.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *tx)
        .await
        .map_err(store("set the detach's isolation"))?;
    detachable(preconditions(tx, month, now).await?, month)?;
    // No writer adds to the month from here: running ones are waited for, new ones held off.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
        month.partition()
    )))
    .execute(&mut *tx)
    .await
    .map_err(store("lock the month's partition against writers"))?;
    // Read again under the lock (each statement sees what committed before it): another detach
    // may have finished while this one waited.
    let record = detachable(preconditions(tx, month, now).await?, month)?;
    // Nothing may have changed since the verification: the same rows, all of them sealed.
    let (count, sealed, first_seq, last_seq): (i64, i64, Option<i64>, Option<i64>) =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*), count(s.seq), min(s.seq), max(s.seq) \
             FROM {} e LEFT JOIN audit_seals s ON s.event_id = e.id",
            month.partition()
        )))
        .fetch_one(&mut *tx)
        .await
        .map_err(store("count the month's rows"))?;
    if count > record.rows {
        return Err(RetentionError::RowsAfterExport {
            month,
            rows: count - record.rows,
        });
    }
    if count != record.rows
        || sealed != count
        || (first_seq, last_seq) != (record.first_seq, record.last_seq)
    {
        return Err(RetentionError::Mismatch {
            month,
            what: format!(
                "the partition holds {count} rows ({sealed} sealed, seals {} to {}) since its \
                 export of {} rows (seals {} to {}) was verified",
                first_seq.map_or_else(|| "none".to_owned(), |s| s.to_string()),
                last_seq.map_or_else(|| "none".to_owned(), |s| s.to_string()),
                record.rows,
                record
                    .first_seq
                    .map_or_else(|| "none".to_owned(), |s| s.to_string()),
                record
                    .last_seq
                    .map_or_else(|| "none".to_owned(), |s| s.to_string()),
            ),
        });
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO audit_retired_links (seq, month) \
         SELECT s.seq, $1 FROM {} e JOIN audit_seals s ON s.event_id = e.id",
        month.partition()
    )))
    .bind(month.first_day())
    .execute(&mut *tx)
    .await
    .map_err(store("retire the month's seal links"))?;
    if let Some(last_seq) = record.last_seq {
        let hash: Vec<u8> = sqlx::query_scalar("SELECT row_hash FROM audit_seals WHERE seq = $1")
            .bind(last_seq)
            .fetch_one(&mut *tx)
            .await
            .map_err(store("read the boundary link"))?;
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, row_hash, key_id, signature) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(last_seq)
        .bind(&hash)
        .bind(key.id())
        .bind(key.sign(last_seq, &hash))
        .execute(&mut *tx)
        .await
        .map_err(store("sign the boundary checkpoint"))?;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE audit_events DETACH PARTITION {}",
        month.partition()
    )))
    .execute(&mut *tx)
    .await
    .map_err(store("detach the partition"))?;
    sqlx::query("UPDATE audit_retention SET detached_at = $2 WHERE month = $1")
        .bind(month.first_day())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(store("record the detach"))?;
    audit_step(
        tx,
        AuditKind::AuditPartitionDetached,
        actor,
        now,
        month,
        record.rows,
        &record.file_sha256,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_parse_strictly_and_name_their_partition() {
        let m = Month::parse("2026-01").unwrap();
        assert_eq!(m.to_string(), "2026-01");
        assert_eq!(m.partition(), "audit_events_2026_01");
        assert_eq!(m.next().to_string(), "2026-02");
        assert_eq!(
            Month::parse("2026-12").unwrap().next().to_string(),
            "2027-01"
        );
        assert_eq!(m.months_before(13).to_string(), "2024-12");
        assert_eq!(m.months_before(1).to_string(), "2025-12");
        for bad in [
            "",
            "2026",
            "2026-13",
            "2026-00",
            "26-01",
            "2026-1",
            "1999-12",
            "2026-01; DROP",
        ] {
            assert!(Month::parse(bad).is_err(), "{bad:?}");
        }
        let at = Month::parse("2026-03").unwrap().start() + time::Duration::days(20);
        assert_eq!(Month::containing(at).to_string(), "2026-03");
    }
}
