//! The Postgres role applier against a real cluster.

use keel_propagation::postgres::{PgRoleApplier, TierRoleSettings};
use keel_propagation::{Applier, ApplyOutcome, Backend, LegitimateSkip, ReasonBucket, SkipReason};

use crate::*;

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
            // The token the role was named from, as keel-provision names it.
            token: role
                .and_then(|r| r.strip_prefix("cust_"))
                .and_then(|t| keel_audit::Token::parse(t).ok()),
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
    let role = format!("cust_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 5"
    )))
    .execute(db.pool())
    .await
    .unwrap();
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());

    let outcome = applier
        .apply(&propagation(Some(&role), "pro"))
        .await
        .unwrap();
    assert_eq!(outcome, ApplyOutcome::Applied);
    assert_eq!(
        role_settings(db.pool(), &role).await,
        (50, vec!["statement_timeout=300000ms".to_owned()])
    );

    let again = applier
        .apply(&propagation(Some(&role), "pro"))
        .await
        .unwrap();
    assert_eq!(
        again,
        ApplyOutcome::Skipped(SkipReason::Legitimate(LegitimateSkip::AlreadyAtTarget))
    );

    let down = applier
        .apply(&propagation(Some(&role), "free"))
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
    let outcome = applier
        .apply(&propagation(Some("cust_doesnotexist"), "pro"))
        .await
        .unwrap();
    let ApplyOutcome::Skipped(SkipReason::Unexpected { bucket, detail }) = outcome else {
        panic!("a missing role must be an unexpected skip, got {outcome:?}");
    };
    assert_eq!(bucket, ReasonBucket::Other);
    assert!(
        !detail.contains("cust_doesnotexist"),
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
        .apply(&propagation(Some("cust_a1b2c3d4e5f6"), "platinum"))
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
    let mut gone = propagation(Some("cust_a1b2c3d4e5f6"), "pro");
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

/// PROP-7: the role applier changes only customer roles named `cust_<the resource's token>`,
/// never a platform role, and never a privileged role even inside the prefix.
#[tokio::test]
async fn the_role_applier_never_changes_a_platform_or_privileged_role() {
    let db = keel_testkit::database().await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let platform = format!("keel_app_{suffix}");
    let privileged = format!("cust_{suffix}");
    for statement in [
        format!("CREATE ROLE {platform} CONNECTION LIMIT 50"),
        format!("CREATE ROLE {privileged} REPLICATION CONNECTION LIMIT 50"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(db.pool())
            .await
            .unwrap();
    }
    let applier = PgRoleApplier::new(db.pool().clone(), TierRoleSettings::standard());
    for role in [&platform, &privileged] {
        let mut named = propagation(Some(role), "free");
        if role == &platform {
            // Even when the row's token is one of the customer's.
            named.backend.token = Some(keel_audit::Token::parse(suffix).unwrap());
        }
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
    let role = format!("cust_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    // A role the applier may not alter: changed by a session without CREATEROLE.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {role}")))
        .execute(db.pool())
        .await
        .unwrap();
    let limited = format!(
        "keel_limited_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {limited} LOGIN")))
        .execute(db.pool())
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.connect_options().username(&limited))
        .await
        .unwrap();
    let applier = PgRoleApplier::new(pool.clone(), TierRoleSettings::standard());
    let err = applier
        .apply(&propagation(Some(&role), "pro"))
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
