//! Integration tests for keel-provision against a real Postgres: the resource store, the
//! shared-cluster backend creating real databases, and a failure injected at every step.

mod deprovision;
mod hardening;
mod matrix;
mod orphan;
mod register;
mod secrets;
mod steps;

use std::str::FromStr as _;

use keel_audit::postgres::{AuditFilter, fetch};
use keel_audit::{Actor, AuditKind, RequestId, ResourceId, ResourceType, TeamId, Tier};
use keel_provision::fault::{FaultyBackend, FaultyStore};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{
    Backend as _, BackendName, DatabaseName, ProvisionMetrics, ProvisionRequest, Provisioner,
};
use keel_testkit::TestDatabase;
use prometheus_client::registry::Registry;
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use time::OffsetDateTime;
use time::macros::datetime;

type TestProvisioner = Provisioner<FaultyStore<PgResourceStore>, FaultyBackend<PgClusterBackend>>;

/// A migrated database with one team, and a provisioner over the real store and backend, each
/// wrapped for fault injection.
struct Harness {
    db: TestDatabase,
    team: TeamId,
    provisioner: TestProvisioner,
}

const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

async fn harness() -> Harness {
    let db = keel_testkit::database().await;
    let team = TeamId::from_uuid(db.team("pro").await);
    let store = FaultyStore::new(PgResourceStore::new(db.pool().clone()));
    let backend = FaultyBackend::new(PgClusterBackend::new(db.server().admin_options(), None, 4));
    let metrics = ProvisionMetrics::register(&mut Registry::default());
    Harness {
        db,
        team,
        provisioner: Provisioner::new(store, backend, metrics),
    }
}

impl Harness {
    fn request(&self) -> ProvisionRequest {
        ProvisionRequest {
            team_id: self.team,
            resource_type: ResourceType::Postgres,
            tier: Tier::parse("pro").unwrap(),
            request_id: RequestId::parse("req-42").unwrap(),
            actor: Actor::parse("api").unwrap(),
        }
    }

    /// Every resource row of this test's database.
    async fn rows(&self) -> Vec<Row> {
        sqlx::query_as::<_, (uuid::Uuid, String, String, Option<String>, bool, bool)>(
            "SELECT id, token, status, provider_resource_id, connection_url IS NOT NULL, \
                    deleted_at IS NOT NULL \
               FROM resources ORDER BY created_at",
        )
        .fetch_all(self.db.pool())
        .await
        .unwrap()
        .into_iter()
        .map(
            |(id, token, status, provider_id, has_url, soft_deleted)| Row {
                id: ResourceId::from_uuid(id),
                name: BackendName::Database(DatabaseName::for_token(
                    &keel_audit::Token::parse(&token).unwrap(),
                )),
                status,
                provider_id,
                has_url,
                soft_deleted,
            },
        )
        .collect()
    }

    async fn object_exists(&self, name: &BackendName) -> bool {
        self.provisioner
            .backend()
            .inner()
            .exists(name)
            .await
            .unwrap()
    }

    async fn role_exists(&self, name: &BackendName) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(name.expose())
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    async fn audit_kinds(&self) -> Vec<AuditKind> {
        self.audit().await.iter().map(|e| e.kind()).collect()
    }

    async fn audit(&self) -> Vec<keel_audit::AuditEvent> {
        let mut conn = self.db.pool().acquire().await.unwrap();
        fetch(&mut conn, &AuditFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|stored| stored.event)
            .collect()
    }

    /// The invariants every step must keep: no `active` row without its backend object, and no
    /// backend object without a live row unless its teardown failed and that was audited.
    async fn assert_invariants(&self) {
        let audit = self.audit().await;
        for row in self.rows().await {
            let exists = self.object_exists(&row.name).await;
            if row.status == "active" {
                assert!(exists, "an active row without its database");
                assert!(
                    row.has_url && row.provider_id.is_some(),
                    "active but unaddressable"
                );
            }
            if exists && row.status != "active" && row.status != "pending" {
                // A failed compensating teardown is recorded as such; a deprovision records
                // its intent before it tears down (and its caller heard the failure).
                let audited = audit.iter().any(|e| {
                    e.resource_id() == Some(row.id)
                        && match row.status.as_str() {
                            "failed" => e.kind() == AuditKind::ProvisionTeardownFailed,
                            "deleted" => e.kind() == AuditKind::ResourceDeprovisioned,
                            _ => false,
                        }
                });
                assert!(
                    audited,
                    "a database outlives its {} row unaudited",
                    row.status
                );
            }
        }
    }
}

#[derive(Debug)]
struct Row {
    id: ResourceId,
    name: BackendName,
    status: String,
    provider_id: Option<String>,
    has_url: bool,
    soft_deleted: bool,
}

/// Connects with a connection URL the API would hand out.
async fn connect_as_customer(url: &str) -> PgConnection {
    let options = PgConnectOptions::from_str(url).unwrap();
    PgConnection::connect_with(&options).await.unwrap()
}
