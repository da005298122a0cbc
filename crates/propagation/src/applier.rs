//! The `Applier` port: carries one propagation's payload to its backend.

use std::future::Future;

use crate::model::Propagation;
use crate::outcome::{ApplyError, ApplyOutcome};

/// Carries a propagation's payload to a backend.
///
/// Delivery is **at least once**: a worker that dies after applying but before recording the
/// outcome leaves the row to be claimed again when its lease expires, so an applier must be
/// idempotent (applying the same target twice is harmless) and should report
/// [`LegitimateSkip::AlreadyAtTarget`](crate::LegitimateSkip::AlreadyAtTarget) when there is
/// nothing to change.
///
/// Report [`ApplyOutcome::Skipped`] with [`SkipReason::Unexpected`](crate::SkipReason) whenever the
/// backend could not be changed for a reason that is not one of the legitimate no-ops; never
/// report `Applied` for a change that did not land.
pub trait Applier: Send + Sync {
    /// Applies `propagation`'s payload.
    fn apply(
        &self,
        propagation: &Propagation,
    ) -> impl Future<Output = Result<ApplyOutcome, ApplyError>> + Send;
}
