// An unaudited destructive reclaimer: `Reclaimer` is sealed, so outside code cannot implement it
// (the only destructive one is keel-provision's audited deprovision chokepoint).
use keel_orphan_sweep::{ReclaimError, Reclaimed, Reclaimer};
use keel_provision::BackendName;
use time::OffsetDateTime;

struct Unaudited;

impl Reclaimer for Unaudited {
    async fn reclaim(
        &self,
        _name: &BackendName,
        _now: OffsetDateTime,
    ) -> Result<Reclaimed, ReclaimError> {
        Ok(Reclaimed::TornDown)
    }
}

fn main() {
    let _ = Unaudited;
}
