//! The sweep's metrics. Names are kept from the platform's dashboards and alerts; every label
//! value comes from a closed enum, and both candidate families are primed at 0 for every kind
//! at start-up so dashboards render.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::detect::{Blocker, OrphanKind};

/// Where a tick failed. Closed: it labels the error counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
#[non_exhaustive]
pub enum Stage {
    /// Listing the inventory.
    List,
    /// Reading which tokens are live.
    LiveTokens,
    /// Re-reading a token's liveness just before a reclaim.
    Reconfirm,
    /// The reclaim itself (the deprovision chokepoint).
    Reclaim,
    /// Claiming the period (the state store).
    Claim,
    /// Reading or writing the durable sightings.
    State,
    /// The period claim was lost (or could not be checked) before a reclaim.
    Fence,
    /// The chokepoint refused a reclaim on its fresh read.
    Refused,
}

impl Stage {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::List => "list",
            Self::LiveTokens => "live_tokens",
            Self::Reconfirm => "reconfirm",
            Self::Reclaim => "reclaim",
            Self::Claim => "claim",
            Self::State => "state",
            Self::Fence => "fence",
            Self::Refused => "refused",
        }
    }
}

/// How a tick ended. Closed: it labels the tick counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, strum::VariantArray)]
#[non_exhaustive]
pub enum TickOutcome {
    /// The tick ran to the end.
    Completed,
    /// A stage failed: zero candidates.
    Failed,
    /// The period was already claimed (another replica, or an earlier run).
    Skipped,
}

impl TickOutcome {
    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct OutcomeLabels {
    outcome: TickOutcome,
}

impl EncodeLabelSet for OutcomeLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("outcome", self.outcome.as_str()).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct BlockerLabels {
    blocker: Blocker,
}

impl EncodeLabelSet for BlockerLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("blocker", self.blocker.as_str()).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct KindLabels {
    kind: OrphanKind,
}

impl EncodeLabelSet for KindLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("kind", self.kind.as_str()).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct StageLabels {
    stage: Stage,
}

impl EncodeLabelSet for StageLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("stage", self.stage.as_str()).encode(encoder.encode_label())
    }
}

/// The sweep's metrics. Cheap to clone (shared atomics).
#[derive(Clone, Debug, Default)]
pub struct SweepMetrics {
    candidates_total: Family<KindLabels, Counter>,
    candidates_current: Family<KindLabels, Gauge>,
    reclaimed: Family<KindLabels, Counter>,
    aborted_by_cap: Counter,
    errors: Family<StageLabels, Counter>,
    last_success: Gauge<f64, AtomicU64>,
    ticks: Family<OutcomeLabels, Counter>,
    blocked_current: Family<BlockerLabels, Gauge>,
    enabled: Gauge,
    armed: Gauge,
}

impl SweepMetrics {
    /// Creates the metrics, registers them, and primes every label value at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "instant_orphan_db_sweep_candidates",
            "New orphan candidate sightings: one per object when it becomes a candidate (again \
             only after a period without it); a standing backlog is not re-counted per tick",
            metrics.candidates_total.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_candidates_current",
            "Orphan candidates seen by this replica's most recent completed tick; 0 after a \
             failed or skipped tick (another replica ran the period), so max by (kind) across \
             replicas is the backlog",
            metrics.candidates_current.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_blocked_current",
            "Candidates of the most recent completed tick by what keeps them from being \
             reclaimed (foreign_installation, unowned, protected, burn_in, cap, breaker, ...)",
            metrics.blocked_current.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_ticks",
            "Ticks by outcome: completed, failed (zero candidates), skipped (period already claimed)",
            metrics.ticks.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_enabled",
            "1 when ORPHAN_DB_SWEEP_ENABLED is on (with 0, a _current of 0 means nothing)",
            metrics.enabled.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_armed",
            "1 when the reclaim arm is armed (both gates on and a reclaimer wired)",
            metrics.armed.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_reclaimed",
            "Orphans reclaimed through the audited deprovision chokepoint",
            metrics.reclaimed.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_aborted_by_cap",
            "Ticks whose reclaims were all aborted by the blast-radius cap",
            metrics.aborted_by_cap.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_errors",
            "Tick failures by stage (a failed list or liveness read yields zero candidates)",
            metrics.errors.clone(),
        );
        registry.register(
            "instant_orphan_db_sweep_last_success_timestamp_seconds",
            "Unix time of the last tick that completed",
            metrics.last_success.clone(),
        );
        for &kind in OrphanKind::ALL {
            let _ = metrics.candidates_total.get_or_create(&KindLabels { kind });
            let _ = metrics
                .candidates_current
                .get_or_create(&KindLabels { kind });
            let _ = metrics.reclaimed.get_or_create(&KindLabels { kind });
        }
        for &stage in <Stage as strum::VariantArray>::VARIANTS {
            let _ = metrics.errors.get_or_create(&StageLabels { stage });
        }
        for &outcome in <TickOutcome as strum::VariantArray>::VARIANTS {
            let _ = metrics.ticks.get_or_create(&OutcomeLabels { outcome });
        }
        for &blocker in Blocker::ALL {
            let _ = metrics
                .blocked_current
                .get_or_create(&BlockerLabels { blocker });
        }
        metrics
    }

    /// `counts`: per kind, the candidates of this tick and how many of them are new sightings.
    pub(crate) fn candidates(&self, counts: &[(OrphanKind, u64, u64)]) {
        for &(kind, current, new) in counts {
            self.candidates_total
                .get_or_create(&KindLabels { kind })
                .inc_by(new);
            self.candidates_current
                .get_or_create(&KindLabels { kind })
                .set(i64::try_from(current).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn blocked(&self, counts: &[(Blocker, u64)]) {
        for &(blocker, n) in counts {
            self.blocked_current
                .get_or_create(&BlockerLabels { blocker })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// After a failed or skipped tick this replica knows no current backlog.
    pub(crate) fn clear_current(&self) {
        for &kind in OrphanKind::ALL {
            self.candidates_current
                .get_or_create(&KindLabels { kind })
                .set(0);
        }
        for &blocker in Blocker::ALL {
            self.blocked_current
                .get_or_create(&BlockerLabels { blocker })
                .set(0);
        }
    }

    pub(crate) fn tick(&self, outcome: TickOutcome) {
        self.ticks.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub(crate) fn gates(&self, enabled: bool, armed: bool) {
        self.enabled.set(i64::from(enabled));
        self.armed.set(i64::from(armed));
    }

    /// Ticks so far that ended with `outcome`.
    pub fn ticks(&self, outcome: TickOutcome) -> u64 {
        self.ticks.get_or_create(&OutcomeLabels { outcome }).get()
    }

    /// Candidates of the last completed tick held back by `blocker`.
    pub fn blocked_now(&self, blocker: Blocker) -> i64 {
        self.blocked_current
            .get_or_create(&BlockerLabels { blocker })
            .get()
    }

    pub(crate) fn reclaimed(&self, kind: OrphanKind) {
        self.reclaimed.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn aborted_by_cap(&self) {
        self.aborted_by_cap.inc();
    }

    pub(crate) fn error(&self, stage: Stage) {
        self.errors.get_or_create(&StageLabels { stage }).inc();
    }

    pub(crate) fn succeeded(&self, unix_seconds: f64) {
        self.last_success.set(unix_seconds);
    }

    /// Candidates seen by the last tick, for `kind`.
    pub fn current(&self, kind: OrphanKind) -> i64 {
        self.candidates_current
            .get_or_create(&KindLabels { kind })
            .get()
    }

    /// New candidate sightings so far, for `kind`.
    pub fn total(&self, kind: OrphanKind) -> u64 {
        self.candidates_total
            .get_or_create(&KindLabels { kind })
            .get()
    }

    /// Errors so far at `stage`.
    pub fn errors(&self, stage: Stage) -> u64 {
        self.errors.get_or_create(&StageLabels { stage }).get()
    }

    /// Reclaims so far, for `kind`.
    pub fn reclaims(&self, kind: OrphanKind) -> u64 {
        self.reclaimed.get_or_create(&KindLabels { kind }).get()
    }

    /// Ticks aborted by the cap so far.
    pub fn aborts(&self) -> u64 {
        self.aborted_by_cap.get()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn both_candidate_families_are_primed_at_zero_for_every_kind() {
        let mut registry = Registry::default();
        let _metrics = SweepMetrics::register(&mut registry);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for &kind in OrphanKind::ALL {
            for family in [
                "instant_orphan_db_sweep_candidates_total",
                "instant_orphan_db_sweep_candidates_current",
            ] {
                let line = format!("{family}{{kind=\"{}\"}} 0", kind.as_str());
                assert!(text.contains(&line), "missing {line}\n{text}");
            }
        }
        assert!(text.contains("instant_orphan_db_sweep_errors_total{stage=\"list\"} 0"));
    }
}
