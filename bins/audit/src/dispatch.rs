//! `keel-audit dispatch`: the customer-notification dispatcher's loop and metrics.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use keel_audit::notify::{
    Attempt, DeliveryOutcome, NotifyKey, RetryPolicy, backlog, deliver_due, ingest, try_lock,
};
use keel_service::shutdown::CancellationToken;
use prometheus_client::encoding::{EncodeLabel as _, EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use crate::webhook::HttpWebhook;

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
#[derive(Clone, Default)]
pub struct Metrics {
    delivered: Family<TemplateLabels, Counter>,
    failed: Family<FailureLabels, Counter>,
    dead_lettered: Family<TemplateLabels, Counter>,
    unreadable: Counter,
    pending: Gauge,
    dead: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    errors: Counter,
}

impl Metrics {
    /// Registers every metric, with each template primed at zero.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        for &kind in keel_audit::notify::DISPATCHED_KINDS {
            if let keel_audit::Consumer::CustomerNotification { template } = kind.consumer() {
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

    fn count(&self, attempt: &Attempt) {
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
                        class: class.as_str(),
                    })
                    .inc();
            }
            DeliveryOutcome::DeadLettered(class) => {
                self.failed
                    .get_or_create(&FailureLabels {
                        template: attempt.template.clone(),
                        class: class.as_str(),
                    })
                    .inc();
                self.dead_lettered.get_or_create(&template).inc();
            }
        }
    }
}

/// The dispatcher's settings.
pub struct Dispatcher {
    /// The webhook.
    pub webhook: HttpWebhook,
    /// The signing key.
    pub key: NotifyKey,
    /// Retries and dead-lettering.
    pub policy: RetryPolicy,
    /// Rows per ingest and per delivery pass.
    pub batch: u32,
    /// Pause between passes when nothing is due.
    pub poll: Duration,
    /// Deliver what is due, then exit.
    pub once: bool,
}

enum Pass {
    Busy,
    Idle,
}

impl Dispatcher {
    /// Runs until `shutdown` (or, with `once`, until nothing is due). Single-flight: a replica
    /// that cannot take the lock stands by and retries.
    pub async fn run(
        &self,
        pool: &PgPool,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            match self.hold_lock_and_dispatch(pool, metrics, shutdown).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if self.once => return Err(e),
                Err(e) => {
                    metrics.errors.inc();
                    tracing::warn!(
                        error = keel_service::error_chain(&e),
                        "dispatch pass failed; reconnecting"
                    );
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(self.poll) => {}
            }
        }
    }

    /// `Ok(true)` when done (shutdown, or `once` and nothing left), `Ok(false)` when another
    /// dispatcher holds the lock.
    async fn hold_lock_and_dispatch(
        &self,
        pool: &PgPool,
        metrics: &Metrics,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<bool> {
        // A connection of its own, never returned to the pool: the session lock lives and dies
        // with it (a SIGKILL closes it, and the next replica takes over).
        let mut conn = pool.acquire().await.context("could not connect")?.detach();
        if !try_lock(&mut conn).await? {
            if self.once {
                tracing::info!("another dispatcher holds the lock; nothing to do");
                return Ok(true);
            }
            tracing::debug!("another dispatcher holds the lock; standing by");
            return Ok(false);
        }
        tracing::info!("dispatching customer notifications");
        loop {
            let pass = self.pass(&mut conn, metrics).await?;
            match pass {
                Pass::Busy => {
                    if shutdown.is_cancelled() {
                        return Ok(true);
                    }
                }
                Pass::Idle if self.once => return Ok(true),
                Pass::Idle => {
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(true),
                        () = tokio::time::sleep(self.poll) => {}
                    }
                }
            }
        }
    }

    async fn pass(&self, conn: &mut sqlx::PgConnection, metrics: &Metrics) -> anyhow::Result<Pass> {
        let mut busy = false;
        let ingested = ingest(conn, self.batch).await?;
        metrics.unreadable.inc_by(ingested.unreadable);
        if ingested.read > 0 {
            busy = true;
            tracing::debug!(
                read = ingested.read,
                queued = ingested.queued,
                "took audit rows from the trail"
            );
        }
        let attempts =
            deliver_due(conn, &self.webhook, &self.key, &self.policy, self.batch).await?;
        for attempt in &attempts {
            metrics.count(attempt);
            match attempt.outcome {
                DeliveryOutcome::Delivered => {
                    tracing::debug!(event_id = %attempt.event_id, template = %attempt.template, "delivered");
                }
                DeliveryOutcome::Retrying(class) => {
                    tracing::info!(event_id = %attempt.event_id, template = %attempt.template, class = class.as_str(), "delivery failed; will retry");
                }
                DeliveryOutcome::DeadLettered(class) => {
                    tracing::error!(event_id = %attempt.event_id, template = %attempt.template, class = class.as_str(), "notification dead-lettered");
                }
            }
        }
        busy |= !attempts.is_empty();
        let left = backlog(conn).await?;
        metrics.pending.set(left.pending);
        metrics.dead.set(left.dead);
        metrics.lag_seconds.set(left.lag_seconds);
        Ok(if busy { Pass::Busy } else { Pass::Idle })
    }
}

/// Shared registry for `/metrics`.
pub fn registry() -> (Arc<Registry>, Metrics) {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    (Arc::new(registry), metrics)
}
