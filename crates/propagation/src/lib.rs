//! The propagation state machine and a multi-replica runner: applied, retrying, dead-lettered.
//! An unexpected skip is never success.
//!
//! A *propagation* carries a decision (a team's new tier) to a backend object (a customer's
//! Postgres role, a Kubernetes namespace's quota). An [`Applier`] reports each attempt as
//! [`ApplyOutcome::Applied`], [`ApplyOutcome::Skipped`] or an [`ApplyError`]; [`decide`] turns
//! that into a [`Transition`] — and a skip is success only when its reason is one of the closed
//! set of [`LegitimateSkip`]s:
//!
//! | outcome | transition | audit kind |
//! |---|---|---|
//! | applied, or a legitimate skip | mark applied | `propagation.applied` |
//! | unexpected skip | retry on the schedule | `propagation.unexpected_skip` |
//! | error | retry on the schedule | `propagation.retrying` |
//! | either, at the last attempt | dead-letter | `propagation.dead_lettered` |
//!
//! The match in [`Transition::audit_kind`] is exhaustive, so there is no path by which an
//! unexpected skip writes `propagation.applied` or stamps `applied_at`.
//!
//! The default build is pure (no database, no async runtime). Features: `postgres` (the
//! `pending_propagations` store, the role applier, the runner) and `kube` (the ResourceQuota
//! applier).

//! # The decision, without I/O
//!
//! ```
//! use keel_propagation::{ApplyOutcome, RetryPolicy, SkipReason, Transition, decide};
//!
//! let now = keel_propagation::time::OffsetDateTime::UNIX_EPOCH;
//! let skipped = Ok(ApplyOutcome::Skipped(SkipReason::unexpected("role not found")));
//! let transition = decide(1, &skipped, &RetryPolicy::standard(), now);
//! assert!(matches!(transition, Transition::Retry { .. }));
//! assert_eq!(transition.audit_kind().as_str(), "propagation.unexpected_skip");
//! ```
//!
//! # Embedding the runner with your own applier (feature `postgres`)
//!
//! A tier change, its audit row and its propagations commit in the caller's transaction
//! (`postgres::change_team_tier`); Keel's runner then carries the new tier to the service's own
//! backend through an [`Applier`], records each transition with its audit row, and never
//! records an unexpected skip as applied. `examples/embed-service` in the repository is the
//! same recipe as a tested crate.
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use keel_audit::{Actor, TeamId, Tier};
//! use keel_propagation::postgres::{PgPropagationStore, change_team_tier};
//! use keel_propagation::runner::{CancellationToken, Runner, RunnerConfig};
//! use keel_propagation::{
//!     Applier, ApplyError, ApplyOutcome, Metrics, Propagation, SkipReason, WorkerId,
//! };
//!
//! /// The service's backend: a quota service.
//! struct Quotas;
//!
//! impl Applier for Quotas {
//!     async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
//!         let _tier = propagation.payload.target_tier();
//!         // … set the quota; when the backend cannot be changed, say so:
//!         Ok(ApplyOutcome::Skipped(SkipReason::unexpected("quota service: unknown resource")))
//!     }
//! }
//!
//! # async fn demo(pool: sqlx::PgPool, team: TeamId) -> Result<(), Box<dyn std::error::Error>> {
//! let store = Arc::new(PgPropagationStore::new(pool.clone()));
//! let now = store.db_now().await?; // the database clock, shared by every replica
//! let mut tx = pool.begin().await?;
//! let actor = Actor::parse("billing:webhook")?;
//! change_team_tier(&mut tx, team, &Tier::parse("pro")?, &actor, now).await?;
//! tx.commit().await?;
//!
//! let worker = WorkerId::parse("pod-1")?;
//! let runner = Runner::new(store, Arc::new(Quotas), Metrics::unregistered(), RunnerConfig::new(worker))?;
//! let report = runner.run_batch(now, &CancellationToken::new()).await?;
//! println!("{} applied, {} unexpected skips", report.applied, report.unexpected_skips);
//! # Ok(()) }
//! ```
//!
//! # Public dependencies
//!
//! Types of these crates appear in the public API; they are re-exported, so an embedding
//! service can name them through Keel (`keel_propagation::time::OffsetDateTime`) without
//! matching versions by hand: [`time`] 0.3 (every `now` and delay), [`prometheus_client`] 0.25
//! ([`Metrics::register`] takes its `Registry`), and with `postgres`, `runner::CancellationToken`
//! (tokio-util 0.7) and `runner::Notify` (tokio 1). The `postgres` adapters take sqlx 0.9
//! connections and pools; `keel_audit` supplies the ids and the audit types.

pub use prometheus_client;
pub use time;

mod applier;
mod decide;
#[cfg(feature = "kube")]
pub mod kube;
mod metrics;
mod model;
mod outcome;
mod policy;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub mod runner;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use applier::{AllOf, Applier, ByResourceType};
pub use decide::{
    ClaimDecision, MAX_ERROR_CHARS, RetryCause, Transition, decide, decide_attempt, on_claim,
    precheck, storable,
};
pub use metrics::{
    DeferReason, KindLabels, Metrics, PrunedLabels, PrunedStatus, QueueLabels, ReasonLabels,
    SkipLabels,
};
/// [`Backend`] under a name that does not collide with `keel_provision::Backend` (a trait), for a
/// service that imports from both crates.
pub use model::Backend as PropagationBackend;
pub use model::{
    Backend, ClaimToken, Fence, InvalidPayload, Payload, Propagation, PropagationId,
    PropagationKind, TargetVersion, UnknownPropagationKind,
};
pub use outcome::{ApplyError, ApplyOutcome, LegitimateSkip, ReasonBucket, SkipReason};
pub use policy::{MAX_RETRY_DELAY, PolicyError, RetryPolicies, RetryPolicy};
/// [`StoreError`] under a name that does not collide with `keel_provision::StoreError`.
pub use store::StoreError as PropagationStoreError;
pub use store::{
    Completion, CompletionReport, InvalidWorkerId, LEASE_MARGIN, MAX_LEASE, MAX_WAIT,
    PropagationStore, StoreError, WorkerId, bounded_lease, lease_is_implausible,
    wait_is_implausible,
};
