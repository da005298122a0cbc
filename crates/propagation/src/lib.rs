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
pub use model::{
    Backend, ClaimToken, Fence, InvalidPayload, Payload, Propagation, PropagationId,
    PropagationKind, TargetVersion, UnknownPropagationKind,
};
pub use outcome::{ApplyError, ApplyOutcome, LegitimateSkip, ReasonBucket, SkipReason};
pub use policy::{PolicyError, RetryPolicies, RetryPolicy};
pub use store::{
    Completion, CompletionReport, InvalidWorkerId, PropagationStore, StoreError, WorkerId,
};
