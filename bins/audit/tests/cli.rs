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
