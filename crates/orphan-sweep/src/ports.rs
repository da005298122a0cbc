//! The sweep's ports: the inventory of backend objects, the live-token lookup, and the
//! reclaimer (keel-provision's deprovision chokepoint). Owned here, with domain errors.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use keel_audit::BoxError;
use keel_provision::{BackendName, InstallationId, ReclaimRefusal, TokenDigest};
use time::OffsetDateTime;

use crate::Labels;

/// Which inventory a sweep reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InventorySource {
    /// Customer namespaces on Kubernetes (`instant-customer-*`).
    Kubernetes,
    /// Customer databases on the shared Postgres cluster (`cust_*`).
    Postgres,
}

impl InventorySource {
    /// The name stored with the sweep's state.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::Postgres => "postgres",
        }
    }
}

/// One backend object found by an inventory. Its name contains a customer token: never log it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InventoryItem {
    /// The object's name (secret: it carries the token).
    pub name: String,
    /// When it was created, when the backend knows.
    pub created_at: Option<OffsetDateTime>,
    /// Its labels.
    pub labels: Labels,
    /// Its annotations.
    pub annotations: Labels,
    /// Already being deleted (a namespace with a `deletionTimestamp`, stuck on finalizers):
    /// tracked and reported, never reclaimed again.
    pub terminating: bool,
}

impl InventoryItem {
    /// An item named `name`, with no creation time, labels or annotations, not terminating.
    /// The `with_*` methods fill in the rest (an inventory outside this crate builds its items
    /// this way, so a new field is not a breaking change).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            created_at: None,
            labels: Labels::new(),
            annotations: Labels::new(),
            terminating: false,
        }
    }

    /// Sets when the backend says it was created.
    #[must_use]
    pub fn with_created_at(mut self, created_at: OffsetDateTime) -> Self {
        self.created_at = Some(created_at);
        self
    }

    /// Adds the label `key=value`.
    #[must_use]
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds the annotation `key=value`.
    #[must_use]
    pub fn with_annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Marks it as already being deleted.
    #[must_use]
    pub fn with_terminating(mut self, terminating: bool) -> Self {
        self.terminating = terminating;
        self
    }
}

/// Why an inventory could not produce a complete list. A partial list is never returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InventoryError {
    /// The list expired mid-pagination (HTTP 410): the pages seen so far are discarded.
    #[error("the list expired mid-pagination after {pages} page(s); nothing from it is used")]
    Expired {
        /// Pages read before the expiry.
        pages: u32,
    },
    /// A page could not be read.
    #[error("could not read page {page} of the inventory")]
    Page {
        /// The failing page (1-based).
        page: u32,
        /// The backend's error, with tokens masked.
        #[source]
        source: BoxError,
    },
}

/// Lists every backend object of one kind: a complete list, or an error.
pub trait Inventory: Send + Sync {
    /// The inventory's source.
    fn source(&self) -> InventorySource;

    /// Lists every object under the platform's prefix.
    fn list(&self) -> impl Future<Output = Result<Vec<InventoryItem>, InventoryError>> + Send;
}

/// Why live tokens could not be read.
#[derive(Debug, thiserror::Error)]
#[error("could not read which tokens are live")]
pub struct LiveTokensError(#[source] pub BoxError);

/// What this installation's platform database says about a set of tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Standings {
    /// This installation's id.
    pub installation: InstallationId,
    /// Tokens a row that is not terminal owns (any status but `deleted` and `failed`, so a
    /// status this build does not know counts as live).
    pub live: HashSet<TokenDigest>,
    /// Tokens this installation has any row for, whatever its status: the platform-held proof
    /// that this installation made the object.
    pub owned: HashSet<TokenDigest>,
    /// Tokens the platform protects (`reclaim_protections`).
    pub protected: HashSet<TokenDigest>,
}

impl Standings {
    /// Standings of `installation` where nothing is live, owned or protected.
    pub fn empty(installation: InstallationId) -> Self {
        Self {
            installation,
            live: HashSet::new(),
            owned: HashSet::new(),
            protected: HashSet::new(),
        }
    }
}

/// Reads this installation's standing of tokens, asked and answered by [`TokenDigest`] so the
/// read never sends a token.
pub trait LiveTokens: Send + Sync {
    /// The standings of `digests`, in one set-based read (never one query per token).
    fn standing_among(
        &self,
        digests: &[TokenDigest],
    ) -> impl Future<Output = Result<Standings, LiveTokensError>> + Send;
}

/// What a reclaim did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reclaimed {
    /// Audited (`orphan_sweep.reclaimed`) and torn down.
    TornDown,
    /// Already gone; nothing was done.
    AlreadyGone,
}

/// Why a reclaim did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReclaimError {
    /// A live resource owns the object (checked by the chokepoint itself); nothing was touched.
    #[error("a live resource owns it; nothing was touched")]
    Live,
    /// The chokepoint refused it on its fresh read (another installation's, not provably this
    /// installation's, or protected); nothing was destroyed. Never retried.
    #[error("the chokepoint refused it ({0}); nothing was destroyed")]
    Refused(ReclaimRefusal),
    /// It is already being deleted; nothing was done.
    #[error("it is already being deleted; nothing was done")]
    BeingDeleted,
    /// The chokepoint failed.
    #[error("the deprovision chokepoint failed")]
    Failed(#[source] BoxError),
}

pub(crate) mod sealed {
    /// Seals [`super::Reclaimer`]: only this crate implements it.
    pub trait Sealed {}
}

/// Tears down an orphan. Sealed: the only implementation that destroys anything is
/// keel-provision's audited deprovision chokepoint (`keel_provision::Provisioner`); tests use
/// `testing::ScriptedReclaimer` (feature `testing`).
pub trait Reclaimer: sealed::Sealed + Send + Sync {
    /// Reclaims the object `name`.
    fn reclaim(
        &self,
        name: &BackendName,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Reclaimed, ReclaimError>> + Send;
}

impl<T: Reclaimer + ?Sized> sealed::Sealed for &T {}

impl<T: Reclaimer + ?Sized> Reclaimer for &T {
    fn reclaim(
        &self,
        name: &BackendName,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Reclaimed, ReclaimError>> + Send {
        (**self).reclaim(name, now)
    }
}

/// A period claimed by one replica: the tick of that period runs once however many replicas
/// there are. `now` is the state store's clock (replicas agree on it).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeriodClaim {
    /// The period: whole intervals since the Unix epoch, by the store's clock.
    pub period: i64,
    /// The store's clock when the claim was made.
    pub now: OffsetDateTime,
}

impl PeriodClaim {
    /// The claim of `period`, made at `now` by the store's clock.
    pub fn new(period: i64, now: OffsetDateTime) -> Self {
        Self { period, now }
    }
}

/// Why the sweep's durable state could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("the orphan sweep's state store failed to {operation}")]
pub struct StateError {
    /// What was being attempted.
    pub operation: &'static str,
    /// The store's error (never a token).
    #[source]
    pub source: BoxError,
}

/// The durable record of one candidate across periods (by kind and token digest, never by name).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sighting {
    /// The sighting's key: `<kind>:<token digest>` (a generic item without a token: `<kind>:`
    /// plus a digest of its name).
    pub key: String,
    /// The start of the period it was first seen in as a candidate, in its current unbroken run
    /// of periods.
    pub first_seen: OffsetDateTime,
    /// The last period it was seen in.
    pub last_period: i64,
    /// The start of the period its current run of reclaimable sightings started in; `None`
    /// while it is not reclaimable.
    pub reclaimable_since: Option<OffsetDateTime>,
    /// Consecutive periods it was seen reclaimable in.
    pub consecutive: u32,
    /// Set once the chokepoint refused it: never attempted again while it stays a candidate.
    pub quarantined: Option<String>,
    /// Reclaims of it that failed in its current run (the teardown, not a re-read of the
    /// platform database before it). The rate limit takes the candidates with the fewest first,
    /// so one that keeps failing never holds a slot ahead of one that has not failed.
    pub failed_reclaims: u32,
}

impl Sighting {
    /// Whether this sighting only carries `stored` on: the same key, first sighting,
    /// reclaimable run, quarantine and failed reclaims, seen in the same or a later period, with a reclaimable
    /// run longer by exactly the periods between them (no run is counted when not
    /// reclaimable, and a stored reclaimable run of no periods is never carried on). A store
    /// that keeps the period once per inventory and each run's first period holds such a
    /// sighting already, and need not write it again.
    pub fn continues(&self, stored: &Sighting) -> bool {
        let Some(periods) = self
            .last_period
            .checked_sub(stored.last_period)
            .and_then(|d| u64::try_from(d).ok())
        else {
            return false;
        };
        let run = match self.reclaimable_since {
            None => self.consecutive == 0 && stored.consecutive == 0,
            // A stored run with no period in it (a row written by hand whose run starts after
            // the period it was read in) is written again, so it reads back as this one.
            Some(_) => {
                stored.consecutive > 0
                    && u64::from(stored.consecutive).checked_add(periods)
                        == Some(u64::from(self.consecutive))
            }
        };
        run && self.key == stored.key
            && self.first_seen == stored.first_seen
            && self.reclaimable_since == stored.reclaimable_since
            && self.quarantined == stored.quarantined
            && self.failed_reclaims == stored.failed_reclaims
    }

    /// A first sighting under `key` in `period`, which started at `first_seen`: not
    /// reclaimable, no consecutive reclaimable periods, not quarantined, no failed reclaim. A
    /// state store outside this crate builds its sightings this way and sets the public fields
    /// it read.
    pub fn new(key: impl Into<String>, first_seen: OffsetDateTime, period: i64) -> Self {
        Self {
            key: key.into(),
            first_seen,
            last_period: period,
            reclaimable_since: None,
            consecutive: 0,
            quarantined: None,
            failed_reclaims: 0,
        }
    }
}

/// The sweep's durable state: period claims and sightings, in the platform database so
/// `--once` from a CronJob, restarts and replicas all see the same burn-in.
pub trait SweepState: Send + Sync {
    /// Claims the period `now` falls in (by the store's clock) for `source`, once: `None` when a
    /// replica already claimed it.
    fn claim(
        &self,
        source: InventorySource,
        interval: Duration,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Option<PeriodClaim>, StateError>> + Send;

    /// Whether `claim` is still the newest claim for `source` (the fence checked before each
    /// reclaim: a replica that has lost it stops).
    fn holds(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
    ) -> impl Future<Output = Result<bool, StateError>> + Send;

    /// The sightings recorded for `source`.
    fn sightings(
        &self,
        source: InventorySource,
    ) -> impl Future<Output = Result<Vec<Sighting>, StateError>> + Send;

    /// Replaces the sightings of `source` with `sightings`, only while `claim` holds (a stale
    /// replica writes nothing and gets an error). A tick's sightings are all seen in its
    /// claim's period (`last_period`), and a store may record them as such.
    fn replace(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
        sightings: &[Sighting],
    ) -> impl Future<Output = Result<(), StateError>> + Send;

    /// Records `sightings` as [`replace`](Self::replace) does, told by `changes` how they
    /// differ from what [`sightings`](Self::sightings) returned after `claim` was made (or
    /// from what an earlier call under the same claim recorded), so that a store can write
    /// only what changed. The outcome must be the same as `replace`'s. The default ignores
    /// `changes` and replaces.
    fn record(
        &self,
        source: InventorySource,
        claim: &PeriodClaim,
        sightings: &[Sighting],
        changes: SightingChanges<'_>,
    ) -> impl Future<Output = Result<(), StateError>> + Send {
        let _ = changes;
        self.replace(source, claim, sightings)
    }

    /// Hands back the sightings of `source` that the last successful
    /// [`record`](Self::record) or [`replace`](Self::replace) on this store was given, once the
    /// tick is done with them (after the last record of its tick, never between a record and
    /// a change of them). A store may keep them to answer its next
    /// [`sightings`](Self::sightings) without reading every one, provided it first checks that
    /// nothing changed what it holds since; it must never answer with them otherwise. The
    /// default drops them.
    fn keep_recorded(&self, source: InventorySource, sightings: Vec<Sighting>) {
        let _ = source;
        drop(sightings);
    }
}

/// How a tick's sightings differ from the ones its store held: which of them only carry on a
/// stored sighting into a later period (see [`Sighting::continues`]), and which stored ones are
/// no longer candidates.
#[derive(Clone, Copy, Debug)]
pub struct SightingChanges<'a> {
    /// By position among the sightings: whether that sighting continues the stored one with
    /// its key, nothing changed but the period (and, for a reclaimable run, its length).
    pub continued: &'a [bool],
    /// The keys of stored sightings that are no longer candidates.
    pub vanished: &'a [String],
}
