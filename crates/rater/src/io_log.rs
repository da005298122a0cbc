//! The `io_log` store (feature `postgres`): captured request bodies, searchable by word.
//!
//! # The search vector never fails an insert
//!
//! `body_tsv` is `to_tsvector('simple', body)`. Postgres caps a `tsvector` at 1 MiB of lexemes
//! and positions, so a body of roughly 800 KB of distinct words cannot be indexed whole and
//! `to_tsvector` fails with SQLSTATE 54000 ("string is too long for tsvector"). A body that was
//! captured must still be stored, so [`insert`] tries, each inside its own savepoint:
//!
//! 1. the vector of the whole body (`tsv_truncated = false`);
//! 2. on 54000, the vector of its first 8, 4, 2, then 1 times [`TSV_PREFIX_CHARS`] characters
//!    (`tsv_truncated = true`);
//! 3. on 54000 again, no vector at all (`body_tsv = NULL`, `tsv_truncated = true`).
//!
//! The body itself is always stored whole. A failed attempt is rolled back to its savepoint, so
//! a caller's surrounding transaction stays usable.

use sqlx::{Connection, PgConnection};

use crate::Captured;

/// How many characters of the body the search vector covers when the whole body's vector is
/// over Postgres's limit: 64 Ki characters.
///
/// At most 4 bytes per character that is 256 KiB of text, a quarter of the 1 MiB `tsvector`
/// limit, which leaves room for the per-word position data and for the extra tokens the default
/// parser emits (a hyphenated word or a URL yields its parts as well as the whole). It still
/// covers every ordinary request body in full.
pub const TSV_PREFIX_CHARS: i32 = 64 * 1024;

/// SQLSTATE `program_limit_exceeded`, which `to_tsvector` raises for an oversized vector.
const PROGRAM_LIMIT_EXCEEDED: &str = "54000";

/// The id of an `io_log` row.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct IoLogId(pub i64);

impl IoLogId {
    /// The row id.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl From<i64> for IoLogId {
    fn from(id: i64) -> Self {
        Self(id)
    }
}

impl std::fmt::Display for IoLogId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why an `io_log` operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoLogError {
    /// Storing a captured body failed; nothing was stored.
    #[error(
        "could not store the captured body of request {request_id:?} in io_log: {step} failed \
         ({source}); nothing was stored"
    )]
    Insert {
        /// The request whose body was being stored.
        request_id: String,
        /// The step that failed, e.g. "insert the row".
        step: &'static str,
        /// The store's own error.
        #[source]
        source: sqlx::Error,
    },
    /// The captured body's original length does not fit `io_log.original_len` (`bigint`).
    #[error(
        "could not store the captured body of request {request_id:?} in io_log: its original \
         length {original_len} does not fit a bigint; nothing was stored"
    )]
    OriginalLenOutOfRange {
        /// The request whose body was being stored.
        request_id: String,
        /// The length that does not fit.
        original_len: usize,
    },
    /// Searching the captured bodies failed.
    #[error("could not search io_log for {query:?}: {step} failed")]
    Search {
        /// The search text.
        query: String,
        /// The step that failed.
        step: &'static str,
        /// The store's own error.
        #[source]
        source: sqlx::Error,
    },
}

/// How many times [`TSV_PREFIX_CHARS`] the first bounded vector covers: the prefixes tried are
/// 8, 4, 2 and 1 times it, so a body just over the limit keeps most of its words searchable
/// instead of falling straight to 64 Ki characters (RATER-L7).
const PREFIX_STEPS: u32 = 3;

/// Which search vector an insert attempt stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SearchVector {
    /// The whole body's.
    Whole,
    /// The first `prefix_chars << shift` characters'.
    Prefix {
        /// How many times to double the smallest prefix.
        shift: u32,
    },
    /// None (`NULL`).
    Absent,
}

impl SearchVector {
    /// The attempt to make when this one's vector is over the limit, if any.
    fn fallback(self) -> Option<Self> {
        match self {
            SearchVector::Whole => Some(SearchVector::Prefix {
                shift: PREFIX_STEPS,
            }),
            SearchVector::Prefix { shift: 0 } => Some(SearchVector::Absent),
            SearchVector::Prefix { shift } => Some(SearchVector::Prefix { shift: shift - 1 }),
            SearchVector::Absent => None,
        }
    }

    fn sql(self) -> &'static str {
        match self {
            SearchVector::Whole => {
                "INSERT INTO io_log (request_id, body, body_tsv, original_len, truncated, \
                 tsv_truncated) \
                 VALUES ($1, $2, to_tsvector('simple', $2), $3, $4, $5) RETURNING id"
            }
            SearchVector::Prefix { .. } => {
                "INSERT INTO io_log (request_id, body, body_tsv, original_len, truncated, \
                 tsv_truncated) \
                 VALUES ($1, $2, to_tsvector('simple', left($2, $6)), $3, $4, true OR $5) RETURNING id"
            }
            SearchVector::Absent => {
                "INSERT INTO io_log (request_id, body, body_tsv, original_len, truncated, \
                 tsv_truncated) \
                 VALUES ($1, $2, NULL, $3, $4, true OR $5) RETURNING id"
            }
        }
    }

    fn describe(self) -> &'static str {
        match self {
            SearchVector::Whole => "whole body",
            SearchVector::Prefix { .. } => "body prefix",
            SearchVector::Absent => "none",
        }
    }
}

/// Stores a captured request body with its search vector and returns the new row's id.
///
/// Stores `captured.body`, `original_len`, `truncated` and `body_tsv =
/// to_tsvector('simple', body)`. When that vector is over Postgres's size limit, the row is
/// stored with a bounded vector (the longest of 8, 4, 2 or 1 times [`TSV_PREFIX_CHARS`]
/// characters that fits, or none) and
/// `tsv_truncated = true`, and one `WARN` says so — see the [module docs](self). A body holding
/// words PostgreSQL does not index (over 2047 bytes) is stored with `tsv_truncated = true` and
/// one `WARN` (PostgreSQL's per-word notices are silenced). The body comes from
/// [`capture`](crate::capture), which removes the NULs Postgres `text` cannot hold; the request
/// id is sanitized the same way ([`sanitize_request_id`](crate::sanitize_request_id)).
///
/// Runs inside a savepoint when `conn` is already in a transaction (which then stays usable
/// whatever happens here), or in a transaction of its own otherwise. That transaction must be
/// one sqlx began (`pool.begin()`, `conn.begin()`): sqlx cannot see a `BEGIN` sent as SQL, and
/// would commit it.
///
/// # Errors
///
/// [`IoLogError::Insert`] when the store fails for any reason other than the vector's size, and
/// [`IoLogError::OriginalLenOutOfRange`] for a length Postgres cannot record. Nothing is stored
/// in either case.
pub async fn insert(
    conn: &mut PgConnection,
    request_id: &str,
    captured: &Captured,
) -> Result<IoLogId, IoLogError> {
    insert_with_prefix(conn, request_id, captured, TSV_PREFIX_CHARS).await
}

/// [`insert`], with the bounded vector covering `prefix_chars` characters (tests use a bound
/// that is itself over the limit, to reach the last fallback).
async fn insert_with_prefix(
    conn: &mut PgConnection,
    request_id: &str,
    captured: &Captured,
    prefix_chars: i32,
) -> Result<IoLogId, IoLogError> {
    let request_id = &crate::sanitize_request_id(request_id);
    let original_len =
        i64::try_from(captured.original_len()).map_err(|_| IoLogError::OriginalLenOutOfRange {
            request_id: request_id.to_owned(),
            original_len: captured.original_len(),
        })?;
    let failed = |step: &'static str| {
        move |source: sqlx::Error| IoLogError::Insert {
            request_id: request_id.to_owned(),
            step,
            source,
        }
    };

    let mut vector = SearchVector::Whole;
    let mut long_words = None;
    loop {
        let mut attempt = conn.begin().await.map_err(failed("open a savepoint"))?;
        // One summary instead of PostgreSQL's NOTICE per word too long to index.
        sqlx::query("SET LOCAL client_min_messages = warning")
            .execute(&mut *attempt)
            .await
            .map_err(failed("quiet the per-word notices"))?;
        let dropped = match long_words {
            Some(n) => n,
            None => {
                let n = count_long_words(&mut attempt, captured.body())
                    .await
                    .map_err(failed("look for words too long to index"))?;
                long_words = Some(n);
                n
            }
        };
        let query = sqlx::query_scalar::<_, i64>(vector.sql())
            .bind(request_id)
            .bind(captured.body())
            .bind(original_len)
            .bind(captured.truncated())
            .bind(dropped > 0);
        let query = match vector {
            SearchVector::Prefix { shift } => query.bind(prefix_chars.saturating_mul(1 << shift)),
            SearchVector::Whole | SearchVector::Absent => query,
        };
        let inserted = query.fetch_one(&mut *attempt).await;
        match inserted {
            Ok(id) => {
                attempt
                    .commit()
                    .await
                    .map_err(failed("commit the insert (or release its savepoint)"))?;
                if dropped > 0 {
                    tracing::warn!(
                        request_id,
                        words = dropped,
                        "captured body stored; words over PostgreSQL's 2047-byte lexeme limit \
                         are not searchable (tsv_truncated = true)"
                    );
                }
                if vector != SearchVector::Whole {
                    tracing::warn!(
                        request_id,
                        body_len = captured.body().len(),
                        search_vector = vector.describe(),
                        tsv_prefix_chars = match vector {
                            SearchVector::Prefix { shift } =>
                                prefix_chars.saturating_mul(1 << shift),
                            SearchVector::Whole | SearchVector::Absent => 0,
                        },
                        "captured body stored with a bounded search vector: the whole body's \
                         is over Postgres's tsvector limit"
                    );
                }
                return Ok(IoLogId(id));
            }
            Err(error) => {
                let next = vector
                    .fallback()
                    .filter(|_| is_program_limit_exceeded(&error));
                // Roll back to the savepoint either way. If that fails too, the insert's own
                // error is the one worth reporting unless we were about to retry.
                let rolled_back = attempt.rollback().await;
                match next {
                    Some(next) => {
                        rolled_back.map_err(failed("roll back the oversized vector"))?;
                        vector = next;
                    }
                    None => return Err(failed("insert the row")(error)),
                }
            }
        }
    }
}

/// How many words of `body` PostgreSQL will not index (over 2047 bytes). Words are runs of
/// letters and digits; runs of 255 characters or more (a 683-character run may already exceed 2047 bytes) are
/// measured.
async fn count_long_words(conn: &mut PgConnection, body: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM regexp_matches($1, '([[:alnum:]]{255}[[:alnum:]]*)', 'g') AS m(w) \
         WHERE octet_length(m.w[1]) > 2047",
    )
    .bind(body)
    .fetch_one(conn)
    .await
}

fn is_program_limit_exceeded(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == PROGRAM_LIMIT_EXCEEDED)
}

/// Finds captured bodies containing every word of `query`, newest first, at most `limit`.
///
/// The query is parsed with `plainto_tsquery('simple', …)`: it is plain words, and operator
/// characters such as `&`, `|`, `!` or parentheses are ignored rather than interpreted, so any
/// text is a valid query. A query without words matches nothing. Bodies stored with a bounded
/// vector are only found by words within the prefix their vector covers (at least the first
/// [`TSV_PREFIX_CHARS`] characters).
///
/// # Errors
///
/// [`IoLogError::Search`] when the store fails.
pub async fn search(
    conn: &mut PgConnection,
    query: &str,
    limit: u32,
) -> Result<Vec<(IoLogId, String)>, IoLogError> {
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, request_id FROM io_log \
         WHERE body_tsv @@ plainto_tsquery('simple', $1) \
         ORDER BY id DESC LIMIT $2",
    )
    .bind(query)
    .bind(i64::from(limit))
    .fetch_all(conn)
    .await
    .map_err(|source| IoLogError::Search {
        query: query.to_owned(),
        step: "select matching rows",
        source,
    })?;
    Ok(rows
        .into_iter()
        .map(|(id, request_id)| (IoLogId(id), request_id))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture;

    #[tokio::test]
    async fn a_prefix_still_over_the_limit_stores_the_body_without_a_vector() {
        let db = keel_testkit::database().await;
        let mut conn = db.pool().acquire().await.unwrap();
        let body: String = (0..120_000).map(|i| format!("w{i:07x} ")).collect();
        let captured = capture("req-no-tsv", body.as_bytes(), 2 * 1024 * 1024);

        // A bound of 1M characters covers the whole body, so it is over the limit too.
        let id = insert_with_prefix(&mut conn, "req-no-tsv", &captured, 1_000_000)
            .await
            .unwrap();

        let (stored, tsv_truncated, has_tsv): (String, bool, bool) = sqlx::query_as(
            "SELECT body, tsv_truncated, body_tsv IS NOT NULL FROM io_log WHERE id = $1",
        )
        .bind(id.0)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(stored, body);
        assert!(tsv_truncated);
        assert!(!has_tsv);
        assert_eq!(search(&mut conn, "w0000000", 10).await.unwrap(), []);
    }
}
