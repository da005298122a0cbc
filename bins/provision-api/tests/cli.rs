//! `keel-provision-api` as an operator starts it, against a real Postgres.

use std::process::Command;

/// OPS-2: a cluster admin role without CREATEROLE is refused at start-up with the exact
/// privilege to grant, instead of answering 503 to every POST later.
#[tokio::test]
async fn serve_names_the_missing_cluster_privilege_at_start_up() {
    let db = keel_testkit::database().await;
    let role = format!("keel_cli_weak_{}", std::process::id());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CREATEDB"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let admin = db.server().admin_options();
    let cluster_url = format!(
        "postgres://{role}@{}:{}/postgres",
        admin.get_host(),
        admin.get_port()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_keel-provision-api"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", db.url())
        .env("KEEL_CLUSTER_DATABASE_URL", &cluster_url)
        .env("NO_COLOR", "1")
        .output()
        .expect("run keel-provision-api");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("lacks CREATEROLE")
            && stderr.contains(&format!("ALTER ROLE {role} CREATEROLE")),
        "{stderr}"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(db.pool())
        .await
        .unwrap();
}

/// PROV-12: a tier sold without role settings is refused at start-up, not at its first POST.
#[tokio::test]
async fn serve_refuses_a_tier_without_role_settings() {
    let db = keel_testkit::database().await;
    let out = Command::new(env!("CARGO_BIN_EXE_keel-provision-api"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tiers",
            "free,platinum",
        ])
        .env("DATABASE_URL", db.url())
        .env("NO_COLOR", "1")
        .output()
        .expect("run keel-provision-api");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("platinum") && stderr.contains("no role settings"),
        "{stderr}"
    );
}
