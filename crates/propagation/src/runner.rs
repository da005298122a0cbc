//! The runner (feature `postgres`): claims due propagations in batches, applies them with
//! bounded concurrency, and records every transition with its audit row.

use std::collections::BTreeMap;
use std::ops::AddAssign;
use std::sync::Arc;

use keel_audit::Actor;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::applier::Applier;
use crate::decide::{ClaimDecision, Transition, decide, on_claim};
use crate::metrics::Metrics;
use crate::model::{Propagation, PropagationId};
use crate::outcome::{ApplyError, ApplyOutcome};
use crate::policy::RetryPolicies;
use crate::store::{Completion, PropagationStore, StoreError, WorkerId};

/// How a runner behaves.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// This replica's id, recorded in `claimed_by`.
    pub worker: WorkerId,
    /// Who the audit rows say acted.
    pub actor: Actor,
    /// Rows claimed per batch; also the number of applies in flight at once.
    pub batch_size: u32,
    /// How long a claim is held before another replica may take the row over.
    pub lease: time::Duration,
    /// How long one apply may take before it counts as a failure.
    pub apply_timeout: std::time::Duration,
    /// How often to look for due rows when no notification arrives.
    pub poll_interval: std::time::Duration,
    /// On shutdown, how long in-flight applies may take before their rows are released.
    pub shutdown_grace: std::time::Duration,
    /// Retry budgets and schedules.
    pub policies: RetryPolicies,
}

impl RunnerConfig {
    /// Defaults: batches of 32, 5-minute leases, 60 s apply timeout, 5 s polling, 20 s grace,
    /// the standard retry policy.
    pub fn new(worker: WorkerId) -> Self {
        let actor = Actor::parse(&format!("runner:{}", worker.as_str().to_ascii_lowercase()))
            .unwrap_or_else(|_| Actor::system());
        Self {
            worker,
            actor,
            batch_size: 32,
            lease: time::Duration::minutes(5),
            apply_timeout: std::time::Duration::from_secs(60),
            poll_interval: std::time::Duration::from_secs(5),
            shutdown_grace: std::time::Duration::from_secs(20),
            policies: RetryPolicies::default(),
        }
    }
}

/// A runner configuration that would let two workers apply one row at once.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the lease ({lease_seconds} s) must outlast an apply and the shutdown grace \
     ({apply_timeout_seconds} s + {grace_seconds} s + 10 s margin), or another replica takes rows \
     over while they are still being applied"
)]
pub struct LeaseTooShort {
    /// The configured lease.
    pub lease_seconds: i64,
    /// The configured apply timeout.
    pub apply_timeout_seconds: u64,
    /// The configured shutdown grace.
    pub grace_seconds: u64,
}

impl RunnerConfig {
    /// Checks that a claim's lease outlasts the longest time a worker can hold it unfinished.
    pub fn check(&self) -> Result<(), LeaseTooShort> {
        let needed = self.apply_timeout + self.shutdown_grace + std::time::Duration::from_secs(10);
        if self.lease.as_seconds_f64() > needed.as_secs_f64() {
            Ok(())
        } else {
            Err(LeaseTooShort {
                lease_seconds: self.lease.whole_seconds(),
                apply_timeout_seconds: self.apply_timeout.as_secs(),
                grace_seconds: self.shutdown_grace.as_secs(),
            })
        }
    }
}

/// What one or more batches did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Marked applied (including legitimate skips).
    pub applied: usize,
    /// Scheduled to retry after an error.
    pub retried: usize,
    /// Scheduled to retry after an unexpected skip.
    pub unexpected_skips: usize,
    /// Dead-lettered.
    pub dead_lettered: usize,
    /// Refused by the fence (another worker had the row).
    pub stale: usize,
    /// Given back unattempted at shutdown.
    pub released: usize,
}

impl AddAssign for BatchReport {
    fn add_assign(&mut self, other: Self) {
        self.claimed += other.claimed;
        self.applied += other.applied;
        self.retried += other.retried;
        self.unexpected_skips += other.unexpected_skips;
        self.dead_lettered += other.dead_lettered;
        self.stale += other.stale;
        self.released += other.released;
    }
}

/// Claims, applies and records propagations.
#[derive(Debug)]
pub struct Runner<S, A> {
    store: Arc<S>,
    applier: Arc<A>,
    metrics: Metrics,
    config: RunnerConfig,
}

type Attempt = (
    Propagation,
    Result<ApplyOutcome, ApplyError>,
    std::time::Duration,
);

impl<S, A> Runner<S, A>
where
    S: PropagationStore + 'static,
    A: Applier + 'static,
{
    /// A runner over `store`, applying with `applier`. Check the configuration first with
    /// [`RunnerConfig::check`].
    pub fn new(store: Arc<S>, applier: Arc<A>, metrics: Metrics, config: RunnerConfig) -> Self {
        Self {
            store,
            applier,
            metrics,
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// Claims one batch due at `now`, applies it, and records the outcomes.
    ///
    /// If `shutdown` fires meanwhile, in-flight applies get `shutdown_grace` to finish; rows
    /// still unfinished then are released unattempted.
    pub async fn run_batch(
        &self,
        now: OffsetDateTime,
        shutdown: &CancellationToken,
    ) -> Result<BatchReport, StoreError> {
        let attempted = self.attempt(now, shutdown).await?;
        self.recorder().record(attempted).await
    }

    fn recorder(&self) -> Recorder<S> {
        Recorder {
            store: Arc::clone(&self.store),
            metrics: self.metrics.clone(),
            worker: self.config.worker.clone(),
            actor: self.config.actor.clone(),
        }
    }

    /// Claims and applies one batch; its outcomes still need recording.
    async fn attempt(
        &self,
        now: OffsetDateTime,
        shutdown: &CancellationToken,
    ) -> Result<Attempted, StoreError> {
        let config = &self.config;
        let claimed = self
            .store
            .claim(&config.worker, config.batch_size, config.lease, now)
            .await?;
        let mut report = BatchReport {
            claimed: claimed.len(),
            ..BatchReport::default()
        };
        let mut completions = Vec::with_capacity(claimed.len());
        let mut in_flight: BTreeMap<tokio::task::Id, Propagation> = BTreeMap::new();
        let mut tasks: JoinSet<Attempt> = JoinSet::new();
        for propagation in claimed {
            match on_claim(
                propagation.attempt,
                config.policies.for_kind(propagation.kind()),
            ) {
                ClaimDecision::Settle(transition) => completions.push(Completion {
                    propagation,
                    transition,
                }),
                ClaimDecision::Apply => {
                    let applier = Arc::clone(&self.applier);
                    let timeout = config.apply_timeout;
                    let attempt = propagation.clone();
                    let handle = tasks.spawn(async move {
                        let started = Instant::now();
                        let outcome =
                            match tokio::time::timeout(timeout, applier.apply(&attempt)).await {
                                Ok(outcome) => outcome,
                                Err(_) => Err(ApplyError::new(format!(
                                    "the applier timed out after {} s",
                                    timeout.as_secs_f64()
                                ))),
                            };
                        (attempt, outcome, started.elapsed())
                    });
                    in_flight.insert(handle.id(), propagation);
                }
            }
        }

        let mut deadline: Option<Instant> = None;
        while !tasks.is_empty() {
            let grace_over = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = tasks.join_next_with_id() => {
                    let (propagation, outcome) = match joined {
                        Some(Ok((id, (propagation, outcome, took)))) => {
                            in_flight.remove(&id);
                            self.metrics.observe_apply(&propagation, took.as_secs_f64());
                            (propagation, outcome)
                        }
                        Some(Err(failed)) => {
                            let Some(propagation) = in_flight.remove(&failed.id()) else { continue };
                            (propagation, Err(ApplyError::new("the applier panicked")))
                        }
                        None => break,
                    };
                    let policy = config.policies.for_kind(propagation.kind());
                    let transition = decide(propagation.attempt, &outcome, policy, now);
                    completions.push(Completion { propagation, transition });
                }
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(Instant::now() + config.shutdown_grace);
                }
                _ = grace_over => {
                    tasks.abort_all();
                    break;
                }
            }
        }

        if !in_flight.is_empty() {
            let unfinished: Vec<Propagation> = in_flight.into_values().collect();
            match self.store.release(&config.worker, &unfinished, now).await {
                Ok(released) => {
                    report.released = usize::try_from(released).unwrap_or(usize::MAX);
                    tracing::warn!(
                        released = report.released,
                        "shutdown: released unfinished propagations"
                    );
                }
                // Not fatal: the finished attempts of this batch must still be recorded, and the
                // unreleased rows come back when their lease expires.
                Err(e) => tracing::error!(
                    error = %e,
                    unfinished = unfinished.len(),
                    "could not release unfinished propagations; they are retried after their lease"
                ),
            }
        }

        Ok(Attempted {
            now,
            completions,
            report,
        })
    }

    /// Runs batches until nothing is due (the `--once` mode), or until `shutdown`.
    ///
    /// Pipelined: the next batch is claimed and applied while the previous batch's outcomes are
    /// being recorded on another connection. The fences make this safe: a batch's rows stay
    /// leased to this worker until its recording commits, so the next claim takes other rows.
    pub async fn drain(&self, shutdown: &CancellationToken) -> Result<BatchReport, StoreError> {
        let mut total = BatchReport::default();
        let mut recording: Option<tokio::task::JoinHandle<Result<BatchReport, StoreError>>> = None;
        let mut failure: Option<StoreError> = None;
        while !shutdown.is_cancelled() && failure.is_none() {
            let attempted = match self.attempt(OffsetDateTime::now_utc(), shutdown).await {
                Ok(attempted) => attempted,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            // Start recording this batch before looking at the previous one's result, so an
            // error there never drops work that is already done.
            let previous = recording.take();
            let claimed = attempted.report.claimed;
            if claimed > 0 {
                let recorder = self.recorder();
                recording = Some(tokio::spawn(
                    async move { recorder.record(attempted).await },
                ));
            }
            if let Some(previous) = previous {
                match join_recording(previous).await {
                    Ok(report) => total += report,
                    Err(e) => failure = Some(e),
                }
            }
            if claimed == 0 {
                break;
            }
        }
        // Always wait for the last recording: exiting would cut its commit short.
        if let Some(last) = recording.take() {
            match join_recording(last).await {
                Ok(report) => total += report,
                Err(e) => {
                    if let Some(earlier) = failure.replace(e) {
                        tracing::error!(error = %earlier, "recording a propagation batch failed");
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }

    /// Runs until `shutdown`: a batch whenever `wake` is notified or `poll_interval` passes,
    /// and straight away again while full batches keep coming (pipelined as in [`Runner::drain`]).
    /// Store errors are logged and retried on the next poll; they never stop the runner.
    pub async fn run(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut recording: Option<tokio::task::JoinHandle<Result<BatchReport, StoreError>>> = None;
        while !shutdown.is_cancelled() {
            let full = match self.attempt(OffsetDateTime::now_utc(), &shutdown).await {
                Ok(attempted) => {
                    let full = attempted.report.claimed as u64 >= u64::from(self.config.batch_size);
                    if let Some(previous) = recording.take()
                        && let Err(e) = join_recording(previous).await
                    {
                        tracing::error!(error = %e, "recording a propagation batch failed; its rows are retried after their lease");
                    }
                    if attempted.report.claimed > 0 {
                        let recorder = self.recorder();
                        recording = Some(tokio::spawn(
                            async move { recorder.record(attempted).await },
                        ));
                    }
                    full
                }
                Err(e) => {
                    tracing::error!(error = %e, "claiming propagations failed; retrying on the next poll");
                    false
                }
            };
            if full {
                continue;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        if let Some(previous) = recording.take()
            && let Err(e) = join_recording(previous).await
        {
            tracing::error!(error = %e, "recording the last propagation batch failed; its rows are retried after their lease");
        }
    }
}

/// A batch whose applies are done and whose outcomes are not recorded yet.
struct Attempted {
    now: OffsetDateTime,
    completions: Vec<Completion>,
    report: BatchReport,
}

/// Records attempted batches. It owns what it needs, so a recording can run while the next batch
/// is being claimed and applied.
struct Recorder<S> {
    store: Arc<S>,
    metrics: Metrics,
    worker: WorkerId,
    actor: Actor,
}

impl<S: PropagationStore> Recorder<S> {
    async fn record(&self, attempted: Attempted) -> Result<BatchReport, StoreError> {
        let Attempted {
            now,
            completions,
            mut report,
        } = attempted;
        let recorded = self
            .store
            .complete(&self.worker, &completions, &self.actor, now)
            .await?;
        let stale: std::collections::BTreeSet<PropagationId> =
            recorded.stale.iter().copied().collect();
        for completion in &completions {
            let propagation = &completion.propagation;
            if stale.contains(&propagation.id) {
                report.stale += 1;
                self.metrics.stale_completion(propagation.kind());
                tracing::info!(propagation_id = %propagation.id, "another worker owns this propagation now; result discarded");
                continue;
            }
            self.metrics.record(propagation, &completion.transition);
            log_transition(propagation, &completion.transition);
            match &completion.transition {
                Transition::Applied { .. } => report.applied += 1,
                Transition::Retry { .. }
                    if completion.transition.audit_kind()
                        == keel_audit::AuditKind::PropagationUnexpectedSkip =>
                {
                    report.unexpected_skips += 1
                }
                Transition::Retry { .. } => report.retried += 1,
                Transition::DeadLetter { .. } => report.dead_lettered += 1,
            }
        }
        Ok(report)
    }
}

async fn join_recording(
    handle: tokio::task::JoinHandle<Result<BatchReport, StoreError>>,
) -> Result<BatchReport, StoreError> {
    handle.await.unwrap_or_else(|e| {
        Err(StoreError::Database {
            operation: "record a batch (the recording task failed)",
            source: Box::new(e),
        })
    })
}

fn log_transition(propagation: &Propagation, transition: &Transition) {
    let (id, kind, resource) = (
        propagation.id,
        propagation.kind().as_str(),
        propagation.resource_id,
    );
    match transition {
        Transition::Applied { skipped } => tracing::info!(
            propagation_id = %id, kind, resource_id = %resource, attempt = propagation.attempt,
            skipped = skipped.map(|s| s.as_str()), "propagation applied"
        ),
        Transition::Retry {
            cause,
            next_attempt_at,
        } => tracing::warn!(
            propagation_id = %id, kind, resource_id = %resource, attempt = propagation.attempt,
            reason_bucket = cause.bucket().as_str(), next_attempt_at = %next_attempt_at,
            audit_kind = transition.audit_kind().as_str(), "propagation not applied; will retry"
        ),
        Transition::DeadLetter { cause } => tracing::error!(
            propagation_id = %id, kind, resource_id = %resource, attempt = propagation.attempt,
            reason_bucket = cause.bucket().as_str(), "propagation dead-lettered"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_shorter_than_an_apply_is_refused() {
        let mut config = RunnerConfig::new(WorkerId::parse("w").unwrap());
        assert_eq!(config.check(), Ok(()), "the defaults must be consistent");
        config.lease = time::Duration::seconds(30);
        let err = config.check().unwrap_err();
        assert_eq!(
            (
                err.lease_seconds,
                err.apply_timeout_seconds,
                err.grace_seconds
            ),
            (30, 60, 20)
        );
        config.apply_timeout = std::time::Duration::from_secs(5);
        config.shutdown_grace = std::time::Duration::from_secs(5);
        assert_eq!(config.check(), Ok(()));
    }
}
