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
    claim_errors: Counter,
    record_errors: Counter,
    released: Counter,
    deferred_rows: Family<ReasonLabels, Gauge>,
    unsupported_dead_lettered: Family<ReasonLabels, Counter>,
    maintenance_up: Gauge,
    pruned: Family<PrunedLabels, Counter>,
    last_claim: Gauge<f64, AtomicU64>,
    last_record: Gauge<f64, AtomicU64>,
}

/// Why a pending row is left for another runner (the `reason` label). Closed, so it can
/// label metrics.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, strum::VariantArray)]
#[non_exhaustive]
pub enum DeferReason {
    /// A kind this build does not know.
    UnknownKind,
    /// A resource type this build does not know.
    UnknownResourceType,
    /// A payload version newer than this build reads.
    UnknownPayloadVersion,
    /// A payload that did not decode.
    UnreadablePayload,
}

impl DeferReason {
    /// Every label value.
    pub const ALL: &'static [DeferReason] = <Self as strum::VariantArray>::VARIANTS;

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            DeferReason::UnknownKind => "unknown_kind",
            DeferReason::UnknownResourceType => "unknown_resource_type",
            DeferReason::UnknownPayloadVersion => "unknown_payload_version",
            DeferReason::UnreadablePayload => "unreadable_payload",
        }
    }
}

/// Labels `{reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ReasonLabels {
    /// Why.
    pub reason: DeferReason,
}

impl EncodeLabelSet for ReasonLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("reason", self.reason.as_str()).encode(encoder.encode_label())
    }
}

/// Which finished rows retention deleted (`status`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, strum::VariantArray)]
#[non_exhaustive]
pub enum PrunedStatus {
    /// Applied rows.
    Applied,
    /// Dead-lettered rows.
    DeadLettered,
}

impl PrunedStatus {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            PrunedStatus::Applied => "applied",
            PrunedStatus::DeadLettered => "dead_lettered",
        }
    }
}

/// Labels `{status}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PrunedLabels {
    /// Which rows.
    pub status: PrunedStatus,
}

impl EncodeLabelSet for PrunedLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("status", self.status.as_str()).encode(encoder.encode_label())
    }
}

impl Metrics {
    /// Metrics registered nowhere: for an embedding that does not export them (or a test).
    /// They still count, and [`Metrics::unexpected_skips`] and the other readers still read.
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default())
    }

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
            claim_errors: Counter::default(),
            record_errors: Counter::default(),
            released: Counter::default(),
            deferred_rows: Family::default(),
            unsupported_dead_lettered: Family::default(),
            maintenance_up: Gauge::default(),
            pruned: Family::default(),
            last_claim: Gauge::default(),
            last_record: Gauge::default(),
        };
        registry.register(
            "instant_propagation_last_successful_claim_timestamp_seconds",
            "Database time of this runner's last successful claim (a readiness signal: it stops moving while the database is unreachable)",
            metrics.last_claim.clone(),
        );
        registry.register(
            "instant_propagation_last_successful_record_timestamp_seconds",
            "Database time of this runner's last successfully recorded batch",
            metrics.last_record.clone(),
        );
        registry.register(
            "instant_propagation_claim_errors",
            "Claims that failed (the store could not be reached or refused the claim)",
            metrics.claim_errors.clone(),
        );
        registry.register(
            "instant_propagation_record_errors",
            "Completions or releases that could not be stored (their rows come back after the lease)",
            metrics.record_errors.clone(),
        );
        registry.register(
            "instant_propagation_released",
            "Claimed rows given back without charging an attempt (shutdown, or the apply never reached its backend)",
            metrics.released.clone(),
        );
        registry.register(
            "instant_propagation_deferred_rows",
            "Pending rows this runner cannot run and leaves for a newer one, by reason",
            metrics.deferred_rows.clone(),
        );
        registry.register(
            "instant_propagation_unsupported_dead_lettered",
            "Rows dead-lettered because no runner could run them within the grace period",
            metrics.unsupported_dead_lettered.clone(),
        );
        registry.register(
            "instant_propagation_maintenance_up",
            "1 when the last housekeeping pass succeeded, 0 when it failed (when its reads failed, the queue and deferral gauges are absent until they succeed again)",
            metrics.maintenance_up.clone(),
        );
        registry.register(
            "instant_propagation_pruned",
            "Finished rows deleted by retention",
            metrics.pruned.clone(),
        );
        for &reason in DeferReason::ALL {
            drop(
                metrics
                    .deferred_rows
                    .get_or_create(&ReasonLabels { reason }),
            );
            drop(
                metrics
                    .unsupported_dead_lettered
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        for &status in <PrunedStatus as strum::VariantArray>::VARIANTS {
            drop(metrics.pruned.get_or_create(&PrunedLabels { status }));
        }
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

    /// Notes a successful claim at `at` (the store's clock).
    pub fn claim_succeeded(&self, at: time::OffsetDateTime) {
        self.last_claim.set(at.unix_timestamp_nanos() as f64 / 1e9);
    }

    /// Notes a successfully recorded batch at `at` (the store's clock).
    pub fn record_succeeded(&self, at: time::OffsetDateTime) {
        self.last_record.set(at.unix_timestamp_nanos() as f64 / 1e9);
    }

    /// Unix seconds of the last successful claim (0 before the first).
    pub fn last_successful_claim(&self) -> f64 {
        self.last_claim.get()
    }

    /// Counts a failed claim.
    pub fn claim_error(&self) {
        self.claim_errors.inc();
    }

    /// Counts a completion or release that could not be stored.
    pub fn record_error(&self) {
        self.record_errors.inc();
    }

    /// Counts rows given back uncharged.
    pub fn released(&self, rows: u64) {
        self.released.inc_by(rows);
    }

    /// Sets the deferred-rows gauge for `reason`.
    pub fn set_deferred(&self, reason: DeferReason, rows: i64) {
        self.deferred_rows
            .get_or_create(&ReasonLabels { reason })
            .set(rows);
    }

    /// Counts a row dead-lettered as unsupported.
    pub fn unsupported_dead_lettered(&self, reason: DeferReason) {
        self.unsupported_dead_lettered
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Forgets the queue and deferral gauges after a failed read: their series disappear until
    /// the next successful read sets them again, so an old value never looks current (a frozen
    /// `oldest_due_age_seconds` would hide a growing backlog).
    pub fn queue_unknown(&self) {
        self.due_rows.clear();
        self.oldest_due_age_seconds.clear();
        self.deferred_rows.clear();
    }

    /// Marks whether the last maintenance reads succeeded.
    pub fn set_maintenance_up(&self, up: bool) {
        self.maintenance_up.set(i64::from(up));
    }

    /// Counts rows deleted by retention.
    pub fn pruned(&self, status: PrunedStatus, rows: u64) {
        self.pruned
            .get_or_create(&PrunedLabels { status })
            .inc_by(rows);
    }

    /// The current value of `instant_propagation_claim_errors_total`.
    pub fn claim_errors(&self) -> u64 {
        self.claim_errors.get()
    }

    /// The current value of `instant_propagation_record_errors_total`.
    pub fn record_errors(&self) -> u64 {
        self.record_errors.get()
    }

    /// The current value of `instant_propagation_unsupported_dead_lettered_total{reason}`.
    pub fn unsupported_dead_letters(&self, reason: DeferReason) -> u64 {
        self.unsupported_dead_lettered
            .get_or_create(&ReasonLabels { reason })
            .get()
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
        let reasons: Vec<&str> = DeferReason::ALL.iter().map(|r| r.as_str()).collect();
        let statuses = ["applied", "dead_lettered"];
        let pairs = label_pairs(&text);
        assert!(!pairs.is_empty());
        for (key, value) in pairs {
            let allowed: &[&str] = match key.as_str() {
                "kind" => &kinds,
                "resource_type" => &types,
                "skip_reason" => &buckets,
                "reason" => &reasons,
                "status" => &statuses,
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
