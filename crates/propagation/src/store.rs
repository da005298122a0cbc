//! The `PropagationStore` port: where propagations wait, get claimed and record transitions.

use std::fmt;
use std::future::Future;

use keel_audit::Actor;
use time::{Duration, OffsetDateTime};

use crate::decide::Transition;
use crate::model::{Propagation, PropagationId};

/// Identifies one runner process (a replica) in `claimed_by`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkerId(String);

/// A worker id that is empty, too long or has odd characters.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid worker id: use 1 to 64 characters of [A-Za-z0-9._:-]")]
pub struct InvalidWorkerId;

impl WorkerId {
    /// Parses a worker id (e.g. the pod name).
    pub fn parse(s: &str) -> Result<Self, InvalidWorkerId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidWorkerId)
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One attempt's result, ready to be recorded.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The claimed propagation (its `attempt` is the fence).
    pub propagation: Propagation,
    /// What the attempt decided.
    pub transition: Transition,
}

/// What recording a batch of completions did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CompletionReport {
    /// Rows whose transition was recorded (with its audit row).
    pub recorded: Vec<PropagationId>,
    /// Rows refused by the fence: another claim (or a newer enqueue) had taken them over, so
    /// this worker's late result changed nothing. A row whose target was replaced while this
    /// claim held it is handed back at once, due now, with the new target's full budget.
    pub stale: Vec<PropagationId>,
    /// Rows whose completion could not be stored even on its own (the database refused it or
    /// a lock was held past the recording's lock timeout). They stay claimed and come back
    /// after their lease; every other row of the batch was still recorded.
    pub unrecorded: Vec<PropagationId>,
}

/// Why the store failed. Nothing was recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed the operation.
    #[error("the propagation store failed to {operation}: {source}")]
    Database {
        /// What was being attempted.
        operation: &'static str,
        /// The underlying error. From the Postgres adapter it is a `sqlx::Error` (sqlx 0.9):
        /// `source.downcast_ref::<sqlx::Error>()` reads it, for a caller deciding whether to
        /// retry.
        #[source]
        source: keel_audit::BoxError,
    },
    /// Writing the audit rows failed, so the transitions were rolled back with them.
    #[error("could not write the audit rows, so no transition was recorded: {0}")]
    Audit(#[from] keel_audit::AuditSinkError),
    /// The propagation asked for is not dead-lettered (or does not exist).
    #[error("propagation {0} is not dead-lettered; `dead-letters list` shows the ones that are")]
    NotDeadLettered(crate::model::PropagationId),
    /// The request was refused: it names a resource or team that does not exist or disagrees
    /// with what the database holds. Nothing was written.
    #[error("refused: {0}")]
    Rejected(String),
    /// Stored data could not be read: a propagation row, or the team or resource row a
    /// propagation is about.
    #[error("stored data cannot be read{}: {reason}", in_propagation(*.id))]
    Corrupt {
        /// The propagation concerned, when the data is one propagation's.
        id: Option<crate::model::PropagationId>,
        /// What is wrong.
        reason: String,
    },
}

fn in_propagation(id: Option<crate::model::PropagationId>) -> String {
    id.map(|id| format!(" (propagation {id})"))
        .unwrap_or_default()
}

/// The longest lease a claim holds (one day): a claim asking for more holds this long, and
/// [`RunnerConfig::check`](crate::runner::RunnerConfig::check) refuses a longer one.
pub const MAX_LEASE: Duration = Duration::days(1);

/// The margin beyond [`MAX_LEASE`] before a lease counts as implausible: it covers the
/// difference between the `now` two replicas read from the shared clock at different moments.
pub const LEASE_MARGIN: Duration = Duration::hours(1);

/// A lease no claim makes: one that ends more than [`MAX_LEASE`] + [`LEASE_MARGIN`] after
/// `now`. Such a claim was written by someone else (a hand edit, another service sharing the
/// table) and is rescued like an expired one rather than hiding its row until then.
pub fn lease_is_implausible(lease_expires_at: OffsetDateTime, now: OffsetDateTime) -> bool {
    lease_expires_at > now + MAX_LEASE + LEASE_MARGIN
}

/// The longest a pending row this crate schedules waits for its next attempt (two days): the
/// longest retry delay ([`MAX_RETRY_DELAY`](crate::MAX_RETRY_DELAY), one day) with the largest
/// jitter (50%) and [`LEASE_MARGIN`] to spare. A row due later than this was pushed there by
/// someone else (a hand edit, another service sharing the table); housekeeping makes it due
/// again rather than letting it hide its resource's drift until then.
pub const MAX_WAIT: Duration = Duration::days(2);

/// A next attempt no schedule makes: due more than [`MAX_WAIT`] after `now`.
pub fn wait_is_implausible(next_attempt_at: OffsetDateTime, now: OffsetDateTime) -> bool {
    next_attempt_at > now + MAX_WAIT
}

/// The lease a claim asking for `lease` holds: at most [`MAX_LEASE`], never negative.
pub fn bounded_lease(lease: Duration) -> Duration {
    lease.clamp(Duration::ZERO, MAX_LEASE)
}

/// Where propagations wait and how their attempts are recorded.
///
/// Delivery is at least once: a claim holds a lease; a row whose lease expires is claimable
/// again. Every completion is fenced on the claim's [`Fence`](crate::Fence) (a token no other
/// claim ever gets, and the target version the claim saw), so a stale worker's late result
/// changes nothing, and it commits together with its audit row or not at all.
///
/// Times passed as `now` must come from one clock all replicas share: [`PropagationStore::now`].
pub trait PropagationStore: Send + Sync {
    /// The store's clock (the database's `now()`), which every replica reads alike.
    fn now(&self) -> impl Future<Output = Result<OffsetDateTime, StoreError>> + Send;

    /// Claims up to `limit` due rows for `worker` for `lease` (at most [`MAX_LEASE`]: a longer
    /// one is held for [`MAX_LEASE`]), counting an attempt on each. Before claiming, claims whose
    /// lease has expired are undone, and so are claims whose lease ends further ahead than any
    /// claim makes ([`lease_is_implausible`]: another writer set it), which would otherwise hide
    /// their row until then.
    fn claim(
        &self,
        worker: &WorkerId,
        limit: u32,
        lease: Duration,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Vec<Propagation>, StoreError>> + Send;

    /// Records `completions` and their audit rows (attributed to `actor`): the batch in one
    /// transaction, or, if that fails, each row in its own, so one unstorable completion never
    /// costs the others theirs.
    fn complete(
        &self,
        worker: &WorkerId,
        completions: &[Completion],
        actor: &Actor,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<CompletionReport, StoreError>> + Send;

    /// Gives claimed rows back unattempted (their attempt is not counted), due again at
    /// `due_at`: at shutdown, or when an apply never reached its backend.
    fn release(
        &self,
        worker: &WorkerId,
        propagations: &[Propagation],
        due_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}
