//! Integration tests for keel-orphan-sweep against a real Postgres: the customer-database
//! inventory, the standing read, the durable state, the single-flight lock, a reclaim through
//! keel-provision's chokepoint, and two installations sharing one cluster.

mod contract;
mod installations;
mod kept;

use std::collections::HashSet;
use std::time::Duration;

use keel_audit::postgres::{AuditFilter, fetch};
use keel_audit::{Actor, AuditKind, RequestId, ResourceType, TeamId, Tier};
use keel_orphan_sweep::postgres::{PgDatabaseInventory, PgLiveTokens, PgSweepState, TickLock};
use keel_orphan_sweep::{
    Action, Blocker, FingerprintKey, Inventory, InventoryError, InventoryItem, InventorySource,
    LiveTokens as _, PeriodClaim, Sighting, SightingChanges, SweepConfig, SweepMetrics,
    SweepState as _, Sweeper, TickReport, advance,
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
pub(crate) struct Scoped {
    pub(crate) inner: PgDatabaseInventory,
    pub(crate) names: HashSet<String>,
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

pub(crate) type PgProvisioner = Provisioner<PgResourceStore, PgClusterBackend>;

struct Fixture {
    db: TestDatabase,
    provisioner: PgProvisioner,
    live: BackendName,
    orphan: BackendName,
    protected: BackendName,
    stranger: BackendName,
    generic: String,
    legacy: String,
}

pub(crate) fn request(team: TeamId) -> ProvisionRequest {
    ProvisionRequest {
        team_id: team,
        resource_type: ResourceType::Postgres,
        tier: Tier::parse("pro").unwrap(),
        request_id: RequestId::parse("req-live").unwrap(),
        actor: Actor::parse("api").unwrap(),
    }
}

/// A provisioned database whose row is then deleted: an orphan its installation owns.
pub(crate) async fn dead(
    provisioner: &PgProvisioner,
    pool: &sqlx::PgPool,
    team: TeamId,
) -> BackendName {
    let provisioned = provisioner
        .provision(request(team), OffsetDateTime::now_utc())
        .await
        .unwrap();
    sqlx::query("UPDATE resources SET status = 'deleted', deleted_at = now() WHERE id = $1")
        .bind(provisioned.id().as_uuid())
        .execute(pool)
        .await
        .unwrap();
    BackendName::for_resource(ResourceType::Postgres, provisioned.token())
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
        .provision(request(team), OffsetDateTime::now_utc())
        .await
        .unwrap();
    let live = BackendName::for_resource(ResourceType::Postgres, live.token());
    let tier = Tier::parse("pro").unwrap();
    let orphan = dead(&provisioner, db.pool(), team).await;
    let protected = dead(&provisioner, db.pool(), team).await;
    // Made with the platform's labels, but no row of this installation owns it.
    let stranger = BackendName::for_resource(ResourceType::Postgres, &new_token());
    provisioner
        .backend()
        .create(&stranger, &tier)
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
        stranger,
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
                self.stranger.expose(),
                &self.generic,
                &self.legacy,
            ]
            .into_iter()
            .map(str::to_owned)
            .collect(),
        }
    }

    fn sweeper(
        &self,
        config: SweepConfig,
    ) -> Sweeper<Scoped, PgLiveTokens, &PgProvisioner, PgSweepState> {
        Sweeper::new(
            self.inventory(),
            PgLiveTokens::new(self.db.pool().clone()),
            Some(&self.provisioner),
            PgSweepState::new(self.db.pool().clone(), "it"),
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

/// A configuration for tests: one-second periods, no grace, no skew, no burn-in duration.
pub(crate) fn quick(enabled: bool, destructive: bool) -> SweepConfig {
    SweepConfig {
        enabled,
        destructive,
        grace: Duration::ZERO,
        skew: Duration::ZERO,
        interval: QUICK_PERIOD,
        confirm_ticks: 2,
        burn_in: Duration::ZERO,
        max_reclaims: 100,
        max_fraction: 1.0,
    }
}

/// The period of [`quick`]: long enough that a tick slowed by a loaded machine, started just
/// past a period's start, ends inside it.
pub(crate) const QUICK_PERIOD: Duration = Duration::from_secs(2);

/// Waits into the next [`QUICK_PERIOD`], just past its start (the state store's periods follow
/// the database's clock, which is this machine's).
pub(crate) async fn next_period() {
    next_period_of(QUICK_PERIOD).await;
}

/// Waits into the next period of `length` (whole seconds; periods are counted from the Unix
/// epoch on the database's clock, which is this machine's), just past its start.
pub(crate) async fn next_period_of(length: Duration) {
    let now = OffsetDateTime::now_utc();
    let length_ns = length.as_nanos();
    let now_ns = u128::try_from(now.unix_timestamp_nanos()).unwrap_or(0);
    let rest = length_ns - now_ns % length_ns;
    let rest = Duration::from_nanos(u64::try_from(rest).unwrap_or(0));
    tokio::time::sleep(rest + Duration::from_millis(50)).await;
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
    assert_eq!(items.len(), 6);
    let legacy = items.iter().find(|i| i.name == f.legacy).unwrap();
    assert!(legacy.created_at.is_some(), "age from the database's files");
    let mut sweeper = f.sweeper(quick(true, false));
    next_period().await;
    let mut report = sweeper.tick(OffsetDateTime::now_utc()).await;
    for _ in 0..3 {
        next_period().await;
        report = sweeper.tick(OffsetDateTime::now_utc()).await;
    }
    let rows = by_name(&report);
    let masked: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(rows.len(), 5, "{rows:?}");
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
    let TickReport::Swept { candidates, .. } = &report else {
        unreachable!()
    };
    let blocker_of = |name: &BackendName| {
        candidates
            .iter()
            .find(|c| c.name_masked == name.masked())
            .map(|c| (c.would_reclaim, c.blocked_by))
    };
    assert_eq!(
        blocker_of(&f.orphan),
        Some((true, None)),
        "the dry run predicts it"
    );
    assert_eq!(
        blocker_of(&f.protected),
        Some((false, Some(Blocker::Protected)))
    );
    assert_eq!(
        blocker_of(&f.stranger),
        Some((false, Some(Blocker::Unowned)))
    );
    for name in [
        f.orphan.expose(),
        f.protected.expose(),
        f.stranger.expose(),
        &f.generic,
        &f.legacy,
    ] {
        assert!(f.exists(name).await, "audit-only dropped something");
    }
    // With the default grace window nothing is a candidate yet.
    let mut sweeper = f.sweeper(quick(true, false));
    let mut sweeper_default_grace = f.sweeper(SweepConfig {
        grace: Duration::from_secs(3600),
        ..quick(true, false)
    });
    next_period().await;
    let report = sweeper_default_grace.tick(OffsetDateTime::now_utc()).await;
    assert!(by_name(&report).is_empty(), "{report:?}");
    // The same period is not run twice.
    let again = sweeper.tick(OffsetDateTime::now_utc()).await;
    assert!(matches!(again, TickReport::Skipped { .. }), "{again:?}");
}

#[tokio::test]
async fn a_reclaim_goes_through_the_chokepoint_and_leaves_an_orphan_sweep_reclaimed_row() {
    let f = fixture().await;
    let mut sweeper = f.sweeper(quick(true, true));
    next_period().await;
    sweeper.tick(OffsetDateTime::now_utc()).await;
    assert!(f.exists(f.orphan.expose()).await, "seen once is not enough");
    next_period().await;
    let report = sweeper.tick(OffsetDateTime::now_utc()).await;
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
    assert!(f.exists(f.stranger.expose()).await, "no owning row: kept");
    assert!(f.exists(&f.generic).await, "generic: kept");
    let mut conn = f.db.pool().acquire().await.unwrap();
    let audit = fetch(
        &mut conn,
        &AuditFilter {
            kind: Some(AuditKind::OrphanSweepReclaimed),
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
        assert_eq!(
            stored.event.attributes().get("token_fingerprint"),
            Some(f.orphan.digest().fingerprint().as_str())
        );
    }
}

/// SWEEP-3, SWEEP-5: the burn-in and the period claims live in the platform database: a second
/// process (a CronJob's next `--once`) continues the first one's burn-in, and a period already
/// run is skipped.
#[tokio::test]
async fn the_burn_in_is_durable_across_processes_and_a_period_runs_once() {
    // Four-second periods, entered just past their start: a tick slowed by a loaded machine
    // still finishes inside its period, so the second process lands in the same one.
    const PERIOD: Duration = Duration::from_secs(4);
    let config = || SweepConfig {
        interval: PERIOD,
        ..quick(true, true)
    };
    let f = fixture().await;
    next_period_of(PERIOD).await;
    f.sweeper(config()).tick(OffsetDateTime::now_utc()).await;
    let skipped = f.sweeper(config()).tick(OffsetDateTime::now_utc()).await;
    assert!(matches!(skipped, TickReport::Skipped { .. }), "{skipped:?}");
    assert!(f.exists(f.orphan.expose()).await);
    next_period_of(PERIOD).await;
    let report = f.sweeper(config()).tick(OffsetDateTime::now_utc()).await;
    assert!(
        by_name(&report)
            .iter()
            .any(|r| r.0 == f.orphan.masked() && r.3 == Action::Reclaimed),
        "{report:?}"
    );
    let state = PgSweepState::new(f.db.pool().clone(), "it");
    let sightings = state.sightings(InventorySource::Postgres).await.unwrap();
    assert!(!sightings.is_empty());
    for sighting in &sightings {
        let (kind, digest) = sighting.key.split_once(':').unwrap();
        assert!(
            ["customer_database", "generic"].contains(&kind),
            "{}",
            sighting.key
        );
        assert_eq!(digest.len(), 48, "keyed by digest, never by name");
    }
}

/// The sightings of a large tick (several statements' worth) are recorded exactly, each row
/// with its own values, replacing what the period before recorded; an empty tick clears them.
#[tokio::test]
async fn a_large_ticks_sightings_are_recorded_exactly_and_replace_the_last() {
    let db = keel_testkit::database().await;
    let state = PgSweepState::new(db.pool().clone(), "it");
    let source = InventorySource::Kubernetes;
    let claim = state
        .claim(source, Duration::from_secs(3600), OffsetDateTime::now_utc())
        .await
        .unwrap()
        .expect("a fresh database's first claim");
    let start = time::macros::datetime!(2026-11-30 10:00 UTC);
    let earlier = [Sighting::new(
        format!("generic:{:048x}", u64::MAX),
        start,
        claim.period - 1,
    )];
    state.replace(source, &claim, &earlier).await.unwrap();
    let sightings: Vec<Sighting> = (0_u32..25_001)
        .map(|i| {
            let kind = if i % 2 == 0 {
                "customer_namespace"
            } else {
                "redis_namespace"
            };
            let mut sighting = Sighting::new(
                format!("{kind}:{i:048x}"),
                start + time::Duration::seconds(i64::from(i)),
                claim.period,
            );
            if i % 3 == 0 {
                sighting.reclaimable_since = Some(start);
                sighting.consecutive = i % 7;
            }
            if i % 1_000 == 999 {
                sighting.quarantined = Some("refused".to_owned());
            }
            sighting
        })
        .collect();
    state.replace(source, &claim, &sightings).await.unwrap();
    let mut read = state.sightings(source).await.unwrap();
    read.sort_by(|a, b| a.key.cmp(&b.key));
    let mut expected = sightings;
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(read.len(), expected.len());
    assert!(
        read == expected,
        "a recorded sighting differs from what was written"
    );
    state.replace(source, &claim, &[]).await.unwrap();
    assert!(state.sightings(source).await.unwrap().is_empty());
}

/// Claims `period` for `source` as the newest claim (the periods of a test are its own, not the
/// database clock's).
pub(crate) async fn claim_period(
    db: &TestDatabase,
    source: InventorySource,
    period: i64,
) -> PeriodClaim {
    sqlx::query(
        "INSERT INTO orphan_sweep_periods (inventory, period, claimed_by, claimed_at) \
         VALUES ($1, $2, 'it', now())",
    )
    .bind(source.as_str())
    .bind(period)
    .execute(db.pool())
    .await
    .unwrap();
    PeriodClaim::new(period, OffsetDateTime::now_utc())
}

/// The stored rows of `source`'s sightings and the transaction that last wrote each.
async fn written_by(db: &TestDatabase, source: InventorySource) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT key, xmin::text FROM orphan_sighting_runs WHERE inventory = $1 ORDER BY key",
    )
    .bind(source.as_str())
    .fetch_all(db.pool())
    .await
    .unwrap()
}

/// A tick records only what changed: a sighting that carries on its run into the next period
/// is not written again, yet reads back with the new period and a run one period longer; a
/// changed one is written over, a vanished one deleted, a new one added. What is read back is
/// exactly what the tick recorded, as a whole replace would leave it.
#[tokio::test]
async fn a_sighting_that_only_carries_on_is_not_written_again() {
    let db = keel_testkit::database().await;
    let state = PgSweepState::new(db.pool().clone(), "it");
    let source = InventorySource::Postgres;
    let key = |c: char| format!("customer_database:{}", c.to_string().repeat(48));
    let start = time::macros::datetime!(2026-11-30 10:00 UTC);
    let first = claim_period(&db, source, 1_000).await;
    // reclaimable, not reclaimable, about to stop being reclaimable, about to vanish.
    let seen: Vec<Sighting> = ['a', 'b', 'c', 'd']
        .into_iter()
        .map(|c| advance(None, key(c), first.period, start, c != 'b').0)
        .collect();
    state.replace(source, &first, &seen).await.unwrap();
    let before = written_by(&db, source).await;
    assert_eq!(before.len(), 4);

    let next = claim_period(&db, source, 1_001).await;
    let stored = state.sightings(source).await.unwrap();
    let stored_of = |k: &str| stored.iter().find(|s| s.key == k);
    let later = start + time::Duration::hours(1);
    let now: Vec<Sighting> = [('a', true), ('b', false), ('c', false), ('e', true)]
        .into_iter()
        .map(|(c, reclaimable)| {
            advance(stored_of(&key(c)), key(c), next.period, later, reclaimable).0
        })
        .collect();
    let continued: Vec<bool> = now
        .iter()
        .map(|s| stored_of(&s.key).is_some_and(|stored| s.continues(stored)))
        .collect();
    assert_eq!(continued, [true, true, false, false]);
    let vanished = [key('d')];
    let changes = SightingChanges {
        continued: &continued,
        vanished: &vanished,
    };
    state.record(source, &next, &now, changes).await.unwrap();

    let mut read = state.sightings(source).await.unwrap();
    read.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(read, now, "what is read back is what the tick recorded");
    assert_eq!(read[0].consecutive, 2, "the run grew by the period");
    assert_eq!(read[0].last_period, next.period);
    let after = written_by(&db, source).await;
    assert_eq!(
        after[0], before[0],
        "a carried-on sighting was written again"
    );
    assert_eq!(
        after[1], before[1],
        "a carried-on sighting was written again"
    );
    assert_eq!(after[2].0, key('c'));
    assert_ne!(
        after[2].1, before[2].1,
        "a changed sighting was not written"
    );
    assert_eq!(
        after[3].0,
        key('e'),
        "the vanished one is gone, the new one added"
    );

    // The same tick recorded again under a newer claim is refused, and writes nothing.
    let _newer = claim_period(&db, source, 1_002).await;
    let changes = SightingChanges {
        continued: &continued,
        vanished: &[],
    };
    assert!(state.record(source, &next, &now, changes).await.is_err());
    assert_eq!(written_by(&db, source).await, after);
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
    let standings = PgLiveTokens::new(db.pool().clone())
        .standing_among(&digests)
        .await
        .unwrap();
    let expected: HashSet<TokenDigest> = digests[..4].iter().cloned().collect();
    assert_eq!(standings.live, expected);
    let owned: HashSet<TokenDigest> = digests[..6].iter().cloned().collect();
    assert_eq!(standings.owned, owned, "any row proves ownership");
    let empty = PgLiveTokens::new(db.pool().clone())
        .standing_among(&[])
        .await
        .unwrap();
    assert!(empty.live.is_empty() && empty.owned.is_empty());
    assert_eq!(
        empty.installation,
        keel_provision::postgres::installation_id(db.pool())
            .await
            .unwrap()
    );
}

/// SWEEP-12: ages are measured on the platform database's clock (the period claim's), not on
/// the sweeper host's: a host clock ten days fast makes nothing old.
#[tokio::test]
async fn ages_are_measured_on_the_platform_databases_clock() {
    let f = fixture().await;
    let mut sweeper = f.sweeper(SweepConfig {
        grace: Duration::from_secs(3600),
        ..quick(true, true)
    });
    let fast = OffsetDateTime::now_utc() + time::Duration::days(10);
    let report = sweeper.tick(fast).await;
    let rows = by_name(&report);
    assert!(
        rows.iter().all(|r| r.0 != f.orphan.masked()),
        "a database made a moment ago is no candidate: {rows:?}"
    );
    assert!(f.exists(f.orphan.expose()).await);
}

/// SWEEP-10: liveness is "not terminal", so it matches `ResourceStatus::is_live` for every
/// status the schema allows, and a status added to the schema later counts as live (fails
/// closed) until the code learns it.
#[tokio::test]
async fn the_sql_liveness_list_matches_resource_status_is_live() {
    let db = keel_testkit::database().await;
    let team = TeamId::from_uuid(db.team("pro").await);
    let check: String = sqlx::query_scalar(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'resources_status_check'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    let mut statuses: Vec<String> = check
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert_eq!(
        statuses.len(),
        keel_provision::ResourceStatus::ALL.len(),
        "{check}"
    );
    sqlx::raw_sql(
        "ALTER TABLE resources DROP CONSTRAINT resources_status_check; \
         ALTER TABLE resources ADD CONSTRAINT resources_status_check CHECK (status IN \
           ('pending', 'active', 'paused', 'suspended', 'deleted', 'failed', 'restoring'))",
    )
    .execute(db.pool())
    .await
    .unwrap();
    statuses.push("restoring".to_owned());
    let mut digests = Vec::new();
    for status in &statuses {
        let token = new_token();
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                    provider_resource_id, connection_url, deleted_at) \
             VALUES (gen_random_uuid(), $1, $2, 'postgres', 'pro', $3, 'p', 'u', now())",
        )
        .bind(token.expose())
        .bind(team.as_uuid())
        .bind(status)
        .execute(db.pool())
        .await
        .unwrap();
        digests.push(TokenDigest::of(&token));
    }
    let standings = PgLiveTokens::new(db.pool().clone())
        .standing_among(&digests)
        .await
        .unwrap();
    for (status, digest) in statuses.iter().zip(&digests) {
        let expected = keel_provision::ResourceStatus::parse(status).is_none_or(|s| s.is_live());
        assert_eq!(standings.live.contains(digest), expected, "{status}");
    }
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

/// A period claim ahead of the database clock for this interval (made with another
/// `--interval`, such as a one-off `--once --interval 1m` sharing the database, or by hand) is
/// never taken for this period's claim: kept, it stood as the newest claim, and every tick of
/// the hourly sweep was skipped for as long as its number was ahead, centuries.
#[tokio::test]
async fn a_claim_made_with_another_interval_never_holds_the_sweep_back() {
    let db = keel_testkit::database().await;
    let state = PgSweepState::new(db.pool().clone(), "it");
    let source = InventorySource::Postgres;
    let minute_period = OffsetDateTime::now_utc().unix_timestamp() / 60;
    claim_period(&db, source, minute_period).await;
    let hour = Duration::from_secs(3600);
    let claim = state
        .claim(source, hour, OffsetDateTime::now_utc())
        .await
        .unwrap()
        .expect("the hourly period is claimed");
    assert!(claim.period < minute_period / 30);
    assert!(
        state.holds(source, &claim).await.unwrap(),
        "the claim is the newest fence"
    );
    assert!(
        state
            .claim(source, hour, OffsetDateTime::now_utc())
            .await
            .unwrap()
            .is_none(),
        "the same period is still claimed once"
    );
    let left: Vec<i64> = sqlx::query_scalar(
        "SELECT period FROM orphan_sweep_periods WHERE inventory = $1 ORDER BY period",
    )
    .bind(source.as_str())
    .fetch_all(db.pool())
    .await
    .unwrap();
    assert_eq!(left, [claim.period]);
}
