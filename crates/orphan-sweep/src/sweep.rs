//! The tick: gates, fail-safe detection, and the gated reclaim arm.

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

use crate::detect::{Candidate, OrphanKind, detect, digests_of};
use crate::fingerprint::FingerprintKey;
use crate::metrics::{Stage, SweepMetrics};
use crate::ports::{Inventory, LiveTokens, Reclaimed, Reclaimer};

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
    /// Consecutive ticks a candidate must be seen in before it may be reclaimed (default 3).
    pub confirm_ticks: u32,
    /// Most reclaims per tick (default 5); more aborts every reclaim of the tick.
    pub max_reclaims: usize,
    /// Most reclaims per tick as a fraction of the inventory (default 0.10, rounded up); more
    /// aborts every reclaim of the tick.
    pub max_fraction: f64,
}

impl Default for SweepConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            destructive: false,
            grace: Duration::from_secs(3600),
            confirm_ticks: 3,
            max_reclaims: 5,
            max_fraction: 0.10,
        }
    }
}

impl SweepConfig {
    /// The blast-radius cap for an inventory of `inventory` items.
    pub fn cap(&self, inventory: usize) -> usize {
        let fraction = (self.max_fraction.clamp(0.0, 1.0) * inventory as f64).ceil() as usize;
        self.max_reclaims.min(fraction)
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
    /// Annotated `keel.dev/protect=true`.
    pub protected: bool,
    /// Consecutive ticks it has been seen in.
    pub seen_ticks: u32,
    /// What this tick did about it.
    pub action: Action,
}

/// What a tick did about a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Reported only (audit-only mode, not yet confirmed, protected or generic).
    Reported,
    /// Reclaimed through the chokepoint.
    Reclaimed,
    /// Already gone when the chokepoint looked.
    AlreadyGone,
    /// Its token turned live before the reclaim: skipped.
    SkippedLive,
    /// The blast-radius cap aborted this tick's reclaims.
    AbortedByCap,
    /// The reclaim (or its re-confirmation) failed; it will be seen again.
    Failed,
}

/// What a tick did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum TickReport {
    /// The sweep is disabled: nothing was read.
    Disabled,
    /// A stage failed: zero candidates this tick.
    Failed {
        /// The stage.
        stage: &'static str,
    },
    /// The tick completed.
    Swept {
        /// Items in the inventory.
        inventory: usize,
        /// Whether the reclaim arm was armed.
        armed: bool,
        /// The candidates.
        candidates: Vec<CandidateView>,
    },
}

/// Runs ticks over an inventory, a live-token lookup and, optionally, a reclaimer.
#[derive(Debug)]
pub struct Sweeper<I, L, R> {
    inventory: I,
    live: L,
    reclaimer: Option<R>,
    config: SweepConfig,
    metrics: SweepMetrics,
    key: FingerprintKey,
    /// Consecutive ticks each candidate (by name) has been seen in.
    seen: HashMap<String, u32>,
}

impl<I: Inventory, L: LiveTokens, R: Reclaimer> Sweeper<I, L, R> {
    /// A sweeper. Without a `reclaimer` it can never reclaim, whatever the gates say.
    pub fn new(
        inventory: I,
        live: L,
        reclaimer: Option<R>,
        config: SweepConfig,
        metrics: SweepMetrics,
        key: FingerprintKey,
    ) -> Self {
        Self {
            inventory,
            live,
            reclaimer,
            config,
            metrics,
            key,
            seen: HashMap::new(),
        }
    }

    /// Whether the reclaim arm is armed: both gates on and a reclaimer wired.
    pub fn armed(&self) -> bool {
        self.config.enabled && self.config.destructive && self.reclaimer.is_some()
    }

    /// The inventory.
    pub fn inventory(&self) -> &I {
        &self.inventory
    }

    /// The live-token lookup.
    pub fn live_tokens(&self) -> &L {
        &self.live
    }

    /// The reclaimer.
    pub fn reclaimer(&self) -> Option<&R> {
        self.reclaimer.as_ref()
    }

    fn fail(&mut self, stage: Stage, error: &dyn std::error::Error) -> TickReport {
        tracing::warn!(stage = stage.as_str(), error = %error, "orphan sweep tick failed: zero candidates this tick");
        self.metrics.error(stage);
        // A failed tick breaks every candidate's run of consecutive sightings.
        self.seen.clear();
        TickReport::Failed {
            stage: stage.as_str(),
        }
    }

    fn name_for_logs(&self, candidate: &Candidate) -> (String, Option<String>) {
        match &candidate.backend {
            Some(name) => (
                name.masked(),
                Some(self.key.fingerprint_digest(&name.digest())),
            ),
            None => (keel_audit::mask(&candidate.name), None),
        }
    }

    /// One tick at `now`.
    pub async fn tick(&mut self, now: OffsetDateTime) -> TickReport {
        if !self.config.enabled {
            tracing::debug!("orphan sweep disabled (ORPHAN_DB_SWEEP_ENABLED is off): tick skipped");
            return TickReport::Disabled;
        }
        let source = self.inventory.source();
        let items = match self.inventory.list().await {
            Ok(items) => items,
            Err(e) => return self.fail(Stage::List, &e),
        };
        let digests = digests_of(&items, source);
        let live = match self.live.live_among(&digests).await {
            Ok(live) => live,
            Err(e) => return self.fail(Stage::LiveTokens, &e),
        };
        let candidates = detect(&items, source, &live, now, self.config.grace);

        let counts: Vec<(OrphanKind, u64)> = OrphanKind::ALL
            .iter()
            .map(|&kind| {
                let n = candidates.iter().filter(|c| c.kind == kind).count();
                (kind, n as u64)
            })
            .collect();
        self.metrics.candidates(&counts);
        let seen: HashMap<String, u32> = candidates
            .iter()
            .map(|c| {
                let before = self.seen.get(&c.name).copied().unwrap_or(0);
                (c.name.clone(), before.saturating_add(1))
            })
            .collect();
        self.seen = seen;

        let armed = self.armed();
        // One flag per candidate (indexed like `candidates`): a lookup per candidate stays O(1).
        let eligible: Vec<bool> = candidates
            .iter()
            .map(|c| c.reclaimable() && self.seen[&c.name] >= self.config.confirm_ticks)
            .collect();
        let eligible_count = eligible.iter().filter(|&&e| e).count();
        let cap = self.config.cap(items.len());
        let capped = armed && eligible_count > cap;
        if capped {
            tracing::error!(
                eligible = eligible_count,
                cap,
                inventory = items.len(),
                "orphan sweep blast-radius cap exceeded: every reclaim of this tick is aborted"
            );
            self.metrics.aborted_by_cap();
        }

        let mut views = Vec::with_capacity(candidates.len());
        for (i, candidate) in candidates.iter().enumerate() {
            let (name_masked, fingerprint) = self.name_for_logs(candidate);
            let seen_ticks = self.seen.get(&candidate.name).copied().unwrap_or(0);
            let action = if !armed || !eligible[i] {
                Action::Reported
            } else if capped {
                Action::AbortedByCap
            } else {
                let action = self.reclaim(candidate, now).await;
                match action {
                    // Gone or owned: its run of sightings starts over.
                    Action::Reclaimed | Action::AlreadyGone | Action::SkippedLive => {
                        self.seen.remove(&candidate.name);
                    }
                    Action::Reported | Action::AbortedByCap | Action::Failed => {}
                }
                action
            };
            tracing::info!(
                kind = candidate.kind.as_str(),
                name = %name_masked,
                fingerprint = fingerprint.as_deref().unwrap_or("-"),
                age_seconds = candidate.age.as_secs(),
                protected = candidate.protected,
                seen_ticks,
                action = ?action,
                armed,
                "orphan candidate"
            );
            views.push(CandidateView {
                kind: candidate.kind.as_str(),
                name_masked,
                fingerprint,
                age_seconds: candidate.age.as_secs(),
                protected: candidate.protected,
                seen_ticks,
                action,
            });
        }
        self.metrics
            .succeeded((now - OffsetDateTime::UNIX_EPOCH).as_seconds_f64());
        tracing::info!(
            inventory = items.len(),
            candidates = views.len(),
            armed,
            "orphan sweep tick done"
        );
        TickReport::Swept {
            inventory: items.len(),
            armed,
            candidates: views,
        }
    }

    /// Re-reads the token's liveness, then reclaims through the chokepoint.
    async fn reclaim(&self, candidate: &Candidate, now: OffsetDateTime) -> Action {
        let (Some(reclaimer), Some(name)) = (self.reclaimer.as_ref(), candidate.backend.as_ref())
        else {
            return Action::Reported;
        };
        let digest = name.digest();
        let fingerprint = self.key.fingerprint_digest(&digest);
        match self.live.live_among(std::slice::from_ref(&digest)).await {
            Ok(live) if live.contains(&digest) => {
                tracing::info!(name = %name, fingerprint = %fingerprint, "token turned live before the reclaim: skipped");
                return Action::SkippedLive;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(name = %name, error = %e, "could not re-confirm the token's liveness: not reclaimed");
                self.metrics.error(Stage::Reconfirm);
                return Action::Failed;
            }
        }
        match reclaimer.reclaim(name, now).await {
            Ok(Reclaimed::TornDown) => {
                tracing::warn!(name = %name, fingerprint = %fingerprint, kind = candidate.kind.as_str(), "orphan reclaimed through the deprovision chokepoint");
                self.metrics.reclaimed(candidate.kind);
                Action::Reclaimed
            }
            Ok(Reclaimed::AlreadyGone) => Action::AlreadyGone,
            Err(crate::ports::ReclaimError::Live) => Action::SkippedLive,
            Err(e) => {
                tracing::error!(name = %name, error = %e, "orphan reclaim failed");
                self.metrics.error(Stage::Reclaim);
                Action::Failed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet, VecDeque};
    use std::sync::{Arc, Mutex};

    use keel_audit::Token;
    use keel_provision::{BackendName, TokenDigest};
    use prometheus_client::registry::Registry;
    use time::macros::datetime;

    use super::*;
    use crate::ports::{
        InventoryError, InventoryItem, InventorySource, LiveTokensError, ReclaimError,
    };

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);

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
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[derive(Clone, Default)]
    struct FakeInventory(Script<Result<Vec<InventoryItem>, &'static str>>);

    impl Inventory for FakeInventory {
        fn source(&self) -> InventorySource {
            InventorySource::Postgres
        }
        async fn list(&self) -> Result<Vec<InventoryItem>, InventoryError> {
            self.0.calls.lock().unwrap().push("list".into());
            let answer = self.0.answers.lock().unwrap().pop_front();
            match answer {
                Some(Ok(items)) => Ok(items),
                Some(Err("expired")) => Err(InventoryError::Expired { pages: 1 }),
                Some(Err(e)) => Err(InventoryError::Page {
                    page: 1,
                    source: e.into(),
                }),
                None => Ok(Vec::new()),
            }
        }
    }

    /// Live tokens: each call pops a scripted set (or an error); with no script, nothing is live.
    #[derive(Clone, Default)]
    struct FakeLive(Script<Result<Vec<&'static str>, &'static str>>);

    impl LiveTokens for FakeLive {
        async fn live_among(
            &self,
            tokens: &[TokenDigest],
        ) -> Result<HashSet<TokenDigest>, LiveTokensError> {
            self.0
                .calls
                .lock()
                .unwrap()
                .push(format!("live_among({})", tokens.len()));
            let answer = self.0.answers.lock().unwrap().pop_front();
            match answer {
                Some(Ok(live)) => Ok(live
                    .iter()
                    .map(|t| TokenDigest::of(&Token::parse(t).unwrap()))
                    .collect()),
                Some(Err(e)) => Err(LiveTokensError(e.into())),
                None => Ok(HashSet::new()),
            }
        }
    }

    #[derive(Clone, Default)]
    struct FakeReclaimer(Script<()>);

    impl Reclaimer for FakeReclaimer {
        async fn reclaim(
            &self,
            name: &BackendName,
            _now: OffsetDateTime,
        ) -> Result<Reclaimed, ReclaimError> {
            self.0.calls.lock().unwrap().push(name.expose().to_owned());
            Ok(Reclaimed::TornDown)
        }
    }

    fn orphan(token: &str) -> InventoryItem {
        InventoryItem {
            name: format!("cust_{token}"),
            created_at: Some(NOW - time::Duration::hours(3)),
            labels: BTreeMap::from([(crate::MANAGED_BY_LABEL.into(), crate::MANAGED_BY.into())]),
            annotations: BTreeMap::new(),
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
        metrics: SweepMetrics,
        sweeper: Sweeper<FakeInventory, FakeLive, FakeReclaimer>,
    }

    fn world(config: SweepConfig, wired: bool) -> World {
        let inventory = FakeInventory::default();
        let live = FakeLive::default();
        let reclaimer = FakeReclaimer::default();
        let metrics = SweepMetrics::register(&mut Registry::default());
        let sweeper = Sweeper::new(
            inventory.clone(),
            live.clone(),
            wired.then(|| reclaimer.clone()),
            config,
            metrics.clone(),
            FingerprintKey::new(*b"test-key-0123456789").unwrap(),
        );
        World {
            inventory,
            live,
            reclaimer,
            metrics,
            sweeper,
        }
    }

    fn armed() -> SweepConfig {
        SweepConfig {
            enabled: true,
            destructive: true,
            ..SweepConfig::default()
        }
    }

    fn actions(report: &TickReport) -> Vec<Action> {
        match report {
            TickReport::Swept { candidates, .. } => candidates.iter().map(|c| c.action).collect(),
            TickReport::Disabled | TickReport::Failed { .. } => Vec::new(),
        }
    }

    #[tokio::test]
    async fn gates_off_calls_no_port_and_moves_no_metric() {
        let mut w = world(SweepConfig::default(), true);
        w.inventory.0.push(Ok(vec![orphan("orph00000001")]));
        for _ in 0..3 {
            assert_eq!(w.sweeper.tick(NOW).await, TickReport::Disabled);
        }
        assert!(w.inventory.0.calls().is_empty());
        assert!(w.live.0.calls().is_empty());
        assert!(w.reclaimer.0.calls().is_empty());
        for &kind in OrphanKind::ALL {
            assert_eq!(w.metrics.total(kind), 0);
        }
    }

    #[tokio::test]
    async fn audit_only_never_calls_the_reclaimer() {
        let config = SweepConfig {
            enabled: true,
            ..SweepConfig::default()
        };
        let mut w = world(config, true);
        assert!(!w.sweeper.armed());
        for _ in 0..5 {
            w.inventory.0.push(Ok(vec![orphan("orph00000001")]));
            let report = w.sweeper.tick(NOW).await;
            assert_eq!(actions(&report), [Action::Reported]);
        }
        assert!(w.reclaimer.0.calls().is_empty());
        assert_eq!(w.metrics.total(OrphanKind::CustomerDatabase), 5);
        assert_eq!(w.metrics.current(OrphanKind::CustomerDatabase), 1);
    }

    #[tokio::test]
    async fn both_gates_on_without_a_reclaimer_is_not_armed() {
        let mut w = world(armed(), false);
        assert!(!w.sweeper.armed());
        for _ in 0..4 {
            w.inventory.0.push(Ok(vec![orphan("orph00000001")]));
            assert_eq!(actions(&w.sweeper.tick(NOW).await), [Action::Reported]);
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
            w.inventory.0.push(list);
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
            assert_eq!(w.metrics.total(OrphanKind::CustomerDatabase), 0, "{case}");
            assert!(w.reclaimer.0.calls().is_empty(), "{case}");
        }
    }

    #[tokio::test]
    async fn a_candidate_seen_in_fewer_than_n_ticks_is_not_reclaimed() {
        let mut w = world(armed(), true);
        for expected in [Action::Reported, Action::Reported, Action::Reclaimed] {
            w.inventory.0.push(Ok(vec![orphan("orph00000001")]));
            assert_eq!(actions(&w.sweeper.tick(NOW).await), [expected]);
        }
        assert_eq!(w.reclaimer.0.calls(), ["cust_orph00000001"]);
        assert_eq!(w.metrics.reclaims(OrphanKind::CustomerDatabase), 1);
    }

    #[tokio::test]
    async fn a_failed_tick_restarts_the_count_of_consecutive_sightings() {
        let mut w = world(armed(), true);
        for list in [
            Ok(vec![orphan("orph00000001")]),
            Ok(vec![orphan("orph00000001")]),
            Err("glitch"),
            Ok(vec![orphan("orph00000001")]),
            Ok(vec![orphan("orph00000001")]),
        ] {
            w.inventory.0.push(list);
            w.sweeper.tick(NOW).await;
        }
        assert!(
            w.reclaimer.0.calls().is_empty(),
            "only 2 consecutive sightings"
        );
    }

    #[tokio::test]
    async fn a_token_that_turns_live_before_the_reclaim_is_skipped() {
        let mut w = world(armed(), true);
        for _ in 0..2 {
            w.inventory.0.push(Ok(vec![orphan("orph00000001")]));
            w.sweeper.tick(NOW).await;
        }
        w.inventory.0.push(Ok(vec![orphan("orph00000001")]));
        w.live.0.push(Ok(vec![])); // detection: not live
        w.live.0.push(Ok(vec!["orph00000001"])); // re-confirmation: live now
        let report = w.sweeper.tick(NOW).await;
        assert_eq!(actions(&report), [Action::SkippedLive]);
        assert!(w.reclaimer.0.calls().is_empty());
    }

    #[tokio::test]
    async fn the_cap_aborts_every_reclaim_of_the_tick_and_still_reports_the_candidates() {
        let mut w = world(armed(), true);
        let tokens: Vec<String> = (1..=6).map(|i| format!("orph0000000{i}")).collect();
        let items: Vec<InventoryItem> = tokens.iter().map(|t| orphan(t)).collect();
        for _ in 0..3 {
            w.inventory.0.push(Ok(items.clone()));
            let report = w.sweeper.tick(NOW).await;
            assert_eq!(actions(&report).len(), 6);
        }
        assert!(w.reclaimer.0.calls().is_empty());
        assert_eq!(w.metrics.aborts(), 1);
        // The fraction cap binds too: 2 eligible among 10 items is over ceil(10% of 10) = 1.
        let mut w = world(armed(), true);
        let mut items = vec![orphan("orph00000001"), orphan("orph00000002")];
        items.extend((0..8).map(|i| {
            let mut young = orphan(&format!("young000000{i}"));
            young.created_at = Some(NOW);
            young
        }));
        for _ in 0..3 {
            w.inventory.0.push(Ok(items.clone()));
            w.sweeper.tick(NOW).await;
        }
        assert!(w.reclaimer.0.calls().is_empty());
        assert_eq!(w.metrics.aborts(), 1);
    }

    #[tokio::test]
    async fn protected_and_generic_candidates_are_never_reclaimed() {
        let mut w = world(armed(), true);
        let generic = InventoryItem {
            name: "cust_NOT-A-TOKEN".into(),
            ..orphan("orph00000009")
        };
        for _ in 0..4 {
            w.inventory
                .0
                .push(Ok(vec![protected("prot00000001"), generic.clone()]));
            let report = w.sweeper.tick(NOW).await;
            assert_eq!(actions(&report), [Action::Reported, Action::Reported]);
        }
        assert!(w.reclaimer.0.calls().is_empty());
        assert_eq!(w.metrics.current(OrphanKind::Generic), 1);
    }

    #[tokio::test]
    async fn the_current_gauge_falls_to_zero_when_the_backlog_drains() {
        let mut w = world(
            SweepConfig {
                enabled: true,
                ..SweepConfig::default()
            },
            false,
        );
        w.inventory
            .0
            .push(Ok(vec![orphan("orph00000001"), orphan("orph00000002")]));
        w.sweeper.tick(NOW).await;
        assert_eq!(w.metrics.current(OrphanKind::CustomerDatabase), 2);
        w.inventory.0.push(Ok(vec![]));
        w.sweeper.tick(NOW).await;
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
        // Every path that logs: reclaim, protected, live skip at re-confirmation, cap, failures.
        let mut w = world(
            SweepConfig {
                max_fraction: 1.0,
                ..armed()
            },
            true,
        );
        let items = vec![orphan(tokens[0]), protected(tokens[2]), orphan(tokens[3])];
        for _ in 0..2 {
            w.inventory.0.push(Ok(items.clone()));
            w.sweeper.tick(NOW).await;
        }
        w.inventory.0.push(Ok(items.clone()));
        w.live.0.push(Ok(vec![])); // detection
        w.live.0.push(Ok(vec![])); // re-confirm tokens[0]: reclaimed
        w.live.0.push(Ok(vec![tokens[3]])); // re-confirm tokens[3]: live now
        w.sweeper.tick(NOW).await;
        w.inventory.0.push(Err("no route to host"));
        w.sweeper.tick(NOW).await;
        w.inventory.0.push(Ok(items.clone()));
        w.live.0.push(Err("statement timeout"));
        w.sweeper.tick(NOW).await;
        let mut capped = world(armed(), true);
        let many: Vec<InventoryItem> = (1..=6)
            .map(|i| orphan(&format!("many0000000{i}")))
            .collect();
        for _ in 0..3 {
            capped.inventory.0.push(Ok(many.clone()));
            capped.sweeper.tick(NOW).await;
        }

        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert!(logs.contains("orphan reclaimed"), "{logs}");
        assert!(logs.contains("cap exceeded"), "{logs}");
        assert!(logs.contains("turned live"), "{logs}");
        let mut all: Vec<String> = tokens.iter().map(|t| (*t).to_owned()).collect();
        all.extend((1..=6).map(|i| format!("many0000000{i}")));
        for token in &all {
            for line in logs.lines() {
                assert!(!line.contains(token.as_str()), "full token in: {line}");
            }
        }
    }
}
