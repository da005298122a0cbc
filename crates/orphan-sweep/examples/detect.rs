//! Pure orphan detection over an inventory: an old object of the platform's whose token has
//! no live row is a candidate; a live one and a young one are not; one the platform did not
//! make, and one another installation owns, are candidates that are never reclaimable.
//!
//! Run with `cargo run -p keel-orphan-sweep --example detect`.

use std::time::Duration;

use keel_audit::Token;
use keel_orphan_sweep::{
    InventoryItem, InventorySource, MANAGED_BY, MANAGED_BY_LABEL, Standings, detect,
};
use keel_provision::{InstallationId, TokenDigest};
use time::macros::datetime;

fn main() -> Result<(), keel_audit::InvalidToken> {
    let now = datetime!(2026-11-22 10:00 UTC);
    let item = |name: &str, age_minutes: i64, managed: bool| {
        let item =
            InventoryItem::new(name).with_created_at(now - time::Duration::minutes(age_minutes));
        if managed {
            item.with_label(MANAGED_BY_LABEL, MANAGED_BY)
        } else {
            item
        }
    };
    let inventory = [
        item("instant-customer-orph00000001", 180, true),
        item("instant-customer-live00000001", 180, true),
        item("instant-customer-newb00000001", 10, true),
        item("instant-customer-hand00000001", 180, false),
        item("instant-customer-othr00000001", 180, true),
    ];
    // Standings are looked up by the token's digest, the only form of it the sweep ever
    // handles: which tokens are live, and which this installation has a row for (its proof of
    // ownership; the fourth object's token has none, as another installation's would not).
    let digest = |t: &str| Token::parse(t).map(|t| TokenDigest::of(&t));
    let mut standings = Standings::empty(InstallationId::from_uuid(uuid::Uuid::from_u128(1)));
    standings.live.insert(digest("live00000001")?);
    for token in [
        "orph00000001",
        "live00000001",
        "newb00000001",
        "hand00000001",
    ] {
        standings.owned.insert(digest(token)?);
    }
    let candidates = detect(
        &inventory,
        InventorySource::Kubernetes,
        &standings,
        now,
        Duration::from_secs(3600),
    );
    println!(
        "{} of {} objects are candidates:",
        candidates.len(),
        inventory.len()
    );
    // A candidate's name carries the customer's token: print its kind and age, never the name.
    for candidate in &candidates {
        println!(
            "  {:<20} {:>4} minutes old  blocked by: {}",
            candidate.kind.as_str(),
            candidate.age.as_secs() / 60,
            candidate
                .static_blocker()
                .map_or("nothing (reclaimable once burned in)", |b| b.as_str())
        );
    }
    Ok(())
}
