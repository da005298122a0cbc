//! Regression tests for the compensation order, tier settings, isolation, privileges,
//! protection and the reconciler (PROV-1, PROV-4, PROV-5, PROV-11, PROV-12, PROV-13, PROV-16,
//! OPS-2), against real Postgres.

use std::str::FromStr as _;
use std::time::Duration;

use keel_audit::{Actor, AuditKind, RequestId, ResourceType, TeamId, Tier};
use keel_provision::fault::{FaultyBackend, FaultyStore, StoreStep};
use keel_provision::postgres::{
    PgClusterBackend, PgResourceStore, PrivilegeError, isolate_platform_database,
};
use keel_provision::{
    BackendName, DeprovisionCause, DeprovisionError, DeprovisionReason, DeprovisionTarget,
    ErrorCode, ProvisionMetrics, Provisioner, RowResult, TeardownResult, new_token,
};
use prometheus_client::registry::Registry;
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;

use super::{NOW, connect_as_customer, harness};

fn operator() -> DeprovisionCause {
    DeprovisionCause {
        reason: DeprovisionReason::Operator,
        actor: Actor::parse("operator:ana").unwrap(),
        request_id: Some(RequestId::parse("req-del").unwrap()),
    }
}

/// PROV-1: the activation commits but its reply is lost. The row is `active` and addressable;
/// the compensation finds it live and never tears it down; the caller gets the resource.
#[tokio::test]
async fn an_ambiguous_finalize_commit_never_destroys_an_active_resource() {
    let h = harness().await;
    h.provisioner.store().fail_after(StoreStep::Activate, 1);
    let provisioned = h
        .provisioner
        .provision(h.request(), NOW)
        .await
        .expect("a committed finalize is the truth: the resource is provisioned");
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "active");
    assert!(h.object_exists(&rows[0].name).await, "never torn down");
    assert_eq!(h.audit_kinds().await, [AuditKind::ProvisionCreated]);
    let mut customer = connect_as_customer(provisioned.connection_url().expose()).await;
    sqlx::query("SELECT 1")
        .execute(&mut customer)
        .await
        .unwrap();
    h.assert_invariants().await;
}

/// PROV-13: a DELETE settles the row while its provisioning is still between create and
/// finalize. The provisioning's compensation finds the row `deleted` (already settled),
/// removes the object its create made, counts nothing as uncompensated and says so.
#[tokio::test]
async fn a_compensation_that_finds_the_row_deleted_reports_it_settled_not_pending() {
    let h = harness().await;
    let reservation = h.provisioner.reserve(h.request(), NOW).await.unwrap();
    let id = reservation.id();
    let created = h.provisioner.create(reservation, NOW).await.unwrap();
    h.provisioner
        .deprovision(DeprovisionTarget::Resource(id), &operator(), NOW)
        .await
        .unwrap();
    // The deprovision's teardown ran; the object is re-made as a slow create would have.
    let err = h.provisioner.finalize(created, NOW).await.unwrap_err();
    let keel_provision::ProvisionError::Failed { compensation, .. } = &err else {
        panic!("expected a compensated failure: {err}");
    };
    assert_eq!(compensation.row, RowResult::AlreadySettled);
    assert_eq!(compensation.teardown, TeardownResult::TornDown);
    assert_eq!(err.code(), ErrorCode::ProvisionFailed);
    assert!(!err.to_string().contains("pending"), "{err}");
    assert_eq!(
        h.provisioner
            .metrics()
            .uncompensated_total(keel_audit::ResourceType::Postgres),
        0
    );
    let rows = h.rows().await;
    assert_eq!(rows[0].status, "deleted");
    assert!(!h.object_exists(&rows[0].name).await);
    h.assert_invariants().await;
}

/// PROV-12: the tier's role settings apply at creation (one definition shared with the
/// propagation crate: `keel_audit::TierRoleSettings`).
#[tokio::test]
async fn a_new_role_carries_its_tiers_settings() {
    let h = harness().await;
    for tier in ["free", "pro"] {
        let mut request = h.request();
        request.tier = Tier::parse(tier).unwrap();
        let provisioned = h.provisioner.provision(request, NOW).await.unwrap();
        let name = BackendName::for_resource(ResourceType::Postgres, provisioned.token());
        let (limit, config): (i32, Option<Vec<String>>) =
            sqlx::query_as("SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = $1")
                .bind(name.expose())
                .fetch_one(h.db.pool())
                .await
                .unwrap();
        let expected = keel_audit::TierRoleSettings::standard()
            .get(&Tier::parse(tier).unwrap())
            .unwrap();
        assert_eq!(limit, expected.connection_limit, "{tier}");
        assert_eq!(
            config.unwrap_or_default(),
            [format!(
                "statement_timeout={}",
                expected.statement_timeout_ms
            )],
            "{tier}"
        );
    }
}

/// A cluster backend signed in as a new role `<prefix>_<random>` with `attributes` (e.g.
/// `CREATEROLE CREATEDB`), not a superuser.
async fn backend_as_new_role(
    h: &super::Harness,
    prefix: &str,
    attributes: &str,
) -> PgClusterBackend {
    let role = format!("{prefix}_{}", &new_token().expose()[..12]);
    let password = new_token();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN {attributes} PASSWORD '{}'",
        password.expose()
    )))
    .execute(h.db.pool())
    .await
    .unwrap();
    PgClusterBackend::new(
        h.db.server()
            .admin_options()
            .username(&role)
            .password(password.expose()),
        None,
        2,
    )
}

/// OPS-2: the documented cluster admin (CREATEROLE + CREATEDB, not a superuser) can provision
/// on the oldest supported PostgreSQL, and a role lacking a privilege is named at start-up.
#[tokio::test]
async fn a_non_superuser_createrole_createdb_admin_can_provision() {
    let h = harness().await;
    let backend = backend_as_new_role(&h, "keel_admin", "CREATEROLE CREATEDB").await;
    backend.check_privileges().await.unwrap();
    let provisioner = Provisioner::new(
        FaultyStore::new(PgResourceStore::new(h.db.pool().clone())),
        FaultyBackend::new(backend),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let provisioned = provisioner.provision(h.request(), NOW).await.unwrap();
    connect_as_customer(provisioned.connection_url().expose()).await;
    provisioner
        .deprovision(
            DeprovisionTarget::Resource(provisioned.id()),
            &operator(),
            NOW,
        )
        .await
        .unwrap();
    let weak = backend_as_new_role(&h, "keel_weak", "CREATEDB").await;
    let err = weak.check_privileges().await.unwrap_err();
    assert!(matches!(err, PrivilegeError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("CREATEROLE"), "{err}");
    assert!(!err.to_string().contains("CREATEDB "), "{err}");
}

/// PROV-11: the chokepoint itself refuses a protected object, for a resource and an orphan.
#[tokio::test]
async fn deprovision_refuses_a_protected_object_on_every_path() {
    let h = harness().await;
    let provisioned = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let name = BackendName::for_resource(ResourceType::Postgres, provisioned.token());
    let protect = |name: &BackendName| {
        sqlx::AssertSqlSafe(format!(
            "COMMENT ON DATABASE \"{}\" IS '{{\"annotations\":{{\"keel.dev/protect\":\"true\"}}}}'",
            name.expose()
        ))
    };
    sqlx::raw_sql(protect(&name))
        .execute(h.db.pool())
        .await
        .unwrap();
    let err = h
        .provisioner
        .deprovision(
            DeprovisionTarget::Resource(provisioned.id()),
            &operator(),
            NOW,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, DeprovisionError::Protected), "{err}");
    assert_eq!(err.code(), ErrorCode::ResourceProtected);
    assert_eq!(h.rows().await[0].status, "active", "the row is not retired");
    assert!(h.object_exists(&name).await);
    assert_eq!(h.audit_kinds().await, [AuditKind::ProvisionCreated]);

    // An orphan (its row deleted) whose mark protects it: refused before any deprovision row,
    // and the refusal recorded as such.
    let dead = h.provisioner.provision(h.request(), NOW).await.unwrap();
    let orphan = BackendName::for_resource(ResourceType::Postgres, dead.token());
    sqlx::query("UPDATE resources SET status = 'deleted', deleted_at = now() WHERE id = $1")
        .bind(dead.id().as_uuid())
        .execute(h.db.pool())
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "COMMENT ON DATABASE \"{}\" IS '{{\"labels\":{{\"app.kubernetes.io/managed-by\":\"keel\"}},\
         \"annotations\":{{\"keel.dev/protect\":\"true\"}}}}'",
        orphan.expose()
    )))
    .execute(h.db.pool())
    .await
    .unwrap();
    let err = h
        .provisioner
        .deprovision(DeprovisionTarget::Orphan(orphan.clone()), &operator(), NOW)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DeprovisionError::Refused(keel_provision::ReclaimRefusal::Protected)
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::ResourceProtected);
    assert!(h.object_exists(&orphan).await);
    assert_eq!(
        h.audit_kinds().await,
        [
            AuditKind::ProvisionCreated,
            AuditKind::ProvisionCreated,
            AuditKind::ResourceReclaimRefused
        ]
    );
}

/// PROV-16: a deployment without a backend for the resource's type refuses the DELETE before
/// retiring the row or notifying anyone, with a permanent error.
#[tokio::test]
async fn a_deprovision_this_deployment_cannot_tear_down_never_retires_the_row() {
    let h = harness().await;
    let token = new_token();
    let id = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                provider_resource_id, connection_url) \
         VALUES ($1, $2, $3, 'namespace', 'pro', 'active', $4, 'https://kube.test/ns')",
    )
    .bind(id)
    .bind(token.expose())
    .bind(h.team.as_uuid())
    .bind(BackendName::for_resource(ResourceType::Namespace, &token).expose())
    .execute(h.db.pool())
    .await
    .unwrap();
    let err = h
        .provisioner
        .deprovision(
            DeprovisionTarget::Resource(keel_audit::ResourceId::from_uuid(id)),
            &operator(),
            NOW,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, DeprovisionError::Unsupported(ResourceType::Namespace)),
        "{err}"
    );
    assert_eq!(err.code().retry_after_seconds(), None, "permanent");
    assert_eq!(h.rows().await[0].status, "active");
    assert!(h.audit_kinds().await.is_empty());
}

/// Moves `id`'s reservation `ago` (an interval, e.g. `1 hour`) into the past, by the database's
/// clock.
async fn reserved_ago(h: &super::Harness, id: keel_audit::ResourceId, ago: &str) {
    sqlx::query("UPDATE resources SET created_at = now() - $2::interval WHERE id = $1")
        .bind(id.as_uuid())
        .bind(ago)
        .execute(h.db.pool())
        .await
        .unwrap();
}

/// The reconciler's pass over reservations older than ten minutes.
async fn reconcile_older_than_ten_minutes(
    h: &super::Harness,
) -> Vec<(keel_audit::ResourceId, keel_provision::Compensation)> {
    h.provisioner
        .reconcile_pending(Duration::from_secs(600), 100, NOW)
        .await
        .unwrap()
}

/// PROV-5: a `pending` row older than the limit (a provisioning cut short after its create) is
/// compensated by the reconciler, audited; a younger one is left to its flow.
#[tokio::test]
async fn a_pending_row_older_than_the_limit_is_compensated_by_the_reconciler() {
    let h = harness().await;
    let old = h.provisioner.reserve(h.request(), NOW).await.unwrap();
    let old_id = old.id();
    let created = h.provisioner.create(old, NOW).await.unwrap();
    // The process dies here: nothing finalizes or compensates.
    drop(created);
    let young = h.provisioner.reserve(h.request(), NOW).await.unwrap();
    let young_id = young.id();
    reserved_ago(&h, old_id, "1 hour").await;
    reserved_ago(&h, young_id, "0 seconds").await;
    let settled = reconcile_older_than_ten_minutes(&h).await;
    assert_eq!(settled.len(), 1);
    assert_eq!(settled[0].0, old_id);
    assert!(settled[0].1.is_clean());
    let rows = h.rows().await;
    let old_row = rows.iter().find(|r| r.id == old_id).unwrap();
    let young_row = rows.iter().find(|r| r.id == young_id).unwrap();
    assert_eq!(old_row.status, "failed");
    assert!(!h.object_exists(&old_row.name).await, "torn down");
    assert_eq!(
        young_row.status, "pending",
        "a young reservation is its flow's"
    );
    let audit = h.audit().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].kind(), AuditKind::ProvisionReconciled);
    assert_eq!(audit[0].resource_id(), Some(old_id));
    assert_eq!(audit[0].actor().as_str(), "system");
    h.assert_invariants().await;
    drop(young);
}

/// A stale `pending` row another writer left in a shape this build cannot read is skipped (and
/// logged), so it never holds back the compensation of every other tenant's stale provisioning.
#[tokio::test]
async fn a_corrupt_stale_row_does_not_hold_back_the_reconciler() {
    let h = harness().await;
    let stale = h.provisioner.reserve(h.request(), NOW).await.unwrap();
    let stale_id = stale.id();
    drop(stale);
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, created_at, updated_at) \
         VALUES (gen_random_uuid(), 'tok-garbage-1', $1, 'mysql', 'diamond', 'pending', \
                 now() - interval '2 hours', now() - interval '2 hours')",
    )
    .bind(h.team.as_uuid())
    .execute(h.db.pool())
    .await
    .unwrap();
    reserved_ago(&h, stale_id, "1 hour").await;
    let settled = reconcile_older_than_ten_minutes(&h).await;
    assert_eq!(
        settled.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [stale_id],
        "the readable stale row is compensated"
    );
    let corrupt: String =
        sqlx::query_scalar("SELECT status FROM resources WHERE token = 'tok-garbage-1'")
            .fetch_one(h.db.pool())
            .await
            .unwrap();
    assert_eq!(corrupt, "pending", "the unreadable row is left for repair");
}

/// Rows that never decode are read past, not counted against the pass's limit: however many of
/// them are the oldest stale rows, the next decodable one is still settled in the same pass.
#[tokio::test]
async fn stale_rows_that_never_decode_cannot_fill_the_reconcilers_pass() {
    let h = harness().await;
    let stale = h.provisioner.reserve(h.request(), NOW).await.unwrap();
    let stale_id = stale.id();
    drop(stale);
    for n in 0..5 {
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, created_at, updated_at) \
             VALUES (gen_random_uuid(), $2, $1, 'mysql', 'diamond', 'pending', \
                     now() - interval '3 hours', now() - interval '3 hours')",
        )
        .bind(h.team.as_uuid())
        .bind(format!("tok-garbage-{n}"))
        .execute(h.db.pool())
        .await
        .unwrap();
    }
    reserved_ago(&h, stale_id, "1 hour").await;
    // A pass of two: the five unreadable rows are older than the readable one.
    let settled = h
        .provisioner
        .reconcile_pending(Duration::from_secs(600), 2, NOW)
        .await
        .unwrap();
    assert_eq!(
        settled.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        [stale_id],
        "the readable stale row behind the unreadable ones is compensated"
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM resources WHERE token LIKE 'tok-garbage-%' AND status = 'pending'",
    )
    .fetch_one(h.db.pool())
    .await
    .unwrap();
    assert_eq!(left, 5, "the unreadable rows are left for repair");
}

/// PROV-4: on a server that checks passwords, tenant B's credentials reach B's database and
/// nothing else: not tenant A's database, not the platform database.
#[tokio::test]
async fn a_tenant_role_cannot_connect_to_another_tenants_database_or_the_platform_database() {
    let server = super::secrets::logging_server();
    let db = keel_testkit::database_on(server).await;
    isolate_platform_database(db.pool()).await.unwrap();
    let team = TeamId::from_uuid(db.team("pro").await);
    let provisioner = Provisioner::new(
        PgResourceStore::new(db.pool().clone()),
        PgClusterBackend::new(server.admin_options(), None, 2),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let request = || keel_provision::ProvisionRequest {
        team_id: team,
        resource_type: ResourceType::Postgres,
        tier: Tier::parse("pro").unwrap(),
        request_id: RequestId::parse("req-iso").unwrap(),
        actor: Actor::parse("api").unwrap(),
    };
    let a = provisioner.provision(request(), NOW).await.unwrap();
    let b = provisioner.provision(request(), NOW).await.unwrap();
    let a_db = BackendName::for_resource(ResourceType::Postgres, a.token());
    let b_options: sqlx::postgres::PgConnectOptions = b.connection_url().expose().parse().unwrap();
    // B's own database accepts B (the SCRAM verifier matches the issued password).
    PgConnection::connect_with(&b_options).await.unwrap();
    for target in [a_db.expose(), db.name()] {
        let err = PgConnection::connect_with(&b_options.clone().database(target))
            .await
            .expect_err("another tenant's database and the platform database refuse B");
        let code = err
            .as_database_error()
            .and_then(|e| e.code().map(|c| c.into_owned()));
        assert_eq!(code.as_deref(), Some("42501"), "{err}");
    }
    // A wrong password is refused: the server really checks credentials here.
    let wrong = b_options.clone().password("not-the-password");
    assert!(PgConnection::connect_with(&wrong).await.is_err());
}

/// PROV-10: every call to the cluster has a deadline: a few seconds to get a connection, a
/// minute per statement; and the admin connections take no notices below WARNING (OPS-4).
#[tokio::test]
async fn the_cluster_backend_bounds_every_call_with_a_deadline() {
    let h = harness().await;
    let admin = h.provisioner.backend().inner().admin_pool();
    assert!(admin.options().get_acquire_timeout() <= Duration::from_secs(5));
    let (statement_timeout, client_min_messages): (String, String) = sqlx::query_as(
        "SELECT current_setting('statement_timeout'), current_setting('client_min_messages')",
    )
    .fetch_one(admin)
    .await
    .unwrap();
    assert_eq!(statement_timeout, "1min");
    assert_eq!(client_min_messages, "warning");
}

/// PROV-9: a URL stored with its password before the address-only rule is scrubbed by the
/// migration; the migration keeps everything but the password.
#[tokio::test]
async fn the_migration_removes_passwords_already_stored_in_connection_urls() {
    let db = keel_testkit::empty_database().await;
    let migrator = &keel_schema::MIGRATOR;
    let mut conn = db.pool().acquire().await.unwrap();
    for migration in migrator.iter().filter(|m| {
        m.version < 10 && matches!(m.migration_type, sqlx::migrate::MigrationType::ReversibleUp)
    }) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(migration.sql.as_str().to_owned()))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    let team: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO teams (id, tier) VALUES (gen_random_uuid(), 'pro') RETURNING id",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                provider_resource_id, connection_url) \
         VALUES (gen_random_uuid(), 'tok1', $1, 'postgres', 'pro', 'active', 'cust_tok1', \
                 'postgres://cust_tok1:s3cr3t@db:5432/cust_tok1?sslmode=require')",
    )
    .bind(team)
    .execute(&mut *conn)
    .await
    .unwrap();
    let up = migrator
        .iter()
        .find(|m| {
            m.version == 10
                && matches!(m.migration_type, sqlx::migrate::MigrationType::ReversibleUp)
        })
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(up.sql.as_str().to_owned()))
        .execute(&mut *conn)
        .await
        .unwrap();
    let url: String = sqlx::query_scalar("SELECT connection_url FROM resources")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(
        url,
        "postgres://cust_tok1@db:5432/cust_tok1?sslmode=require"
    );
}

/// PROV-17: each step is recorded at the time it happened, not at the request's start.
#[tokio::test]
async fn each_step_of_a_provisioning_is_recorded_at_its_own_time() {
    let h = harness().await;
    let ticks = std::sync::atomic::AtomicI64::new(0);
    let clock =
        || NOW + time::Duration::minutes(ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let provisioned = h
        .provisioner
        .provision_at(h.request(), clock)
        .await
        .unwrap();
    let (created_at, updated_at): (time::OffsetDateTime, time::OffsetDateTime) =
        sqlx::query_as("SELECT created_at, updated_at FROM resources WHERE id = $1")
            .bind(provisioned.id().as_uuid())
            .fetch_one(h.db.pool())
            .await
            .unwrap();
    assert_eq!(created_at, NOW, "reserved at the first reading");
    assert_eq!(
        updated_at,
        NOW + time::Duration::minutes(2),
        "finalized at the third"
    );
    let audit = h.audit().await;
    assert_eq!(audit[0].occurred_at(), NOW + time::Duration::minutes(2));
}

/// Two teardowns of one object may run at once (a provisioning's own compensation and the
/// reconciler, the chokepoint and the orphan sweep). The one whose `DROP ROLE` loses the race
/// (the server answers "tuple concurrently deleted") still finds the object gone and reports it
/// torn down: never a teardown failure, which pages an operator for nothing.
#[tokio::test]
async fn a_teardown_that_races_another_teardown_of_its_object_succeeds() {
    use keel_provision::Backend as _;

    let h = harness().await;
    let backend = h.provisioner.backend().inner();
    let name = BackendName::for_resource(ResourceType::Postgres, &new_token());
    backend
        .create(&name, &Tier::parse("pro").unwrap())
        .await
        .unwrap();
    let admin = backend.admin_pool();
    // The other teardown has dropped the database and is dropping the role, in a transaction
    // that commits once this teardown waits for the role.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{}\" WITH (FORCE)",
        name.expose()
    )))
    .execute(admin)
    .await
    .unwrap();
    let mut other = admin.acquire().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; DROP ROLE \"{}\"",
        name.expose()
    )))
    .execute(&mut *other)
    .await
    .unwrap();
    let (result, ()) = tokio::join!(backend.teardown(&name), async {
        for _ in 0..1000 {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' \
                   AND (query LIKE 'ALTER ROLE%' OR query LIKE 'DROP ROLE IF EXISTS%')",
            )
            .fetch_one(admin)
            .await
            .unwrap();
            if waiting > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sqlx::query("COMMIT").execute(&mut *other).await.unwrap();
    });
    result.expect("a teardown that lost the race to another one reported a failure");
    assert!(!backend.exists(&name).await.unwrap());
}

/// The customer's database and a session of its role on another database of the cluster: a
/// temporary table there (every role may make one in any database it can reach) is an object
/// the role owns, which fails its `DROP ROLE`.
async fn customer_session_elsewhere(
    backend: &keel_provision::postgres::PgClusterBackend,
    name: &BackendName,
) -> PgConnection {
    use keel_provision::Backend as _;
    let object = backend
        .create(name, &Tier::parse("pro").unwrap())
        .await
        .unwrap();
    let mut elsewhere = PgConnection::connect_with(&on_postgres_database(&object))
        .await
        .unwrap();
    sqlx::query("CREATE TEMPORARY TABLE hold (i int)")
        .execute(&mut elsewhere)
        .await
        .unwrap();
    elsewhere
}

/// The customer's connection options for `object`, on the cluster's `postgres` database.
fn on_postgres_database(
    object: &keel_provision::BackendObject,
) -> sqlx::postgres::PgConnectOptions {
    sqlx::postgres::PgConnectOptions::from_str(object.connection_url.expose())
        .unwrap()
        .database("postgres")
}

/// Whether role `role` exists, and whether it may sign in or has a password.
async fn role_access(admin: &sqlx::PgPool, role: &str) -> Option<(bool, bool)> {
    sqlx::query_as("SELECT rolcanlogin, rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1")
        .bind(role)
        .fetch_optional(admin)
        .await
        .unwrap()
}

/// A customer session on another database, holding a temporary table there, neither keeps its
/// login past the teardown nor stops it: the role's sessions are ended before its drop, so the
/// role is gone and the session with it.
#[tokio::test]
async fn a_customer_session_elsewhere_on_the_cluster_neither_keeps_its_login_nor_stops_the_teardown()
 {
    use keel_provision::Backend as _;

    let h = harness().await;
    let backend = h.provisioner.backend().inner();
    let name = BackendName::for_resource(ResourceType::Postgres, &new_token());
    let mut elsewhere = customer_session_elsewhere(backend, &name).await;
    backend
        .teardown(&name)
        .await
        .expect("a customer's session on another database stopped the teardown");
    assert_eq!(role_access(backend.admin_pool(), name.expose()).await, None);
    assert!(!backend.exists(&name).await.unwrap());
    assert!(
        sqlx::query("SELECT 1")
            .execute(&mut elsewhere)
            .await
            .is_err(),
        "the customer's session outlived its role"
    );
}

/// A customer role whose drop fails (an object it owns in another database) can no longer sign
/// in with the password its customer holds: the teardown took its login and password before it
/// dropped anything, and reports the failure.
#[tokio::test]
async fn a_role_whose_drop_fails_can_no_longer_sign_in() {
    use keel_provision::Backend as _;

    let h = harness().await;
    let backend = h.provisioner.backend().inner();
    let name = BackendName::for_resource(ResourceType::Postgres, &new_token());
    let object = backend
        .create(&name, &Tier::parse("pro").unwrap())
        .await
        .unwrap();
    let admin = backend.admin_pool();
    let table = format!("keel_test_owned_{}", &name.digest().fingerprint());
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{table}\" (i int); ALTER TABLE \"{table}\" OWNER TO \"{}\"",
        name.expose()
    )))
    .execute(admin)
    .await
    .unwrap();
    let failed = backend.teardown(&name).await;
    assert!(failed.is_err(), "the role's drop cannot succeed here");
    assert_eq!(
        role_access(admin, name.expose()).await,
        Some((false, false)),
        "the role outlived its database and can still sign in"
    );
    assert!(
        PgConnection::connect_with(&on_postgres_database(&object))
            .await
            .is_err()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE \"{table}\"")))
        .execute(admin)
        .await
        .unwrap();
    backend.teardown(&name).await.unwrap();
    assert_eq!(role_access(admin, name.expose()).await, None);
}

/// OPS-2: the documented cluster admin (CREATEROLE and CREATEDB, not a superuser, not in
/// `pg_signal_backend`) ends a customer role's sessions elsewhere on the cluster as a member of
/// the role it created, so its teardown drops the database and the role as a superuser's does.
#[tokio::test]
async fn a_non_superuser_admin_ends_the_customer_sessions_elsewhere_and_drops_the_role() {
    use keel_provision::Backend as _;

    let h = harness().await;
    let backend = backend_as_new_role(&h, "keel_admin", "CREATEROLE CREATEDB").await;
    let name = BackendName::for_resource(ResourceType::Postgres, &new_token());
    let mut elsewhere = customer_session_elsewhere(&backend, &name).await;
    backend
        .teardown(&name)
        .await
        .expect("the admin could not end the customer's session or drop its role");
    assert!(!backend.exists(&name).await.unwrap());
    assert_eq!(role_access(h.db.pool(), name.expose()).await, None);
    assert!(
        sqlx::query("SELECT 1")
            .execute(&mut elsewhere)
            .await
            .is_err()
    );
}
