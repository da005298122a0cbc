//! The inventory port's exported contract, run against the Postgres adapter (the fake runs it in
//! the crate's own tests).

use keel_orphan_sweep::postgres::PgDatabaseInventory;
use keel_orphan_sweep::testing::{InventoryHarness, inventory_contract};
use keel_orphan_sweep::{Inventory, InventoryError, InventoryItem, InventorySource};
use keel_provision::DATABASE_PREFIX;
use keel_provision::postgres::comment_keys;
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
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP DATABASE {}",
            quote_ident(name)
        )))
        .execute(&self.admin)
        .await
        .unwrap_or_else(|e| panic!("drop a database: {e}"));
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
