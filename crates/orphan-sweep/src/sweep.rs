//! The tick: gates, the period claim, fail-safe detection, durable burn-in, and the gated
//! reclaim arm. The review list says for every candidate whether the armed run would reclaim it
//! and, if not, what blocks it; the audit-only run computes it the same way.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

use crate::detect::{Blocker, Candidate, OrphanKind, classify_all, detect_classified};
use crate::fingerprint::FingerprintKey;
use crate::metrics::{Stage, SweepMetrics, TickOutcome};
use crate::ports::{
    Inventory, LiveTokens, PeriodClaim, ReclaimError, Reclaimed, Reclaimer, Sighting,
    SightingChanges, StateError, SweepState,
};
use crate::state::{advance, burned_in};

/// The sweep's configuration. The defaults are the safe ones: both gates off.
#[derive(Clone, Debug, PartialEq)]
pub struct SweepConfig {
    /// `ORPHAN_DB_SWEEP_ENABLED`: off makes a tick a DEBUG no-op (no list, no read, no metric).
    pub enabled: bool,
    /// `ORPHAN_DB_SWEEP_DESTRUCTIVE_ENABLED`: the reclaim arm; meaningless unless `enabled` is on
    /// and a reclaimer is wired.
    pub destructive: bool,
    /// How old an object must be before it can be a candidate (default 1 h).
    pub grace: Duration,
    /// Tolerated clock skew between the clocks that date objects and the state store's clock:
    /// added to `grace` (default 5 min).
    pub skew: Duration,
    /// The period: one tick per period across replicas (default 1 h).
    pub interval: Duration,
    /// Consecutive periods a candidate must be seen reclaimable in before it may be reclaimed
    /// (default 3).
    pub confirm_ticks: u32,
    /// How long a candidate must have been seen reclaimable, without a break, before it may be
    /// reclaimed (default 2 h).
    pub burn_in: Duration,
    /// Rate limit: most reclaims per tick, the fewest failed reclaims first, then the oldest
    /// (default 5); the rest wait for the next tick, so a backlog drains gradually.
    pub max_reclaims: usize,
    /// Circuit breaker: when the confirmed orphans exceed this fraction of this installation's
    /// inventory (rounded up), nothing is reclaimed that tick (default 0.5).
    pub max_fraction: f64,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            destructive: false,
            grace: Duration::from_secs(3600),
            skew: Duration::from_secs(300),
            interval: Duration::from_secs(3600),
            confirm_ticks: 3,
            burn_in: Duration::from_secs(2 * 3600),
            max_reclaims: 5,
            max_fraction: 0.5,
        }
    }
}

impl SweepConfig {
    /// The circuit breaker's limit for an inventory of `inventory` of this installation's
    /// objects.
    pub fn cap(&self, inventory: usize) -> usize {
        (self.max_fraction.clamp(0.0, 1.0) * inventory as f64).ceil() as usize
    }
}

/// A candidate as the review list shows it: the token masked and fingerprinted, never whole.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CandidateView {
    /// Its kind.
    pub kind: &'static str,
    /// The name with its token masked.
    pub name_masked: String,
    /// The token's keyed fingerprint (none for generic items without a token).
    pub fingerprint: Option<String>,
    /// Age in seconds.
    pub age_seconds: u64,
    /// Protected (by the platform or by its own mark).
    pub protected: bool,
    /// Labelled `managed-by=keel`.
    pub managed: bool,
    /// This installation has a `resources` row for its token.
    pub owned: bool,
    /// Consecutive periods it has been seen reclaimable in.
    pub seen_ticks: u32,
    /// Reclaims of it that failed in its current run before this tick: the rate limit takes
    /// the candidates with the fewest first.
    pub failed_reclaims: u32,
    /// Whether the armed run reclaims it this tick (the same answer in audit-only mode).
    pub would_reclaim: bool,
    /// What keeps it from being reclaimed, when something does.
    pub blocked_by: Option<Blocker>,
    /// What this tick did about it.
    pub action: Action,
}

/// What a tick did about a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Reported only (audit-only mode, or blocked: see `blocked_by`).
    Reported,
    /// Reclaimed through the chokepoint.
    Reclaimed,
    /// Already gone when the chokepoint looked.
    AlreadyGone,
    /// Its token turned live before the reclaim: skipped.
    SkippedLive,
    /// The circuit breaker or the rate limit held it back this tick.
    AbortedByCap,
    /// The chokepoint refused it on its fresh read: quarantined, never attempted again.
    Refused,
    /// Already being deleted when the chokepoint looked: nothing was done.
    Terminating,
    /// Not attempted: the tick was stopped (shutdown, or the period claim was lost).
    Stopped,
    /// The reclaim (or its re-confirmation) failed; it will be seen again.
    Failed,
}

impl Action {
    /// The variant's name as its `Debug` form writes it (`Reported`, `AbortedByCap`, …): what
    /// the per-candidate log line shows, recorded as a string so no formatter runs per line.
    const fn debug_name(self) -> &'static str {
        match self {
            Self::Reported => "Reported",
            Self::Reclaimed => "Reclaimed",
            Self::AlreadyGone => "AlreadyGone",
            Self::SkippedLive => "SkippedLive",
            Self::AbortedByCap => "AbortedByCap",
            Self::Refused => "Refused",
            Self::Terminating => "Terminating",
            Self::Stopped => "Stopped",
            Self::Failed => "Failed",
        }
    }
}

/// What a tick did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TickReport {
    /// The sweep is disabled: nothing was read.
    Disabled,
    /// Another replica (or an earlier run) already claimed this period: nothing was read.
    Skipped {
        /// The period.
        period: Option<i64>,
    },
    /// A stage failed: zero candidates this tick.
    Failed {
        /// The stage.
        stage: &'static str,
    },
    /// The tick completed.
    Swept {
        /// The period it ran for.
        period: i64,
        /// Items in the inventory.
        inventory: usize,
        /// Whether the reclaim arm was armed.
        armed: bool,
        /// The candidates.
        candidates: Vec<CandidateView>,
    },
}

impl TickReport {
    /// Whether the run needs attention (`--once` exits 2): a reclaim failed or was refused, or
    /// the breaker held reclaims back.
    pub fn needs_attention(&self) -> bool {
        match self {
            Self::Swept { candidates, .. } => candidates.iter().any(|c| {
                matches!(c.action, Action::Failed | Action::Refused | Action::Stopped)
                    || c.blocked_by == Some(Blocker::Breaker)
            }),
            Self::Disabled | Self::Skipped { .. } | Self::Failed { .. } => false,
        }
    }
}

/// Runs ticks over an inventory, a standing lookup, durable state and, optionally, a reclaimer.
#[derive(Debug)]
pub struct Sweeper<I, L, R, S> {
    inventory: I,
    live: L,
    reclaimer: Option<R>,
    state: S,
    config: SweepConfig,
    metrics: SweepMetrics,
    key: FingerprintKey,
    stop: Arc<AtomicBool>,
}

/// Writes a candidate's INFO line and returns its entry in the review list. It takes the row:
/// the candidate's backend name becomes the entry's masked name (a digest name without a copy),
/// and the rest of the candidate is freed here.
fn report_candidate(key: &FingerprintKey, row: Row, action: Action, armed: bool) -> CandidateView {
    let Row {
        candidate,
        blocked_by,
        seen_ticks,
        failed_reclaims,
        ..
    } = row;
    // Logs and the review list name a candidate masked, with its keyed fingerprint.
    let fingerprint = candidate
        .backend
        .as_ref()
        .map(|name| key.fingerprint_digest(&crate::detect::digest_of(name)));
    let name_masked = match candidate.backend {
        Some(name) => name.into_masked(),
        None => keel_audit::mask(&candidate.name),
    };
    let would_reclaim = blocked_by.is_none();
    tracing::info!(
        kind = candidate.kind.as_str(),
        name = name_masked.as_str(),
        fingerprint = fingerprint.as_deref().unwrap_or("-"),
        age_seconds = candidate.age.as_secs(),
        protected = candidate.protected,
        owned = candidate.owned,
        seen_ticks,
        failed_reclaims,
        would_reclaim,
        blocked_by = blocked_by.map_or("-", Blocker::as_str),
        action = action.debug_name(),
        armed,
        "orphan candidate"
    );
    CandidateView {
        kind: candidate.kind.as_str(),
        name_masked,
        fingerprint,
        age_seconds: candidate.age.as_secs(),
        protected: candidate.protected,
        managed: candidate.managed,
        owned: candidate.owned,
        seen_ticks,
        failed_reclaims,
        would_reclaim,
        blocked_by,
        action,
    }
}

/// Runs `a` and `b` at once and waits for both (the crate's default build has no runtime).
async fn join<A: Future, B: Future>(a: A, b: B) -> (A::Output, B::Output) {
    let (mut a, mut b) = (std::pin::pin!(a), std::pin::pin!(b));
    let (mut a_out, mut b_out) = (None, None);
    std::future::poll_fn(|cx| {
        if a_out.is_none()
            && let std::task::Poll::Ready(out) = a.as_mut().poll(cx)
        {
            a_out = Some(out);
        }
        if b_out.is_none()
            && let std::task::Poll::Ready(out) = b.as_mut().poll(cx)
        {
            b_out = Some(out);
        }
        match (a_out.take(), b_out.take()) {
            (Some(a), Some(b)) => std::task::Poll::Ready((a, b)),
            (a, b) => {
                (a_out, b_out) = (a, b);
                std::task::Poll::Pending
            }
        }
    })
    .await
}

/// When `period` (whole `interval`s since the Unix epoch) starts.
fn period_start(period: i64, interval: Duration) -> OffsetDateTime {
    let secs = i64::try_from(interval.as_secs().max(1)).unwrap_or(i64::MAX);
    OffsetDateTime::from_unix_timestamp(period.saturating_mul(secs))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Whether a candidate is another installation's or not provably this one's: reported in the
/// review list and in `blocked_current`, but not counted as this installation's orphan backlog
/// (so two installations sharing a cluster do not page each other).
fn not_ours(blocker: Option<Blocker>) -> bool {
    match blocker {
        Some(Blocker::ForeignInstallation | Blocker::Unowned) => true,
        Some(
            Blocker::Generic
            | Blocker::Terminating
            | Blocker::Unmanaged
            | Blocker::Protected
            | Blocker::Quarantined
            | Blocker::BurnIn
            | Blocker::Cap
            | Blocker::Breaker,
        )
        | None => false,
    }
}

/// One candidate's place in a tick; its sighting is at the same index in the tick's list of
/// sightings (kept apart, so that list is written as it is, without a copy).
struct Row {
    candidate: Candidate,
    blocked_by: Option<Blocker>,
    /// Consecutive periods it has been seen reclaimable in (its sighting's count, which a
    /// reclaim does not change).
    seen_ticks: u32,
    /// Reclaims of it that failed in its current run, before this tick.
    failed_reclaims: u32,
    /// A new sighting, of a candidate that counts as this installation's backlog.
    counted_new: bool,
    /// Its sighting only carries the stored one on ([`Sighting::continues`]): a store that
    /// keeps runs need not write it.
    continued: bool,
    /// The store held a sighting under its key.
    had_stored: bool,
}

impl Row {
    /// A candidate not yet weighed against its sighting.
    fn new(candidate: Candidate) -> Self {
        Self {
            candidate,
            blocked_by: None,
            seen_ticks: 0,
            failed_reclaims: 0,
            counted_new: false,
            continued: false,
            had_stored: false,
        }
    }
}

impl<I: Inventory, L: LiveTokens, R: Reclaimer, S: SweepState> Sweeper<I, L, R, S> {
    /// A sweeper. Without a `reclaimer` it can never reclaim, whatever the gates say.
    pub fn new(
        inventory: I,
        live: L,
        reclaimer: Option<R>,
        state: S,
        config: SweepConfig,
        metrics: SweepMetrics,
        key: FingerprintKey,
    ) -> Self {
        let sweeper = Self {
            inventory,
            live,
            reclaimer,
            state,
            config,
            metrics,
            key,
            stop: Arc::new(AtomicBool::new(false)),
        };
        sweeper
            .metrics
            .gates(sweeper.config.enabled, sweeper.armed());
        sweeper
    }

    /// A flag that, once set, stops the current tick before its next reclaim (shutdown).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Whether the reclaim arm is armed: both gates on and a reclaimer wired.
    pub fn armed(&self) -> bool {
        self.config.enabled && self.config.destructive && self.reclaimer.is_some()
    }

    /// The configuration.
    pub fn config(&self) -> &SweepConfig {
        &self.config
    }

    /// The inventory.
    pub fn inventory(&self) -> &I {
        &self.inventory
    }

    /// The standing lookup.
    pub fn live_tokens(&self) -> &L {
        &self.live
    }

    /// The reclaimer.
    pub fn reclaimer(&self) -> Option<&R> {
        self.reclaimer.as_ref()
    }

    /// The durable state.
    pub fn state(&self) -> &S {
        &self.state
    }

    fn fail(&self, stage: Stage, error: &dyn std::error::Error) -> TickReport {
        tracing::warn!(stage = stage.as_str(), error = %error, "orphan sweep tick failed: zero candidates this tick");
        self.metrics.error(stage);
        self.metrics.tick(TickOutcome::Failed);
        self.metrics.clear_current();
        TickReport::Failed {
            stage: stage.as_str(),
        }
    }

    /// One tick at `now` (this host's clock; the state store's clock replaces it once the period
    /// is claimed).
    pub async fn tick(&mut self, now: OffsetDateTime) -> TickReport {
        if !self.config.enabled {
            tracing::debug!("orphan sweep disabled (ORPHAN_DB_SWEEP_ENABLED is off): tick skipped");
            return TickReport::Disabled;
        }
        let source = self.inventory.source();
        let claim = match self.state.claim(source, self.config.interval, now).await {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                tracing::info!(
                    inventory = source.as_str(),
                    "orphan sweep tick skipped: this period was already claimed (by another replica or an earlier run)"
                );
                self.metrics.tick(TickOutcome::Skipped);
                self.metrics.clear_current();
                return TickReport::Skipped { period: None };
            }
            Err(e) => return self.fail(Stage::Claim, &e),
        };
        let now = claim.now;
        let items = match self.inventory.list().await {
            Ok(items) => items,
            Err(e) => return self.fail(Stage::List, &e),
        };
        // Each item is classified (its name parsed, its digest computed) once per tick.
        let classes = classify_all(&items, source);
        // The standing read and the sightings read are independent: both are in flight at once.
        let (standings, previous) = join(
            self.live.standing_among(&classes.digests),
            self.state.sightings(source),
        )
        .await;
        let standings = match standings {
            Ok(standings) => standings,
            Err(e) => return self.fail(Stage::LiveTokens, &e),
        };
        let previous = match previous {
            Ok(previous) => previous,
            Err(e) => return self.fail(Stage::State, &e),
        };
        let previous_by_key: HashMap<&str, &Sighting> = previous
            .iter()
            .map(|sighting| (sighting.key.as_str(), sighting))
            .collect();
        // The breaker's denominator: this installation's objects (a row owns their token).
        let owned_inventory = classes
            .digests
            .iter()
            .filter(|digest| standings.owned.contains(*digest))
            .count();
        let inventory_len = items.len();
        let mut rows = detect_classified(
            items,
            source,
            &classes,
            &standings,
            now,
            self.config.grace.saturating_add(self.config.skew),
            Row::new,
        );
        // Each candidate holds what detection read from them; they are freed before the
        // sightings are made.
        drop(classes);
        drop(standings);

        // Sightings: new ones counted once per unbroken run; burn-in counts reclaimable ones.
        // Burn-in is measured from period starts, so the jitter of when a tick runs inside its
        // period (a CronJob starting a little late, then a little early) never makes N periods
        // fall short of the duration they span.
        let period_start = period_start(claim.period, self.config.interval);
        let (confirm_ticks, burn_in) = (self.config.confirm_ticks, self.config.burn_in);
        // Each candidate's sighting is advanced on its own (two halves at once for a large
        // inventory, in order), and its row updated in place; the new ones are counted after.
        let mut sightings: Vec<Sighting> = crate::split::map_mut(&mut rows, |row| {
            let key = row.candidate.sighting_key();
            let static_blocker = row.candidate.static_blocker();
            let stored = previous_by_key.get(key.as_str()).copied();
            let (sighting, new) = advance(
                stored,
                key,
                claim.period,
                period_start,
                static_blocker.is_none(),
            );
            row.continued = stored.is_some_and(|stored| sighting.continues(stored));
            row.had_stored = stored.is_some();
            row.counted_new = new && !not_ours(static_blocker);
            row.seen_ticks = sighting.consecutive;
            row.failed_reclaims = sighting.failed_reclaims;
            row.blocked_by = static_blocker.or_else(|| {
                if sighting.quarantined.is_some() {
                    Some(Blocker::Quarantined)
                } else if burned_in(&sighting, period_start, confirm_ticks, burn_in) {
                    None
                } else {
                    Some(Blocker::BurnIn)
                }
            });
            sighting
        });
        let mut new_per_kind: HashMap<OrphanKind, u64> = HashMap::new();
        for row in rows.iter().filter(|row| row.counted_new) {
            *new_per_kind.entry(row.candidate.kind).or_default() += 1;
        }
        // What the store holds that this tick did not see: the stored keys left once every
        // current one is taken out. A key taken out twice, or new twice, is shared by two
        // candidates.
        let mut vanished = previous_by_key;
        let mut fresh: HashSet<&str> = HashSet::new();
        let shared = rows
            .iter()
            .zip(&sightings)
            .filter(|(row, sighting)| {
                let key = sighting.key.as_str();
                let first = if row.had_stored {
                    vanished.remove(key).is_some()
                } else {
                    fresh.insert(key)
                };
                !first
            })
            .count();
        drop(fresh);
        if shared > 0 {
            // Two objects of one kind and token (a database under its legacy name
            // `cust_<token>` beside one named by its digest): one sighting cannot stand for
            // both, and neither may take over the other's burn-in.
            tracing::error!(
                shared,
                "orphan sweep: candidates share a sighting (two objects of one kind and token); nothing is recorded or reclaimed until one of each pair is gone"
            );
            return self.fail(
                Stage::State,
                &StateError {
                    operation: "record the sightings",
                    source: format!(
                        "{shared} candidates share a sighting key with another candidate"
                    )
                    .into(),
                },
            );
        }
        let vanished: Vec<String> = vanished.into_keys().map(str::to_owned).collect();
        drop(previous);
        let continued: Vec<bool> = rows.iter().map(|row| row.continued).collect();

        // The breaker and the rate limit, evaluated the same way armed or not.
        let mut confirmed: Vec<usize> = (0..rows.len())
            .filter(|&i| rows[i].blocked_by.is_none())
            .collect();
        let cap = self.config.cap(owned_inventory);
        if confirmed.len() > cap {
            tracing::error!(
                confirmed = confirmed.len(),
                cap,
                inventory = owned_inventory,
                "orphan sweep circuit breaker tripped: more of this installation's objects look orphaned than max_fraction allows; nothing is reclaimed this tick"
            );
            self.metrics.aborted_by_cap();
            for &i in &confirmed {
                rows[i].blocked_by = Some(Blocker::Breaker);
            }
        } else {
            // The fewest failed reclaims first, then the oldest; the rest wait for the next
            // tick. Candidates whose reclaims keep failing never take every slot from one that
            // has not failed: they are tried when slots are left, fewest failures first.
            confirmed.sort_by(|&a, &b| {
                rows[a]
                    .failed_reclaims
                    .cmp(&rows[b].failed_reclaims)
                    .then_with(|| rows[b].candidate.age.cmp(&rows[a].candidate.age))
            });
            for &i in confirmed.iter().skip(self.config.max_reclaims) {
                rows[i].blocked_by = Some(Blocker::Cap);
            }
        }

        // The sightings are durable before anything is reclaimed.
        let changes = SightingChanges {
            continued: &continued,
            vanished: &vanished,
        };
        if let Err(e) = self.state.record(source, &claim, &sightings, changes).await {
            return self.fail(Stage::State, &e);
        }
        drop(vanished);
        let counts: Vec<(OrphanKind, u64, u64)> = OrphanKind::ALL
            .iter()
            .map(|&kind| {
                let current = rows
                    .iter()
                    .filter(|r| r.candidate.kind == kind && !not_ours(r.candidate.static_blocker()))
                    .count() as u64;
                (kind, current, new_per_kind.get(&kind).copied().unwrap_or(0))
            })
            .collect();
        self.metrics.candidates(&counts);
        let blocked: Vec<(Blocker, u64)> = Blocker::ALL
            .iter()
            .map(|&blocker| {
                let n = rows
                    .iter()
                    .filter(|r| r.blocked_by == Some(blocker))
                    .count();
                (blocker, n as u64)
            })
            .collect();
        self.metrics.blocked(&blocked);

        let armed = self.armed();
        let views = if armed {
            let mut views = Vec::with_capacity(rows.len());
            // What the record above wrote is now the stored state: only a sighting quarantined
            // below changes from it.
            let mut continued = continued;
            continued.fill(true);
            let mut rewritten = false;
            let mut stopped = false;
            for ((row, sighting), continued) in rows
                .into_iter()
                .zip(sightings.iter_mut())
                .zip(continued.iter_mut())
            {
                let would_reclaim = row.blocked_by.is_none();
                let action = if !would_reclaim {
                    match row.blocked_by {
                        Some(Blocker::Breaker | Blocker::Cap) => Action::AbortedByCap,
                        Some(_) | None => Action::Reported,
                    }
                } else if stopped || !self.may_continue(source, &claim).await {
                    stopped = true;
                    Action::Stopped
                } else {
                    let (action, object_failed) = self.reclaim(&row.candidate, now).await;
                    if action == Action::Refused {
                        sighting.quarantined = Some("refused".to_owned());
                        *continued = false;
                        rewritten = true;
                    }
                    if object_failed {
                        sighting.failed_reclaims = sighting.failed_reclaims.saturating_add(1);
                        *continued = false;
                        rewritten = true;
                    }
                    action
                };
                views.push(report_candidate(&self.key, row, action, armed));
            }
            let changes = SightingChanges {
                continued: &continued,
                vanished: &[],
            };
            if rewritten
                && let Err(e) = self.state.record(source, &claim, &sightings, changes).await
            {
                tracing::warn!(error = %e, "could not record a quarantine or a failed reclaim; the chokepoint refuses it again (audited once), and a failed reclaim keeps its place in the rate limit for one more tick");
                self.metrics.error(Stage::State);
            }
            self.state.keep_recorded(source, sightings);
            views
        } else {
            // Audit-only: the sightings are written and each row holds its count, so they go
            // back to the store (which may keep them for the next tick's read) before the review
            // list is made. Nothing is awaited per candidate, so the
            // lines and the list of a large inventory are written in two halves at once (the
            // list stays in order), each row freed as its entry is made.
            self.state.keep_recorded(source, sightings);
            drop(continued);
            let key = &self.key;
            crate::split::map_owned(rows, |row| {
                report_candidate(key, row, Action::Reported, armed)
            })
        };
        self.metrics
            .succeeded((now - OffsetDateTime::UNIX_EPOCH).as_seconds_f64());
        self.metrics.tick(TickOutcome::Completed);
        tracing::info!(
            period = claim.period,
            inventory = inventory_len,
            candidates = views.len(),
            would_reclaim = views.iter().filter(|v| v.would_reclaim).count(),
            armed,
            "orphan sweep tick done"
        );
        TickReport::Swept {
            period: claim.period,
            inventory: inventory_len,
            armed,
            candidates: views,
        }
    }

    /// Whether the tick may go on to its next reclaim: no shutdown asked, and the period claim
    /// still the newest (the fence).
    async fn may_continue(
        &self,
        source: crate::ports::InventorySource,
        claim: &PeriodClaim,
    ) -> bool {
        if self.stop.load(Ordering::SeqCst) {
            tracing::info!("orphan sweep stopping: no further reclaims this tick");
            return false;
        }
        match self.state.holds(source, claim).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    period = claim.period,
                    "a newer period was claimed: this tick stops reclaiming"
                );
                self.metrics.error(Stage::Fence);
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not check the period claim: this tick stops reclaiming");
                self.metrics.error(Stage::Fence);
                false
            }
        }
    }

    /// Re-reads the token's standing, then reclaims through the chokepoint. The flag says
    /// whether the object's own reclaim failed (counted with its sighting); a failed re-read of
    /// the standing is the platform database's trouble, not the object's, and is not counted.
    async fn reclaim(&self, candidate: &Candidate, now: OffsetDateTime) -> (Action, bool) {
        let (Some(reclaimer), Some(name)) = (self.reclaimer.as_ref(), candidate.backend.as_ref())
        else {
            return (Action::Reported, false);
        };
        let digest = name.digest();
        let fingerprint = self.key.fingerprint_digest(&digest);
        match self
            .live
            .standing_among(std::slice::from_ref(&digest))
            .await
        {
            Ok(standing) if standing.live.contains(&digest) => {
                tracing::info!(name = %name, fingerprint = %fingerprint, "token turned live before the reclaim: skipped");
                return (Action::SkippedLive, false);
            }
            Ok(standing)
                if !standing.owned.contains(&digest) || standing.protected.contains(&digest) =>
            {
                tracing::info!(name = %name, fingerprint = %fingerprint, "ownership or protection changed before the reclaim: skipped");
                return (Action::Reported, false);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(name = %name, error = %e, "could not re-confirm the token's standing: not reclaimed");
                self.metrics.error(Stage::Reconfirm);
                return (Action::Failed, false);
            }
        }
        let action = match reclaimer.reclaim(name, now).await {
            Ok(Reclaimed::TornDown) => {
                tracing::warn!(name = %name, fingerprint = %fingerprint, kind = candidate.kind.as_str(), "orphan reclaimed through the deprovision chokepoint");
                self.metrics.reclaimed(candidate.kind);
                Action::Reclaimed
            }
            Ok(Reclaimed::AlreadyGone) => Action::AlreadyGone,
            Err(ReclaimError::Live) => Action::SkippedLive,
            Err(ReclaimError::BeingDeleted) => Action::Terminating,
            Err(ReclaimError::Refused(refusal)) => {
                tracing::warn!(name = %name, fingerprint = %fingerprint, refusal = refusal.as_str(), "the chokepoint refused the reclaim: quarantined");
                self.metrics.error(Stage::Refused);
                Action::Refused
            }
            Err(e @ ReclaimError::Failed(_)) => {
                tracing::error!(name = %name, fingerprint = %fingerprint, error = %e, "orphan reclaim failed");
                self.metrics.error(Stage::Reclaim);
                return (Action::Failed, true);
            }
        };
        (action, false)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashSet, VecDeque};
    use std::sync::Mutex;

    use keel_audit::Token;
    use keel_provision::{BackendName, InstallationId, ReclaimRefusal, TokenDigest};
    use prometheus_client::registry::Registry;
    use time::macros::datetime;

    use super::*;
    use crate::ports::{
        InventoryError, InventoryItem, InventorySource, LiveTokensError, ReclaimError, Standings,
    };
    use crate::state::MemoryState;

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);
    const HOUR: Duration = Duration::from_secs(3600);
    const OURS: InstallationId = InstallationId::from_uuid(uuid::Uuid::from_u128(1));

    /// The per-candidate log line records the action by the name its `Debug` form writes, so
    /// the line reads as it always has.
    #[test]
    fn the_logged_action_name_is_its_debug_form() {
        for action in [
            Action::Reported,
            Action::Reclaimed,
            Action::AlreadyGone,
            Action::SkippedLive,
            Action::AbortedByCap,
            Action::Refused,
            Action::Terminating,
            Action::Stopped,
            Action::Failed,
        ] {
            assert_eq!(action.debug_name(), format!("{action:?}"));
        }
    }

    /// The `n`th hourly tick.
    fn at(n: u32) -> OffsetDateTime {
        NOW + HOUR * n
    }

    /// Scripted answers, recorded calls.
    #[derive(Clone)]
    struct Script<T> {
        answers: Arc<Mutex<VecDeque<T>>>,
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl<T> Default for Script<T> {
        fn default() -> Self {
            Self {
                answers: Arc::default(),
                calls: Arc::default(),
            }
        }
    }

    impl<T> Script<T> {
        fn push(&self, answer: T) {
            self.answers.lock().unwrap().push_back(answer);
        }
        fn pop(&self) -> Option<T> {
            self.answers.lock().unwrap().pop_front()
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    /// Answers its script; with no script, `fallback` (a standing inventory).
    #[derive(Clone, Default)]
    struct FakeInventory {
        script: Script<Result<Vec<InventoryItem>, &'static str>>,
        fallback: Arc<Mutex<Vec<InventoryItem>>>,
    }

    impl FakeInventory {
        fn set(&self, items: Vec<InventoryItem>) {
            *self.fallback.lock().unwrap() = items;
        }
    }

    impl Inventory for FakeInventory {
        fn source(&self) -> InventorySource {
            InventorySource::Postgres
        }
        async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
            self.script.calls.lock().unwrap().push("list".into());
            match self.script.pop() {
                Some(Ok(items)) => Ok(items),
                Some(Err("expired")) => Err(InventoryError::Expired { pages: 1 }),
                Some(Err(e)) => Err(InventoryError::Page {
                    page: 1,
                    source: e.into(),
                }),
                None => Ok(self.fallback.lock().unwrap().clone()),
            }
        }
    }

    /// Standings: every asked token is this installation's; each call pops a scripted live set
    /// (or an error); with no script, nothing is live.
    #[derive(Clone, Default)]
    struct FakeLive(Script<Result<Vec<&'static str>, &'static str>>);

    impl LiveTokens for FakeLive {
        async fn standing_among(
            &self,
            digests: &[TokenDigest],
        ) -> Result<Standings, LiveTokensError> {
            self.0
                .calls
                .lock()
                .unwrap()
                .push(format!("standing_among({})", digests.len()));
            let live: HashSet<TokenDigest> = match self.0.pop() {
                Some(Ok(live)) => live
                    .iter()
                    .map(|t| TokenDigest::of(&Token::parse(t).unwrap()))
                    .collect(),
                Some(Err(e)) => return Err(LiveTokensError(e.into())),
                None => HashSet::new(),
            };
            let mut standings = Standings::empty(OURS);
            standings.owned = digests.iter().cloned().collect();
            standings.live = live;
            Ok(standings)
        }
    }

    /// Reclaims everything (scripted failures, and the objects it always fails on, aside); may
    /// claim the next period on a shared state when first called, as another replica would.
    #[derive(Clone, Default)]
    struct FakeReclaimer {
        script: Script<&'static str>,
        steal: Arc<Mutex<Option<MemoryState>>>,
        always_fails: Arc<Mutex<HashSet<String>>>,
    }

    impl crate::ports::sealed::Sealed for FakeReclaimer {}

    impl Reclaimer for FakeReclaimer {
        async fn reclaim(
            &self,
            name: &BackendName,
            now: OffsetDateTime,
        ) -> Result<Reclaimed, ReclaimError> {
            self.script
                .calls
                .lock()
                .unwrap()
                .push(name.expose().to_owned());
            let thief = self.steal.lock().unwrap().take();
            if let Some(state) = thief {
                state
                    .claim(InventorySource::Postgres, HOUR, now + HOUR)
                    .await
                    .unwrap();
            }
            if self.always_fails.lock().unwrap().contains(name.expose()) {
                return Err(ReclaimError::Failed("the server cannot drop it".into()));
            }
            match self.script.pop() {
                Some("refused") => Err(ReclaimError::Refused(ReclaimRefusal::NotPlatformMade)),
                Some("failed") => Err(ReclaimError::Failed("boom".into())),
                Some("terminating") => Err(ReclaimError::BeingDeleted),
                Some(_) | None => Ok(Reclaimed::TornDown),
            }
        }
    }

    fn orphan(token: &str) -> InventoryItem {
        InventoryItem {
            name: format!("cust_{token}"),
            created_at: Some(NOW - time::Duration::hours(3)),
            labels: [(crate::MANAGED_BY_LABEL, crate::MANAGED_BY)]
                .into_iter()
                .collect(),
            annotations: crate::Labels::new(),
            terminating: false,
        }
    }

    fn aged(token: &str, hours: i64) -> InventoryItem {
        InventoryItem {
            created_at: Some(NOW - time::Duration::hours(hours)),
            ..orphan(token)
        }
    }

    fn protected(token: &str) -> InventoryItem {
        let mut item = orphan(token);
        item.annotations
            .insert(crate::PROTECT_ANNOTATION.into(), "true".into());
        item
    }

    struct World {
        inventory: FakeInventory,
        live: FakeLive,
        reclaimer: FakeReclaimer,
        state: MemoryState,
        metrics: SweepMetrics,
        sweeper: Sweeper<FakeInventory, FakeLive, FakeReclaimer, MemoryState>,
    }

    fn world_on(config: SweepConfig, wired: bool, state: MemoryState) -> World {
        let inventory = FakeInventory::default();
        let live = FakeLive::default();
        let reclaimer = FakeReclaimer::default();
        let metrics = SweepMetrics::register(&mut Registry::default());
        let sweeper = Sweeper::new(
            inventory.clone(),
            live.clone(),
            wired.then(|| reclaimer.clone()),
            state.clone(),
            config,
            metrics.clone(),
            FingerprintKey::new(*b"test-key-0123456789").unwrap(),
        );
        World {
            inventory,
            live,
            reclaimer,
            state,
            metrics,
            sweeper,
        }
    }

    fn world(config: SweepConfig, wired: bool) -> World {
        world_on(config, wired, MemoryState::new())
    }

    fn armed() -> SweepConfig {
        SweepConfig {
            enabled: true,
            destructive: true,
            ..SweepConfig::default()
        }
    }

    fn audit_only() -> SweepConfig {
        SweepConfig {
            enabled: true,
            ..SweepConfig::default()
        }
    }

    fn views(report: &TickReport) -> Vec<CandidateView> {
        match report {
            TickReport::Swept { candidates, .. } => candidates.clone(),
            TickReport::Disabled | TickReport::Skipped { .. } | TickReport::Failed { .. } => {
                Vec::new()
            }
        }
    }

    fn actions(report: &TickReport) -> Vec<Action> {
        views(report).iter().map(|c| c.action).collect()
    }

    /// An audit-only world whose inventory is large enough for a tick to work in two halves:
    /// orphans named `<tag>` and a counter, three hours old; returns the world and its items.
    fn large_world(tag: &str) -> (World, Vec<InventoryItem>) {
        let w = world(audit_only(), false);
        let items: Vec<InventoryItem> = (0..crate::split::PARALLEL_ABOVE + 1_904)
            .map(|i| orphan(&format!("{tag}{i:09}")))
            .collect();
        w.inventory.set(items.clone());
        (w, items)
    }

    /// A large audit-only tick works in two halves at once (`split`): the review list is still
    /// in inventory order and every candidate still gets exactly one INFO line, written to the
    /// caller's subscriber whichever thread formats it.
    ///
    /// The lines are read from the test binary's one global subscriber (other tests log there
    /// at the same time; this tick's candidates are told apart by their fingerprints). A
    /// subscriber scoped to this test raced with that global one: tracing keeps one interest
    /// per call site for every subscriber, and the scoped capture now and then saw no line.
    #[tokio::test]
    async fn a_large_tick_lists_every_candidate_in_order_with_one_line_each() {
        let captured = captured_logs();
        let (mut w, items) = large_world("lrg");
        let n = items.len();
        let report = w.sweeper.tick(at(0)).await;
        let key = FingerprintKey::new(*b"test-key-0123456789").unwrap();
        let expected: Vec<Option<String>> = items
            .iter()
            .map(|item| {
                let name =
                    BackendName::Database(keel_provision::DatabaseName::parse(&item.name).unwrap());
                Some(key.fingerprint_digest(&name.digest()))
            })
            .collect();
        let listed: Vec<Option<String>> = views(&report)
            .into_iter()
            .map(|view| view.fingerprint)
            .collect();
        assert_eq!(
            listed, expected,
            "the review list is not in inventory order"
        );
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let mut lines_of: HashMap<&str, usize> = expected
            .iter()
            .flatten()
            .map(|fingerprint| (fingerprint.as_str(), 0))
            .collect();
        assert_eq!(lines_of.len(), n, "every candidate has its own fingerprint");
        for line in text
            .lines()
            .filter(|line| line.contains("orphan candidate"))
        {
            let logged = line
                .split("fingerprint=")
                .nth(1)
                .map(|rest| rest.trim_start_matches('"'))
                .and_then(|rest| rest.get(..12));
            if let Some(count) = logged.and_then(|fingerprint| lines_of.get_mut(fingerprint)) {
                *count += 1;
            }
        }
        let wrong: Vec<(&str, usize)> = lines_of
            .into_iter()
            .filter(|&(_, lines)| lines != 1)
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of {n} candidates do not have exactly one line: {:?}",
            wrong.len(),
            wrong.iter().take(5).collect::<Vec<_>>()
        );
    }

    /// Two objects of one kind and token (a database under its legacy name beside one named by
    /// the token's digest) would share one sighting: the tick fails at the state stage and
    /// records nothing, whether both are new at once or the second would take over the run the
    /// first has served (and with it the burn-in).
    #[tokio::test]
    async fn two_objects_of_one_token_never_share_a_sighting() {
        let token = "orph00000009";
        let digest = TokenDigest::of(&Token::parse(token).unwrap());
        let pair = || vec![orphan(token), orphan(digest.as_str())];
        let source = InventorySource::Postgres;

        let mut w = world(audit_only(), false);
        w.inventory.set(vec![orphan(token)]);
        let first = w.sweeper.tick(at(0)).await;
        assert!(matches!(first, TickReport::Swept { .. }), "{first:?}");
        let recorded = w.state.sightings(source).await.unwrap();
        assert_eq!(recorded.len(), 1);
        w.inventory.set(pair());
        let second = w.sweeper.tick(at(1)).await;
        assert!(
            matches!(second, TickReport::Failed { stage: "state" }),
            "{second:?}"
        );
        assert_eq!(
            w.state.sightings(source).await.unwrap(),
            recorded,
            "a tick that failed recorded its sightings"
        );

        let mut w = world(audit_only(), false);
        w.inventory.set(pair());
        let both_new = w.sweeper.tick(at(0)).await;
        assert!(
            matches!(both_new, TickReport::Failed { stage: "state" }),
            "{both_new:?}"
        );
        assert!(w.state.sightings(source).await.unwrap().is_empty());
    }

    /// A large tick advances its sightings in two halves: every candidate still gets exactly
    /// its own sighting, stored in inventory order, and the next period continues each run.
    #[tokio::test]
    async fn a_large_tick_advances_every_sighting_in_inventory_order() {
        let (mut w, items) = large_world("adv");
        let n = items.len();
        let digests: Vec<String> = items
            .iter()
            .map(|item| {
                let name = keel_provision::DatabaseName::parse(&item.name).unwrap();
                BackendName::Database(name).digest().as_str().to_owned()
            })
            .collect();
        let mut runs: Vec<Vec<Sighting>> = Vec::new();
        for period in 0..2 {
            let report = w.sweeper.tick(at(period)).await;
            assert_eq!(views(&report).len(), n, "every item is a candidate");
            let stored = w.state.sightings(InventorySource::Postgres).await.unwrap();
            assert_eq!(stored.len(), n, "one sighting per candidate");
            for (sighting, digest) in stored.iter().zip(&digests) {
                assert!(
                    sighting.key.ends_with(digest.as_str()),
                    "the sightings are not in inventory order"
                );
            }
            runs.push(stored);
        }
        for (first, second) in runs[0].iter().zip(&runs[1]) {
            assert_eq!(second.first_seen, first.first_seen, "the run was broken");
            assert_eq!(
                second.consecutive,
                first.consecutive + 1,
                "the run did not advance"
            );
            assert!(second.last_period > first.last_period);
        }
    }

    #[tokio::test]
    async fn gates_off_calls_no_port_and_moves_no_metric() {
        let mut w = world(SweepConfig::default(), true);
        w.inventory.set(vec![orphan("orph00000001")]);
        for n in 0..3 {
            assert_eq!(w.sweeper.tick(at(n)).await, TickReport::Disabled);
        }
        assert!(w.inventory.script.calls().is_empty());
        assert!(w.live.0.calls().is_empty());
        assert!(w.reclaimer.script.calls().is_empty());
        for &kind in OrphanKind::ALL {
            assert_eq!(w.metrics.total(kind), 0);
        }
        assert_eq!(w.metrics.ticks(TickOutcome::Completed), 0);
    }

    /// SWEEP-6: `_total` counts new sightings, not the standing backlog once per tick.
    #[tokio::test]
    async fn audit_only_never_calls_the_reclaimer_and_counts_each_orphan_once() {
        let mut w = world(audit_only(), true);
        assert!(!w.sweeper.armed());
        w.inventory.set(vec![orphan("orph00000001")]);
        for n in 0..5 {
            let report = w.sweeper.tick(at(n)).await;
            assert_eq!(actions(&report), [Action::Reported]);
        }
        assert!(w.reclaimer.script.calls().is_empty());
        assert_eq!(w.metrics.total(OrphanKind::CustomerDatabase), 1);
        assert_eq!(w.metrics.current(OrphanKind::CustomerDatabase), 1);
        assert_eq!(w.metrics.ticks(TickOutcome::Completed), 5);
    }

    #[tokio::test]
    async fn both_gates_on_without_a_reclaimer_is_not_armed() {
        let mut w = world(armed(), false);
        assert!(!w.sweeper.armed());
        w.inventory.set(vec![orphan("orph00000001")]);
        for n in 0..4 {
            assert_eq!(actions(&w.sweeper.tick(at(n)).await), [Action::Reported]);
        }
    }

    #[tokio::test]
    async fn each_failure_yields_zero_candidates() {
        for (case, list, live, stage) in [
            ("list error", Err("connection refused"), None, Stage::List),
            ("410 mid-pagination", Err("expired"), None, Stage::List),
            (
                "live-token read error",
                Ok(vec![orphan("orph00000001")]),
                Some(Err("timeout")),
                Stage::LiveTokens,
            ),
        ] {
            let mut w = world(armed(), true);
            w.inventory.script.push(list);
            if let Some(live) = live {
                w.live.0.push(live);
            }
            let report = w.sweeper.tick(NOW).await;
            assert_eq!(
                report,
                TickReport::Failed {
                    stage: stage.as_str()
                },
                "{case}"
            );
            assert_eq!(w.metrics.errors(stage), 1, "{case}");
            assert_eq!(w.metrics.ticks(TickOutcome::Failed), 1, "{case}");
            assert_eq!(w.metrics.total(OrphanKind::CustomerDatabase), 0, "{case}");
            assert!(w.reclaimer.script.calls().is_empty(), "{case}");
        }
    }

    #[tokio::test]
    async fn a_candidate_seen_in_fewer_than_n_ticks_is_not_reclaimed() {
        let mut w = world(armed(), true);
        w.inventory.set(vec![orphan("orph00000001")]);
        for (n, expected) in [Action::Reported, Action::Reported, Action::Reclaimed]
            .into_iter()
            .enumerate()
        {
            let report = w.sweeper.tick(at(n as u32)).await;
            assert_eq!(actions(&report), [expected]);
        }
        assert_eq!(w.reclaimer.script.calls(), ["cust_orph00000001"]);
        assert_eq!(w.metrics.reclaims(OrphanKind::CustomerDatabase), 1);
    }

    /// SWEEP-3: burn-in is measured in periods, so three hourly ticks that run a little late,
    /// then a little early within their periods still span the two-hour burn-in.
    #[tokio::test]
    async fn the_burn_in_is_measured_in_periods_not_in_tick_jitter() {
        let mut w = world(armed(), true);
        w.inventory.set(vec![orphan("orph00000001")]);
        let jittered = [
            at(0) + time::Duration::seconds(40),
            at(1) + time::Duration::seconds(20),
            at(2) + time::Duration::seconds(5),
        ];
        let mut last = Vec::new();
        for now in jittered {
            last = actions(&w.sweeper.tick(now).await);
        }
        assert_eq!(last, [Action::Reclaimed]);
    }

    /// SWEEP-3: the burn-in lives in the state store, so a new process (a CronJob's `--once`, a
    /// restart) continues it; a period without a completed tick breaks it.
    #[tokio::test]
    async fn the_burn_in_survives_a_restart_and_breaks_on_a_failed_period() {
        let state = MemoryState::new();
        for n in 0..3 {
            // A fresh process per tick, as a CronJob runs it.
            let mut w = world_on(armed(), true, state.clone());
            w.inventory.set(vec![orphan("orph00000001")]);
            let report = w.sweeper.tick(at(n)).await;
            let expected = if n == 2 {
                Action::Reclaimed
            } else {
                Action::Reported
            };
            assert_eq!(actions(&report), [expected], "tick {n}");
        }
        let mut w = world(armed(), true);
        w.inventory.set(vec![orphan("orph00000002")]);
        w.sweeper.tick(at(0)).await;
        w.sweeper.tick(at(1)).await;
        w.inventory.script.push(Err("glitch"));
        w.sweeper.tick(at(2)).await;
        w.sweeper.tick(at(3)).await;
        let report = w.sweeper.tick(at(4)).await;
        assert_eq!(actions(&report), [Action::Reported]);
        assert_eq!(views(&report)[0].blocked_by, Some(Blocker::BurnIn));
        assert!(w.reclaimer.script.calls().is_empty());
    }

    #[tokio::test]
    async fn a_token_that_turns_live_before_the_reclaim_is_skipped() {
        let mut w = world(armed(), true);
        w.inventory.set(vec![orphan("orph00000001")]);
        for n in 0..2 {
            w.sweeper.tick(at(n)).await;
        }
        w.live.0.push(Ok(vec![])); // detection: not live
        w.live.0.push(Ok(vec!["orph00000001"])); // re-confirmation: live now
        let report = w.sweeper.tick(at(2)).await;
        assert_eq!(actions(&report), [Action::SkippedLive]);
        assert!(w.reclaimer.script.calls().is_empty());
    }

    /// A re-read of the token's standing that fails before a reclaim is the platform database's
    /// trouble, not the object's: reported as failed, never counted against the candidate; a
    /// failed teardown is.
    #[tokio::test]
    async fn only_the_objects_own_failed_reclaim_is_counted() {
        let mut w = world(armed(), true);
        w.inventory.set(vec![orphan("orph00000001")]);
        for n in 0..2 {
            w.sweeper.tick(at(n)).await;
        }
        w.live.0.push(Ok(vec![])); // detection: not live
        w.live.0.push(Err("the platform database is away")); // re-confirmation
        let report = w.sweeper.tick(at(2)).await;
        assert_eq!(actions(&report), [Action::Failed]);
        let stored = w.state.sightings(InventorySource::Postgres).await.unwrap();
        assert_eq!(stored[0].failed_reclaims, 0);
        w.reclaimer.script.push("failed");
        let report = w.sweeper.tick(at(3)).await;
        assert_eq!(actions(&report), [Action::Failed]);
        let stored = w.state.sightings(InventorySource::Postgres).await.unwrap();
        assert_eq!(stored[0].failed_reclaims, 1);
    }

    /// SWEEP-5: replicas sharing the state run one tick per period; the others skip, at INFO and
    /// counted.
    #[tokio::test]
    async fn two_replicas_run_one_tick_per_period() {
        let state = MemoryState::new();
        let mut a = world_on(audit_only(), true, state.clone());
        let mut b = world_on(audit_only(), true, state.clone());
        for w in [&a, &b] {
            w.inventory.set(vec![orphan("orph00000001")]);
        }
        let mut swept = 0;
        for n in 0..5 {
            for w in [&mut a, &mut b] {
                match w.sweeper.tick(at(n)).await {
                    TickReport::Swept { .. } => swept += 1,
                    TickReport::Skipped { .. } => {}
                    other @ (TickReport::Disabled | TickReport::Failed { .. }) => {
                        panic!("unexpected {other:?}")
                    }
                }
            }
        }
        assert_eq!(swept, 5, "one tick per period");
        let listed = a.inventory.script.calls().len() + b.inventory.script.calls().len();
        assert_eq!(listed, 5, "a skipped tick reads nothing");
        assert_eq!(b.metrics.ticks(TickOutcome::Skipped), 5);
        let total = a.metrics.total(OrphanKind::CustomerDatabase)
            + b.metrics.total(OrphanKind::CustomerDatabase);
        assert_eq!(total, 1, "the orphan is counted once, not once per replica");
    }

    /// SWEEP-5: a replica whose period claim was overtaken stops before its next reclaim.
    #[tokio::test]
    async fn a_replica_that_lost_its_period_claim_stops_reclaiming() {
        let mut w = world(
            SweepConfig {
                max_fraction: 1.0,
                ..armed()
            },
            true,
        );
        w.inventory
            .set(vec![aged("orph00000001", 5), aged("orph00000002", 4)]);
        for n in 0..2 {
            w.sweeper.tick(at(n)).await;
        }
        *w.reclaimer.steal.lock().unwrap() = Some(w.state.clone());
        let report = w.sweeper.tick(at(2)).await;
        assert_eq!(actions(&report), [Action::Reclaimed, Action::Stopped]);
        assert_eq!(w.reclaimer.script.calls(), ["cust_orph00000001"]);
        assert_eq!(w.metrics.errors(Stage::Fence), 1);
    }

    /// SWEEP-14: a stop request (SIGTERM) is observed between reclaims.
    #[tokio::test]
    async fn a_stop_request_prevents_further_reclaims() {
        let mut w = world(
            SweepConfig {
                max_fraction: 1.0,
                ..armed()
            },
            true,
        );
        w.inventory
            .set(vec![aged("orph00000001", 5), aged("orph00000002", 4)]);
        for n in 0..2 {
            w.sweeper.tick(at(n)).await;
        }
        w.sweeper.stop_flag().store(true, Ordering::SeqCst);
        let report = w.sweeper.tick(at(2)).await;
        assert_eq!(actions(&report), [Action::Stopped, Action::Stopped]);
        assert!(w.reclaimer.script.calls().is_empty());
    }

    /// SWEEP-7: the audit-only run predicts the armed run: the same `would_reclaim` and
    /// `blocked_by` for every candidate, and the armed run reclaims exactly those.
    #[tokio::test]
    async fn the_dry_run_reports_exactly_what_the_armed_run_would_do() {
        let mut items: Vec<InventoryItem> = (1..=7)
            .map(|i| aged(&format!("orph0000000{i}"), 3 + i64::from(i)))
            .collect();
        items.push(protected("prot00000001"));
        let mut unmanaged = orphan("hand00000001");
        unmanaged.labels.clear();
        items.push(unmanaged);
        items.push(InventoryItem {
            name: "cust_NOT-A-TOKEN".into(),
            ..orphan("gene00000001")
        });
        items.extend((0..8).map(|i| {
            let mut young = orphan(&format!("young000000{i}"));
            young.created_at = Some(NOW + HOUR * 3);
            young
        }));
        let mut dry = world(audit_only(), true);
        let mut live = world(armed(), true);
        for w in [&dry, &live] {
            w.inventory.set(items.clone());
        }
        for n in 0..3 {
            let predicted = dry.sweeper.tick(at(n)).await;
            let done = live.sweeper.tick(at(n)).await;
            let p = views(&predicted);
            let d = views(&done);
            assert_eq!(p.len(), d.len());
            for (p, d) in p.iter().zip(&d) {
                assert_eq!(
                    (p.would_reclaim, p.blocked_by),
                    (d.would_reclaim, d.blocked_by),
                    "{}",
                    p.name_masked
                );
                assert_eq!(p.action, Action::Reported);
                assert_eq!(d.action == Action::Reclaimed, d.would_reclaim);
            }
        }
        // Tick 3: 7 confirmed, 5 reclaimed (oldest first), 2 held by the rate limit.
        let mut reclaimed = live.reclaimer.script.calls();
        reclaimed.sort();
        assert_eq!(
            reclaimed,
            (3..=7)
                .map(|i| format!("cust_orph0000000{i}"))
                .collect::<Vec<_>>()
        );
        assert!(dry.reclaimer.script.calls().is_empty());
        assert_eq!(dry.metrics.blocked_now(Blocker::Cap), 2);
        assert_eq!(dry.metrics.blocked_now(Blocker::Protected), 1);
        assert_eq!(dry.metrics.blocked_now(Blocker::Unmanaged), 1);
        assert_eq!(dry.metrics.blocked_now(Blocker::Generic), 1);
    }

    /// `n` objects too young to be candidates, which keep the breaker's share of orphans low.
    fn young_owned(n: u32) -> Vec<InventoryItem> {
        (0..n)
            .map(|i| {
                let mut young = orphan(&format!("young00000{i:02}"));
                young.created_at = Some(NOW + HOUR * 6);
                young
            })
            .collect()
    }

    /// SWEEP-7: a backlog above the rate limit drains over several ticks instead of aborting
    /// every tick.
    #[tokio::test]
    async fn the_rate_limit_drains_a_backlog_gradually() {
        let mut w = world(armed(), true);
        let orphans: Vec<InventoryItem> = (10..22)
            .map(|i| aged(&format!("orph000000{i}"), i64::from(i)))
            .collect();
        let owned = young_owned(20);
        let mut remaining = orphans.clone();
        let mut per_tick = Vec::new();
        for n in 0..6 {
            let mut items = remaining.clone();
            items.extend(owned.clone());
            w.inventory.set(items);
            let before = w.reclaimer.script.calls().len();
            w.sweeper.tick(at(n)).await;
            let calls = w.reclaimer.script.calls();
            per_tick.push(calls.len() - before);
            remaining.retain(|item| !calls.contains(&item.name));
        }
        assert_eq!(per_tick, [0, 0, 5, 5, 2, 0]);
        assert!(remaining.is_empty());
        assert_eq!(w.metrics.aborts(), 0);
    }

    /// Candidates whose reclaims fail every tick (a database the server cannot drop) never hold
    /// every slot of the rate limit: a newer orphan that has not failed is reclaimed the tick
    /// after they first fail, and they are still tried with the slots left.
    #[tokio::test]
    async fn reclaims_that_keep_failing_never_hold_back_a_newer_orphan() {
        let mut w = world(armed(), true);
        let stuck: Vec<InventoryItem> = (20..25)
            .map(|i| aged(&format!("stuck00000{i}"), i64::from(i)))
            .collect();
        *w.reclaimer.always_fails.lock().unwrap() =
            stuck.iter().map(|item| item.name.clone()).collect();
        let newer = aged("newer0000010", 10);
        let owned = young_owned(20);
        let mut items = stuck.clone();
        items.extend(owned);
        let mut with_newer = items.clone();
        with_newer.push(newer.clone());
        w.inventory.set(with_newer);
        // Ticks 0 and 1 serve the burn-in; in tick 2 the five oldest take the five slots, and
        // every one of them fails.
        for n in 0..3 {
            w.sweeper.tick(at(n)).await;
        }
        let mut first = w.reclaimer.script.calls();
        first.sort();
        assert_eq!(
            first,
            stuck
                .iter()
                .map(|item| item.name.clone())
                .collect::<Vec<_>>()
        );
        // Tick 3: the newer orphan takes a slot; the four oldest failing ones take the others,
        // and the youngest of them waits.
        let report = w.sweeper.tick(at(3)).await;
        let calls = w.reclaimer.script.calls();
        let tick3 = &calls[5..];
        assert_eq!(tick3.len(), 5);
        assert!(
            tick3.contains(&newer.name),
            "the newer orphan waited behind failing reclaims: {tick3:?}"
        );
        assert!(!tick3.contains(&stuck[0].name), "{tick3:?}");
        let views = views(&report);
        let newer_view = views
            .iter()
            .find(|v| v.action == Action::Reclaimed)
            .expect("the newer orphan was reclaimed");
        assert_eq!(newer_view.failed_reclaims, 0);
        let failed: Vec<u32> = views
            .iter()
            .filter(|v| v.action == Action::Failed)
            .map(|v| v.failed_reclaims)
            .collect();
        assert_eq!(
            failed,
            [1, 1, 1, 1],
            "each failing one had failed once before"
        );
        // With the newer one gone, all five are tried again, and every failure is counted.
        w.inventory.set(items);
        w.sweeper.tick(at(4)).await;
        let calls = w.reclaimer.script.calls();
        assert_eq!(calls.len(), 15);
        assert!(calls[10..].contains(&stuck[0].name));
        let stored = w.state.sightings(InventorySource::Postgres).await.unwrap();
        let mut counts: Vec<u32> = stored.iter().map(|s| s.failed_reclaims).collect();
        counts.sort_unstable();
        assert_eq!(
            counts,
            [2, 3, 3, 3, 3],
            "every failure is counted in the stored sighting"
        );
    }

    /// SWEEP-7: the breaker (more than `max_fraction` of this installation's inventory looks
    /// orphaned at once) holds everything back, and says so in both modes.
    #[tokio::test]
    async fn the_breaker_holds_everything_back_when_too_much_looks_orphaned() {
        let items: Vec<InventoryItem> = (1..=4)
            .map(|i| orphan(&format!("orph0000000{i}")))
            .collect();
        let mut dry = world(audit_only(), true);
        let mut live = world(armed(), true);
        for w in [&dry, &live] {
            w.inventory.set(items.clone());
        }
        for n in 0..3 {
            dry.sweeper.tick(at(n)).await;
            live.sweeper.tick(at(n)).await;
        }
        assert!(live.reclaimer.script.calls().is_empty());
        assert_eq!(live.metrics.aborts(), 1);
        assert_eq!(dry.metrics.aborts(), 1, "evaluated in the dry run too");
        assert_eq!(dry.metrics.blocked_now(Blocker::Breaker), 4);
    }

    /// A memory store that notes the sightings each tick hands back.
    #[derive(Clone, Default)]
    struct Handing {
        inner: MemoryState,
        handed: Arc<Mutex<Vec<Vec<Sighting>>>>,
    }

    impl SweepState for Handing {
        async fn claim(
            &self,
            source: InventorySource,
            interval: Duration,
            now: OffsetDateTime,
        ) -> Result<Option<PeriodClaim>, StateError> {
            self.inner.claim(source, interval, now).await
        }

        async fn holds(
            &self,
            source: InventorySource,
            claim: &PeriodClaim,
        ) -> Result<bool, StateError> {
            self.inner.holds(source, claim).await
        }

        async fn sightings(&self, source: InventorySource) -> Result<Vec<Sighting>, StateError> {
            self.inner.sightings(source).await
        }

        async fn replace(
            &self,
            source: InventorySource,
            claim: &PeriodClaim,
            sightings: &[Sighting],
        ) -> Result<(), StateError> {
            self.inner.replace(source, claim, sightings).await
        }

        fn keep_recorded(&self, _source: InventorySource, sightings: Vec<Sighting>) {
            self.handed.lock().unwrap().push(sightings);
        }
    }

    /// Every completed tick hands back exactly the sightings its last record left in the store,
    /// audit-only and armed, including a quarantine recorded after a refused reclaim; a tick that
    /// records nothing hands nothing back.
    #[tokio::test]
    async fn a_tick_hands_back_exactly_what_it_last_recorded() {
        for config in [audit_only(), armed()] {
            let state = Handing::default();
            let w = world(config.clone(), true);
            let mut sweeper = Sweeper::new(
                w.inventory.clone(),
                w.live.clone(),
                Some(w.reclaimer.clone()),
                state.clone(),
                config,
                SweepMetrics::register(&mut Registry::default()),
                FingerprintKey::new(*b"test-key-0123456789").unwrap(),
            );
            w.inventory
                .set(vec![orphan("orph00000001"), orphan("orph00000002")]);
            w.reclaimer.script.push("refused");
            for n in 0..4 {
                sweeper.tick(at(n)).await;
                let handed = state
                    .handed
                    .lock()
                    .unwrap()
                    .pop()
                    .expect("a tick handed nothing back");
                let mut stored = state
                    .inner
                    .sightings(InventorySource::Postgres)
                    .await
                    .unwrap();
                stored.sort_by(|a, b| a.key.cmp(&b.key));
                let mut handed = handed;
                handed.sort_by(|a, b| a.key.cmp(&b.key));
                assert_eq!(handed, stored, "tick {n}");
            }
            let skipped = sweeper.tick(at(3)).await;
            assert!(matches!(skipped, TickReport::Skipped { .. }));
            assert!(state.handed.lock().unwrap().is_empty());
        }
        let quarantined = Handing::default();
        let w = world(armed(), true);
        let mut sweeper = Sweeper::new(
            w.inventory.clone(),
            w.live.clone(),
            Some(w.reclaimer.clone()),
            quarantined.clone(),
            armed(),
            SweepMetrics::register(&mut Registry::default()),
            FingerprintKey::new(*b"test-key-0123456789").unwrap(),
        );
        w.inventory.set(vec![orphan("orph00000001")]);
        w.reclaimer.script.push("refused");
        for n in 0..4 {
            sweeper.tick(at(n)).await;
        }
        let handed = quarantined.handed.lock().unwrap();
        assert!(
            handed.iter().flatten().any(|s| s.quarantined.is_some()),
            "no tick handed back the quarantine it recorded"
        );
    }

    /// SWEEP-2: a reclaim the chokepoint refused is quarantined in the durable state and never
    /// attempted again, so it is audited once.
    #[tokio::test]
    async fn a_refused_reclaim_is_quarantined_and_never_retried() {
        let mut w = world(armed(), true);
        w.inventory.set(vec![orphan("orph00000001")]);
        w.reclaimer.script.push("refused");
        for n in 0..8 {
            w.sweeper.tick(at(n)).await;
        }
        assert_eq!(w.reclaimer.script.calls().len(), 1);
        let report = w.sweeper.tick(at(8)).await;
        assert_eq!(views(&report)[0].blocked_by, Some(Blocker::Quarantined));
        assert!(report.needs_attention() || views(&report)[0].action == Action::Reported);
    }

    /// SWEEP-6: another installation's objects (and objects this one has no row for) are
    /// reported with their blocker but are not this installation's backlog.
    #[tokio::test]
    async fn foreign_objects_are_reported_but_not_counted_as_this_installations_backlog() {
        let mut w = world(audit_only(), false);
        let mut foreign = orphan("frgn00000001");
        foreign.labels.insert(
            keel_provision::INSTALLATION_LABEL.into(),
            InstallationId::from_uuid(uuid::Uuid::from_u128(2)).to_string(),
        );
        w.inventory.set(vec![foreign, orphan("orph00000001")]);
        let report = w.sweeper.tick(at(0)).await;
        assert_eq!(views(&report).len(), 2);
        assert_eq!(w.metrics.current(OrphanKind::CustomerDatabase), 1);
        assert_eq!(w.metrics.total(OrphanKind::CustomerDatabase), 1);
        assert_eq!(w.metrics.blocked_now(Blocker::ForeignInstallation), 1);
    }

    /// SWEEP-4: a terminating namespace is reported and tracked, never eligible, never sent to
    /// the chokepoint again, and not counted by the breaker.
    #[tokio::test]
    async fn a_terminating_object_is_neither_eligible_nor_reclaimed_again() {
        let mut w = world(armed(), true);
        let mut stuck = orphan("stck00000001");
        stuck.terminating = true;
        w.inventory.set(vec![stuck, orphan("orph00000001")]);
        for n in 0..5 {
            w.sweeper.tick(at(n)).await;
        }
        let calls = w.reclaimer.script.calls();
        assert!(!calls.is_empty(), "the other orphan is reclaimed");
        assert!(
            calls.iter().all(|name| name == "cust_orph00000001"),
            "{calls:?}"
        );
        assert_eq!(w.metrics.blocked_now(Blocker::Terminating), 1);
    }

    #[tokio::test]
    async fn protected_and_generic_candidates_are_never_reclaimed() {
        let mut w = world(armed(), true);
        let generic = InventoryItem {
            name: "cust_NOT-A-TOKEN".into(),
            ..orphan("orph00000009")
        };
        w.inventory
            .set(vec![protected("prot00000001"), generic.clone()]);
        for n in 0..4 {
            let report = w.sweeper.tick(at(n)).await;
            assert_eq!(actions(&report), [Action::Reported, Action::Reported]);
        }
        assert!(w.reclaimer.script.calls().is_empty());
        assert_eq!(w.metrics.current(OrphanKind::Generic), 1);
    }

    /// SWEEP-3 (d): lifting protection starts the burn-in then; protected sightings never count.
    #[tokio::test]
    async fn lifting_protection_starts_the_burn_in_then() {
        let mut w = world(armed(), true);
        w.inventory.set(vec![protected("prot00000001")]);
        for n in 0..4 {
            w.sweeper.tick(at(n)).await;
        }
        w.inventory.set(vec![orphan("prot00000001")]);
        for n in 4..6 {
            let report = w.sweeper.tick(at(n)).await;
            assert_eq!(
                views(&report)[0].blocked_by,
                Some(Blocker::BurnIn),
                "tick {n}"
            );
        }
        let report = w.sweeper.tick(at(6)).await;
        assert_eq!(actions(&report), [Action::Reclaimed]);
    }

    #[tokio::test]
    async fn the_current_gauge_falls_to_zero_when_the_backlog_drains() {
        let mut w = world(audit_only(), false);
        w.inventory
            .set(vec![orphan("orph00000001"), orphan("orph00000002")]);
        w.sweeper.tick(at(0)).await;
        assert_eq!(w.metrics.current(OrphanKind::CustomerDatabase), 2);
        w.inventory.set(vec![]);
        w.sweeper.tick(at(1)).await;
        assert_eq!(w.metrics.current(OrphanKind::CustomerDatabase), 0);
        assert_eq!(w.metrics.total(OrphanKind::CustomerDatabase), 2);
    }

    /// A writer that keeps every log line in memory.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Every log line of this test binary, captured by one global subscriber (a global default
    /// avoids per-thread dispatch races between tests running in parallel).
    fn captured_logs() -> &'static Captured {
        static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            captured
        })
    }

    #[tokio::test]
    async fn no_log_line_contains_a_full_token() {
        let captured = captured_logs();
        let tokens = [
            "orph00000001",
            "orph00000002",
            "prot00000001",
            "live00000001",
        ];
        // Every path that logs: reclaim, protected, live skip at re-confirmation, breaker,
        // refusal, failures, skips.
        let mut w = world(
            SweepConfig {
                max_fraction: 1.0,
                ..armed()
            },
            true,
        );
        let items = vec![
            orphan(tokens[0]),
            protected(tokens[2]),
            orphan(tokens[3]),
            orphan(tokens[1]),
        ];
        w.inventory.set(items.clone());
        for n in 0..2 {
            w.sweeper.tick(at(n)).await;
        }
        w.live.0.push(Ok(vec![])); // detection
        w.live.0.push(Ok(vec![])); // re-confirm tokens[0]: reclaimed
        w.live.0.push(Ok(vec![tokens[3]])); // re-confirm tokens[3]: live now
        w.reclaimer.script.push("ok");
        w.reclaimer.script.push("refused");
        w.sweeper.tick(at(2)).await;
        w.sweeper.tick(at(2)).await;
        w.inventory.script.push(Err("no route to host"));
        w.sweeper.tick(at(3)).await;
        w.live.0.push(Err("statement timeout"));
        w.sweeper.tick(at(4)).await;
        let mut capped = world(armed(), true);
        let many: Vec<InventoryItem> = (1..=6)
            .map(|i| orphan(&format!("many0000000{i}")))
            .collect();
        capped.inventory.set(many);
        for n in 0..3 {
            capped.sweeper.tick(at(n)).await;
        }

        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("orphan reclaimed"), "{logs}");
        assert!(logs.contains("circuit breaker"), "{logs}");
        assert!(logs.contains("turned live"), "{logs}");
        assert!(logs.contains("refused the reclaim"), "{logs}");
        assert!(logs.contains("already claimed"), "{logs}");
        let mut all: Vec<String> = tokens.iter().map(|t| (*t).to_owned()).collect();
        all.extend((1..=6).map(|i| format!("many0000000{i}")));
        for token in &all {
            for line in logs.lines() {
                assert!(!line.contains(token.as_str()), "full token in: {line}");
            }
        }
    }
}
