//! `io_log` against a real Postgres: bodies are stored whole, searchable, and an oversized search
//! vector never fails the insert.

use keel_rater::capture;
use keel_rater::io_log::{self, IoLogId, TSV_PREFIX_CHARS};
use sqlx::{Connection, PgConnection};

/// A stored row, read back.
#[derive(Debug, sqlx::FromRow)]
struct Row {
    request_id: String,
    body: String,
    original_len: i64,
    truncated: bool,
    tsv_truncated: bool,
    has_tsv: bool,
}

async fn row(conn: &mut PgConnection, id: IoLogId) -> Row {
    sqlx::query_as(
        "SELECT request_id, body, original_len, truncated, tsv_truncated, \
                body_tsv IS NOT NULL AS has_tsv \
         FROM io_log WHERE id = $1",
    )
    .bind(id.0)
    .fetch_one(conn)
    .await
    .unwrap()
}

/// `count` distinct 8-character words, `w0000000 w0000001 …`, 9 bytes each.
fn distinct_words(count: usize) -> String {
    (0..count).map(|i| format!("w{i:07x} ")).collect()
}

#[tokio::test]
async fn a_body_over_the_tsvector_limit_is_stored_with_a_bounded_vector() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();

    // 120k distinct words: ~1.08 MB of body, well past the 1 MiB tsvector limit.
    let words = 120_000;
    let body = distinct_words(words);
    assert!(body.len() >= 800_000);

    // The premise: Postgres refuses this body's whole vector.
    let whole = sqlx::query("SELECT to_tsvector('simple', $1)")
        .bind(&body)
        .execute(&mut *conn)
        .await
        .unwrap_err();
    let code = whole.as_database_error().and_then(|e| e.code());
    assert_eq!(code.as_deref(), Some("54000"), "{whole}");

    let captured = capture("req-huge", body.as_bytes(), 2 * 1024 * 1024);
    assert!(!captured.truncated());
    let id = io_log::insert(&mut conn, "req-huge", &captured)
        .await
        .unwrap();

    let stored = row(&mut conn, id).await;
    assert_eq!(stored.request_id, "req-huge");
    assert_eq!(stored.body, body, "the body must be stored whole");
    assert_eq!(stored.original_len, i64::try_from(body.len()).unwrap());
    assert!(!stored.truncated);
    assert!(stored.tsv_truncated);
    assert!(stored.has_tsv, "the bounded vector should fit");

    // A word within the first TSV_PREFIX_CHARS characters is searchable...
    let prefix_words = usize::try_from(TSV_PREFIX_CHARS).unwrap() / 9;
    for word in ["w0000000", &format!("w{:07x}", prefix_words - 1)] {
        let hits = io_log::search(&mut conn, word, 10).await.unwrap();
        assert_eq!(hits, vec![(id, "req-huge".to_owned())], "{word}");
    }
    // RATER-L7: the fallback is no cliff at 64 Ki characters: a word at 256 Ki characters,
    // four times further, is still searchable.
    let further = format!("w{:07x}", 4 * prefix_words);
    let hits = io_log::search(&mut conn, &further, 10).await.unwrap();
    assert_eq!(hits, vec![(id, "req-huge".to_owned())], "{further}");
    // ...and the last word is not: the vector really is bounded.
    let beyond = format!("w{:07x}", words - 1);
    assert_eq!(io_log::search(&mut conn, &beyond, 10).await.unwrap(), []);
}

#[tokio::test]
async fn an_oversized_vector_inside_a_caller_transaction_leaves_it_usable() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();

    let mut tx = conn.begin().await.unwrap();
    let small = capture("req-before", b"before the big one", 1024);
    let first = io_log::insert(&mut tx, "req-before", &small).await.unwrap();
    let big = capture(
        "req-big",
        distinct_words(120_000).as_bytes(),
        2 * 1024 * 1024,
    );
    let second = io_log::insert(&mut tx, "req-big", &big).await.unwrap();
    tx.commit().await.unwrap();

    assert!(!row(&mut conn, first).await.tsv_truncated);
    assert!(row(&mut conn, second).await.tsv_truncated);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM io_log")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn an_ordinary_body_is_searchable_and_not_flagged() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();

    let body = br#"{"meter": "api_calls", "quantity": 42, "note": "Quarterly Rollup"}"#;
    let captured = capture("req-plain", body, 64 * 1024);
    let id = io_log::insert(&mut conn, "req-plain", &captured)
        .await
        .unwrap();
    let other = capture("req-other", b"nothing in common", 64 * 1024);
    io_log::insert(&mut conn, "req-other", &other)
        .await
        .unwrap();

    let stored = row(&mut conn, id).await;
    assert_eq!(stored.body.as_bytes(), body);
    assert_eq!(stored.original_len, i64::try_from(body.len()).unwrap());
    assert!(!stored.truncated);
    assert!(!stored.tsv_truncated);
    assert!(stored.has_tsv);

    let expected = vec![(id, "req-plain".to_owned())];
    // Case-insensitive, every word must match, and operator characters are plain text.
    for query in [
        "quarterly",
        "ROLLUP api_calls",
        "quarterly | (rollup",
        "!quarterly & :*",
    ] {
        let hits = io_log::search(&mut conn, query, 10).await.unwrap();
        assert_eq!(hits, expected, "{query}");
    }
    assert_eq!(
        io_log::search(&mut conn, "quarterly absent", 10)
            .await
            .unwrap(),
        []
    );
    assert_eq!(io_log::search(&mut conn, "", 10).await.unwrap(), []);
}

#[tokio::test]
async fn a_truncated_capture_records_its_original_length() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();

    // 10 kB of body; a NUL before the cut, and a 15-byte cap that lands inside the "é".
    let mut body = b"alpha\0beta gamm\xc3\xa9".to_vec();
    body.resize(10_000, b'z');
    let captured = capture("req-cut", &body, 15);
    assert_eq!(
        (
            captured.body(),
            captured.original_len(),
            captured.truncated()
        ),
        ("alphabeta gamm", 10_000, true)
    );
    let id = io_log::insert(&mut conn, "req-cut", &captured)
        .await
        .unwrap();

    let stored = row(&mut conn, id).await;
    assert_eq!(stored.body, "alphabeta gamm");
    assert_eq!(stored.original_len, 10_000);
    assert!(stored.truncated);
    assert!(!stored.tsv_truncated);
    let hits = io_log::search(&mut conn, "gamm", 10).await.unwrap();
    assert_eq!(hits, vec![(id, "req-cut".to_owned())]);
}

/// RATER-M7: a NUL in a caller-supplied request id failed the insert (SQLSTATE 22021) with
/// advice about reachability.
#[tokio::test]
async fn a_nul_in_the_request_id_is_stored_sanitized() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let captured = capture("req\0-1", b"hello", 100);
    let id = io_log::insert(&mut conn, "req\0-1", &captured)
        .await
        .unwrap();
    assert_eq!(row(&mut conn, id).await.request_id, "req-1");
    let long = "é".repeat(1000);
    let id = io_log::insert(&mut conn, &long, &captured).await.unwrap();
    assert!(row(&mut conn, id).await.request_id.len() <= keel_rater::MAX_REQUEST_ID_LEN);
}

/// RATER-M7 and RATER-L7: 300 words over the lexeme limit logged 300 notices, and the row
/// claimed a complete vector although no word was indexed.
#[tokio::test]
async fn words_too_long_to_index_mark_the_vector_truncated_with_one_warning() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let body: String = (0..300)
        .map(|i| format!("{}{i:04} ", "x".repeat(3000)))
        .collect();
    let captured = capture("req-long", body.as_bytes(), 2 * 1024 * 1024);
    let id = io_log::insert(&mut conn, "req-long", &captured)
        .await
        .unwrap();
    let stored = row(&mut conn, id).await;
    assert!(
        stored.tsv_truncated,
        "no word was indexed, yet the row claims completeness"
    );
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert_eq!(
        text.matches("too long to be indexed").count(),
        0,
        "per-word notices reached the log:\n{text}"
    );
    assert_eq!(
        text.matches("words over PostgreSQL's 2047-byte").count(),
        1,
        "{text}"
    );
}
