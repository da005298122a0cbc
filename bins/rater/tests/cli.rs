//! The binary as an operator runs it: exit codes and the `migrate` subcommand.

use std::process::{Command, Output};

/// `keel-rater` with `args`, logging at INFO, with `database_url` as its only database.
fn rater_command(args: &[&str], database_url: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel-rater"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd
}

fn keel_rater(args: &[&str], database_url: Option<&str>) -> Output {
    rater_command(args, database_url)
        .output()
        .expect("run keel-rater")
}

/// `keel-rater` started with `args` against `database_url`, its output captured.
fn spawn_keel_rater(args: &[&str], database_url: &str) -> std::process::Child {
    rater_command(args, Some(database_url))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run keel-rater")
}

/// Polls `condition` (a boolean query) until it holds, for at most ten seconds; whether it did.
async fn eventually(db: &keel_testkit::TestDatabase, condition: &'static str) -> bool {
    for _ in 0..400 {
        let holds: bool = sqlx::query_scalar(condition)
            .fetch_one(db.pool())
            .await
            .unwrap();
        if holds {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    false
}

/// Sends SIGTERM to `child` and waits for it: its exit code and standard error.
fn terminate(child: std::process::Child) -> (Option<i32>, String) {
    let signalled = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_64_and_help_lists_the_exit_codes() {
    let cases: &[&[&str]] = &[
        &["--bogus"],
        &["migrate"],
        &[],
        &["migrate", "--log-format", "xml"],
        &["--since", "yesterday"],
    ];
    for args in cases {
        let out = keel_rater(args, None);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let off_the_hour = keel_rater(
        &["--backfill", "--since", "2026-11-20T00:30:00Z"],
        Some("postgres://x@127.0.0.1:1/none"),
    );
    assert_eq!(off_the_hour.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&off_the_hour.stderr).contains("must be on a whole hour"));
    // An instant UTC cannot hold (the year 10000 there) is a usage error, never a panic.
    for flag in ["--since", "--until"] {
        let past_9999 = keel_rater(
            &["--backfill", flag, "9999-12-31T23:00:00-01:00"],
            Some("postgres://x@127.0.0.1:1/none"),
        );
        let stderr = String::from_utf8_lossy(&past_9999.stderr);
        assert_eq!(past_9999.status.code(), Some(64), "{flag}: {stderr}");
        assert!(stderr.contains("out of range"), "{flag}: {stderr}");
    }
    let help = keel_rater(&["--help"], None);
    assert_eq!(help.status.code(), Some(0));
    let help = String::from_utf8_lossy(&help.stdout);
    for code in [
        "0   clean",
        "1   error",
        "2   attention",
        "3   skipped",
        "64  usage error",
    ] {
        assert!(help.contains(code), "--help lacks {code:?}:\n{help}");
    }
}

#[tokio::test]
async fn a_routine_run_on_an_empty_database_exits_0_and_prints_json() {
    let db = keel_testkit::database().await;
    let out = keel_rater(&["--output", "json"], Some(&db.url()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["explicit"], false);
    assert_eq!(doc["exit_code"], 0);
    assert_eq!(doc["report"]["unchanged"], 0);
}

/// The exit-code contract for losses a routine run commits and then cannot report: a run whose
/// ledger row cannot be closed after it lowered a rated hour exits 2, not 1; the next run takes
/// the open row over and pages for it again (exit 2), and the one after is clean.
#[tokio::test]
async fn committed_losses_page_even_when_the_run_cannot_close_its_ledger_row() {
    let db = keel_testkit::database().await;
    for sql in [
        "INSERT INTO prices (meter, effective_from, unit_price) \
         VALUES ('requests', '2020-01-01Z', 0.001)",
        "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) VALUES \
         ('e1', 'acme', 'requests', 10, date_trunc('hour', now()) - interval '3 hours'), \
         ('e2', 'acme', 'requests', 5, date_trunc('hour', now()) - interval '3 hours')",
    ] {
        sqlx::query(sql).execute(db.pool()).await.unwrap();
    }
    let routine = || keel_rater(&[], Some(&db.url()));
    let code = |out: &Output| {
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code(&routine()).0, Some(0));
    for sql in [
        "DELETE FROM billing_event WHERE event_id = 'e1'",
        "CREATE FUNCTION refuse_close() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'the ledger refuses'; END $$",
        "CREATE TRIGGER refuse_close BEFORE UPDATE ON rater_runs FOR EACH ROW \
         WHEN (NEW.finished_at IS NOT NULL) EXECUTE FUNCTION refuse_close()",
    ] {
        sqlx::query(sql).execute(db.pool()).await.unwrap();
    }
    let (exit, stderr) = code(&routine());
    assert_eq!(exit, Some(2), "{stderr}");
    assert!(stderr.contains("the ledger refuses"), "{stderr}");
    assert!(stderr.contains("1 lost rated hour"), "{stderr}");
    sqlx::query("DROP TRIGGER refuse_close ON rater_runs")
        .execute(db.pool())
        .await
        .unwrap();
    let (exit, stderr) = code(&routine());
    assert_eq!(
        exit,
        Some(2),
        "the next run pages for the open row: {stderr}"
    );
    let (exit, stderr) = code(&routine());
    assert_eq!(exit, Some(0), "reported once: {stderr}");
}

#[tokio::test]
async fn migrate_applies_the_schema_from_the_environment_and_logs_no_secret() {
    let db = keel_testkit::empty_database().await;
    let out = keel_rater(&["migrate", "--log-format", "json"], Some(&db.url()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("schema is up to date"), "{stderr}");
    assert!(
        stderr.lines().all(|l| l.starts_with('{')),
        "JSON log lines expected: {stderr}"
    );
    assert!(
        !stderr.contains(&db.url()),
        "the database URL reached the log"
    );
    let audit_table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('audit_events')::text")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(audit_table.as_deref(), Some("audit_events"));
}

#[test]
fn an_unreachable_database_exits_1_without_showing_the_password() {
    let out = keel_rater(&["migrate"], Some("postgres://app:s3cr3t@127.0.0.1:1/keel"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("could not connect"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
}

/// RATER-L6: a leftover `KEEL_RATER_SINCE` used to turn a routine run into a quiet backfill.
#[test]
fn a_window_without_backfill_is_a_usage_error_naming_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel-rater"))
        .env("KEEL_RATER_SINCE", "2026-11-20T00:00:00Z")
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/none")
        .output()
        .expect("run keel-rater");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--backfill"), "{stderr}");
}

/// RATER-L8: a bad `--since` with no database was reported as "no database", and an
/// unreachable database as "pool timed out".
#[test]
fn window_errors_come_first_and_an_unreachable_database_names_its_cause() {
    let out = keel_rater(&["--backfill", "--since", "2026-11-20T00:30:00Z"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("must be on a whole hour"), "{stderr}");
    assert!(!stderr.contains("no database"), "{stderr}");

    let out = keel_rater(&[], Some("postgres://app:s3cr3t@127.0.0.1:1/keel"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("could not connect"), "{stderr}");
    assert!(!stderr.contains("timed out"), "{stderr}");
    assert!(!stderr.contains("s3cr3t"), "{stderr}");
}

/// A one-shot HTTP server: answers 200 to the first request and returns what it received.
fn one_request_server() -> (u16, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).unwrap();
            received.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&received).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|l| l.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if body.len() >= length {
                    break;
                }
            }
            if n == 0 {
                break;
            }
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&received).into_owned()
    });
    (port, handle)
}

/// A push-metrics URL that could never work is a usage error at start (exit 64, its value not
/// shown), before anything is rated, not an ERROR after every run that still exits 0.
#[tokio::test]
async fn a_malformed_push_metrics_url_is_a_usage_error_at_start() {
    let db = keel_testkit::database().await;
    for bad in [
        "ftp://gateway:9091",
        "http://user:secret-pw@gateway:9091",
        "http://",
        "gateway:9091",
        "http://gate way:9091",
    ] {
        let out = keel_rater(&["--push-metrics-url", bad], Some(&db.url()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{bad}: {stderr}");
        assert!(stderr.contains("--push-metrics-url"), "{bad}: {stderr}");
        assert!(
            !stderr.contains("secret-pw"),
            "the value is never shown: {stderr}"
        );
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM rater_runs")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(runs, 0, "nothing ran");
}

/// The agreed rater metrics are pushed, as job `keel-rater`, at the end of a run.
#[tokio::test]
async fn a_run_pushes_the_agreed_metrics_to_the_gateway() {
    let db = keel_testkit::database().await;
    let (port, server) = one_request_server();
    let url = format!("http://127.0.0.1:{port}");
    let out = keel_rater(&["--push-metrics-url", &url], Some(&db.url()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let request = server.join().unwrap();
    assert!(
        request.starts_with("PUT /metrics/job/keel-rater HTTP/1.1"),
        "{request}"
    );
    for line in [
        "instant_rater_last_exit_code 0",
        "instant_rater_runs_total{outcome=\"clean\"} 1",
        "instant_rater_runs_total{outcome=\"error\"} 0",
        "instant_rater_runs_total{outcome=\"attention\"} 0",
        "instant_rater_runs_total{outcome=\"skipped_locked\"} 0",
        "instant_rater_rated_rows_total 0",
        "instant_rater_late_events_total 0",
        "# TYPE instant_rater_last_success_timestamp_seconds gauge",
        "# TYPE instant_rater_last_run_timestamp_seconds gauge",
    ] {
        assert!(request.contains(line), "missing {line:?} in:\n{request}");
    }
}

/// A gateway that takes the connection and never answers does not hold the run: the push is
/// given up at its deadline (logged at ERROR) and the run exits with its own code, its ledger
/// row closed.
#[tokio::test]
async fn a_gateway_that_never_answers_does_not_hold_the_run_or_its_exit_code() {
    let db = keel_testkit::database().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Takes every connection and keeps it open, answering nothing.
    let held = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        std::thread::sleep(std::time::Duration::from_secs(120));
        drop(stream);
    });
    let mut child = spawn_keel_rater(
        &[
            "--push-metrics-url",
            &url,
            "--push-metrics-timeout-secs",
            "1",
        ],
        &db.url(),
    );
    let mut status = None;
    for _ in 0..600 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let Some(status) = status else {
        child.kill().unwrap();
        panic!("the run was still waiting for the gateway a minute later");
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("could not push the rater's metrics")
            && stderr.contains("did not answer within 1s"),
        "{stderr}"
    );
    assert!(!stderr.contains(&url), "the URL is never shown: {stderr}");
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM rater_runs WHERE finished_at IS NULL")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(open, 0, "the run's ledger row is closed");
    drop(held);
}

/// RATER-M4: SIGTERM (a Kubernetes deadline or drain) left the ledger row open forever.
#[tokio::test]
async fn sigterm_rolls_back_the_day_in_progress_and_closes_the_ledger_row() {
    let db = keel_testkit::database().await;
    sqlx::query(
        "INSERT INTO billing_event (event_id, auth_id, meter, quantity, occurred_at) \
         VALUES ('e1', 'acme', 'requests', 1, date_trunc('hour', now()) - interval '2 hours')",
    )
    .execute(db.pool())
    .await
    .unwrap();
    // Hold the rater inside its rating statement.
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query("LOCK TABLE prices IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let child = spawn_keel_rater(&[], &db.url());
    let open = eventually(
        &db,
        "SELECT EXISTS (SELECT 1 FROM rater_runs WHERE finished_at IS NULL) \
            AND EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                        AND application_name = 'keel-rater-lock' \
                        AND datname = current_database())",
    )
    .await;
    assert!(open, "the rater never reached its rating statement");
    let (code, stderr) = terminate(child);
    blocker.rollback().await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("termination signal"), "{stderr}");
    let row: (Option<i16>, bool) =
        sqlx::query_as("SELECT exit_code, finished_at IS NOT NULL FROM rater_runs")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(row, (Some(1), true));
    let rated: i64 = sqlx::query_scalar("SELECT count(*) FROM rated_usage")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rated, 0);
}

/// RATER-L5: a healthy run logs none of its SQL statements at any level, so sqlx's
/// "slow statement" WARN (which prints the whole rating statement) cannot fire on a large run;
/// each day's duration is logged at INFO instead.
#[tokio::test]
async fn a_run_logs_no_sql_statement_at_any_level() {
    let db = keel_testkit::database().await;
    let out = Command::new(env!("CARGO_BIN_EXE_keel-rater"))
        .env_remove("DATABASE_URL")
        .env("DATABASE_URL", db.url())
        .env("RUST_LOG", "trace")
        .env("NO_COLOR", "1")
        .output()
        .expect("run keel-rater");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("keel_rater"),
        "the run logged nothing of its own at TRACE: {stderr}"
    );
    for statement_log in ["sqlx::query", "slow statement"] {
        assert!(
            !stderr.contains(statement_log),
            "a statement reached the log ({statement_log:?}):\n{stderr}"
        );
    }
}

/// OPS-14: `--log-format` may stand before `migrate`, while a rating flag given with `migrate`
/// is a usage error that names it (it would otherwise be silently ignored).
#[tokio::test]
async fn the_log_format_may_precede_migrate_but_rating_flags_may_not() {
    let db = keel_testkit::empty_database().await;
    let out = keel_rater(&["--log-format", "json", "migrate"], Some(&db.url()));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = keel_rater(&["--dry-run", "migrate"], Some(&db.url()));
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: the subcommand 'migrate' cannot be used with '--dry-run'"),
        "{stderr}"
    );
    let out = keel_rater(&["--log-format", "xml", "migrate"], Some(&db.url()));
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: invalid value 'xml'"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// SIGTERM while the run still waits to take its lock (the fence row is held by another
/// session) is a stop the run records: exit 1, a ledger row that says so, nothing rated. The
/// signal handlers are installed before anything connects, so the default disposition never
/// kills the process (exit 143) with no ledger row.
#[tokio::test]
async fn sigterm_while_taking_the_lock_exits_1_with_a_ledger_row() {
    let db = keel_testkit::database().await;
    let mut blocker = db.pool().begin().await.unwrap();
    sqlx::query("SELECT * FROM rater_lease FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let child = spawn_keel_rater(&[], &db.url());
    let waiting = eventually(
        &db,
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                        AND application_name = 'keel-rater-lock' \
                        AND datname = current_database())",
    )
    .await;
    assert!(waiting, "the rater never waited on its lock");
    let (code, stderr) = terminate(child);
    blocker.rollback().await.unwrap();
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("termination signal"), "{stderr}");
    let rows: Vec<(Option<i16>, bool)> =
        sqlx::query_as("SELECT exit_code, finished_at IS NOT NULL FROM rater_runs")
            .fetch_all(db.pool())
            .await
            .unwrap();
    assert_eq!(rows, [(Some(1), true)]);
}
