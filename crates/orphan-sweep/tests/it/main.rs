//! Integration tests for keel-orphan-sweep against a real Postgres: the customer-database
//! inventory, the live-token read, the single-flight lock, and a reclaim through keel-provision's
//! chokepoint.

use std::collections::HashSet;
use std::time::Duration;

use keel_audit::postgres::{AuditFilter, fetch};
use keel_audit::{Actor, AuditKind, RequestId, ResourceType, TeamId, Tier};
use keel_orphan_sweep::postgres::{PgDatabaseInventory, PgLiveTokens, TickLock};
use keel_orphan_sweep::{
    Action, FingerprintKey, Inventory, InventoryError, InventoryItem, InventorySource,
    LiveTokens as _, SweepConfig, SweepMetrics, Sweeper, TickReport,
};
use keel_provision::postgres::{PgClusterBackend, PgResourceStore};
use keel_provision::{
    Backend as _, BackendName, ProvisionMetrics, ProvisionRequest, Provisioner, TokenDigest,
    new_token,
};
use keel_testkit::TestDatabase;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

/// The real inventory, narrowed to the databases this test made: tests share one server, and
/// each test's live tokens are in its own database.
struct Scoped {
    inner: PgDatabaseInventory,
    names: HashSet<String>,
}

impl Inventory for Scoped {
    fn source(&self) -> InventorySource {
        self.inner.source()
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        let items = self.inner.list().await?;
        Ok(items
            .into_iter()
            .filter(|item| self.names.contains(&item.name))
            .collect())
    }
}

type PgProvisioner = Provisioner<PgResourceStore, PgClusterBackend>;

struct Fixture {
    db: TestDatabase,
    provisioner: PgProvisioner,
    live: BackendName,
    orphan: BackendName,
    protected: BackendName,
    generic: String,
    legacy: String,
}

async fn fixture() -> Fixture {
    let db = keel_testkit::database().await;
    let team = TeamId::from_uuid(db.team("pro").await);
    let provisioner = Provisioner::new(
        PgResourceStore::new(db.pool().clone()),
        PgClusterBackend::new(db.server().admin_options(), None, 4),
        ProvisionMetrics::register(&mut Registry::default()),
    );
    let live = provisioner
        .provision(
            ProvisionRequest {
                team_id: team,
                resource_type: ResourceType::Postgres,
                tier: Tier::parse("pro").unwrap(),
                request_id: RequestId::parse("req-live").unwrap(),
                actor: Actor::parse("api").unwrap(),
            },
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    let live = BackendName::for_resource(ResourceType::Postgres, live.token());
    let tier = Tier::parse("pro").unwrap();
    let orphan = BackendName::for_resource(ResourceType::Postgres, &new_token());
    provisioner.backend().create(&orphan, &tier).await.unwrap();
    let protected = BackendName::for_resource(ResourceType::Postgres, &new_token());
    provisioner
        .backend()
        .create(&protected, &tier)
        .await
        .unwrap();
    let comment = format!(
        "{{\"labels\":{{\"app.kubernetes.io/managed-by\":\"keel\"}},\"annotations\":{{\"keel.dev/created-at\":\"{}\",\"keel.dev/protect\":\"true\"}}}}",
        OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "COMMENT ON DATABASE \"{}\" IS '{comment}'",
        protected.expose()
    )))
    .execute(db.pool())
    .await
    .unwrap();
    // Under the prefix but not a token: generic. Without a comment: a legacy database (not
    // labelled managed-by=keel) whose age comes from its files.
    let generic = format!("cust_Legacy_{}", &new_token().expose()[..8]);
    let legacy_token = new_token();
    let legacy = format!("cust_{}", legacy_token.expose());
    for name in [&generic, &legacy] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(db.pool())
            .await
            .unwrap();
    }
    Fixture {
        db,
        provisioner,
        live,
        orphan,
        protected,
        generic,
        legacy,
    }
}

impl Fixture {
    fn inventory(&self) -> Scoped {
        Scoped {
            inner: PgDatabaseInventory::new(self.provisioner.backend().admin_pool().clone()),
            names: [
                self.live.expose(),
                self.orphan.expose(),
                self.protected.expose(),
                &self.generic,
                &self.legacy,
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        }
    }

    fn sweeper(&self, config: SweepConfig) -> Sweeper<Scoped, PgLiveTokens, &PgProvisioner> {
        Sweeper::new(
            self.inventory(),
            PgLiveTokens::new(self.db.pool().clone()),
            Some(&self.provisioner),
            config,
            SweepMetrics::register(&mut Registry::default()),
            FingerprintKey::new(*b"integration-test-key").unwrap(),
        )
    }

    async fn exists(&self, name: &str) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }
}

/// Past the grace window of every database the fixture made.
fn later() -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::hours(2)
}

fn by_name(report: &TickReport) -> Vec<(String, &'static str, bool, Action)> {
    let TickReport::Swept { candidates, .. } = report else {
        panic!("the tick did not complete: {report:?}");
    };
    let mut rows: Vec<_> = candidates
        .iter()
        .map(|c| (c.name_masked.clone(), c.kind, c.protected, c.action))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[tokio::test]
async fn the_postgres_inventory_finds_real_orphan_databases_and_audit_only_drops_nothing() {
    let f = fixture().await;
    let items = f.inventory().list().await.unwrap();
    assert_eq!(items.len(), 5);
    let legacy = items.iter().find(|i| i.name == f.legacy).unwrap();
    assert!(legacy.created_at.is_some(), "age from the database's files");
    let mut sweeper = f.sweeper(SweepConfig {
        enabled: true,
        ..SweepConfig::default()
    });
    let report = sweeper.tick(later()).await;
    let rows = by_name(&report);
    let masked: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(
        !masked.contains(&f.live.masked().as_str()),
        "the live database is no orphan"
    );
    for row in &rows {
        assert_eq!(row.3, Action::Reported);
    }
    assert!(rows.iter().any(|r| r.1 == "generic"));
    assert!(
        rows.iter().any(|r| r.2),
        "the protected one is reported as protected"
    );
    for name in [
        f.orphan.expose(),
        f.protected.expose(),
        &f.generic,
        &f.legacy,
    ] {
        assert!(f.exists(name).await, "audit-only dropped something");
    }
    // Within the grace window nothing is a candidate.
    let report = sweeper.tick(OffsetDateTime::now_utc()).await;
    assert!(by_name(&report).is_empty(), "{report:?}");
}

#[tokio::test]
async fn a_reclaim_goes_through_the_chokepoint_and_leaves_a_resource_deprovisioned_row() {
    let f = fixture().await;
    let mut sweeper = f.sweeper(SweepConfig {
        enabled: true,
        destructive: true,
        confirm_ticks: 2,
        max_fraction: 1.0,
        grace: Duration::from_secs(3600),
        ..SweepConfig::default()
    });
    sweeper.tick(later()).await;
    assert!(f.exists(f.orphan.expose()).await, "seen once is not enough");
    let report = sweeper.tick(later()).await;
    let reclaimed: Vec<_> = by_name(&report)
        .into_iter()
        .filter(|r| r.3 == Action::Reclaimed)
        .map(|r| r.0)
        .collect();
    assert_eq!(
        reclaimed,
        [f.orphan.masked()],
        "only the platform's own orphan"
    );
    assert!(!f.exists(f.orphan.expose()).await);
    assert!(
        f.exists(&f.legacy).await,
        "not labelled managed-by=keel: reported, kept"
    );
    assert!(f.exists(f.live.expose()).await, "live: kept");
    assert!(f.exists(f.protected.expose()).await, "protected: kept");
    assert!(f.exists(&f.generic).await, "generic: kept");
    let mut conn = f.db.pool().acquire().await.unwrap();
    let audit = fetch(
        &mut conn,
        &AuditFilter {
            kind: Some(AuditKind::ResourceDeprovisioned),
            ..AuditFilter::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(audit.len(), 1);
    for stored in &audit {
        assert_eq!(
            stored.event.actor().as_str(),
            keel_orphan_sweep::SWEEP_ACTOR
        );
        assert_eq!(stored.event.attributes().get("reason"), Some("orphan"));
    }
    assert!(
        audit
            .iter()
            .any(|s| s.event.attributes().get("provider_id") == Some(f.orphan.masked().as_str()))
    );
}

#[tokio::test]
async fn live_tokens_are_the_non_terminal_statuses_read_in_one_query() {
    let db = keel_testkit::database().await;
    let team = TeamId::from_uuid(db.team("pro").await);
    let mut tokens = Vec::new();
    for status in [
        "pending",
        "active",
        "paused",
        "suspended",
        "deleted",
        "failed",
    ] {
        let token = new_token();
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                    provider_resource_id, connection_url, deleted_at) \
             VALUES (gen_random_uuid(), $1, $2, 'postgres', 'pro', $3, 'p', 'u', \
                     CASE WHEN $3 IN ('deleted', 'failed') THEN now() END)",
        )
        .bind(token.expose())
        .bind(team.as_uuid())
        .bind(status)
        .execute(db.pool())
        .await
        .unwrap();
        tokens.push(token);
    }
    let unknown = new_token();
    tokens.push(unknown);
    // Asked by digest: the SQL digest of each stored token is the one names carry.
    let digests: Vec<TokenDigest> = tokens.iter().map(TokenDigest::of).collect();
    let live = PgLiveTokens::new(db.pool().clone())
        .live_among(&digests)
        .await
        .unwrap();
    let expected: HashSet<TokenDigest> = digests[..4].iter().cloned().collect();
    assert_eq!(live, expected);
    assert!(
        PgLiveTokens::new(db.pool().clone())
            .live_among(&[])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn only_one_replica_holds_the_tick_lock_at_a_time() {
    let db = keel_testkit::database().await;
    let options = db.connect_options();
    let first = TickLock::try_acquire(&options).await.unwrap();
    assert!(first.is_some());
    assert!(TickLock::try_acquire(&options).await.unwrap().is_none());
    first.unwrap().release().await.unwrap();
    let again = TickLock::try_acquire(&options).await.unwrap();
    assert!(again.is_some());
    again.unwrap().release().await.unwrap();
}
