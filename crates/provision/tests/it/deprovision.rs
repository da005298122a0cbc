//! The deprovision chokepoint against real Postgres: audited before anything is destroyed,
//! idempotent, and confined to the platform's names.

use keel_audit::{Actor, AuditKind, RequestId, ResourceType, Token};
use keel_provision::fault::BackendStep;
use keel_provision::{
    Backend as _, BackendName, DatabaseName, DeprovisionCause, DeprovisionError, DeprovisionReason,
    DeprovisionTarget, Deprovisioned, TeardownStage, TokenDigest, new_token,
};

use keel_provision::ResourceStore as _;

use super::{NOW, harness};

fn cause(reason: DeprovisionReason) -> DeprovisionCause {
    DeprovisionCause {
        reason,
        actor: Actor::parse("operator:ana").unwrap(),
        request_id: Some(RequestId::parse("req-del").unwrap()),
    }
}

#[tokio::test]
async fn deprovision_audits_soft_deletes_tears_down_and_is_idempotent() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let id = provisioned.id();
    let target = DeprovisionTarget::Resource(id);
    let cause = cause(DeprovisionReason::CustomerRequest);
    let first = h.provisioner.deprovision(target.clone(), &cause, NOW).await;
    assert_eq!(first.unwrap(), Deprovisioned::Retired);
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "deleted");
    assert!(rows[0].soft_deleted && !rows[0].has_url);
    assert!(!h.object_exists(&rows[0].name).await);
    assert!(!h.role_exists(&rows[0].name).await);
    let second = h.provisioner.deprovision(target, &cause, NOW).await;
    assert_eq!(second.unwrap(), Deprovisioned::AlreadyRetired);
    let audit = h.audit().await;
    let deprovisioned: Vec<_> = audit
        .iter()
        .filter(|e| e.kind() == AuditKind::ResourceDeprovisioned)
        .collect();
    assert_eq!(deprovisioned.len(), 1, "audited once");
    let event = deprovisioned[0];
    assert_eq!(event.resource_id(), Some(id));
    assert_eq!(event.actor().as_str(), "operator:ana");
    assert_eq!(event.attributes().get("reason"), Some("customer_request"));
    assert_eq!(event.request_id().map(|r| r.as_str()), Some("req-del"));
    h.assert_invariants().await;
}

#[tokio::test]
async fn a_failed_deprovision_teardown_is_already_audited_and_a_second_call_finishes_it() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let target = DeprovisionTarget::Resource(provisioned.id());
    let cause = cause(DeprovisionReason::Expired);
    h.provisioner.backend().fail(BackendStep::Teardown, 1);
    let err = h
        .provisioner
        .deprovision(target.clone(), &cause, NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, DeprovisionError::Teardown(_)), "{err}");
    assert_eq!(err.code().status(), 503);
    let rows = h.rows().await;
    assert!(h.object_exists(&rows[0].name).await);
    assert!(
        h.audit_kinds()
            .await
            .contains(&AuditKind::ResourceDeprovisioned),
        "the audit row commits before anything is destroyed"
    );
    assert_eq!(
        h.provisioner
            .metrics()
            .teardown_failures(ResourceType::Postgres, TeardownStage::Deprovision),
        1
    );
    let again = h.provisioner.deprovision(target, &cause, NOW).await;
    assert_eq!(again.unwrap(), Deprovisioned::AlreadyRetired);
    assert!(
        !h.object_exists(&rows[0].name).await,
        "the retry finished it"
    );
}

#[tokio::test]
async fn deprovision_refuses_a_row_whose_provider_id_is_not_the_platforms_name() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    sqlx::query("UPDATE resources SET provider_resource_id = 'postgres' WHERE id = $1")
        .bind(provisioned.id().as_uuid())
        .execute(h.db.pool())
        .await
        .unwrap();
    let err = h
        .provisioner
        .deprovision(
            DeprovisionTarget::Resource(provisioned.id()),
            &cause(DeprovisionReason::Operator),
            NOW,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DeprovisionError::ForeignName), "{err}");
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "active", "nothing was touched");
    assert!(h.object_exists(&rows[0].name).await);
    assert!(
        !h.audit_kinds()
            .await
            .contains(&AuditKind::ResourceDeprovisioned)
    );
}

#[tokio::test]
async fn a_missing_resource_is_not_found() {
    let h = harness().await;
    let err = h
        .provisioner
        .deprovision(
            DeprovisionTarget::Resource(keel_audit::ResourceId::new_random()),
            &cause(DeprovisionReason::CustomerRequest),
            NOW,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DeprovisionError::NotFound));
    assert_eq!(err.code().status(), 404);
}

#[tokio::test]
async fn an_orphan_is_audited_then_dropped_and_a_live_token_is_never_touched() {
    let h = harness().await;
    // An orphan: a database whose row (this installation's proof of ownership) is deleted.
    let dead = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let orphan = BackendName::for_resource(ResourceType::Postgres, dead.token());
    sqlx::query("UPDATE resources SET status = 'deleted', deleted_at = now() WHERE id = $1")
        .bind(dead.id().as_uuid())
        .execute(h.db.pool())
        .await
        .unwrap();
    let reclaim = cause(DeprovisionReason::Orphan);
    let reclaimed = h
        .provisioner
        .deprovision(DeprovisionTarget::Orphan(orphan.clone()), &reclaim, NOW)
        .await;
    assert_eq!(reclaimed.unwrap(), Deprovisioned::OrphanReclaimed);
    assert!(!h.object_exists(&orphan).await);
    let audit = h.audit().await;
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[1].kind(), AuditKind::OrphanSweepReclaimed);
    assert_eq!(audit[1].attributes().get("reason"), Some("orphan"));
    assert_eq!(
        audit[1].attributes().get("provider_id"),
        Some(orphan.masked().as_str())
    );
    let again = h
        .provisioner
        .deprovision(DeprovisionTarget::Orphan(orphan), &reclaim, NOW)
        .await;
    assert_eq!(again.unwrap(), Deprovisioned::OrphanAbsent);
    assert_eq!(h.audit().await.len(), 2, "nothing to audit the second time");

    // A live resource's database, presented as an orphan, is refused.
    let live = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let live_name = BackendName::for_resource(ResourceType::Postgres, live.token());
    let err = h
        .provisioner
        .deprovision(DeprovisionTarget::Orphan(live_name.clone()), &reclaim, NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeprovisionError::Live { status: "active" }),
        "{err}"
    );
    assert!(h.object_exists(&live_name).await);
    let _: &Token = live.token();
}

#[tokio::test]
async fn deleting_a_failed_resource_whose_database_outlived_it_audits_before_dropping() {
    let h = harness().await;
    h.provisioner
        .store()
        .fail(keel_provision::fault::StoreStep::Activate, 1);
    h.provisioner.backend().fail(BackendStep::Teardown, 1);
    h.provisioner
        .provision(h.request(), NOW)
        .await
        .expect_err("finalize fails and its teardown too");
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "failed");
    assert!(h.object_exists(&rows[0].name).await, "left behind");
    let done = h
        .provisioner
        .deprovision(
            DeprovisionTarget::Resource(rows[0].id),
            &cause(DeprovisionReason::Operator),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(done, Deprovisioned::AlreadyRetired);
    assert!(!h.object_exists(&rows[0].name).await);
    let audit = h.audit_kinds().await;
    assert_eq!(
        audit,
        [
            AuditKind::ProvisionPersistenceFailed,
            AuditKind::ProvisionTeardownFailed,
            AuditKind::ResourceDeprovisioned
        ],
        "the drop is audited"
    );
}

#[tokio::test]
async fn the_cluster_backend_never_drops_a_database_its_customer_role_does_not_own() {
    let h = harness().await;
    let name = BackendName::for_resource(ResourceType::Postgres, &new_token());
    // Made by hand under the platform's name, owned by the admin role.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{}\"",
        name.expose()
    )))
    .execute(h.db.pool())
    .await
    .unwrap();
    let err = h
        .provisioner
        .backend()
        .inner()
        .teardown(&name)
        .await
        .unwrap_err();
    assert!(
        matches!(err, keel_provision::BackendError::Foreign { .. }),
        "{err}"
    );
    assert!(h.object_exists(&name).await);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{}\"",
        name.expose()
    )))
    .execute(h.db.pool())
    .await
    .unwrap();
}

/// Tokens in the server log: names carry the token's digest, which SQL computes alike
/// (`resources.token_digest`), so the row owning a database is found without sending a token.
#[tokio::test]
async fn database_names_carry_the_token_digest_sql_computes_never_the_token() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let (token, digest, provider_id): (String, String, String) = sqlx::query_as(
        "SELECT token, token_digest, provider_resource_id FROM resources WHERE id = $1",
    )
    .bind(provisioned.id().as_uuid())
    .fetch_one(h.db.pool())
    .await
    .unwrap();
    let token = Token::parse(&token).unwrap();
    assert_eq!(&token, provisioned.token());
    assert_eq!(digest, TokenDigest::of(&token).as_str());
    assert_eq!(provider_id, format!("cust_{digest}"));
    assert!(!provider_id.contains(token.expose()));
    let name = BackendName::for_resource(ResourceType::Postgres, &token);
    assert_eq!(name.expose(), provider_id);
    assert!(h.object_exists(&name).await);
    assert!(h.role_exists(&name).await);
}

/// A database created before digest names keeps its legacy name `cust_<token>`; the
/// chokepoint still finds and tears down exactly that database (named by the row's provider id
/// only when it is the legacy name of the row's own token).
#[tokio::test]
async fn a_legacy_database_named_by_its_token_is_still_torn_down_by_deprovision() {
    let h = harness().await;
    let token = new_token();
    let legacy = BackendName::Database(DatabaseName::legacy_for_token(&token));
    assert_eq!(legacy.expose(), format!("cust_{}", token.expose()));
    let tier = keel_audit::Tier::parse("pro").unwrap();
    h.provisioner
        .backend()
        .inner()
        .create(&legacy, &tier)
        .await
        .unwrap();
    let id = keel_audit::ResourceId::new_random();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, 'postgres', 'pro', 'active', $4, 'postgres://legacy@db/legacy')",
    )
    .bind(id.as_uuid())
    .bind(token.expose())
    .bind(h.team.as_uuid())
    .bind(legacy.expose())
    .execute(h.db.pool())
    .await
    .unwrap();
    assert!(h.object_exists(&legacy).await);
    let done = h
        .provisioner
        .deprovision(
            DeprovisionTarget::Resource(id),
            &cause(DeprovisionReason::Operator),
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(done, Deprovisioned::Retired);
    assert!(
        !h.object_exists(&legacy).await,
        "the legacy database is gone"
    );
    assert!(!h.role_exists(&legacy).await, "and its role");
}

/// A credential rotation that read its resource as active before a deprovision retired it and
/// tore its database down never brings the database or its role back, never audits a rotation
/// after the deprovision and shows no password: the backend resets credentials only of an
/// object that exists, and the rotation is recorded only while the resource is active.
#[tokio::test]
async fn a_rotation_racing_a_deprovision_never_brings_the_database_back() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let id = provisioned.id();
    let read_before = h
        .provisioner
        .store()
        .get(id)
        .await
        .unwrap()
        .expect("the resource is there");
    h.provisioner
        .deprovision(
            DeprovisionTarget::Resource(id),
            &cause(DeprovisionReason::CustomerRequest),
            NOW,
        )
        .await
        .unwrap();
    let rotated = h
        .provisioner
        .rotate_credentials(&read_before, Actor::parse("api").unwrap(), None, NOW)
        .await;
    assert!(
        matches!(
            rotated,
            Err(keel_provision::RotateError::NotActive(
                keel_provision::ResourceStatus::Deleted
            ))
        ),
        "{rotated:?}"
    );
    let rows = h.rows().await;
    assert!(!h.object_exists(&rows[0].name).await, "no database again");
    assert!(!h.role_exists(&rows[0].name).await, "no role again");
    assert!(
        !h.audit_kinds()
            .await
            .contains(&AuditKind::ResourceCredentialsRotated),
        "no rotation is audited for a retired resource"
    );
    h.assert_invariants().await;
}

/// Rotations of one resource at once each commit (none fails on another's update of the role)
/// and each is audited; exactly one of the passwords they hand out, the last one set, works.
#[tokio::test]
async fn concurrent_rotations_each_commit_and_exactly_one_password_works() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let record = h
        .provisioner
        .store()
        .get(provisioned.id())
        .await
        .unwrap()
        .unwrap();
    let rotate = || {
        h.provisioner
            .rotate_credentials(&record, Actor::parse("api").unwrap(), None, NOW)
    };
    let (a, b, c, d, e, f) =
        tokio::join!(rotate(), rotate(), rotate(), rotate(), rotate(), rotate());
    let urls: Vec<String> = [a, b, c, d, e, f]
        .into_iter()
        .map(|rotated| rotated.expect("every rotation commits").expose().to_owned())
        .collect();
    let mut working = 0;
    for url in &urls {
        let options =
            <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(url).unwrap();
        if <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
            .await
            .is_ok()
        {
            working += 1;
        }
    }
    assert_eq!(working, 1, "only the password set last works");
    let rotated = h
        .audit_kinds()
        .await
        .into_iter()
        .filter(|k| *k == AuditKind::ResourceCredentialsRotated)
        .count();
    assert_eq!(rotated, 6);
}
