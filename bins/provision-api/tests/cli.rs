//! `keel-provision-api` as an operator starts it, against a real Postgres.

use std::process::Command;

/// OPS-2: a cluster admin role without CREATEROLE is refused at start-up with the exact
/// privilege to grant, instead of answering 503 to every POST later.
#[tokio::test]
async fn serve_names_the_missing_cluster_privilege_at_start_up() {
    let db = keel_testkit::database().await;
    let role = format!("keel_cli_weak_{}", std::process::id());
    let password = uuid::Uuid::new_v4().simple().to_string();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CREATEDB PASSWORD '{password}'"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let admin = db.server().admin_options();
    let cluster_url = format!(
        "postgres://{role}:{password}@{}:{}/postgres",
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

/// Runs `keel-provision-api` with `args` against `database_url`: its exit code, standard
/// output and standard error.
fn api(args: &[&str], database_url: &str) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keel-provision-api"))
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("NO_COLOR", "1")
        .output()
        .expect("run keel-provision-api");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn keys(db: &keel_testkit::TestDatabase, args: &[&str]) -> (Option<i32>, String, String) {
    let args: Vec<&str> = std::iter::once("keys")
        .chain(args.iter().copied())
        .collect();
    api(&args, &db.url())
}

/// PROV-2: `keys create` prints the key once (only its hash is stored), `keys list` names it
/// without its secret, `keys revoke` revokes it; both changes are audited with the operator as
/// actor; a key for a team that does not exist is refused.
#[tokio::test]
async fn keys_are_created_shown_once_listed_without_secret_and_revoked_with_audit() {
    let db = keel_testkit::database().await;
    let team = db.team("pro").await.to_string();
    let (code, stdout, stderr) = keys(
        &db,
        &[
            "create",
            "--team",
            &team,
            "--label",
            "agent-7",
            "--actor",
            "operator:alice",
        ],
    );
    assert_eq!(code, Some(0), "{stderr}");
    let key = stdout.trim().to_owned();
    assert!(
        key.starts_with("keel_") && key.len() == 5 + 12 + 1 + 43,
        "{key}"
    );
    let id = &key[5..17];
    let secret = &key[18..];
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM provision_api.api_keys \
          WHERE secret_sha256 = sha256(convert_to($1, 'UTF8'))",
    )
    .bind(secret)
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(stored, 1, "the hash is stored");
    let (code, listed, stderr) = keys(&db, &["list"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(listed.contains(id) && listed.contains("agent-7") && listed.contains(&team));
    assert!(!listed.contains(secret), "never the secret");
    let (code, _, stderr) = keys(&db, &["revoke", id, "--actor", "operator:alice"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (_, listed, _) = keys(&db, &["list"]);
    assert!(listed.contains("revoked:20"), "{listed}");
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, actor FROM audit_events ORDER BY id")
            .fetch_all(db.pool())
            .await
            .unwrap();
    let expected = [
        ("api_key.created".to_owned(), "operator:alice".to_owned()),
        ("api_key.revoked".to_owned(), "operator:alice".to_owned()),
    ];
    assert_eq!(audit, expected);
    let nobody = uuid::Uuid::new_v4().to_string();
    let (code, stdout, stderr) = keys(&db, &["create", "--team", &nobody]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "no key was shown");
    assert!(stderr.contains("team does not exist"), "{stderr}");
    let (code, _, stderr) = keys(&db, &["create"]);
    assert_eq!(code, Some(64), "--team or --operator is required: {stderr}");
}

/// A key's creation and revocation are an operator's acts: an actor that is not
/// `operator:NAME` (a bare name, an empty name, the API, an API key's `key:ID`) is a usage
/// error and writes nothing, so the trail never credits a key change to anyone else.
#[tokio::test]
async fn a_key_change_is_credited_only_to_a_named_operator() {
    let db = keel_testkit::database().await;
    let team = db.team("pro").await.to_string();
    for actor in ["bob", "operator:", "api", "key:123", "operator:key:123"] {
        let (code, stdout, stderr) = keys(
            &db,
            &["create", "--team", &team, "--label", "x", "--actor", actor],
        );
        assert_eq!(code, Some(64), "{actor}: {stderr}");
        assert!(stdout.is_empty(), "{actor}: no key was made");
        assert!(
            stderr.contains("expected operator:NAME"),
            "{actor}: {stderr}"
        );
        let (code, _, stderr) = keys(&db, &["revoke", "c1752bc881ff", "--actor", actor]);
        assert_eq!(code, Some(64), "{actor}: {stderr}");
    }
    let (keys_made, audited): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM provision_api.api_keys), \
                (SELECT count(*) FROM audit_events)",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!((keys_made, audited), (0, 0));
}

/// Usage errors exit 64 before anything connects: a pool of fewer than two connections (a POST
/// holds one while its reservation takes another), a label over 200 characters or with a
/// control character (which would let a line of `keys list` pose as another).
#[test]
fn usage_errors_exit_64_before_connecting() {
    let nowhere = "postgres://keel@127.0.0.1:1/nowhere";
    for connections in ["0", "1", "10001"] {
        let (code, _, stderr) = api(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--max-connections",
                connections,
            ],
            nowhere,
        );
        assert_eq!(code, Some(64), "{connections}: {stderr}");
        assert!(stderr.contains("--max-connections"), "{stderr}");
    }
    for label in ["x".repeat(201), "evil\u{1b}[31m\nFAKE-LINE".to_owned()] {
        let (code, stdout, stderr) = api(
            &["keys", "create", "--operator", "--label", &label],
            nowhere,
        );
        assert_eq!(code, Some(64), "{stderr}");
        assert!(stdout.is_empty(), "no key was made");
        assert!(stderr.contains("--label"), "{stderr}");
    }
}

/// A label another writer stored with control characters is listed with them escaped: no line
/// of `keys list` can pose as another.
#[tokio::test]
async fn keys_list_escapes_control_characters_in_labels() {
    let db = keel_testkit::database().await;
    let (code, _, stderr) = keys(&db, &["create", "--operator", "--label", "plain"]);
    assert_eq!(code, Some(0), "{stderr}");
    sqlx::query("UPDATE provision_api.api_keys SET label = $1")
        .bind("evil\u{1b}[31m\nFAKE-LINE\r")
        .execute(db.pool())
        .await
        .unwrap();
    let (code, listed, stderr) = keys(&db, &["list"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(listed.lines().count(), 1, "{listed}");
    assert!(
        listed.contains("evil\\u{1b}[31m\\nFAKE-LINE\\r"),
        "{listed}"
    );
    assert!(!listed.contains('\u{1b}'));
}
