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
    Backend, ClaimToken, Fence, Payload, Propagation, PropagationId, PropagationKind,
    TargetVersion, UnknownPropagationKind,
};
pub use outcome::{ApplyError, ApplyOutcome, LegitimateSkip, ReasonBucket, SkipReason};
pub use policy::{PolicyError, RetryPolicies, RetryPolicy};
pub use store::{
    Completion, CompletionReport, InvalidWorkerId, PropagationStore, StoreError, WorkerId,
};
