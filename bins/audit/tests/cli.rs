//! `keel-audit seal` and `verify` as an operator runs them: the owner seals, the owner tampers,
//! `verify` exits 2 naming the row.

use std::process::Command;

use keel_audit::postgres::insert;
use keel_audit::{Actor, AuditEvent, AuditKind};

fn keel_audit(args: &[&str], url: &str, key_file: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel-audit"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("KEEL_AUDIT_SEAL_KEY_FILE", key_file)
        .env("KEEL_AUDIT_SEAL_KEY_ID", "cli-test")
        .output()
        .unwrap()
}

#[tokio::test]
async fn verify_exits_2_and_names_the_row_the_owner_changed() {
    let db = keel_testkit::role_split_database().await;
    let key_file = std::env::temp_dir().join(format!("keel-audit-key-{}", std::process::id()));
    std::fs::write(&key_file, "a seal key of at least 32 bytes, for the test\n").unwrap();
    let mut app = db.app().acquire().await.unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        let event = AuditEvent::new(
            AuditKind::PropagationApplied,
            Actor::system(),
            time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(n),
        );
        ids.push(insert(&mut app, &event).await.unwrap().0);
    }
    let owner = db.owner_url();
    // Transactions of other tests on the shared server may hold the horizon back: seal until
    // every row is chained.
    for _ in 0..600 {
        let out = keel_audit(&["seal", "--once"], &owner, &key_file);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sealed: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_seals")
            .fetch_one(db.owner())
            .await
            .unwrap();
        if sealed == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let clean = keel_audit(&["verify"], &owner, &key_file);
    assert_eq!(clean.status.code(), Some(0), "{clean:?}");
    assert!(String::from_utf8_lossy(&clean.stdout).contains("3 links"));

    // Verifying from a checkpoint that exists holds; from one that does not is a usage error
    // (64) saying so, never TAMPERED (2): nothing was verified from it.
    let last: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM audit_checkpoints")
        .fetch_one(db.owner())
        .await
        .unwrap();
    let last = last.expect("sealing signed a checkpoint").to_string();
    let from_last = keel_audit(&["verify", "--from-checkpoint", &last], &owner, &key_file);
    assert_eq!(from_last.status.code(), Some(0), "{from_last:?}");
    let missing = keel_audit(
        &["verify", "--from-checkpoint", "999999"],
        &owner,
        &key_file,
    );
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(missing.status.code(), Some(64), "{missing:?}");
    assert!(stderr.contains("no checkpoint 999999"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&missing.stdout).contains("TAMPERED"),
        "{missing:?}"
    );

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete; \
         UPDATE audit_events SET actor = 'forged' WHERE id = {}",
        ids[2]
    )))
    .execute(db.owner())
    .await
    .unwrap();
    let tampered = keel_audit(&["verify"], &owner, &key_file);
    let stdout = String::from_utf8_lossy(&tampered.stdout);
    assert_eq!(tampered.status.code(), Some(2), "{tampered:?}");
    assert!(
        stdout.contains(&format!("audit row {} (seal 3) was changed", ids[2])),
        "{stdout}"
    );
    let _ = std::fs::remove_file(&key_file);
}

fn list_json(url: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_keel-audit"))
        .arg("list")
        .arg("--json")
        .args(args)
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn list_filters_as_json_and_resumes_from_the_printed_cursor() {
    let db = keel_testkit::role_split_database().await;
    let mut app = db.app().acquire().await.unwrap();
    let team = keel_audit::TeamId::new_random();
    let mut ids = Vec::new();
    for (n, kind) in [
        AuditKind::ProvisionCreated,
        AuditKind::ResourceDeprovisioned,
        AuditKind::ProvisionCreated,
    ]
    .into_iter()
    .enumerate()
    {
        let event = AuditEvent::new(
            kind,
            Actor::parse("bob").unwrap(),
            time::OffsetDateTime::UNIX_EPOCH,
        )
        .team(team)
        .request(keel_audit::RequestId::parse(&format!("req-{n}")).unwrap());
        ids.push(insert(&mut app, &event).await.unwrap().0);
    }
    let url = db.app_url();
    // Page through everything one row at a time, resuming from each printed cursor (other
    // tests' transactions on the shared server may hold the commit horizon back for a moment).
    let mut seen = Vec::new();
    let mut after = "0-0".to_owned();
    for _ in 0..600 {
        let page = list_json(&url, &["--limit", "1", "--after", &after]);
        for event in page["events"].as_array().unwrap() {
            seen.push(event["id"].as_i64().unwrap());
            assert_eq!(event["team_id"], team.as_uuid().to_string());
        }
        after = page["next"].as_str().unwrap().to_owned();
        if seen.len() == ids.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, ids, "every row once, in commit order");

    let created = list_json(&url, &["--kind", "provision.created", "--actor", "bob"]);
    let created: Vec<i64> = created["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(created, [ids[0], ids[2]]);
    let by_request = list_json(
        &url,
        &[
            "--request-id",
            "req-1",
            "--since",
            "2000-01-01T00:00:00Z",
            "--team",
            &team.as_uuid().to_string(),
        ],
    );
    assert_eq!(by_request["events"][0]["id"], ids[1]);
    assert_eq!(by_request["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        list_json(&url, &["--until", "2000-01-01T00:00:00Z"])["events"],
        serde_json::json!([])
    );

    // Bad input: a usage error (exit 64) naming the flag and what it takes, nothing listed.
    // The last case is a credential pasted into a flag: refused without being quoted back.
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJvcGVyYXRvciJ9.c2lnbmF0dXJlLW5vdC1yZWFs";
    for (args, says) in [
        (&["list", "--after", "yesterday"][..], "<txid>-<id>"),
        (&["list", "--since", "yesterday"][..], "RFC 3339"),
        (&["list", "--until", "2026-13-01T00:00:00Z"][..], "RFC 3339"),
        (&["list", "--kind", "no.such_kind"][..], "--kind"),
        (&["list", "--limit", "0"][..], "--limit"),
        (&["list", "--actor", "Not An Actor"][..], "--actor"),
        (
            &[
                "list",
                "--since",
                "2026-11-30T00:00:00Z",
                "--until",
                "2026-11-29T00:00:00Z",
            ][..],
            "--since must be before --until",
        ),
        (
            &[
                "requeue",
                "--event-id",
                "00000000-0000-4000-8000-000000000001",
                "--actor",
                "bob",
            ][..],
            "expected operator:NAME",
        ),
        (&["list", "--actor", jwt][..], "--actor"),
    ] {
        let bad = Command::new(env!("CARGO_BIN_EXE_keel-audit"))
            .args(args)
            .env("DATABASE_URL", &url)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("eyJhbGci"), "{args:?}: {stderr}");
        assert!(bad.stdout.is_empty(), "{args:?}: nothing listed");
    }
}

/// A database URL nothing listens on: a command that reaches it fails (exit 1), so exit 64 shows
/// the value was refused while parsing, before any connection.
const NOWHERE: &str = "postgres://unused@127.0.0.1:1/none";

/// Runs `keel-audit` against [`NOWHERE`] with valid key files and webhook URL in the
/// environment (so only the flag under test can be wrong), `env` on top.
fn offline(
    args: &[&str],
    key_file: &std::path::Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel-audit"))
        .args(args)
        .env("DATABASE_URL", NOWHERE)
        .env("KEEL_AUDIT_SEAL_KEY_FILE", key_file)
        .env("KEEL_AUDIT_SEAL_KEY_ID", "cli-test")
        .env("KEEL_AUDIT_NOTIFY_KEY_FILE", key_file)
        .env("KEEL_AUDIT_WEBHOOK_URL", "http://127.0.0.1:9/hook")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// A flag value that would disable the work (a batch or a limit of 0), overflow it (a month, a
/// time, a backoff or a count out of range), or could never work (a webhook URL that is not
/// http(s) or carries credentials) is a usage error (exit 64) naming the flag, at parse time:
/// nothing connects, nothing is written, and a URL is never quoted back. An oversized key file
/// is refused naming its flag, never its content.
#[test]
fn a_flag_value_that_would_disable_or_overflow_the_work_is_a_usage_error() {
    let dir = std::env::temp_dir().join(format!("keel-audit-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("key");
    std::fs::write(
        &key_file,
        "a key of at least 32 bytes, for the usage test\n",
    )
    .unwrap();
    let export = dir.join("export.jsonl");
    let export = export.to_str().unwrap();
    let secret_url = "https://ops:pw-s3cr3t@hooks.example/keel";
    for (args, flag) in [
        (&["seal", "--once", "--batch", "0"][..], "--batch"),
        (&["seal", "--once", "--batch", "100001"][..], "--batch"),
        (&["verify", "--from-checkpoint=0"][..], "--from-checkpoint"),
        (&["verify", "--from-checkpoint=-1"][..], "--from-checkpoint"),
        (&["dead-letters", "--limit", "0"][..], "--limit"),
        (&["dead-letters", "--limit", "10001"][..], "--limit"),
        (
            &["partitions", "ensure", "--months-ahead", "121"][..],
            "--months-ahead",
        ),
        (
            &["partitions", "ensure", "--months-ahead", "4294967295"][..],
            "--months-ahead",
        ),
        (
            &["list", "--until", "9999-12-31T23:59:59-01:00"][..],
            "--until",
        ),
        (
            &["list", "--since", "0001-01-01T00:30:00+01:00"][..],
            "--since",
        ),
        (
            &["dispatch", "--once", "--max-attempts", "0"][..],
            "--max-attempts",
        ),
        (
            &["dispatch", "--once", "--max-attempts", "10001"][..],
            "--max-attempts",
        ),
        (&["dispatch", "--once", "--batch", "0"][..], "--batch"),
        (&["dispatch", "--once", "--batch", "1001"][..], "--batch"),
        (
            &["dispatch", "--once", "--request-timeout-secs", "0"][..],
            "--request-timeout-secs",
        ),
        (
            &["dispatch", "--once", "--request-timeout-secs", "301"][..],
            "--request-timeout-secs",
        ),
        (&["dispatch", "--once", "--poll-ms", "9"][..], "--poll-ms"),
        (
            &["dispatch", "--once", "--poll-ms", "3600001"][..],
            "--poll-ms",
        ),
        (
            &["dispatch", "--once", "--base-backoff-ms", "0"][..],
            "--base-backoff-ms",
        ),
        (
            &["dispatch", "--once", "--base-backoff-ms", "3600001"][..],
            "--base-backoff-ms",
        ),
        (
            &["dispatch", "--once", "--max-backoff-secs", "0"][..],
            "--max-backoff-secs",
        ),
        (
            &["dispatch", "--once", "--max-backoff-secs", "604801"][..],
            "--max-backoff-secs",
        ),
        (
            &[
                "dispatch",
                "--once",
                "--webhook-url",
                "ftp://hooks.example/keel",
            ][..],
            "--webhook-url",
        ),
        (
            &["dispatch", "--once", "--webhook-url", secret_url][..],
            "--webhook-url",
        ),
        (
            &[
                "retention",
                "export",
                "--month",
                "2026-13",
                "--actor",
                "operator:alice",
                "--out",
                export,
            ][..],
            "--month",
        ),
        (
            &[
                "retention",
                "export",
                "--month",
                "1999-12",
                "--actor",
                "operator:alice",
                "--out",
                export,
            ][..],
            "--month",
        ),
        (
            &[
                "retention",
                "export",
                "--months-ago",
                "1201",
                "--actor",
                "operator:alice",
                "--out",
                export,
            ][..],
            "--months-ago",
        ),
    ] {
        let out = offline(args, &key_file, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        // Named as the culprit ("for '--flag …'"), not merely in the usage line.
        assert!(stderr.contains(&format!("'{flag}")), "{args:?}: {stderr}");
        assert!(!stderr.contains("s3cr3t"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing done");
    }
    assert!(
        !std::path::Path::new(export).exists(),
        "a refused export wrote a file"
    );

    // A webhook URL from the environment is refused the same way, and never quoted either.
    for url in ["ftp://ops:pw-s3cr3t@hooks.example/keel", secret_url] {
        let out = offline(
            &["dispatch", "--once"],
            &key_file,
            &[("KEEL_AUDIT_WEBHOOK_URL", url)],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("--webhook-url"), "{stderr}");
        assert!(!stderr.contains("s3cr3t"), "{stderr}");
    }

    // A key file of more than 4096 bytes is refused before anything connects, naming its flag
    // and never its content.
    let big = dir.join("oversized");
    std::fs::write(&big, "k3y-c0ntent-".repeat(400)).unwrap();
    let big = big.to_str().unwrap();
    for (args, variable, flag) in [
        (
            &["dispatch", "--once"][..],
            "KEEL_AUDIT_NOTIFY_KEY_FILE",
            "--signing-key-file",
        ),
        (
            &["verify"][..],
            "KEEL_AUDIT_SEAL_KEY_FILE",
            "--seal-key-file",
        ),
    ] {
        let out = offline(args, &key_file, &[(variable, big)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains("4096"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("k3y-c0ntent"), "{args:?}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stored audit row whose actor, request id or attribute holds a control character (history
/// another writer put there is not screened again on read) is listed with it escaped: no line
/// of `keel-audit list` can pose as another or drive the terminal.
#[tokio::test]
async fn list_escapes_control_characters_of_stored_rows() {
    let db = keel_testkit::database().await;
    sqlx::query(
        "INSERT INTO audit_events (kind, actor, request_id, attributes, occurred_at) \
         VALUES ('provision.created', $1, 'req-1', jsonb_build_object('note', $2::text), now())",
    )
    .bind("bob\n2026-12-02T12:00:00Z  9999  propagation.applied")
    .bind("a\u{1b}[31mred")
    .execute(db.pool())
    .await
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel-audit"))
        .arg("list")
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("provision.created"))
        .collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(rows[0].contains("actor=bob\\n2026-12-02"), "{stdout}");
    assert!(rows[0].contains("note=a\\u{1b}[31mred"), "{stdout}");
    assert!(!stdout.contains('\u{1b}'), "{stdout}");
    assert!(
        !stdout
            .lines()
            .any(|l| l.contains("propagation.applied") && !l.contains("actor="))
    );
}
