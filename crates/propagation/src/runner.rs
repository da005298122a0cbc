//! The runner (feature `postgres`): claims due propagations in batches, applies them with
//! bounded concurrency, and records every transition with its audit row.

use std::collections::BTreeMap;
use std::ops::AddAssign;
use std::sync::Arc;

use keel_audit::Actor;
use time::OffsetDateTime;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The wake-up [`Runner::run`] waits on (tokio 1's `Notify`), re-exported so an embedding
/// service needs no direct dependency to call it.
pub use tokio::sync::Notify;
/// The shutdown signal [`Runner::run`] and [`Runner::run_batch`] take (tokio-util 0.7's
/// `CancellationToken`), re-exported so an embedding service needs no direct dependency.
pub use tokio_util::sync::CancellationToken;

use crate::applier::Applier;
use crate::decide::{ClaimDecision, Transition, decide_attempt, on_claim, precheck};
use crate::metrics::Metrics;
use crate::model::{Propagation, PropagationId};
use crate::outcome::{ApplyError, ApplyOutcome};
use crate::policy::RetryPolicies;
use crate::store::{Completion, PropagationStore, StoreError, WorkerId};

/// How a runner behaves. Every timeout and lease is a [`std::time::Duration`].
///
/// Built by [`RunnerConfig::new`] and adjusted field by field; [`Runner::new`] refuses one that
/// [`RunnerConfig::check`] rejects.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RunnerConfig {
    /// This replica's id, recorded in `claimed_by`.
    pub worker: WorkerId,
    /// Who the audit rows say acted.
    pub actor: Actor,
    /// Rows claimed per batch; also the number of applies in flight at once.
    pub batch_size: u32,
    /// How long a claim is held before another replica may take the row over.
    pub lease: std::time::Duration,
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
            lease: std::time::Duration::from_secs(5 * 60),
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
#[non_exhaustive]
pub struct LeaseTooShort {
    /// The configured lease.
    pub lease_seconds: u64,
    /// The configured apply timeout.
    pub apply_timeout_seconds: u64,
    /// The configured shutdown grace.
    pub grace_seconds: u64,
}

/// A runner configuration whose lease is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The lease would not outlast an apply.
    #[error(transparent)]
    TooShort(#[from] LeaseTooShort),
    /// The lease is longer than any claim holds ([`MAX_LEASE`](crate::MAX_LEASE)).
    #[error(
        "the lease ({lease_seconds} s) is longer than a claim holds ({max_seconds} s): a row \
         whose worker vanished would wait that long"
    )]
    TooLong {
        /// The configured lease.
        lease_seconds: u64,
        /// The longest lease a claim holds.
        max_seconds: u64,
    },
}

impl RunnerConfig {
    /// Checks that a claim's lease outlasts the longest time a worker can hold it unfinished,
    /// and is no longer than [`MAX_LEASE`](crate::MAX_LEASE).
    pub fn check(&self) -> Result<(), LeaseError> {
        let max = crate::MAX_LEASE.unsigned_abs();
        if self.lease > max {
            return Err(LeaseError::TooLong {
                lease_seconds: self.lease.as_secs(),
                max_seconds: max.as_secs(),
            });
        }
        let needed = self.apply_timeout + self.shutdown_grace + std::time::Duration::from_secs(10);
        if self.lease > needed {
            Ok(())
        } else {
            Err(LeaseError::TooShort(LeaseTooShort {
                lease_seconds: self.lease.as_secs(),
                apply_timeout_seconds: self.apply_timeout.as_secs(),
                grace_seconds: self.shutdown_grace.as_secs(),
            }))
        }
    }
}

/// What one or more batches did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Refused by the fence (another claim had the row, or its target was replaced).
    pub stale: usize,
    /// Given back unattempted at shutdown.
    pub released: usize,
    /// Given back uncharged because the apply never reached its backend.
    pub not_attempted: usize,
    /// Completions that could not be stored (the rows come back after their lease).
    pub unrecorded: usize,
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
        self.not_attempted += other.not_attempted;
        self.unrecorded += other.unrecorded;
    }
}

/// How long the recorder waits for more finished applies before recording a partial batch.
const RECORD_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// How long a row whose apply never reached its backend waits before it is offered again.
pub const NOT_ATTEMPTED_RETRY: time::Duration = time::Duration::seconds(5);

/// Claims, applies and records propagations.
#[derive(Debug)]
pub struct Runner<S, A> {
    store: Arc<S>,
    applier: Arc<A>,
    metrics: Metrics,
    config: RunnerConfig,
}

/// What one apply task produced.
enum Finished {
    /// Record this transition.
    Done(Completion),
    /// The apply never reached its backend: give the row back uncharged.
    NotAttempted(Propagation),
}

/// The shared clock of one claim: the store's time at the claim, and the local monotonic
/// instant it was read at. A completion's time is that plus the monotonic time since, so it
/// is the store's clock (which every replica shares) at the moment the apply finished.
#[derive(Clone, Copy, Debug)]
struct Clock {
    at_claim: OffsetDateTime,
    read_at: Instant,
}

impl Clock {
    fn fixed(now: OffsetDateTime) -> Self {
        Self {
            at_claim: now,
            read_at: Instant::now(),
        }
    }

    fn now(&self, fixed: bool) -> OffsetDateTime {
        if fixed {
            self.at_claim
        } else {
            self.at_claim
                + time::Duration::try_from(self.read_at.elapsed()).unwrap_or(time::Duration::ZERO)
        }
    }
}

/// Runs one claimed propagation: the pre-checks, then the applier under the timeout.
async fn apply_one<A: Applier>(
    applier: &A,
    propagation: &Propagation,
    timeout: std::time::Duration,
) -> Result<ApplyOutcome, ApplyError> {
    if let Some(outcome) = precheck(propagation) {
        return outcome;
    }
    match tokio::time::timeout(timeout, applier.apply(propagation)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(ApplyError::new(format!(
            "the applier timed out after {} s",
            timeout.as_secs_f64()
        ))),
    }
}

impl<S, A> Runner<S, A>
where
    S: PropagationStore + 'static,
    A: Applier + 'static,
{
    /// A runner over `store`, applying with `applier`. Refuses a configuration whose lease
    /// does not outlast an apply, or is longer than a claim holds ([`RunnerConfig::check`]).
    pub fn new(
        store: Arc<S>,
        applier: Arc<A>,
        metrics: Metrics,
        config: RunnerConfig,
    ) -> Result<Self, LeaseError> {
        config.check()?;
        Ok(Self {
            store,
            applier,
            metrics,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// The lease as the store's clock counts it (saturating at the largest lease it can hold).
    fn lease(&self) -> time::Duration {
        time::Duration::try_from(self.config.lease).unwrap_or(time::Duration::MAX)
    }

    /// Claims one batch due at `now`, applies it, and records the outcomes, all at `now` (a
    /// fixed clock, for tests and tools that drive time themselves).
    ///
    /// If `shutdown` fires meanwhile, in-flight applies get `shutdown_grace` to finish; rows
    /// still unfinished then are released unattempted.
    pub async fn run_batch(
        &self,
        now: OffsetDateTime,
        shutdown: &CancellationToken,
    ) -> Result<BatchReport, StoreError> {
        let claimed = match self
            .store
            .claim(
                &self.config.worker,
                self.config.batch_size,
                self.lease(),
                now,
            )
            .await
        {
            Ok(claimed) => {
                self.metrics.claim_succeeded(now);
                claimed
            }
            Err(e) => {
                self.metrics.claim_error();
                return Err(e);
            }
        };
        let mut report = BatchReport {
            claimed: claimed.len(),
            ..BatchReport::default()
        };
        let clock = Clock::fixed(now);
        let mut completions = Vec::with_capacity(claimed.len());
        let mut not_attempted = Vec::new();
        let mut in_flight: BTreeMap<tokio::task::Id, Propagation> = BTreeMap::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        for propagation in claimed {
            match self.start(propagation, clock, true, &mut tasks) {
                Ok((id, propagation)) => {
                    in_flight.insert(id, propagation);
                }
                Err(settled) => completions.push(*settled),
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
                joined = tasks.join_next_with_id() => match joined {
                    Some(Ok((id, finished))) => {
                        in_flight.remove(&id);
                        match finished {
                            Finished::Done(c) => completions.push(c),
                            Finished::NotAttempted(p) => not_attempted.push(p),
                        }
                    }
                    Some(Err(failed)) => {
                        let Some(propagation) = in_flight.remove(&failed.id()) else { continue };
                        completions.push(self.panicked(propagation, clock, true));
                    }
                    None => break,
                },
                _ = shutdown.cancelled(), if deadline.is_none() => {
                    deadline = Some(Instant::now() + config_grace(&self.config));
                }
                _ = grace_over => {
                    tasks.abort_all();
                    break;
                }
            }
        }
        if !not_attempted.is_empty() {
            report.not_attempted += self
                .give_back(&not_attempted, now + NOT_ATTEMPTED_RETRY, now)
                .await;
        }
        if !in_flight.is_empty() {
            let unfinished: Vec<Propagation> = in_flight.into_values().collect();
            report.released += self.give_back(&unfinished, now, now).await;
        }
        let recorded = self.recorder().record(completions, now).await?;
        report += recorded;
        Ok(report)
    }

    /// Starts one claimed propagation: a task applying it, or (past its budget) the
    /// completion that settles it without applying.
    fn start(
        &self,
        propagation: Propagation,
        clock: Clock,
        fixed: bool,
        tasks: &mut JoinSet<Finished>,
    ) -> Result<(tokio::task::Id, Propagation), Box<Completion>> {
        let policy = self.config.policies.for_kind(propagation.kind()).clone();
        match on_claim(propagation.attempt, &policy) {
            ClaimDecision::Settle(transition) => Err(Box::new(Completion {
                propagation,
                transition,
            })),
            ClaimDecision::Apply => {
                let applier = Arc::clone(&self.applier);
                let metrics = self.metrics.clone();
                let timeout = self.config.apply_timeout;
                let attempt = propagation.clone();
                let handle = tasks.spawn(async move {
                    let started = Instant::now();
                    let outcome = apply_one(&*applier, &attempt, timeout).await;
                    metrics.observe_apply(&attempt, started.elapsed().as_secs_f64());
                    if let Err(e) = &outcome
                        && !e.reached_backend
                    {
                        return Finished::NotAttempted(attempt);
                    }
                    let transition = decide_attempt(&attempt, &outcome, &policy, clock.now(fixed));
                    Finished::Done(Completion {
                        propagation: attempt,
                        transition,
                    })
                });
                Ok((handle.id(), propagation))
            }
        }
    }

    fn panicked(&self, propagation: Propagation, clock: Clock, fixed: bool) -> Completion {
        let policy = self.config.policies.for_kind(propagation.kind());
        let transition = decide_attempt(
            &propagation,
            &Err(ApplyError::new("the applier panicked")),
            policy,
            clock.now(fixed),
        );
        Completion {
            propagation,
            transition,
        }
    }

    /// Releases rows unattempted, due at `due_at`; returns how many were released.
    async fn give_back(
        &self,
        propagations: &[Propagation],
        due_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> usize {
        match self
            .store
            .release(&self.config.worker, propagations, due_at, now)
            .await
        {
            Ok(released) => {
                let released = usize::try_from(released).unwrap_or(usize::MAX);
                self.metrics.released(released as u64);
                tracing::info!(released, "gave back propagations unattempted");
                released
            }
            // Not fatal: the rows come back when their lease expires.
            Err(e) => {
                self.metrics.record_error();
                tracing::error!(
                    error = %e,
                    unfinished = propagations.len(),
                    "could not release propagations; they are retried after their lease"
                );
                0
            }
        }
    }

    fn recorder(&self) -> Recorder<S> {
        Recorder {
            store: Arc::clone(&self.store),
            metrics: self.metrics.clone(),
            worker: self.config.worker.clone(),
            actor: self.config.actor.clone(),
        }
    }

    /// Runs until nothing is due (the `--once` mode), or until `shutdown`. Returns the first
    /// store error, after everything already applied has been recorded.
    pub async fn drain(&self, shutdown: &CancellationToken) -> Result<BatchReport, StoreError> {
        self.pump(None, shutdown.clone(), true).await
    }

    /// Runs until `shutdown`, keeping up to `batch_size` applies in flight: whenever a quarter
    /// of the slots (at least one) has freed up, it claims that many more rows at once, so one
    /// slow apply holds only its own slot and never stops new claims, and a burst of fast
    /// applies is refilled in a few claims rather than one per row. Finished applies are
    /// recorded in batches by a separate task as they come in, each batch gathering what
    /// arrives within a couple of milliseconds. Store errors are logged, counted and retried
    /// on the next poll; they never stop the runner.
    pub async fn run(&self, wake: Arc<Notify>, shutdown: CancellationToken) {
        // In this mode errors are counted and logged where they happen.
        let _ = self.pump(Some(wake), shutdown, false).await;
    }

    /// The slot-refilling loop behind [`Runner::run`] and [`Runner::drain`]. With
    /// `until_empty`, it stops once a claim finds nothing and nothing is in flight.
    async fn pump(
        &self,
        wake: Option<Arc<Notify>>,
        shutdown: CancellationToken,
        until_empty: bool,
    ) -> Result<BatchReport, StoreError> {
        let config = &self.config;
        let slots = usize::try_from(config.batch_size).unwrap_or(1).max(1);
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel::<Completion>();
        let recorder = self.recorder();
        let record_batch = slots;
        let recording = tokio::spawn(async move { recorder.run(receiver, record_batch).await });

        let mut report = BatchReport::default();
        let mut failure: Option<StoreError> = None;
        let mut in_flight: BTreeMap<tokio::task::Id, Propagation> = BTreeMap::new();
        let mut tasks: JoinSet<Finished> = JoinSet::new();
        let mut clock = Clock::fixed(OffsetDateTime::now_utc());
        // `look`: claim at the next chance; `more`: the last claim filled every free slot, so
        // more rows may be due as soon as a slot frees up.
        let mut look = true;
        let mut more = false;
        // Refill once a quarter of the slots are free (or all of them): claiming each slot the
        // moment it frees would turn a burst of fast applies into a claim per row. A slow apply
        // still holds only its own slot.
        let refill = slots.div_ceil(4).max(1);
        while !shutdown.is_cancelled() {
            let free = slots.saturating_sub(tasks.len());
            if look && free >= refill {
                look = false;
                match self.claim_some(free).await {
                    Ok((claimed, at)) => {
                        clock = at;
                        report.claimed += claimed.len();
                        more = claimed.len() == free;
                        let found = !claimed.is_empty();
                        for propagation in claimed {
                            match self.start(propagation, clock, false, &mut tasks) {
                                Ok((id, propagation)) => {
                                    in_flight.insert(id, propagation);
                                }
                                Err(settled) => {
                                    let _ = sender.send(*settled);
                                }
                            }
                        }
                        if until_empty && !found && tasks.is_empty() {
                            break;
                        }
                    }
                    Err(e) => {
                        more = false;
                        if until_empty {
                            failure = Some(e);
                            break;
                        }
                        tracing::error!(error = %e, "claiming propagations failed; retrying on the next poll");
                    }
                }
            }
            let idle = tasks.is_empty();
            let poll = async {
                match &wake {
                    Some(wake) => {
                        tokio::select! {
                            _ = wake.notified() => {}
                            _ = tokio::time::sleep(config.poll_interval) => {}
                        }
                    }
                    // Draining: look again once nothing is in flight.
                    None if idle => {}
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    match joined {
                        Some(Ok((id, finished))) => {
                            in_flight.remove(&id);
                            match finished {
                                Finished::Done(c) => { let _ = sender.send(c); }
                                Finished::NotAttempted(p) => {
                                    let now = clock.now(false);
                                    report.not_attempted += self.give_back(&[p], now + NOT_ATTEMPTED_RETRY, now).await;
                                }
                            }
                        }
                        Some(Err(failed)) => {
                            if let Some(propagation) = in_flight.remove(&failed.id()) {
                                let _ = sender.send(self.panicked(propagation, clock, false));
                            }
                        }
                        None => {}
                    }
                    // A slot is free: refill it at once if more rows may be due.
                    look = look || more;
                }
                _ = poll, if !look => { look = true; }
                _ = shutdown.cancelled() => {}
            }
        }
        // Shutdown (or the end of a drain): in-flight applies get the grace period.
        if !tasks.is_empty() {
            let deadline = Instant::now() + config.shutdown_grace;
            while !tasks.is_empty() {
                tokio::select! {
                    joined = tasks.join_next_with_id() => match joined {
                        Some(Ok((id, finished))) => {
                            in_flight.remove(&id);
                            match finished {
                                Finished::Done(c) => { let _ = sender.send(c); }
                                Finished::NotAttempted(p) => {
                                    let now = clock.now(false);
                                    report.not_attempted += self.give_back(&[p], now, now).await;
                                }
                            }
                        }
                        Some(Err(failed)) => {
                            if let Some(propagation) = in_flight.remove(&failed.id()) {
                                let _ = sender.send(self.panicked(propagation, clock, false));
                            }
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => {
                        tasks.abort_all();
                        break;
                    }
                }
            }
        }
        if !in_flight.is_empty() {
            let unfinished: Vec<Propagation> = in_flight.into_values().collect();
            let now = clock.now(false);
            report.released += self.give_back(&unfinished, now, now).await;
            tracing::warn!(
                released = report.released,
                "shutdown: released unfinished propagations"
            );
        }
        drop(sender);
        match recording.await {
            Ok((recorded, error)) => {
                report += recorded;
                if failure.is_none() {
                    failure = error;
                }
            }
            Err(e) => {
                failure = Some(StoreError::Database {
                    operation: "record propagations (the recording task failed)",
                    source: Box::new(e),
                });
            }
        }
        match failure {
            Some(e) if until_empty => Err(e),
            Some(_) | None => Ok(report),
        }
    }

    /// Claims up to `limit` rows at the store's clock.
    async fn claim_some(&self, limit: usize) -> Result<(Vec<Propagation>, Clock), StoreError> {
        let result = async {
            let now = self.store.now().await?;
            let read_at = Instant::now();
            let limit = u32::try_from(limit).unwrap_or(u32::MAX);
            let claimed = self
                .store
                .claim(&self.config.worker, limit, self.lease(), now)
                .await?;
            Ok((
                claimed,
                Clock {
                    at_claim: now,
                    read_at,
                },
            ))
        }
        .await;
        match &result {
            Ok((_, clock)) => self.metrics.claim_succeeded(clock.at_claim),
            Err(_) => self.metrics.claim_error(),
        }
        result
    }
}

fn config_grace(config: &RunnerConfig) -> std::time::Duration {
    config.shutdown_grace
}

/// Records finished attempts. It owns what it needs, so recording runs beside claiming and
/// applying.
struct Recorder<S> {
    store: Arc<S>,
    metrics: Metrics,
    worker: WorkerId,
    actor: Actor,
}

impl<S: PropagationStore> Recorder<S> {
    /// Records completions as they arrive, up to `batch` at a time, until the channel closes.
    /// Returns what was recorded and the last store error, if any.
    async fn run(
        &self,
        mut receiver: tokio::sync::mpsc::UnboundedReceiver<Completion>,
        batch: usize,
    ) -> (BatchReport, Option<StoreError>) {
        let mut report = BatchReport::default();
        let mut error = None;
        let mut pending: Vec<Completion> = Vec::with_capacity(batch);
        while let Some(first) = receiver.recv().await {
            pending.push(first);
            // Completions of one claim arrive close together: wait a moment for the rest, so
            // one transaction records many rows rather than each a few.
            let linger = Instant::now() + RECORD_LINGER;
            while pending.len() < batch {
                match receiver.try_recv() {
                    Ok(next) => pending.push(next),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(linger, receiver.recv()).await {
                            Ok(Some(next)) => pending.push(next),
                            // Closed, or nothing more came in time: record what is here.
                            Ok(None) | Err(_) => break,
                        }
                    }
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
                }
            }
            let now = match self.store.now().await {
                Ok(now) => now,
                Err(e) => {
                    // Without the shared clock nothing is recorded: a time of this process's
                    // own would stamp the rows and their audit rows out of step with every
                    // other replica. The rows stay claimed and come back after their lease,
                    // as after any recording that fails.
                    self.metrics.record_error();
                    tracing::error!(
                        error = %e,
                        rows = pending.len(),
                        "could not read the store's clock; these completions are not recorded \
                         and their rows are retried after their lease"
                    );
                    pending.clear();
                    error = Some(e);
                    continue;
                }
            };
            match self.record(std::mem::take(&mut pending), now).await {
                Ok(recorded) => report += recorded,
                Err(e) => {
                    tracing::error!(error = %e, "recording propagations failed; their rows are retried after their lease");
                    error = Some(e);
                }
            }
        }
        (report, error)
    }

    async fn record(
        &self,
        completions: Vec<Completion>,
        now: OffsetDateTime,
    ) -> Result<BatchReport, StoreError> {
        let mut report = BatchReport::default();
        if completions.is_empty() {
            return Ok(report);
        }
        let mut recorded = match self
            .store
            .complete(&self.worker, &completions, &self.actor, now)
            .await
        {
            Ok(recorded) => {
                self.metrics.record_succeeded(now);
                recorded
            }
            Err(e) => {
                self.metrics.record_error();
                return Err(e);
            }
        };
        // Rows that could not be stored because of a lock held elsewhere get a second chance
        // once the batch's other rows are safe.
        if !recorded.unrecorded.is_empty() {
            let retry: Vec<Completion> = completions
                .iter()
                .filter(|c| recorded.unrecorded.contains(&c.propagation.id))
                .cloned()
                .collect();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            if let Ok(again) = self
                .store
                .complete(&self.worker, &retry, &self.actor, now)
                .await
            {
                recorded
                    .unrecorded
                    .retain(|id| !again.recorded.contains(id) && !again.stale.contains(id));
                recorded.recorded.extend(again.recorded);
                recorded.stale.extend(again.stale);
            }
        }
        let stale: std::collections::BTreeSet<PropagationId> =
            recorded.stale.iter().copied().collect();
        let unrecorded: std::collections::BTreeSet<PropagationId> =
            recorded.unrecorded.iter().copied().collect();
        for completion in &completions {
            let propagation = &completion.propagation;
            if unrecorded.contains(&propagation.id) {
                report.unrecorded += 1;
                self.metrics.record_error();
                continue;
            }
            if stale.contains(&propagation.id) {
                report.stale += 1;
                self.metrics.stale_completion(propagation.kind());
                tracing::info!(propagation_id = %propagation.id, "another claim owns this propagation now, or its target was replaced; result discarded");
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
        config.lease = std::time::Duration::from_secs(30);
        let LeaseError::TooShort(err) = config.check().unwrap_err() else {
            unreachable!("a 30 s lease is too short, not too long")
        };
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

    /// No configuration asks for a lease longer than a claim holds (`MAX_LEASE`): the claim
    /// would shorten it, and a vanished worker's rows would wait that long.
    #[test]
    fn a_lease_longer_than_a_claim_holds_is_refused() {
        let mut config = RunnerConfig::new(WorkerId::parse("w").unwrap());
        config.lease = crate::MAX_LEASE.unsigned_abs();
        assert_eq!(config.check(), Ok(()), "the longest lease is allowed");
        config.lease += std::time::Duration::from_secs(1);
        assert_eq!(
            config.check(),
            Err(LeaseError::TooLong {
                lease_seconds: 86_401,
                max_seconds: 86_400
            })
        );
    }
}
