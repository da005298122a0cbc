//! The reclaimer is keel-provision's audited deprovision chokepoint, and nothing else: this crate
//! has no other destructive path.

use keel_audit::{Actor, BoxError};
use keel_provision::{
    Backend, BackendName, DeprovisionCause, DeprovisionError, DeprovisionReason, DeprovisionTarget,
    Deprovisioned, Provisioner, ResourceStore,
};
use time::OffsetDateTime;

use crate::ports::{ReclaimError, Reclaimed, Reclaimer};

/// The actor every reclaim is audited as.
pub const SWEEP_ACTOR: &str = "keel-orphan-sweep";

impl<S: ResourceStore, B: Backend> crate::ports::sealed::Sealed for Provisioner<S, B> {}

impl<S: ResourceStore, B: Backend> Reclaimer for Provisioner<S, B> {
    async fn reclaim(
        &self,
        name: &BackendName,
        now: OffsetDateTime,
    ) -> Result<Reclaimed, ReclaimError> {
        let cause = DeprovisionCause {
            reason: DeprovisionReason::Orphan,
            actor: Actor::parse(SWEEP_ACTOR).map_err(|e| ReclaimError::Failed(Box::new(e)))?,
            request_id: None,
        };
        match self
            .deprovision(DeprovisionTarget::Orphan(name.clone()), &cause, now)
            .await
        {
            Ok(Deprovisioned::OrphanReclaimed | Deprovisioned::Retired) => Ok(Reclaimed::TornDown),
            Ok(Deprovisioned::OrphanAbsent | Deprovisioned::AlreadyRetired) => {
                Ok(Reclaimed::AlreadyGone)
            }
            Err(DeprovisionError::Live { .. }) => Err(ReclaimError::Live),
            Err(DeprovisionError::Refused(refusal)) => Err(ReclaimError::Refused(refusal)),
            Err(DeprovisionError::Protected) => Err(ReclaimError::Refused(
                keel_provision::ReclaimRefusal::Protected,
            )),
            Err(DeprovisionError::BeingDeleted) => Err(ReclaimError::BeingDeleted),
            Err(e) => Err(ReclaimError::Failed(BoxError::from(e))),
        }
    }
}
