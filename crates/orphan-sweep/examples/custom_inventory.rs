//! A sweep over a custom inventory: any backend whose objects are named from customer tokens can
//! be swept by implementing [`Inventory`] (and [`LiveTokens`] over the platform's records). Here
//! an in-memory list of customer databases, two hourly ticks in audit-only mode, and the review
//! list: what the armed run would reclaim and what blocks the rest.
//!
//! Run with `cargo run -p keel-orphan-sweep --features testing --example custom_inventory`.

use std::time::Duration;

use keel_audit::Token;
use keel_orphan_sweep::testing::ScriptedReclaimer;
use keel_orphan_sweep::{
    FingerprintKey, Inventory, InventoryError, InventoryItem, InventorySource, LiveTokens,
    LiveTokensError, MANAGED_BY, MANAGED_BY_LABEL, MemoryState, Standings, SweepConfig,
    SweepMetrics, Sweeper, TickReport,
};
use keel_provision::{InstallationId, TokenDigest};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

/// The custom inventory: a fixed list (a real one would page through its backend and answer an
/// error, never a partial list).
struct Listed(Vec<InventoryItem>);

impl Inventory for Listed {
    fn source(&self) -> InventorySource {
        InventorySource::Postgres
    }

    async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
        Ok(self.0.clone())
    }
}

/// The platform's records: which tokens this installation owns, and which of them are live.
struct Records {
    owned: Vec<TokenDigest>,
    live: Vec<TokenDigest>,
}

impl LiveTokens for Records {
    async fn standing_among(&self, digests: &[TokenDigest]) -> Result<Standings, LiveTokensError> {
        let mut standings = Standings::empty(InstallationId::from_uuid(uuid::Uuid::from_u128(1)));
        for digest in digests {
            if self.owned.contains(digest) {
                standings.owned.insert(digest.clone());
            }
            if self.live.contains(digest) {
                standings.live.insert(digest.clone());
            }
        }
        Ok(standings)
    }
}

fn database(token: &str, managed: bool) -> InventoryItem {
    let item =
        InventoryItem::new(format!("cust_{token}")).with_created_at(NOW - time::Duration::hours(5));
    if managed {
        item.with_label(MANAGED_BY_LABEL, MANAGED_BY)
    } else {
        item
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let digest = |t: &str| Token::parse(t).map(|t| TokenDigest::of(&t));
    let records = Records {
        owned: vec![
            digest("gone00000001")?,
            digest("live00000001")?,
            digest("hand00000001")?,
        ],
        live: vec![digest("live00000001")?],
    };
    let inventory = Listed(vec![
        database("gone00000001", true),
        database("live00000001", true),
        database("hand00000001", false),
        database("else00000001", true),
    ]);
    let mut sweeper = Sweeper::new(
        inventory,
        records,
        None::<ScriptedReclaimer>,
        MemoryState::new(),
        SweepConfig {
            enabled: true,
            confirm_ticks: 2,
            burn_in: Duration::from_secs(3600),
            ..SweepConfig::default()
        },
        SweepMetrics::register(&mut Registry::default()),
        FingerprintKey::new(*b"example-fingerprint-key")?,
    );
    for hour in 0..2 {
        let report = sweeper.tick(NOW + time::Duration::hours(hour)).await;
        if let TickReport::Swept { candidates, .. } = &report {
            println!("tick {hour}:");
            for c in candidates {
                println!(
                    "  {:<20} would reclaim: {:<5} blocked by: {}",
                    c.name_masked,
                    c.would_reclaim,
                    c.blocked_by.map_or("-", |b| b.as_str())
                );
            }
        }
    }
    Ok(())
}
