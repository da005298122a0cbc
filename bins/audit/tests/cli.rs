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
