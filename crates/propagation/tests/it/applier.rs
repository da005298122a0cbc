//! The Postgres role applier against a real cluster.

use keel_audit::Token;
use keel_propagation::postgres::{PgRoleApplier, TierRoleSettings};
use keel_propagation::{Applier, ApplyOutcome, Backend, LegitimateSkip, ReasonBucket, SkipReason};
use keel_provision::{DatabaseName, RoleName};

use crate::*;

/// The role keel-provision creates for `token`: `cust_<digest>`.
fn role_of(token: &Token) -> String {
    RoleName::for_database(&DatabaseName::for_token(token))
        .expose()
        .to_owned()
}

/// A propagation to `to` for a Postgres resource whose provider id is `role`, with `token`.
fn propagation_for(token: Option<&Token>, role: Option<&str>, to: &str) -> Propagation {
    let mut propagation = propagation(None, to);
    propagation.backend.token = token.cloned();
    propagation.backend.provider_resource_id = role.map(str::to_owned);
    propagation
}

/// A propagation to `to` for the resource with `token`, whose role provisioning named.
fn propagation_of(token: &Token, to: &str) -> Propagation {
    propagation_for(Some(token), Some(&role_of(token)), to)
}

fn propagation(role: Option<&str>, to: &str) -> Propagation {
    Propagation {
        id: PropagationId(1),
        team_id: TeamId::new_random(),
        resource_id: ResourceId::new_random(),
        resource_type: ResourceType::Postgres,
        payload: Payload::TierElevation {
            target_tier: tier(to),
        },
        attempt: 1,
        backend: Backend {
            // A fresh customer's token; a role named otherwise belongs to no customer.
            token: Some(keel_provision::new_token()),
            provider_resource_id: role.map(str::to_owned),
            status: Some("active".into()),
            team_id: None,
        },
        fence: keel_propagation::Fence {
            claim: keel_propagation::ClaimToken(1),
            target: keel_propagation::TargetVersion(1),
        },
    }
}

async fn role_settings(pool: &PgPool, role: &str) -> (i32, Vec<String>) {
    let (limit, config): (i32, Option<Vec<String>>) =
        sqlx::query_as("SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = $1")
            .bind(role)
            .fetch_one(pool)
            .await
            .unwrap();
    (limit, config.unwrap_or_default())
}

#[tokio::test]
async fn the_postgres_applier_changes_the_role_and_then_reports_already_at_target() {
    let db = keel_testkit::database().await;
    let token = keel_provision::new_token();
    let role = role_of(&token);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 5"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());

    let outcome = applier.apply(&propagation_of(&token, "pro")).await.unwrap();
    assert_eq!(outcome, ApplyOutcome::Applied);
    assert_eq!(
        role_settings(db.pool(), &role).await,
        (50, vec!["statement_timeout=300000ms".to_owned()])
    );

    let again = applier.apply(&propagation_of(&token, "pro")).await.unwrap();
    assert_eq!(
        again,
        ApplyOutcome::Skipped(SkipReason::Legitimate(LegitimateSkip::AlreadyAtTarget))
    );

    let down = applier
        .apply(&propagation_of(&token, "free"))
        .await
        .unwrap();
    assert_eq!(down, ApplyOutcome::Applied);
    assert_eq!(
        role_settings(db.pool(), &role).await,
        (5, vec!["statement_timeout=30000ms".to_owned()])
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {role}")))
        .execute(db.pool())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_missing_customer_role_is_an_unexpected_skip_not_success() {
    let db = keel_testkit::database().await;
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());
    let token = keel_provision::new_token();
    let outcome = applier.apply(&propagation_of(&token, "pro")).await.unwrap();
    let ApplyOutcome::Skipped(SkipReason::Unexpected { bucket, detail }) = outcome else {
        panic!("a missing role must be an unexpected skip, got {outcome:?}");
    };
    assert_eq!(bucket, ReasonBucket::Other);
    assert!(
        !detail.contains(&role_of(&token)) && !detail.contains(token.expose()),
        "the role name derives from the token: {detail}"
    );
}

#[tokio::test]
async fn role_names_are_validated_before_they_reach_sql() {
    let db = keel_testkit::database().await;
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());
    for bad in [
        "x\"; DROP ROLE postgres; --",
        "Upper",
        "1starts_with_digit",
        "",
    ] {
        let outcome = applier.apply(&propagation(Some(bad), "pro")).await.unwrap();
        assert!(
            matches!(
                outcome,
                ApplyOutcome::Skipped(SkipReason::Unexpected {
                    bucket: ReasonBucket::LegacyResource,
                    ..
                })
            ),
            "{bad:?}: {outcome:?}"
        );
    }
    let unknown_tier = applier
        .apply(&propagation_of(&keel_provision::new_token(), "platinum"))
        .await
        .unwrap_err();
    assert!(
        unknown_tier
            .message
            .contains("no role settings are configured for tier platinum")
    );
}

/// PROP-5: only a resource deleted on purpose is a legitimate skip; a missing resources row
/// (wrong id, hard delete) never is.
#[tokio::test]
async fn a_deleted_resource_is_a_legitimate_skip_and_a_missing_row_never_is() {
    let db = keel_testkit::database().await;
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());
    let mut gone = propagation_of(&keel_provision::new_token(), "pro");
    gone.backend.status = Some("deleted".into());
    assert_eq!(
        applier.apply(&gone).await.unwrap(),
        ApplyOutcome::Skipped(SkipReason::Legitimate(
            LegitimateSkip::ResourceDeprovisioned
        )),
    );
    gone.backend.status = None;
    assert!(
        matches!(
            applier.apply(&gone).await.unwrap(),
            ApplyOutcome::Skipped(SkipReason::Unexpected { .. })
        ),
        "a missing resources row must never count as deprovisioned"
    );
}

/// PROP-7: the role applier changes only the customer role provisioning named for the
/// resource's token (`cust_<digest>`), never a platform role, never another customer's role, and
/// never a privileged role even inside the prefix.
#[tokio::test]
async fn the_role_applier_never_changes_a_platform_or_privileged_role() {
    let db = keel_testkit::database().await;
    let token = keel_provision::new_token();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let platform = format!("keel_app_{suffix}");
    let privileged = role_of(&token);
    let foreign = role_of(&keel_provision::new_token());
    for statement in [
        format!("CREATE ROLE {platform} CONNECTION LIMIT 50"),
        format!("CREATE ROLE {privileged} REPLICATION CONNECTION LIMIT 50"),
        format!("CREATE ROLE {foreign} CONNECTION LIMIT 50"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(db.pool())
            .await
            .unwrap();
    }
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());
    for role in [&platform, &privileged, &foreign] {
        // Always with the row's token a customer's.
        let named = propagation_for(Some(&token), Some(role), "free");
        let outcome = applier.apply(&named).await.unwrap();
        assert!(
            matches!(
                outcome,
                ApplyOutcome::Skipped(SkipReason::Unexpected { .. })
            ),
            "{role}: {outcome:?}"
        );
        assert_eq!(
            role_settings(db.pool(), role).await,
            (50, vec![]),
            "{role} was changed"
        );
    }
}

#[tokio::test]
async fn a_refused_alter_is_an_error_that_retries_and_does_not_name_the_role() {
    let db = keel_testkit::database().await;
    let token = keel_provision::new_token();
    let role = role_of(&token);
    // A role the applier may not alter: changed by a session without CREATEROLE.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role}")))
        .execute(db.pool())
        .await
        .unwrap();
    let limited = format!(
        "keel_limited_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let password = uuid::Uuid::new_v4().simple().to_string();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {limited} LOGIN PASSWORD '{password}'"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.connect_options().username(&limited).password(&password))
        .await
        .unwrap();
    let applier = PgRoleApplier::new(pool.clone(), TierRoleSettings::standard());
    let err = applier
        .apply(&propagation_of(&token, "pro"))
        .await
        .unwrap_err();
    assert!(
        err.message.starts_with("could not alter the customer role"),
        "{}",
        err.message
    );
    assert!(
        !err.message.contains(&role),
        "the role name leaked: {}",
        err.message
    );
    pool.close().await;
    for r in [&role, &limited] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {r}")))
            .execute(db.pool())
            .await
            .unwrap();
    }
}

/// A database created before digest names keeps its role `cust_<token>`: the applier still
/// changes it for that token's resource, and for no other.
#[tokio::test]
async fn a_legacy_role_named_by_its_token_is_changed_only_for_that_token() {
    let db = keel_testkit::database().await;
    let token = keel_provision::new_token();
    let legacy = DatabaseName::legacy_for_token(&token).expose().to_owned();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {legacy} LOGIN CONNECTION LIMIT 5"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());

    let other = keel_provision::new_token();
    let foreign = applier
        .apply(&propagation_for(Some(&other), Some(&legacy), "pro"))
        .await
        .unwrap();
    assert!(
        matches!(
            foreign,
            ApplyOutcome::Skipped(SkipReason::Unexpected { .. })
        ),
        "{foreign:?}"
    );
    assert_eq!(role_settings(db.pool(), &legacy).await, (5, vec![]));

    let outcome = applier
        .apply(&propagation_for(Some(&token), Some(&legacy), "pro"))
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Applied);
    assert_eq!(
        role_settings(db.pool(), &legacy).await,
        (50, vec!["statement_timeout=300000ms".to_owned()])
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {legacy}")))
        .execute(db.pool())
        .await
        .unwrap();
}

/// The applier addresses roles by provisioning's digest names, and a legacy role (whose name is
/// `cust_<token>`) by its token's digest and its oid: a cluster that logs every statement, every
/// message and every connection logs no customer token.
#[tokio::test]
async fn the_role_applier_names_no_token_in_the_server_log() {
    let settings = [
        ("log_statement", "all"),
        ("log_min_messages", "debug5"),
        ("log_min_error_statement", "debug5"),
        ("log_connections", "on"),
    ];
    let server = keel_testkit::PgServer::start_throwaway_with(&keel_testkit::ThrowawayOptions {
        settings: settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        password_auth: false,
    })
    .unwrap_or_else(|e| panic!("no logging PostgreSQL server: {e}"));
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(PgRoleApplier::cluster_options(server.admin_options()))
        .await
        .unwrap();
    let token = keel_provision::new_token();
    let role = role_of(&token);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 5"
    )))
    .execute(&pool)
    .await
    .unwrap();
    // A legacy role, named by its token: made here without its name in a logged statement.
    let legacy_token = keel_provision::new_token();
    let legacy = DatabaseName::legacy_for_token(&legacy_token)
        .expose()
        .to_owned();
    let legacy_hex: String = legacy.bytes().map(|b| format!("{b:02x}")).collect();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN CONNECTION LIMIT 5', \
             convert_from(decode('{legacy_hex}', 'hex'), 'UTF8')); END $$"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let missing = keel_provision::new_token();
    let applier = PgRoleApplier::new(pool.clone(), TierRoleSettings::standard());
    assert_eq!(
        applier.apply(&propagation_of(&token, "pro")).await.unwrap(),
        ApplyOutcome::Applied
    );
    assert_eq!(
        applier
            .apply(&propagation_for(Some(&legacy_token), Some(&legacy), "pro"))
            .await
            .unwrap(),
        ApplyOutcome::Applied
    );
    let legacy_limit: i32 = sqlx::query_scalar(
        "SELECT rolconnlimit FROM pg_roles WHERE encode(convert_to(rolname, 'UTF8'), 'hex') = $1",
    )
    .bind(&legacy_hex)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(legacy_limit, 50, "the legacy role was changed");
    assert_eq!(
        applier.apply(&propagation_of(&token, "pro")).await.unwrap(),
        ApplyOutcome::Skipped(SkipReason::Legitimate(LegitimateSkip::AlreadyAtTarget))
    );
    assert!(matches!(
        applier
            .apply(&propagation_of(&missing, "pro"))
            .await
            .unwrap(),
        ApplyOutcome::Skipped(SkipReason::Unexpected { .. })
    ));
    pool.close().await;

    let log = std::fs::read_to_string(server.log_path().unwrap()).unwrap();
    assert!(
        log.contains("ALTER ROLE") && log.contains(&role),
        "the server logged the applier's statements"
    );
    for token in [&token, &missing, &legacy_token] {
        assert!(
            !log.contains(token.expose()),
            "a customer token reached the server log"
        );
    }
}
