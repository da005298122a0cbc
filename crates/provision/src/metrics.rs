//! Provisioning metrics. Every label value comes from a closed enum.

use keel_audit::ResourceType;
use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::model::DeprovisionReason;

/// How a provisioning attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
#[non_exhaustive]
pub enum Outcome {
    /// Finalized: the 201 was earned.
    Provisioned,
    /// Refused before any side effect (unknown team, unsupported type).
    Refused,
    /// The reservation could not be written; nothing was created.
    ReserveFailed,
    /// The backend object could not be created; compensated.
    CreateFailed,
    /// The row could not be finalized; compensated (the seed's 503).
    FinalizeFailed,
    /// Refused by admission control (too many provisionings in flight); nothing was reserved.
    Shed,
}

impl Outcome {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Provisioned => "provisioned",
            Self::Refused => "refused",
            Self::ReserveFailed => "reserve_failed",
            Self::CreateFailed => "create_failed",
            Self::FinalizeFailed => "finalize_failed",
            Self::Shed => "shed",
        }
    }
}

/// Where a teardown failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
#[non_exhaustive]
pub enum TeardownStage {
    /// Compensating a failed provisioning.
    Compensation,
    /// Inside the deprovision chokepoint.
    Deprovision,
}

impl TeardownStage {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Compensation => "compensation",
            Self::Deprovision => "deprovision",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct OutcomeLabels {
    resource_type: ResourceType,
    outcome: Outcome,
}

impl EncodeLabelSet for OutcomeLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("resource_type", self.resource_type.as_str()).encode(encoder.encode_label())?;
        ("outcome", self.outcome.as_str()).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct TeardownLabels {
    resource_type: ResourceType,
    stage: TeardownStage,
}

impl EncodeLabelSet for TeardownLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("resource_type", self.resource_type.as_str()).encode(encoder.encode_label())?;
        ("stage", self.stage.as_str()).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct TypeLabels {
    resource_type: ResourceType,
}

impl EncodeLabelSet for TypeLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("resource_type", self.resource_type.as_str()).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct DeprovisionLabels {
    resource_type: ResourceType,
    reason: DeprovisionReason,
}

impl EncodeLabelSet for DeprovisionLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("resource_type", self.resource_type.as_str()).encode(encoder.encode_label())?;
        ("reason", self.reason.as_str()).encode(encoder.encode_label())
    }
}

/// The provisioning metrics. Cheap to clone (shared atomics).
#[derive(Clone, Debug, Default)]
pub struct ProvisionMetrics {
    outcomes: Family<OutcomeLabels, Counter>,
    teardown_failures: Family<TeardownLabels, Counter>,
    uncompensated: Family<TypeLabels, Counter>,
    deprovisions: Family<DeprovisionLabels, Counter>,
    answered_pending: Family<TypeLabels, Counter>,
}

impl ProvisionMetrics {
    /// Creates the metrics, registers them, and primes every label combination at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "instant_provision_outcomes",
            "Provisioning attempts by resource type and outcome",
            metrics.outcomes.clone(),
        );
        registry.register(
            "instant_provision_teardown_failures",
            "Backend teardowns that failed (the object may be left behind; each is audited)",
            metrics.teardown_failures.clone(),
        );
        registry.register(
            "instant_provision_uncompensated",
            "Failed provisionings whose row could not be flipped to failed (left pending for the reconciler; nothing torn down)",
            metrics.uncompensated.clone(),
        );
        registry.register(
            "instant_provision_deprovisions",
            "Live resources and orphans torn down through the deprovision chokepoint",
            metrics.deprovisions.clone(),
        );
        registry.register(
            "instant_provision_answered_pending",
            "Provisionings still running at the request deadline, answered provision_pending (their own outcome is counted when they end)",
            metrics.answered_pending.clone(),
        );
        for &resource_type in ResourceType::ALL {
            for &outcome in <Outcome as strum::VariantArray>::VARIANTS {
                let _ = metrics.outcomes.get_or_create(&OutcomeLabels {
                    resource_type,
                    outcome,
                });
            }
            for &stage in <TeardownStage as strum::VariantArray>::VARIANTS {
                let _ = metrics.teardown_failures.get_or_create(&TeardownLabels {
                    resource_type,
                    stage,
                });
            }
            let _ = metrics
                .uncompensated
                .get_or_create(&TypeLabels { resource_type });
            let _ = metrics
                .answered_pending
                .get_or_create(&TypeLabels { resource_type });
            for &reason in DeprovisionReason::ALL {
                let _ = metrics.deprovisions.get_or_create(&DeprovisionLabels {
                    resource_type,
                    reason,
                });
            }
        }
        metrics
    }

    pub(crate) fn outcome(&self, resource_type: ResourceType, outcome: Outcome) {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                resource_type,
                outcome,
            })
            .inc();
    }

    pub(crate) fn teardown_failed(&self, resource_type: ResourceType, stage: TeardownStage) {
        self.teardown_failures
            .get_or_create(&TeardownLabels {
                resource_type,
                stage,
            })
            .inc();
    }

    pub(crate) fn uncompensated(&self, resource_type: ResourceType) {
        self.uncompensated
            .get_or_create(&TypeLabels { resource_type })
            .inc();
    }

    pub(crate) fn deprovisioned(&self, resource_type: ResourceType, reason: DeprovisionReason) {
        self.deprovisions
            .get_or_create(&DeprovisionLabels {
                resource_type,
                reason,
            })
            .inc();
    }

    /// Counts a provisioning request of `resource_type` refused by admission control.
    pub fn shed(&self, resource_type: ResourceType) {
        self.outcome(resource_type, Outcome::Shed);
    }

    /// Counts a provisioning of `resource_type` answered `provision_pending` at the request
    /// deadline (the flow goes on; its outcome is counted when it ends).
    pub fn answered_pending(&self, resource_type: ResourceType) {
        self.answered_pending
            .get_or_create(&TypeLabels { resource_type })
            .inc();
    }

    /// How many provisionings of `resource_type` were answered `provision_pending`.
    pub fn answered_pending_total(&self, resource_type: ResourceType) -> u64 {
        self.answered_pending
            .get_or_create(&TypeLabels { resource_type })
            .get()
    }

    /// How many attempts of `resource_type` ended with `outcome`.
    pub fn outcomes(&self, resource_type: ResourceType, outcome: Outcome) -> u64 {
        self.outcomes
            .get_or_create(&OutcomeLabels {
                resource_type,
                outcome,
            })
            .get()
    }

    /// How many failed provisionings of `resource_type` were left `pending` for the reconciler.
    pub fn uncompensated_total(&self, resource_type: ResourceType) -> u64 {
        self.uncompensated
            .get_or_create(&TypeLabels { resource_type })
            .get()
    }

    /// How many teardowns of `resource_type` failed at `stage`.
    pub fn teardown_failures(&self, resource_type: ResourceType, stage: TeardownStage) -> u64 {
        self.teardown_failures
            .get_or_create(&TeardownLabels {
                resource_type,
                stage,
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn every_label_combination_is_primed_and_every_value_comes_from_a_closed_enum() {
        let mut registry = Registry::default();
        let _metrics = ProvisionMetrics::register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        let types = ResourceType::ALL.len();
        let count = |name: &str| {
            text.lines()
                .filter(|l| l.starts_with(&format!("{name}_total{{")))
                .count()
        };
        assert_eq!(
            count("instant_provision_outcomes"),
            types * <Outcome as strum::VariantArray>::VARIANTS.len()
        );
        assert_eq!(count("instant_provision_answered_pending"), types);
        assert_eq!(count("instant_provision_teardown_failures"), types * 2);
        assert_eq!(count("instant_provision_uncompensated"), types);
        assert_eq!(
            count("instant_provision_deprovisions"),
            types * DeprovisionReason::ALL.len()
        );
        for line in text.lines().filter(|l| l.contains("resource_type=")) {
            assert!(
                ResourceType::ALL
                    .iter()
                    .any(|t| line.contains(&format!("resource_type=\"{}\"", t.as_str()))),
                "{line}"
            );
        }
    }
}
