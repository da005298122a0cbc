//! The binary as an operator runs it: exit codes and the `migrate` subcommand.

use std::process::{Command, Output};

fn keel_rater(args: &[&str], database_url: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel-rater"));
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info");
    if let Some(url) = database_url {
        cmd.env("DATABASE_URL", url);
    }
    cmd.output().expect("run keel-rater")
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    for args in [
        &["--bogus"][..],
        &["migrate"],
        &[],
        &["migrate", "--log-format", "xml"],
    ] {
        let out = keel_rater(args, None);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = keel_rater(&["--help"], None);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("64  usage error"));
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
