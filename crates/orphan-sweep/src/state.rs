//! Durable burn-in, pure: how a candidate's sighting moves from one period to the next, and an
//! in-memory [`SweepState`] for tests and examples (the binary keeps its state in the platform
//! database, `keel_orphan_sweep::postgres::PgSweepState`).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use time::OffsetDateTime;

use crate::ports::{InventorySource, PeriodClaim, Sighting, StateError, SweepState};

/// The period `now` falls in: whole `interval`s since the Unix epoch (an interval under one
/// second counts as one second).
pub fn period_of(now: OffsetDateTime, interval: Duration) -> i64 {
    let secs = i64::try_from(interval.as_secs().max(1)).unwrap_or(i64::MAX);
    now.unix_timestamp().div_euclid(secs)
}

/// The sighting of a candidate seen in `period` at `now`, from its previous sighting `prev`,
/// and whether it is a new one (first seen, or seen again after a period without it).
///
/// A run is unbroken only when the previous sighting is from the period just before (or this
/// same period): a period in which no tick completed (a failed tick, a database outage, no
/// replica running) breaks every run. The reclaimable run (`consecutive`,
/// `reclaimable_since`) counts only sightings in which the candidate was `reclaimable`: a
/// protected, foreign or unmanaged sighting resets it. A quarantine (the chokepoint refused it)
/// and the count of failed reclaims last while the run is unbroken.
pub fn advance(
    prev: Option<&Sighting>,
    key: String,
    period: i64,
    now: OffsetDateTime,
    reclaimable: bool,
) -> (Sighting, bool) {
    let continuing = prev.filter(|p| p.last_period == period || p.last_period == period - 1);
    let Some(prev) = continuing else {
        return (
            Sighting {
                key,
                first_seen: now,
                last_period: period,
                reclaimable_since: reclaimable.then_some(now),
                consecutive: u32::from(reclaimable),
                quarantined: None,
                failed_reclaims: 0,
            },
            true,
        );
    };
    let (reclaimable_since, consecutive) = match (reclaimable, prev.reclaimable_since) {
        (false, _) => (None, 0),
        (true, None) => (Some(now), 1),
        (true, Some(since)) if prev.last_period == period => (Some(since), prev.consecutive),
        (true, Some(since)) => (Some(since), prev.consecutive.saturating_add(1)),
    };
    (
        Sighting {
            key,
            first_seen: prev.first_seen,
            last_period: period,
            reclaimable_since,
            consecutive,
            quarantined: prev.quarantined.clone(),
            failed_reclaims: prev.failed_reclaims,
        },
        false,
    )
}

/// Whether a sighting has served its burn-in at `now`: seen reclaimable in at least
/// `confirm_ticks` consecutive periods spanning at least `burn_in`.
pub fn burned_in(
    sighting: &Sighting,
    now: OffsetDateTime,
    confirm_ticks: u32,
    burn_in: Duration,
) -> bool {
    let Some(since) = sighting.reclaimable_since else {
        return false;
    };
    let served = Duration::try_from(now - since).unwrap_or(Duration::ZERO);
    sighting.consecutive >= confirm_ticks.max(1) && served >= burn_in
}

#[derive(Debug, Default)]
struct Slot {
    claimed: Option<i64>,
    sightings: Vec<Sighting>,
}

/// A [`SweepState`] in process memory: one process's claims and sightings, for tests, examples
/// and fakes. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct MemoryState {
    slots: std::sync::Arc<Mutex<HashMap<InventorySource, Slot>>>,
}

impl MemoryState {
    /// An empty state.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, source: InventorySource, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        f(slots.entry(source).or_default())
    }
}

impl SweepState for MemoryState {
    async fn claim(
        &self,
        source: InventorySource,
        interval: Duration,
        now: OffsetDateTime,
    ) -> Result<Option<PeriodClaim>, StateError> {
        let period = period_of(now, interval);
        Ok(self.with(source, |slot| {
            if slot.claimed.is_some_and(|claimed| claimed >= period) {
                None
            } else {
                slot.claimed = Some(period);
                Some(PeriodClaim { period, now })
            }
        }))
    }

    async fn holds(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
    ) -> Result<bool, StateError> {
        Ok(self.with(source, |slot| slot.claimed == Some(claim.period)))
    }

    async fn sightings(&self, source: InventorySource) -> Result<Vec<Sighting>, StateError> {
        Ok(self.with(source, |slot| slot.sightings.clone()))
    }

    async fn replace(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
        sightings: &[Sighting],
    ) -> Result<(), StateError> {
        self.with(source, |slot| {
            if slot.claimed == Some(claim.period) {
                // In place: the stored list is overwritten element by element, so the old
                // list and a whole new copy are never held at once (a tick of a large
                // inventory would otherwise hold three lists of sightings at its peak).
                let common = slot.sightings.len().min(sightings.len());
                slot.sightings.truncate(common);
                slot.sightings.clone_from_slice(&sightings[..common]);
                slot.sightings.extend_from_slice(&sightings[common..]);
                Ok(())
            } else {
                Err(StateError {
                    operation: "record sightings under a lost period claim",
                    source: "a newer period was claimed".into(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const T0: OffsetDateTime = datetime!(2026-11-22 10:00 UTC);
    const HOUR: Duration = Duration::from_secs(3600);

    /// SWEEP-3: burn-in needs both the duration and the ticks, counted only while reclaimable,
    /// and is broken by any period without a completed tick (restart, lock skip, outage).
    #[test]
    fn burn_in_requires_elapsed_time_and_unbroken_reclaimable_sightings() {
        // (case, per period: Some(reclaimable) = seen, None = no completed tick), interval,
        // confirmed at the end?
        type Case = (&'static str, Vec<Option<bool>>, Duration, bool);
        let cases: Vec<Case> = vec![
            (
                "three hourly reclaimable sightings",
                vec![Some(true); 3],
                HOUR,
                true,
            ),
            ("two are not enough", vec![Some(true); 2], HOUR, false),
            (
                "a period without a completed tick breaks the run",
                vec![Some(true), Some(true), None, Some(true)],
                HOUR,
                false,
            ),
            (
                "protected sightings do not count (protection lifted late)",
                vec![
                    Some(false),
                    Some(false),
                    Some(false),
                    Some(true),
                    Some(true),
                ],
                HOUR,
                false,
            ),
            (
                "after protection is lifted the run starts then",
                vec![Some(false), Some(true), Some(true), Some(true)],
                HOUR,
                true,
            ),
            (
                "a 1 s interval gives three ticks but not two hours",
                vec![Some(true); 3],
                Duration::from_secs(1),
                false,
            ),
        ];
        for (case, periods, interval, expected) in cases {
            let mut prev: Option<Sighting> = None;
            let mut now = T0;
            for (i, seen) in periods.iter().enumerate() {
                now = T0 + interval * u32::try_from(i).unwrap();
                let period = period_of(now, interval);
                if let Some(reclaimable) = seen {
                    let (next, _) = advance(prev.as_ref(), "k".into(), period, now, *reclaimable);
                    prev = Some(next);
                }
            }
            let confirmed = prev
                .as_ref()
                .is_some_and(|s| burned_in(s, now, 3, 2 * HOUR));
            assert_eq!(confirmed, expected, "{case}");
        }
    }

    #[test]
    fn a_new_sighting_is_counted_once_per_unbroken_run() {
        let (first, new) = advance(None, "k".into(), 10, T0, true);
        assert!(new);
        let (second, new) = advance(Some(&first), "k".into(), 11, T0 + HOUR, true);
        assert!(!new);
        assert_eq!(second.first_seen, T0);
        assert_eq!(second.consecutive, 2);
        let (third, new) = advance(Some(&second), "k".into(), 13, T0 + 3 * HOUR, true);
        assert!(new, "a gap starts a new run");
        assert_eq!(third.consecutive, 1);
    }

    /// What a store that keeps runs holds of a sighting: everything but the period, with the
    /// period its reclaimable run started in.
    fn run_form(
        s: &Sighting,
    ) -> (
        OffsetDateTime,
        Option<OffsetDateTime>,
        Option<i64>,
        Option<String>,
        u32,
    ) {
        let start = s
            .reclaimable_since
            .map(|_| s.last_period - i64::from(s.consecutive) + 1);
        (
            s.first_seen,
            s.reclaimable_since,
            start,
            s.quarantined.clone(),
            s.failed_reclaims,
        )
    }

    /// A sighting that continues the stored one has the same run form, so not writing it loses
    /// nothing; and every step that keeps a run going as it was (the next period or the same
    /// one, reclaimable or not as before, no new quarantine) continues, so a tick in which
    /// nothing changed writes nothing.
    #[test]
    fn a_continued_sighting_is_the_stored_run_carried_into_a_later_period() {
        let mut checked = 0;
        for first_reclaimable in [false, true] {
            for quarantined in [false, true] {
                let (mut stored, _) = advance(None, "k".into(), 10, T0, first_reclaimable);
                if quarantined {
                    stored.quarantined = Some("refused".to_owned());
                }
                for step in [0_i64, 1, 2] {
                    for reclaimable in [false, true] {
                        for quarantine_now in [false, true] {
                            let period = 10 + step;
                            let now = T0 + HOUR * u32::try_from(step).unwrap();
                            let (mut next, new) =
                                advance(Some(&stored), "k".into(), period, now, reclaimable);
                            if quarantine_now {
                                next.quarantined = Some("refused".to_owned());
                            }
                            let continues = next.continues(&stored);
                            if continues {
                                assert_eq!(run_form(&next), run_form(&stored));
                            }
                            let kept_going = !new
                                && reclaimable == first_reclaimable
                                && (quarantine_now == quarantined || quarantined);
                            assert_eq!(
                                continues, kept_going,
                                "step {step}, reclaimable {first_reclaimable} -> {reclaimable}, quarantined {quarantined} -> {quarantine_now}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 48);
        let (stored, _) = advance(None, "k".into(), 10, T0, true);
        let (other, _) = advance(None, "j".into(), 10, T0, true);
        assert!(!other.continues(&stored), "another key never continues");
        let (earlier, _) = advance(None, "k".into(), 9, T0, true);
        assert!(!earlier.continues(&stored), "nor does an earlier period");
        // A reclaimable run stored with no period in it (a hand-written row whose run starts
        // after the period it is read in) is written again, so it reads back as the tick saw it.
        let mut empty_run = stored.clone();
        empty_run.consecutive = 0;
        let (next, _) = advance(Some(&empty_run), "k".into(), 11, T0 + HOUR, true);
        assert_eq!(next.consecutive, 1);
        assert!(!next.continues(&empty_run));
        // A failed reclaim is a change the store must write; the count then carries on with
        // the run and starts again with a new one.
        let (mut failed, _) = advance(Some(&stored), "k".into(), 11, T0 + HOUR, true);
        failed.failed_reclaims += 1;
        assert!(!failed.continues(&stored));
        let (carried, _) = advance(Some(&failed), "k".into(), 12, T0 + 2 * HOUR, true);
        assert_eq!(carried.failed_reclaims, 1);
        assert!(carried.continues(&failed));
        let (after_a_gap, new) = advance(Some(&failed), "k".into(), 14, T0 + 4 * HOUR, true);
        assert!(new);
        assert_eq!(after_a_gap.failed_reclaims, 0);
    }

    #[tokio::test]
    async fn a_period_is_claimed_once_and_a_stale_claim_writes_nothing() {
        let state = MemoryState::new();
        let source = InventorySource::Postgres;
        let claim = state.claim(source, HOUR, T0).await.unwrap().unwrap();
        assert!(state.claim(source, HOUR, T0).await.unwrap().is_none());
        assert!(state.holds(source, &claim).await.unwrap());
        let next = state.claim(source, HOUR, T0 + HOUR).await.unwrap().unwrap();
        assert!(!state.holds(source, &claim).await.unwrap());
        assert!(state.replace(source, &claim, &[]).await.is_err());
        assert!(state.replace(source, &next, &[]).await.is_ok());
    }
}
