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

/// Applies with `first`, then `second`; done only when both are.
///
/// The first outcome that is not success (an unexpected skip or an error) is the result, so a
/// propagation is marked applied only when every backend has the target. When both report a
/// legitimate skip, the first one's reason stands.
#[derive(Clone, Debug)]
pub struct AllOf<A, B> {
    /// Applied first.
    pub first: A,
    /// Applied second, only if the first succeeded.
    pub second: B,
}

/// Routes each propagation to the applier for its resource type: `postgres` to the role
/// applier, `namespace` and `redis` to the Kubernetes namespace applier (the backends
/// keel-provision creates for them). The match is exhaustive, so a new resource type must be
/// routed before the crate compiles; a type whose applier this runner lacks (`None`) is an
/// unexpected skip — it retries and dead-letters, it is never silently applied.
#[derive(Clone, Debug)]
pub struct ByResourceType<P, K> {
    /// Applies `postgres` resources (the customer role on the shared cluster).
    pub postgres: Option<P>,
    /// Applies `namespace` and `redis` resources (the customer namespace).
    pub kubernetes: Option<K>,
}

fn no_applier(propagation: &Propagation) -> ApplyOutcome {
    ApplyOutcome::Skipped(crate::SkipReason::Unexpected {
        bucket: crate::ReasonBucket::Other,
        detail: format!(
            "this runner has no applier for {} resources",
            propagation.resource_type
        ),
    })
}

impl<P: Applier, K: Applier> Applier for ByResourceType<P, K> {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        match propagation.resource_type {
            keel_audit::ResourceType::Postgres => match &self.postgres {
                Some(applier) => applier.apply(propagation).await,
                None => Ok(no_applier(propagation)),
            },
            keel_audit::ResourceType::Namespace | keel_audit::ResourceType::Redis => {
                match &self.kubernetes {
                    Some(applier) => applier.apply(propagation).await,
                    None => Ok(no_applier(propagation)),
                }
            }
        }
    }
}

fn is_success(outcome: &ApplyOutcome) -> bool {
    match outcome {
        ApplyOutcome::Applied | ApplyOutcome::Skipped(crate::SkipReason::Legitimate(_)) => true,
        ApplyOutcome::Skipped(crate::SkipReason::Unexpected { .. }) => false,
    }
}

impl<A: Applier, B: Applier> Applier for AllOf<A, B> {
    async fn apply(&self, propagation: &Propagation) -> Result<ApplyOutcome, ApplyError> {
        let first = self.first.apply(propagation).await?;
        if !is_success(&first) {
            return Ok(first);
        }
        let second = self.second.apply(propagation).await?;
        Ok(match (&first, &second) {
            (_, ApplyOutcome::Skipped(crate::SkipReason::Unexpected { .. })) => second,
            (ApplyOutcome::Applied, _) | (_, ApplyOutcome::Applied) => ApplyOutcome::Applied,
            (ApplyOutcome::Skipped(_), ApplyOutcome::Skipped(_)) => first,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LegitimateSkip, ReasonBucket, SkipReason};

    struct Fixed(Result<ApplyOutcome, ApplyError>);

    impl Applier for Fixed {
        async fn apply(&self, _: &Propagation) -> Result<ApplyOutcome, ApplyError> {
            self.0.clone()
        }
    }

    fn outcome(
        first: Result<ApplyOutcome, ApplyError>,
        second: Result<ApplyOutcome, ApplyError>,
    ) -> Result<ApplyOutcome, ApplyError> {
        let propagation = crate::model::sample_propagation();
        let both = AllOf {
            first: Fixed(first),
            second: Fixed(second),
        };
        // A tiny executor: these futures never wait.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(both.apply(&propagation));
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => Err(ApplyError::new("pending")),
        }
    }

    fn routed(
        resource_type: keel_audit::ResourceType,
        postgres: Option<Fixed>,
        kubernetes: Option<Fixed>,
    ) -> Result<ApplyOutcome, ApplyError> {
        let mut propagation = crate::model::sample_propagation();
        propagation.resource_type = resource_type;
        let router = ByResourceType {
            postgres,
            kubernetes,
        };
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(router.apply(&propagation));
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => Err(ApplyError::new("pending")),
        }
    }

    /// PROP-2: each resource type reaches the applier for its backend, and a type without one
    /// is never success.
    #[test]
    fn every_resource_type_is_routed_to_its_own_applier() {
        use keel_audit::ResourceType;
        let role = || Some(Fixed(Ok(ApplyOutcome::Applied)));
        let quota = || {
            Some(Fixed(Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                LegitimateSkip::AlreadyAtTarget,
            )))))
        };
        assert_eq!(
            routed(ResourceType::Postgres, role(), quota()),
            Ok(ApplyOutcome::Applied)
        );
        for t in [ResourceType::Namespace, ResourceType::Redis] {
            assert_eq!(
                routed(t, role(), quota()),
                Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                    LegitimateSkip::AlreadyAtTarget
                )))
            );
            assert!(matches!(
                routed(t, role(), None),
                Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { .. }))
            ));
        }
        assert!(matches!(
            routed(ResourceType::Postgres, None, quota()),
            Ok(ApplyOutcome::Skipped(SkipReason::Unexpected { .. }))
        ));
    }

    #[test]
    fn all_of_is_success_only_when_every_applier_succeeds() {
        let applied = || Ok(ApplyOutcome::Applied);
        let at_target = || {
            Ok(ApplyOutcome::Skipped(SkipReason::Legitimate(
                LegitimateSkip::AlreadyAtTarget,
            )))
        };
        let missing = || {
            Ok(ApplyOutcome::Skipped(SkipReason::Unexpected {
                bucket: ReasonBucket::NamespaceNotFound,
                detail: "x".into(),
            }))
        };
        let failed = || Err(ApplyError::new("connection refused"));
        assert_eq!(outcome(applied(), applied()), applied());
        assert_eq!(outcome(at_target(), applied()), applied());
        assert_eq!(outcome(at_target(), at_target()), at_target());
        assert_eq!(outcome(applied(), missing()), missing());
        assert_eq!(outcome(missing(), applied()), missing());
        assert_eq!(outcome(applied(), failed()), failed());
        assert_eq!(outcome(failed(), applied()), failed());
    }
}
