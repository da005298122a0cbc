//! Embeds Keel's runner with a service's own applier, on the in-memory store of the `testing`
//! feature (no database needed): the upgrade the service's backend applies is recorded as
//! applied; the one it cannot apply is an unexpected skip, retried and never recorded as
//! applied. With the `postgres` feature, `postgres::PgPropagationStore` takes the store's place
//! unchanged (the crate docs show that version).
//!
//! ```text
//! cargo run -p keel-propagation --example embed_runner
//! ```

use std::sync::Arc;

use keel_audit::{ResourceId, ResourceType, TeamId, Tier};
use keel_propagation::runner::{CancellationToken, Runner, RunnerConfig};
use keel_propagation::testing::MemoryPropagationStore;
use keel_propagation::{
    Applier, ApplyError, ApplyOutcome, Backend, Metrics, Payload, Propagation, SkipReason, WorkerId,
};

/// The service's backend: a quota service that knows one resource.
struct Quotas {
    known: ResourceId,
}

impl Applier for Quotas {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        if propagation.resource_id == self.known {
            // … set the quota for propagation.payload.target_tier() …
            Ok(ApplyOutcome::Applied)
        } else {
            Ok(ApplyOutcome::Skipped(SkipReason::unexpected(
                "the quota service does not know this resource",
            )))
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let now = keel_propagation::time::OffsetDateTime::now_utc();
    let store = Arc::new(MemoryPropagationStore::new(now));
    let pro = Tier::parse("pro")?;
    let (known, unknown) = (ResourceId::new_random(), ResourceId::new_random());
    let mut ids = Vec::new();
    for resource in [known, unknown] {
        let team = TeamId::new_random();
        let backend = Backend {
            status: Some("active".into()),
            team_id: Some(team),
            ..Backend::default()
        };
        let payload = Payload::TierElevation {
            target_tier: pro.clone(),
        };
        ids.push(store.enqueue(
            team,
            resource,
            ResourceType::Postgres,
            payload,
            backend,
            now,
        ));
    }

    let runner = Runner::new(
        Arc::clone(&store),
        Arc::new(Quotas { known }),
        Metrics::unregistered(),
        RunnerConfig::new(WorkerId::parse("example-1")?),
    )?;
    let report = runner.run_batch(now, &CancellationToken::new()).await?;
    println!(
        "claimed {}, applied {}, unexpected skips {}",
        report.claimed, report.applied, report.unexpected_skips
    );
    for id in ids {
        if let Some(row) = store.row(id) {
            println!("propagation {id}: {:?}, audit {:?}", row.status, row.audit);
        }
    }
    Ok(())
}
