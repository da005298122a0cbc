//! Prometheus metrics. Names are kept from the platform's existing dashboards and alerts; every
//! label value comes from a closed enum, so cardinality is bounded by construction.

use std::sync::atomic::AtomicU64;

use keel_audit::ResourceType;
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::decide::Transition;
use crate::model::{Propagation, PropagationKind};
use crate::outcome::ReasonBucket;

/// Labels `{kind, resource_type}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct KindLabels {
    /// Propagation kind.
    pub kind: PropagationKind,
    /// Resource type.
    pub resource_type: ResourceType,
}

impl EncodeLabelSet for KindLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("kind", self.kind.as_str()).encode(encoder.encode_label())?;
        ("resource_type", self.resource_type.as_str()).encode(encoder.encode_label())
    }
}

/// Labels `{kind, resource_type, skip_reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SkipLabels {
    /// Propagation kind.
    pub kind: PropagationKind,
    /// Resource type.
    pub resource_type: ResourceType,
    /// Bounded skip reason.
    pub skip_reason: ReasonBucket,
}

impl EncodeLabelSet for SkipLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("kind", self.kind.as_str()).encode(encoder.encode_label())?;
        ("resource_type", self.resource_type.as_str()).encode(encoder.encode_label())?;
        ("skip_reason", self.skip_reason.as_str()).encode(encoder.encode_label())
    }
}

/// Labels `{kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct QueueLabels {
    /// Propagation kind.
    pub kind: PropagationKind,
}

impl EncodeLabelSet for QueueLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("kind", self.kind.as_str()).encode(encoder.encode_label())
    }
}

use prometheus_client::encoding::EncodeLabel as _;

fn apply_histogram() -> Histogram {
    // 5 ms to about 40 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// The propagation runner's metrics. Cheap to clone (shared atomics).
#[derive(Clone, Debug)]
pub struct Metrics {
    unexpected_skip: Family<SkipLabels, Counter>,
    applied: Family<KindLabels, Counter>,
    retrying: Family<KindLabels, Counter>,
    dead_lettered: Family<KindLabels, Counter>,
    stale_completions: Family<QueueLabels, Counter>,
    due_rows: Family<QueueLabels, Gauge>,
    oldest_due_age_seconds: Family<QueueLabels, Gauge<f64, AtomicU64>>,
    apply_duration_seconds: Family<KindLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// Creates the metrics, registers them, and primes every label combination at zero so
    /// dashboards render from the first scrape.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            unexpected_skip: Family::default(),
            applied: Family::default(),
            retrying: Family::default(),
            dead_lettered: Family::default(),
            stale_completions: Family::default(),
            due_rows: Family::default(),
            oldest_due_age_seconds: Family::default(),
            apply_duration_seconds: Family::new_with_constructor(apply_histogram),
        };
        registry.register(
            "instant_propagation_unexpected_skip",
            "Attempts whose applier skipped for a reason that is not a legitimate no-op (they retry)",
            metrics.unexpected_skip.clone(),
        );
        registry.register(
            "instant_propagation_applied",
            "Propagations marked applied",
            metrics.applied.clone(),
        );
        registry.register(
            "instant_propagation_retrying",
            "Attempts that failed with an error and were scheduled to retry",
            metrics.retrying.clone(),
        );
        registry.register(
            "instant_propagation_dead_lettered",
            "Propagations dead-lettered after their last attempt",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "instant_propagation_stale_completions",
            "Completions refused because another worker had taken the row over",
            metrics.stale_completions.clone(),
        );
        registry.register(
            "instant_propagation_due_rows",
            "Pending propagations that are due now",
            metrics.due_rows.clone(),
        );
        registry.register(
            "instant_propagation_oldest_due_age_seconds",
            "How long the oldest due propagation has been waiting",
            metrics.oldest_due_age_seconds.clone(),
        );
        registry.register(
            "instant_propagation_apply_duration_seconds",
            "Time an applier took for one attempt",
            metrics.apply_duration_seconds.clone(),
        );
        for &kind in PropagationKind::ALL {
            drop(
                metrics
                    .stale_completions
                    .get_or_create(&QueueLabels { kind }),
            );
            drop(metrics.due_rows.get_or_create(&QueueLabels { kind }));
            drop(
                metrics
                    .oldest_due_age_seconds
                    .get_or_create(&QueueLabels { kind }),
            );
            for &resource_type in ResourceType::ALL {
                let labels = KindLabels {
                    kind,
                    resource_type,
                };
                drop(metrics.applied.get_or_create(&labels));
                drop(metrics.retrying.get_or_create(&labels));
                drop(metrics.dead_lettered.get_or_create(&labels));
                drop(metrics.apply_duration_seconds.get_or_create(&labels));
                for &skip_reason in ReasonBucket::ALL {
                    drop(metrics.unexpected_skip.get_or_create(&SkipLabels {
                        kind,
                        resource_type,
                        skip_reason,
                    }));
                }
            }
        }
        metrics
    }

    /// Counts one transition of `propagation`. An unexpected skip counts under its bucket
    /// whether it retries or dead-letters: the leading indicator and the dead-letter alert agree.
    pub fn record(&self, propagation: &Propagation, transition: &Transition) {
        use crate::decide::RetryCause;
        let labels = KindLabels {
            kind: propagation.kind(),
            resource_type: propagation.resource_type,
        };
        let cause = match transition {
            Transition::Applied { .. } => {
                self.applied.get_or_create(&labels).inc();
                return;
            }
            Transition::Retry { cause, .. } => {
                if !matches!(cause, RetryCause::UnexpectedSkip { .. }) {
                    self.retrying.get_or_create(&labels).inc();
                }
                cause
            }
            Transition::DeadLetter { cause } => {
                self.dead_lettered.get_or_create(&labels).inc();
                cause
            }
        };
        if let RetryCause::UnexpectedSkip { bucket, .. } = cause {
            self.unexpected_skip
                .get_or_create(&SkipLabels {
                    kind: labels.kind,
                    resource_type: labels.resource_type,
                    skip_reason: *bucket,
                })
                .inc();
        }
    }

    /// Records how long one apply took.
    pub fn observe_apply(&self, propagation: &Propagation, seconds: f64) {
        self.apply_duration_seconds
            .get_or_create(&KindLabels {
                kind: propagation.kind(),
                resource_type: propagation.resource_type,
            })
            .observe(seconds);
    }

    /// Counts completions refused by the fence.
    pub fn stale_completion(&self, kind: PropagationKind) {
        self.stale_completions
            .get_or_create(&QueueLabels { kind })
            .inc();
    }

    /// Sets the queue gauges for `kind`.
    pub fn set_queue(&self, kind: PropagationKind, due_rows: i64, oldest_due_age_seconds: f64) {
        self.due_rows
            .get_or_create(&QueueLabels { kind })
            .set(due_rows);
        self.oldest_due_age_seconds
            .get_or_create(&QueueLabels { kind })
            .set(oldest_due_age_seconds);
    }

    /// The current value of `instant_propagation_unexpected_skip_total` for one label set.
    pub fn unexpected_skips(
        &self,
        kind: PropagationKind,
        resource_type: ResourceType,
        skip_reason: ReasonBucket,
    ) -> u64 {
        self.unexpected_skip
            .get_or_create(&SkipLabels {
                kind,
                resource_type,
                skip_reason,
            })
            .get()
    }

    /// The current value of `instant_propagation_applied_total` for one label set.
    pub fn applied(&self, kind: PropagationKind, resource_type: ResourceType) -> u64 {
        self.applied
            .get_or_create(&KindLabels {
                kind,
                resource_type,
            })
            .get()
    }

    /// The current value of `instant_propagation_dead_lettered_total` for one label set.
    pub fn dead_lettered(&self, kind: PropagationKind, resource_type: ResourceType) -> u64 {
        self.dead_lettered
            .get_or_create(&KindLabels {
                kind,
                resource_type,
            })
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::decide;
    use crate::outcome::{ApplyOutcome, SkipReason};
    use crate::policy::RetryPolicy;

    fn encode(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    /// Every `key="value"` pair in the exposition.
    fn label_pairs(text: &str) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some(start) = line.find('{') else {
                continue;
            };
            let Some(end) = line.find('}') else { continue };
            for pair in line[start + 1..end].split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                pairs.push((k.to_owned(), v.trim_matches('"').to_owned()));
            }
        }
        pairs
    }

    #[test]
    fn every_label_value_comes_from_a_closed_enum() {
        let mut registry = Registry::default();
        Metrics::register(&mut registry);
        let text = encode(&registry);
        let kinds: Vec<&str> = PropagationKind::ALL.iter().map(|k| k.as_str()).collect();
        let types: Vec<&str> = ResourceType::ALL.iter().map(|t| t.as_str()).collect();
        let buckets: Vec<&str> = ReasonBucket::ALL.iter().map(|b| b.as_str()).collect();
        let pairs = label_pairs(&text);
        assert!(!pairs.is_empty());
        for (key, value) in pairs {
            let allowed: &[&str] = match key.as_str() {
                "kind" => &kinds,
                "resource_type" => &types,
                "skip_reason" => &buckets,
                "le" => continue,
                other => panic!("unexpected label {other}"),
            };
            assert!(allowed.contains(&value.as_str()), "{key}={value}");
        }
    }

    /// OPS-9: the apply-duration histogram is in the first scrape, before any apply, so
    /// `histogram_quantile` panels have series from the start.
    #[test]
    fn apply_duration_is_exposed_before_the_first_apply() {
        let mut registry = Registry::default();
        Metrics::register(&mut registry);
        let text = encode(&registry);
        for &kind in PropagationKind::ALL {
            for &resource_type in ResourceType::ALL {
                let line = format!(
                    "instant_propagation_apply_duration_seconds_count{{kind=\"{}\",resource_type=\"{}\"}} 0",
                    kind.as_str(),
                    resource_type.as_str()
                );
                assert!(text.contains(&line), "missing {line}");
            }
        }
    }

    #[test]
    fn the_seed_metric_name_is_exposed_and_primed_for_every_bucket() {
        let mut registry = Registry::default();
        Metrics::register(&mut registry);
        let text = encode(&registry);
        for bucket in ReasonBucket::ALL {
            let line = format!(
                "instant_propagation_unexpected_skip_total{{kind=\"tier_elevation\",resource_type=\"postgres\",skip_reason=\"{}\"}} 0",
                bucket.as_str()
            );
            assert!(text.contains(&line), "missing {line}");
        }
    }

    #[test]
    fn an_unexpected_skip_counts_under_its_bucket_and_never_as_applied() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let propagation = crate::model::sample_propagation();
        let outcome = Ok(ApplyOutcome::Skipped(SkipReason::unexpected(
            "secret postgres-admin not found",
        )));
        let now = time::OffsetDateTime::UNIX_EPOCH;
        metrics.record(
            &propagation,
            &decide(1, &outcome, &RetryPolicy::standard(), now),
        );
        let (kind, rt) = (PropagationKind::TierElevation, ResourceType::Postgres);
        assert_eq!(
            metrics.unexpected_skips(kind, rt, ReasonBucket::PostgresAdminSecretMissing),
            1
        );
        assert_eq!(metrics.applied(kind, rt), 0);
    }
}
