//! LIB-16: a team and a resource made outside Keel are registered through the library, and read
//! back as Keel's own rows.

use keel_audit::{Actor, AuditEvent, AuditKind, ResourceType, TeamId, Tier, Token};
use keel_provision::postgres::{
    ExistingResource, PgResourceStore, RegisterError, register_existing, register_team,
};
use keel_provision::{
    BackendObject, ConnectionUrl, ResourceStatus, ResourceStore as _, StoreError, TokenDigest,
};
use sqlx::Acquire as _;

use crate::NOW;

fn existing(team: TeamId, token: &str) -> ExistingResource {
    ExistingResource::new(
        team,
        ResourceType::Postgres,
        Tier::parse("pro").unwrap(),
        Token::parse(token).unwrap(),
        BackendObject {
            provider_id: format!("cust_{token}"),
            connection_url: ConnectionUrl::new(format!(
                "postgres://cust_{token}:s3cretpass@db.example:5432/cust_{token}"
            )),
        },
    )
}

#[tokio::test]
async fn a_registered_team_and_existing_resource_read_back_as_keel_rows() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let team = TeamId::new_random();
    register_team(&mut conn, team, &Tier::parse("pro").unwrap(), NOW)
        .await
        .unwrap();
    let resource = existing(team, "made0utside1");
    register_existing(&mut conn, &resource, NOW).await.unwrap();

    let store = PgResourceStore::new(db.pool().clone());
    let record = store.get(resource.id).await.unwrap().expect("registered");
    assert_eq!(record.status, ResourceStatus::Active);
    assert_eq!(record.team_id, team);
    assert_eq!(record.token, resource.token);
    assert_eq!(record.tier.as_str(), "pro");
    assert_eq!(
        record.provider_resource_id.as_deref(),
        Some("cust_made0utside1")
    );
    let digest = TokenDigest::of(&resource.token);
    let live = store.live_for_digest(&digest).await.unwrap();
    assert_eq!(
        live,
        Some((resource.id, ResourceStatus::Active)),
        "the sweep sees it live"
    );
    let stored_url: String =
        sqlx::query_scalar("SELECT connection_url FROM resources WHERE id = $1")
            .bind(resource.id.as_uuid())
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(
        !stored_url.contains("s3cretpass"),
        "a password was stored with the address"
    );
}

#[tokio::test]
async fn a_registration_is_refused_with_a_typed_error_and_writes_nothing() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let team = TeamId::new_random();
    let pro = Tier::parse("pro").unwrap();
    register_team(&mut conn, team, &pro, NOW).await.unwrap();
    assert!(matches!(
        register_team(&mut conn, team, &pro, NOW).await,
        Err(RegisterError::TeamExists(t)) if t == team
    ));

    let stranger = TeamId::new_random();
    assert!(matches!(
        register_existing(&mut conn, &existing(stranger, "n0team000001"), NOW).await,
        Err(RegisterError::TeamNotFound(t)) if t == stranger
    ));

    let first = existing(team, "taken0000001");
    register_existing(&mut conn, &first, NOW).await.unwrap();
    let again = existing(team, "taken0000001");
    let err = register_existing(&mut conn, &again, NOW).await.unwrap_err();
    assert!(matches!(err, RegisterError::ResourceExists(id) if id == again.id));
    assert!(
        !err.to_string().contains("taken0000001"),
        "the error shows the token"
    );

    // In the caller's transaction: rolled back, nothing stays.
    let mut tx = conn.begin().await.unwrap();
    let later = TeamId::new_random();
    register_team(&mut tx, later, &pro, NOW).await.unwrap();
    register_existing(&mut tx, &existing(later, "r0lledback01"), NOW)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM teams WHERE id = $1")
        .bind(later.as_uuid())
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

/// LIB-14: a step on a row in the wrong state says which statuses, typed.
#[tokio::test]
async fn finalizing_a_row_that_is_not_pending_names_both_statuses() {
    let db = keel_testkit::database().await;
    let mut conn = db.pool().acquire().await.unwrap();
    let team = TeamId::new_random();
    register_team(&mut conn, team, &Tier::parse("pro").unwrap(), NOW)
        .await
        .unwrap();
    let resource = existing(team, "already0act1");
    register_existing(&mut conn, &resource, NOW).await.unwrap();
    let store = PgResourceStore::new(db.pool().clone());
    let audit = AuditEvent::new(AuditKind::ProvisionCreated, Actor::system(), NOW);
    let err = store
        .activate(resource.id, &resource.object, &audit, NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::WrongStatus {
                expected: ResourceStatus::Pending,
                actual: ResourceStatus::Active,
            }
        ),
        "{err}"
    );
    assert_eq!(err.to_string(), "the resource is active, not pending");
}
