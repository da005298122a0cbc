//! Prometheus metrics of the notification dispatcher (feature `metrics`): registered by
//! `keel-audit dispatch`, and by the checks that the alert rules name only exported series.
//! Every label value comes from a closed set (templates from [`crate::AuditKind::consumer`], failure
//! classes from [`FailureClass`]).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::kind::Consumer;
use crate::notify::{Attempt, Backlog, DISPATCHED_KINDS, DeliveryOutcome, FailureClass, Ingested};

/// Labels `{template}` (the templates are the closed set `AuditKind::consumer` declares).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct TemplateLabels {
    template: String,
}

impl EncodeLabelSet for TemplateLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("template", self.template.as_str()).encode(encoder.encode_label())
    }
}

/// Labels `{template, class}` (`class` from `FailureClass`).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct FailureLabels {
    template: String,
    class: &'static str,
}

impl EncodeLabelSet for FailureLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("template", self.template.as_str()).encode(encoder.encode_label())?;
        ("class", self.class).encode(encoder.encode_label())
    }
}

/// The dispatcher's metrics.
#[derive(Clone, Debug, Default)]
pub struct NotifyMetrics {
    delivered: Family<TemplateLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    dead_lettered: Family<TemplateLabels, Counter>,
    unreadable: Counter,
    pending: Gauge,
    dead: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    /// Dispatcher passes that failed on the database.
    pub errors: Counter,
}

impl NotifyMetrics {
    /// Registers every metric, with each template primed at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        for &kind in DISPATCHED_KINDS {
            if let Consumer::CustomerNotification { template } = kind.consumer() {
                let labels = TemplateLabels {
                    template: template.to_owned(),
                };
                drop(metrics.delivered.get_or_create(&labels));
                drop(metrics.dead_lettered.get_or_create(&labels));
            }
        }
        registry.register(
            "keel_audit_notifications_delivered",
            "Customer notifications the webhook accepted (2xx)",
            metrics.delivered.clone(),
        );
        registry.register(
            "keel_audit_notification_failures",
            "Failed delivery attempts, by class (status_4xx, status_5xx, status_other, connect, timeout, io); each retries or dead-letters",
            metrics.failed.clone(),
        );
        registry.register(
            "keel_audit_notifications_dead_lettered",
            "Customer notifications dead-lettered after their last attempt (notification.dead_lettered)",
            metrics.dead_lettered.clone(),
        );
        registry.register(
            "keel_audit_notifications_unreadable",
            "Audit rows the dispatcher skipped because this build does not know their kind",
            metrics.unreadable.clone(),
        );
        registry.register(
            "keel_audit_notifications_pending",
            "Customer notifications queued and not yet delivered",
            metrics.pending.clone(),
        );
        registry.register(
            "keel_audit_notifications_dead",
            "Dead-lettered customer notifications awaiting an operator",
            metrics.dead.clone(),
        );
        registry.register(
            "keel_audit_notification_lag_seconds",
            "Seconds since the oldest undelivered notification's audit row was recorded (0 when none)",
            metrics.lag_seconds.clone(),
        );
        registry.register(
            "keel_audit_notification_errors",
            "Dispatcher passes that failed on the database; the dispatcher reconnects and retries",
            metrics.errors.clone(),
        );
        metrics
    }

    /// Counts one delivery attempt.
    pub fn count(&self, attempt: &Attempt) {
        let template = TemplateLabels {
            template: attempt.template.clone(),
        };
        match attempt.outcome {
            DeliveryOutcome::Delivered => {
                self.delivered.get_or_create(&template).inc();
            }
            DeliveryOutcome::Retrying(class) => {
                self.failed
                    .get_or_create(&FailureLabels {
                        template: attempt.template.clone(),
                        class: FailureClass::as_str(class),
                    })
                    .inc();
            }
            DeliveryOutcome::DeadLettered(class) => {
                self.failed
                    .get_or_create(&FailureLabels {
                        template: attempt.template.clone(),
                        class: FailureClass::as_str(class),
                    })
                    .inc();
                self.dead_lettered.get_or_create(&template).inc();
            }
        }
    }

    /// Counts an ingest pass.
    pub fn ingested(&self, ingested: &Ingested) {
        self.unreadable.inc_by(ingested.unreadable);
    }

    /// Sets the backlog gauges.
    pub fn backlog(&self, backlog: &Backlog) {
        self.pending.set(backlog.pending);
        self.dead.set(backlog.dead);
        self.lag_seconds.set(backlog.lag_seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::AuditKind;

    #[test]
    fn every_template_is_exported_at_zero_before_the_first_delivery() {
        let mut registry = Registry::default();
        NotifyMetrics::register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for &kind in AuditKind::ALL {
            if let Consumer::CustomerNotification { template } = kind.consumer() {
                assert!(
                    text.contains(&format!(
                        "keel_audit_notifications_dead_lettered_total{{template=\"{template}\"}} 0"
                    )),
                    "{text}"
                );
            }
        }
    }
}
