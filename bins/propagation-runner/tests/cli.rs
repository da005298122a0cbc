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

/// A flag value that would disable the work (a limit of 0 lists nothing), overflow its time
/// arithmetic (a retention of millions of days) or let two replicas apply one row (a lease that
/// does not outlast an apply) is a usage error (exit 64) naming the flags, before any database
/// is reached: the URL points nowhere, so a run that got that far would exit 1.
#[test]
fn a_flag_value_that_would_disable_or_overflow_the_work_is_a_usage_error() {
    for (args, flags) in [
        (
            &["prune", "--retain-applied-days", "36501"][..],
            &["--retain-applied-days"][..],
        ),
        (
            &["prune", "--retain-dead-lettered-days", "4294967295"][..],
            &["--retain-dead-lettered-days"][..],
        ),
        (
            &["run", "--once", "--retain-applied-days", "36501"][..],
            &["--retain-applied-days"][..],
        ),
        (
            &["run", "--once", "--retain-dead-lettered-days", "36501"][..],
            &["--retain-dead-lettered-days"][..],
        ),
        (
            &["dead-letters", "list", "--limit", "0"][..],
            &["--limit"][..],
        ),
        (
            &["dead-letters", "list", "--limit", "10001"][..],
            &["--limit"][..],
        ),
        (&["deferred", "list", "--limit", "0"][..], &["--limit"][..]),
        (
            &["run", "--once", "--lease-seconds", "86401"][..],
            &["--lease-seconds"][..],
        ),
        (
            &["deferred", "list", "--limit", "10001"][..],
            &["--limit"][..],
        ),
        (
            &["run", "--once", "--cluster-max-connections", "0"][..],
            &["--cluster-max-connections"][..],
        ),
        (
            &["run", "--once", "--worker-id", "bad id!"][..],
            &["--worker-id"][..],
        ),
        (
            &["run", "--once", "--worker-id", &"w".repeat(58)][..],
            &["--worker-id"][..],
        ),
        (
            &[
                "run",
                "--once",
                "--lease-seconds",
                "30",
                "--apply-timeout-seconds",
                "60",
            ][..],
            &["--lease-seconds", "--apply-timeout-seconds"][..],
        ),
    ] {
        let out = runner(args, "postgres://unused@127.0.0.1:1/none");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        for flag in flags {
            assert!(stderr.contains(flag), "{args:?}: {stderr}");
        }
        assert!(out.stdout.is_empty(), "{args:?}: nothing listed or run");
    }
}

#[tokio::test]
async fn a_drifted_resource_whose_role_is_missing_retries_instead_of_applying() {
    let db = keel_testkit::database().await;
    let team = uuid::Uuid::new_v4();
    let resource = uuid::Uuid::new_v4();
    // The role keel-provision would have created for the token (it does not exist).
    let role = keel_provision::RoleName::for_database(&keel_provision::DatabaseName::for_token(
        &keel_audit::Token::parse("clitoken01").unwrap(),
    ));
    let role = role.expose();
    sqlx_exec(
        &db,
        &format!("INSERT INTO teams (id, tier) VALUES ('{team}', 'pro')"),
    )
    .await;
    sqlx_exec(
        &db,
        &format!(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, provider_resource_id, connection_url) \
             VALUES ('{resource}', 'clitoken01', '{team}', 'postgres', 'free', 'active', '{role}', 'postgres://x')"
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

    // PROP-15: the operator path goes through the same funnel. A target other than the team's
    // tier is refused (the reconciler would revert it) and nothing is written.
    let enqueue = |tier: &str| {
        runner(
            &[
                "enqueue",
                "--team-id",
                &team.to_string(),
                "--resource-id",
                &resource.to_string(),
                "--resource-type",
                "postgres",
                "--target-tier",
                tier,
                "--actor",
                "operator:alice",
            ],
            &url,
        )
    };
    let refused = enqueue("team");
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("team") && stderr.contains("nothing was written"),
        "{stderr}"
    );
    assert_eq!(audited(&db, "propagation.enqueued").await, 0);

    // Re-sending the target the pending row already has changes nothing: no budget re-armed.
    let same = enqueue("pro");
    assert_eq!(
        same.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&same.stderr)
    );
    assert!(stdout(&same).starts_with("Unchanged("), "{}", stdout(&same));
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM pending_propagations")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(attempts, 1, "the spent attempt must stay spent");

    sqlx_exec(
        &db,
        &format!("UPDATE teams SET tier = 'team' WHERE id = '{team}'"),
    )
    .await;
    let enqueued = enqueue("team");
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
    assert_eq!(
        audited(&db, "propagation.enqueued").await,
        2,
        "every operator enqueue is audited"
    );
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM audit_events WHERE kind = 'propagation.enqueued' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(actor, "operator:alice");

    // A resource that does not exist is refused, never "deprovisioned".
    let missing = runner(
        &[
            "enqueue",
            "--team-id",
            &team.to_string(),
            "--resource-id",
            &uuid::Uuid::new_v4().to_string(),
            "--resource-type",
            "postgres",
            "--target-tier",
            "team",
            "--actor",
            "operator:alice",
        ],
        &url,
    );
    assert_eq!(missing.status.code(), Some(64));
}

async fn audited(db: &keel_testkit::TestDatabase, kind: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM audit_events WHERE kind = $1")
        .bind(kind)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

async fn sqlx_exec(db: &keel_testkit::TestDatabase, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(db.pool())
        .await
        .unwrap();
}

/// PROP-8 as operators see it: a row a newer build wrote is listed by `deferred list` with its
/// reason, left pending by `run --once`, and `prune` keeps everything still open.
#[tokio::test]
async fn rows_this_build_cannot_run_are_listed_for_operators_and_left_pending() {
    let db = keel_testkit::database().await;
    let team = uuid::Uuid::new_v4();
    let resource = uuid::Uuid::new_v4();
    sqlx_exec(
        &db,
        &format!(
            "INSERT INTO teams (id, tier) VALUES ('{team}', 'pro'); \
             INSERT INTO pending_propagations (kind, team_id, resource_id, resource_type, payload) \
             VALUES ('quota_resize', '{team}', '{resource}', 'postgres', '{{\"cpu\": \"4\"}}')"
        ),
    )
    .await;
    let url = db.url();
    let drained = runner(&["run", "--once"], &url);
    assert_eq!(
        drained.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout(&drained).trim()).unwrap();
    assert_eq!(
        (report["claimed"].as_u64(), report["dead_lettered"].as_u64()),
        (Some(0), Some(0))
    );

    let listed = runner(&["deferred", "list", "--json"], &url);
    assert_eq!(
        listed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let rows: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(rows[0]["reason"], "unknown_kind");
    assert_eq!(rows[0]["kind"], "quota_resize");

    // While another replica holds the retention lock, prune says so and exits 75 instead of
    // reporting that nothing was due.
    let mut other = db.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(keel_propagation::postgres::PRUNE_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    let busy = runner(&["prune"], &url);
    assert_eq!(busy.status.code(), Some(75));
    assert!(stdout(&busy).is_empty());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("another replica holds the retention lock"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    other.rollback().await.unwrap();

    // So does reconcile, while another replica's pass holds the reconciler's lock: it checked
    // nothing, which "0 drifted resource(s)" would hide.
    let mut other = db.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(keel_propagation::postgres::RECONCILE_LOCK)
        .execute(&mut *other)
        .await
        .unwrap();
    let busy = runner(&["reconcile"], &url);
    assert_eq!(busy.status.code(), Some(75));
    assert!(stdout(&busy).is_empty(), "{}", stdout(&busy));
    assert!(
        String::from_utf8_lossy(&busy.stderr)
            .contains("another replica holds the reconciler's lock"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    other.rollback().await.unwrap();
    let reconciled = runner(&["reconcile"], &url);
    assert_eq!(reconciled.status.code(), Some(0));
    assert!(stdout(&reconciled).contains("drifted resource(s) enqueued"));

    let pruned = runner(&["prune"], &url);
    assert_eq!(
        pruned.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&pruned.stderr)
    );
    assert!(
        stdout(&pruned).contains("pruned 0 applied and 0 dead-lettered"),
        "{}",
        stdout(&pruned)
    );
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pending_propagations WHERE status = 'pending'")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert_eq!(open, 1);
}
