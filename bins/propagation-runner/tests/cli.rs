//! `keel-propagation-runner` as an operator runs it, against a real Postgres.

use std::process::{Command, Output};

fn runner(args: &[&str], database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel-propagation-runner"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("KEEL_WORKER_ID", "cli-test")
        .output()
        .expect("run keel-propagation-runner")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn usage_errors_exit_64() {
    for args in [
        &["--bogus"][..],
        &["run", "--batch-size", "0"],
        &["dead-letters", "requeue", "--actor", "operator:a"],
    ] {
        let out = runner(args, "postgres://unused@127.0.0.1:1/none");
        assert_eq!(
            out.status.code(),
            Some(64),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn a_drifted_resource_whose_role_is_missing_retries_instead_of_applying() {
    let db = keel_testkit::database().await;
    let team = uuid::Uuid::new_v4();
    let resource = uuid::Uuid::new_v4();
    sqlx_exec(
        &db,
        &format!("INSERT INTO teams (id, tier) VALUES ('{team}', 'pro')"),
    )
    .await;
    sqlx_exec(
        &db,
        &format!(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
             VALUES ('{resource}', 'clitoken01', '{team}', 'postgres', 'free', 'active', 'cust_missing_role', 'postgres://x')"
        ),
    )
    .await;
    let url = db.url();

    let reconciled = runner(&["reconcile"], &url);
    assert_eq!(
        reconciled.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&reconciled.stderr)
    );
    assert!(
        stdout(&reconciled).contains("1 drifted resource(s) enqueued"),
        "{}",
        stdout(&reconciled)
    );

    let drained = runner(&["run", "--once", "--log-format", "json"], &url);
    assert_eq!(
        drained.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&drained).trim()).unwrap();
    assert_eq!(report["claimed"], 1);
    assert_eq!(report["unexpected_skips"], 1);
    assert_eq!(report["applied"], 0);
    let stderr = String::from_utf8_lossy(&drained.stderr);
    assert!(stderr.contains("propagation.unexpected_skip"), "{stderr}");
    assert!(
        !stderr.contains("clitoken01"),
        "a token reached the log: {stderr}"
    );

    let listed = runner(&["dead-letters", "list", "--json"], &url);
    assert_eq!(listed.status.code(), Some(0));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout(&listed)).unwrap(),
        serde_json::json!([])
    );

    let enqueued = runner(
        &[
            "enqueue",
            "--team-id",
            &team.to_string(),
            "--resource-id",
            &resource.to_string(),
            "--resource-type",
            "postgres",
            "--target-tier",
            "team",
        ],
        &url,
    );
    assert_eq!(
        enqueued.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&enqueued.stderr)
    );
    assert!(
        stdout(&enqueued).starts_with("Replaced("),
        "a new target coalesces: {}",
        stdout(&enqueued)
    );
}

async fn sqlx_exec(db: &keel_testkit::TestDatabase, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(db.pool())
        .await
        .unwrap();
}
