//! Pure orphan detection over an inventory: an old object of the platform's whose token's
//! digest has no live row is a candidate; a live one, a young one, and one the platform did not make are
//! not reclaimable.
//!
//! Run with `cargo run -p keel-orphan-sweep --example detect`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use keel_audit::Token;
use keel_orphan_sweep::{InventoryItem, InventorySource, MANAGED_BY, MANAGED_BY_LABEL, detect};
use keel_provision::TokenDigest;
use time::macros::datetime;

fn main() -> Result<(), keel_audit::InvalidToken> {
    let now = datetime!(2026-11-22 10:00 UTC);
    let item = |name: &str, age_minutes: i64, managed: bool| {
        let mut labels = BTreeMap::new();
        if managed {
            labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
        }
        InventoryItem {
            name: name.to_owned(),
            created_at: Some(now - time::Duration::minutes(age_minutes)),
            labels,
            annotations: BTreeMap::new(),
        }
    };
    let inventory = [
        item("instant-customer-orph00000001", 180, true),
        item("instant-customer-live00000001", 180, true),
        item("instant-customer-newb00000001", 10, true),
        item("instant-customer-hand00000001", 180, false),
    ];
    // Live rows are known by their tokens' digests (`resources.token_digest`).
    let live: HashSet<TokenDigest> = [TokenDigest::of(&Token::parse("live00000001")?)]
        .into_iter()
        .collect();

    let candidates = detect(
        &inventory,
        InventorySource::Kubernetes,
        &live,
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
            "  {:<20} {:>4} minutes old  reclaimable: {}",
            candidate.kind.as_str(),
            candidate.age.as_secs() / 60,
            candidate.reclaimable()
        );
    }
    Ok(())
}
