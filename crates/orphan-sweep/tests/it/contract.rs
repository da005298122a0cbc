//! The inventory, live-token and state ports' exported contracts, run against the Postgres adapters
//! (the fakes run them in the crate's own tests).

use std::collections::HashSet;

use keel_audit::{TeamId, Token};
use keel_orphan_sweep::postgres::{PgDatabaseInventory, PgLiveTokens, PgSweepState};
use keel_orphan_sweep::testing::{
    InventoryHarness, LiveTokensHarness, SweepStateHarness, inventory_contract,
    live_tokens_contract, sweep_state_contract,
};
use keel_orphan_sweep::{
    Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens, LiveTokensError,
    PeriodClaim, Standings,
};
use keel_provision::postgres::{comment_keys, installation_id};
use keel_provision::{DATABASE_PREFIX, InstallationId, TokenDigest};
use keel_testkit::TestDatabase;
use keel_testkit::quote_ident;
use sqlx::{AssertSqlSafe, PgPool};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The customer-database inventory, with the means to make and drop databases on its cluster.
struct PgHarness {
    inventory: PgDatabaseInventory,
    admin: PgPool,
}

impl Inventory for PgHarness {
    fn source(&self) -> InventorySource {
        self.inventory.source()
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        self.inventory.list().await
    }
}

impl InventoryHarness for PgHarness {
    fn name_for(&self, token: &str) -> String {
        format!("{DATABASE_PREFIX}{token}")
    }

    fn foreign_name(&self, token: &str) -> String {
        format!("zz_not_{DATABASE_PREFIX}{token}")
    }

    async fn create(&self, item: &InventoryItem) {
        // Names are quoted identifiers, the comment a quoted literal.
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE DATABASE {}",
            quote_ident(&item.name)
        )))
        .execute(&self.admin)
        .await
        .unwrap_or_else(|e| panic!("create a database: {e}"));
        // What keel-provision writes: labels and annotations in the database's comment, the
        // creation time as an annotation.
        let mut annotations = item.annotations.clone();
        if let Some(at) = item.created_at {
            annotations.insert(
                comment_keys::CREATED_AT.to_owned(),
                at.format(&Rfc3339).unwrap(),
            );
        }
        let comment = serde_json::json!({ "labels": item.labels, "annotations": annotations });
        sqlx::raw_sql(AssertSqlSafe(format!(
            "COMMENT ON DATABASE {} IS '{}'",
            quote_ident(&item.name),
            comment.to_string().replace('\'', "''")
        )))
        .execute(&self.admin)
        .await
        .unwrap_or_else(|e| panic!("comment on a database: {e}"));
    }

    async fn remove(&self, name: &str) {
        drop_database(&self.admin, name).await;
    }
}

/// LIB-7: the Postgres customer-database inventory keeps the contract the fake keeps.
#[tokio::test]
async fn the_postgres_inventory_keeps_the_inventory_contract() {
    let db = keel_testkit::database().await;
    let harness = PgHarness {
        inventory: PgDatabaseInventory::new(db.pool().clone()),
        admin: db.pool().clone(),
    };
    inventory_contract(&harness, OffsetDateTime::now_utc()).await;
}

/// Drops database `name` from the test's cluster.
async fn drop_database(admin: &PgPool, name: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE {}",
        quote_ident(name)
    )))
    .execute(admin)
    .await
    .unwrap_or_else(|e| panic!("drop a database: {e}"));
}

/// Makes database `name` with `comment` (a JSON document) on the test's cluster.
async fn database_with_comment(admin: &PgPool, name: &str, comment: &serde_json::Value) {
    let name = quote_ident(name);
    let comment = comment.to_string().replace('\'', "''");
    for statement in [
        format!("CREATE DATABASE {name}"),
        format!("COMMENT ON DATABASE {name} IS '{comment}'"),
    ] {
        sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(admin)
            .await
            .unwrap_or_else(|e| panic!("make a commented database: {e}"));
    }
}

/// The listed item named `name`.
async fn listed(inventory: &PgDatabaseInventory, name: &str) -> InventoryItem {
    inventory
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|item| item.name == name)
        .unwrap_or_else(|| panic!("{name} is not listed"))
}

/// A database's COMMENT is its owner's (the customer's) to write, up to a gigabyte: the inventory
/// never reads one longer than `COMMENT_MAX_BYTES` (its item carries no labels, so it is never
/// taken for one the platform made, nor reclaimed), and reads the others as before.
#[tokio::test]
async fn a_database_comment_longer_than_keel_reads_is_never_read() {
    let db = keel_testkit::database().await;
    let admin = db.pool();
    let inventory = PgDatabaseInventory::new(admin.clone());
    let big = format!("{DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let small = format!("{DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let managed = |padding: usize| {
        serde_json::json!({
            "labels": { comment_keys::MANAGED_BY: "keel" },
            "annotations": { "padding": "x".repeat(padding) },
        })
    };
    let limit = usize::try_from(keel_provision::postgres::COMMENT_MAX_BYTES).unwrap();
    database_with_comment(admin, &big, &managed(limit)).await;
    database_with_comment(admin, &small, &managed(100)).await;
    let big_item = listed(&inventory, &big).await;
    let small_item = listed(&inventory, &small).await;
    for name in [&big, &small] {
        drop_database(admin, name).await;
    }
    assert!(
        big_item.labels.is_empty() && big_item.annotations.is_empty(),
        "an oversized comment was read"
    );
    assert_eq!(
        small_item
            .labels
            .get(comment_keys::MANAGED_BY)
            .map(String::as_str),
        Some("keel")
    );
}

/// The creation-time annotation is the database owner's to rewrite: one later than the server's
/// own record of the database (its `PG_VERSION` file) gives way to it, so a customer cannot make
/// an orphaned database look too young ever to be a candidate.
#[tokio::test]
async fn a_creation_time_later_than_the_servers_own_gives_way_to_it() {
    let db = keel_testkit::database().await;
    let admin = db.pool();
    let inventory = PgDatabaseInventory::new(admin.clone());
    let name = format!("{DATABASE_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let before = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    database_with_comment(
        admin,
        &name,
        &serde_json::json!({
            "labels": { comment_keys::MANAGED_BY: "keel" },
            "annotations": { comment_keys::CREATED_AT: "9999-12-31T00:00:00Z" },
        }),
    )
    .await;
    let item = listed(&inventory, &name).await;
    drop_database(admin, &name).await;
    let created = item
        .created_at
        .expect("the server's file time is readable here");
    assert!(
        created >= before && created <= OffsetDateTime::now_utc(),
        "the database's creation time is the customer's: {created}"
    );
}

/// A status the platform adds after this build: the harness widens the status CHECK to allow it.
const LATER_STATUS: &str = "restoring";

/// A live-token source over a platform database, with the means to write its rows. Generic over
/// the adapter so a broken one can be held to the same contract.
struct PgTokensHarness<L> {
    tokens: L,
    db: TestDatabase,
    team: TeamId,
}

impl<L> PgTokensHarness<L> {
    async fn new(db: TestDatabase, tokens: impl FnOnce(&TestDatabase) -> L) -> Self {
        let team = db.team_id("pro").await;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER TABLE resources DROP CONSTRAINT resources_status_check; \
             ALTER TABLE resources ADD CONSTRAINT resources_status_check CHECK (status IN \
               ('pending', 'active', 'paused', 'suspended', 'deleted', 'failed', '{LATER_STATUS}'))"
        )))
        .execute(db.pool())
        .await
        .unwrap_or_else(|e| panic!("widen the status check: {e}"));
        Self {
            tokens: tokens(&db),
            db,
            team,
        }
    }

    async fn row(&self, token: &Token, status: &str) {
        sqlx::query(
            "INSERT INTO resources (id, token, team_id, resource_type, tier, status, \
                                    provider_resource_id, connection_url, deleted_at) \
             VALUES (gen_random_uuid(), $1, $2, 'postgres', 'pro', $3, 'p', 'u', \
                     CASE WHEN $3 IN ('deleted', 'failed') THEN now() END)",
        )
        .bind(token.expose())
        .bind(self.team.as_uuid())
        .bind(status)
        .execute(self.db.pool())
        .await
        .unwrap_or_else(|e| panic!("insert a resource row: {e}"));
    }
}

impl<L: LiveTokens> LiveTokens for PgTokensHarness<L> {
    async fn standing_among(&self, digests: &[TokenDigest]) -> Result<Standings, LiveTokensError> {
        self.tokens.standing_among(digests).await
    }
}

impl<L: LiveTokens> LiveTokensHarness for PgTokensHarness<L> {
    async fn installation(&self) -> InstallationId {
        installation_id(self.db.pool())
            .await
            .unwrap_or_else(|e| panic!("read the installation id: {e}"))
    }

    async fn seed_live(&self, token: &Token) {
        self.row(token, "active").await;
    }

    async fn seed_terminal(&self, token: &Token) {
        self.row(token, "deleted").await;
    }

    async fn seed_unknown_status(&self, token: &Token) {
        self.row(token, LATER_STATUS).await;
    }

    async fn protect(&self, token: &Token) {
        sqlx::query(
            "INSERT INTO reclaim_protections (token_digest, reason, protected_by) \
             VALUES ($1, 'contract', 'contract')",
        )
        .bind(TokenDigest::of(token).as_str())
        .execute(self.db.pool())
        .await
        .unwrap_or_else(|e| panic!("protect a token: {e}"));
    }
}

/// LIB-7: the Postgres live-token lookup keeps the contract the fake keeps.
#[tokio::test]
async fn the_postgres_live_tokens_keep_the_live_tokens_contract() {
    let harness = PgTokensHarness::new(keel_testkit::database().await, |db| {
        PgLiveTokens::new(db.pool().clone())
    })
    .await;
    live_tokens_contract(&harness).await;
}

/// A lookup that lists the live statuses it knows (the SWEEP-10 shape): a row of a status added
/// later reads as dead, so its object would look like an orphan.
struct KnownStatusesOnly {
    pool: PgPool,
}

impl LiveTokens for KnownStatusesOnly {
    async fn standing_among(&self, digests: &[TokenDigest]) -> Result<Standings, LiveTokensError> {
        let wanted: Vec<&str> = digests.iter().map(TokenDigest::as_str).collect();
        let (installation, live, owned, protected): (
            uuid::Uuid,
            Vec<String>,
            Vec<String>,
            Vec<String>,
        ) = sqlx::query_as(
            "SELECT keel_installation_id(), \
                    coalesce(array_agg(DISTINCT r.token_digest) \
                             FILTER (WHERE r.status IN ('pending', 'active', 'paused', \
                                                        'suspended')), '{}'), \
                    coalesce(array_agg(DISTINCT r.token_digest), '{}'), \
                    (SELECT coalesce(array_agg(p.token_digest), '{}') \
                       FROM reclaim_protections p WHERE p.token_digest = ANY($1)) \
               FROM resources r WHERE r.token_digest = ANY($1)",
        )
        .bind(&wanted)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| LiveTokensError(Box::new(e)))?;
        let set = |digests: Vec<String>| -> HashSet<TokenDigest> {
            digests
                .iter()
                .filter_map(|d| TokenDigest::parse(d))
                .collect()
        };
        let mut standings = Standings::empty(InstallationId::from_uuid(installation));
        standings.live = set(live);
        standings.owned = set(owned);
        standings.protected = set(protected);
        Ok(standings)
    }
}

/// The contract catches a Postgres lookup that treats a status it does not know as dead
/// (liveness failing open); [`PgLiveTokens`] passes the same story on the same kind of
/// database (`the_postgres_live_tokens_keep_the_live_tokens_contract`).
#[tokio::test]
async fn the_live_tokens_contract_catches_a_lookup_that_treats_an_unknown_status_as_dead() {
    let harness = PgTokensHarness::new(keel_testkit::database().await, |db| KnownStatusesOnly {
        pool: db.pool().clone(),
    })
    .await;
    let verdict = tokio::spawn(async move { live_tokens_contract(&harness).await }).await;
    let panic = verdict
        .expect_err("the contract passed a lookup failing open")
        .into_panic();
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or_default();
    assert!(
        message.contains("fail closed"),
        "the contract failed for another reason: {message}"
    );
}

/// The Postgres state store, with periods claimed by writing the claim as the store would.
struct PgStateHarness {
    state: PgSweepState,
    pool: PgPool,
}

impl SweepStateHarness for PgStateHarness {
    type State = PgSweepState;

    fn state(&self) -> &PgSweepState {
        &self.state
    }

    async fn claim_period(&self, source: InventorySource, period: i64) -> PeriodClaim {
        sqlx::query(
            "INSERT INTO orphan_sweep_periods (inventory, period, claimed_by, claimed_at) \
             VALUES ($1, $2, 'contract', now())",
        )
        .bind(source.as_str())
        .bind(period)
        .execute(&self.pool)
        .await
        .unwrap();
        PeriodClaim::new(period, OffsetDateTime::now_utc())
    }
}

/// The Postgres state store keeps the contract the in-memory one keeps: what a tick records,
/// whole or by its changes, is what the next one reads.
#[tokio::test]
async fn the_postgres_state_store_keeps_the_sweep_state_contract() {
    let db = keel_testkit::database().await;
    let harness = PgStateHarness {
        state: PgSweepState::new(db.pool().clone(), "contract"),
        pool: db.pool().clone(),
    };
    sweep_state_contract(&harness, InventorySource::Postgres, 1_000).await;
    sweep_state_contract(&harness, InventorySource::Kubernetes, 2_000).await;
}
