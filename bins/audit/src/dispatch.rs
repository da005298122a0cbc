//! `keel-audit dispatch`: the customer-notification dispatcher's loop and metrics.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_audit::notify::{
    DeliveryOutcome, NotifyKey, RetryPolicy, backlog, deliver_due_each, ingest, lock_is_shared,
    try_lock,
};
use keel_audit::notify_metrics::NotifyMetrics as Metrics;
use keel_service::shutdown::CancellationToken;
use prometheus_client::registry::Registry;
use sqlx::PgPool;

use crate::webhook::HttpWebhook;

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

/// The dispatcher reaches the database through a transaction-pooling proxy, where its
/// single-flight lock cannot keep a second dispatcher out: it refuses to run.
#[derive(Debug, thiserror::Error)]
#[error(
    "the database connection goes through a transaction-pooling proxy (PgBouncer \
     pool_mode = transaction): the dispatcher's lock would not keep a second dispatcher out, and \
     both would post every notification. Give the dispatcher a direct connection to PostgreSQL, \
     or a session-mode pool (pool_mode = session), in DATABASE_URL"
)]
pub struct BehindTransactionPooler;

enum Pass {
    Busy,
    Idle,
    /// The receiver asked for no request before this wait has passed.
    Throttled(Duration),
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
                Err(e) if self.once || e.is::<BehindTransactionPooler>() => return Err(e),
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
        if lock_is_shared(&pool.connect_options()).await? {
            return Err(BehindTransactionPooler.into());
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
                Pass::Idle | Pass::Throttled(_) if self.once => return Ok(true),
                Pass::Idle => {
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(true),
                        () = tokio::time::sleep(self.poll) => {}
                    }
                }
                // What is still due waits with it: nothing is posted before the wait is over.
                Pass::Throttled(wait) => {
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(true),
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn pass(&self, conn: &mut sqlx::PgConnection, metrics: &Metrics) -> anyhow::Result<Pass> {
        let mut busy = false;
        let ingested = ingest(conn, self.batch).await?;
        metrics.ingested(&ingested);
        if ingested.unreadable > 0 {
            tracing::warn!(
                unreadable = ingested.unreadable,
                first_audit_id = ingested.first_unreadable,
                "skipped audit rows this build cannot read (a kind from a newer release, or a row \
                 written outside Keel); a customer notification among them is not queued"
            );
        }
        if ingested.read > 0 {
            busy = true;
            tracing::debug!(
                read = ingested.read,
                queued = ingested.queued,
                "took audit rows from the trail"
            );
        }
        // Each attempt is counted and logged as soon as it is recorded: an error recording a
        // later one (the connection lost mid-batch) must not lose a dead letter's alert, since
        // a recorded dead letter is never due again.
        let mut attempted = false;
        let mut throttled = None;
        deliver_due_each(
            conn,
            &self.webhook,
            &self.key,
            &self.policy,
            self.batch,
            |attempt| {
                attempted = true;
                throttled = throttled.max(attempt.retry_after);
                metrics.count(&attempt);
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
            },
        )
        .await?;
        busy |= attempted;
        let left = backlog(conn).await?;
        metrics.backlog(&left);
        Ok(match (throttled, busy) {
            (Some(wait), _) => {
                tracing::warn!(
                    wait_seconds = wait.as_secs(),
                    "the receiver asked for a pause (Retry-After); nothing is posted until it is over"
                );
                Pass::Throttled(wait)
            }
            (None, true) => Pass::Busy,
            (None, false) => Pass::Idle,
        })
    }
}

/// Shared registry for `/metrics`.
pub fn registry() -> (Arc<Registry>, Metrics) {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    (Arc::new(registry), metrics)
}
